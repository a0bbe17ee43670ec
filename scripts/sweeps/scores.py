"""Page-scoring launch variants (programs per SM, stages, warps), then the whole 32-layer model at B1 x 64K / 128K under four scoring settings. Outputs: docs/results/sweeps/scores-h100.json, scores-e2e-h100.json

    PYTHONPATH=$PWD OUT=docs/results/sweeps python3 scripts/sweeps/scores.py   (GPU; writes its JSON to $OUT)

H100 sweep of session 4 (docs/bench.md, 'What was tried'); the file names in $OUT drop the -h100 suffix.
Ran at commit 1dd52c8 (before score_waves existed: the variants pass `waves`, which the scoring pass then used).
"""
# ruff: noqa: F821, F401, E731, E702  (a sweep as it ran: timed lambdas run before their inputs are deleted)
import json, os, sys, itertools
import torch, triton
from aqua_cli.kernels import decode as dk
from aqua_cli.kernels.reference import project_keys, dense_decode
from aqua_cli.bench import random_projection
dev = torch.device("cuda"); rows = []
proj = random_projection(8, 128, torch.Generator().manual_seed(0)).to(dev)
us = lambda f: triton.testing.do_bench_cudagraph(f, rep=80) * 1e3
VARS = [(4.0, 3, 4), (1.0, 3, 4), (2.0, 3, 4), (3.0, 3, 4), (2.0, 2, 4), (3.0, 2, 4), (6.0, 2, 4), (2.0, 4, 4), (2.0, 3, 8), (1.0, 4, 4)]
for B, L in [(1, 131073), (1, 65537), (1, 32769), (8, 32769)]:
    q = torch.randn(B, 32, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(B, 8, L, 128, device=dev, dtype=torch.bfloat16)
    cap = 64 * -(-L // 64)
    kdb = torch.zeros(B, 8, 128, cap, device=dev, dtype=torch.bfloat16); kdb[..., :L] = project_keys(k, proj).to(torch.bfloat16)
    del k
    kd = kdb[..., :L]
    for waves, stages, warps in VARS:
        t = us(lambda: dk.launch_page_scores(q, proj, kd, 64, 64, L, 256, warps, stages, waves))
        r = dict(batch=B, seq=L, waves=waves, stages=stages, warps=warps, us=t); rows.append(r); print(r, flush=True)
    del kdb, kd; torch.cuda.empty_cache()
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "scores.json"), "w"), indent=1)

# whole model at B1 x 128K (and 64K) under score-launch settings
from aqua_cli import e2e
from aqua_cli.methods import fused
orig = fused.launch_for
out = []
for waves, stages in [(None, None), (2.0, 3), (3.0, 2), (2.0, 2)]:
    def lf(dims, dim, ratio, tokens, _w=waves, _s=stages):
        base = orig(dims, dim, ratio, tokens)
        if ratio is not None and _w is not None:
            return {**base, "waves": _w, "score_stages": _s}
        return base
    fused.launch_for = lf
    got, _ = e2e.run_e2e(e2e.E2EConfig(seqs=[65536, 131072], batches=[1], model="llama-3.1-8b", steps=30))
    for r in got:
        r2 = {k: r[k] for k in ("batch", "seq", "impl", "tokens_per_s", "speedup_vs_dense")}
        r2.update(waves=waves, stages=stages); out.append(r2); print(r2, flush=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "scores-e2e.json"), "w"), indent=1)
