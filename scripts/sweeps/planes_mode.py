"""Key planes, third round: how page scoring multiplies a high-plane tile (``decode.PLANE_MODE``): 0 the bytes
shifted into float16 bits, 1 read as fp8 e5m2 and converted to float16, 2 fp8 tensor-core dots with the query split
into three e5m2 terms (an experiment in ``_page_score_kernel``, a constexpr read from
``decode.PLANE_MODE``, removed after this sweep: mode 0 stayed, 1 was no faster, 2 slower; this script no longer runs
as it is). The whole page step (pages by max, 1 sink + 8 recent pages) and the scoring pass alone, against
bf16 keys, three interleaved repeats; the page scores of modes 1 and 2 against mode 0's. Output: $OUT/planes_mode.json

    PYTHONPATH=$PWD OUT=docs/results/sweeps python3 scripts/sweeps/planes_mode.py   (GPU)
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

rows = []
for B, L, k in [(8, 32768, 64), (8, 32768, 32), (1, 32768, 64), (1, 131072, 64), (8, 131072, 64)]:
    sets, dense = input_sets(B, L)
    planes = [key_planes(kd) for *_, kd in sets]
    ratio = 1 / 16 if k == 64 else 1 / 32
    cfg = dk.DecodeConfig(k, token_ratio=ratio, granularity="pages")
    waves = 2.0 if B == 1 else 4.0
    agree = {}
    for mode in (0, 1, 2):
        dk.PLANE_MODE = mode
        agree[mode] = dk.launch_page_scores(sets[0][0], proj, planes[0], k, 64, L, waves=waves)[0]
    err = {m: float((agree[m] - agree[0]).abs().max() / agree[0].abs().max()) for m in (1, 2)}
    res: dict = {}
    for rep in range(3):
        for mode in (None, 0, 1, 2):
            dk.PLANE_MODE = mode or 0
            keys = [kd for *_, kd in sets] if mode is None else planes
            name = "bf16" if mode is None else f"planes-mode{mode}"
            res.setdefault(name, []).append(us(lambda: [dk.aqua_decode(q, None, v, kd, proj, cfg, sink_pages=1, recent_pages=8)
                                                        for (q, _, v, _), kd in zip(sets, keys)]) / 2)
            res.setdefault("score-" + name, []).append(us(lambda: [dk.launch_page_scores(q, proj, kd, k, 64, L, waves=waves)
                                                                   for (q, *_), kd in zip(sets, keys)]) / 2)
    dk.PLANE_MODE = 0
    for name, ts in res.items():
        mode = int(name[-1]) if "mode" in name else None
        r = dict(batch=B, seq=L, dims=k, token_ratio=ratio, variant=name, us_median=statistics.median(ts), us_all=ts,
                 dense_us=dense, x=dense / statistics.median(ts), score_err_vs_mode0=err.get(mode),
                 device=torch.cuda.get_device_name())
        rows.append(r)
        print({a: (round(x, 4) if isinstance(x, float) else x) for a, x in r.items() if a not in ("us_all", "device")},
              flush=True)
    del sets, planes, agree
    torch.cuda.empty_cache()
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "planes_mode.json"), "w"), indent=1)
