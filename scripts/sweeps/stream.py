"""Dims only, balanced to the block (session 9): ``_dims_stream_kernel`` deals the step's ``B*Hkv*NB`` blocks of 128
tokens out to about one program per SM (each streams the same number of blocks, crossing from one KV group into the
next), and merges the partials in the same launch (the last program of a group to finish). Against the split kernel
(``launch_dims``: 4 programs per SM aimed, ``dims_stages``) in the same run, interleaved, 3 repeats; with the selection
launch in front (``select``), or in the stream kernel's prologue (``prologue``, one launch a step); 1 or 2 programs
per SM, 2-4 stages, the combine fused or launched. Outputs are checked against the split kernel's.
Output: $OUT/stream.json

    PYTHONPATH=$PWD OUT=docs/results/sweeps python3 scripts/sweeps/stream.py   (GPU)
Ran at commit 1ad1153; the prologue variant (``launch_dims_stream(None, ..., q=, proj=, dims=)``) was removed at the end
of session 9 (slower), so those rows need a commit from 1ad1153 to 2688759.
"""
# ruff: noqa: F821  (timed lambdas run before their inputs are deleted, as in the other sweeps)
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _shared import PROJ as proj, input_sets, us, variant_rows  # noqa: E402
from aqua_cli.kernels import decode as dk  # noqa: E402

QUICK = os.environ.get("QUICK") == "1"


def variants(dims: int, kd: torch.Tensor) -> dict:
    """name -> fn(q, v, kd) for one step."""
    full = dims == dk._kp(dims)
    cfg = dk.DecodeConfig(dims)
    out = {"split": lambda q, v, kd: dk.aqua_decode(q, None, v, kd, proj, cfg)}
    stage_set = (2, 3, 4) if dims <= 64 else (2, 3)
    for ctas in (1, 2):
        for st in stage_set:
            out[f"stream-c{ctas}-s{st}"] = (lambda q, v, kd, ctas=ctas, st=st: dk.launch_dims_stream(
                dk.launch_select_dims(q, proj, dims), kd, v, 128 ** -0.5, num_stages=st, ctas=ctas, full_rows=full))
    st = stage_set[-1]
    out[f"stream-c1-s{st}-combine"] = lambda q, v, kd: dk.launch_dims_stream(
        dk.launch_select_dims(q, proj, dims), kd, v, 128 ** -0.5, num_stages=st, ctas=1, full_rows=full, fuse=False)
    for ctas in (1, 2):
        out[f"prologue-c{ctas}-s{st}"] = (lambda q, v, kd, ctas=ctas: dk.launch_dims_stream(
            None, kd, v, 128 ** -0.5, num_stages=st, ctas=ctas, q=q, proj=proj, dims=dims))
    return out


rows = []
shapes = [(8, 32768), (1, 32768)] if QUICK else [(8, 32768), (8, 131072), (1, 32768), (1, 131072)]
for B, L in shapes:
    sets, dense = input_sets(B, L)
    res: dict = {}
    errs: dict = {}
    for dims in (32, 64, 96):
        vs = variants(dims, sets[0][3])
        q, _, v, kd = sets[0]
        base = vs["split"](q, v, kd)
        for name, fn in vs.items():
            try:
                errs[(dims, name)] = float((fn(q, v, kd).float() - base.float()).norm() / base.float().norm())
            except Exception as exc:  # a launch that does not fit (shared memory) is recorded, not fatal
                errs[(dims, name)] = repr(exc)[:200]
        for rep in range(3):
            for name, fn in vs.items():
                if isinstance(errs[(dims, name)], str):
                    continue
                res.setdefault((dims, name), []).append(us(lambda fn=fn: [fn(q, v, kd) for q, _, v, kd in sets]) / len(sets))
    rows += variant_rows(B, L, dense, errs, res)
    del sets
    torch.cuda.empty_cache()
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "stream.json"), "w"), indent=1)
