"""Dims only: V prefetched into L2 by the main pass's programs while the dim selection runs (PDL, the selection
lets the main pass become resident at its start), 0 / 2 / 4 / 8 blocks of 128 tokens per program, against the
default launch; interleaved repeats. Output: $OUT/prefetch.json

    PYTHONPATH=$PWD OUT=docs/results/sweeps python3 scripts/sweeps/prefetch.py   (GPU, compute capability >= 9)

Ran at commit 834082e (H100: no gain, 2 blocks within 1 us of none, 4-16 blocks slower); ``DecodeConfig.dims_prefetch``
and the prefetch were removed afterwards, so this script needs that commit.
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

rows = []
for B, L in [(8, 32768), (1, 32768), (1, 131072), (8, 131072)]:
    sets, dense = input_sets(B, L)
    q, _, v, kd = sets[0]
    res: dict = {}
    for rep in range(3):
        for dims in (64, 96):
            base = dk.aqua_decode(q, None, v, kd, proj, dk.DecodeConfig(dims))
            for pf in (0, 2, 4, 8, 16):
                cfg = dk.DecodeConfig(dims, dims_prefetch=pf)
                if rep == 0:
                    res[("eq", dims, pf)] = bool(torch.equal(dk.aqua_decode(q, None, v, kd, proj, cfg), base))
                t = us(lambda: [dk.aqua_decode(q, None, v, kd, proj, cfg) for q, _, v, kd in sets]) / 2
                res.setdefault((dims, pf), []).append(t)
    for key, ts in res.items():
        if key[0] == "eq":
            continue
        dims, pf = key
        r = dict(batch=B, seq=L, k=dims / 128, prefetch_blocks=pf, us_median=statistics.median(ts), us_all=ts,
                 dense_us=dense, x=dense / statistics.median(ts), equal_to_default=res[("eq", dims, pf)])
        rows.append(r)
        print({k: (round(x, 3) if isinstance(x, float) else x) for k, x in r.items() if k != "us_all"}, flush=True)
    del sets, q, v, kd
    torch.cuda.empty_cache()
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "prefetch.json"), "w"), indent=1)
