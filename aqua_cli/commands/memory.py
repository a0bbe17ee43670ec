"""`aqua memory`: what the projected key cache and H2O eviction save in bytes, and cost in perplexity.

A sibling of `aqua eval` rather than options on it: eval measures attention *approximation* on one
forward per window with no cache, while these need a cache (bytes are the cache's tensors) and, for
H2O, token-by-token decoding (eviction happens between steps). docs/memory.md defines every number.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from ..cli import (
    ArtifactOpt,
    DataOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelArg,
    PlotOpt,
    RevisionOpt,
    SeedOpt,
    app,
    budget_list,
    check_outputs,
    err,
    k_list,
    kv_dims_list,
    load,
    out,
    preflight,
    status,
    write_json,
)


@app.command("memory")
def memory_command(
    model: ModelArg = None,
    artifact: ArtifactOpt = None,
    kv_dims: Annotated[str | None, typer.Option("--kv-dims", help="Comma list of kept key dims m per KV head for the projected key cache: ratios of head_dim (0.5) or counts (32).")] = "0.5,0.75,1.0",
    k: Annotated[str | None, typer.Option("--k", help="Comma list of AQUA k (dynamic) to run beside plain attention: with --kv-dims chosen within the m kept dims; with --h2o-budget, AQUA + H2O. Empty: none.")] = "0.75",
    h2o_budget: Annotated[str | None, typer.Option("--h2o-budget", help="Comma list of H2O token budgets: ratios of the prompt (0.5) or token counts (256). Empty: skip H2O.")] = None,
    prompt_len: Annotated[int, typer.Option("--prompt-len", help="H2O: tokens prefilled (and compressed to the budget) before the rest of each window is decoded token by token and scored.")] = 256,
    data: DataOpt = "pydoc",
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per window.")] = 512,
    tokens: Annotated[int, typer.Option("--tokens", help="Tokens of text (whole windows of --seq-len), the same windows for every point.")] = 1024,
    seed: SeedOpt = 0,
    revision: RevisionOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    json_out: JsonOpt = None,
    plot: PlotOpt = None,
) -> None:
    """KV-cache bytes (summed from the cache's tensors) and perplexity against a dense cache on the same
    windows: the projected key cache at each --kv-dims, and with --h2o-budget, H2O alone and AQUA + H2O.

    Examples: `aqua memory` (SmolLM2: m/d = 0.5, 0.75, 1.0; ~2 min on 2 CPU cores);
    `aqua memory --kv-dims 32 --k ""`; `aqua memory --kv-dims "" --h2o-budget 0.5,0.25 --k 0.75 --json -`.
    """
    from ..data import DataSpec
    from ..errors import ConfigError
    from ..evaluate import EvalConfig, prepare_windows
    from ..machine import machine_info
    from ..memory import h2o_rows, kv_rows

    check_outputs(json_out, plot)
    dims, budgets, ks = kv_dims_list(kv_dims), budget_list(h2o_budget), k_list(k)
    if not dims and not budgets:
        raise ConfigError("nothing to measure: give --kv-dims and/or --h2o-budget")
    if seq_len < 2 or tokens < seq_len:
        raise ConfigError(f"--tokens ({tokens}) must hold at least one window of --seq-len ({seq_len}, at least 2)")
    if budgets and not 1 <= prompt_len < seq_len:
        raise ConfigError(f"--prompt-len must be between 1 and --seq-len - 1 ({seq_len - 1}), got {prompt_len}")
    source, _, art = preflight(model, revision, artifact, ks=ks, kv_dims=dims, full_attention="aqua memory")
    source, loaded, tokenizer = load(model, revision, device, dtype)
    windows = prepare_windows(tokenizer, EvalConfig(data=DataSpec(data), tokens=tokens, seq_len=seq_len, seed=seed))

    rows: list[dict[str, Any]] = []

    def show(r: dict[str, Any]) -> None:
        err.print(f"  {r['method']:<13} k={r['k']} kv_dims={r['kv_dims']} budget={r['h2o_budget']}: ppl {r['ppl']:.3f}, {r['kv_bytes']:,} bytes")

    if dims:
        with status("projected key cache: perplexity per kept-dims point ..."):
            rows += kv_rows(loaded, tokenizer, art, windows, kv_dims=dims, ks=(None, *ks), on_row=show)
    if budgets:
        with status("H2O: prefill, then token-by-token decoding per window ..."):
            rows += h2o_rows(loaded, art, windows, prompt_len, budgets=tuple(budgets), ks=(None, *ks), on_row=show)
    for r in rows:
        r.update(model=source.model_id, data=DataSpec(data).describe())
    out.print(table(rows))
    write_json(json_out, {"rows": rows, "machine": machine_info(), "artifact": art.name, "windows": int(windows.shape[0]), "seq_len": seq_len})
    if plot is not None:
        err.print(f"wrote {plot_rows(rows, plot)}")


def table(rows: list[dict[str, Any]]) -> Table:
    from rich import box

    t = Table(title="aqua memory: KV-cache bytes held vs dense, and perplexity", box=box.SIMPLE_HEAD, pad_edge=False)
    for name in ("method", "k", "kv dims", "h2o budget", "KV bytes", "dense bytes", "ratio", "ppl", "Δ dense"):
        t.add_column(name, justify="left" if name == "method" else "right", no_wrap=True)
    for r in rows:
        t.add_row(r["method"], _g(r["k"]), _g(r["kv_dims"]), _g(r["h2o_budget"]), f"{r['kv_bytes']:,}", f"{r['dense_kv_bytes']:,}",
                  f"{r['kv_bytes'] / r['dense_kv_bytes']:.3f}", f"{r['ppl']:.3f}", f"{100 * r['ppl_rel_change']:+.2f}%")
    return t


def _g(value: Any) -> str:
    return "-" if value is None else format(value, "g")


def plot_rows(rows: list[dict[str, Any]], path: Any) -> Any:
    """Perplexity against the fraction of dense KV bytes held, one point per row."""
    from ..plotting import pyplot, save_figure

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for r in rows:
        name = " ".join(p for p in (r["method"], f"k={r['k']}" if r["k"] is not None else "", f"m={r['kv_dims']}" if r["kv_dims"] is not None else "",
                                    f"b={r['h2o_budget']}" if r["h2o_budget"] is not None else "") if p)
        ax.scatter(r["kv_bytes"] / r["dense_kv_bytes"], r["ppl"], s=18)
        ax.annotate(name, (r["kv_bytes"] / r["dense_kv_bytes"], r["ppl"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel="KV bytes held / dense", ylabel="perplexity", title="aqua memory")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)
