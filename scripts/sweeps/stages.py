"""Per-stage timings of the page top-T decode step at B1 x 128K / 32K and B8 x 32K (dim selection, page scoring, page selection at two tile widths, exact pass + combine) and launch variants of the exact (full-dim) fallback at B1 4K-16K and B8 4K. Output: docs/results/sweeps/stages-h100.json

    PYTHONPATH=$PWD OUT=docs/results/sweeps python3 scripts/sweeps/stages.py   (GPU; writes its JSON to $OUT)

H100 sweep of session 4 (docs/bench.md, 'What was tried'); the file names in $OUT drop the -h100 suffix.
Ran on the working tree just before commit 1dd52c8 (free-width page selection, FAN/ITERS parameters and the k = D shortcut of the dim selection already in).
"""
# ruff: noqa: F821, F401, E731, E702  (a sweep as it ran: timed lambdas run before their inputs are deleted)
import json, os, sys, itertools
import torch, triton
from aqua_cli.kernels import decode as dk
from aqua_cli.kernels.reference import project_keys, dense_decode
from aqua_cli.kernels.paged import pages_for, n_forced
from aqua_cli.bench import random_projection

dev = torch.device("cuda")
out_rows = []
gen = torch.Generator().manual_seed(0)
proj = random_projection(8, 128, gen).to(dev)
SHAPES = [(1, 131073), (1, 32769), (8, 32769)] if len(sys.argv) < 2 else [tuple(map(int, a.split("x"))) for a in sys.argv[1:]]
FALLBACK = [(1, 4097), (1, 8193), (1, 16385), (8, 4097)]


def us(f, rep=60):
    return triton.testing.do_bench_cudagraph(f, rep=rep) * 1e3


def row(**kw):
    out_rows.append(kw)
    print(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in kw.items()), flush=True)


def inputs(B, L, page=64):
    q = torch.randn(B, 32, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(B, 8, L, 128, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    cap = page * -(-L // page)
    kdb = torch.zeros(B, 8, 128, cap, device=dev, dtype=torch.bfloat16)
    kdb[..., :L] = project_keys(k, proj).to(torch.bfloat16)
    vb = torch.zeros(B, 8, cap, 128, device=dev, dtype=torch.bfloat16)
    vb[:, :, :L] = v
    return q, k, v, kdb[..., :L], vb[:, :, :L]


for B, L in SHAPES:
    q, k, v, kd, vv = inputs(B, L)
    dense = us(lambda: dense_decode(q, k, v))
    row(shape=f"B{B}xL{L}", stage="dense", t=dense)
    cfg = dk.DecodeConfig(64, token_ratio=1 / 16, granularity="pages", page=64)
    full = us(lambda: dk.aqua_decode(q, None, vv, kd, proj, cfg, sink_pages=1, recent_pages=8))
    row(shape=f"B{B}xL{L}", stage="pages-total-default", t=full, x=dense / full)
    del k, v
    qf = torch.empty(B * 8, 4, 128, device=dev, dtype=torch.bfloat16)
    for warps, (fan, iters) in itertools.product((2, 4, 8), ((32, 7), (64, 6), (128, 5), (16, 8))):
        t = us(lambda: dk.launch_select_dims(q, proj, 64, qf, num_warps=warps, fan=fan, iters=iters))
        row(shape=f"B{B}xL{L}", stage="select-dims", warps=warps, fan=fan, iters=iters, t=t)
    t = us(lambda: dk.launch_select_dims(q, proj, 128, qf))
    row(shape=f"B{B}xL{L}", stage="select-dims-ALL", t=t)
    for sb, warps, stages, waves in itertools.product((256, 512), (4, 8), (3, 4), (4.0, 8.0)):
        t = us(lambda: dk.launch_page_scores(q, proj, kd, 64, 64, L, sb, warps, stages, waves))
        row(shape=f"B{B}xL{L}", stage="scores(+sel)", sb=sb, warps=warps, stages=stages, waves=waves, t=t)
    pscores, qf2 = dk.launch_page_scores(q, proj, kd, 64, 64, L)
    NP = -(-L // 64)
    n_sel = min(NP, pages_for(1 / 16, L, 64) + n_forced(NP, 1, 8))
    chosen = torch.empty(B * 8, n_sel, device=dev, dtype=torch.int32)
    nfull = torch.empty(B * 8, device=dev, dtype=torch.int32)
    for npp in sorted({dk.select_width(NP, 1, 8), max(16, dk._pow2(NP))}):
        for warps in (4, 8, 16):
            t = us(lambda: dk._page_select_kernel[(B * 8,)](pscores, chosen, nfull, NP, n_sel, L, 1, 8, PAGE=64, NPP=npp, num_warps=warps))
            row(shape=f"B{B}xL{L}", stage="select-pages", npp=npp, warps=warps, t=t)
    dk._page_select_kernel[(B * 8,)](pscores, chosen, nfull, NP, n_sel, L, 1, 8, PAGE=64, NPP=dk.select_width(NP, 1, 8), num_warps=8)
    s_kb, s_kh, s_kp, s_kd, _ = dk.kd_layout(kd, 64)
    s_vb, s_vh, s_vl = dk._v_rows(vv, 64)
    for aw, warps, stages in itertools.product((1.0, 2.0, 4.0, 8.0), (4, 8), (2, 3)):
        splits2 = max(1, min(n_sel, -(-int(aw * dk._sms(dev)) // (B * 8))))
        per2 = -(-n_sel // splits2)
        splits2 = -(-n_sel // per2)
        o, m, ls = dk._partials(B * 8, splits2, 4, 128, dev)

        def attend():
            dk._page_attend_kernel[(B * 8, splits2)](
                qf2, chosen, nfull, kd, vv, o, m, ls, L, n_sel, per2, 8, 0.1,
                s_kb, s_kh, s_kp, s_kd, s_vb, s_vh, s_vl, G=4, GP=16, D=128, PAGE=64, num_warps=warps, num_stages=stages)
            dk._combine(o, m, ls, B, 32, 128, torch.bfloat16)
        t = us(attend)
        row(shape=f"B{B}xL{L}", stage="attend+combine", aw=aw, warps=warps, stages=stages, splits=splits2, t=t)
    del q, kd, vv
    torch.cuda.empty_cache()

for B, L in FALLBACK:
    q, k, v, kd, vv = inputs(B, L)
    dense = us(lambda: dense_decode(q, k, v))
    row(shape=f"B{B}xL{L}", stage="dense", t=dense)
    for dims in (128, 127, 64):
        cfg = dk.DecodeConfig(dims)
        t = us(lambda: dk.aqua_decode(q, None, vv, kd, proj, cfg))
        row(shape=f"B{B}xL{L}", stage=f"dims{dims}-total", t=t, x=dense / t)
    for bn, warps, stages, waves in itertools.product((64, 128), (4, 8), (3, 4), (2.0, 4.0, 8.0)):
        cfg = dk.DecodeConfig(128, block_n=bn, num_warps=warps, num_stages=stages, waves=waves)
        t = us(lambda: dk.aqua_decode(q, None, vv, kd, proj, cfg))
        row(shape=f"B{B}xL{L}", stage="exact-variant", bn=bn, warps=warps, stages=stages, waves=waves, t=t, x=dense / t)
    del q, k, v, kd, vv
    torch.cuda.empty_cache()

json.dump(out_rows, open(os.path.join(os.environ.get("OUT", "."), "stages.json"), "w"), indent=1)
