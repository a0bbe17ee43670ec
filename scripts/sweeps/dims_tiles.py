"""Dims only at batch 8 (and batch 1 x 32K): the main pass's token block, stages and warps for k=0.5 and k=0.75
(96 dims ride in a 128-row tile with 32 rows masked); interleaved repeats. Output: $OUT/dims_tiles.json

    PYTHONPATH=$PWD OUT=docs/results/sweeps python3 scripts/sweeps/dims_tiles.py   (GPU)
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

SETTINGS = [(128, 3, 4), (128, 2, 4), (128, 4, 4), (128, 3, 8), (64, 3, 4), (64, 4, 4), (64, 2, 4), (256, 2, 8)]
rows = []
for B, L in [(8, 32768), (8, 131072), (1, 32768)]:
    sets, dense = input_sets(B, L)
    q, _, v, kd = sets[0]
    res: dict = {}
    for rep in range(3):
        for dims in (64, 96):
            base = dk.aqua_decode(q, None, v, kd, proj, dk.DecodeConfig(dims))
            for block_n, stages, warps in SETTINGS:
                cfg = dk.DecodeConfig(dims, block_n=block_n, num_stages=stages, num_warps=warps)
                try:
                    if rep == 0:
                        out = dk.aqua_decode(q, None, v, kd, proj, cfg)
                        res[("err", dims, block_n, stages, warps)] = (out.float() - base.float()).abs().max().item()
                    t = us(lambda: [dk.aqua_decode(q, None, v, kd, proj, cfg) for q, _, v, kd in sets]) / 2
                except Exception as exc:  # a tile that does not fit shared memory
                    print("skip", dims, block_n, stages, warps, type(exc).__name__, flush=True)
                    continue
                res.setdefault((dims, block_n, stages, warps), []).append(t)
    for key, ts in res.items():
        if key[0] == "err":
            continue
        dims, block_n, stages, warps = key
        r = dict(batch=B, seq=L, k=dims / 128, block_n=block_n, num_stages=stages, num_warps=warps,
                 us_median=statistics.median(ts), us_all=ts, dense_us=dense, x=dense / statistics.median(ts),
                 max_abs_diff_vs_default=res[("err", dims, block_n, stages, warps)])
        rows.append(r)
        print({k: (round(x, 3) if isinstance(x, float) else x) for k, x in r.items() if k != "us_all"}, flush=True)
    del sets, q, v, kd
    torch.cuda.empty_cache()
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "dims_tiles.json"), "w"), indent=1)
