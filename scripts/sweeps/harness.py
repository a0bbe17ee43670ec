"""Why ``aqua bench``'s page rows measure ~10% slower than the sweeps' harness (session 8): the same steps (dense SDPA,
pages by max on bf16 keys and on key planes, k=0.5 T=L/16) timed three ways on the same inputs, interleaved:

* ``bench``: ``aqua_cli.bench.time_us`` as ``aqua bench`` calls it (one step per CUDA graph, each replay timed on its
  own with events, median of 20), on ``aqua bench``'s inputs (one set per 256 MB, so one set at batch 8 x 32K);
* ``bench-2sets``: the same timing over two input sets (a graph of two steps, halved);
* ``graph8``: ``time_us`` of a graph of 8 steps over two sets, divided by 8 (the graph's own launch spread over 8);
* ``cudagraph``: ``triton.testing.do_bench_cudagraph`` over two sets (the sweeps' ``us``: 80 ms of replays, mean);

each with no forced pages (``aqua bench``) and with 1 sink + 8 recent pages (the sweeps and the model's path).
Output: $OUT/harness.json

    PYTHONPATH=$PWD OUT=docs/results/sweeps python3 scripts/sweeps/harness.py   (GPU)
"""
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _shared import PROJ as proj, us  # noqa: E402
from aqua_cli.bench import _decode_inputs, time_us  # noqa: E402
from aqua_cli.kernels import decode as dk  # noqa: E402
from aqua_cli.kernels.reference import dense_decode  # noqa: E402
from aqua_cli.models import PRESETS  # noqa: E402

dev = torch.device("cuda")
shape = PRESETS["llama-3.1-8b"]
cfg = dk.DecodeConfig(64, token_ratio=1 / 16, granularity="pages")


def steps(forced: tuple[int, int]):
    sink, recent = forced
    return {
        "dense": lambda x: dense_decode(x.q, x.k, x.v),
        "pages": lambda x: dk.aqua_decode(x.q, None, x.v, x.kd, proj, cfg, sink_pages=sink, recent_pages=recent),
        "planes": lambda x: dk.aqua_decode(x.q, None, x.v, x.planes, proj, cfg, sink_pages=sink, recent_pages=recent),
    }


def timed(method: str, fn, sets) -> float:
    if method == "bench":
        return time_us(lambda: fn(sets[0]), dev, 3, 20)
    if method == "bench-2sets":
        return time_us(lambda: [fn(x) for x in sets], dev, 3, 20) / len(sets)
    if method == "graph8":
        return time_us(lambda: [fn(sets[i % len(sets)]) for i in range(8)], dev, 3, 20) / 8
    return us(lambda: [fn(x) for x in sets]) / len(sets)


METHODS = ("bench", "bench-2sets", "graph8", "cudagraph")
rows = []
for B, L in [(8, 32768), (1, 32768), (1, 131072)]:
    sets = _decode_inputs(shape, B, L, proj, torch.bfloat16, dev, 2)
    res: dict = {}
    for rep in range(3):
        for forced in ((0, 0), (1, 8)):
            for name, fn in steps(forced).items():
                if name == "dense" and forced != (0, 0):
                    continue
                for method in METHODS:
                    res.setdefault((name, forced, method), []).append(timed(method, fn, sets))
    for (name, forced, method), ts in res.items():
        dense = statistics.median(res[("dense", (0, 0), method)])
        r = dict(batch=B, seq=L, step=name, sink_recent=list(forced), method=method, us_median=statistics.median(ts), us_all=ts,
                 x=dense / statistics.median(ts), device=torch.cuda.get_device_name())
        rows.append(r)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k not in ("us_all", "device")}, flush=True)
    del sets
    torch.cuda.empty_cache()
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "harness.json"), "w"), indent=1)
