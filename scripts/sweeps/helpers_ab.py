"""Review of session 9: the dims kernels' shared pieces moved into Triton helpers (``_dims_selection``,
``_dims_range``, ``_store_partial``, ``_stream_slots``; the page and token exact passes store their partials through
``_store_partial`` too). Old (the commit before, copied to ``decode_old.py``) vs new, same H100 run, interleaved,
3 repeats: dims only (split kernel at batch 1, balanced kernel at batch 8) and key-planes pages, which should not move.
Output: $OUT/helpers_ab.json

    git show HEAD~1:aqua_cli/kernels/decode.py > aqua_cli/kernels/decode_old.py
    PYTHONPATH=$PWD OUT=docs/results/sweeps python3 scripts/sweeps/helpers_ab.py   (GPU; then delete decode_old.py)
"""
# ruff: noqa: F821  (timed lambdas run before their inputs are deleted, as in the other sweeps)
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _shared import PROJ as proj, input_sets, us  # noqa: E402
from aqua_cli.kernels import decode as new, decode_old as old  # noqa: E402
from aqua_cli.kernels.reference import key_planes  # noqa: E402

rows = []
for B, L in [(8, 32768), (1, 32768)]:
    sets, dense = input_sets(B, L)
    planes = [key_planes(kd) for *_, kd in sets]
    res: dict = {}
    same: dict = {}
    for rep in range(3):
        for mname, m in (("old", old), ("new", new)):
            cfgs = {"dims-k0.5": (m.DecodeConfig(64), False), "dims-k0.75": (m.DecodeConfig(96), False),
                    "planes-k0.5-T16": (m.DecodeConfig(64, token_ratio=1 / 16, granularity="pages"), True)}
            for name, (cfg, pl) in cfgs.items():
                keys = planes if pl else [kd for *_, kd in sets]
                if rep == 0:
                    q, _, v, _ = sets[0]
                    same.setdefault(name, []).append(m.aqua_decode(q, None, v, keys[0], proj, cfg))
                res.setdefault((name, mname), []).append(us(lambda m=m, cfg=cfg, keys=keys: [
                    m.aqua_decode(q, None, v, kd, proj, cfg) for (q, _, v, _), kd in zip(sets, keys)]) / len(sets))
    for (name, mname), ts in res.items():
        r = dict(batch=B, seq=L, stage=name, version=mname, us_median=statistics.median(ts), us_all=ts, dense_us=dense,
                 x=dense / statistics.median(ts), bit_identical=bool(torch.equal(*same[name])),
                 device=torch.cuda.get_device_name())
        rows.append(r)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k not in ("us_all", "device")}, flush=True)
    del sets, planes
    torch.cuda.empty_cache()
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "helpers_ab.json"), "w"), indent=1)
