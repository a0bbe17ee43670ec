"""Keys in byte planes (``reference.key_planes``: page scoring reads the high byte of each float16 key, the exact
pass both) against bf16 projected keys, and bf16 rows whose stride is not a power of two: pages by max (k=0.5 T=L/16,
k=0.25 T=L/32), pages by bound re-ranked (rerank=4) and dims only (k=0.5, 0.75), three interleaved repeats, at batch
8 x 32K / 128K and batch 1 x 32K / 128K, 1 sink and 8 recent pages. Output: $OUT/planes.json

    PYTHONPATH=$PWD OUT=docs/results/sweeps python3 scripts/sweeps/planes.py   (GPU)
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
from aqua_cli.kernels.paged import page_bounds  # noqa: E402
from aqua_cli.kernels.reference import key_planes  # noqa: E402


def pages(k, ratio, **kw):
    return dk.DecodeConfig(k, token_ratio=ratio, granularity="pages", **kw)


CONFIGS = {
    "pages-k0.5-T16": pages(64, 1 / 16),
    "pages-k0.25-T32": pages(32, 1 / 32),
    "rerank4-k0.5-T16": pages(64, 1 / 16, page_score="bound", rerank=4),
    "dims-k0.5": dk.DecodeConfig(64),
    "dims-k0.75": dk.DecodeConfig(96),
}
LAYOUTS = ("bf16", "planes", "bf16-pad")
rows = []
for B, L in [(8, 32768), (1, 32768), (1, 131072), (8, 131072)]:
    sets, dense = input_sets(B, L)
    keys = {"bf16": [kd for *_, kd in sets], "planes": [key_planes(kd.float()).contiguous() for *_, kd in sets]}
    keys["bf16-pad"] = [torch.empty(*kd.shape[:-1], L + 64, device=kd.device, dtype=kd.dtype)[..., :L].copy_(kd)
                        for kd in keys["bf16"]]
    bnds = {lay: [page_bounds(kd, 64) for kd in keys[lay]] for lay in LAYOUTS}
    res: dict = {}
    for name, cfg in CONFIGS.items():  # the same step on every layout: agreement, not only speed
        outs = [dk.aqua_decode(sets[0][0], None, sets[0][2], keys[lay][0], proj, cfg, sink_pages=1, recent_pages=8,
                               bounds=bnds[lay][0]) for lay in LAYOUTS]
        res[(name, "err")] = [float((o.float() - outs[0].float()).norm() / outs[0].float().norm()) for o in outs]
    for rep in range(3):
        for name, cfg in CONFIGS.items():
            for lay in LAYOUTS:
                t = us(lambda: [dk.aqua_decode(q, None, v, kd, proj, cfg, sink_pages=1, recent_pages=8, bounds=b)
                                for (q, _, v, _), kd, b in zip(sets, keys[lay], bnds[lay])]) / 2
                res.setdefault((name, lay), []).append(t)
    for name in CONFIGS:
        for i, lay in enumerate(LAYOUTS):
            ts = res[(name, lay)]
            r = dict(batch=B, seq=L, config=name, layout=lay, us_median=statistics.median(ts), us_all=ts, dense_us=dense,
                     x=dense / statistics.median(ts), rel_vs_bf16=res[(name, "err")][i], device=torch.cuda.get_device_name())
            rows.append(r)
            print({k: (round(x, 4) if isinstance(x, float) else x) for k, x in r.items() if k not in ("us_all", "device")},
                  flush=True)
    del sets, keys, bnds
    torch.cuda.empty_cache()
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "planes.json"), "w"), indent=1)
