"""Key planes, fourth round: the planar scoring pass's tile (a step of 256 or 512 tokens of one-byte values), warps
and pipeline stages, in the whole page step (pages by max, 1 sink + 8 recent pages) and alone, three interleaved
repeats. Output: $OUT/planes_tune2.json

    PYTHONPATH=$PWD OUT=docs/results/sweeps python3 scripts/sweeps/planes_tune2.py   (GPU)
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
from aqua_cli.kernels.reference import key_planes  # noqa: E402

TILES = {"sb256-w4-s3": (256, 4, 3), "sb256-w4-s4": (256, 4, 4), "sb256-w4-s5": (256, 4, 5), "sb256-w8-s3": (256, 8, 3),
         "sb512-w8-s2": (512, 8, 2), "sb512-w8-s3": (512, 8, 3), "sb128-w4-s4": (128, 4, 4)}
rows = []
for B, L, k in [(8, 32768, 64), (8, 32768, 32), (1, 32768, 64), (1, 131072, 64)]:
    sets, dense = input_sets(B, L)
    planes = [key_planes(kd) for *_, kd in sets]
    ratio = 1 / 16 if k == 64 else 1 / 32
    waves = 2.0 if B == 1 else 4.0
    res: dict = {}
    for rep in range(3):
        for name, (sb, w, st) in TILES.items():
            cfg = dk.DecodeConfig(k, token_ratio=ratio, granularity="pages", score_block=sb, score_warps=w, score_stages=st)
            res.setdefault(name, []).append(us(lambda: [dk.aqua_decode(q, None, v, kd, proj, cfg, sink_pages=1, recent_pages=8)
                                                        for (q, _, v, _), kd in zip(sets, planes)]) / 2)
            res.setdefault("score-" + name, []).append(
                us(lambda: [dk.launch_page_scores(q, proj, kd, k, 64, L, sb, w, st, waves) for (q, *_), kd in zip(sets, planes)]) / 2)
    for name, ts in res.items():
        r = dict(batch=B, seq=L, dims=k, token_ratio=ratio, variant=name, us_median=statistics.median(ts), us_all=ts,
                 dense_us=dense, x=dense / statistics.median(ts), device=torch.cuda.get_device_name())
        rows.append(r)
        print({a: (round(x, 4) if isinstance(x, float) else x) for a, x in r.items() if a not in ("us_all", "device")},
              flush=True)
    del sets, planes
    torch.cuda.empty_cache()
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "planes_tune2.json"), "w"), indent=1)
