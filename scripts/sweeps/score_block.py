"""Page scoring's step (``score_block`` tokens a step, 256 by default) and warps, for k=0.25 T=L/32 (32 selected
dims: a 256-token step is a 16 KB tile) and k=0.5 T=L/16; interleaved repeats. Output: $OUT/score_block.json

    PYTHONPATH=$PWD OUT=docs/results/sweeps python3 scripts/sweeps/score_block.py   (GPU)
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

SETTINGS = [(256, 4, 3), (256, 8, 3), (512, 4, 3), (512, 8, 3), (512, 8, 2), (128, 4, 4)]  # (step, warps, stages); 1024 x 3 stages exceeds shared memory
rows = []
for B, L in [(8, 32768), (8, 131072), (1, 32768), (1, 131072)]:
    sets, dense = input_sets(B, L)
    q, _, v, kd = sets[0]
    res: dict = {}
    for rep in range(3):
        for dims, ratio in ((32, 1 / 32), (64, 1 / 16)):
            base = dk.aqua_decode(q, None, v, kd, proj, dk.DecodeConfig(dims, token_ratio=ratio, granularity="pages"))
            for block, warps, stages in SETTINGS:
                cfg = dk.DecodeConfig(dims, token_ratio=ratio, granularity="pages", score_block=block, score_warps=warps,
                                      score_stages=stages)
                if rep == 0:
                    out = dk.aqua_decode(q, None, v, kd, proj, cfg)
                    res[("eq", dims, block, warps, stages)] = bool(torch.equal(out, base))
                t = us(lambda: [dk.aqua_decode(q, None, v, kd, proj, cfg) for q, _, v, kd in sets]) / 2
                res.setdefault((dims, block, warps, stages), []).append(t)
    for key, ts in res.items():
        if key[0] == "eq":
            continue
        dims, block, warps, stages = key
        r = dict(batch=B, seq=L, k=dims / 128, token_ratio=1 / 32 if dims == 32 else 1 / 16, score_block=block,
                 score_warps=warps, score_stages=stages, us_median=statistics.median(ts), us_all=ts, dense_us=dense,
                 x=dense / statistics.median(ts), equal_to_default=res[("eq", dims, block, warps, stages)])
        rows.append(r)
        print({k: (round(x, 3) if isinstance(x, float) else x) for k, x in r.items() if k != "us_all"}, flush=True)
    del sets, q, v, kd
    torch.cuda.empty_cache()
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "score_block.json"), "w"), indent=1)
