"""`aqua bench`: cost model and measured latency of dense vs AQUA attention, per sequence length."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from ..cli import JsonOpt, PlotOpt, app, check_outputs, err, out, ratio_list, write_json
from ..errors import AquaError, ConfigError


def _table(rows: list[dict], title: str) -> Table:
    table = Table(title=title)
    for col in ("seq", "impl", "k", "latency us", "x dense", "byte bound", "TB/s", "err vs ref"):
        table.add_column(col, justify="right" if col != "impl" else "left")
    for r in rows:
        err_ref = r.get("rel_err_vs_reference")
        table.add_row(
            str(r["seq"]), r["impl"], f"{r['k']:g}", f"{r['latency_us']:.1f}",
            f"{r['speedup_vs_dense']:.2f}" if r.get("speedup_vs_dense") else "",
            f"{r['byte_bound_speedup']:.2f}" if r.get("byte_bound_speedup") else "",
            f"{r['achieved_tb_s']:.2f}" if r.get("achieved_tb_s") else "",
            f"{err_ref:.1e}" if err_ref is not None else "",
        )
    return table


@app.command()
def bench(
    seq: Annotated[str, typer.Option("--seq", help="Sequence lengths: 64..4096 (doubling), 64..4096:x4, 1024,4096, ..131072, 32k.")] = "64..4096",
    batch: Annotated[str, typer.Option("--batch", help="Sequences per step (with --phase e2e a comma list, e.g. 1,8).")] = "1",
    k: Annotated[str, typer.Option("--k", help="Kept ratio(s) of head_dim, comma-separated, e.g. 0.5,0.75.")] = "0.5",
    phase: Annotated[str, typer.Option("--phase", help="decode (one query per sequence), prefill (causal, whole prompt) or e2e (whole-model decode tokens/s, random weights, CUDA-graph replays on cuda for dense and AQUA alike).")] = "decode",
    device: Annotated[str, typer.Option("--device", help="cpu or cuda (cuda runs the fused Triton kernels).")] = "cpu",
    model: Annotated[Optional[str], typer.Option("--model", help="Preset (llama-3.1-8b, qwen2.5-7b, smollm2-135m...), Hub id or local model: its attention shape.")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="auto (bfloat16 on cuda, float32 on cpu), bfloat16, float16, float32.")] = "auto",
    tokens: Annotated[Optional[str], typer.Option("--tokens", help="T/L ratios for dims + top-T token rows, e.g. 1/16,1/8 (default: none).")] = None,
    gqa: Annotated[str, typer.Option("--gqa", help="Dim selection under GQA: group (sum |q| over the group) or head (union of per-head dims).")] = "group",
    select_block: Annotated[int, typer.Option("--select-block", help="Tokens per top-T selection block (power of two).")] = 512,
    artifact: Annotated[Optional[str], typer.Option("--artifact", help="Use this artifact's layer-0 projection instead of a random orthogonal one.")] = None,
    repeats: Annotated[int, typer.Option("--repeats", help="Timed repeats (median reported).")] = 20,
    no_hybrid: Annotated[bool, typer.Option("--no-hybrid", help="Skip the hybrid (dense below break-even) rows; e2e: top-T at every length (no switch to exact attention below its break-even).")] = False,
    layers: Annotated[Optional[int], typer.Option("--layers", help="e2e: cut the model to this many layers (default: all).")] = None,
    kv_dims: Annotated[float, typer.Option("--kv-dims", help="e2e: projected key dims stored, a ratio of head_dim (1.0 = all).")] = 1.0,
    page_score: Annotated[str, typer.Option("--page-score", help="e2e: how top-T ranks pages, a comma list of max (their tokens' best score), bound (Quest's bound from per-page min/max: aqua-topt-bound rows) and planes (max on the high byte of float16 key planes: aqua-topt-planes rows).")] = "max",
    bound_page: Annotated[Optional[int], typer.Option("--bound-page", help="Tokens one page bound covers (a power of two dividing the page of 64; default 64): the aqua-bounds rows, and e2e with --page-score bound.")] = None,
    rerank: Annotated[int, typer.Option("--rerank", help="The aqua-rerank rows (decode) and e2e with --page-score bound: the RERANK x budget best pages by bound, ranked again by their tokens' max score (0: no re-rank).")] = 4,
    no_graphs: Annotated[bool, typer.Option("--no-graphs", help="e2e: time eager steps instead of CUDA-graph replays of one step (both paths alike).")] = False,
    json_out: JsonOpt = None,
    plot: PlotOpt = None,
) -> None:
    """Benchmark AQUA attention against dense SDPA: analytical FLOPs/bytes and measured latency per length.

    Examples: `aqua bench` (CPU, reference path), `aqua bench --device cuda --seq 1024..131072 --batch 8 --k 0.5,0.75
    --tokens 1/16 --json bench.json --plot bench.png`, `aqua bench --phase prefill --device cuda --seq 1k..32k`.
    """
    from ..bench import BenchConfig, device_name, parse_seq, run_bench, summary
    from ..cli import number_list
    from ..models import parse_device, resolve_shape

    check_outputs(json_out, plot)
    seqs = parse_seq(seq)
    batches = number_list(batch, int, "--batch")
    if not batches or min(batches) < 1:
        raise ConfigError(f"--batch must be at least 1, got '{batch}'")
    ks = ratio_list(k, "k")
    if not ks:
        raise ConfigError("--k needs at least one ratio, e.g. 0.5")
    dev = parse_device(device)
    if select_block < 16 or select_block & (select_block - 1):
        raise ConfigError(f"--select-block must be a power of two >= 16, got {select_block}")
    if dtype == "auto":
        dtype = "bfloat16" if dev.type == "cuda" else "float32"
    from ..e2e import check_e2e_page_score
    from ..kernels.paged import check_bound_page

    scores = [check_e2e_page_score(x.strip()) for x in page_score.split(",") if x.strip()]
    if bound_page is not None:
        check_bound_page(64, bound_page)
    if rerank < 0:
        raise ConfigError(f"--rerank must be 0 (off) or more, got {rerank}")
    if phase == "e2e":
        _e2e(seqs, list(batches), ks, ratio_list(tokens, "--tokens"), kv_dims, model, layers, str(dev), dtype, repeats,
             not no_hybrid, json_out, plot, graphs=not no_graphs, page_scores=scores or ["max"], bound_page=bound_page,
             rerank=rerank)
        return
    if len(batches) > 1:
        raise ConfigError("--batch takes one value for --phase decode and prefill (a list only with --phase e2e)")
    batch = batches[0]
    config = BenchConfig(seqs=seqs, batch=batch, ks=ks, phase=phase, device=str(dev), dtype=dtype,
                         token_ratios=ratio_list(tokens, "--tokens"), gqa=gqa, select_block=select_block,
                         hybrid=not no_hybrid, repeats=repeats, bound_page=bound_page, rerank=rerank)
    if gqa not in ("group", "head"):
        raise ConfigError(f"unknown --gqa '{gqa}': use group or head")
    shape = resolve_shape(model)
    projection = _artifact_projection(artifact, shape) if artifact else None
    name = device_name(str(dev))
    err.print(f"bench {shape.name} ({shape.num_heads} q / {shape.num_kv_heads} kv heads, d={shape.head_dim}) on {name}, "
              f"batch {batch}, {phase}, k={k}, seq {seqs[0]}..{seqs[-1]}")
    from rich.progress import Progress

    with Progress(console=err, transient=True) as bar:
        task = bar.add_task("bench", total=len(seqs))
        rows = run_bench(config, shape, projection, on_seq=lambda s, _r: bar.update(task, advance=1, description=f"seq {s}"))
    info = summary(config, shape, rows, name)
    out.print(_table(rows, f"{shape.name} {phase} B{batch} on {name}"))
    out.print(f"paper break-even (FLOPs): {info['paper_break_even']}")
    out.print(f"measured break-even: {info['measured_break_even']}")
    write_json(json_out, {**info, "rows": rows})
    if plot is not None:
        from ..bench import plot_rows

        err.print(f"wrote {plot_rows(rows, plot, f'{shape.name} {phase} B{batch} on {name}')}")


def _e2e(seqs, batches, ks, ratios, kv_dims, model, layers, device, dtype, steps, hybrid, json_out, plot, graphs=True,
         page_scores=("max",), bound_page=None, rerank=0) -> None:
    from ..e2e import E2EConfig, plot_rows, run_e2e
    from ..machine import machine_info

    config = E2EConfig(seqs=seqs, batches=batches, ks=ks, token_ratios=ratios, kv_dims=kv_dims, model=model, layers=layers,
                       device=device, dtype=dtype, steps=steps, hybrid=hybrid, graphs=graphs, page_scores=list(page_scores),
                       bound_page=bound_page, rerank=rerank)
    err.print(f"e2e decode: {model or 'llama-3.1-8b'}{f' cut to {layers} layers' if layers else ''}, random weights, "
              f"batch {','.join(map(str, batches))}, seq {seqs[0]}..{seqs[-1]}, {steps} timed steps"
              f"{', CUDA graphs' if graphs and device.startswith('cuda') else ', eager'}")

    def show(r: dict) -> None:
        err.print(f"  B{r['batch']} x {r['seq']:>6} {r['impl']:<9} {r['tokens_per_s']:9.1f} tok/s  x{r['speedup_vs_dense']:.2f}  "
                  f"KV {r['kv_cache_bytes'] / 2**30:.2f} GiB", highlight=False)

    rows, info = run_e2e(config, on_row=show)
    table = Table(title=f"aqua bench e2e: {info['model']} on {info['device']}")
    for col in ("batch", "seq", "impl", "k", "T", "tokens/s", "x dense", "KV GiB", "peak GiB"):
        table.add_column(col, justify="left" if col == "impl" else "right")
    for r in rows:
        if r.get("error"):
            table.add_row(str(r["batch"]), str(r["seq"]), r["impl"], "-", "-", r["error"], "", "", "")
            continue
        table.add_row(str(r["batch"]), str(r["seq"]), r["impl"], "-" if r["k"] is None else f"{r['k']:g}",
                      "-" if r["tokens"] is None else str(r["tokens"]), f"{r['tokens_per_s']:.1f}", f"{r['speedup_vs_dense']:.2f}",
                      f"{r['kv_cache_bytes'] / 2**30:.2f}", "-" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**30:.2f}")
    out.print(table)
    write_json(json_out, {**info, "machine": machine_info(), "rows": rows})
    if plot is not None:
        title = f"whole-model decode, {info['model']} on {info['device']}"
        err.print(f"wrote {plot_rows(rows, plot, title)}")


def _artifact_projection(name: str, shape):
    from ..registry import load_artifact

    art = load_artifact(name)
    proj = art.projections[0]
    if tuple(proj.shape) != (shape.num_kv_heads, shape.head_dim, shape.head_dim):
        raise AquaError(f"artifact {art.name} has projections {tuple(proj.shape)}, not the shape of {shape.name}")
    return proj
