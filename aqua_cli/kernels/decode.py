"""Fused AQUA decode kernels (Triton): kernels first, then launchers, then the API.

Decode attention reads the whole KV cache once per step, so it is bound by memory traffic. The only way
AQUA pays is to *read fewer bytes*.

Cache layout the kernels read (what the projected KV cache should store)
-----------------------------------------------------------------------
* **Keys: stored once, already projected** (``kP``, ``P`` the layer's orthogonal ``(D, D)`` projection per KV
  head), **dimension-major within a page**. Token ``t = p * PAGE + j`` of projected dim ``d`` sits at
  ``base(b, h) + p * s_kp + d * s_kd + j`` (``kd_layout``). Two concrete layouts satisfy this:

  - contiguous rows ``(B, Hkv, D, L)`` (``reference.project_keys``): ``s_kp = PAGE``, ``s_kd = L`` (capacity);
  - paged ``(B, Hkv, NP, D, PAGE)``: ``s_kp = D * PAGE``, ``s_kd = PAGE`` -- a page is one contiguous
    ``D x PAGE`` block, so appending a token touches one page and the cache can grow page by page.

  A selected dimension is a contiguous run of ``PAGE`` (or ``L``) values: reading ``k`` of ``D`` dims reads
  ``k / D`` of the key bytes, coalesced. A chosen page is ``D`` runs of ``PAGE`` tokens: the exact top-T pass
  reads the *same* projected keys (``q.k = (qP).(kP)`` for orthogonal ``P``), so no token-major copy of the
  keys is kept.
* **Or keys in two byte planes** (``reference.key_planes``, uint8, ``2D`` rows): the float16 key's rounded high
  byte (an fp8 e5m2 value) in rows ``[0, D)``, its signed low byte in rows ``[D, 2D)``, same strides. Page scoring
  reads the high plane only (half the bytes); the exact pass and the dims kernel join both (``PLANES``).
* **Values: token-major** ``(B, Hkv, L, D)``, or paged ``(B, Hkv, NP, PAGE, D)`` with a head's pages adjacent.
* Only the token top-T path (``granularity="tokens"``) still reads a token-major ``k`` (gathering single
  tokens from dimension-major rows would read a 32-byte sector per 2-byte value).

Kernels
-------
* ``_select_dims_kernel`` (``_group_select``): per KV group, ``qP`` on the tensor cores (``P`` split in three
  bf16 terms: float32 accuracy), score ``sum_g |qP|``, the exact top ``k`` (search of the k-th value, ties to
  the lower index, no sort), the chosen columns written to their slots by a scatter store (the prologue of the
  fused kernels compacts them by a one-hot product instead). One program per (batch, KV head).
* ``_dims_split_kernel``: AQUA dims only. One program per (batch, KV head, split of the sequence), all
  ``G`` query heads of the group at once (GQA-packed, rows padded to 16 for ``tl.dot``): logits over the
  selected rows of ``kd``, online softmax, times ``v``; partial results per split (flash-decoding).
  ``_dims_fused_kernel`` is the same with the selection in its prologue (measured no faster).
  ``_dims_stream_kernel`` (from ``STREAM_MIN_GROUPS`` KV groups a step, ``dims_stream``): the same blocks dealt out
  as one sequence to about one program per SM (stream-K; a program's range may cross KV groups), the partials
  merged by each group's last program in the same launch (no combine launch).
* Page top-T (Quest-style granularity, ``paged.py`` is the reference): ``_page_score_kernel`` (approximate
  logits of whole pages on the selected dims, one max per page; only ``NP`` floats leave it),
  ``_page_select_kernel`` (the best pages per KV group, plus sink/recent pages; or folded into the scoring
  pass with ``fold_select``), ``_page_attend_kernel`` (exact attention over the chosen pages of ``kd`` and
  ``v``; partials per split).
* Token top-T: ``_score_select_kernel`` (per block of ``BLOCK_C`` tokens a threshold by bisection for the
  block's share) and ``_tokens_split_kernel`` (exact attention over token-major ``k``, ``v``).
* ``_combine_kernel``: merges the splits' partial softmax sums.

Launches per step: dims 3 (2 with the balanced kernel), pages 5, tokens 4; no host synchronisation (CUDA-graph capturable). On Hopper and
later they launch with programmatic dependent launch (``_gdc``, ``use_pdl``): each kernel's programs become resident
while the previous kernel finishes, and wait for its writes before touching memory.
Importing this module does not need Triton (the glue runs anywhere); launching a kernel does, and a CUDA GPU
(or ``TRITON_INTERPRET=1`` on the CPU, where dots run in float32).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

try:  # the pure-Python glue (configs, padding, byte counts) imports and runs without Triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None
    tl = None


def _jit(fn):
    """``triton.jit`` where Triton is installed; elsewhere the plain function (launching it raises)."""
    return triton.jit(fn) if triton is not None else fn


_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if triton is not None:
    _INTERPRET = tl.constexpr(_INTERPRET)


def _need_triton() -> None:
    if triton is None:
        raise RuntimeError("the fused AQUA kernels need the 'triton' package (pip install triton)")

from ..errors import ConfigError
from .reference import block_keep_for, is_planes, key_dim, key_planes, project_queries, select_dims

LOG2E = 1.4426950408889634
GROUP_PAD = 16  # tl.dot needs at least 16 rows
# the dim search: candidates a round, rounds (FAN**ITERS >= 2**31 covers the int32 keys); 16 x 8 measured
# 0.4-0.7 us faster than 32 x 7 on an H100, and a bitonic sort (tl.sort of packed int64 keys) no faster
DIM_FAN, DIM_ITERS = 16, 8
DIM_SCATTER = True  # the standalone selection writes its slots by a scatter store (7.9 -> 6.8 us alone at k=0.5, H100) instead of a one-hot product


# -- kernels ------------------------------------------------------------------------------------------
@_jit
def _dot(a, b):
    """``tl.dot``; under ``TRITON_INTERPRET=1`` in float32 (the CPU interpreter of Triton 3.9 computes
    bf16 x bf16 products wrongly; float32 products of bf16 values are exact, so results stay comparable)."""
    if _INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@_jit
def _dot_acc(a, b, acc):
    if _INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@_jit
def _gdc(GDC: tl.constexpr):
    """Programmatic dependent launch (Hopper and later; ``GDC`` > 0 only when launched with ``launch_pdl``): wait
    until the previous kernel's writes are visible. Called first in every kernel: no load or store precedes the
    wait, so overlapping kernels cannot race. ``GDC`` 1 also lets the next kernel's programs become resident now
    (its launch overlaps this whole kernel); 2 waits for ``_gdc_late`` (the launch overlaps only the epilogues)."""
    if GDC > 0:
        tl.extra.cuda.gdc_wait()
    if GDC == 1:
        tl.extra.cuda.gdc_launch_dependents()


@_jit
def _gdc_late(GDC: tl.constexpr):
    """The late trigger of ``_gdc`` mode 2, before a kernel's final stores."""
    if GDC == 2:
        tl.extra.cuda.gdc_launch_dependents()


@_jit
def _join_planes(hi, lo):
    """float16 keys from their two byte planes (``reference.key_planes``): bits = high * 256 + signed low."""
    bits = (hi.to(tl.int32) << 8) + lo.to(tl.int8, bitcast=True).to(tl.int32)
    return bits.to(tl.int16).to(tl.float16, bitcast=True)


@_jit
def _high_plane(hi):
    """float16 value of the high plane alone (an fp8 e5m2 value): what page scoring reads of planar keys."""
    return (hi.to(tl.int32) << 8).to(tl.int16).to(tl.float16, bitcast=True)


@_jit
def _split_planes(x):
    """float32 ``x``, already clamped to +-``reference.PLANE_MAX`` -> its (high, low) bytes as
    ``reference.key_planes`` writes them."""
    bits = x.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    mag = bits & 0x7FFF
    mag_hi = (mag + 128) >> 8
    hi = ((bits & 0x8000) >> 8) | mag_hi
    lo = mag - (mag_hi << 8)
    return hi.to(tl.uint8), lo.to(tl.int8).to(tl.uint8, bitcast=True)


@_jit
def _kth_key_pos(key, K, FAN: tl.constexpr, ITERS: tl.constexpr):
    """A threshold ``t`` on int32 keys in [0, 0x7f800000] (the bits of non-negative floats) with exactly K keys
    >= ``t`` and more than K > ``t`` never -- the K-th largest key, or any value between it and the next: int32
    arithmetic, candidates ``lo + j * ceil(width / FAN)``; ITERS rounds of FAN cover the range exactly. The search
    stops as soon as a candidate has exactly K keys at or above it (after 2-4 of the 8 rounds on typical scores)."""
    lo = tl.min(key, 0)
    hi = tl.max(key, 0) + 1
    frac = tl.arange(0, FAN) + 1
    n_lo = K + 1  # keys >= lo; > K until a round lands exactly on K (the value only steers the loop)
    it = 0
    while (it < ITERS) & (hi - lo > 1) & (n_lo != K):
        step = (hi - lo + FAN - 1) // FAN
        cand = tl.minimum(lo + step * frac, hi)
        cnt = tl.sum((key[None, :] >= cand[:, None]).to(tl.int32), 1)
        ok = cnt >= K
        new_lo = tl.max(tl.where(ok, cand, lo), 0)
        n_lo = tl.min(tl.where(ok, cnt, K + 1), 0)  # the count at new_lo when a candidate moved it
        hi = tl.min(tl.where(ok, hi, cand), 0)
        lo = new_lo
        it += 1
    return lo


@_jit
def _top_mask_pos(key, K, FAN: tl.constexpr, ITERS: tl.constexpr):
    """Keep-mask of the K largest non-negative int32 ``key`` (``_kth_key_pos``; exact ties to the lower index)
    and each kept entry's slot."""
    kth = _kth_key_pos(key, K, FAN, ITERS)
    gt = key > kth
    n_gt = tl.sum(gt.to(tl.int32), 0)
    eq = key == kth
    eq_pos = tl.cumsum(eq.to(tl.int32), 0) - 1
    keep = gt | (eq & (eq_pos < K - n_gt))
    pos = tl.cumsum(keep.to(tl.int32), 0) - 1
    return keep, pos


@_jit
def _group_select(Q, PS, bh, h, HKV, K, G: tl.constexpr, GP: tl.constexpr, KP: tl.constexpr, D: tl.constexpr,
                  CK: tl.constexpr, FAN: tl.constexpr, ITERS: tl.constexpr, ALL: tl.constexpr,
                  KN, kn_off, WRITE_KV: tl.constexpr):
    """Per-KV-group dim selection, in registers (the prologue of the fused kernels).

    qP on the tensor cores with ``P`` split in three bf16 terms (hi + mid + lo: float32 accuracy, the
    bf16 ``q`` is exact), rounded to q's dtype as the reference does; score ``sum_g |qP|`` in float32;
    the top K dims by ``_top_mask_pos`` (ties to the lower index), compacted by one-hot: ``idx`` ``(KP,)``
    ascending (0 past K) and ``qsel = qP @ onehot`` ``(GP, KP)`` (exact: one non-zero term).
    ``ALL`` (K == D == KP): every dim, no search (exact attention over the projected cache needs only qP).
    ``WRITE_KV``: the step's new key (``KN + kn_off``, D contiguous) rides in row G of the same products (GP > G),
    so its projection ``kP`` costs no extra dot. Returns (qP ``(GP, D)``, qsel, idx, kP ``(D,)`` float32)."""
    qpq, kp = _group_qp(Q, PS, bh, h, HKV, G, GP, D, CK, KN, kn_off, WRITE_KV)
    offs_d = tl.arange(0, D)
    if ALL:
        qsel = qpq
        idx = offs_d
    else:
        keep, pos = _top_dims(qpq, K, FAN, ITERS)
        offs_j = tl.arange(0, KP)
        hit = keep[None, :] & (pos[None, :] == offs_j[:, None])  # (KP, D)
        idx = tl.sum(tl.where(hit, offs_d[None, :], 0), 1)
        onehot = tl.trans(tl.where(hit, 1.0, 0.0).to(Q.dtype.element_ty))  # (D, KP)
        qsel = _dot(qpq, onehot).to(Q.dtype.element_ty)
    return qpq, qsel, idx, kp


@_jit
def _top_dims(qpq, K, FAN: tl.constexpr, ITERS: tl.constexpr):
    """The group's K dims: the largest ``sum_g |qP|`` in float32 (rows past G are zero), by ``_top_mask_pos``
    on the score's bits (>= 0, so they order like the values); keep-mask and slot ``(D,)``. An exact rank by
    one (D, D) comparison was measured slower than the search (15-20 us vs 11-14)."""
    score = tl.sum(tl.abs(qpq.to(tl.float32)), 0)
    return _top_mask_pos(score.to(tl.int32, bitcast=True), K, FAN, ITERS)


@_jit
def _group_qp(Q, PS, bh, h, HKV, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, CK: tl.constexpr,
              KN, kn_off, WRITE_KV: tl.constexpr, TERMS: tl.constexpr = 3):
    """``qP`` of one KV group's query heads (``(GP, D)`` in q's dtype, rows past G zero) and, with ``WRITE_KV``,
    the new key's ``kP`` (``(D,)`` float32), as ``_group_select`` describes. ``TERMS``: how many of the split
    projection's terms enter (3: float32 accuracy; 2: hi + mid, ``P`` to ~2^-17, far under q's bf16 rounding)."""
    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, D)
    offs_c = tl.arange(0, CK)
    gmask = offs_g < G
    qp = tl.zeros([GP, D], tl.float32)
    for c0 in tl.static_range(0, D, CK):
        qc = tl.load(Q + (bh * G + offs_g[:, None]) * D + (c0 + offs_c)[None, :], mask=gmask[:, None], other=0.0)
        if WRITE_KV:  # rows are disjoint: the sum is exact
            qc += tl.load(KN + kn_off + (c0 + offs_c)[None, :] + 0 * offs_g[:, None], mask=(offs_g == G)[:, None], other=0.0)
        poff = h * D * D + (c0 + offs_c)[:, None] * D + offs_d[None, :]
        if TERMS >= 1:
            qp = _dot_acc(qc, tl.load(PS + poff), qp)
        if TERMS >= 2:
            qp = _dot_acc(qc, tl.load(PS + HKV * D * D + poff), qp)
        if TERMS >= 3:
            qp = _dot_acc(qc, tl.load(PS + 2 * HKV * D * D + poff), qp)
    qpq = qp.to(Q.dtype.element_ty)
    kp = tl.zeros([D], tl.float32)
    if WRITE_KV:
        kp = tl.sum(tl.where((offs_g == G)[:, None], qp, 0.0), 0)
        qpq = tl.where(gmask[:, None], qpq, tl.zeros_like(qpq))
    return qpq, kp


@_jit
def _scatter_selection(QSEL, IDX, bh, qpq, keep, slot, K, G: tl.constexpr, GP: tl.constexpr, KP: tl.constexpr,
                       D: tl.constexpr):
    """A group's selection written to its slots: the kept columns of ``qpq`` and their dims by a masked scatter store
    (``keep``/``slot`` from ``_top_dims``), zeros in the slots past ``K`` (the page scores read qsel rows unmasked)."""
    offs_g = tl.arange(0, GP)
    offs_j = tl.arange(0, KP)
    gmask = offs_g < G
    pad = offs_j >= K
    tl.store(IDX + bh * KP + offs_j, tl.zeros([KP], tl.int32), mask=pad)
    tl.store(QSEL + (bh * G + offs_g[:, None]) * KP + offs_j[None, :], tl.zeros([GP, KP], QSEL.dtype.element_ty),
             mask=gmask[:, None] & pad[None, :])
    tl.store(IDX + bh * KP + slot, tl.arange(0, D), mask=keep)
    tl.store(QSEL + (bh * G + offs_g[:, None]) * KP + slot[None, :], qpq, mask=gmask[:, None] & keep[None, :])


@_jit
def _select_dims_kernel(
    Q,  # (B, Hq, D) queries (bf16), contiguous; query head h*G + g reads KV head h
    PS,  # (3, Hkv, D, D) bf16: the projection split in hi + mid + lo terms (``_proj_split``)
    QSEL,  # (B*Hkv, G, KP) out: projected queries at the selected dims (ascending), in Q's dtype
    IDX,  # (B*Hkv, KP) int32 out: selected dims, ascending
    CNT,  # (B*Hkv,) int32 out: K
    QF,  # (B*Hkv, G, D) out if WRITE_QF: all projected queries (for the page exact pass)
    KN, VN, KDC, VC,  # WRITE_KV: the step's new key and value (B, Hkv, D) and the cache's projected keys and values
    pos, s_knb, s_knh, s_vnb, s_vnh, s_kdb, s_kdh, s_kdd, s_vcb, s_vch, s_vcl,
    BND, s_bnb, s_bnh, s_bns, s_bnd, page,  # WRITE_BND: the cache's page bounds (``paged.page_bounds``), tokens a page
    HKV, K,
    G: tl.constexpr, GP: tl.constexpr, KP: tl.constexpr, D: tl.constexpr, CK: tl.constexpr, WRITE_QF: tl.constexpr,
    FAN: tl.constexpr, ITERS: tl.constexpr, ALL: tl.constexpr, WRITE_KV: tl.constexpr, GDC: tl.constexpr,
    SCATTER: tl.constexpr, WRITE_BND: tl.constexpr = False, PLANES: tl.constexpr = False,
):
    """Standalone dim selection (one program per KV group): measured faster than repeating it in the
    prologue of every program of the main pass (see docs/bench.md). ``SCATTER``: write the selected
    columns of qP and their dims straight to their slots (a masked scatter store) instead of compacting them
    in registers by a one-hot product first."""
    _gdc(GDC)
    bh = tl.program_id(0)
    h = bh % HKV
    b = (bh // HKV).to(tl.int64)
    offs_g = tl.arange(0, GP)
    offs_j = tl.arange(0, KP)
    gmask = offs_g < G
    if SCATTER and not ALL:
        qpq, kp = _group_qp(Q, PS, bh, h, HKV, G, GP, D, CK, KN, b * s_knb + h * s_knh, WRITE_KV)
        keep, slot = _top_dims(qpq, K, FAN, ITERS)
        _scatter_selection(QSEL, IDX, bh, qpq, keep, slot, K, G, GP, KP, D)
    else:
        qpq, qsel, idx, kp = _group_select(Q, PS, bh, h, HKV, K, G, GP, KP, D, CK, FAN, ITERS, ALL,
                                           KN, b * s_knb + h * s_knh, WRITE_KV)
        tl.store(IDX + bh * KP + offs_j, idx)
        tl.store(QSEL + (bh * G + offs_g[:, None]) * KP + offs_j[None, :], qsel, mask=gmask[:, None])
    _gdc_late(GDC)
    if WRITE_KV:  # the cache write of this step's token: kP at column pos of the dim-major keys, v at row pos
        offs_dk = tl.arange(0, D).to(tl.int64)
        kptr = KDC + b * s_kdb + h * s_kdh + offs_dk * s_kdd + pos
        if PLANES:  # uint8 (2D, L): the high bytes in rows [0, D), the low bytes in rows [D, 2D)
            kp = tl.minimum(tl.maximum(kp, -61408.0), 61408.0)  # reference.PLANE_MAX: the bounds below take it too
            khi, klo = _split_planes(kp)
            tl.store(kptr, khi)
            tl.store(kptr + D * s_kdd, klo)
        else:
            tl.store(kptr, kp.to(KDC.dtype.element_ty))
        vn = tl.load(VN + b * s_vnb + h * s_vnh + offs_dk)
        tl.store(VC + b * s_vcb + h * s_vch + pos.to(tl.int64) * s_vcl + offs_dk, vn)
        if WRITE_BND:  # and its page's bounds: the key alone on a new page, else folded into the min and max
            kq = kp.to(BND.dtype.element_ty).to(tl.float32)  # compared in float32: exact for bf16 values
            bptr = BND + b * s_bnb + h * s_bnh + offs_dk * s_bnd + pos // page
            fresh = (pos % page) == 0
            lo = tl.load(bptr).to(tl.float32)
            hi = tl.load(bptr + s_bns).to(tl.float32)
            tl.store(bptr, tl.where(fresh, kq, tl.minimum(lo, kq)).to(BND.dtype.element_ty))
            tl.store(bptr + s_bns, tl.where(fresh, kq, tl.maximum(hi, kq)).to(BND.dtype.element_ty))
    if WRITE_QF:
        offs_d = tl.arange(0, D)
        tl.store(QF + (bh * G + offs_g[:, None]) * D + offs_d[None, :], qpq, mask=gmask[:, None])
    tl.store(CNT + bh, K)


@_jit
def _online_softmax(s, v, m_i, l_i, acc, SAFE: tl.constexpr = False):
    """One block of the online softmax (scores already in log2 units): the running sum and output are rescaled to
    the new maximum and the block's share is added. ``SAFE``: rows whose scores so far are all masked (-inf) take a
    zero share instead of NaN; the token path needs it, since a block of its slots can be all padding."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if SAFE:
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_ref = m_new
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(s - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@_jit
def _dims_block(q, idx, jmask, kbase, vbase, s_kd, s_vl, n0, L, m_i, l_i, acc, qk_scale,
                BLOCK_N: tl.constexpr, D: tl.constexpr, MASKED: tl.constexpr, FULL_ROWS: tl.constexpr,
                PLANES: tl.constexpr = False):
    """One block of BLOCK_N tokens of the dims kernel; unmasked along tokens unless MASKED (the tail),
    so that the loads of the full blocks are 16 bytes wide. ``PLANES``: the keys are byte planes (the low
    plane ``D`` rows below the high one), joined to float16; ``q`` is float16 then."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    kptr = kbase + idx[:, None] * s_kd + offs_n[None, :]
    vptr = vbase + offs_n[:, None].to(tl.int64) * s_vl + offs_d[None, :]
    if MASKED:
        nmask = offs_n < L
        if FULL_ROWS:
            kmask = nmask[None, :]
        else:
            kmask = jmask[:, None] & nmask[None, :]
        kd = tl.load(kptr, mask=kmask, other=0.0)
        if PLANES:
            kd = _join_planes(kd, tl.load(kptr + D * s_kd, mask=kmask, other=0.0))
        v = tl.load(vptr, mask=nmask[:, None], other=0.0)
    else:
        if FULL_ROWS:
            kd = tl.load(kptr)
            if PLANES:
                kd = _join_planes(kd, tl.load(kptr + D * s_kd))
        else:
            kd = tl.load(kptr, mask=jmask[:, None], other=0.0)
            if PLANES:
                kd = _join_planes(kd, tl.load(kptr + D * s_kd, mask=jmask[:, None], other=0.0))
        v = tl.load(vptr)
    s = _dot(q, kd) * qk_scale  # (GP, BN)
    if MASKED:
        s = tl.where(nmask[None, :], s, float("-inf"))
    return _online_softmax(s, v, m_i, l_i, acc)


@_jit
def _dims_range(q, idx, jmask, kbase, vbase, s_kd, s_vl, blk0, blk1, L, qk_scale, GP: tl.constexpr,
                BLOCK_N: tl.constexpr, D: tl.constexpr, FULL_ROWS: tl.constexpr, PLANES: tl.constexpr = False):
    """Blocks ``[blk0, blk1)`` of one KV group through ``_dims_block``: the full ones unmasked, the group's last,
    partial block masked; -> the online-softmax state ``(m, l, acc)`` of the range."""
    full_end = tl.maximum(tl.minimum(blk1, L // BLOCK_N), blk0)
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    for blk in range(blk0, full_end):
        m_i, l_i, acc = _dims_block(q, idx, jmask, kbase, vbase, s_kd, s_vl, blk * BLOCK_N, L, m_i, l_i, acc, qk_scale,
                                    BLOCK_N, D, False, FULL_ROWS, PLANES)
    if full_end < blk1:  # the sequence's last, partial block
        m_i, l_i, acc = _dims_block(q, idx, jmask, kbase, vbase, s_kd, s_vl, full_end * BLOCK_N, L, m_i, l_i, acc, qk_scale,
                                    BLOCK_N, D, True, FULL_ROWS, PLANES)
    return m_i, l_i, acc


@_jit
def _dims_selection(Q, IDX, CNT, bh, G: tl.constexpr, GP: tl.constexpr, KP: tl.constexpr, FULL_ROWS: tl.constexpr,
                    PLANES: tl.constexpr):
    """A KV group's selection as the dims kernels read it: ``_selected_queries`` (all ``KP`` slots with
    ``FULL_ROWS``, else the count ``launch_select_dims`` wrote), float16 for key planes, and the valid-slot mask."""
    cnt = KP if FULL_ROWS else tl.load(CNT + bh)
    q, idx = _selected_queries(Q, IDX, bh, cnt, G, GP, KP)
    if PLANES:
        q = q.to(tl.float16)
    return q, idx, tl.arange(0, KP) < cnt


@_jit
def _store_partial(O, M, LS, slot, m_i, l_i, acc, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr):
    """One split's partial softmax sums for the ``G`` heads of a KV group at ``slot`` (rows ``slot * G + g`` of the
    partials that ``_combine_kernel`` and ``_merge_partials`` read)."""
    offs_g = tl.arange(0, GP)
    gmask = offs_g < G
    row = slot * G + offs_g
    tl.store(M + row, m_i, mask=gmask)
    tl.store(LS + row, l_i, mask=gmask)
    tl.store(O + row[:, None] * D + tl.arange(0, D)[None, :], acc, mask=gmask[:, None])


@_jit
def _stream_slots(bh, NB, W):
    """``_dims_stream_kernel``'s programs of a KV group: the first one and how many (each writes one slot)."""
    first = (bh * NB) // W
    return first, ((bh + 1) * NB - 1) // W - first + 1


@_jit
def _dims_split_kernel(
    Q,  # (B*Hkv, G, KP) selected projected queries (unscaled)
    IDX,  # (B*Hkv, KP) int32 selected dims
    CNT,  # (B*Hkv,) int32 valid entries of IDX
    KD,  # (B, Hkv, D, L) projected keys, dimension-major; strides s_kb, s_kh, s_kd, 1
    V,  # (B, Hkv, L, D) values; strides s_vb, s_vh, s_vl, 1
    O,  # (B*Hkv, S, G, D) float32 partial sums (unnormalised)
    M,  # (B*Hkv, S, G) float32 running max (log2 units)
    LS,  # (B*Hkv, S, G) float32 running denominators
    L, blocks_per_split, HKV, qk_scale,  # softmax scale * log2(e)
    s_kb, s_kh, s_kd, s_vb, s_vh, s_vl,
    G: tl.constexpr, GP: tl.constexpr, KP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    FULL_ROWS: tl.constexpr,  # every one of the KP rows is selected (no row mask)
    GDC: tl.constexpr, PLANES: tl.constexpr = False,  # KD: uint8 byte planes (B, Hkv, 2D, L), ``_dims_block``
):
    _gdc(GDC)
    bh = tl.program_id(0)
    split = tl.program_id(1)
    nsplit = tl.num_programs(1)
    b = bh // HKV
    h = bh % HKV
    q, idx, jmask = _dims_selection(Q, IDX, CNT, bh, G, GP, KP, FULL_ROWS, PLANES)
    kbase = KD + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
    vbase = V + b.to(tl.int64) * s_vb + h.to(tl.int64) * s_vh
    blk0 = split * blocks_per_split
    blk1 = tl.minimum(blk0 + blocks_per_split, tl.cdiv(L, BLOCK_N))
    m_i, l_i, acc = _dims_range(q, idx, jmask, kbase, vbase, s_kd, s_vl, blk0, blk1, L, qk_scale, GP, BLOCK_N, D,
                                FULL_ROWS, PLANES)
    _gdc_late(GDC)
    _store_partial(O, M, LS, bh * nsplit + split, m_i, l_i, acc, G, GP, D)


@_jit
def _dims_fused_kernel(
    Q,  # (B, Hq, D) queries (bf16)
    PS,  # (3, Hkv, D, D) bf16 split projection
    KD, V, O, M, LS,  # as in _dims_split_kernel
    L, K, blocks_per_split, HKV, qk_scale,
    s_kb, s_kh, s_kd, s_vb, s_vh, s_vl,
    G: tl.constexpr, GP: tl.constexpr, KP: tl.constexpr, D: tl.constexpr, CK: tl.constexpr, BLOCK_N: tl.constexpr,
    FULL_ROWS: tl.constexpr, FAN: tl.constexpr, ITERS: tl.constexpr, ALL: tl.constexpr, GDC: tl.constexpr,
):
    """AQUA dims only with the dim selection folded in: every program selects its group's dims in its
    prologue (a few microseconds, overlapped with the other programs' streaming) instead of a separate
    launch, then runs the split's blocks exactly as ``_dims_split_kernel``."""
    _gdc(GDC)
    bh = tl.program_id(0)
    split = tl.program_id(1)
    nsplit = tl.num_programs(1)
    b = bh // HKV
    h = bh % HKV
    _, q, idx, _ = _group_select(Q, PS, bh, h, HKV, K, G, GP, KP, D, CK, FAN, ITERS, ALL, Q, 0, False)
    jmask = tl.arange(0, KP) < K
    idx = idx.to(tl.int64)
    kbase = KD + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
    vbase = V + b.to(tl.int64) * s_vb + h.to(tl.int64) * s_vh
    blk0 = split * blocks_per_split
    blk1 = tl.minimum(blk0 + blocks_per_split, tl.cdiv(L, BLOCK_N))
    m_i, l_i, acc = _dims_range(q, idx, jmask, kbase, vbase, s_kd, s_vl, blk0, blk1, L, qk_scale, GP, BLOCK_N, D,
                                FULL_ROWS)
    _gdc_late(GDC)
    _store_partial(O, M, LS, bh * nsplit + split, m_i, l_i, acc, G, GP, D)


@_jit
def _merge_partials(O, M, LS, OUT, bh, S, n, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr):
    """A KV group's output from its ``n`` partial softmax sums (slots ``[0, n)`` of ``S``), all ``G`` heads at
    once. The partials were written by other programs of the same launch: read past L1 (``.cg``)."""
    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, D)
    gmask = offs_g < G
    m = tl.full([GP], float("-inf"), tl.float32)
    l = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    for s in range(0, n):
        row = (bh * S + s) * G + offs_g
        m_s = tl.load(M + row, mask=gmask, other=0.0, cache_modifier=".cg")
        l_s = tl.load(LS + row, mask=gmask, other=0.0, cache_modifier=".cg")
        o_s = tl.load(O + row[:, None] * D + offs_d[None, :], mask=gmask[:, None], other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m, m_s)
        a = tl.exp2(m - m_new)
        b = tl.exp2(m_s - m_new)
        acc = acc * a[:, None] + o_s * b[:, None]
        l = l * a + l_s * b
        m = m_new
    out = acc / tl.where(gmask, l, 1.0)[:, None]
    tl.store(OUT + (bh * G + offs_g[:, None]) * D + offs_d[None, :], out.to(OUT.dtype.element_ty), mask=gmask[:, None])


@_jit
def _dims_stream_kernel(
    Q,  # (B*Hkv, G, KP) selected projected queries (unscaled)
    IDX, CNT,  # (B*Hkv, KP) int32 selected dims, (B*Hkv,) their count
    KD, V, O, M, LS,  # as in _dims_split_kernel; partials (B*Hkv, S, G, ...) by slot
    CNTR,  # FUSE: (B*Hkv,) int32 arrival counters (zero, left zero)
    OUT,  # FUSE: (B, Hq, D) output
    L, NB, W, TOTAL, HKV, S, qk_scale,
    s_kb, s_kh, s_kd, s_vb, s_vh, s_vl,
    G: tl.constexpr, GP: tl.constexpr, KP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    FULL_ROWS: tl.constexpr, GDC: tl.constexpr, PLANES: tl.constexpr, FUSE: tl.constexpr,
):
    """AQUA dims only, balanced to the block (stream-K): the ``TOTAL = B*Hkv*NB`` blocks of ``BLOCK_N`` tokens are
    one sequence, and program ``p`` streams blocks ``[p*W, (p+1)*W)``, which may cross from one KV group into the
    next (a partial sum per group it touches, in slot ``p - first program of the group``). Launched with about
    one program per SM, so that every SM streams the same number of blocks in one go: no wave of programs
    ending and restarting its pipeline, no last wave part-full. ``FUSE``: the last program to finish a group
    merges its partials into the output (no combine launch). The selection stays a launch of its own: selecting in
    the programs (each for its groups, or the first to reach a group for all, published by a flag) measured slower
    (``docs/bench.md``, eighth round)."""
    _gdc(GDC)
    pid = tl.program_id(0)
    g0 = pid * W
    g1 = tl.minimum(g0 + W, TOTAL)
    bh0 = g0 // NB
    nseg = (g1 - 1) // NB - bh0 + 1
    for seg in range(0, nseg):
        _stream_segment(Q, IDX, CNT, KD, V, O, M, LS, CNTR, OUT, pid, bh0 + seg, g0, g1, L, NB, W, HKV, S, qk_scale,
                        s_kb, s_kh, s_kd, s_vb, s_vh, s_vl, G, GP, KP, D, BLOCK_N, FULL_ROWS, PLANES, FUSE)
    _gdc_late(GDC)


@_jit
def _stream_segment(Q, IDX, CNT, KD, V, O, M, LS, CNTR, OUT, pid, bh, g0, g1, L, NB, W, HKV, S, qk_scale,
                    s_kb, s_kh, s_kd, s_vb, s_vh, s_vl, G: tl.constexpr, GP: tl.constexpr, KP: tl.constexpr,
                    D: tl.constexpr, BLOCK_N: tl.constexpr, FULL_ROWS: tl.constexpr, PLANES: tl.constexpr,
                    FUSE: tl.constexpr):
    """Program ``pid``'s share ``[g0, g1)`` of KV group ``bh``'s blocks in ``_dims_stream_kernel``: its partial sum in
    its slot and, with ``FUSE``, the group's merge if it arrives last; -> the partial's denominators (a value that
    depends on the whole segment, for anyone timing it)."""
    b = bh // HKV
    h = bh % HKV
    q, idx, jmask = _dims_selection(Q, IDX, CNT, bh, G, GP, KP, FULL_ROWS, PLANES)
    kbase = KD + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
    vbase = V + b.to(tl.int64) * s_vb + h.to(tl.int64) * s_vh
    m_i, l_i, acc = _dims_range(q, idx, jmask, kbase, vbase, s_kd, s_vl, tl.maximum(g0 - bh * NB, 0),
                                tl.minimum(g1 - bh * NB, NB), L, qk_scale, GP, BLOCK_N, D, FULL_ROWS, PLANES)
    first, n = _stream_slots(bh, NB, W)
    _store_partial(O, M, LS, bh * S + pid - first, m_i, l_i, acc, G, GP, D)
    if FUSE:  # the last of the group's programs to arrive merges
        tl.debug_barrier()
        arrived = tl.atomic_add(CNTR + bh, 1, sem="acq_rel")
        if arrived == n - 1:
            _merge_partials(O, M, LS, OUT, bh, S, n, G, GP, D)
            tl.store(CNTR + bh, 0)
    return l_i


@_jit
def _page_score_kernel(
    Q, IDX,  # (B*Hkv, G, KP) selected projected queries, (B*Hkv, KP) int32 their dims (launch_select_dims)
    KD,  # projected keys: token t = p*PAGE + j of dim d at p*s_kp + d*s_kd + j (contiguous or paged layout)
    PSC,  # (B*Hkv, NP) float32 out: page scores (max over the page's tokens and the group's heads)
    CNTR, LIST, NFULL,  # FOLD: (B*Hkv,) int32 arrival counters (zero, left zero), page selection outputs
    L, K, NP, pages_per_split, HKV, NSEL, SINKS, RECENT,
    s_kb, s_kh, s_kp, s_kd,
    G: tl.constexpr, GP: tl.constexpr, KP: tl.constexpr,
    PAGE: tl.constexpr, PPI: tl.constexpr, FULL_ROWS: tl.constexpr, CONTIG: tl.constexpr,
    FOLD: tl.constexpr, NPP: tl.constexpr, GDC: tl.constexpr, PLANES: tl.constexpr = False,
):
    """Dims + top-T pages, pass 1: the approximate logits of PPI pages per step over the selected rows,
    reduced to one score per page. Only NP floats per KV group leave the kernel. ``CONTIG``: pages are
    adjacent along the rows (``s_kp == PAGE``), so a step is one contiguous run of PPI*PAGE tokens (16-byte
    loads); otherwise PPI must be 1. ``PLANES``: the keys are byte planes and only the high plane is read (one
    byte a value)."""
    _gdc(GDC)
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    offs_g = tl.arange(0, GP)
    gmask = offs_g < G
    offs_j = tl.arange(0, KP)
    jmask = offs_j < K
    if FULL_ROWS:
        idx = tl.load(IDX + bh * KP + offs_j).to(tl.int64)
    else:
        idx = tl.load(IDX + bh * KP + offs_j, mask=jmask, other=0).to(tl.int64)
    q = tl.load(Q + (bh * G + offs_g[:, None]) * KP + offs_j[None, :], mask=gmask[:, None], other=0.0)
    if PLANES:  # the high plane shifted into float16 bits (as fast as an fp8 e5m2 read and convert; fp8 dots of a
        q = q.to(tl.float16)  # 3-term split query were slower: sweeps/planes_mode-h100.json)
    kbase = KD + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
    BN: tl.constexpr = PPI * PAGE
    offs_t = tl.arange(0, BN)
    offs_pp = tl.arange(0, PPI)
    p0 = split * pages_per_split
    p1 = tl.minimum(p0 + pages_per_split, NP)
    p_full = tl.minimum(p1, L // PAGE)  # pages before p_full hold PAGE valid tokens each
    n_steps = tl.maximum(p_full - p0, 0) // PPI
    for it in range(0, n_steps):
        pp = p0 + it * PPI
        if CONTIG:
            ptr = kbase + idx[:, None] * s_kd + (pp * PAGE + offs_t)[None, :]
        else:
            ptr = kbase + idx[:, None] * s_kd + pp.to(tl.int64) * s_kp + offs_t[None, :]
        if FULL_ROWS:
            kd = tl.load(ptr)
        else:
            kd = tl.load(ptr, mask=jmask[:, None], other=0.0)
        if PLANES:
            kd = _high_plane(kd)
        s = _dot(q, kd)  # (GP, BN)
        s = tl.where(gmask[:, None], s, float("-inf"))
        pmax = tl.max(tl.reshape(tl.max(s, 0), (PPI, PAGE)), 1)
        tl.store(PSC + bh * NP + pp + offs_pp, pmax)
    pg_of = offs_t // PAGE
    within = offs_t % PAGE
    for pp in range(p0 + n_steps * PPI, p1, PPI):  # the rest: masked (partial pages, the split's end)
        pages = pp + pg_of
        tok = pages * PAGE + within
        tmask = (pages < p1) & (tok < L)
        ptr = kbase + idx[:, None] * s_kd + (pages.to(tl.int64) * s_kp + within)[None, :]
        kd = tl.load(ptr, mask=jmask[:, None] & tmask[None, :], other=0.0)
        if PLANES:
            kd = _high_plane(kd)
        s = _dot(q, kd)
        s = tl.where(gmask[:, None] & tmask[None, :], s, float("-inf"))
        pmax = tl.max(tl.reshape(tl.max(s, 0), (PPI, PAGE)), 1)
        tl.store(PSC + bh * NP + pp + offs_pp, pmax, mask=(pp + offs_pp) < p1)
    _gdc_late(GDC)
    if FOLD:  # the last program of this KV group to finish selects its pages (no launch of its own)
        tl.debug_barrier()
        arrived = tl.atomic_add(CNTR + bh, 1, sem="acq_rel")
        if arrived == tl.num_programs(1) - 1:
            _select_pages(PSC, LIST, NFULL, bh, NP, NSEL, L, SINKS, RECENT, PAGE, NPP, False)
            tl.store(CNTR + bh, 0)


@_jit
def _selected_queries(Q, IDX, bh, K, G: tl.constexpr, GP: tl.constexpr, KP: tl.constexpr):
    """A KV group's selected projected queries ``(GP, KP)`` (zero past G rows and K slots) and their dims
    ``(KP,)`` int64, as ``launch_select_dims`` wrote them."""
    offs_g = tl.arange(0, GP)
    offs_j = tl.arange(0, KP)
    jmask = offs_j < K
    idx = tl.load(IDX + bh * KP + offs_j, mask=jmask, other=0).to(tl.int64)
    q = tl.load(Q + (bh * G + offs_g[:, None]) * KP + offs_j[None, :], mask=(offs_g < G)[:, None] & jmask[None, :], other=0.0)
    return q, idx


@_jit
def _bound_score_kernel(
    Q, IDX,  # as _page_score_kernel
    BND,  # bounds of sub-pages of PAGE // R tokens (``paged.page_bounds``): sub-page c of dim d, minimum at
    # d*s_bd + c, maximum s_bs further
    PSC,  # (B*Hkv, NP) float32 out: page scores (max over the group's heads and the page's R sub-pages)
    K, NP, NS, pages_per_split, HKV,
    s_bb, s_bh, s_bs, s_bd,
    G: tl.constexpr, GP: tl.constexpr, KP: tl.constexpr, BNP: tl.constexpr, R: tl.constexpr, GDC: tl.constexpr,
):
    """Dims + top-T pages by bound, pass 1: ``sum_i max(q_i lo_i, q_i hi_i)`` over the selected dims as two
    tensor-core dots, ``q+ . hi + q- . lo`` (the positive and negative parts of bf16 values are exact), for the
    R sub-pages of each of BNP pages a step; a page scores its best sub-page. Reads 2 bounds a selected dim a
    sub-page: at sub-pages of 64 (16) tokens a 32nd (an 8th) of what ``_page_score_kernel`` reads."""
    _gdc(GDC)
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    gmask = tl.arange(0, GP) < G
    jmask = tl.arange(0, KP) < K
    q, idx = _selected_queries(Q, IDX, bh, K, G, GP, KP)
    qf = q.to(tl.float32)
    qpos = tl.maximum(qf, 0.0).to(BND.dtype.element_ty)  # float16 bounds of key planes
    qneg = tl.minimum(qf, 0.0).to(BND.dtype.element_ty)
    rows = BND + b.to(tl.int64) * s_bb + h.to(tl.int64) * s_bh + idx[:, None] * s_bd
    p0 = split * pages_per_split
    p1 = tl.minimum(p0 + pages_per_split, NP)
    offs_c = tl.arange(0, BNP * R)
    offs_p = tl.arange(0, BNP)
    _gdc_late(GDC)  # a short kernel: the page selection may become resident while it runs
    for pp in range(p0, p1, BNP):
        sub = pp * R + offs_c
        smask = (sub < p1 * R) & (sub < NS)
        lmask = jmask[:, None] & smask[None, :]
        lo = tl.load(rows + sub[None, :], mask=lmask, other=0.0)
        hi = tl.load(rows + s_bs + sub[None, :], mask=lmask, other=0.0)
        s = _dot_acc(qneg, lo, _dot(qpos, hi))  # (GP, BNP * R)
        s = tl.where(gmask[:, None] & smask[None, :], s, float("-inf"))
        best = tl.max(tl.reshape(tl.max(s, 0), (BNP, R)), 1)
        tl.store(PSC + bh * NP + pp + offs_p, best, mask=(pp + offs_p) < p1)


@_jit
def _page_select_kernel(
    PSC,  # (B*Hkv, NP) float32 page scores
    LIST,  # (B*Hkv, NSEL) int32 out: chosen pages, ascending (a partial last page, if chosen, is last)
    NFULL,  # (B*Hkv,) int32 out: how many chosen pages are full (the rest: the partial last page)
    NP, NSEL, L, SINKS, RECENT,
    PAGE: tl.constexpr, NPP: tl.constexpr, GDC: tl.constexpr, MARK: tl.constexpr = False,
):
    """Dims + top-T pages, pass 2: the NSEL chosen pages of one KV group (``_select_pages``), written compactly
    by a scatter. ``MARK``: candidates of a re-rank -- also set the scores of the free pages not chosen to -inf."""
    _gdc(GDC)
    _gdc_late(GDC)  # here at the start (its stores are inside ``_select_pages``): as measured, one program a group
    _select_pages(PSC, LIST, NFULL, tl.program_id(0), NP, NSEL, L, SINKS, RECENT, PAGE, NPP, MARK)


@_jit
def _rerank_score_kernel(
    Q, IDX,  # as _page_score_kernel
    KD,  # projected keys, as _page_score_kernel
    LIST,  # (B*Hkv, NC) int32 candidate pages (``_page_select_kernel`` with MARK)
    PSC,  # (B*Hkv, NP) float32 in/out: each candidate's score becomes its tokens' max approximate logit
    L, K, NP, NC, per_split, HKV,
    s_kb, s_kh, s_kp, s_kd,
    G: tl.constexpr, GP: tl.constexpr, KP: tl.constexpr, PAGE: tl.constexpr, GDC: tl.constexpr,
    PLANES: tl.constexpr = False,
):
    """Dims + top-T pages by bound, re-ranked: the candidates' scores as ``_page_score_kernel`` computes them
    (the max over a page's tokens and the group's heads of the approximate logits), read from the kept dims of
    the candidate pages only (of planar keys, the high plane)."""
    _gdc(GDC)
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    gmask = tl.arange(0, GP) < G
    jmask = tl.arange(0, KP) < K
    offs_t = tl.arange(0, PAGE)
    q, idx = _selected_queries(Q, IDX, bh, K, G, GP, KP)
    if PLANES:
        q = q.to(tl.float16)
    kbase = KD + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh + idx[:, None] * s_kd
    s0 = split * per_split
    s1 = tl.minimum(s0 + per_split, NC)
    _gdc_late(GDC)
    for i in range(s0, s1):
        pg = tl.load(LIST + bh * NC + i)
        tmask = pg * PAGE + offs_t < L
        kd = tl.load(kbase + pg.to(tl.int64) * s_kp + offs_t[None, :], mask=jmask[:, None] & tmask[None, :], other=0.0)
        if PLANES:
            kd = _high_plane(kd)
        sc = _dot(q, kd)  # (GP, PAGE)
        sc = tl.where(gmask[:, None] & tmask[None, :], sc, float("-inf"))
        tl.store(PSC + bh * NP + pg, tl.max(tl.max(sc, 1), 0))


@_jit
def _top_band(x, valid, K, FAN: tl.constexpr, ITERS: tl.constexpr):
    """Keep-mask of the K largest float32 ``x`` among ``valid`` (0 <= K): a FAN-ary search on the *value*
    (FAN - 1 candidates a round, ITERS rounds shrink [min, max] by FAN**ITERS), then every value above the
    final band and, inside the band, the first by index. Values inside the band differ by less than
    ``(max - min) / FAN**ITERS`` (about 6e-8 of the range with 8**8): ties at float32 resolution.
    Float compares, no int64 keys: a round is one (FAN, N) comparison and a reduction. Measured on an H100
    (.dbg-style sweep, 8 groups x 2048 pages): FAN 8 x 8 rounds 9.1 us, 16 x 6 10.7 us, 4 x 16 10.0 us,
    32 x 5 14.6 us (8 warps); 512 pages: 5.1 us at 4 warps."""
    # count(x >= lo) >= K: the least finite value (a re-rank's candidates leave -inf on the other pages; at least K
    # values are finite wherever this runs)
    lo = tl.min(tl.where(valid & (x > float("-inf")), x, float("inf")), 0)
    hi = tl.max(tl.where(valid, x, float("-inf")), 0)  # count(x > hi) == 0 < K
    xs = tl.where(valid, x, float("-inf"))
    frac = (tl.arange(0, FAN) + 1).to(tl.float32) / FAN
    n_lo = tl.sum((xs >= lo).to(tl.int32), 0)  # the finite values: when they are exactly K, no round is needed
    it = 0
    while (it < ITERS) & (n_lo != K):  # a round that lands on exactly K values ends the search: they are the K
        cand = lo + (hi - lo) * frac  # the last candidate is hi
        cnt = tl.sum((xs[None, :] >= cand[:, None]).to(tl.int32), 1)
        ok = cnt >= K
        new_lo = tl.max(tl.where(ok, cand, lo), 0)
        n_lo = tl.min(tl.where(ok, cnt, K + 1), 0)
        hi = tl.min(tl.where(ok, hi, cand), 0)
        lo = new_lo
        it += 1
    above = xs > hi
    n_above = tl.sum(above.to(tl.int32), 0)
    band = valid & (xs >= lo) & (xs <= hi)
    band_pos = tl.cumsum(band.to(tl.int32), 0) - 1
    return above | (band & (band_pos < K - n_above))  # K <= 0: lo rises to the max, nothing is above or kept


@_jit
def _select_pages(PSC, LIST, NFULL, bh, NP, NSEL, L, SINKS, RECENT, PAGE: tl.constexpr, NPP: tl.constexpr,
                  MARK: tl.constexpr):
    """The NSEL chosen pages, ascending: the first SINKS and the last RECENT pages (forced, written directly),
    and the best of the pages between them by score (``_top_band``: ties to the lower page). Only those free
    pages enter the search (``NPP`` = ``select_width``): at 128K + 1 tokens, 2041 free of 2049 pages fit a
    2048-wide tile where all pages needed 4096, and a search round costs in proportion to the tile."""
    s = tl.minimum(SINKS, NP)  # free pages are [s, r0)
    r0 = tl.maximum(s, NP - RECENT)
    offs_p = tl.arange(0, NPP)
    free = offs_p < r0 - s
    sc = tl.load(PSC + bh * NP + s + offs_p, mask=free, other=float("-inf"), cache_modifier=".cg")
    n_recent = NP - r0
    keep = _top_band(sc, free, NSEL - s - n_recent, 8, 8)  # 8 x 8 rounds: the fastest measured (``_top_band``)
    pos = s + tl.cumsum(keep.to(tl.int32), 0) - 1
    out = LIST + bh * NSEL
    tl.store(out + pos, s + offs_p, mask=keep)
    if MARK:
        tl.store(PSC + bh * NP + s + offs_p, tl.full([NPP], float("-inf"), tl.float32), mask=free & ~keep)
    offs_f = tl.arange(0, 16)
    for c in range(0, s, 16):  # sinks: slots [0, s)
        tl.store(out + c + offs_f, c + offs_f, mask=c + offs_f < s)
    for c in range(0, n_recent, 16):  # recent pages: the last n_recent slots
        tl.store(out + NSEL - n_recent + c + offs_f, r0 + c + offs_f, mask=c + offs_f < n_recent)
    n_full = L // PAGE  # pages before n_full are full; only the last page can be partial
    n_kept_full = (tl.sum((keep & (s + offs_p < n_full)).to(tl.int32), 0) + tl.minimum(s, n_full)
                   + tl.maximum(n_full - r0, 0))  # n_full <= NP
    tl.store(NFULL + bh, n_kept_full)


def select_width(n_pages: int, sinks: int, recent: int) -> int:
    """The tile width of ``_select_pages``: the free pages (neither sink nor recent), to a power of two >= 16."""
    s = min(sinks, n_pages)
    free = max(s, n_pages - recent) - s
    return max(16, _pow2(free))


@_jit
def _page_block(q, kbase, vbase, pg, L, s_kp, s_kd, s_vl, m_i, l_i, acc, qk_scale, D: tl.constexpr,
                PAGE: tl.constexpr, MASKED: tl.constexpr, PLANES: tl.constexpr):
    """One chosen page of the exact pass: its projected keys (both byte planes joined where ``PLANES``) and its rows
    of V; unmasked unless MASKED (the partial last page), so that a full page's loads are 16 bytes wide."""
    offs_d = tl.arange(0, D)
    offs_t = tl.arange(0, PAGE)
    kptr = kbase + pg * s_kp + offs_d[:, None].to(tl.int64) * s_kd + offs_t[None, :]
    if MASKED:
        tok = pg * PAGE + offs_t
        tmask = tok < L
        kt = tl.load(kptr, mask=tmask[None, :], other=0.0)
        if PLANES:
            kt = _join_planes(kt, tl.load(kptr + D * s_kd, mask=tmask[None, :], other=0.0))
        vt = tl.load(vbase + tok[:, None] * s_vl + offs_d[None, :], mask=tmask[:, None], other=0.0)
    else:
        kt = tl.load(kptr)  # (D, PAGE)
        if PLANES:
            kt = _join_planes(kt, tl.load(kptr + D * s_kd))
        vt = tl.load(vbase + (pg * PAGE + offs_t)[:, None] * s_vl + offs_d[None, :])  # (PAGE, D)
    s = _dot(q, kt) * qk_scale
    if MASKED:
        s = tl.where(tmask[None, :], s, float("-inf"))
    return _online_softmax(s, vt, m_i, l_i, acc)


@_jit
def _page_attend_kernel(
    QF,  # (B*Hkv, G, D) projected queries
    LIST, NFULL,  # from _page_select_kernel
    KD, V,  # projected keys (as _page_score_kernel), values (B, Hkv, L, D) token-major
    O, M, LS,  # partials (B*Hkv, S, G, D), (B*Hkv, S, G)
    L, NSEL, per_split, HKV, qk_scale,
    s_kb, s_kh, s_kp, s_kd, s_vb, s_vh, s_vl,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr, GDC: tl.constexpr,
    PLANES: tl.constexpr = False,
):
    """Dims + top-T pages, pass 3: exact attention over this split's share of the chosen full pages --
    ``(qP).(kP)`` on whole pages of the projected keys (the rows the scoring pass read, plus the others;
    equal to ``q.k`` for an orthogonal P) and the pages' rows of V; the last split also takes a chosen
    partial last page (masked). ``PLANES``: both byte planes of the keys, joined to float16."""
    _gdc(GDC)
    bh = tl.program_id(0)
    split = tl.program_id(1)
    nsplit = tl.num_programs(1)
    b = bh // HKV
    h = bh % HKV
    nfull = tl.load(NFULL + bh)
    s0 = split * per_split
    n_here = tl.minimum(per_split, nfull - s0)
    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, D)
    gmask = offs_g < G
    q = tl.load(QF + (bh * G + offs_g[:, None]) * D + offs_d[None, :], mask=gmask[:, None], other=0.0)
    if PLANES:
        q = q.to(tl.float16)
    kbase = KD + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
    vbase = V + b.to(tl.int64) * s_vb + h.to(tl.int64) * s_vh
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    for i in range(0, n_here):
        pg = tl.load(LIST + bh * NSEL + s0 + i).to(tl.int64)
        m_i, l_i, acc = _page_block(q, kbase, vbase, pg, L, s_kp, s_kd, s_vl, m_i, l_i, acc, qk_scale, D, PAGE,
                                    False, PLANES)
    if (nfull < NSEL) & (split == nsplit - 1):  # the partial last page was chosen: it sits at slot nfull
        pg = tl.load(LIST + bh * NSEL + nfull).to(tl.int64)
        m_i, l_i, acc = _page_block(q, kbase, vbase, pg, L, s_kp, s_kd, s_vl, m_i, l_i, acc, qk_scale, D, PAGE,
                                    True, PLANES)
    _gdc_late(GDC)
    _store_partial(O, M, LS, bh * nsplit + split, m_i, l_i, acc, G, GP, D)


@_jit
def _score_select_kernel(
    Q, IDX, CNT,  # as in _dims_split_kernel (the scale does not change the ranking)
    KD,  # (B, Hkv, D, L)
    SEL,  # (B*Hkv, nblocks * KEEP) int32 chosen token ids; block c owns slots [c*KEEP, (c+1)*KEEP)
    L, HKV, s_kb, s_kh, s_kd,
    KEEP,  # tokens kept from a full block (ceil(ratio * BLOCK_C))
    G: tl.constexpr, GP: tl.constexpr, KP: tl.constexpr, BLOCK_C: tl.constexpr, ITERS: tl.constexpr,
    FANOUT: tl.constexpr, FULL_ROWS: tl.constexpr, GDC: tl.constexpr,
):
    _gdc(GDC)
    bh = tl.program_id(0)
    blk = tl.program_id(1)
    nblk = tl.num_programs(1)
    b = bh // HKV
    h = bh % HKV
    offs_j = tl.arange(0, KP)
    offs_g = tl.arange(0, GP)
    if FULL_ROWS:
        jmask = offs_j < KP
        idx = tl.load(IDX + bh * KP + offs_j).to(tl.int64)
    else:
        cnt = tl.load(CNT + bh)
        jmask = offs_j < cnt
        idx = tl.load(IDX + bh * KP + offs_j, mask=jmask, other=0).to(tl.int64)
    q = tl.load(Q + bh * G * KP + offs_g[:, None] * KP + offs_j[None, :], mask=(offs_g[:, None] < G) & jmask[None, :], other=0.0)
    offs_n = blk * BLOCK_C + tl.arange(0, BLOCK_C)
    nmask = offs_n < L
    kbase = KD + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
    kptr = kbase + idx[:, None] * s_kd + offs_n[None, :]
    if (blk + 1) * BLOCK_C <= L:  # a full block: loads unmasked along tokens (16 bytes wide)
        kd = tl.load(kptr, mask=jmask[:, None], other=0.0)
    else:
        kd = tl.load(kptr, mask=jmask[:, None] & nmask[None, :], other=0.0)
    s = _dot(q, kd)  # (GP, BLOCK_C)
    s = tl.where(offs_g[:, None] < G, s, float("-inf"))
    score = tl.max(s, 0)  # (BLOCK_C,) max over the group's heads
    score = tl.where(nmask, score, float("-inf"))
    n_valid = tl.minimum(L - blk * BLOCK_C, BLOCK_C)
    want = (n_valid * KEEP + BLOCK_C - 1) // BLOCK_C  # tokens_in_block()
    lo = tl.min(tl.where(nmask, score, float("inf")), 0)
    hi = tl.max(score, 0)
    # FANOUT-ary search on the threshold (FANOUT - 1 candidates per reduction): invariant
    # count(score >= lo) >= want, count(score >= hi) < want unless hi is the maximum
    frac = (tl.arange(0, FANOUT) + 1).to(tl.float32) / FANOUT  # (FANOUT,); the last candidate is hi
    for _ in range(ITERS):
        cand = lo + (hi - lo) * frac
        c = tl.sum((score[None, :] >= cand[:, None]).to(tl.int32), 1)  # (FANOUT,)
        ok = c >= want
        new_lo = tl.max(tl.where(ok, cand, lo), 0)
        hi = tl.min(tl.where(ok, hi, cand), 0)
        lo = new_lo
    keep = score >= lo
    pos = tl.cumsum(keep.to(tl.int32), 0) - 1
    keep = keep & (pos < want)
    _gdc_late(GDC)
    tl.store(SEL + bh * nblk * KEEP + blk * KEEP + pos, offs_n, mask=keep)


@_jit
def _tokens_split_kernel(
    Q,  # (B*Hkv, G, D) full queries (contiguous (B, Hq, D))
    SEL,  # (B*Hkv, nslots) int32 token ids (see _score_select_kernel)
    K, V,  # (B, Hkv, L, D) token-major; strides s_*b, s_*h, s_*l, 1
    O, M, LS,  # partials as in _dims_split_kernel
    L, nslots, split_len, HKV, KEEP, BLOCK_C, qk_scale,
    s_kb, s_kh, s_kl, s_vb, s_vh, s_vl,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, GDC: tl.constexpr,
):
    _gdc(GDC)
    bh = tl.program_id(0)
    split = tl.program_id(1)
    nsplit = tl.num_programs(1)
    b = bh // HKV
    h = bh % HKV
    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + bh * G * D + offs_g[:, None] * D + offs_d[None, :], mask=offs_g[:, None] < G, other=0.0)
    kbase = K + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
    vbase = V + b.to(tl.int64) * s_vb + h.to(tl.int64) * s_vh
    start = split * split_len
    end = tl.minimum(start + split_len, nslots)
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    for it in range(0, split_len // BLOCK_N):  # the last split runs masked past `end`
        n0 = start + it * BLOCK_N
        slot = n0 + tl.arange(0, BLOCK_N)
        blk = slot // KEEP
        n_valid = tl.minimum(L - blk * BLOCK_C, BLOCK_C)
        smask = (slot < end) & ((slot - blk * KEEP) < (n_valid * KEEP + BLOCK_C - 1) // BLOCK_C)
        tok = tl.load(SEL + bh * nslots + slot, mask=smask, other=0).to(tl.int64)
        k = tl.load(kbase + tok[:, None] * s_kl + offs_d[None, :], mask=smask[:, None], other=0.0)  # (BN, D)
        s = _dot(q, tl.trans(k)) * qk_scale  # (GP, BN)
        s = tl.where(smask[None, :], s, float("-inf"))
        v = tl.load(vbase + tok[:, None] * s_vl + offs_d[None, :], mask=smask[:, None], other=0.0)
        m_i, l_i, acc = _online_softmax(s, v, m_i, l_i, acc, SAFE=True)
    _gdc_late(GDC)
    _store_partial(O, M, LS, bh * nsplit + split, m_i, l_i, acc, G, GP, D)


@_jit
def _combine_kernel(
    O, M, LS,  # partials (B*Hkv, S, G, D), (B*Hkv, S, G)
    OUT,  # (B*Hkv*G, D) = (B, Hq, D) output in the input dtype
    S, G: tl.constexpr, SP: tl.constexpr, D: tl.constexpr, GDC: tl.constexpr,
    NB=1, W=1, STREAM: tl.constexpr = False,  # STREAM: partials of ``_dims_stream_kernel`` (a count per group)
):
    _gdc(GDC)
    pid = tl.program_id(0)  # (b, h, g)
    bh = pid // G
    g = pid % G
    offs_s = tl.arange(0, SP)
    offs_d = tl.arange(0, D)
    if STREAM:
        smask = offs_s < _stream_slots(bh, NB, W)[1]
    else:
        smask = offs_s < S
    rows = (bh * S + offs_s) * G + g
    m = tl.load(M + rows, mask=smask, other=float("-inf"))
    l = tl.load(LS + rows, mask=smask, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.where(m > float("-inf"), tl.exp2(m - m_max), 0.0)
    acc = tl.load(O + rows[:, None] * D + offs_d[None, :], mask=smask[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    _gdc_late(GDC)
    tl.store(OUT + pid * D + offs_d, out.to(OUT.dtype.element_ty))


# -- launchers ----------------------------------------------------------------------------------------
def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _num_splits(work_items: int, length: int, block: int, sms: int, waves: float = 4.0) -> int:
    """Flash-decoding split: enough programs to fill the GPU about ``waves`` times over, whole blocks per split."""
    blocks = max(1, -(-length // block))
    return max(1, min(blocks, -(-int(waves * sms) // work_items)))


_PROPS: dict[int, object] = {}


def _props(device: torch.device):
    """``torch.cuda.get_device_properties`` of a CUDA device, read once per GPU: the launchers ask for it in
    every layer of every decode step."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _PROPS:
        _PROPS[index] = torch.cuda.get_device_properties(index)
    return _PROPS[index]


def _sms(device: torch.device) -> int:
    return _props(device).multi_processor_count if device.type == "cuda" else 8


def use_pdl(device: torch.device, pdl: bool | None = None) -> bool:
    """Whether the kernels launch with programmatic dependent launch (``_gdc``): ``None`` means wherever it
    exists (an NVIDIA GPU of compute capability 9 or later, not the interpreter); ``False`` never; ``True`` only
    there as well (elsewhere the attribute is meaningless and the wait instruction does not compile)."""
    if pdl is False or device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1" or torch.version.hip:
        return False  # ROCm GPUs are "cuda" devices to torch, with capabilities that are not NVIDIA's
    return _props(device).major >= 9


PDL_EARLY = False  # the trigger of ``_gdc``: True at a kernel's start (mode 1), False before its final stores (2)


def _pdl_opts(pdl: bool) -> dict:
    """Launch options for a kernel taking ``GDC``: the constexpr and, when on, Triton's ``launch_pdl``."""
    return {"GDC": 1 if PDL_EARLY else 2, "launch_pdl": True} if pdl else {"GDC": 0}


def _combine(o: torch.Tensor, m: torch.Tensor, ls: torch.Tensor, batch: int, q_heads: int, dim: int, dtype: torch.dtype,
             pdl: bool = False, stream: tuple[int, int] | None = None) -> torch.Tensor:
    """The combine launch; ``stream`` = (blocks a group, blocks a program) for ``_dims_stream_kernel``'s partials."""
    bhk, splits, group = m.shape
    out = torch.empty(batch, q_heads, dim, device=o.device, dtype=dtype)
    nb, w = stream or (1, 1)
    _combine_kernel[(bhk * group,)](o, m, ls, out, splits, G=group, SP=_pow2(splits), D=dim, num_warps=4,
                                    NB=nb, W=w, STREAM=stream is not None, **_pdl_opts(pdl))
    return out


def _partials(bhk: int, splits: int, group: int, dim: int, device: torch.device):
    o = torch.empty(bhk, splits, group, dim, device=device, dtype=torch.float32)
    m = torch.empty(bhk, splits, group, device=device, dtype=torch.float32)
    return o, m, torch.empty_like(m)


Selection = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # qsel (B*Hkv, G, KP), idx (B*Hkv, KP), count (B*Hkv,)


def _kp(dims: int) -> int:
    return max(16, _pow2(dims))


def pad_selection(qsel: torch.Tensor, idx: torch.Tensor, count: torch.Tensor) -> Selection:
    """A ``select_dims`` result (torch, any ``gqa``) in the kernels' padded layout."""
    batch, groups, rep, kp = qsel.shape
    KP = _kp(kp)
    q = torch.zeros(batch * groups, rep, KP, device=qsel.device, dtype=qsel.dtype)
    q[..., :kp] = qsel.reshape(batch * groups, rep, kp)
    idx_p = torch.zeros(batch * groups, KP, device=idx.device, dtype=torch.int32)
    idx_p[:, :kp] = idx.reshape(batch * groups, kp)
    return q, idx_p, count.reshape(-1).to(torch.int32).contiguous()


def fused_selection_supported(q: torch.Tensor, proj: torch.Tensor, gqa: str) -> bool:
    """The in-kernel dim selection runs for group selection, bf16 queries, a power-of-two head_dim in
    16..256 and a float32 projection; anything else takes the composed PyTorch selection."""
    dim = q.shape[-1]
    return (gqa == "group" and dim & (dim - 1) == 0 and 16 <= dim <= 256 and proj.dtype == torch.float32
            and q.dtype == torch.bfloat16)


_PSPLIT: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _proj_split(proj: torch.Tensor) -> torch.Tensor:
    """``(3, Hkv, D, D)`` bf16 hi + mid + lo terms of the float32 projection (their sum is P to ~2^-24):
    three bf16 tensor-core products give qP at float32 accuracy. Cached per projection tensor (built on
    the first, eager call; a CUDA graph captured afterwards reuses it)."""
    key = (proj.data_ptr(), str(proj.device), tuple(proj.shape), proj._version)
    hit = _PSPLIT.get(key)
    if hit is not None and hit[0] is proj:
        return hit[1]
    p = proj.float().contiguous()
    hi = p.to(torch.bfloat16)
    r1 = p - hi.float()
    mid = r1.to(torch.bfloat16)
    lo = (r1 - mid.float()).to(torch.bfloat16)
    split = torch.stack([hi, mid, lo]).contiguous()
    if len(_PSPLIT) >= 64:
        _PSPLIT.clear()
    _PSPLIT[key] = (proj, split)
    return split


def _gp(rep: int) -> int:
    return max(GROUP_PAD, _pow2(rep))


NewKV = tuple  # (k_new (B, Hkv, D), v_new (B, Hkv, D), kd (B, Hkv, D, L), v (B, Hkv, L, D), pos): a write into the cache


def write_new_kv(new_kv: NewKV, proj: torch.Tensor) -> None:
    """The cache write that the dim-selection kernel does in its launch, in PyTorch (for the other paths)."""
    k_new, v_new, kd, v, pos = new_kv
    kp = torch.einsum("bhd,hde->bhe", k_new.float(), proj.float())
    kd[..., pos] = key_planes(kp[..., None])[..., 0] if is_planes(kd) else kp.to(kd.dtype)
    v[:, :, pos] = v_new


def launch_select_dims(q: torch.Tensor, proj: torch.Tensor, dims: int, qf: torch.Tensor | None = None,
                       num_warps: int = 4, fan: int | None = None, iters: int | None = None,
                       new_kv: NewKV | None = None, pdl: bool | None = None,
                       bounds: tuple[torch.Tensor, int] | None = None) -> Selection:
    """Per-KV-group dim selection in one launch (``gqa="group"``, bf16 ``q``): the same set as ``select_dims``
    up to exact ties of ``sum_g |qP|`` (broken here by the lower index). ``q`` ``(B, Hq, D)``, ``proj``
    ``(Hkv, D, D)`` float32 on q's device. ``qf`` ``(B*Hkv, G, D)``: also write all projected queries there.
    ``new_kv``: also write this step's token into the cache (``write_new_kv``; ``kP`` at float32 accuracy,
    rounded once): one launch instead of a projection and two copies. ``bounds`` = (page bounds, page): with
    ``new_kv``, also fold the token into its page's bounds (``paged.update_page_bounds``). ``pdl``: see ``use_pdl``."""
    _need_triton()
    batch, q_heads, dim = q.shape
    groups = proj.shape[0]
    rep = q_heads // groups
    dims = min(dims, dim)
    KP = _kp(dims)
    qc = q.contiguous()
    qsel = torch.empty(batch * groups, rep, KP, device=q.device, dtype=q.dtype)
    idx = torch.empty(batch * groups, KP, device=q.device, dtype=torch.int32)
    count = torch.empty(batch * groups, device=q.device, dtype=torch.int32)
    if new_kv is None:
        kn = vn = kdc = vc = qc
        pos, strides = 0, (0,) * 10
    else:
        kn, vn, kdc, vc, pos = new_kv
        assert kn.stride(-1) == 1 and vn.stride(-1) == 1 and kdc.stride(-1) == 1 and vc.stride(-1) == 1
        strides = (kn.stride(0), kn.stride(1), vn.stride(0), vn.stride(1), kdc.stride(0), kdc.stride(1), kdc.stride(2),
                   vc.stride(0), vc.stride(1), vc.stride(2))
    write_bnd = new_kv is not None and bounds is not None
    if write_bnd:
        bnd, page = bounds
        assert bnd.stride(-1) == 1 and bnd.dtype == (torch.float16 if is_planes(kdc) else kdc.dtype)
        bargs = (bnd, bnd.stride(0), bnd.stride(1), bnd.stride(2), bnd.stride(3), page)
    else:
        bargs = (qc, 0, 0, 0, 0, 1)
    _select_dims_kernel[(batch * groups,)](
        qc, _proj_split(proj), qsel, idx, count, qf if qf is not None else qsel, kn, vn, kdc, vc, pos, *strides, *bargs,
        groups, dims,
        G=rep, GP=_gp(rep + (new_kv is not None)), KP=KP, D=dim, CK=min(dim, 64), WRITE_QF=qf is not None,
        FAN=fan or DIM_FAN, ITERS=iters or DIM_ITERS, ALL=dims == dim, WRITE_KV=new_kv is not None, num_warps=num_warps,
        SCATTER=DIM_SCATTER, WRITE_BND=write_bnd, PLANES=is_planes(kdc),
        **_pdl_opts(use_pdl(q.device, pdl)),
    )
    return qsel, idx, count


def launch_dims_fused(q: torch.Tensor, proj: torch.Tensor, kd: torch.Tensor, v: torch.Tensor, dims: int, scale: float,
                      block_n: int = 128, num_warps: int = 4, num_stages: int = 3, waves: float = 4.0,
                      pdl: bool | None = None) -> torch.Tensor:
    """AQUA dims only, selection folded into the main kernel: 2 launches (main pass, combine)."""
    _need_triton()
    if is_planes(kd):
        raise ValueError("the dims kernel with the selection in its prologue does not read key planes")
    pdl = use_pdl(q.device, pdl)
    batch, groups, dim, length = kd.shape
    rep = q.shape[1] // groups
    dims = min(dims, dim)
    KP = _kp(dims)
    blocks = -(-length // block_n)
    splits = _num_splits(batch * groups, length, block_n, _sms(kd.device), waves)
    per_split = -(-blocks // splits)
    splits = -(-blocks // per_split)
    o, m, ls = _partials(batch * groups, splits, rep, dim, kd.device)
    assert kd.stride(3) == 1 and v.stride(3) == 1
    _dims_fused_kernel[(batch * groups, splits)](
        q.contiguous(), _proj_split(proj), kd, v, o, m, ls, length, dims, per_split, groups, scale * LOG2E,
        kd.stride(0), kd.stride(1), kd.stride(2), v.stride(0), v.stride(1), v.stride(2),
        G=rep, GP=_gp(rep), KP=KP, D=dim, CK=min(dim, 64), BLOCK_N=block_n, FULL_ROWS=dims == KP,
        FAN=DIM_FAN, ITERS=DIM_ITERS, ALL=dims == dim, num_warps=num_warps, num_stages=num_stages, **_pdl_opts(pdl),
    )
    return _combine(o, m, ls, batch, groups * rep, dim, v.dtype, pdl)


_COUNTERS: dict[str, torch.Tensor] = {}


def _counters(n: int, device: torch.device) -> torch.Tensor:
    """Zeroed int32 arrival counters, kept across calls (each use leaves them zero again): allocated once,
    so CUDA-graph replays reuse them. Two streams must not run a folded page step at the same time."""
    key = str(device)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 1024), device=device, dtype=torch.int32)
        _COUNTERS[key] = buf
    return buf


def kd_layout(kd: torch.Tensor, page: int) -> tuple[int, int, int, int, int]:
    """``(B, Hkv, D, L)`` contiguous-rows or ``(B, Hkv, NP, D, page)`` paged projected keys ->
    ``(s_kb, s_kh, s_kp, s_kd, D)``: token ``t = p*page + j`` of dim ``d`` sits at ``p*s_kp + d*s_kd + j``
    (byte planes: ``2D`` rows, the low plane ``D`` rows below the high one)."""
    if kd.dim() == 4:
        assert kd.stride(3) == 1, "projected keys need unit stride along tokens"
        return kd.stride(0), kd.stride(1), page, kd.stride(2), key_dim(kd)
    if kd.dim() == 5:
        assert kd.shape[4] == page and kd.stride(4) == 1, f"paged keys need pages of {page} contiguous tokens"
        return kd.stride(0), kd.stride(1), kd.stride(2), kd.stride(3), key_dim(kd)
    raise ValueError(f"projected keys must be (B, Hkv, D, L) or (B, Hkv, NP, D, page), got {tuple(kd.shape)}")


def _v_rows(v: torch.Tensor, page: int) -> tuple[int, int, int]:
    """Values ``(B, Hkv, L, D)`` or paged ``(B, Hkv, NP, page, D)`` (pages adjacent) -> ``(s_vb, s_vh, s_vl)``."""
    if v.dim() == 5:
        assert v.stride(2) == page * v.stride(3) and v.stride(4) == 1, "paged values: pages of one head must be adjacent"
        return v.stride(0), v.stride(1), v.stride(3)
    assert v.stride(3) == 1
    return v.stride(0), v.stride(1), v.stride(2)


def launch_page_scores(q: torch.Tensor, proj: torch.Tensor, kd: torch.Tensor, dims: int, page: int, length: int,
                       score_block: int = 256, num_warps: int = 4, num_stages: int = 3,
                       waves: float = 4.0, fold: tuple[torch.Tensor, torch.Tensor, int, int, int] | None = None,
                       new_kv: NewKV | None = None, pdl: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dim selection and pass 1 of page top-T (2 launches): ``(B*Hkv, NP)`` float32 page scores (unscaled
    approximate logits, max over the page and the group's heads) and the ``(B*Hkv, G, D)`` projected queries.
    ``fold`` = (list, nfull, n_sel, sinks, recent): the last program of each KV group also selects the pages (as
    ``_page_select_kernel``), saving a launch."""
    _need_triton()
    batch, q_heads, dim = q.shape
    groups = kd.shape[1]
    rep = q_heads // groups
    s_kb, s_kh, s_kp, s_kd, _ = kd_layout(kd, page)
    dims = min(dims, dim)
    KP = _kp(dims)
    n_pages = -(-length // page)
    bh = batch * groups
    qf = torch.empty(bh, rep, dim, device=q.device, dtype=q.dtype)
    pdl = use_pdl(q.device, pdl)
    qsel, idx, _ = launch_select_dims(q, proj, dims, qf, new_kv=new_kv, pdl=pdl)
    contig = s_kp == page
    ppi = max(1, score_block // page) if contig else 1
    steps = -(-n_pages // ppi)
    splits = max(1, min(steps, -(-int(waves * _sms(q.device)) // bh)))
    per_split = -(-steps // splits) * ppi
    splits = -(-n_pages // per_split)
    pscores = torch.empty(bh, n_pages, device=q.device, dtype=torch.float32)
    if fold is not None:
        chosen, nfull, n_sel, sinks, recent = fold
        counters = _counters(bh, q.device)
    else:
        chosen = nfull = counters = pscores
        n_sel, sinks, recent = 1, 0, 0
    _page_score_kernel[(bh, splits)](
        qsel, idx, kd, pscores, counters, chosen, nfull, length, dims, n_pages, per_split, groups, n_sel, sinks, recent,
        s_kb, s_kh, s_kp, s_kd,
        G=rep, GP=_gp(rep), KP=KP, PAGE=page, PPI=ppi, FULL_ROWS=dims == KP, CONTIG=contig,
        FOLD=fold is not None, NPP=select_width(n_pages, sinks, recent), num_warps=num_warps, num_stages=num_stages,
        PLANES=is_planes(kd), **_pdl_opts(pdl),
    )
    return pscores, qf


# page scoring on key planes, by kept dims (KP): at 32 (k = d/4 of 128), 2 warps, 2 stages and 8 programs per SM.
# H100, 3 interleaved repeats, 1 sink + 8 recent pages, against 4 warps, 3 stages: k=0.25 T=L/32 B8 x 32K 74.1 ->
# 71.8 us (docs/results/sweeps/planes_warps-h100.json); in `aqua bench` B8 x 32K 74.2 -> 70.9, B8 x 128K 211.9 ->
# 210.3, B1 x 32K 24.2 -> 23.6, B1 x 128K 51.7 -> 50.9. At 64 (k = d/2) the sweep's best (128-token steps, same
# warps, stages and programs) measured 113.7 -> 110.7 us at B8 x 32K but 365.8 -> 397.2 in `aqua bench` at B8 x
# 128K: not kept. Other widths were not measured: they take the bf16 launch.
PLANES_SCORE = {32: (256, 2, 2, 8.0)}


def score_launch(kd: torch.Tensor, dims: int, bh: int, waves: float, block: int | None = None, warps: int | None = None,
                 stages: int | None = None, score_waves: float | None = None,
                 by_max: bool = True) -> tuple[int, int, int, float]:
    """(tokens a step, warps, stages, programs per SM) of the page scoring pass; what is None comes from the measured
    defaults: ``PLANES_SCORE`` where pages are ranked by max (``by_max``) on key planes, else 256 tokens, 4 warps,
    3 stages and 2 programs per SM at up to 16 KV groups a step (``waves`` above)."""
    width = _kp(min(dims, key_dim(kd)))
    if by_max and is_planes(kd) and width in PLANES_SCORE:
        d_block, d_warps, d_stages, d_waves = PLANES_SCORE[width]
    else:
        d_block, d_warps, d_stages, d_waves = 256, 4, 3, 2.0 if bh <= 16 else waves
    return (block or d_block, warps or d_warps, stages or d_stages, d_waves if score_waves is None else score_waves)


def launch_bound_scores(q: torch.Tensor, proj: torch.Tensor, bounds: torch.Tensor, dims: int, page: int, length: int,
                        block: int = 128, num_warps: int = 4, waves: float = 2.0, new_kv: NewKV | None = None,
                        pdl: bool | None = None, bound_page: int | None = None) -> tuple[torch.Tensor, ...]:
    """Dim selection and pass 1 of page top-T by bound (2 launches): ``(B*Hkv, NP)`` float32 page scores (the
    bound of ``paged.bound_scores``, max over the group's heads and the page's sub-pages), the ``(B*Hkv, G, D)``
    projected queries, and the selection (``launch_select_dims``'s queries and dims) for a re-rank. ``bounds`` ``(B, Hkv, 2, D, >= NS)``: ``paged.page_bounds`` of sub-pages of
    ``bound_page`` tokens (default ``page``); ``new_kv`` also folds the token into them. ``block``: sub-pages a
    step."""
    _need_triton()
    from .paged import check_bound_page

    batch, q_heads, dim = q.shape
    groups = bounds.shape[1]
    sub = check_bound_page(page, bound_page)
    ratio = page // sub
    n_pages, n_sub = -(-length // page), -(-length // sub)
    if bounds.dim() != 5 or bounds.shape[2] != 2 or bounds.shape[3] != dim or bounds.shape[4] < n_sub:
        raise ValueError(f"page bounds must be (B, Hkv, 2, {dim}, >= {n_sub}), got {tuple(bounds.shape)}")
    assert bounds.stride(4) == 1, "page bounds need unit stride along pages"
    rep = q_heads // groups
    dims = min(dims, dim)
    bh = batch * groups
    qf = torch.empty(bh, rep, dim, device=q.device, dtype=q.dtype)
    pdl = use_pdl(q.device, pdl)
    qsel, idx, _ = launch_select_dims(q, proj, dims, qf, new_kv=new_kv, pdl=pdl, bounds=(bounds, sub))
    bnp = max(1, block // ratio)  # pages a step
    steps = -(-n_pages // bnp)
    splits = max(1, min(steps, -(-int(waves * _sms(q.device)) // bh)))
    per_split = -(-steps // splits) * bnp
    splits = -(-n_pages // per_split)
    pscores = torch.empty(bh, n_pages, device=q.device, dtype=torch.float32)
    _bound_score_kernel[(bh, splits)](
        qsel, idx, bounds, pscores, dims, n_pages, n_sub, per_split, groups,
        bounds.stride(0), bounds.stride(1), bounds.stride(2), bounds.stride(3),
        G=rep, GP=_gp(rep), KP=_kp(dims), BNP=bnp, R=ratio, num_warps=num_warps, **_pdl_opts(pdl),
    )
    return pscores, qf, qsel, idx


RERANK_LAUNCH = {"waves": 4.0, "num_warps": 4, "num_stages": 3}  # the candidates' scoring: 4 programs per SM measured
# fastest (H100, k=0.5 T=L/16: B8 x 32K 94.4 vs 100.3 us with 2, B1 x 32K 33.3 vs 34.4, B1 x 128K 65.7 vs 70.8;
# docs/results/sweeps/rerank-h100.json)


def _rerank(qsel: torch.Tensor, idx: torch.Tensor, kd: torch.Tensor, pscores: torch.Tensor, nfull: torch.Tensor, rep: int,
            dims: int, page: int, length: int, n_cand: int, sinks: int, recent: int, pdl: bool) -> None:
    """Replace the bound scores by the candidates' max scores (every other free page at -inf), in place: the
    candidates' selection, then their scores from the kept dims of their keys (``qsel``, ``idx``: the dim
    selection's outputs). ``nfull`` is scratch here: the final page selection writes it again."""
    groups = kd.shape[1]
    bh, n_pages = pscores.shape
    device = pscores.device
    cands = torch.empty(bh, n_cand, device=device, dtype=torch.int32)
    npp = select_width(n_pages, sinks, recent)
    _page_select_kernel[(bh,)](pscores, cands, nfull, n_pages, n_cand, length, sinks, recent, PAGE=page, NPP=npp, MARK=True,
                               num_warps=8 if npp >= 1024 else 4, **_pdl_opts(pdl))
    s_kb, s_kh, s_kp, s_kd, _ = kd_layout(kd, page)
    splits = max(1, min(n_cand, -(-int(RERANK_LAUNCH["waves"] * _sms(device)) // bh)))
    per = -(-n_cand // splits)
    _rerank_score_kernel[(bh, -(-n_cand // per))](
        qsel, idx, kd, cands, pscores, length, dims, n_pages, n_cand, per, groups, s_kb, s_kh, s_kp, s_kd,
        G=rep, GP=_gp(rep), KP=_kp(dims), PAGE=page, num_warps=RERANK_LAUNCH["num_warps"],
        num_stages=RERANK_LAUNCH["num_stages"], PLANES=is_planes(kd), **_pdl_opts(pdl),
    )


def launch_pages(q: torch.Tensor, proj: torch.Tensor, kd: torch.Tensor, v: torch.Tensor, dims: int, token_ratio: float,
                 scale: float, page: int = 64, length: int | None = None, score_block: int | None = None,
                 score_warps: int | None = None, score_stages: int | None = None, attend_warps: int = 4,
                 attend_stages: int = 3, waves: float = 4.0,
                 attend_waves: float = 2.0, fold_select: bool = False, sink_pages: int = 0,
                 recent_pages: int = 0, score_waves: float | None = None, new_kv: NewKV | None = None,
                 pdl: bool | None = None, bounds: torch.Tensor | None = None, bound_block: int = 128,
                 bound_page: int | None = None, rerank: int = 0) -> torch.Tensor:
    """Dims + top-T pages: 5 launches (select dims, score pages, select pages, exact pass over them, combine;
    4 with ``fold_select``: the scoring pass's last program per KV group selects the pages).
    The keys are read only from ``kd`` (see ``kd_layout``): no token-major copy. ``length`` defaults to
    ``v.shape[2]`` (token-major values) and must be given for paged values. ``sink_pages``/``recent_pages``:
    the first and the last pages are always kept, on top of the ``pages_for`` best (as
    ``paged.select_pages_forced``). ``bounds`` (``paged.page_bounds``): rank the pages by their bound
    (``launch_bound_scores``) instead of their tokens' max score; ``fold_select`` does not apply; ``rerank`` > 0:
    the ``rerank`` x budget best pages by bound are candidates, ranked by their tokens' max score (2 more launches:
    the candidates' selection and their scores)."""
    _need_triton()
    from .paged import n_forced, pages_for

    batch, q_heads, dim = q.shape
    groups = kd.shape[1]
    rep = q_heads // groups
    s_kb, s_kh, s_kp, s_kd, kdim = kd_layout(kd, page)
    assert kdim == dim and page >= 16 and page & (page - 1) == 0, "page must be a power of two >= 16"
    if length is None:
        assert v.dim() == 4, "give length= for paged values"
        length = v.shape[2]
    s_vb, s_vh, s_vl = _v_rows(v, page)
    dims = min(dims, dim)
    n_pages = -(-length // page)
    n_sel = min(n_pages, pages_for(token_ratio, length, page) + n_forced(n_pages, sink_pages, recent_pages))
    if n_pages > 16384:
        raise ValueError(f"{n_pages} pages is more than the page kernels hold (16384): use larger pages")
    bh = batch * groups
    pdl = use_pdl(q.device, pdl)
    chosen = torch.empty(bh, n_sel, device=q.device, dtype=torch.int32)
    nfull = torch.empty(bh, device=q.device, dtype=torch.int32)
    score_block, score_warps, score_stages, score_waves = score_launch(kd, dims, bh, waves, score_block, score_warps,
                                                                      score_stages, score_waves, by_max=bounds is None)
    if bounds is not None:
        fold_select = False
        pscores, qf, qsel, idx = launch_bound_scores(q, proj, bounds, dims, page, length, bound_block, score_warps,
                                                     score_waves, new_kv, pdl, bound_page)
        n_cand = min(n_pages, rerank * pages_for(token_ratio, length, page) + n_forced(n_pages, sink_pages, recent_pages))
        if rerank > 0 and n_cand > n_sel:
            _rerank(qsel, idx, kd, pscores, nfull, rep, dims, page, length, n_cand, sink_pages, recent_pages, pdl)
    else:
        pscores, qf = launch_page_scores(q, proj, kd, dims, page, length, score_block, score_warps, score_stages, score_waves,
                                         (chosen, nfull, n_sel, sink_pages, recent_pages) if fold_select else None, new_kv, pdl)
    if not fold_select:
        npp = select_width(n_pages, sink_pages, recent_pages)
        _page_select_kernel[(bh,)](pscores, chosen, nfull, n_pages, n_sel, length, sink_pages, recent_pages, PAGE=page, NPP=npp,
                                   num_warps=8 if npp >= 1024 else 4, **_pdl_opts(pdl))
    splits2 = max(1, min(n_sel, -(-int(attend_waves * _sms(q.device)) // bh)))
    per2 = -(-n_sel // splits2)
    splits2 = -(-n_sel // per2)
    o, m, ls = _partials(bh, splits2, rep, dim, q.device)
    _page_attend_kernel[(bh, splits2)](
        qf, chosen, nfull, kd, v, o, m, ls, length, n_sel, per2, groups, scale * LOG2E,
        s_kb, s_kh, s_kp, s_kd, s_vb, s_vh, s_vl,
        G=rep, GP=_gp(rep), D=dim, PAGE=page, num_warps=attend_warps, num_stages=attend_stages, PLANES=is_planes(kd),
        **_pdl_opts(pdl),
    )
    return _combine(o, m, ls, batch, q_heads, dim, v.dtype, pdl)


def launch_dims(sel: Selection, kd: torch.Tensor, v: torch.Tensor, scale: float, block_n: int = 128,
                num_warps: int = 4, num_stages: int = 3, waves: float = 4.0, full_rows: bool = False,
                pdl: bool | None = None) -> torch.Tensor:
    """AQUA dims only over a padded selection; -> ``(B, Hq, D)``. ``full_rows``: every one of the KP
    selection slots is valid (group selection with a power-of-two k), so rows need no mask."""
    q, idx_p, count = sel
    batch, groups, _, length = kd.shape
    dim = key_dim(kd)
    rep, KP = q.shape[1], q.shape[2]
    blocks = -(-length // block_n)
    splits = _num_splits(batch * groups, length, block_n, _sms(kd.device), waves)
    per_split = -(-blocks // splits)
    splits = -(-blocks // per_split)
    o, m, ls = _partials(batch * groups, splits, rep, dim, kd.device)
    pdl = use_pdl(kd.device, pdl)
    assert kd.stride(3) == 1 and v.stride(3) == 1
    _dims_split_kernel[(batch * groups, splits)](
        q, idx_p, count, kd, v, o, m, ls, length, per_split, groups, scale * LOG2E,
        kd.stride(0), kd.stride(1), kd.stride(2), v.stride(0), v.stride(1), v.stride(2),
        G=rep, GP=max(GROUP_PAD, _pow2(rep)), KP=KP, D=dim, BLOCK_N=block_n, FULL_ROWS=full_rows,
        num_warps=num_warps, num_stages=num_stages, PLANES=is_planes(kd), **_pdl_opts(pdl),
    )
    return _combine(o, m, ls, batch, groups * rep, dim, v.dtype, pdl)


STREAM_CTAS = 1  # programs per SM of ``_dims_stream_kernel``


def stream_layout(groups: int, length: int, block_n: int, programs: int) -> tuple[int, int, int, int]:
    """How ``_dims_stream_kernel`` deals out ``groups x ceil(length / block_n)`` blocks to about ``programs``
    programs: (blocks a group ``NB``, blocks a program ``W``, programs, partial slots a group ``S``)."""
    nb = -(-length // block_n)
    total = groups * nb
    w = -(-total // max(1, min(total, programs)))
    return nb, w, -(-total // w), -(-nb // w) + 1


def launch_dims_stream(sel: Selection, kd: torch.Tensor, v: torch.Tensor, scale: float, block_n: int = 128,
                       num_warps: int = 4, num_stages: int = 3, ctas: float | None = None, full_rows: bool = False,
                       fuse: bool = True, pdl: bool | None = None) -> torch.Tensor:
    """AQUA dims only by ``_dims_stream_kernel`` over a padded selection; -> ``(B, Hq, D)``. About ``ctas`` programs
    per SM (``STREAM_CTAS``), each streaming the same number of blocks; ``fuse``: the partials merged in the same
    launch (else a combine launch)."""
    _need_triton()
    q, idx_p, count = sel
    batch, groups, _, length = kd.shape
    dim = key_dim(kd)
    rep, KP = q.shape[1], q.shape[2]
    bhk = batch * groups
    nb, w, programs, slots = stream_layout(bhk, length, block_n, max(1, round(_sms(kd.device) * (ctas or STREAM_CTAS))))
    o, m, ls = _partials(bhk, slots, rep, dim, kd.device)
    out = torch.empty(batch, groups * rep, dim, device=kd.device, dtype=v.dtype)
    pdl = use_pdl(kd.device, pdl)
    assert kd.stride(3) == 1 and v.stride(3) == 1
    _dims_stream_kernel[(programs,)](
        q, idx_p, count, kd, v, o, m, ls, _counters(bhk, kd.device), out,
        length, nb, w, bhk * nb, groups, slots, scale * LOG2E,
        kd.stride(0), kd.stride(1), kd.stride(2), v.stride(0), v.stride(1), v.stride(2),
        G=rep, GP=_gp(rep), KP=KP, D=dim, BLOCK_N=block_n, FULL_ROWS=full_rows, PLANES=is_planes(kd), FUSE=fuse,
        num_warps=num_warps, num_stages=num_stages, **_pdl_opts(pdl),
    )
    if fuse:
        return out
    return _combine(o, m, ls, batch, groups * rep, dim, v.dtype, pdl, stream=(nb, w))


def launch_select(sel: Selection, kd: torch.Tensor, token_ratio: float, block: int, num_warps: int | None = None,
                  full_rows: bool = False, pdl: bool | None = None) -> tuple[torch.Tensor, int]:
    """Top-T token ids per KV head, ``(B*Hkv, nblocks * keep)`` int32, and ``keep`` (slots per block)."""
    q, idx_p, count = sel
    if is_planes(kd):
        raise ValueError("token top-T does not read key planes: use granularity='pages'")
    batch, groups, _, length = kd.shape
    rep, KP = q.shape[1], q.shape[2]
    keep = block_keep_for(token_ratio, block)
    nblocks = -(-length // block)
    chosen = torch.empty(batch * groups, nblocks * keep, device=kd.device, dtype=torch.int32)
    if num_warps is None:
        num_warps = 4 if KP * block <= 64 * 512 else 8
    _score_select_kernel[(batch * groups, nblocks)](
        q, idx_p, count, kd, chosen, length, groups, kd.stride(0), kd.stride(1), kd.stride(2), keep,
        G=rep, GP=max(GROUP_PAD, _pow2(rep)), KP=KP, BLOCK_C=block, ITERS=8, FANOUT=8, FULL_ROWS=full_rows,
        num_warps=num_warps, **_pdl_opts(use_pdl(kd.device, pdl)),
    )
    return chosen, keep


def launch_tokens(q: torch.Tensor, sel: torch.Tensor, keep: int, block: int, k: torch.Tensor, v: torch.Tensor,
                  scale: float, block_n: int = 32, num_warps: int = 4, num_stages: int = 3, waves: float = 4.0,
                  pdl: bool | None = None) -> torch.Tensor:
    """Exact attention over the chosen tokens. ``q`` ``(B, Hq, D)``, ``k``/``v`` ``(B, Hkv, L, D)``."""
    batch, q_heads, dim = q.shape
    groups, length = k.shape[1], k.shape[2]
    rep = q_heads // groups
    nslots = sel.shape[1]
    qs = q.contiguous()
    splits = _num_splits(batch * groups, nslots, block_n, _sms(k.device), waves)
    split_len = -(-(-(-nslots // splits)) // block_n) * block_n
    splits = -(-nslots // split_len)
    o, m, ls = _partials(batch * groups, splits, rep, dim, k.device)
    pdl = use_pdl(k.device, pdl)
    assert k.stride(3) == 1 and v.stride(3) == 1
    _tokens_split_kernel[(batch * groups, splits)](
        qs, sel, k, v, o, m, ls, length, nslots, split_len, groups, keep, block, scale * LOG2E,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        G=rep, GP=max(GROUP_PAD, _pow2(rep)), D=dim, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages,
        **_pdl_opts(pdl),
    )
    return _combine(o, m, ls, batch, q_heads, dim, v.dtype, pdl)


# -- API ----------------------------------------------------------------------------------------------
@dataclass
class DecodeConfig:
    """How one AQUA decode step runs. ``dims``: projected dims kept; ``gqa``: "group" or "head"
    (see :mod:`aqua_cli.kernels.reference`); ``token_ratio``: T/L for dims + top-T (None: dims only);
    ``granularity``: top-T by "tokens" (per ``select_block`` a share of tokens, exact pass over the
    token-major ``k``) or by "pages" (the best pages of ``page`` tokens, exact pass over the projected keys
    ``kd``: see :mod:`aqua_cli.kernels.paged`); ``select_block``: tokens per selection block (a power of two).
    The rest are launch parameters (defaults from ``scripts/sweep_decode.py`` on an H100). ``fused_select``:
    pick dims in Triton (group selection, bf16) instead of composed PyTorch ops; ``prologue``: fold that
    selection into the main kernel (dims only; pages always do) instead of a launch of its own."""

    dims: int
    gqa: str = "group"
    token_ratio: float | None = None
    select_block: int = 512
    block_n: int = 128  # tokens per inner step of the dims kernel
    num_warps: int = 4
    num_stages: int | None = None  # dims pass pipeline depth; None: ``dims_stages``
    waves: float | None = None  # programs per SM the sequence splits aim for; None: 4, but 2 for dims only at up to
    # 16 KV groups a step (H100, batch 1 x 32K / 128K, k=0.5: 49.9 / 148.6 us against 53.4 / 151.5; ``dims_waves``)
    select_warps: int | None = None  # top-T scoring kernel; None: 4 for up to 64 kept dims, else 8 (a 128 x 512 tile spills at 4)
    tokens_block_n: int = 32  # top-T exact pass
    tokens_warps: int = 4
    tokens_stages: int = 3
    fused_select: bool = True
    prologue: bool = False  # measured: a launch of its own is faster (docs/bench.md)
    granularity: str = "tokens"
    page: int = 64  # tokens per page (granularity="pages")
    score_block: int | None = None  # tokens per step of the page scoring kernel; None: 256, or ``PLANES_SCORE``'s
    score_waves: float | None = None  # None: 2 programs per SM at up to 16 KV groups a step, else ``waves`` (H100, batch 1
    # x 32K / 64K / 128K: 17.5 / 36.9 / 59.3 us against 20.6 / 37.6 / 60.2 with 4; batch 8 x 32K: 4 is faster, 110 vs 116);
    # on key planes ``PLANES_SCORE``'s
    score_warps: int | None = None  # None: 4, or ``PLANES_SCORE``'s
    score_stages: int | None = None  # None: 3, or ``PLANES_SCORE``'s
    attend_warps: int = 4
    attend_stages: int = 3  # 3 vs 2: no measurable difference in an interleaved A/B (H100: B8 x 32K 143.7 vs 143.9 us)
    attend_waves: float = 2.0
    fold_select: bool = False  # pages: the scoring pass's last program per KV group selects the pages (measured no faster)
    page_score: str = "max"  # pages: "max" (their tokens' best approximate logit) or "bound" (Quest's bound from the
    # cache's per-page min and max, ``paged.page_bounds``: reads a 32nd of the bytes at pages of 64; pass ``bounds=``)
    bound_block: int = 128  # sub-pages per step of the bound scoring kernel
    bound_page: int | None = None  # tokens one bound covers (a power-of-two divisor of ``page``; None: ``page``)
    rerank: int = 0  # "bound": re-rank the rerank x budget best pages by bound by their tokens' max score (0: off)
    pdl: bool | None = None  # programmatic dependent launch between the step's kernels (``use_pdl``; None: where it exists)
    stream: bool | None = None  # dims only: the balanced kernel (``_dims_stream_kernel``); None: ``dims_stream``
    stream_ctas: float | None = None  # its programs per SM; None: ``STREAM_CTAS``
    stream_block: int = 256  # its tokens a step (``stream_tile``); stages: ``num_stages``, else ``stream_stages``
    stream_stages: int = 2

    def __post_init__(self) -> None:
        if self.select_block < 16 or self.select_block & (self.select_block - 1):
            raise ValueError(f"select_block must be a power of two >= 16, got {self.select_block}")
        if self.granularity not in ("tokens", "pages"):
            raise ValueError(f"granularity must be tokens or pages, got {self.granularity!r}")
        if self.page < 16 or self.page & (self.page - 1):
            raise ValueError(f"page must be a power of two >= 16, got {self.page}")
        if self.token_ratio is not None:
            block_keep_for(self.token_ratio, self.select_block)
        from .paged import check_bound_page, check_page_score

        try:  # the checks of the PyTorch side, raised as this class's other ones
            check_page_score(self.page_score)
            check_bound_page(self.page, self.bound_page)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None


def dims_waves(config: DecodeConfig, kd: torch.Tensor) -> float:
    """Programs per SM of the dims-only pass: ``config.waves``, else 2 where a step has at most 16 KV groups
    (batch 1-2 of an 8-KV-head model: fewer, longer programs leave less to the combine and the tail) and 4 above
    (batch 8: 2 per SM measured 305 vs 279 us at 32K). ``docs/results/sweeps/dimsfold-h100.json``."""
    if config.waves is not None:
        return config.waves
    return 2.0 if kd.shape[0] * kd.shape[1] <= 16 else 4.0


def dims_stages(config: DecodeConfig, kd: torch.Tensor) -> int:
    """Pipeline stages of the dims-only pass: ``config.num_stages``, else 4 where a step has at least 64 KV groups
    and keeps at most 64 dims (batch 8 of an 8-KV-head model: a deeper pipeline keeps more of K and V in flight per
    program), 3 elsewhere. H100, two instances, interleaved: batch 8 x 32K / 128K k=0.5 -2.5 to -3.4% / -4.6 to
    -5.3%, k=0.25 alike; batch 2 and 4 +0.5 to +2.8%; k=0.75 (a 128-row tile) no better
    (``docs/results/sweeps/stages_ab-h100-run*.json``, ``dims_tiles-h100.json``)."""
    if config.num_stages is not None:
        return config.num_stages
    return 4 if kd.shape[0] * kd.shape[1] >= 64 and _kp(min(config.dims, key_dim(kd))) <= 64 else 3


STREAM_MIN_GROUPS = 64  # dims only takes the balanced kernel from this many KV groups a step (``dims_stream``)


def dims_stream(config: DecodeConfig, kd: torch.Tensor) -> bool:
    """Whether dims only runs ``_dims_stream_kernel`` (selection launch, then one balanced launch that also merges)
    instead of the split kernel and a combine launch: ``config.stream``, else from ``STREAM_MIN_GROUPS`` KV groups a
    step. H100, interleaved (``docs/results/sweeps/stream-h100.json``): batch 8 x 32K k=0.5 292.8 -> 278.1 us,
    k=0.75 333.0 -> 324.7, 128K 1120 -> 1054; at batch 1 the split kernel is as fast or faster (48.5 vs 49.9 us)."""
    if config.stream is not None:
        return config.stream
    return kd.shape[0] * kd.shape[1] >= STREAM_MIN_GROUPS


STREAM_TILE_BYTES = 128 * 1024  # a stage of the balanced kernel (the kept key rows and the values of one step) at most


def stream_tile(config: DecodeConfig, kd: torch.Tensor) -> int:
    """Tokens a step of the balanced dims kernel: ``config.stream_block``, halved while a stage's tile (``KP`` key rows
    and ``D`` value columns, 2 bytes each) is over ``STREAM_TILE_BYTES`` (head_dim 256), at least 32."""
    dim = key_dim(kd)
    rows = _kp(min(config.dims, dim)) + dim
    block = config.stream_block
    while block > 32 and rows * 2 * block > STREAM_TILE_BYTES:
        block //= 2
    return block


def _write_with_bounds(new_kv: NewKV, proj: torch.Tensor, bounds: torch.Tensor | None, config: DecodeConfig) -> None:
    """``write_new_kv`` in PyTorch, and the token folded into the page bounds where there are some."""
    write_new_kv(new_kv, proj)
    if bounds is not None:
        from .paged import update_page_bounds

        update_page_bounds(bounds, new_kv[2], new_kv[4], config.bound_page or config.page)


def select_for_kernels(q: torch.Tensor, proj: torch.Tensor, config: DecodeConfig,
                       new_kv: NewKV | None = None, bounds: torch.Tensor | None = None) -> tuple[Selection, bool]:
    """The padded selection the kernels read, and whether all its KP slots are valid (``new_kv``: see
    ``launch_select_dims``, with ``bounds`` folded in too; written in PyTorch where the selection is not fused)."""
    dim = q.shape[-1]
    dims = min(config.dims, dim)
    if config.fused_select and fused_selection_supported(q, proj, config.gqa):
        fold = None if bounds is None else (bounds, config.bound_page or config.page)
        return launch_select_dims(q, proj, dims, new_kv=new_kv, pdl=config.pdl, bounds=fold), dims == _kp(dims)
    if new_kv is not None:
        _write_with_bounds(new_kv, proj, bounds, config)
    qp = project_queries(q, proj).to(q.dtype)
    idx, count, qsel = select_dims(qp, dims, config.gqa)
    return pad_selection(qsel, idx, count), config.gqa == "group" and dims == _kp(dims)


def aqua_decode(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor, kd: torch.Tensor, proj: torch.Tensor,
                config: DecodeConfig, scale: float | None = None, sink_pages: int = 0, recent_pages: int = 0,
                new_kv: NewKV | None = None, bounds: torch.Tensor | None = None) -> torch.Tensor:
    """One AQUA decode step with the fused kernels; same result as ``aqua_decode_reference`` (dims, token
    top-T) or ``paged.aqua_decode_pages_reference`` (page top-T).

    ``q`` ``(B, Hq, D)``; ``k``, ``v`` ``(B, Hkv, L, D)`` token-major (``k`` only read for token top-T; pass
    None otherwise); ``kd`` ``(B, Hkv, D, L)`` projected keys (``project_keys``), or paged for pages;
    ``proj`` ``(Hkv, D, D)`` float32 (orthogonal for pages: their exact pass computes ``(qP).(kP)``).
    ``kd`` may be key planes (uint8, ``reference.key_planes``) for dims only and page top-T.
    ``scale``: softmax scale (default ``D**-0.5``); ``sink_pages``/``recent_pages`` (pages only): the first and
    last pages are always kept, on top of the best ``pages_for`` pages. ``new_kv``: this step's token, not yet in
    ``kd``/``v`` (``(k_new, v_new, kd_buffer, v_buffer, pos)``): written by the dim-selection launch before any
    pass reads the cache (``write_new_kv`` in PyTorch for the paths without one). ``bounds``: the page bounds of
    ``kd`` (``paged.page_bounds`` of ``config.bound_page`` tokens, ``(B, Hkv, 2, D, >= NS)``), needed by
    ``page_score="bound"``; on every path a ``new_kv`` token is folded into them (in the same launch where the
    selection is fused).
    Launches: dims 3 (dim selection, main pass, combine; 2 with ``prologue`` or the balanced kernel, ``dims_stream``);
    pages 5 (dim selection, page scores, page selection, exact pass, combine; 4 with ``fold_select``); token top-T 4
    (selection, scoring, exact pass, combine).
    """
    dim = q.shape[-1]
    scale = dim ** -0.5 if scale is None else scale
    fused = config.fused_select and fused_selection_supported(q, proj, config.gqa)
    if is_planes(kd) and ((config.token_ratio is not None and config.granularity == "tokens") or config.prologue):
        raise ValueError("key planes are read by dims only and page top-T (not by token top-T or prologue=True)")
    if config.token_ratio is not None and config.granularity == "pages":
        if not fused:
            raise ValueError("page top-T needs the in-kernel selection: gqa='group', bf16 q, power-of-two head_dim 16..256")
        if config.page_score == "bound" and bounds is None:
            raise ValueError("page_score='bound' ranks pages by the cache's page bounds: pass bounds= (paged.page_bounds)")
        if bounds is not None and config.page_score != "bound" and new_kv is not None:
            _write_with_bounds(new_kv, proj, bounds, config)
            new_kv = None
        return launch_pages(q, proj, kd, v, config.dims, config.token_ratio, scale, config.page,
                            score_block=config.score_block, score_warps=config.score_warps,
                            score_stages=config.score_stages, attend_warps=config.attend_warps,
                            attend_stages=config.attend_stages, waves=config.waves or 4.0, attend_waves=config.attend_waves,
                            fold_select=config.fold_select, sink_pages=sink_pages, recent_pages=recent_pages,
                            score_waves=config.score_waves, new_kv=new_kv, pdl=config.pdl,
                            bounds=bounds if config.page_score == "bound" else None, bound_block=config.bound_block,
                            bound_page=config.bound_page, rerank=config.rerank)
    if new_kv is not None and (config.prologue or config.token_ratio is not None):
        _write_with_bounds(new_kv, proj, bounds, config)
        new_kv = None
    if config.token_ratio is None and fused and config.prologue:
        return launch_dims_fused(q, proj, kd, v, config.dims, scale, config.block_n, config.num_warps, config.num_stages or 3,
                                 config.waves or 4.0, config.pdl)
    sel, full_rows = select_for_kernels(q, proj, config, new_kv, bounds)
    if config.token_ratio is None and dims_stream(config, kd):
        return launch_dims_stream(sel, kd, v, scale, stream_tile(config, kd), config.num_warps,
                                  config.num_stages or config.stream_stages, config.stream_ctas, full_rows, pdl=config.pdl)
    if config.token_ratio is None:
        return launch_dims(sel, kd, v, scale, config.block_n, config.num_warps, dims_stages(config, kd), dims_waves(config, kd), full_rows,
                           config.pdl)
    chosen, keep = launch_select(sel, kd, config.token_ratio, config.select_block, config.select_warps, full_rows, config.pdl)
    return launch_tokens(q, chosen, keep, config.select_block, k, v, scale, config.tokens_block_n, config.tokens_warps,
                         config.tokens_stages, config.waves or 4.0, config.pdl)
