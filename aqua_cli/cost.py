"""What attention costs: the paper's FLOP count, the bytes a decode step must read, and the bytes a cache
holds. One place for the formulas that ``aqua bench``, ``aqua generate`` and the kernels' sweeps share.

Decode attention reads the whole KV cache per step, so on a GPU it is bound by bytes, not FLOPs: the
paper's saving (a FLOP count) pays only when a kernel reads fewer bytes (docs/bench.md, "Cost model").
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .models import AttnShape


def dims_bytes(batch: int, kv_heads: int, length: int, dims: int, dim: int, elem: int = 2) -> int:
    """Bytes a dims-only decode step must read: ``dims`` projected dims of every key, and all of ``v``."""
    return batch * kv_heads * length * (dims + dim) * elem


def pages_bytes(batch: int, kv_heads: int, length: int, dims: int, dim: int, ratio: float, page: int, elem: int = 2,
                page_score: str = "max", bound_page: int | None = None, rerank: int = 0, score_elem: int | None = None) -> int:
    """Bytes dims + top-T *pages* must read: ``dims`` projected dims of every key (``page_score="bound"``: a
    minimum and a maximum of each dim per ``bound_page`` tokens instead, default a page, and with ``rerank`` the
    kept dims of ``rerank`` x the chosen pages), then the chosen pages of the projected keys and of the values.
    ``score_elem``: bytes a scored value (default ``elem``; 1 for key planes, whose scoring reads the high byte)."""
    from .kernels.paged import pages_for

    tokens = min(length, pages_for(ratio, length, page) * page)
    scored = length
    if page_score == "bound":
        scored = 2 * -(-length // (bound_page or page)) + min(length, rerank * tokens)
    score_elem = elem if score_elem is None else score_elem
    return batch * kv_heads * (scored * dims * score_elem + 2 * tokens * dim * elem)


def topt_bytes(batch: int, kv_heads: int, length: int, dims: int, dim: int, ratio: float, elem: int = 2) -> int:
    """Bytes dims + top-T must read: ``dims`` projected dims of every key, then ``T`` whole keys and values."""
    tokens = math.ceil(ratio * length)
    return batch * kv_heads * (length * dims + 2 * tokens * dim) * elem


def paper_break_even(head_dim: int, dims: int) -> float:
    """Context length above which AQUA does fewer multiply-adds per query than dense attention.

    Per query head: dense scores cost ``L*d``; AQUA costs the query projection ``d*d``, the top-k
    selection (about ``d``) and ``L*k`` scores (the value sum is the same in both). Equal when
    ``L = (d*d + d) / (d - k)``. Keys are projected once when cached, so they add no per-step cost.
    """
    if dims >= head_dim:
        return math.inf
    return (head_dim * head_dim + head_dim) / (head_dim - dims)


def cost_model(shape: AttnShape, batch: int, seq: int, phase: str, dims: int,
               token_ratio: float | None = None, elem: int = 2) -> dict[str, float]:
    """FLOPs and bytes of one attention layer, dense vs AQUA (dims, or dims + top-T tokens).

    Decode (one query per sequence): bytes are the KV cache reads, which is what decides time on a GPU.
    Prefill (``seq`` queries, causal): FLOPs decide; the static AQUA path scores on the first ``dims``.
    """
    hq, hkv, d = shape.num_heads, shape.num_kv_heads, shape.head_dim
    if phase == "decode":
        queries, pairs = batch, batch * seq
        dense_flops = 4 * hq * pairs * d
        proj_flops = 2 * hq * queries * d * d
        select_flops = 2 * hq * queries * d  # |q| and a linear-time selection over d values
        if token_ratio is None:
            aqua_flops = proj_flops + select_flops + 2 * hq * pairs * dims + 2 * hq * pairs * d
            aqua_bytes = dims_bytes(batch, hkv, seq, dims, d, elem)
        else:
            tokens = math.ceil(token_ratio * seq)
            aqua_flops = proj_flops + select_flops + 2 * hq * pairs * dims + 4 * hq * batch * tokens * d
            aqua_bytes = topt_bytes(batch, hkv, seq, dims, d, token_ratio, elem)
        dense_bytes = 2 * batch * hkv * seq * d * elem
    else:
        pairs = batch * seq * (seq + 1) / 2
        dense_flops = 4 * hq * pairs * d
        proj_flops = 2 * batch * seq * (hq + hkv) * d * dims
        aqua_flops = proj_flops + 2 * hq * pairs * dims + 2 * hq * pairs * d
        dense_bytes = batch * seq * (2 * hq + 2 * hkv) * d * elem
        aqua_bytes = batch * seq * (hq * (dims + d) + hkv * (dims + d)) * elem
    return {
        "dense_flops": float(dense_flops),
        "aqua_flops": float(aqua_flops),
        "dense_bytes": float(dense_bytes),
        "aqua_bytes": float(aqua_bytes),
        "flop_ratio": aqua_flops / dense_flops,
        "byte_bound_speedup": dense_bytes / aqua_bytes,
    }


def _tensor_bytes(t: Any) -> int:
    return int(t.numel() * t.element_size()) if isinstance(t, torch.Tensor) else 0


def cache_bytes(cache: Any) -> dict[str, int]:
    """Bytes held by a cache's stored tensors (keys, values, and any per-token side state such as H2O's
    accumulated scores), from the tensors themselves, not from a formula."""
    keys = values = other = 0
    for layer in getattr(cache, "layers", []):
        keys += _tensor_bytes(getattr(layer, "keys", None))
        values += _tensor_bytes(getattr(layer, "values", None))
        other += _tensor_bytes(getattr(layer, "scores", None))
    return {"keys": keys, "values": values, "other": other, "total": keys + values + other}


def dense_bytes(config: Any, tokens: int, batch: int = 1, dtype: torch.dtype = torch.float32) -> int:
    """What a dense ``DynamicCache`` holds for ``tokens`` tokens: used only where running the dense
    cache again would cost a second generation; :func:`cache_bytes` of a real dense cache matches it
    (tests/test_methods.py checks)."""
    from .models import attention_shape

    shape = attention_shape(config)
    per_token = 2 * shape["num_kv_heads"] * shape["head_dim"] * torch.empty((), dtype=dtype).element_size()
    return batch * shape["num_layers"] * tokens * per_token
