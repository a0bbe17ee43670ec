"""Why dense SDPA slowed by 14-18% in one ``aqua bench`` run (session 7): the same dense step timed on plain inputs,
on ``aqua bench``'s inputs, after building key planes through float32 temporaries of the whole key tensor (as the
first version of the bench's planes did), and on fresh copies of the same K and V. Output: $OUT/dense_alloc.json

    PYTHONPATH=$PWD OUT=docs/results/sweeps python3 scripts/sweeps/dense_alloc.py   (GPU)
"""
# ruff: noqa: E731, F821  (timed lambdas run before their inputs are deleted)
import json
import os

import torch

from aqua_cli.bench import _decode_inputs, random_projection, time_us
from aqua_cli.kernels.reference import dense_decode, key_planes
from aqua_cli.models import AttnShape

dev = torch.device("cuda")
shape = AttnShape("llama-3.1-8b", 32, 8, 128, 32)
proj = random_projection(8, 128, torch.Generator().manual_seed(0)).to(dev)
rows = []


def row(batch, seq, case, fn):
    rows.append(dict(batch=batch, seq=seq, case=case, dense_us=time_us(fn, dev, 3, 20), device=torch.cuda.get_device_name()))
    print(rows[-1], flush=True)


for B, L in [(8, 32768), (1, 131072)]:
    q = torch.randn(B, 32, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(B, 8, L, 128, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    row(B, L, "plain", lambda: dense_decode(q, k, v))
    del q, k, v
    x = _decode_inputs(shape, B, L, proj, torch.bfloat16, dev, 1)[0]
    row(B, L, "bench inputs", lambda: dense_decode(x.q, x.k, x.v))
    old = key_planes((x.k.float() @ proj[None]).transpose(-1, -2).contiguous())
    row(B, L, "after float32 temporaries", lambda: dense_decode(x.q, x.k, x.v))
    k2, v2 = x.k.clone(), x.v.clone()
    row(B, L, "fresh copies of k, v", lambda: dense_decode(x.q, k2, v2))
    del x, old, k2, v2
    torch.cuda.empty_cache()
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "dense_alloc.json"), "w"), indent=1)
