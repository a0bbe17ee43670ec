"""How many programs the page passes launch: the exact pass's ``attend_waves`` (1.9 fills exactly one wave of
2 programs per SM at batch 8; 2.0, the default, launches 320 programs for 264 slots there) and the scoring
pass's ``score_waves`` at batch 8, interleaved repeats. Output: $OUT/waves.json

    PYTHONPATH=$PWD OUT=docs/results/sweeps python3 scripts/sweeps/waves.py   (GPU)
"""
# ruff: noqa: E731, F821  (timed lambdas run before their inputs are deleted, as in the other sweeps)
import json
import os
import statistics

import torch
import triton

from aqua_cli.bench import random_projection
from aqua_cli.kernels import decode as dk
from aqua_cli.kernels.reference import dense_decode, project_keys

dev = torch.device("cuda")
proj = random_projection(8, 128, torch.Generator().manual_seed(0)).to(dev)
us = lambda f: triton.testing.do_bench_cudagraph(f, rep=80) * 1e3
VARIANTS = {
    "pages k=0.5 T/16 sink1 recent8": (dict(dims=64, token_ratio=1 / 16, granularity="pages"), 1, 8),
    "pages k=0.25 T/32": (dict(dims=32, token_ratio=1 / 32, granularity="pages"), 0, 0),
}
rows = []
for B, L in [(8, 32768), (8, 131072), (1, 32768), (1, 131072)]:
    sets = []
    for _ in range(2):
        q = torch.randn(B, 32, 128, device=dev, dtype=torch.bfloat16)
        k = torch.randn(B, 8, L, 128, device=dev, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        sets.append((q, k, v, project_keys(k, proj).to(torch.bfloat16)))
        del k
    dense = us(lambda: [dense_decode(q, k, v) for q, k, v, _ in sets]) / 2
    grid = [(a, s) for a in (1.9, 2.0, 3.0) for s in ((None, 3.8) if B == 8 else (None,))]
    res: dict = {}
    for rep in range(3):
        for name, (kw, sinks, recent) in VARIANTS.items():
            for a, s in grid:
                cfg = dk.DecodeConfig(**kw, attend_waves=a, score_waves=s)
                t = us(lambda: [dk.aqua_decode(q, None, v, kd, proj, cfg, sink_pages=sinks, recent_pages=recent)
                                for q, _, v, kd in sets]) / 2
                res.setdefault((name, a, s), []).append(t)
    for (name, a, s), ts in res.items():
        r = dict(batch=B, seq=L, variant=name, attend_waves=a, score_waves=s, us_median=statistics.median(ts), us_all=ts,
                 dense_us=dense, x=dense / statistics.median(ts))
        rows.append(r)
        print({k: (round(x, 2) if isinstance(x, float) else x) for k, x in r.items() if k != "us_all"}, flush=True)
    del sets
    torch.cuda.empty_cache()
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "waves.json"), "w"), indent=1)
