"""One decode step per case under Nsight Compute, for each launch's duration, DRAM throughput and occupancy
(session 8): pages by max on key planes and on bf16 keys (k=0.5 T=L/16, 1 sink + 8 recent pages) and dense SDPA,
at batch 8 x 32K and batch 1 x 32K. Compilation and warm-up run before ``cudaProfilerStart``, so only the
profiled steps are captured (ncu times each launch alone: no overlap between launches, no graph).

    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section Occupancy --section LaunchStats \\
        --csv --page details python3 scripts/sweeps/profile_step.py > $OUT/ncu.csv   (GPU)

The CSV lists the launches in the order of ``cases`` (the case names go to stderr)."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _shared import PROJ as proj  # noqa: E402
from aqua_cli.kernels import decode as dk  # noqa: E402
from aqua_cli.kernels.reference import dense_decode, key_planes, project_keys  # noqa: E402

cfg = dk.DecodeConfig(64, token_ratio=1 / 16, granularity="pages")
cases = []
for B, L in [(8, 32768), (1, 32768)]:
    q = torch.randn(B, 32, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, 8, L, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    kd = project_keys(k, proj).to(torch.bfloat16)
    kp = key_planes(kd)
    cases += [
        (f"B{B}xL{L} planes", lambda q=q, v=v, kp=kp: dk.aqua_decode(q, None, v, kp, proj, cfg, sink_pages=1, recent_pages=8)),
        (f"B{B}xL{L} pages", lambda q=q, v=v, kd=kd: dk.aqua_decode(q, None, v, kd, proj, cfg, sink_pages=1, recent_pages=8)),
        (f"B{B}xL{L} dense", lambda q=q, k=k, v=v: dense_decode(q, k, v)),
    ]
for _, fn in cases:
    for _ in range(3):
        fn()
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStart()
for name, fn in cases:
    torch.cuda.nvtx.range_push(name)
    fn()
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_pop()
torch.cuda.cudart().cudaProfilerStop()
print("cases:", [n for n, _ in cases], file=sys.stderr)
