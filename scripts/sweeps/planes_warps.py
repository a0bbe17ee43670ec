"""Planar page scoring with fewer warps and stages (session 8): the session-7 sweep (``planes_tune2.py``) found
k=0.25 T=L/32 faster with fewer stages (3 < 4 < 5) and 4 warps than 8, and never tried 2 warps or 2 stages. Steps of
128 / 256 / 512 tokens x 2 / 4 warps x 1-3 stages, and 8 programs per SM with 2 warps; whole steps and the scoring
launch alone, key planes, 1 sink + 8 recent pages, 3 interleaved repeats. Output: $OUT/planes_warps.json

    PYTHONPATH=$PWD OUT=docs/results/sweeps python3 scripts/sweeps/planes_warps.py   (GPU)
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

VARIANTS = [(256, 4, 3, None), (256, 4, 2, None), (256, 4, 1, None), (256, 2, 3, None), (256, 2, 2, None),
            (128, 4, 2, None), (128, 2, 2, None), (512, 4, 2, None), (256, 2, 2, 8.0), (128, 2, 2, 8.0)]
rows = []
for B, L, k in [(8, 32768, 32), (8, 32768, 64), (1, 32768, 64), (1, 131072, 64)]:
    sets, dense = input_sets(B, L)
    planes = [key_planes(kd) for *_, kd in sets]
    ratio = 1 / 32 if k == 32 else 1 / 16
    res: dict = {}
    for rep in range(3):
        for sb, w, st, sw in VARIANTS:
            name = f"sb{sb}-w{w}-s{st}" + (f"-sw{sw:g}" if sw else "")
            cfg = dk.DecodeConfig(k, token_ratio=ratio, granularity="pages", score_block=sb, score_warps=w, score_stages=st,
                                  score_waves=sw)
            res.setdefault((name, "step"), []).append(us(lambda: [
                dk.aqua_decode(q, None, v, kd, proj, cfg, sink_pages=1, recent_pages=8)
                for (q, _, v, _), kd in zip(sets, planes)]) / 2)
            waves = sw or (2.0 if B == 1 else 4.0)
            res.setdefault((name, "scores"), []).append(us(lambda: [
                dk.launch_page_scores(q, proj, kd, k, 64, L, score_block=sb, num_warps=w, num_stages=st, waves=waves)
                for (q, *_), kd in zip(sets, planes)]) / 2)
    for (name, what), ts in res.items():
        r = dict(batch=B, seq=L, dims=k, variant=name, what=what, us_median=statistics.median(ts), us_all=ts, dense_us=dense,
                 x=dense / statistics.median(ts), device=torch.cuda.get_device_name())
        rows.append(r)
        print({a: (round(b, 3) if isinstance(b, float) else b) for a, b in r.items() if a not in ("us_all", "device")}, flush=True)
    del sets, planes
    torch.cuda.empty_cache()
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "planes_warps.json"), "w"), indent=1)
