"""Dim selection (bitonic sort vs FAN-ary search, warps), page totals with exact-pass variants, and dims-kernel launch variants at k = 64 and k = D. Output: docs/results/sweeps/stages2-h100.json

    PYTHONPATH=$PWD OUT=docs/results/sweeps python3 scripts/sweeps/stages2.py   (GPU; writes its JSON to $OUT)

H100 sweep of session 4 (docs/bench.md, 'What was tried'); the file names in $OUT drop the -h100 suffix.
Ran on the working tree just before commit 1dd52c8 with a `fan=0` bitonic-sort variant of the dim selection (`tl.sort` of packed int64 keys) that was measured no faster and removed before the commit; with today's code the fan=0 rows raise and print ERR.
"""
# ruff: noqa: F821, F401, E731, E702  (a sweep as it ran: timed lambdas run before their inputs are deleted)
import json, os, itertools
import torch, triton
from aqua_cli.kernels import decode as dk
from aqua_cli.kernels.reference import project_keys, dense_decode
from aqua_cli.bench import random_projection

dev = torch.device("cuda")
rows = []
proj = random_projection(8, 128, torch.Generator().manual_seed(0)).to(dev)
us = lambda f: triton.testing.do_bench_cudagraph(f, rep=60) * 1e3
def row(**kw):
    rows.append(kw); print(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in kw.items()), flush=True)
def inputs(B, L, page=64):
    q = torch.randn(B, 32, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(B, 8, L, 128, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    cap = page * -(-L // page)
    kdb = torch.zeros(B, 8, 128, cap, device=dev, dtype=torch.bfloat16); kdb[..., :L] = project_keys(k, proj).to(torch.bfloat16)
    vb = torch.zeros(B, 8, cap, 128, device=dev, dtype=torch.bfloat16); vb[:, :, :L] = v
    return q, k, v, kdb[..., :L], vb[:, :, :L]
for B, L in [(1, 131073), (8, 32769), (1, 32769), (1, 4097), (1, 8193), (1, 16385)]:
    q, k, v, kd, vv = inputs(B, L); sh = f"B{B}xL{L}"
    dense = us(lambda: dense_decode(q, k, v)); row(shape=sh, stage="dense", t=dense)
    del k, v
    qf = torch.empty(B * 8, 4, 128, device=dev, dtype=torch.bfloat16)
    for fan, iters, warps in [(0, 0, 1), (0, 0, 2), (0, 0, 4), (0, 0, 8), (32, 7, 4), (16, 8, 4)]:
        try:
            t = us(lambda: dk.launch_select_dims(q, proj, 64, qf, num_warps=warps, fan=fan, iters=iters or None))
        except Exception as e:
            print("ERR", fan, warps, repr(e)[:300]); t = float("nan")
        row(shape=sh, stage="select-dims", fan=fan, iters=iters, warps=warps, t=t)
    for fan in (32, 0):
        dk.DIM_FAN = fan
        for name, cfg in [("pages-default", dk.DecodeConfig(64, token_ratio=1 / 16, granularity="pages")),
                          ("pages-aw4s3", dk.DecodeConfig(64, token_ratio=1 / 16, granularity="pages", attend_waves=4.0, attend_stages=3)),
                          ("pages-aw2s3", dk.DecodeConfig(64, token_ratio=1 / 16, granularity="pages", attend_stages=3)),
                          ("dims-default", dk.DecodeConfig(64))]:
            try:
                t = us(lambda: dk.aqua_decode(q, None, vv, kd, proj, cfg, sink_pages=1, recent_pages=8))
            except Exception as e:
                print("ERR", name, repr(e)[:300]); t = float("nan")
            row(shape=sh, stage=name, fan=fan, t=t, x=dense / t)
    dk.DIM_FAN = 32
    for bn, warps, stages, waves in itertools.product((64, 128), (4, 8), (3, 4), (2.0, 4.0, 8.0)):
        for dims in (64, 128):
            cfg = dk.DecodeConfig(dims, block_n=bn, num_warps=warps, num_stages=stages, waves=waves)
            t = us(lambda: dk.aqua_decode(q, None, vv, kd, proj, cfg))
            row(shape=sh, stage=f"dims{dims}-variant", bn=bn, warps=warps, stages=stages, waves=waves, t=t, x=dense / t)
    del q, kd, vv; torch.cuda.empty_cache()
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "stages2.json"), "w"), indent=1)
