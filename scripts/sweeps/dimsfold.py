"""Dims only: the selection in its own launch (3 launches; PDL trigger late or early, 4 or 2 programs per SM)
vs in the prologue of every main-pass program (``prologue``, 2 launches) at 1, 2 and 4 programs per SM: with
few, long programs the prologue's few microseconds are paid once per program and the separate launch, its
boundary and most of the combine disappear. Interleaved repeats. Output: $OUT/dimsfold.json

    PYTHONPATH=$PWD OUT=docs/results/sweeps python3 scripts/sweeps/dimsfold.py   (GPU)
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

SETTINGS = {  # name: (DecodeConfig overrides, PDL_EARLY)
    "3-launch": ({}, False),
    "3-launch pdl early": ({}, True),
    "3-launch waves 2": (dict(waves=2.0), False),
    "prologue waves 1": (dict(prologue=True, waves=1.0), False),
    "prologue waves 2": (dict(prologue=True, waves=2.0), False),
    "prologue waves 4": (dict(prologue=True, waves=4.0), False),
}
rows = []
for B, L in [(8, 32768), (8, 131072), (1, 32768), (1, 131072)]:
    sets, dense = input_sets(B, L)
    q, k, v, kd = sets[0]
    ref = {dims: dk.aqua_decode(q, None, v, kd, proj, dk.DecodeConfig(dims)) for dims in (64, 96)}
    res: dict = {}
    for rep in range(3):
        for dims in (64, 96):
            for name, (over, early) in SETTINGS.items():
                dk.PDL_EARLY = early
                cfg = dk.DecodeConfig(dims, **over)
                if rep == 0:
                    err = (dk.aqua_decode(q, None, v, kd, proj, cfg).float() - ref[dims].float()).abs().max().item()
                    res.setdefault(("err", dims, name), []).append(err)
                t = us(lambda: [dk.aqua_decode(q, None, v, kd, proj, cfg) for q, _, v, kd in sets]) / 2
                res.setdefault((dims, name), []).append(t)
                dk.PDL_EARLY = False
    for key, ts in res.items():
        if key[0] == "err":
            continue
        dims, name = key
        r = dict(batch=B, seq=L, k=dims / 128, setting=name, us_median=statistics.median(ts), us_all=ts, dense_us=dense,
                 x=dense / statistics.median(ts), max_abs_diff_vs_default=res[("err", dims, name)][0])
        rows.append(r)
        print({k: (round(x, 3) if isinstance(x, float) else x) for k, x in r.items() if k != "us_all"}, flush=True)
    del sets, q, v, kd
    torch.cuda.empty_cache()
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "dimsfold.json"), "w"), indent=1)
