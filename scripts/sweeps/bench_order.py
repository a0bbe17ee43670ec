"""Does timing the composed PyTorch references before the fused rows slow the fused rows (session 8)? ``aqua bench``
as of session 7 (each reference timed just before its fused row; copied to ``aqua_cli/bench_old.py``) against the
bench that times every reference last, same H100, interleaved, two rounds: batch 8 x 32K and batch 1 x 32K (where the
references run), k=0.5, T=L/16, re-rank 4. Output: $OUT/bench_order.json

    git show HEAD~1:aqua_cli/bench.py > aqua_cli/bench_old.py
    PYTHONPATH=$PWD OUT=docs/results/sweeps python3 scripts/sweeps/bench_order.py   (GPU; then delete bench_old.py)
"""
import json
import os

import torch

from aqua_cli import bench as new, bench_old as old
from aqua_cli.models import PRESETS

IMPLS = ("dense", "aqua-dims", "aqua-topt-1/16", "aqua-pages-1/16", "aqua-planes-1/16", "aqua-rerank-1/16", "aqua-bounds-1/16")
rows = []
for B, L in [(8, 32768), (1, 32768)]:
    for rnd in range(2):
        for name, mod in (("refs-first", old), ("refs-last", new)):
            cfg = mod.BenchConfig(seqs=[L], batch=B, ks=[0.5], device="cuda", token_ratios=[1 / 16], hybrid=False, rerank=4)
            got = {r["impl"]: r for r in mod.run_bench(cfg, PRESETS["llama-3.1-8b"])}
            for impl in IMPLS:
                r = dict(batch=B, seq=L, round=rnd, order=name, impl=impl, latency_us=got[impl]["latency_us"],
                         x=got[impl]["speedup_vs_dense"], rel_err=got[impl].get("rel_err_vs_reference"),
                         device=torch.cuda.get_device_name())
                rows.append(r)
                print({k: v for k, v in r.items() if k != "device"}, flush=True)
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "bench_order.json"), "w"), indent=1)
