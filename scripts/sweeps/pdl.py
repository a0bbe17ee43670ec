"""A/B of programmatic dependent launch (``DecodeConfig.pdl``) on the dims and page paths, interleaved repeats,
plus the page-scoring pass alone on the contiguous-rows vs the paged key layout. Output: $OUT/pdl.json

    PYTHONPATH=$PWD OUT=docs/results/sweeps python3 scripts/sweeps/pdl.py   (GPU, compute capability >= 9)

Each row: median of the repeats of one CUDA-graph replay (two input sets alternated, as in ab.py), dense SDPA
in the same run, and the largest difference between the PDL and the plain output (same kernels: expected 0).
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

VARIANTS = {  # name: (DecodeConfig kwargs, sink pages, recent pages)
    "dims k=0.5": (dict(dims=64), 0, 0),
    "dims k=0.75": (dict(dims=96), 0, 0),
    "pages k=0.5 T/16": (dict(dims=64, token_ratio=1 / 16, granularity="pages"), 0, 0),
    "pages k=0.5 T/16 sink1 recent8": (dict(dims=64, token_ratio=1 / 16, granularity="pages"), 1, 8),
    "pages k=0.25 T/32": (dict(dims=32, token_ratio=1 / 32, granularity="pages"), 0, 0),
}
rows = []
for B, L in [(8, 32768), (1, 32768), (1, 131072), (8, 131072)]:
    sets, dense = input_sets(B, L)
    res: dict = {}
    diffs = {}
    for name, (kw, sinks, recent) in VARIANTS.items():
        q, _, v, kd = sets[0]
        outs = [dk.aqua_decode(q, None, v, kd, proj, dk.DecodeConfig(**kw, pdl=p), sink_pages=sinks, recent_pages=recent)
                for p in (False, True)]
        diffs[name] = (outs[0].float() - outs[1].float()).abs().max().item()
    for rep in range(3):
        for name, (kw, sinks, recent) in VARIANTS.items():
            for p in (False, True):
                cfg = dk.DecodeConfig(**kw, pdl=p)
                t = us(lambda: [dk.aqua_decode(q, None, v, kd, proj, cfg, sink_pages=sinks, recent_pages=recent)
                                for q, _, v, kd in sets]) / 2
                res.setdefault((name, p), []).append(t)
    for (name, p), ts in res.items():
        r = dict(batch=B, seq=L, variant=name, pdl=p, us_median=statistics.median(ts), us_all=ts, dense_us=dense,
                 x=dense / statistics.median(ts), max_abs_diff_pdl_vs_plain=diffs[name])
        rows.append(r)
        print(r, flush=True)
    # the scoring pass alone (dim selection + page scores), contiguous rows vs paged keys, no PDL
    for layout in ("rows", "paged"):
        xs = []
        for q, _, v, kd in sets:
            if layout == "paged":
                kd = kd.view(B, 8, 128, L // 64, 64).permute(0, 1, 3, 2, 4).contiguous()
            xs.append((q, kd))
        t = us(lambda: [dk.launch_page_scores(q, proj, kd, 64, 64, L, pdl=False) for q, kd in xs]) / 2
        bytes_read = B * 8 * 64 * L * 2
        r = dict(batch=B, seq=L, variant=f"select+score k=0.5 {layout}", us_median=t, TBps=bytes_read / t / 1e6, dense_us=dense)
        rows.append(r)
        print(r, flush=True)
        del xs
    del sets
    torch.cuda.empty_cache()
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "pdl.json"), "w"), indent=1)
