"""Second A/B of programmatic dependent launch: trigger at each kernel's start (``PDL_EARLY``) vs before its
final stores, crossed with the dim selection's scatter store (``DIM_SCATTER``) vs its one-hot compaction;
interleaved repeats, plus the dim selection alone. Output: $OUT/pdl2.json

    PYTHONPATH=$PWD OUT=docs/results/sweeps python3 scripts/sweeps/pdl2.py   (GPU, compute capability >= 9)
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
    "pages k=0.5 T/16 sink1 recent8": (dict(dims=64, token_ratio=1 / 16, granularity="pages"), 1, 8),
    "pages k=0.25 T/32": (dict(dims=32, token_ratio=1 / 32, granularity="pages"), 0, 0),
}
MODES = {"off": (False, False), "early": (True, True), "late": (True, False)}  # name: (pdl, PDL_EARLY)


def setting(mode: str, scatter: bool) -> bool:
    pdl, early = MODES[mode]
    dk.PDL_EARLY, dk.DIM_SCATTER = early, scatter
    return pdl


rows = []
for B, L in [(1, 32768), (1, 131072), (8, 32768)]:
    sets, dense = input_sets(B, L)
    res: dict = {}
    for rep in range(3):
        for name, (kw, sinks, recent) in VARIANTS.items():
            for mode in MODES:
                for scatter in (False, True):
                    cfg = dk.DecodeConfig(**kw, pdl=setting(mode, scatter))
                    t = us(lambda: [dk.aqua_decode(q, None, v, kd, proj, cfg, sink_pages=sinks, recent_pages=recent)
                                    for q, _, v, kd in sets]) / 2
                    res.setdefault((name, mode, scatter), []).append(t)
        for dims in (32, 64, 96):
            for scatter in (False, True):
                setting("off", scatter)
                t = us(lambda: [dk.launch_select_dims(q, proj, dims, pdl=False) for q, *_ in sets]) / 2
                res.setdefault((f"dim selection alone k={dims / 128:g}", "off", scatter), []).append(t)
    for (name, mode, scatter), ts in res.items():
        r = dict(batch=B, seq=L, variant=name, pdl=mode, scatter=scatter, us_median=statistics.median(ts), us_all=ts,
                 dense_us=dense, x=dense / statistics.median(ts))
        rows.append(r)
        print({k: (round(x, 2) if isinstance(x, float) else x) for k, x in r.items() if k != "us_all"}, flush=True)
    del sets
    torch.cuda.empty_cache()
setting("off", False)
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "pdl2.json"), "w"), indent=1)
