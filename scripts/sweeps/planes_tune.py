"""Key planes, second round: launch parameters of the planar page step (scoring steps of 256 / 512 / 1024 tokens,
scoring programs per SM, exact-pass programs per SM and warps), planes paged as ``(B, Hkv, NP, 2D, 64)`` (a page's
planes one contiguous 16 KB block for the exact pass), and the scoring pass alone (dim selection + page scores) on
bf16 keys and on planes; pages by max, k=0.5 T=L/16 (and k=0.25 T=L/32 at batch 8 x 32K), 1 sink and 8 recent
pages, three interleaved repeats. Output: $OUT/planes_tune.json

    PYTHONPATH=$PWD OUT=docs/results/sweeps python3 scripts/sweeps/planes_tune.py   (GPU)
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


def variants(k):
    base = dict(token_ratio=1 / 16 if k == 64 else 1 / 32, granularity="pages")
    out = {"bf16": ("bf16", dk.DecodeConfig(k, **base)), "planes": ("planes", dk.DecodeConfig(k, **base))}
    for sb in (512, 1024):
        out[f"planes-sb{sb}"] = ("planes", dk.DecodeConfig(k, **base, score_block=sb))
    for sw in (2.0, 4.0, 8.0):
        out[f"planes-sw{sw:g}"] = ("planes", dk.DecodeConfig(k, **base, score_waves=sw))
    out["planes-aw4"] = ("planes", dk.DecodeConfig(k, **base, attend_waves=4.0))
    out["planes-aw1"] = ("planes", dk.DecodeConfig(k, **base, attend_waves=1.0))
    out["planes-attw8"] = ("planes", dk.DecodeConfig(k, **base, attend_warps=8))
    out["planes-paged"] = ("paged", dk.DecodeConfig(k, **base))
    out["score-bf16"] = ("bf16", None)
    out["score-planes"] = ("planes", None)
    out["score-planes-sb512"] = ("planes", 512)
    return out


rows = []
for B, L, k in [(8, 32768, 64), (8, 32768, 32), (1, 32768, 64), (1, 131072, 64)]:
    sets, dense = input_sets(B, L)
    keys = {"bf16": [kd for *_, kd in sets], "planes": [key_planes(kd.float()).contiguous() for *_, kd in sets]}
    keys["paged"] = [p.view(B, 8, 256, L // 64, 64).permute(0, 1, 3, 2, 4).contiguous() for p in keys["planes"]]
    res: dict = {}
    vs = variants(k)
    for rep in range(3):
        for name, (lay, cfg) in vs.items():
            if name.startswith("score-"):
                sb = cfg or 256
                f = lambda: [dk.launch_page_scores(q, proj, kd, k, 64, L, score_block=sb, waves=2.0 if B == 1 else 4.0)
                             for (q, *_), kd in zip(sets, keys[lay])]
            else:
                f = lambda: [dk.aqua_decode(q, None, v, kd, proj, cfg, sink_pages=1, recent_pages=8)
                             if kd.dim() == 4 else
                             dk.launch_pages(q, proj, kd, v, k, cfg.token_ratio, 128 ** -0.5, 64, length=L,
                                             sink_pages=1, recent_pages=8, score_waves=2.0 if B == 1 else None)
                             for (q, _, v, _), kd in zip(sets, keys[lay])]
            res.setdefault(name, []).append(us(f) / 2)
    for name, ts in res.items():
        r = dict(batch=B, seq=L, dims=k, variant=name, us_median=statistics.median(ts), us_all=ts, dense_us=dense,
                 x=dense / statistics.median(ts), device=torch.cuda.get_device_name())
        rows.append(r)
        print({a: (round(x, 3) if isinstance(x, float) else x) for a, x in r.items() if a not in ("us_all", "device")},
              flush=True)
    del sets, keys
    torch.cuda.empty_cache()
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "planes_tune.json"), "w"), indent=1)
