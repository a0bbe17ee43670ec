"""Reproduce docs/results/memory-* and needle-* (SmolLM2-135M-Instruct, shipped artifact, CPU float32).

    python scripts/memory_results.py --part kv      # cache bytes and ppl vs kept key dims
    python scripts/memory_results.py --part h2o     # H2O alone vs AQUA + H2O, token-by-token ppl
    python scripts/memory_results.py --part needle  # needle grid, heat map
    python scripts/memory_results.py --part report  # markdown tables from the JSON

One torch thread by default: on the shared 2-core machine, 2 threads under contention ran 4x slower
than 1 (measured 18 s vs 4 s for a 512-token forward). Every number comes from the API, no formula.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load():
    from aqua_cli.registry import load_artifact
    from aqua_cli.models import load_model, resolve_model

    source = resolve_model(None)
    model, tokenizer = load_model(source, "cpu", "float32")
    return source, model, tokenizer, load_artifact(None)


def write(name: str, payload: dict) -> Path:
    path = RESULTS / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    log(f"wrote {path}")
    return path


def part_kv(args, source, model, tokenizer, art) -> None:
    from aqua_cli.memory import kv_rows
    from aqua_cli.data import DataSpec
    from aqua_cli.evaluate import EvalConfig, prepare_windows
    from aqua_cli.machine import machine_info

    config = EvalConfig(data=DataSpec("pydoc"), tokens=args.kv_tokens, seq_len=args.kv_seq_len, seed=0)
    windows = prepare_windows(tokenizer, config)
    started = time.perf_counter()
    rows = kv_rows(model, tokenizer, art, windows, kv_dims=(0.5, 0.75, 1.0), ks=(None, 0.5),
                   on_row=lambda r: log(f"kv {r['method']} k={r['k']} m={r['kv_dims']}: ppl {r['ppl']:.3f} bytes {r['kv_bytes']}"))
    write("memory-kv-smollm2-cpu.json", {
        "rows": rows, "model": source.model_id, "artifact": art.name, "data": "pydoc", "windows": int(windows.shape[0]),
        "seq_len": args.kv_seq_len, "machine": machine_info(), "seconds": round(time.perf_counter() - started, 1),
        "command": "python scripts/memory_results.py --part kv",
    })
    plot_kv(rows, RESULTS / "memory-kv-smollm2-cpu.png")


def plot_kv(rows, path) -> None:
    from aqua_cli.plotting import pyplot, save_figure

    plt = pyplot()

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    dense = rows[0]
    for method in ("kv-proj", "kv-proj+aqua"):
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        label = "dense attention on kept dims" if method == "kv-proj" else f"dynamic AQUA k={mine[0]['k']} within kept dims"
        a.plot([r["kv_dims"] for r in mine], [r["ppl"] for r in mine], marker="o", label=label)
        b.plot([r["kv_dims"] for r in mine], [r["kv_bytes"] / 2**20 for r in mine], marker="o", label=label)
    a.axhline(dense["ppl"], color="k", ls="--", lw=1, label=f"dense cache ({dense['ppl']:.2f})")
    b.axhline(dense["kv_bytes"] / 2**20, color="k", ls="--", lw=1, label="dense cache")
    b.set_ylim(bottom=0)
    a.set(xlabel="kept key dims m / head_dim", ylabel="perplexity", title="quality")
    b.set(xlabel="kept key dims m / head_dim", ylabel="KV cache MiB (one window)", title="bytes held (measured)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)
    log(f"wrote {path}")


def part_h2o(args, source, model, tokenizer, art) -> None:
    from aqua_cli.data import DataSpec
    from aqua_cli.evaluate import EvalConfig, prepare_windows
    from aqua_cli.machine import machine_info
    from aqua_cli.memory import h2o_rows

    config = EvalConfig(data=DataSpec("pydoc"), tokens=args.h2o_windows * args.h2o_seq_len, seq_len=args.h2o_seq_len, seed=1)
    windows = prepare_windows(tokenizer, config)
    started = time.perf_counter()
    rows = h2o_rows(model, art, windows, args.h2o_prompt, budgets=(0.5, 0.25), ks=(None, 0.75),
                    on_row=lambda r: log(f"h2o {r['method']} k={r['k']} budget={r['h2o_budget']}: ppl {r['ppl']:.3f} bytes {r['kv_bytes']}"))
    write("memory-h2o-smollm2-cpu.json", {
        "rows": rows, "model": source.model_id, "artifact": art.name, "data": "pydoc", "windows": int(windows.shape[0]),
        "seq_len": args.h2o_seq_len, "prompt_len": args.h2o_prompt, "recent_ratio": 0.5, "machine": machine_info(),
        "seconds": round(time.perf_counter() - started, 1), "command": "python scripts/memory_results.py --part h2o",
    })


def part_needle(args, source, model, tokenizer, art) -> None:
    from aqua_cli.machine import machine_info
    from aqua_cli.needle import (
        NeedleConfig,
        accuracy_table,
        plot_grid,
        run_grid,
        standard_methods,
    )

    config = NeedleConfig(lengths=tuple(args.lengths), depths=tuple(args.depths))
    methods = standard_methods(art, ks=(0.5, 0.75), budgets=(0.5, 0.25), combined_k=0.75)
    started = time.perf_counter()
    rows = [r.as_dict() for r in run_grid(model, tokenizer, methods, config, on_cell=lambda r: log(
        f"needle {r.method} k={r.k} b={r.h2o_budget} len={r.length} depth={r.depth}: {r.correct} '{r.answer}' ({r.seconds}s)"))]
    write("needle-smollm2-cpu.json", {
        "rows": rows, "summary": accuracy_table(rows), "model": source.model_id, "artifact": art.name,
        "config": {"lengths": config.lengths, "depths": config.depths, "data": config.data.describe(),
                   "max_new_tokens": config.max_new_tokens, "seed": config.seed},
        "machine": machine_info(), "seconds": round(time.perf_counter() - started, 1),
        "command": "python scripts/memory_results.py --part needle",
    })
    plot_grid(rows, RESULTS / "needle-smollm2-cpu.png", title=f"needle in a haystack: {source.model_id.split('/')[-1]} (CPU, greedy)")
    log(f"wrote {RESULTS / 'needle-smollm2-cpu.png'}")


def _g(value) -> str:
    return "-" if value is None else format(value, "g")


def part_report(args, *_unused) -> None:
    """Markdown tables from the JSON files (no model run)."""
    lines = ["# Memory results: SmolLM2-135M-Instruct, CPU float32", "",
             ("Written by `python scripts/memory_results.py --part report` from the JSON files beside it; "
             "docs/memory.md explains the method."), ""]
    kv = RESULTS / "memory-kv-smollm2-cpu.json"
    if kv.exists():
        d = json.loads(kv.read_text())
        plot_kv(d["rows"], RESULTS / "memory-kv-smollm2-cpu.png")
        lines += [f"## Projected key cache ({d['windows']} windows x {d['seq_len']} tokens of {d['data']}, {d['machine']['cpu']} {d['machine']['cores']} cores)", "",
                  "| method | k | kv_dims (m) | key bytes | KV bytes | dense KV bytes | KV / dense | ppl | vs dense |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in d["rows"]:
            lines.append(f"| {r['method']} | {_g(r['k'])} | {_g(r['kv_dims'])} ({r['kv_dims_count']}) | {r.get('key_bytes', r['kv_bytes'] // 2):,} | "
                         f"{r['kv_bytes']:,} | {r['dense_kv_bytes']:,} | {r['kv_bytes'] / r['dense_kv_bytes']:.3f} | {r['ppl']:.3f} | {100 * r['ppl_rel_change']:+.2f}% |")
        lines.append("")
    h2o = RESULTS / "memory-h2o-smollm2-cpu.json"
    if h2o.exists():
        d = json.loads(h2o.read_text())
        lines += [(f"## H2O alone vs AQUA + H2O ({d['windows']} windows x {d['seq_len']} tokens; prompt {d['prompt_len']} prefilled, "
                  f"the rest decoded token by token and scored)"), "",
                  "| method | k | h2o_budget | KV bytes at end | dense KV bytes | KV / dense | ppl | vs dense |",
                  "|---|---|---|---:|---:|---:|---:|---:|"]
        for r in d["rows"]:
            lines.append(f"| {r['method']} | {_g(r['k'])} | {_g(r['h2o_budget'])} | {r['kv_bytes']:,} | {r['dense_kv_bytes']:,} | "
                         f"{r['kv_bytes'] / r['dense_kv_bytes']:.3f} | {r['ppl']:.3f} | {100 * r['ppl_rel_change']:+.2f}% |")
        lines.append("")
    (RESULTS / "memory-smollm2-cpu.md").write_text("\n".join(lines))
    log(f"wrote {RESULTS / 'memory-smollm2-cpu.md'}")
    needle = RESULTS / "needle-smollm2-cpu.json"
    if needle.exists():
        from aqua_cli.needle import label

        d = json.loads(needle.read_text())
        rows, lengths = d["rows"], sorted({r["length"] for r in d["rows"]})
        depths = sorted({r["depth"] for r in rows})
        out = ["# Needle in a haystack: SmolLM2-135M-Instruct, CPU float32, greedy", "",
               (f"Filler {d['config']['data']}, depths {depths}, {d['config']['max_new_tokens']} new tokens; exact retrieval "
               "of the 4-digit passcode. Cell = fraction of depths retrieved. Heat map: needle-smollm2-cpu.png."), "",
               "| method | " + " | ".join(str(n) for n in lengths) + " | all | KV bytes / dense |",
               "|---|" + "---:|" * (len(lengths) + 2)]
        for name in dict.fromkeys(label(r) for r in rows):
            mine = [r for r in rows if label(r) == name]
            cells = []
            for n in lengths:
                at = [r["accuracy"] for r in mine if r["length"] == n]
                cells.append(f"{sum(at) / len(at):.2f}")
            ratio = sum(r["kv_bytes"] for r in mine) / sum(r["dense_kv_bytes"] for r in mine)
            out.append(f"| {name} | " + " | ".join(cells) + f" | {sum(r['accuracy'] for r in mine) / len(mine):.2f} | {ratio:.3f} |")
        out += ["", "Answers per cell (first line of the greedy answer):", "", "| method | length | depth | code | answer | ok |", "|---|---:|---:|---|---|---|"]
        for r in rows:
            out.append(f"| {label(r)} | {r['length']} | {r['depth']:g} | {r['code']} | `{r['answer'].replace('|', '/')}` | {'yes' if r['correct'] else 'no'} |")
        (RESULTS / "needle-smollm2-cpu.md").write_text("\n".join(out) + "\n")
        log(f"wrote {RESULTS / 'needle-smollm2-cpu.md'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("kv", "h2o", "needle", "report", "all"), default="all")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kv-seq-len", type=int, default=512)
    parser.add_argument("--kv-tokens", type=int, default=2048)
    parser.add_argument("--h2o-seq-len", type=int, default=512)
    parser.add_argument("--h2o-prompt", type=int, default=256)
    parser.add_argument("--h2o-windows", type=int, default=3)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    parts = ("kv", "h2o", "needle", "report") if args.part == "all" else (args.part,)
    loaded = load() if set(parts) - {"report"} else ()
    for part in parts:
        log(f"part {part}")
        {"kv": part_kv, "h2o": part_h2o, "needle": part_needle, "report": part_report}[part](args, *loaded)


if __name__ == "__main__":
    main()
