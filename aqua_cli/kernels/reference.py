"""PyTorch references for the fused decode kernels (the top-T method built on them, for any device and
prefill as well, is :class:`aqua_cli.methods.TopTokens`).

Conventions (one decode step, the shapes the kernels take):

* ``q``  ``(B, Hq, D)`` post-RoPE queries; ``Hq = Hkv * G`` (GQA, query head ``h*G + g`` reads KV head ``h``);
* ``k``, ``v`` ``(B, Hkv, L, D)`` the ordinary token-major cache;
* ``kd`` ``(B, Hkv, D, L)`` the keys *in the projected basis*, dimension-major, so that one selected
  dimension is one contiguous row of ``L`` values (what makes reading only ``k`` dims cheap);
* ``proj`` ``(Hkv, D, D)`` float32, ``P`` of the artifact (columns by decreasing energy).

Dimension selection under GQA (``gqa``):

* ``"group"``: one set of ``k`` dims per KV head, the largest ``sum_g |qP|`` over the group's query heads.
  The kernel reads ``k`` rows of ``kd`` once for the whole group.
* ``"head"``: each query head keeps its own top-``k`` dims (the paper's rule, exact per head); the kernel
  reads the *union* of the group's dims and each head multiplies zeros outside its own set.

Token selection ("dims + top-T", as SparQ and Loki do): the selected dims give approximate logits; per KV
group a token's score is the max over the group's heads; the sequence is cut into blocks of
``select_block`` tokens and each block keeps its ``tokens_in_block(n)`` best tokens (a fixed share ``T/L``
of every block, so the selection needs no global sort and runs inside the kernel). Exact attention then
runs over the chosen tokens with the full ``q`` and ``k``.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError

GQA_MODES = ("group", "head")


def tokens_in_block(n: torch.Tensor | int, block_keep: int, block: int) -> torch.Tensor | int:
    """Tokens kept from a block holding ``n`` valid tokens: ``ceil(n * block_keep / block)``.

    ``block_keep = ceil(ratio * block)`` is what a full block keeps; the kernel uses the same integer rule.
    """
    if isinstance(n, torch.Tensor):
        return (n * block_keep + block - 1) // block
    return (n * block_keep + block - 1) // block


def block_keep_for(ratio: float, block: int) -> int:
    if not (0.0 < ratio <= 1.0):
        raise ConfigError(f"token ratio T/L = {ratio} is outside (0, 1]")
    return max(1, math.ceil(ratio * block))


def project_keys(k: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """``(B, Hkv, L, D)`` keys -> ``(B, Hkv, D, L)`` projected keys, dimension-major, in ``k``'s dtype."""
    return (k.float() @ proj.to(k.device, torch.float32)[None]).to(k.dtype).transpose(-1, -2).contiguous()


# Keys in two byte planes (``DecodeConfig`` reads them when ``kd`` is uint8): the projected keys in float16, each
# value's 16 bits split into a high byte rounded to nearest (an fp8 e5m2 value: sign, 5 exponent bits, 2 mantissa
# bits) and a signed low byte (the rest, -128..127), the planes stacked along the dims: ``(..., 2D, L)``, row ``d``
# the high bytes of dim ``d``, row ``D + d`` its low bytes. The exact pass reads both (the float16 key, no loss);
# page scoring reads the high plane only: half the bytes of the scored dims, at about 12% relative error per value.
PLANE_MAX = 61408.0  # |kP| is clamped here (float16 0x7B7F): the high byte of anything larger rounds to e5m2 infinity


def is_planes(kd: torch.Tensor) -> bool:
    """Whether projected keys are byte planes (``key_planes``: uint8, twice the dims)."""
    return kd.dtype == torch.uint8


def key_dim(kd: torch.Tensor) -> int:
    """The head dim of projected keys ``(B, Hkv, D, L)`` or ``(B, Hkv, NP, D, page)``, of planes too."""
    rows = kd.shape[-2]
    return rows // 2 if is_planes(kd) else rows


def key_planes(kp: torch.Tensor) -> torch.Tensor:
    """Projected keys ``(..., D, L)`` (any float dtype) -> ``(..., 2D, L)`` uint8 planes (see above). Large inputs
    are split along their first axis: the int32 work tensors of a whole cache fill would be 4x its keys."""
    if kp.dim() > 2 and kp.numel() > (1 << 24):
        out = torch.empty(*kp.shape[:-2], 2 * kp.shape[-2], kp.shape[-1], dtype=torch.uint8, device=kp.device)
        for i in range(kp.shape[0]):
            out[i] = key_planes(kp[i])
        return out
    bits = kp.float().clamp(-PLANE_MAX, PLANE_MAX).to(torch.float16).view(torch.int16).to(torch.int32) & 0xFFFF
    mag = bits & 0x7FFF
    mag_hi = (mag + 128) >> 8
    hi = ((bits & 0x8000) >> 8) | mag_hi
    lo = mag - (mag_hi << 8)  # -128..127
    return torch.cat([hi.to(torch.uint8), lo.to(torch.int8).view(torch.uint8)], dim=-2)


def _plane_halves(kd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = kd.shape[-2]
    assert is_planes(kd) and rows % 2 == 0, "key planes are uint8 (..., 2D, L)"
    return kd[..., : rows // 2, :], kd[..., rows // 2 :, :]


def planes_keys(kd: torch.Tensor) -> torch.Tensor:
    """``key_planes`` -> the float16 keys ``(..., D, L)``, exactly."""
    hi, lo = _plane_halves(kd)
    bits = (hi.to(torch.int32) << 8) + lo.view(torch.int8).to(torch.int32)
    return bits.to(torch.int16).view(torch.float16)


def planes_score_keys(kd: torch.Tensor) -> torch.Tensor:
    """``key_planes`` -> ``(..., D, L)`` float16 of the high plane alone (what page scoring reads)."""
    return (_plane_halves(kd)[0].to(torch.int32) << 8).to(torch.int16).view(torch.float16)


def key_values(kd: torch.Tensor) -> torch.Tensor:
    """Projected keys as values: ``kd`` itself, or its planes joined (float16)."""
    return planes_keys(kd) if is_planes(kd) else kd


def score_values(kd: torch.Tensor) -> torch.Tensor:
    """The projected keys that page scoring reads: ``kd`` itself, or the high plane of its planes."""
    return planes_score_keys(kd) if is_planes(kd) else kd


def project_queries(q: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """``(B, Hq, D)`` -> ``(B, Hkv, G, D)`` float32 projected queries."""
    batch, q_heads, dim = q.shape
    groups = proj.shape[0]
    return q.float().view(batch, groups, q_heads // groups, dim) @ proj.to(q.device, torch.float32)[None]


def select_dims(qp: torch.Tensor, k: int, gqa: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dims each KV group reads, for projected queries ``qp`` ``(B, Hkv, G, D)``.

    Returns ``idx`` ``(B, Hkv, KP)`` int32 dims (sorted ascending: neighbouring rows of ``kd``),
    ``count`` ``(B, Hkv)`` int32 valid entries of ``idx``, and ``qsel`` ``(B, Hkv, G, KP)`` the queries at
    those dims (zero where a head did not select the dim, and past ``count``).
    """
    if gqa not in GQA_MODES:
        raise ConfigError(f"unknown GQA selection '{gqa}': use one of {', '.join(GQA_MODES)}")
    batch, groups, rep, dim = qp.shape
    if k >= dim:
        idx = torch.arange(dim, device=qp.device, dtype=torch.int32).expand(batch, groups, dim).contiguous()
        return idx, torch.full((batch, groups), dim, dtype=torch.int32, device=qp.device), qp
    if gqa == "group":
        # scores in float32 (a bf16 sum rounds many near-ties into exact ties); the fused kernel does the same
        idx = qp.float().abs().sum(2).topk(k, dim=-1).indices.sort(-1).values  # (B, Hkv, k)
        qsel = qp.gather(-1, idx[:, :, None].expand(batch, groups, rep, k))
        count = torch.full((batch, groups), k, dtype=torch.int32, device=qp.device)
        return idx.to(torch.int32), count, qsel
    top = qp.abs().topk(k, dim=-1).indices  # (B, Hkv, G, k)
    mask = torch.zeros_like(qp, dtype=torch.bool).scatter_(-1, top, True)
    union = mask.any(2)  # (B, Hkv, D)
    idx = torch.argsort((~union).to(torch.int8), dim=-1, stable=True)  # union dims first, ascending
    count = union.sum(-1).to(torch.int32)
    qsel = (qp * mask).gather(-1, idx[:, :, None].expand(batch, groups, rep, dim))
    return idx.to(torch.int32), count, qsel


def approx_logits(qsel: torch.Tensor, idx: torch.Tensor, count: torch.Tensor, kd: torch.Tensor) -> torch.Tensor:
    """``(B, Hkv, G, L)`` logits over the selected dims only (unscaled), in float32."""
    dims = idx.shape[-1]
    valid = torch.arange(dims, device=idx.device)[None, None] < count[..., None]
    rows = kd.gather(2, idx.long()[..., None].expand(*idx.shape, kd.shape[-1])).float()  # (B, Hkv, KP, L)
    return (qsel.float() * valid[:, :, None]) @ (rows * valid[..., None])


def select_tokens(scores: torch.Tensor, length: torch.Tensor | int, ratio: float, block: int) -> torch.Tensor:
    """Boolean keep-mask over the last axis of ``scores`` (``-inf`` = not visible): per block of ``block``
    keys, the ``tokens_in_block(n)`` highest, ``n`` = visible keys in that block (``length`` of them, from 0).

    ``scores`` ``(..., Q, L)``; ``length`` broadcasts against ``(..., Q)`` (causal prefill: ``1..Q``).
    """
    keep_full = block_keep_for(ratio, block)
    total = scores.shape[-1]
    blocks = -(-total // block)
    pad = blocks * block - total
    padded = torch.nn.functional.pad(scores, (0, pad), value=float("-inf"))
    view = padded.view(*scores.shape[:-1], blocks, block)
    rank = torch.sort(view, dim=-1, descending=True, stable=True).indices.argsort(-1)  # 0 = best in its block
    length = torch.as_tensor(length, device=scores.device)
    starts = torch.arange(blocks, device=scores.device) * block
    n = (length[..., None] - starts).clamp(0, block)  # (..., Q, blocks) visible keys per block
    keep = rank < tokens_in_block(n, keep_full, block)[..., None]
    return keep.view(*scores.shape[:-1], blocks * block)[..., :total]


def dense_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Dense attention of one decode step, ``(B, Hq, D)`` (SDPA, the baseline every AQUA path is timed against)."""
    out = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)
    return out[:, :, 0]


def aqua_decode_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kd: torch.Tensor,
    proj: torch.Tensor,
    dims: int,
    gqa: str = "group",
    token_ratio: float | None = None,
    select_block: int = 512,
) -> torch.Tensor:
    """AQUA for one decode step in plain PyTorch: what every kernel must match. Returns ``(B, Hq, D)``.

    Without ``token_ratio``: softmax over the selected-dims logits, times ``v`` (the paper's method).
    With it: those logits only pick tokens; the attention over them is exact (full ``q``, ``k``).
    """
    batch, q_heads, dim = q.shape
    groups = k.shape[1]
    scale = dim ** -0.5
    qp = project_queries(q, proj).to(q.dtype)
    idx, count, qsel = select_dims(qp, dims, gqa)
    logits = approx_logits(qsel, idx, count, kd) * scale  # (B, Hkv, G, L)
    if token_ratio is None:
        probs = logits.softmax(-1)
    else:
        keep = select_tokens(logits.amax(2), kd.shape[-1], token_ratio, select_block)  # (B, Hkv, L)
        exact = q.float().view(batch, groups, -1, dim) @ k.float().transpose(-1, -2) * scale
        probs = exact.masked_fill(~keep[:, :, None], float("-inf")).softmax(-1)
    out = probs @ v.float()  # (B, Hkv, G, L) @ (B, Hkv, L, D)
    return out.reshape(batch, q_heads, dim).to(q.dtype)


def visible_order(visible: torch.Tensor) -> torch.Tensor:
    """Key order ``(..., L)`` that starts each row at its first visible key (a left-padded row then lays out
    its keys as the same row alone would: selection blocks and pages are cut from its first token, and its
    visible keys are a prefix whose length is their count). Use with :func:`take` and :func:`put_back`."""
    length = visible.shape[-1]
    first = visible.to(torch.int8).argmax(-1, keepdim=True)  # 0 where a row sees nothing
    return (torch.arange(length, device=visible.device) + first) % length


def take(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``x`` along its last axis in ``order`` (broadcast over the leading axes)."""
    return x.gather(-1, order.expand(*x.shape[:-1], order.shape[-1]))


def put_back(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`take`."""
    return torch.empty_like(x).scatter_(-1, order.expand(*x.shape[:-1], order.shape[-1]), x)


def visible_keys(mask: torch.Tensor | None, batch: int, q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """Boolean ``(B, 1, Q, L)``: which keys each query sees, from transformers' attention mask (bool, or
    additive float with the dtype's minimum where masked); causal when it passes none."""
    if mask is None:
        rows = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
        return (torch.arange(kv_len, device=device)[None] <= rows)[None, None].expand(batch, 1, q_len, kv_len)
    mask = mask[:, :1, :, -kv_len:]
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    return allowed.expand(batch, 1, q_len, kv_len)


def dims_scores(query: torch.Tensor, key: torch.Tensor, proj: torch.Tensor, dims: int, gqa: str, scale: float,
                visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every query position's scores on its selected projected dims (the approximate logits top-T ranks):
    ``query`` ``(B, Hq, Q, D)``, ``key`` ``(B, Hkv, L, D)``, ``visible`` ``(B, 1, Q, L)``. Returns the float32
    queries grouped ``(B, Hkv, G, Q, D)`` and the scores ``(B, Hkv, G, Q, L)``, ``-inf`` where not visible."""
    q, qsparse, kp = sparse_queries(query, key, proj, dims, gqa)
    approx = qsparse @ kp[:, :, None].transpose(-1, -2) * scale
    return q, approx.masked_fill(~visible[:, :, None], float("-inf"))


def sparse_queries(query: torch.Tensor, key: torch.Tensor, proj: torch.Tensor, dims: int,
                   gqa: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every query position's projected query with zeros outside its selected dims: the float32 queries grouped
    ``(B, Hkv, G, Q, D)``, the sparse projected queries (same shape) and the projected keys ``(B, Hkv, L, D)``."""
    batch, q_heads, q_len, dim = query.shape
    groups = key.shape[1]
    rep = q_heads // groups
    q = query.float().view(batch, groups, rep, q_len, dim)
    qp, kp = q @ proj[:, None], key.float() @ proj  # (B, Hkv, G, Q, D), (B, Hkv, L, D)
    flat = qp.permute(0, 3, 1, 2, 4).reshape(batch * q_len, groups, rep, dim)  # dims per query position
    idx, count, qsel = select_dims(flat, dims, gqa)
    valid = torch.arange(idx.shape[-1], device=idx.device) < count[..., None]
    qsparse = torch.zeros_like(flat).scatter_(-1, idx.long()[:, :, None].expand_as(qsel), qsel * valid[:, :, None])
    return q, qsparse.view(batch, q_len, groups, rep, dim).permute(0, 2, 3, 1, 4), kp
