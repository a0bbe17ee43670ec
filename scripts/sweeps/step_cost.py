"""Where the batch-8 dims step's time goes beyond its bytes, and what might take it back (session 10; prepared
without a GPU, to be run in one call). Three parts, each written to the JSON as it ends:

1. **Timeline.** The selection and the balanced stream launch, copied here with global-timer stamps (``_select_ts``,
   ``_stream_ts``: start, after the PDL wait, after qP, after the search, end; per stream program: start, released,
   blocks done, merged, and its SM), one step of a CUDA graph of five read back: the gap from the last selection
   program to the first released stream program, the spread of the stream programs' ends (the tail), and how many SMs
   the 131 programs used (fewer than 131: two programs shared an SM, which 106 KB of shared memory allows).
   Variants: the selection triggering the stream launch at its start (PDL mode 1) with the default 256-token x
   2-stage stream, 128 x 3, and 256 x 3 (202 KB: one stream program an SM, a selection program still fits beside).
2. **Launch variants the offline compile points at** (``scripts/kernel_resources.py``,
   docs/results/kernel-resources-sm90.json, Triton 3.6 as on the H100 image): at k=0.75 the stream kernel takes 255
   registers and spills 64 bytes a thread (none at 8 warps or 128-token steps); at k=0.5 two programs fit an SM
   (256 x 3 forces one); at batch 1 k=0.75 the split kernel's 136 KB allow one program an SM, so the 2-per-SM split
   count runs two waves (``waves=1``); the page scoring launch on key planes rounds its split count up to 576 programs
   where 528 fit at once (``score_waves``). Whole steps through ``aqua_decode``, next to dense SDPA over the same sets.
3. **The selection's parts**, alone and in front of the stream launch: a probe kernel (``_select_probe``) is the
   library's scatter-store selection without the cache write, with switches: ``TERMS`` of the split projection in
   qP (3 = the library's; 2 = hi + mid, P to ~2^-17, far under q's bf16 rounding, checked against the library's
   selection; 1; 0 = no dot), ``SEARCH`` (off: the first K dims kept), ``CK`` (rows of P a load) and warps. Rows
   with a term or the search taken out compute something else: they measure cost, they are not candidates. Also the
   stream launch alone on selections made beforehand and with an empty launch in front (the bare boundary).

Llama-3.1-8B attention shape, bf16, k = 64 and 96, CUDA-graph replays over two input sets, 3 interleaved repeats,
medians. Output: $OUT/step_cost.json

    PYTHONPATH=$PWD OUT=docs/results/sweeps python3 scripts/sweeps/step_cost.py   (GPU, compute capability >= 9)
"""
# ruff: noqa: E731, F821  (timed lambdas run before their inputs are deleted, as in the other sweeps)
import json
import os
import statistics
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _shared import PROJ as proj, input_sets, us  # noqa: E402
from aqua_cli.bench import _rel_err as rel  # noqa: E402
from aqua_cli.kernels import decode as dk  # noqa: E402
from aqua_cli.kernels.reference import key_planes  # noqa: E402
from aqua_cli.kernels.decode import (_gdc, _gdc_late, _group_qp, _scatter_selection, _stream_segment,  # noqa: E402
                                     _top_dims)

SCALE = 128 ** -0.5


@triton.jit
def _select_probe(Q, PS, QSEL, IDX, CNT, HKV, K, G: tl.constexpr, GP: tl.constexpr, KP: tl.constexpr,
                  D: tl.constexpr, CK: tl.constexpr, FAN: tl.constexpr, ITERS: tl.constexpr, TERMS: tl.constexpr,
                  SEARCH: tl.constexpr, GDC: tl.constexpr):
    _gdc(GDC)
    bh = tl.program_id(0)
    h = bh % HKV
    offs_d = tl.arange(0, D)
    qpq, _ = _group_qp(Q, PS, bh, h, HKV, G, GP, D, CK, Q, 0, False, TERMS)
    if SEARCH:
        keep, slot = _top_dims(qpq, K, FAN, ITERS)
    else:
        keep = offs_d < K
        slot = offs_d
    _scatter_selection(QSEL, IDX, bh, qpq, keep, slot, K, G, GP, KP, D)
    _gdc_late(GDC)
    tl.store(CNT + bh, K)


@triton.jit
def _empty(X, GDC: tl.constexpr):
    _gdc(GDC)
    _gdc_late(GDC)
    tl.store(X + tl.program_id(0), 0)


@triton.jit
def _stamp(TS, slot, dep):
    """The global time (ns) at ``slot`` of this program's row of ``TS`` (int64, 8 a row; the SM in slot 7), read
    once ``dep`` (an int32 scalar) is computed: the timer read takes it as an operand, so it cannot move before it."""
    now = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [dep], dtype=tl.int64, is_pure=False, pack=1)
    tl.store(TS + slot, now)
    tl.store(TS + 7, tl.extra.cuda.smid().to(tl.int64))


@triton.jit
def _select_ts(Q, PS, QSEL, IDX, CNT, TS, HKV, K, G: tl.constexpr, GP: tl.constexpr, KP: tl.constexpr,
               D: tl.constexpr, CK: tl.constexpr, FAN: tl.constexpr, ITERS: tl.constexpr, TERMS: tl.constexpr,
               GDC: tl.constexpr):
    """``_select_probe`` (with the search) stamped: start, after the PDL wait, after qP, after the search, end."""
    ts = TS + tl.program_id(0) * 8
    _stamp(ts, 0, tl.program_id(0))
    _gdc(GDC)
    _stamp(ts, 1, tl.program_id(0))
    bh = tl.program_id(0)
    h = bh % HKV
    qpq, _ = _group_qp(Q, PS, bh, h, HKV, G, GP, D, CK, Q, 0, False, TERMS)
    _stamp(ts, 2, tl.sum(qpq.to(tl.float32)).to(tl.int32, bitcast=True))
    keep, slot = _top_dims(qpq, K, FAN, ITERS)
    _stamp(ts, 3, tl.sum(slot))
    _scatter_selection(QSEL, IDX, bh, qpq, keep, slot, K, G, GP, KP, D)
    _gdc_late(GDC)
    tl.store(CNT + bh, K)
    _stamp(ts, 4, tl.sum(slot))


@triton.jit
def _stream_ts(Q, IDX, CNT, KD, V, O, M, LS, CNTR, OUT, TS, L, NB, W, TOTAL, HKV, S, qk_scale,
               s_kb, s_kh, s_kd, s_vb, s_vh, s_vl, G: tl.constexpr, GP: tl.constexpr, KP: tl.constexpr,
               D: tl.constexpr, BLOCK_N: tl.constexpr, FULL_ROWS: tl.constexpr, GDC: tl.constexpr):
    """``_dims_stream_kernel`` (bf16 keys, merge in the launch) stamped: start, after the PDL wait, after each
    segment (its blocks, its partial stored, the group merged if this program came last: slots 2-4), at the end (5)."""
    pid = tl.program_id(0)
    ts = TS + pid * 8
    _stamp(ts, 0, pid)
    _gdc(GDC)
    _stamp(ts, 1, pid)
    g0 = pid * W
    g1 = tl.minimum(g0 + W, TOTAL)
    bh0 = g0 // NB
    nseg = (g1 - 1) // NB - bh0 + 1
    for seg in range(0, nseg):
        l_i = _stream_segment(Q, IDX, CNT, KD, V, O, M, LS, CNTR, OUT, pid, bh0 + seg, g0, g1, L, NB, W, HKV, S, qk_scale,
                              s_kb, s_kh, s_kd, s_vb, s_vh, s_vl, G, GP, KP, D, BLOCK_N, FULL_ROWS, False, True)
        _stamp(ts, 2 + tl.minimum(seg, 2), tl.sum(l_i).to(tl.int32, bitcast=True))
    _gdc_late(GDC)
    _stamp(ts, 5, nseg)


def timeline(q, kd, v, dims, terms=3, early=False, block=256, stages=2, reps=5):
    """The stamped selection then the stamped stream launch, captured as a CUDA graph of ``reps`` steps (the last
    one read): times in microseconds from the selection's first program's start."""
    batch, q_heads, dim = q.shape
    groups = proj.shape[0]
    rep = q_heads // groups
    KP = dk._kp(dims)
    bhk = batch * groups
    length = kd.shape[-1]
    qsel = torch.empty(bhk, rep, KP, device=q.device, dtype=q.dtype)
    idx = torch.empty(bhk, KP, device=q.device, dtype=torch.int32)
    cnt = torch.empty(bhk, device=q.device, dtype=torch.int32)
    nb, w, programs, slots = dk.stream_layout(bhk, length, block, dk._sms(q.device))
    o, m, ls = dk._partials(bhk, slots, rep, dim, q.device)
    out = torch.empty(batch, q_heads, dim, device=q.device, dtype=v.dtype)
    ts_sel = torch.zeros(bhk, 8, device=q.device, dtype=torch.int64)
    ts_str = torch.zeros(programs, 8, device=q.device, dtype=torch.int64)

    def step():
        _select_ts[(bhk,)](q, dk._proj_split(proj), qsel, idx, cnt, ts_sel, groups, dims, G=rep, GP=dk._gp(rep), KP=KP,
                           D=dim, CK=64, FAN=dk.DIM_FAN, ITERS=dk.DIM_ITERS, TERMS=terms, GDC=1 if early else 2,
                           launch_pdl=True)
        _stream_ts[(programs,)](qsel, idx, cnt, kd, v, o, m, ls, dk._counters(bhk, q.device), out, ts_str, length, nb, w,
                                bhk * nb, groups, slots, SCALE * dk.LOG2E, kd.stride(0), kd.stride(1), kd.stride(2),
                                v.stride(0), v.stride(1), v.stride(2), G=rep, GP=dk._gp(rep), KP=KP, D=dim, BLOCK_N=block,
                                FULL_ROWS=dims == KP, GDC=2, launch_pdl=True, num_warps=4, num_stages=stages)
    step()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            step()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    t0 = int(ts_sel[:, 0].min())
    a, b = ((ts_sel.cpu() - t0) / 1e3), ((ts_str.cpu() - t0) / 1e3)

    def q_(x):
        x = x.float()
        return [round(float(x.min()), 2), round(float(x.median()), 2), round(float(x.max()), 2)]
    segs = b[:, 2:5].clone()
    last = torch.where(ts_str[:, 4].cpu() > 0, segs[:, 2], torch.where(ts_str[:, 3].cpu() > 0, segs[:, 1], segs[:, 0]))
    return dict(select_start=q_(a[:, 0]), select_released=q_(a[:, 1]), select_qp_done=q_(a[:, 2]),
                select_search_done=q_(a[:, 3]), select_end=q_(a[:, 4]), stream_start=q_(b[:, 0]),
                stream_released=q_(b[:, 1]), stream_segments_done=q_(last), stream_end=q_(b[:, 5]),
                stream_smids=len(set(ts_str[:, 7].tolist())), programs=programs,
                out_err=rel(out, dk.launch_dims_stream(dk.launch_select_dims(q, proj, dims), kd, v, SCALE,
                                                       full_rows=dims == KP)))


def probe(q, dims, terms=3, search=True, ck=64, warps=4, early=False):
    batch, q_heads, dim = q.shape
    groups = proj.shape[0]
    rep = q_heads // groups
    KP = dk._kp(dims)
    qsel = torch.empty(batch * groups, rep, KP, device=q.device, dtype=q.dtype)
    idx = torch.empty(batch * groups, KP, device=q.device, dtype=torch.int32)
    cnt = torch.empty(batch * groups, device=q.device, dtype=torch.int32)
    _select_probe[(batch * groups,)](q, dk._proj_split(proj), qsel, idx, cnt, groups, dims, G=rep, GP=dk._gp(rep),
                                     KP=KP, D=dim, CK=ck, FAN=dk.DIM_FAN, ITERS=dk.DIM_ITERS, TERMS=terms,
                                     SEARCH=search, GDC=1 if early else 2, launch_pdl=True, num_warps=warps)
    return qsel, idx, cnt


def stream(sel, kd, v, dims, block=256, stages=2):
    return dk.launch_dims_stream(sel, kd, v, SCALE, block, 4, stages, None, dims == dk._kp(dims))


def empty(x):
    _empty[(1,)](x, GDC=2, launch_pdl=True)


def select_variants(dims):
    lib = lambda q: dk.launch_select_dims(q, proj, dims)
    out = {"lib": lib, "t3": lambda q: probe(q, dims), "t2": lambda q: probe(q, dims, 2), "t1": lambda q: probe(q, dims, 1),
           "t3-nosearch": lambda q: probe(q, dims, 3, False), "t1-nosearch": lambda q: probe(q, dims, 1, False),
           "t0-nosearch": lambda q: probe(q, dims, 0, False), "t2-ck128": lambda q: probe(q, dims, 2, ck=128),
           "t2-ck32": lambda q: probe(q, dims, 2, ck=32), "t2-w8": lambda q: probe(q, dims, 2, warps=8),
           "t2-w2": lambda q: probe(q, dims, 2, warps=2)}
    return out


OUT = os.path.join(os.environ.get("OUT", "."), "step_cost.json")
result: dict = {"device": torch.cuda.get_device_name(), "triton": triton.__version__, "torch": torch.__version__}


def save() -> None:
    """Written after every part: a run stopped at its time limit keeps what it measured."""
    with open(OUT, "w") as f:
        json.dump(result, f, indent=1)


def timed_rows(batch: int, seq: int, dense: float, dims: int, fns: dict, checks: dict, reps: int = 3) -> list[dict]:
    """Each of ``fns`` (a step over the input sets) timed ``reps`` times interleaved; a row per name with the median."""
    times: dict = {}
    errors: dict = {}
    for _ in range(reps):
        for name, fn in fns.items():
            if name in errors:
                continue
            try:
                times.setdefault(name, []).append(us(fn[0]) / fn[1])
            except Exception as exc:  # a launch that does not fit is recorded, not fatal
                errors[name] = repr(exc)[:200]
    rows = []
    for name in fns:
        ts = times.get(name, [])
        med = statistics.median(ts) if ts else None
        r = dict(batch=batch, seq=seq, dims=dims, variant=name, dense_us=dense, us_median=med, us_all=ts,
                 x=dense / med if med else None, error=errors.get(name), **checks.get(name, {}))
        rows.append(r)
        print({k: (round(val, 4) if isinstance(val, float) else val) for k, val in r.items() if k != "us_all"}, flush=True)
    return rows


# -- part 1: the step's timeline at batch 8 x 32K (where the ~9 us between the stream launch alone and the step go) --
result["timelines"] = []
sets, _ = input_sets(8, 32768, 1)
q, _, v, kd = sets[0]
for dims in (64, 96):
    for name, kw in [("default", {}), ("terms2", dict(terms=2)), ("early", dict(early=True)),
                     ("s128x3", dict(block=128, stages=3)), ("early-s128x3", dict(early=True, block=128, stages=3)),
                     ("s256x3", dict(stages=3)), ("early-s256x3", dict(early=True, stages=3))]:
        try:
            r = dict(dims=dims, variant=name, **timeline(q, kd, v, dims, **kw))
        except Exception as exc:
            r = dict(dims=dims, variant=name, error=repr(exc)[:300])
        result["timelines"].append(r)
        print("timeline", r, flush=True)
del sets, q, v, kd
save()

# -- part 2: launch variants that the offline compile points at (docs/results/kernel-resources-sm90.json) ----------
# k=0.75 stream: 255 registers and 64 spilled bytes a thread at 4 warps (none at 8, or at 128-token steps);
# k=0.5 stream: 106 KB, so two programs fit on one SM (256 x 3 stages: 202 KB, one an SM, the selection beside it);
# batch 1 k=0.75 split: 136 KB, one program an SM, so the 2-per-SM split count runs two waves.
result["launch"] = []
for B, L, variants in [
    (8, 32768, {96: {"default": {}, "w8": dict(num_warps=8), "s128x2": dict(stream_block=128, num_stages=2),
                     "s128x3": dict(stream_block=128, num_stages=3), "s128x3-w8": dict(stream_block=128, num_stages=3, num_warps=8)},
                64: {"default": {}, "s256x3": dict(num_stages=3), "w8": dict(num_warps=8)}}),
    (8, 131072, {96: {"default": {}, "w8": dict(num_warps=8), "s128x3": dict(stream_block=128, num_stages=3)},
                 64: {"default": {}, "s256x3": dict(num_stages=3)}}),
    (1, 32768, {96: {"default": {}, "waves1": dict(waves=1.0), "w8": dict(num_warps=8), "waves1-w8": dict(waves=1.0, num_warps=8)},
                64: {"default": {}, "waves1": dict(waves=1.0)}}),
]:
    sets, dense = input_sets(B, L)
    for dims, vs in variants.items():
        q, _, v, kd = sets[0]
        base = dk.aqua_decode(q, None, v, kd, proj, dk.DecodeConfig(dims))
        fns, checks = {}, {}
        for name, kw in vs.items():
            cfg = dk.DecodeConfig(dims, **kw)
            try:
                checks[name] = dict(err_vs_default=rel(dk.aqua_decode(q, None, v, kd, proj, cfg), base))
            except Exception as exc:
                checks[name] = dict(err_vs_default=repr(exc)[:200])
                continue
            fns[name] = (lambda cfg=cfg: [dk.aqua_decode(q, None, v, kd, proj, cfg) for q, _, v, kd in sets], len(sets))
        result["launch"] += timed_rows(B, L, dense, dims, fns, checks)
    del sets, q, v, kd
    torch.cuda.empty_cache()
    save()

# page top-T on key planes (k=0.5, T=L/16): the scoring launch's split count rounds up past the SMs' room
# (64 KV groups x 9 splits = 576 programs where 4 an SM fit: 528, so 48 run as a second wave); 8 splits fit in one
result["pages"] = []
for B, L in [(8, 32768)]:
    sets, dense = input_sets(B, L)
    planes = [key_planes(kd) for _, _, _, kd in sets]
    q, _, v, _ = sets[0]
    fns, checks = {}, {}
    base = None
    for name, kw in {"default": {}, "score-waves-3.85": dict(score_waves=3.85), "score-waves-3": dict(score_waves=3.0),
                     "score-waves-2": dict(score_waves=2.0)}.items():
        cfg = dk.DecodeConfig(64, token_ratio=1 / 16, granularity="pages", page=64, **kw)
        out = dk.aqua_decode(q, None, v, planes[0], proj, cfg)
        base = out if base is None else base
        checks[name] = dict(err_vs_default=rel(out, base))
        fns[name] = (lambda cfg=cfg: [dk.aqua_decode(q, None, v, p, proj, cfg) for (q, _, v, _), p in zip(sets, planes)],
                     len(sets))
    result["pages"] += timed_rows(B, L, dense, 64, fns, checks)
    del sets, planes, q, v
    torch.cuda.empty_cache()
    save()

# -- part 3: the selection's parts, alone and in front of the stream launch ----------------------------------------
result["select"] = []
for B, L in [(8, 32768), (1, 32768)]:
    sets, dense = input_sets(B, L)
    x = torch.zeros(8, device="cuda", dtype=torch.int32)
    for dims in (64, 96):
        sv = select_variants(dims)
        q, _, v, kd = sets[0]
        base_sel = dk.launch_select_dims(q, proj, dims)
        ref = dk.launch_dims_stream(base_sel, kd, v, SCALE, full_rows=dims == 64)
        checks = {}
        for name, fn in sv.items():  # the selection's agreement with the library's, and the step's output
            s = fn(q)
            check = dict(same_dims=bool(torch.equal(s[1], base_sel[1])), qsel_err=rel(s[0], base_sel[0]),
                         step_err=rel(stream(s, kd, v, dims), ref) if B == 8 else None)
            checks[f"alone-{name}"] = checks[f"seq-{name}"] = check
        n = len(sets)
        fns = {f"alone-{name}": (lambda fn=fn: [fn(q) for q, *_ in sets], n) for name, fn in sv.items()}
        fns["alone-empty"] = (lambda: [empty(x) for _ in sets], n)
        if B == 8:
            sels = [dk.launch_select_dims(q, proj, dims) for q, *_ in sets]
            fns.update({f"seq-{name}": (lambda fn=fn: [stream(fn(q), kd, v, dims) for q, _, v, kd in sets], n)
                        for name, fn in sv.items()})
            fns["stream-only"] = (lambda: [stream(s, kd, v, dims) for s, (q, _, v, kd) in zip(sels, sets)], n)
            fns["stream-empty"] = (lambda: [(empty(x), stream(s, kd, v, dims)) for s, (q, _, v, kd) in zip(sels, sets)], n)
            fns["seq-t3early"] = (lambda: [stream(probe(q, dims, early=True), kd, v, dims) for q, _, v, kd in sets], n)
        result["select"] += timed_rows(B, L, dense, dims, fns, checks)
    del sets, q, v, kd
    torch.cuda.empty_cache()
    save()
print("wrote", OUT)
