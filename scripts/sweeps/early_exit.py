"""The two selection searches ending early (session 8): the dim search (``_kth_key_pos``) and the page search
(``_top_band``) stop at the first round whose candidate has exactly K values at or above it, instead of always
running 8 rounds. Old (the commit before, copied to ``decode_old.py``) vs new, same H100 run, interleaved:
the dim-selection launch alone and the page-selection launch alone (one program per KV group, the latency-bound
steps), and whole steps (pages by max on bf16 keys and on key planes, re-rank 4, dims only), 1 sink + 8 recent pages.
Output: $OUT/early_exit.json

    git show HEAD~1:aqua_cli/kernels/decode.py > aqua_cli/kernels/decode_old.py
    PYTHONPATH=$PWD OUT=docs/results/sweeps python3 scripts/sweeps/early_exit.py   (GPU; then delete decode_old.py)
"""
# ruff: noqa: E731, F821  (timed lambdas run before their inputs are deleted, as in the other sweeps)
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _shared import PROJ as proj, input_sets, us  # noqa: E402
from aqua_cli.kernels import decode as new, decode_old as old  # noqa: E402
from aqua_cli.kernels.paged import page_bounds  # noqa: E402
from aqua_cli.kernels.reference import key_planes  # noqa: E402

MODS = {"old": old, "new": new}


def configs(m):
    pages = dict(token_ratio=1 / 16, granularity="pages")
    return {
        "pages-k0.5-T16": (m.DecodeConfig(64, **pages), "bf16"),
        "planes-k0.5-T16": (m.DecodeConfig(64, **pages), "planes"),
        "planes-k0.25-T32": (m.DecodeConfig(32, token_ratio=1 / 32, granularity="pages"), "planes"),
        "rerank4-k0.5-T16": (m.DecodeConfig(64, **pages, page_score="bound", rerank=4), "bf16"),
        "dims-k0.5": (m.DecodeConfig(64), "bf16"),
    }


rows = []
for B, L in [(1, 32768), (1, 131072), (8, 32768)]:
    sets, dense = input_sets(B, L)
    planes = [key_planes(kd) for *_, kd in sets]
    bnds = [page_bounds(kd, 64) for *_, kd in sets]
    n_pages = L // 64
    pscores = [torch.randn(B * 8, n_pages, device="cuda") for _ in sets]
    res: dict = {}
    for rep in range(3):
        for mname, m in MODS.items():
            res.setdefault(("select-dims", mname), []).append(
                us(lambda m=m: [m.launch_select_dims(q, proj, 64) for q, *_ in sets]) / 2)
            n_sel = n_pages // 16 + 9
            npp = m.select_width(n_pages, 1, 8)
            outs = [(torch.empty(B * 8, n_sel, device="cuda", dtype=torch.int32), torch.empty(B * 8, device="cuda", dtype=torch.int32))
                    for _ in sets]
            res.setdefault(("select-pages", mname), []).append(us(lambda m=m, npp=npp, n_sel=n_sel, outs=outs: [
                m._page_select_kernel[(B * 8,)](ps, ch, nf, n_pages, n_sel, L, 1, 8, PAGE=64, NPP=npp,
                                                num_warps=8 if npp >= 1024 else 4, GDC=0)
                for ps, (ch, nf) in zip(pscores, outs)]) / 2)
            for name, (cfg, lay) in configs(m).items():
                keys = planes if lay == "planes" else [kd for *_, kd in sets]
                res.setdefault((name, mname), []).append(us(lambda m=m, cfg=cfg, keys=keys: [
                    m.aqua_decode(q, None, v, kd, proj, cfg, sink_pages=1, recent_pages=8, bounds=b)
                    for (q, _, v, _), kd, b in zip(sets, keys, bnds)]) / 2)
    for q, *_ in sets[:1]:  # the two versions select the same dims
        a, b = old.launch_select_dims(q, proj, 64)[1], new.launch_select_dims(q, proj, 64)[1]
        same_dims = bool(torch.equal(a, b))
    for (name, mname), ts in res.items():
        r = dict(batch=B, seq=L, stage=name, version=mname, us_median=statistics.median(ts), us_all=ts, dense_us=dense,
                 x=dense / statistics.median(ts), same_dims=same_dims, device=torch.cuda.get_device_name())
        rows.append(r)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k not in ("us_all", "device")}, flush=True)
    del sets, planes, bnds
    torch.cuda.empty_cache()
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "early_exit.json"), "w"), indent=1)
