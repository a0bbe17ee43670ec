"""The balanced dims kernel, second round (session 9): where its ~15 us of fixed cost at batch 8 x 32K goes (the
selection launch alone, the stream launch alone on a selection made beforehand), and what might cut it: the
selection triggering the stream launch at its start (programmatic dependent launch, mode 1), 8 warps, 256- or
64-token blocks; and the batch sizes between 1 and 8 (2 and 4: where ``STREAM_MIN_GROUPS`` should sit). Split
kernel (``stream=False``) vs balanced (``stream=True``) through ``aqua_decode``, same run, interleaved, 3 repeats.
Output: $OUT/stream2.json

    PYTHONPATH=$PWD OUT=docs/results/sweeps python3 scripts/sweeps/stream2.py   (GPU)
Ran at commit ae2daed (the selection's ``early`` option, removed at the end of session 9 as slower, is needed
by the ``stream-early`` rows: any commit from 1ad1153 to 2688759).
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


def variants(dims: int, batch: int) -> dict:
    full = dims == dk._kp(dims)
    out = {
        "split": lambda q, v, kd: dk.aqua_decode(q, None, v, kd, proj, dk.DecodeConfig(dims, stream=False)),
        "stream": lambda q, v, kd: dk.aqua_decode(q, None, v, kd, proj, dk.DecodeConfig(dims, stream=True)),
    }
    if batch < 8:
        return out
    sel = lambda q, **kw: dk.launch_select_dims(q, proj, dims, **kw)  # noqa: E731
    out.update({
        "stream-early": lambda q, v, kd: dk.launch_dims_stream(sel(q, early=True), kd, v, SCALE, full_rows=full),
        "stream-w8": lambda q, v, kd: dk.launch_dims_stream(sel(q), kd, v, SCALE, num_warps=8, full_rows=full),
        "stream-bn256-s2": lambda q, v, kd: dk.launch_dims_stream(sel(q), kd, v, SCALE, block_n=256, num_stages=2, full_rows=full),
        "stream-bn64-s4": lambda q, v, kd: dk.launch_dims_stream(sel(q), kd, v, SCALE, block_n=64, num_stages=4, full_rows=full),
        "stream-bn64-s6": lambda q, v, kd: dk.launch_dims_stream(sel(q), kd, v, SCALE, block_n=64, num_stages=6, full_rows=full),
        "select-only": lambda q, v, kd: sel(q),
    })
    return out


rows = []
for B, L in [(8, 32768), (8, 131072), (4, 32768), (2, 32768), (4, 131072)]:
    sets, dense = input_sets(B, L)
    res: dict = {}
    errs: dict = {}
    for dims in (64, 96):
        vs = variants(dims, B)
        q, _, v, kd = sets[0]
        base = vs["split"](q, v, kd)
        for name, fn in vs.items():
            try:
                out = fn(q, v, kd)
                errs[(dims, name)] = (0.0 if name == "select-only" else
                                      float((out.float() - base.float()).norm() / base.float().norm()))
            except Exception as exc:  # a launch that does not fit (shared memory) is recorded, not fatal
                errs[(dims, name)] = repr(exc)[:200]
        if B == 8:  # the stream launch alone, on selections made beforehand
            sels = [dk.launch_select_dims(q, proj, dims) for q, *_ in sets]
            vs["stream-only"] = None
            errs[(dims, "stream-only")] = 0.0
        for rep in range(3):
            for name, fn in vs.items():
                if isinstance(errs[(dims, name)], str):
                    continue
                if name == "stream-only":
                    t = us(lambda: [dk.launch_dims_stream(s, kd, v, SCALE, full_rows=dims == 64)
                                    for s, (q, _, v, kd) in zip(sels, sets)])
                else:
                    t = us(lambda fn=fn: [fn(q, v, kd) for q, _, v, kd in sets])
                res.setdefault((dims, name), []).append(t / len(sets))
    rows += variant_rows(B, L, dense, errs, res)
    del sets
    torch.cuda.empty_cache()
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "stream2.json"), "w"), indent=1)
