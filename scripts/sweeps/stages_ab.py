"""Dims only: the main pass with 3 vs 4 pipeline stages at k=0.25 and k=0.5 (a 4-stage k=0.5 pipeline keeps 144 KB
of tiles in flight per program), batch 2-8, four interleaved repeats; run on more than one H100 instance (the
batch-8 dims kernel is bimodal across instances). Output: $OUT/stages_ab.json

    PYTHONPATH=$PWD OUT=docs/results/sweeps python3 scripts/sweeps/stages_ab.py   (GPU)
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
for B, L in [(8, 32768), (8, 131072), (4, 32768), (2, 32768)]:
    sets, dense = input_sets(B, L)
    res: dict = {}
    for rep in range(4):
        for dims in (32, 64):
            for stages in (3, 4):
                cfg = dk.DecodeConfig(dims, num_stages=stages)
                t = us(lambda: [dk.aqua_decode(q, None, v, kd, proj, cfg) for q, _, v, kd in sets]) / 2
                res.setdefault((dims, stages), []).append(t)
    for (dims, stages), ts in res.items():
        r = dict(batch=B, seq=L, k=dims / 128, num_stages=stages, us_median=statistics.median(ts), us_all=ts,
                 dense_us=dense, x=dense / statistics.median(ts), device=torch.cuda.get_device_name())
        rows.append(r)
        print({k: (round(x, 3) if isinstance(x, float) else x) for k, x in r.items() if k not in ("us_all", "device")}, flush=True)
    del sets
    torch.cuda.empty_cache()
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "stages_ab.json"), "w"), indent=1)
