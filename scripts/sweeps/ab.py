"""A/B of the exact pass with 2 vs 3 pipeline stages, with and without sink/recent pages, four interleaved repeats. Output: docs/results/sweeps/ab-h100.json

    PYTHONPATH=$PWD OUT=docs/results/sweeps python3 scripts/sweeps/ab.py   (GPU; writes its JSON to $OUT)

H100 sweep of session 4 (docs/bench.md, 'What was tried'); the file names in $OUT drop the -h100 suffix.
Ran at commit 1dd52c8.
"""
# ruff: noqa: F821, F401, E731, E702  (a sweep as it ran: timed lambdas run before their inputs are deleted)
import json, os, statistics
import torch, triton
from aqua_cli.kernels import decode as dk
from aqua_cli.kernels.reference import project_keys, dense_decode
from aqua_cli.bench import random_projection
dev = torch.device("cuda"); rows = []
proj = random_projection(8, 128, torch.Generator().manual_seed(0)).to(dev)
us = lambda f: triton.testing.do_bench_cudagraph(f, rep=80) * 1e3
for B, L in [(8, 32768), (1, 131072), (1, 32768)]:
    sets = []
    for _ in range(2):
        q = torch.randn(B, 32, 128, device=dev, dtype=torch.bfloat16)
        k = torch.randn(B, 8, L, 128, device=dev, dtype=torch.bfloat16); v = torch.randn_like(k)
        sets.append((q, k, v, project_keys(k, proj).to(torch.bfloat16)))
    dense = us(lambda: [dense_decode(q, k, v) for q, k, v, _ in sets]) / 2
    res = {}
    for rep in range(4):
        for stages in (2, 3):
            for sinks, recent in ((0, 0), (1, 8)):
                cfg = dk.DecodeConfig(64, token_ratio=1 / 16, granularity="pages", attend_stages=stages)
                t = us(lambda: [dk.aqua_decode(q, None, v, kd, proj, cfg, sink_pages=sinks, recent_pages=recent) for q, k, v, kd in sets]) / 2
                res.setdefault((stages, sinks, recent), []).append(t)
    for key, ts in res.items():
        r = dict(batch=B, seq=L, attend_stages=key[0], sinks=key[1], recent=key[2], us_median=statistics.median(ts), us_all=ts, dense_us=dense, x=dense / statistics.median(ts))
        rows.append(r); print(r, flush=True)
    del sets; torch.cuda.empty_cache()
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "ab.json"), "w"), indent=1)
