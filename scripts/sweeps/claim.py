"""The balanced dims kernel selecting its own dims (session 9): the first program to reach a KV group claims it,
selects its dims and publishes them; the others wait for the flag (``launch_dims_stream(claim=True)``: one launch a
step instead of the selection launch and the stream launch), with 0 / 2 / 4 blocks of V asked of L2 per program
while the dims are chosen. Against the two-launch stream path (``stream=True``) and the split kernel (``stream=False``)
through ``aqua_decode``, same run, interleaved, 3 repeats; k=0.25/0.5/0.75, batch 8, 4 and 1.
Output: $OUT/claim.json

    PYTHONPATH=$PWD OUT=docs/results/sweeps python3 scripts/sweeps/claim.py   (GPU)
Ran at commit 2688759 (H100: no gain over the two-launch stream path, docs/bench.md eighth round); the claim mode
was removed afterwards, so this script needs that commit. Its run stopped at its time limit before writing the JSON:
docs/results/sweeps/claim-h100.json holds the rows it printed.
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
    out = {
        "split": lambda q, v, kd: dk.aqua_decode(q, None, v, kd, proj, dk.DecodeConfig(dims, stream=False)),
        "stream": lambda q, v, kd: dk.aqua_decode(q, None, v, kd, proj, dk.DecodeConfig(dims, stream=True)),
    }
    for bn, st in ((256, 2), (128, 3)):
        for pf in (0, 2, 4):
            out[f"claim-bn{bn}-s{st}-pf{pf}"] = (lambda q, v, kd, bn=bn, st=st, pf=pf: dk.launch_dims_stream(
                None, kd, v, SCALE, block_n=bn, num_stages=st, q=q, proj=proj, dims=dims, claim=True, prefetch=pf))
    return out


rows = []
for B, L in [(8, 32768), (8, 131072), (4, 32768), (1, 32768), (1, 131072)]:
    sets, dense = input_sets(B, L)
    res: dict = {}
    errs: dict = {}
    for dims in (32, 64, 96):
        vs = variants(dims)
        q, _, v, kd = sets[0]
        base = vs["split"](q, v, kd)
        for name, fn in vs.items():
            try:
                errs[(dims, name)] = float((fn(q, v, kd).float() - base.float()).norm() / base.float().norm())
            except Exception as exc:  # a launch that does not fit (shared memory) is recorded, not fatal
                errs[(dims, name)] = repr(exc)[:200]
        for rep in range(3):
            for name, fn in vs.items():
                if not isinstance(errs[(dims, name)], str):
                    res.setdefault((dims, name), []).append(us(lambda fn=fn: [fn(q, v, kd) for q, _, v, kd in sets]) / len(sets))
        again = vs["claim-bn256-s2-pf2"](q, v, kd)  # after hundreds of replays: still the same output
        errs[(dims, "claim-after-replays")] = float((again.float() - base.float()).norm() / base.float().norm())
    rows += variant_rows(B, L, dense, errs, res)
    del sets
    torch.cuda.empty_cache()
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "claim.json"), "w"), indent=1)
