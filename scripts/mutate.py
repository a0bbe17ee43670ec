"""Mutation testing of AQUA's core math: does the fast suite notice a deliberate bug?

Each mutant is one text replacement in one file of ``aqua_cli`` (the old text must occur exactly once).
For each, the package and the tests are copied to a scratch directory, the replacement is applied
there (the working tree is never touched), and ``pytest -x -q -m "not slow"`` runs the test files that
guard that file. A failing run *kills* the mutant; a passing run means it *survived*: either a test is
missing or the mutant is equivalent (docs/testing.md says which, for each survivor).

    python scripts/mutate.py               # every mutant (a few minutes on 2 cores)
    python scripts/mutate.py R1 C1         # some of them
    python scripts/mutate.py --list

Not run in CI (it is a check on the tests, not on the code). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# the brute-force tests first (fast, and most mutants die there), then the slower model-level files
SELECTION = ["tests/test_bruteforce.py", "tests/test_kv.py", "tests/test_attention.py"]
REFERENCE = ["tests/test_bruteforce.py", "tests/test_kernels.py", "tests/test_kernel_glue.py"]
CALIBRATION = ["tests/test_bruteforce.py", "tests/test_calibration.py"]
CACHE = ["tests/test_bruteforce.py", "tests/test_kv.py", "tests/test_padded.py"]
TOPT = ["tests/test_bruteforce.py", "tests/test_padded.py", "tests/test_kernels.py"]


@dataclass
class Mutant:
    id: str
    file: str
    old: str
    new: str
    what: str
    tests: list[str]


MUTANTS = [
    # -- methods/aqua.py: the selection and the projection hook -----------------------------------------
    Mutant("A1", "aqua_cli/methods/aqua.py", "top = q.abs().topk(k, dim=-1).indices\n    return",
           "top = q.abs().topk(k, dim=-1, largest=False).indices\n    return", "dynamic keeps the smallest |qP|", SELECTION),
    Mutant("A2", "aqua_cli/methods/aqua.py", "top = q.abs().topk(k, dim=-1).indices\n    return",
           "top = q.topk(k, dim=-1).indices\n    return", "dynamic ranks qP, not |qP|", SELECTION),
    Mutant("A3", "aqua_cli/methods/aqua.py", "keep[:k] = 1", "keep[-k:] = 1", "static keeps the last k dims", SELECTION),
    Mutant("A4", "aqua_cli/methods/aqua.py", "q = select_dims(q, budget, self.mode)",
           'q = select_dims(q, budget, "static" if self.mode == "dynamic" else self.mode)',
           "ProjectionHook runs static when asked for dynamic", SELECTION),
    Mutant("A5", "aqua_cli/methods/aqua.py", "k = key.float() @ proj\n", "k = key.float() @ proj.transpose(-1, -2)\n",
           "keys projected with P^T", SELECTION),
    Mutant("A6", "aqua_cli/methods/aqua.py", "m = min(self.kv_dims or head_dim, head_dim)", "m = head_dim",
           "the hook ignores kv_dims", SELECTION),
    Mutant("A7", "aqua_cli/methods/aqua.py",
           "budget = budget.clamp(max=m) if isinstance(budget, torch.Tensor) else min(budget, m)", "pass",
           "k not clamped to kv_dims", SELECTION),
    Mutant("A8", "aqua_cli/methods/aqua.py", "kept = q.gather(-1, top) * (rank[:kmax] < k.unsqueeze(-1))",
           "kept = q.gather(-1, top)", "per-group budgets keep kmax dims everywhere", SELECTION),
    Mutant("A9", "aqua_cli/methods/aqua.py", "    if k >= head_dim:\n        return q\n    if mode",
           "    if k > head_dim:\n        return q\n    if mode", "early return only above head_dim", SELECTION),
    # -- kernels/reference.py: what the fused kernels must match ----------------------------------------
    Mutant("R1", "aqua_cli/kernels/reference.py", "qp.float().abs().sum(2)", "qp.float().abs().amax(2)",
           "group selection by the max over heads, not the sum", REFERENCE),
    Mutant("R2", "aqua_cli/kernels/reference.py", "qp.float().abs().sum(2)", "qp.float().abs().mean(2)",
           "group selection by the mean over heads", REFERENCE),
    Mutant("R3", "aqua_cli/kernels/reference.py", ".topk(k, dim=-1).indices.sort(-1).values", ".topk(k, dim=-1).indices",
           "group dims not sorted ascending", REFERENCE),
    Mutant("R4", "aqua_cli/kernels/reference.py", "qsel = (qp * mask).gather(", "qsel = qp.gather(",
           "head mode: a head keeps the whole union", REFERENCE),
    Mutant("R5", "aqua_cli/kernels/reference.py",
           "return (qsel.float() * valid[:, :, None]) @ (rows * valid[..., None])", "return qsel.float() @ rows.float()",
           "approx_logits reads slots past count", REFERENCE),
    Mutant("R6", "aqua_cli/kernels/reference.py", "keep = rank < tokens_in_block(n, keep_full, block)[..., None]",
           "keep = rank <= tokens_in_block(n, keep_full, block)[..., None]", "one token too many per block", REFERENCE),
    Mutant("R7", "aqua_cli/kernels/reference.py",
           "if isinstance(n, torch.Tensor):\n        return (n * block_keep + block - 1) // block",
           "if isinstance(n, torch.Tensor):\n        return (n * block_keep) // block", "tokens per block floored", REFERENCE),
    Mutant("R8", "aqua_cli/kernels/reference.py", "keep = select_tokens(logits.amax(2), kd.shape[-1]",
           "keep = select_tokens(logits.sum(2), kd.shape[-1]", "token score: sum over heads, not max", REFERENCE),
    Mutant("R9", "aqua_cli/kernels/reference.py", "    scale = dim ** -0.5\n    qp = project_queries",
           "    scale = 1.0\n    qp = project_queries", "decode reference unscaled", REFERENCE),
    # -- calibration.py: the basis ---------------------------------------------------------------------
    Mutant("C1", "aqua_cli/calibration.py", "values, vectors = values.flip(-1), vectors.flip(-1)",
           "values, vectors = values, vectors", "eigenvectors left in ascending order", CALIBRATION),
    Mutant("C2", "aqua_cli/calibration.py", "vectors = vectors * signs", "vectors = vectors", "signs not fixed", CALIBRATION),
    Mutant("C3", "aqua_cli/calibration.py", "values.clamp_min(0).sqrt()", "values.clamp_min(0)",
           "eigenvalues stored as singular values", CALIBRATION),
    Mutant("C4", "aqua_cli/calibration.py", "q = query.reshape(batch, groups, q_heads // groups, seq, d)",
           "q = query.reshape(batch, q_heads // groups, groups, seq, d)", "query heads grouped by stride", CALIBRATION),
    Mutant("C5", "aqua_cli/calibration.py", "x = torch.cat([q, k], dim=1).to(torch.float64)", "x = q.to(torch.float64)",
           "keys left out of the Gram", CALIBRATION),
    Mutant("C6", "aqua_cli/calibration.py", "x = torch.cat([q, k], dim=1).to(torch.float64)",
           "x = torch.cat([q, k], dim=1).to(torch.float32)", "Gram products in float32", CALIBRATION),
    Mutant("C7", "aqua_cli/calibration.py", "self.vectors[layer] += x.shape[1]", "self.vectors[layer] += x.shape[0]",
           "vectors miscounted", CALIBRATION),
    # -- methods/kv.py: the projected key cache -------------------------------------------------------------
    Mutant("K1", "aqua_cli/methods/kv.py", "self.projection[:, :, : self.kv_dims]", "self.projection[:, :, -self.kv_dims :]",
           "cache keeps the lowest-energy dims", CACHE),
    Mutant("K2", "aqua_cli/methods/kv.py", "self.keys = torch.cat([self.keys, new], dim=-2)",
           "self.keys = torch.cat([new, self.keys], dim=-2)", "new keys prepended", CACHE),
    Mutant("K3", "aqua_cli/methods/kv.py", "return ProjectionHook(projection, self.dims, self.mode, kv_dims=self.m)",
           "return ProjectionHook(projection, self.dims, self.mode)", "AquaKV selects among all D dims", CACHE),
    Mutant("K4", "aqua_cli/methods/kv.py", "new = (key_states.float() @ self._basis).to(key_states.dtype)",
           "new = (key_states.float() @ self._basis).to(torch.bfloat16)", "keys stored in bf16", CACHE),
    # -- methods/topt.py: dims + top-T ------------------------------------------------------------------
    Mutant("T1", "aqua_cli/methods/topt.py", "probs = approx.softmax(-1).nan_to_num(0.0)", "probs = approx.softmax(-1)",
           "dims-only softmax of a fully masked row gives NaN", TOPT),
    Mutant("T2", "aqua_cli/methods/topt.py", ".softmax(-1).nan_to_num(0.0)\n        out", ".softmax(-1)\n        out",
           "top-T softmax of a fully masked row gives NaN", TOPT),
    Mutant("T3", "aqua_cli/methods/topt.py", "    if mask is None:\n        offset", "    if True:\n        offset",
           "TopTokensHook ignores the attention mask", TOPT),
    Mutant("T4", "aqua_cli/methods/topt.py", "keep = _keep_causal(approx.amax(2)", "keep = _keep_causal(approx.mean(2)",
           "token score: mean over the group's heads, not max", TOPT),
]


def copy_tree(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("aqua_cli", "tests"):
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    for name in ("pyproject.toml",):
        shutil.copy2(ROOT / name, dest / name)


def run_tests(where: Path, tests: list[str], timeout: int) -> tuple[int, float, str]:
    env = {**os.environ, "PYTHONPATH": str(where), "PYTHONDONTWRITEBYTECODE": "1"}
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-m", "not slow", "-p", "no:cacheprovider",
           "-W", "ignore::FutureWarning", *[t for t in tests if (where / t).exists()]]
    try:
        proc = subprocess.run(cmd, cwd=where, env=env, capture_output=True, text=True, timeout=timeout)  # kills it on timeout
    except subprocess.TimeoutExpired:
        return -1, time.perf_counter() - started, "timeout"
    lines = [l for l in proc.stdout.splitlines() if l.startswith("FAILED") or l.startswith("ERROR")]
    return proc.returncode, time.perf_counter() - started, (lines[0] if lines else proc.stdout.strip().splitlines()[-1:][0] if proc.stdout.strip() else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ids", nargs="*", help="mutant ids (default: all)")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--timeout", type=int, default=600)
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up the scratch copy and the running pytest
    chosen = [m for m in MUTANTS if not args.ids or m.id in args.ids]
    if args.list:
        for m in chosen:
            print(f"{m.id}  {m.file}: {m.what}")
        return 0
    with tempfile.TemporaryDirectory(prefix="aqua-mutants-") as tmp:
        where = Path(tmp)
        copy_tree(where)
        for m in chosen:  # every mutant must apply to the current code
            count = (where / m.file).read_text().count(m.old)
            if count != 1:
                print(f"{m.id}: the old text occurs {count} times in {m.file}; update the mutant", file=sys.stderr)
                return 2
        if not args.no_baseline:
            files = sorted({t for m in chosen for t in m.tests})
            code, seconds, last = run_tests(where, files, args.timeout)
            print(f"baseline (no mutant): exit {code} in {seconds:.0f} s: {last}", file=sys.stderr)
            if code != 0:
                print("the unmutated suite fails: fix that first", file=sys.stderr)
                return 2
        print("| id | file | mutant | result | seconds | first failure |")
        print("|---|---|---|---|---|---|")
        survived = 0
        for m in chosen:
            path = where / m.file
            original = path.read_text()
            path.write_text(original.replace(m.old, m.new))
            try:
                code, seconds, last = run_tests(where, m.tests, args.timeout)
            finally:
                path.write_text(original)
            result = "survived" if code == 0 else "killed" if code in (1, 2) else f"timeout/exit {code}"
            survived += code == 0
            short = last.replace("|", "/")[:110] if code != 0 else ""
            print(f"| {m.id} | {m.file.removeprefix('aqua_cli/')} | {m.what.replace('|', '&#124;')} | {result} | {seconds:.0f} | {short} |", flush=True)
        print(f"\n{len(chosen) - survived} killed, {survived} survived of {len(chosen)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
