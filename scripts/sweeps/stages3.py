"""Page top-T with the page selection folded into the scoring pass and/or the combine folded into the exact pass (both measured slower; the fold_combine code was removed). Output: docs/results/sweeps/stages3-h100.json

    PYTHONPATH=$PWD OUT=docs/results/sweeps python3 scripts/sweeps/stages3.py   (GPU; writes its JSON to $OUT)

H100 sweep of session 4 (docs/bench.md, 'What was tried'); the file names in $OUT drop the -h100 suffix.
Ran on the working tree just before commit 1dd52c8 with a `fold_combine` option (the exact pass's last program per KV group combining the splits) that was measured slower and removed before the commit; with today's code DecodeConfig rejects fold_combine.
"""
# ruff: noqa: F821, F401, E731, E702  (a sweep as it ran: timed lambdas run before their inputs are deleted)
import json, os
import torch, triton
from aqua_cli.kernels import decode as dk
from aqua_cli.kernels.reference import project_keys, dense_decode
from aqua_cli.bench import random_projection
dev = torch.device("cuda"); rows = []
proj = random_projection(8, 128, torch.Generator().manual_seed(0)).to(dev)
us = lambda f: triton.testing.do_bench_cudagraph(f, rep=100) * 1e3
def row(**kw):
    rows.append(kw); print(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in kw.items()), flush=True)
for B, L in [(1, 131073), (8, 32769), (1, 32769), (1, 65537)]:
    q = torch.randn(B, 32, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(B, 8, L, 128, device=dev, dtype=torch.bfloat16); v = torch.randn_like(k)
    cap = 64 * -(-L // 64)
    kdb = torch.zeros(B, 8, 128, cap, device=dev, dtype=torch.bfloat16); kdb[..., :L] = project_keys(k, proj).to(torch.bfloat16)
    vb = torch.zeros(B, 8, cap, 128, device=dev, dtype=torch.bfloat16); vb[:, :, :L] = v
    kd, vv = kdb[..., :L], vb[:, :, :L]; sh = f"B{B}xL{L}"
    dense = us(lambda: dense_decode(q, k, v)); row(shape=sh, stage="dense", t=dense)
    del k, v
    for _ in range(2):
        for fs, fc in ((False, False), (True, False), (False, True), (True, True)):
            cfg = dk.DecodeConfig(64, token_ratio=1 / 16, granularity="pages", fold_select=fs, fold_combine=fc)
            t = us(lambda: dk.aqua_decode(q, None, vv, kd, proj, cfg, sink_pages=1, recent_pages=8))
            row(shape=sh, stage="pages", fold_select=fs, fold_combine=fc, t=t, x=dense / t)
    del q, kd, vv, kdb, vb; torch.cuda.empty_cache()
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "stages3.json"), "w"), indent=1)
