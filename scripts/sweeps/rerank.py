"""Pages by bound re-ranked by max (rerank=4, k=0.5, T=L/16): launch parameters of the candidates' scoring
(programs per SM, warps, pipeline stages), against plain bounds and pages by max, three interleaved repeats, at
batch 8 x 32K and batch 1 x 32K / 128K. Output: $OUT/rerank.json

    PYTHONPATH=$PWD OUT=docs/results/sweeps python3 scripts/sweeps/rerank.py   (GPU)
"""
# ruff: noqa: E731, F821  (timed lambdas run before their inputs are deleted, as in the other sweeps)
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _shared import PROJ as proj, input_sets, us  # noqa: E402
from aqua_cli.kernels import decode as dk  # noqa: E402
from aqua_cli.kernels.paged import page_bounds  # noqa: E402

VARIANTS = {"pages-max": None, "bounds": None, **{f"rerank-w{w}-n{n}-s{st}": dict(waves=w, num_warps=n, num_stages=st)
                                                  for w in (2.0, 4.0, 8.0) for n in (4, 8) for st in (1, 3)}}
rows = []
for B, L in [(8, 32768), (1, 32768), (1, 131072)]:
    sets, dense = input_sets(B, L)
    bnds = [page_bounds(kd, 64) for *_, kd in sets]
    res: dict = {}
    for rep in range(3):
        for name, launch in VARIANTS.items():
            if name == "pages-max":
                cfg = dk.DecodeConfig(64, token_ratio=1 / 16, granularity="pages")
            else:
                cfg = dk.DecodeConfig(64, token_ratio=1 / 16, granularity="pages", page_score="bound",
                                      rerank=0 if name == "bounds" else 4)
            if launch:
                dk.RERANK_LAUNCH.update(launch)
            t = us(lambda: [dk.aqua_decode(q, None, v, kd, proj, cfg, sink_pages=1, recent_pages=8, bounds=b)
                            for (q, _, v, kd), b in zip(sets, bnds)]) / 2
            res.setdefault(name, []).append(t)
    for name, ts in res.items():
        r = dict(batch=B, seq=L, variant=name, us_median=statistics.median(ts), us_all=ts, dense_us=dense,
                 x=dense / statistics.median(ts), device=torch.cuda.get_device_name())
        rows.append(r)
        print({k: (round(x, 3) if isinstance(x, float) else x) for k, x in r.items() if k not in ("us_all", "device")}, flush=True)
    del sets, bnds
    torch.cuda.empty_cache()
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "rerank.json"), "w"), indent=1)
