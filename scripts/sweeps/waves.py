"""How many programs the page passes launch: the exact pass's ``attend_waves`` (1.9 fills exactly one wave of
2 programs per SM at batch 8; 2.0, the default, launches 320 programs for 264 slots there) and the scoring
pass's ``score_waves`` at batch 8, interleaved repeats. Output: $OUT/waves.json

    PYTHONPATH=$PWD OUT=docs/results/sweeps python3 scripts/sweeps/waves.py   (GPU)
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

VARIANTS = {
    "pages k=0.5 T/16 sink1 recent8": (dict(dims=64, token_ratio=1 / 16, granularity="pages"), 1, 8),
    "pages k=0.25 T/32": (dict(dims=32, token_ratio=1 / 32, granularity="pages"), 0, 0),
}
rows = []
for B, L in [(8, 32768), (8, 131072), (1, 32768), (1, 131072)]:
    sets, dense = input_sets(B, L)
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
