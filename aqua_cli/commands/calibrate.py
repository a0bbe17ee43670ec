"""`aqua calibrate`: the paper's offline step, as a command."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..cli import (
    BatchOpt,
    DataConfigOpt,
    DataOpt,
    DeviceMapOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelArg,
    RevisionOpt,
    SeedOpt,
    SeqLenOpt,
    SplitOpt,
    TextColumnOpt,
    TokensOpt,
    app,
    check_outputs,
    check_positive,
    load,
    out,
    progress,
    write_json,
)


@app.command()
def calibrate(
    model: ModelArg = None,
    revision: RevisionOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    data: DataOpt = "pydoc",
    data_config: DataConfigOpt = None,
    split: SplitOpt = "train",
    text_column: TextColumnOpt = "text",
    tokens: TokensOpt = 100_000,
    seq_len: SeqLenOpt = 512,
    batch_size: BatchOpt = 4,
    seed: SeedOpt = 0,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Artifact directory. Default: the registry, artifacts/<org>--<name>.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing artifact (only an artifact or an empty folder: other files are never replaced).")] = False,
    json_out: JsonOpt = None,
    device_map: DeviceMapOpt = None,
    push_to: Annotated[Optional[str], typer.Option("--push", help="Also publish the artifact to this Hub repo (org/repo) once saved.")] = None,
    data_part: Annotated[str, typer.Option("--data-part", help="Part of the text to calibrate on: calibration (the default; aqua eval scores the held-out evaluation part), evaluation, or all.")] = "calibration",
) -> None:
    """Calibrate AQUA projections: SVD of the model's post-RoPE queries and keys, per layer and KV group.

    Examples: `aqua calibrate` (SmolLM2 on the bundled text), `aqua calibrate meta-llama/Llama-3.1-8B --device cuda
    --dtype bfloat16 --tokens 1000000`, `aqua calibrate ./model.gguf --data notes.txt --out runs/notes`.
    Data-parallel on several GPUs: `torchrun --nproc_per_node 8 -m aqua_cli calibrate ...` (docs/distributed.md).
    """
    from ..artifact import check_output, registry_name
    from ..models import resolve_model
    from ..registry import registry_dir
    from ..calibration import CalibrationConfig
    from ..calibration import calibrate as run_calibration
    from ..data import DataSpec
    from ..distributed import agree, barrier, init_from_env, shutdown
    from ..spectrum import energy_summary

    check_positive(tokens=tokens, seq_len=seq_len, batch_size=batch_size)
    check_outputs(json_out)
    push_token = _push_target(push_to)
    source = resolve_model(model, revision)  # names the default --out; loads nothing
    target = out_dir or registry_dir() / registry_name(source.model_id)
    dist = init_from_env(device)
    try:
        main_rank = dist is None or dist.is_main

        def check_target() -> Path:  # every output check before the model loads, not after the long run
            return check_output(target, force) if main_rank else Path(target)

        target = agree(dist, check_target, "the output check")
        source, loaded, tokenizer = load(model, revision, str(dist.device()) if dist else device, dtype, device_map)
        config = CalibrationConfig(DataSpec(data, data_config, split, text_column, data_part), tokens, seq_len, batch_size, seed)
        world = dist.world_size if dist else 1
        started = time.perf_counter()
        with progress("calibrating", enabled=main_rank) as bar:
            task = bar.add_task("calibrating", total=None, rate="")

            def on_start(total: int) -> None:
                bar.update(task, total=total)

            def on_batch(n: int) -> None:  # rank 0 reports for all: shards are the same size within a window
                bar.advance(task, n * world)
                bar.update(task, rate=f"{bar.tasks[0].completed / max(time.perf_counter() - started, 1e-9):,.0f} tok/s")

            artifact = run_calibration(loaded, tokenizer, source, config, on_batch=on_batch, on_start=on_start, dist=dist)
        path = artifact.save(target, force=force) if main_rank else target
        barrier(dist)
    finally:
        shutdown(dist)
    if not main_rank:
        return
    extra = artifact.metadata["extra"]
    summary = {
        "artifact": str(path),
        "model": source.model_id,
        "data": artifact.metadata["data_id"],
        "tokens": artifact.metadata["tokens"],
        "seconds": extra["seconds"],
        "tokens_per_s": extra["tokens_per_s"],
        "world_size": extra.get("world_size", 1),
        "all_reduce_s": extra.get("all_reduce_s", 0.0),
        "energy": {f"{r:g}": v for r, v in energy_summary(artifact).items()},
    }
    table = Table(title="aqua calibrate", show_header=False)
    for key in ("artifact", "model", "data", "tokens", "seconds", "tokens_per_s"):
        table.add_row(key, str(summary[key]))
    for r, v in summary["energy"].items():
        table.add_row(f"energy kept at k={r}d", f"min {v['min']:.3f}  mean {v['mean']:.3f}")
    out.print(table)
    if push_to:
        from ..hub import push_saved

        summary["pushed"] = push_saved(path, push_to, push_token).commit_url
        out.print(summary["pushed"], highlight=False)
    write_json(json_out, summary)


def _push_target(repo_id: str | None) -> str | None:
    """Check ``--push`` (repo id, token) before calibrating, so a typo does not cost a calibration run."""
    from ..hub import check_push_target

    return check_push_target(repo_id) if repo_id else None
