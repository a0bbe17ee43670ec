"""The balanced dims kernel, third round (session 9): 256-token blocks with 2 stages (best in ``stream2.py``) against
128-token blocks with 3 or 4, 4 or 8 warps, and the dim-selection launch with 2, 4 or 8 warps in front of it; the
split kernel (``stream=False``) in the same run. Batch 8, k=0.25/0.5/0.75, interleaved, 3 repeats.
Output: $OUT/stream3.json

    PYTHONPATH=$PWD OUT=docs/results/sweeps python3 scripts/sweeps/stream3.py   (GPU)
"""
# ruff: noqa: F821  (timed lambdas run before their inputs are deleted, as in the other sweeps)
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _shared import PROJ as proj, input_sets, us, variant_rows  # noqa: E402
from aqua_cli.kernels import decode as dk  # noqa: E402

SCALE = 128 ** -0.5


def variants(dims: int) -> dict:
    full = dims == dk._kp(dims)
    sel = lambda q, w=4: dk.launch_select_dims(q, proj, dims, num_warps=w)  # noqa: E731
    out = {"split": lambda q, v, kd: dk.aqua_decode(q, None, v, kd, proj, dk.DecodeConfig(dims, stream=False))}
    for bn, st in ((128, 3), (128, 4), (256, 2)):
        if dims > 64 and st > 3:
            continue
        out[f"stream-bn{bn}-s{st}"] = (lambda q, v, kd, bn=bn, st=st: dk.launch_dims_stream(
            sel(q), kd, v, SCALE, block_n=bn, num_stages=st, full_rows=full))
    out["stream-bn256-s2-w8"] = lambda q, v, kd: dk.launch_dims_stream(sel(q), kd, v, SCALE, block_n=256, num_stages=2,
                                                                        num_warps=8, full_rows=full)
    for w in (2, 8):
        out[f"stream-bn256-s2-sel{w}"] = (lambda q, v, kd, w=w: dk.launch_dims_stream(
            sel(q, w), kd, v, SCALE, block_n=256, num_stages=2, full_rows=full))
    for w in (2, 4, 8):
        out[f"select-only-w{w}"] = lambda q, v, kd, w=w: sel(q, w)
    return out


rows = []
for B, L in [(8, 32768), (8, 131072)]:
    sets, dense = input_sets(B, L)
    res: dict = {}
    errs: dict = {}
    for dims in (32, 64, 96):
        vs = variants(dims)
        q, _, v, kd = sets[0]
        base = vs["split"](q, v, kd)
        for name, fn in vs.items():
            try:
                out = fn(q, v, kd)
                errs[(dims, name)] = (0.0 if name.startswith("select") else
                                      float((out.float() - base.float()).norm() / base.float().norm()))
            except Exception as exc:  # a launch that does not fit (shared memory) is recorded, not fatal
                errs[(dims, name)] = repr(exc)[:200]
        for rep in range(3):
            for name, fn in vs.items():
                if not isinstance(errs[(dims, name)], str):
                    res.setdefault((dims, name), []).append(us(lambda fn=fn: [fn(q, v, kd) for q, _, v, kd in sets]) / len(sets))
    rows += variant_rows(B, L, dense, errs, res)
    del sets
    torch.cuda.empty_cache()
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "stream3.json"), "w"), indent=1)
