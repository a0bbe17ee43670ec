"""Key planes interleaved by page (session 8): each dim's row holds, per page of 64 tokens, the 64 high bytes and then
the 64 low bytes, so the exact pass reads one 128-byte run a dim a page (as bf16 keys do) instead of two 64-byte runs
a plane apart, and page scoring reads 64-byte runs 128 bytes apart. Against the planes of ``reference.key_planes``
(a high and a low plane, each ``(D, L)``) and bf16 keys; also bf16 keys in the paged layout ``(B, Hkv, NP, D, 64)``
scored one page a step (as shipped) or 4 pages a step (``SCORE_STRIDED_STEPS``). Whole steps (k=0.5 T=L/16,
k=0.25 T=L/32, 1 sink + 8 recent pages) and the scoring launch alone, 3 interleaved repeats. Output:
$OUT/interleave.json

    PYTHONPATH=$PWD OUT=docs/results/sweeps python3 scripts/sweeps/interleave.py   (GPU, at commit 65ed0b1)

Ran at commit 65ed0b1, whose kernels had the two hooks this needs (``decode.low_plane_offset``, the exact pass's
low-plane offset, and ``decode.SCORE_STRIDED_STEPS``); neither layout was kept and the hooks were removed after.
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

INTERLEAVED: set[int] = set()
_layout, _low = dk.kd_layout, dk.low_plane_offset


def kd_layout(kd, page):
    if kd.data_ptr() in INTERLEAVED:  # (B, Hkv, D, 2L): page p of dim d at d*2L + p*128, high bytes then low
        return kd.stride(0), kd.stride(1), 2 * page, kd.stride(2), kd.shape[2]
    return _layout(kd, page)


def low_plane_offset(kd, s_kd):
    return 64 if kd.data_ptr() in INTERLEAVED else _low(kd, s_kd)


dk.kd_layout, dk.low_plane_offset = kd_layout, low_plane_offset


def interleave(p: torch.Tensor) -> torch.Tensor:
    B, H, D2, L = p.shape
    D = D2 // 2
    hi, lo = p[:, :, :D].reshape(B, H, D, L // 64, 64), p[:, :, D:].reshape(B, H, D, L // 64, 64)
    out = torch.stack([hi, lo], dim=4).reshape(B, H, D, 2 * L).contiguous()
    INTERLEAVED.add(out.data_ptr())
    return out


rows = []
for B, L in [(8, 32768), (1, 32768), (1, 131072), (8, 131072)]:
    sets, dense = input_sets(B, L)
    keys = {"bf16": [kd for *_, kd in sets], "planes": [key_planes(kd) for *_, kd in sets]}
    keys["planes-il"] = [interleave(p) for p in keys["planes"]]
    keys["bf16-paged"] = [kd.view(B, 8, 128, L // 64, 64).permute(0, 1, 3, 2, 4).contiguous() for kd in keys["bf16"]]
    variants = [("bf16", False), ("planes", False), ("planes-il", True), ("bf16-paged", False), ("bf16-paged", True)]
    res: dict = {}
    for k, ratio in ((64, 1 / 16), (32, 1 / 32)):
        cfg = dk.DecodeConfig(k, token_ratio=ratio, granularity="pages")
        outs = {}
        for lay, strided in variants:
            dk.SCORE_STRIDED_STEPS = strided
            q, _, v, _ = sets[0]
            outs[(lay, strided)] = dk.aqua_decode(q, None, v, keys[lay][0], proj, cfg, sink_pages=1, recent_pages=8).float()
        base = outs[("planes", False)]
        for rep in range(3):
            for lay, strided in variants:
                dk.SCORE_STRIDED_STEPS = strided
                name = f"{lay}{'-ppi4' if strided and lay == 'bf16-paged' else ''}"
                t = us(lambda: [dk.aqua_decode(q, None, v, kd, proj, cfg, sink_pages=1, recent_pages=8)
                                for (q, _, v, _), kd in zip(sets, keys[lay])]) / 2
                res.setdefault((k, name, "step"), []).append(t)
                t = us(lambda: [dk.launch_page_scores(q, proj, kd, k, 64, L, waves=2.0 if B == 1 else 4.0)
                                for (q, *_), kd in zip(sets, keys[lay])]) / 2
                res.setdefault((k, name, "scores"), []).append(t)
                res[(k, name, "err")] = float((outs[(lay, strided)] - base).norm() / base.norm())
    dk.SCORE_STRIDED_STEPS = False
    for (k, name, what), ts in res.items():
        if what == "err":
            continue
        r = dict(batch=B, seq=L, dims=k, layout=name, what=what, us_median=statistics.median(ts), us_all=ts, dense_us=dense,
                 x=dense / statistics.median(ts), rel_vs_planes=res[(k, name, "err")], device=torch.cuda.get_device_name())
        rows.append(r)
        print({a: (round(b, 4) if isinstance(b, float) else b) for a, b in r.items() if a not in ("us_all", "device")}, flush=True)
    del sets, keys
    INTERLEAVED.clear()
    torch.cuda.empty_cache()
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "interleave.json"), "w"), indent=1)
