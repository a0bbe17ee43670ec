"""Fused AQUA decode kernels (Triton): kernels first, then launchers, then the API.

Decode attention reads the whole KV cache once per step, so it is bound by memory traffic. The only way
AQUA pays is to *read fewer bytes*, so the keys live a second time in the projected basis,
dimension-major (``kd`` ``(B, Hkv, D, L)``): a selected dimension is one contiguous row, and reading ``k``
of ``D`` dims reads ``k/D`` of the key bytes, fully coalesced.

* ``_dims_split_kernel``: AQUA dims only. One program per (batch, KV head, split of the sequence), all
  ``G`` query heads of the group at once (GQA-packed, rows padded to 16 for ``tl.dot``): logits over the
  selected rows of ``kd``, online softmax, times ``v``; partial results per split (flash-decoding).
* ``_score_select_kernel``: dims + top-T, step 1. One program per block of ``BLOCK_C`` tokens: logits over
  the selected dims, max over the group's heads, a threshold found by bisection for the block's share
  of tokens, and the chosen token ids written compactly. No global sort, no scores in memory.
* ``_tokens_split_kernel``: step 2. Exact attention (full ``q``, token-major ``k``, ``v``) over the chosen
  token ids; partials per split.
* ``_combine_kernel``: merges the splits' partial softmax sums.

Importing this module needs Triton (and the kernels a CUDA GPU); :mod:`aqua_cli.kernels` imports it lazily.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .reference import block_keep_for, project_queries, select_dims

LOG2E = 1.4426950408889634
GROUP_PAD = 16  # tl.dot needs at least 16 rows


# -- kernels ------------------------------------------------------------------------------------------
@triton.jit
def _select_dims_kernel(
    Q,  # (B, Hq, D) queries, contiguous; query head h*G + g reads KV head h
    P,  # (Hkv, D, D) float32 projection, contiguous
    QSEL,  # (B*Hkv, G, KP) out: projected queries at the selected dims (ascending), in Q's dtype
    IDX,  # (B*Hkv, KP) int32 out: selected dims, ascending
    CNT,  # (B*Hkv,) int32 out: K
    HKV, K,
    G: tl.constexpr, GP: tl.constexpr, KP: tl.constexpr, D: tl.constexpr, CK: tl.constexpr,
):
    """Per KV group: qP for the group's heads, sum |qP| over them, the top K dims and their q values.

    Exact rank (no sort, no bisection): dim i ranks by how many dims beat it, larger score first and
    the lower index on an exact tie; ranks < K are kept, their slots come from a prefix sum."""
    bh = tl.program_id(0)
    h = bh % HKV
    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, D)
    offs_c = tl.arange(0, CK)
    gmask = offs_g < G
    # qP by FMA in float32, CK rows of P at a time (independent loads; a (GP, D) x (D, D) tl.dot in
    # float32 would hold a whole operand per thread and spill)
    qp = tl.zeros([GP, D], tl.float32)
    for c0 in tl.static_range(0, D, CK):
        qc = tl.load(Q + bh * G * D + offs_g[:, None, None] * D + (c0 + offs_c)[None, :, None],
                     mask=gmask[:, None, None], other=0.0).to(tl.float32)  # (GP, CK, 1)
        pc = tl.load(P + h * D * D + (c0 + offs_c)[None, :, None] * D + offs_d[None, None, :])  # (1, CK, D)
        qp += tl.sum(qc * pc, 1)
    qp = qp.to(Q.dtype.element_ty)  # the reference rounds qP to q's dtype too
    score = tl.sum(tl.abs(qp.to(tl.float32)), 0)  # (D,) padded rows are zero
    s_i = score[:, None]
    s_j = tl.reshape(score, (1, D))
    i_idx = offs_d[:, None]
    j_idx = tl.reshape(offs_d, (1, D))
    beats = (s_j > s_i) | ((s_j == s_i) & (j_idx < i_idx))
    rank = tl.sum(beats.to(tl.int32), 1)  # (D,)
    keep = rank < K
    pos = tl.cumsum(keep.to(tl.int32), 0) - 1
    tl.store(IDX + bh * KP + pos, offs_d, mask=keep)
    tl.store(QSEL + bh * G * KP + offs_g[:, None] * KP + pos[None, :], qp, mask=gmask[:, None] & keep[None, :])
    tl.store(CNT + bh, K)


@triton.jit
def _dims_block(q, idx, jmask, kbase, vbase, s_kd, s_vl, n0, L, m_i, l_i, acc, qk_scale,
                BLOCK_N: tl.constexpr, D: tl.constexpr, MASKED: tl.constexpr, FULL_ROWS: tl.constexpr):
    """One block of BLOCK_N tokens of the dims kernel; unmasked along tokens unless MASKED (the tail),
    so that the loads of the full blocks are 16 bytes wide."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    kptr = kbase + idx[:, None] * s_kd + offs_n[None, :]
    vptr = vbase + offs_n[:, None].to(tl.int64) * s_vl + offs_d[None, :]
    if MASKED:
        nmask = offs_n < L
        if FULL_ROWS:
            kd = tl.load(kptr, mask=nmask[None, :], other=0.0)
        else:
            kd = tl.load(kptr, mask=jmask[:, None] & nmask[None, :], other=0.0)
        v = tl.load(vptr, mask=nmask[:, None], other=0.0)
    else:
        if FULL_ROWS:
            kd = tl.load(kptr)
        else:
            kd = tl.load(kptr, mask=jmask[:, None], other=0.0)
        v = tl.load(vptr)
    s = tl.dot(q, kd) * qk_scale  # (GP, BN)
    if MASKED:
        s = tl.where(nmask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
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
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    nsplit = tl.num_programs(1)
    b = bh // HKV
    h = bh % HKV
    offs_j = tl.arange(0, KP)
    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, D)
    if FULL_ROWS:
        jmask = offs_j < KP
        idx = tl.load(IDX + bh * KP + offs_j).to(tl.int64)
        q = tl.load(Q + bh * G * KP + offs_g[:, None] * KP + offs_j[None, :], mask=offs_g[:, None] < G, other=0.0)
    else:
        cnt = tl.load(CNT + bh)
        jmask = offs_j < cnt
        idx = tl.load(IDX + bh * KP + offs_j, mask=jmask, other=0).to(tl.int64)
        q = tl.load(Q + bh * G * KP + offs_g[:, None] * KP + offs_j[None, :], mask=(offs_g[:, None] < G) & jmask[None, :], other=0.0)
    kbase = KD + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
    vbase = V + b.to(tl.int64) * s_vb + h.to(tl.int64) * s_vh
    blk0 = split * blocks_per_split
    blk1 = tl.minimum(blk0 + blocks_per_split, tl.cdiv(L, BLOCK_N))
    full_end = tl.maximum(tl.minimum(blk1, L // BLOCK_N), blk0)
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    for blk in range(blk0, full_end):
        m_i, l_i, acc = _dims_block(q, idx, jmask, kbase, vbase, s_kd, s_vl, blk * BLOCK_N, L, m_i, l_i, acc, qk_scale,
                                    BLOCK_N, D, False, FULL_ROWS)
    if full_end < blk1:  # the sequence's last, partial block
        m_i, l_i, acc = _dims_block(q, idx, jmask, kbase, vbase, s_kd, s_vl, full_end * BLOCK_N, L, m_i, l_i, acc, qk_scale,
                                    BLOCK_N, D, True, FULL_ROWS)
    row = (bh * nsplit + split) * G + offs_g
    gmask = offs_g < G
    tl.store(M + row, m_i, mask=gmask)
    tl.store(LS + row, l_i, mask=gmask)
    tl.store(O + row[:, None] * D + offs_d[None, :], acc, mask=gmask[:, None])


@triton.jit
def _score_select_kernel(
    Q, IDX, CNT,  # as in _dims_split_kernel (the scale does not change the ranking)
    KD,  # (B, Hkv, D, L)
    SEL,  # (B*Hkv, nblocks * KEEP) int32 chosen token ids; block c owns slots [c*KEEP, (c+1)*KEEP)
    L, HKV, s_kb, s_kh, s_kd,
    KEEP,  # tokens kept from a full block (ceil(ratio * BLOCK_C))
    G: tl.constexpr, GP: tl.constexpr, KP: tl.constexpr, BLOCK_C: tl.constexpr, ITERS: tl.constexpr,
    FANOUT: tl.constexpr, FULL_ROWS: tl.constexpr,
):
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
    s = tl.dot(q, kd)  # (GP, BLOCK_C)
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
    tl.store(SEL + bh * nblk * KEEP + blk * KEEP + pos, offs_n, mask=keep)


@triton.jit
def _tokens_split_kernel(
    Q,  # (B*Hkv, G, D) full queries (contiguous (B, Hq, D))
    SEL,  # (B*Hkv, nslots) int32 token ids (see _score_select_kernel)
    K, V,  # (B, Hkv, L, D) token-major; strides s_*b, s_*h, s_*l, 1
    O, M, LS,  # partials as in _dims_split_kernel
    L, nslots, split_len, HKV, KEEP, BLOCK_C, qk_scale,
    s_kb, s_kh, s_kl, s_vb, s_vh, s_vl,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
):
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
        s = tl.dot(q, tl.trans(k)) * qk_scale  # (GP, BN)
        s = tl.where(smask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vbase + tok[:, None] * s_vl + offs_d[None, :], mask=smask[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    row = (bh * nsplit + split) * G + offs_g
    gmask = offs_g < G
    tl.store(M + row, m_i, mask=gmask)
    tl.store(LS + row, l_i, mask=gmask)
    tl.store(O + row[:, None] * D + offs_d[None, :], acc, mask=gmask[:, None])


@triton.jit
def _combine_kernel(
    O, M, LS,  # partials (B*Hkv, S, G, D), (B*Hkv, S, G)
    OUT,  # (B*Hkv*G, D) = (B, Hq, D) output in the input dtype
    S, G: tl.constexpr, SP: tl.constexpr, D: tl.constexpr,
):
    pid = tl.program_id(0)  # (b, h, g)
    bh = pid // G
    g = pid % G
    offs_s = tl.arange(0, SP)
    offs_d = tl.arange(0, D)
    smask = offs_s < S
    rows = (bh * S + offs_s) * G + g
    m = tl.load(M + rows, mask=smask, other=float("-inf"))
    l = tl.load(LS + rows, mask=smask, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.where(m > float("-inf"), tl.exp2(m - m_max), 0.0)
    acc = tl.load(O + rows[:, None] * D + offs_d[None, :], mask=smask[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(OUT + pid * D + offs_d, out.to(OUT.dtype.element_ty))


# -- launchers ----------------------------------------------------------------------------------------
def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _num_splits(work_items: int, length: int, block: int, sms: int, waves: float = 4.0) -> int:
    """Flash-decoding split: enough programs to fill the GPU about ``waves`` times over, whole blocks per split."""
    blocks = max(1, -(-length // block))
    return max(1, min(blocks, -(-int(waves * sms) // work_items)))


_SMS: dict[int, int] = {}


def _sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


def _combine(o: torch.Tensor, m: torch.Tensor, ls: torch.Tensor, batch: int, q_heads: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    bhk, splits, group = m.shape
    out = torch.empty(batch, q_heads, dim, device=o.device, dtype=dtype)
    _combine_kernel[(bhk * group,)](o, m, ls, out, splits, G=group, SP=_pow2(splits), D=dim, num_warps=4)
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
    dim = q.shape[-1]
    return gqa == "group" and dim & (dim - 1) == 0 and 16 <= dim <= 256 and proj.dtype == torch.float32


def launch_select_dims(q: torch.Tensor, proj: torch.Tensor, dims: int) -> Selection:
    """Per-KV-group dim selection in one launch (``gqa="group"``): the same set as ``select_dims`` up to
    exact ties of ``sum_g |qP|`` (broken here by the lower index). ``q`` ``(B, Hq, D)``, ``proj``
    ``(Hkv, D, D)`` float32 on q's device."""
    batch, q_heads, dim = q.shape
    groups = proj.shape[0]
    rep = q_heads // groups
    dims = min(dims, dim)
    KP = _kp(dims)
    qc = q.contiguous()
    pc = proj.contiguous()
    qsel = torch.empty(batch * groups, rep, KP, device=q.device, dtype=q.dtype)
    idx = torch.empty(batch * groups, KP, device=q.device, dtype=torch.int32)
    count = torch.empty(batch * groups, device=q.device, dtype=torch.int32)
    _select_dims_kernel[(batch * groups,)](
        qc, pc, qsel, idx, count, groups, dims,
        G=rep, GP=_pow2(rep), KP=KP, D=dim, CK=min(dim, 16), num_warps=4,
    )
    return qsel, idx, count


def launch_dims(sel: Selection, kd: torch.Tensor, v: torch.Tensor, scale: float, block_n: int = 128,
                num_warps: int = 4, num_stages: int = 3, waves: float = 4.0, full_rows: bool = False) -> torch.Tensor:
    """AQUA dims only over a padded selection; -> ``(B, Hq, D)``. ``full_rows``: every one of the KP
    selection slots is valid (group selection with a power-of-two k), so rows need no mask."""
    q, idx_p, count = sel
    batch, groups, dim, length = kd.shape
    rep, KP = q.shape[1], q.shape[2]
    blocks = -(-length // block_n)
    splits = _num_splits(batch * groups, length, block_n, _sms(kd.device), waves)
    per_split = -(-blocks // splits)
    splits = -(-blocks // per_split)
    o, m, ls = _partials(batch * groups, splits, rep, dim, kd.device)
    assert kd.stride(3) == 1 and v.stride(3) == 1
    _dims_split_kernel[(batch * groups, splits)](
        q, idx_p, count, kd, v, o, m, ls, length, per_split, groups, scale * LOG2E,
        kd.stride(0), kd.stride(1), kd.stride(2), v.stride(0), v.stride(1), v.stride(2),
        G=rep, GP=max(GROUP_PAD, _pow2(rep)), KP=KP, D=dim, BLOCK_N=block_n, FULL_ROWS=full_rows,
        num_warps=num_warps, num_stages=num_stages,
    )
    return _combine(o, m, ls, batch, groups * rep, dim, v.dtype)


def launch_select(sel: Selection, kd: torch.Tensor, token_ratio: float, block: int, num_warps: int | None = None,
                  full_rows: bool = False) -> tuple[torch.Tensor, int]:
    """Top-T token ids per KV head, ``(B*Hkv, nblocks * keep)`` int32, and ``keep`` (slots per block)."""
    q, idx_p, count = sel
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
        num_warps=num_warps,
    )
    return chosen, keep


def launch_tokens(q: torch.Tensor, sel: torch.Tensor, keep: int, block: int, k: torch.Tensor, v: torch.Tensor,
                  scale: float, block_n: int = 32, num_warps: int = 4, num_stages: int = 3, waves: float = 4.0) -> torch.Tensor:
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
    assert k.stride(3) == 1 and v.stride(3) == 1
    _tokens_split_kernel[(batch * groups, splits)](
        qs, sel, k, v, o, m, ls, length, nslots, split_len, groups, keep, block, scale * LOG2E,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        G=rep, GP=max(GROUP_PAD, _pow2(rep)), D=dim, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages,
    )
    return _combine(o, m, ls, batch, q_heads, dim, v.dtype)


# -- API ----------------------------------------------------------------------------------------------
@dataclass
class DecodeConfig:
    """How one AQUA decode step runs. ``dims``: projected dims kept; ``gqa``: "group" or "head"
    (see :mod:`aqua_cli.kernels.reference`); ``token_ratio``: T/L for dims + top-T (None: dims only);
    ``select_block``: tokens per selection block (a power of two). The rest are launch parameters
    (defaults from ``scripts/sweep_decode.py`` on an H100); ``fused_select``: pick dims with the one-launch
    Triton kernel (group selection) instead of composed PyTorch ops."""

    dims: int
    gqa: str = "group"
    token_ratio: float | None = None
    select_block: int = 512
    block_n: int = 128  # tokens per inner step of the dims kernel
    num_warps: int = 4
    num_stages: int = 3
    waves: float = 4.0  # programs per SM the sequence splits aim for
    select_warps: int | None = None  # top-T scoring kernel; None: 4 for up to 64 kept dims, else 8 (a 128 x 512 tile spills at 4)
    tokens_block_n: int = 32  # top-T exact pass
    tokens_warps: int = 4
    tokens_stages: int = 3
    fused_select: bool = True

    def __post_init__(self) -> None:
        if self.select_block < 16 or self.select_block & (self.select_block - 1):
            raise ValueError(f"select_block must be a power of two >= 16, got {self.select_block}")
        if self.token_ratio is not None:
            block_keep_for(self.token_ratio, self.select_block)


def select_for_kernels(q: torch.Tensor, proj: torch.Tensor, config: DecodeConfig) -> tuple[Selection, bool]:
    """The padded selection the kernels read, and whether all its KP slots are valid."""
    dim = q.shape[-1]
    dims = min(config.dims, dim)
    if config.fused_select and fused_selection_supported(q, proj, config.gqa):
        return launch_select_dims(q, proj, dims), dims == _kp(dims)
    qp = project_queries(q, proj).to(q.dtype)
    idx, count, qsel = select_dims(qp, dims, config.gqa)
    return pad_selection(qsel, idx, count), config.gqa == "group" and dims == _kp(dims)


def aqua_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kd: torch.Tensor, proj: torch.Tensor,
                config: DecodeConfig) -> torch.Tensor:
    """One AQUA decode step with the fused kernels; same result as ``aqua_decode_reference``.

    ``q`` ``(B, Hq, D)``; ``k``, ``v`` ``(B, Hkv, L, D)`` token-major (``k`` only read for top-T);
    ``kd`` ``(B, Hkv, D, L)`` projected keys (``project_keys``); ``proj`` ``(Hkv, D, D)`` float32.
    Launches: dim selection, the main pass (dims; or scoring + the exact pass for top-T), the combine.
    """
    dim = q.shape[-1]
    scale = dim ** -0.5
    sel, full_rows = select_for_kernels(q, proj, config)
    if config.token_ratio is None:
        return launch_dims(sel, kd, v, scale, config.block_n, config.num_warps, config.num_stages, config.waves, full_rows)
    chosen, keep = launch_select(sel, kd, config.token_ratio, config.select_block, config.select_warps, full_rows)
    return launch_tokens(q, chosen, keep, config.select_block, k, v, scale, config.tokens_block_n, config.tokens_warps,
                         config.tokens_stages, config.waves)


def dims_bytes(batch: int, kv_heads: int, length: int, dims: int, dim: int, elem: int = 2) -> int:
    """Bytes the dims-only kernel must read: ``dims`` rows of ``kd`` and all of ``v``."""
    return batch * kv_heads * length * (dims + dim) * elem


def topt_bytes(batch: int, kv_heads: int, length: int, dims: int, dim: int, ratio: float, elem: int = 2) -> int:
    """Bytes dims + top-T must read: ``dims`` rows of ``kd``, then ``T`` rows of ``k`` and of ``v``."""
    tokens = math.ceil(ratio * length)
    return batch * kv_heads * (length * dims + 2 * tokens * dim) * elem
