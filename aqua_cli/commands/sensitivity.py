"""`aqua sensitivity`: measure what each layer's AQUA budget costs the loss, store it in the artifact."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from ..cli import (
    ArtifactOpt,
    DataOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelArg,
    RevisionOpt,
    SeedOpt,
    SeqLenOpt,
    app,
    check_positive,
    err,
    load,
    out,
    ratio_list,
    write_json,
)


@app.command()
def sensitivity(
    model: ModelArg = None,
    artifact: ArtifactOpt = None,
    data: DataOpt = "pydoc",
    tokens: Annotated[int, typer.Option("--tokens", help="Tokens of calibration text to measure on (whole windows of --seq-len).")] = 1024,
    seq_len: SeqLenOpt = 512,
    seed: SeedOpt = 0,
    mode: Annotated[str, typer.Option("--mode", help="AQUA mode the curves are measured for: dynamic or static.")] = "dynamic",
    ratios: Annotated[str, typer.Option("--ratios", help="Comma list of k/head_dim at which each layer is measured.")] = "0.25,0.375,0.5,0.625,0.75,0.875",
    stride: Annotated[int, typer.Option("--stride", help="Measure the KL at every N-th position (the LM head runs only there).")] = 1,
    groups: Annotated[bool, typer.Option("--groups", help="Also measure each KV group of each layer alone (groups x more passes), for --k-policy sensitivity-group / sensitivity-joint.")] = False,
    revision: RevisionOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    default_policy: Annotated[Optional[str], typer.Option("--set-default-policy", help="Also record this k-policy as the artifact's default (`--k-policy auto`); do it only with held-out evidence that it wins.")] = None,
    evidence: Annotated[Optional[str], typer.Option("--evidence", help="Where the held-out evidence for --set-default-policy is (a results file), recorded beside it.")] = None,
    reuse: Annotated[bool, typer.Option("--reuse", help="Keep the curves the artifact already holds (with --set-default-policy: only record the default).")] = False,
    json_out: JsonOpt = None,
) -> None:
    """Per-layer loss sensitivity: KL of the model's next-token distribution with AQUA at one layer at a
    time, for each k of a grid, on the calibration part of the text; stored in the artifact for
    `--k-policy sensitivity` (docs/eval.md); with `--groups`, per KV group too (`--k-policy sensitivity-group`).

    Example: `aqua sensitivity --tokens 1024` (SmolLM2, shipped artifact).
    """
    from ..registry import artifact_for_model
    from ..data import DataSpec, load_window_set
    from ..errors import ConfigError
    from ..policy import parse_policy
    from ..sensitivity import measure

    check_positive(tokens=tokens, seq_len=seq_len)
    grid = tuple(ratio_list(ratios, "--ratios"))
    if default_policy is not None:
        parse_policy(default_policy)
    if reuse and groups:
        raise ConfigError("--groups measures new curves and --reuse keeps the stored ones: give one of them")
    if reuse:
        from ..models import resolve_model
        from ..policy import sensitivity_record

        source = resolve_model(model, revision)
        art = artifact_for_model(artifact, source.model_id)
        result = sensitivity_record(art)
        if result is None:
            raise ConfigError(f"--reuse: artifact '{art.name}' holds no sensitivity curves to keep")
        extra = dict(art.metadata.get("extra") or {})
    else:
        source, loaded, tokenizer = load(model, revision, device, dtype)
        art = artifact_for_model(artifact, source.model_id)
        art.check_model(loaded.config)
        windows = load_window_set(DataSpec(data, part="calibration"), tokenizer, seq_len, tokens, seed)

        with err.status(f"measuring {art.num_layers} layers x {len(grid)} budgets on {windows.windows.shape[0]} windows ...") as status:
            def on_step(done: int, total: int) -> None:
                status.update(f"measuring: {done}/{total} forward passes")

            result = measure(loaded, art, windows.windows, grid, mode, on_step, stride, groups=groups)
        result["windows_record"] = windows.record()
        extra = dict(art.metadata.get("extra") or {})
        extra["sensitivity"] = result
    if default_policy is not None:
        extra["default_policy"] = default_policy
        extra["default_policy_evidence"] = evidence or ""
    art.metadata["extra"] = extra
    path = art.save(art.path, force=True)
    table = Table(title=f"aqua sensitivity: {source.model_id}, mean KL per token (nats), AQUA {mode} at one layer")
    table.add_column("layer", justify="right")
    for k in result["dims"]:
        table.add_column(f"k={k}", justify="right")
    for layer, row in enumerate(result["kl"]):
        table.add_row(str(layer), *(f"{v:.2e}" for v in row))
    out.print(table)
    if groups:
        table = Table(title=f"per KV group: mean KL per token (nats), AQUA {mode} at one group of one layer")
        table.add_column("layer", justify="right")
        table.add_column("group", justify="right")
        for k in result["dims"]:
            table.add_column(f"k={k}", justify="right")
        for layer, rows in enumerate(result["kl_groups"]):
            for group, row in enumerate(rows):
                table.add_row(str(layer), str(group), *(f"{v:.2e}" for v in row))
        out.print(table)
    out.print(f"stored in {path} ({result['seconds']} s)", highlight=False)
    if not reuse:
        write_json(json_out, {"artifact": str(path), "model": source.model_id, **{k: v for k, v in result.items() if k != "windows_record"},
                              "data": windows.data_id, "data_part": windows.part})
