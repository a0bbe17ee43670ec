"""Page-granular top-T (Quest-style) in plain PyTorch: the reference the page kernels must match.

Dims + top-T by *pages*: the sequence is cut into pages of ``page`` consecutive tokens; a page's score is the
max, over its tokens and the group's query heads, of the approximate logits on the selected projected dims;
each KV group keeps its ``pages_for(ratio, L, page)`` best pages (ties to the lower page index) and attends
exactly over every token of them. Compared with per-token selection the top-k problem is ``page`` times
smaller, and the exact pass reads whole contiguous pages, so it can read the *projected* keys (``kd``) that
the scoring pass already reads: ``q.k = (qP).(kP)`` for an orthogonal ``P``, so no token-major copy of the
keys is needed.

Pure PyTorch, imports anywhere (CPU tests, quality runs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError
from .reference import (
    approx_logits,
    dims_scores,
    project_queries,
    put_back,
    select_dims,
    take,
    visible_keys,
    visible_order,
)


def pages_for(ratio: float, length: int, page: int) -> int:
    """Pages kept out of ``ceil(length / page)``: enough to hold ``ceil(ratio * length)`` tokens, at least one."""
    if not (0.0 < ratio <= 1.0):
        raise ConfigError(f"token ratio T/L = {ratio} is outside (0, 1]")
    if page < 1:
        raise ConfigError(f"page size must be >= 1, got {page}")
    n_pages = -(-length // page)
    return max(1, min(n_pages, -(-math.ceil(ratio * length) // page)))


def n_forced(n_pages: int, sinks: int, recent: int) -> int:
    """How many distinct pages the first ``sinks`` and the last ``recent`` of ``n_pages`` are."""
    return len(set(range(min(sinks, n_pages))) | set(range(max(0, n_pages - recent), n_pages)))


def select_pages_forced(pscores: torch.Tensor, keep: int, sinks: int, recent: int) -> torch.Tensor:
    """``select_pages`` with the first ``sinks`` and the last ``recent`` pages always kept, on top of the
    ``keep`` best others (decode: every page visible)."""
    n_pages = pscores.shape[-1]
    idx = torch.arange(n_pages, device=pscores.device)
    forced = (idx < sinks) | (idx >= n_pages - recent)
    boosted = torch.where(forced, torch.full_like(pscores, float("inf")), pscores)
    return select_pages(boosted, min(n_pages, keep + n_forced(n_pages, sinks, recent)))


def page_scores(scores: torch.Tensor, page: int) -> torch.Tensor:
    """``(..., L)`` token scores (``-inf`` = not visible) -> ``(..., ceil(L / page))`` max per page."""
    total = scores.shape[-1]
    n_pages = -(-total // page)
    padded = torch.nn.functional.pad(scores, (0, n_pages * page - total), value=float("-inf"))
    return padded.view(*scores.shape[:-1], n_pages, page).amax(-1)


def select_pages(pscores: torch.Tensor, keep: torch.Tensor | int) -> torch.Tensor:
    """Boolean mask over the last axis of page scores: the ``keep`` highest (ties to the lower index).
    ``keep`` broadcasts against ``pscores[..., 0]``."""
    n_pages = pscores.shape[-1]
    order = torch.sort(pscores, dim=-1, descending=True, stable=True).indices
    rank = order.argsort(-1)  # 0 = best
    keep = torch.as_tensor(keep, device=pscores.device)
    return rank < keep[..., None].clamp(max=n_pages)


def expand_pages(mask: torch.Tensor, page: int, length: int) -> torch.Tensor:
    """Page mask ``(..., P)`` -> token mask ``(..., length)``."""
    return mask.repeat_interleave(page, dim=-1)[..., :length]


def aqua_decode_pages_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kd: torch.Tensor, proj: torch.Tensor,
                                dims: int, token_ratio: float, page: int = 64, gqa: str = "group", sink_pages: int = 0,
                                recent_pages: int = 0) -> torch.Tensor:
    """Dims + top-T pages for one decode step; ``(B, Hq, D)``. Shapes as ``aqua_decode_reference``. The exact
    pass uses the original ``q``, ``k`` (equal to the projected ones for an orthogonal ``P``). ``sink_pages``,
    ``recent_pages``: always kept, on top of the best ``pages_for`` pages."""
    batch, q_heads, dim = q.shape
    groups, length = k.shape[1], k.shape[2]
    scale = dim ** -0.5
    qp = project_queries(q, proj).to(q.dtype)
    idx, count, qsel = select_dims(qp, dims, gqa)
    logits = approx_logits(qsel, idx, count, kd)  # (B, Hkv, G, L)
    mask = select_pages_forced(page_scores(logits.amax(2), page), pages_for(token_ratio, length, page), sink_pages, recent_pages)
    keep = expand_pages(mask, page, length)  # (B, Hkv, L)
    exact = q.float().view(batch, groups, -1, dim) @ k.float().transpose(-1, -2) * scale
    probs = exact.masked_fill(~keep[:, :, None], float("-inf")).softmax(-1)
    return (probs @ v.float()).reshape(batch, q_heads, dim).to(q.dtype)


@dataclass
class TopPagesHook:
    """AQUA dims + top-T *pages* for one layer, as an ``attend()`` hook (prefill and decode, any device):
    the page twin of :class:`~aqua_cli.kernels.reference.TopTokensHook`, for quality runs. Each query
    position keeps ``pages_for(ratio, visible, page)`` of its visible pages. Materialises ``(B, H, Q, L)``."""

    projection: torch.Tensor  # (Hkv, D, D) float32
    dims: int
    token_ratio: float
    page: int = 64
    gqa: str = "group"
    _cache: dict[Any, torch.Tensor] = field(default_factory=dict, repr=False)

    def attend(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        batch, q_heads, q_len, dim = query.shape
        kv_len = key.shape[2]
        scale = scaling if scaling is not None else dim ** -0.5
        if query.device not in self._cache:
            self._cache = {query.device: self.projection.to(query.device, torch.float32)}
        visible = visible_keys(attention_mask, batch, q_len, kv_len, query.device)  # (B, 1, Q, L)
        q, approx = dims_scores(query, key, self._cache[query.device], self.dims, self.gqa, scale, visible)
        kf = key.float()
        order = visible_order(visible)  # pages cut from each row's first visible key, as the row alone would
        pscores = page_scores(take(approx.amax(2), order), self.page)  # (B, Hkv, Q, P)
        lengths = visible.sum(-1)  # (B, 1, Q): from there the visible keys are a prefix (causal)
        n_keep = torch.clamp(torch.ceil(self.token_ratio * lengths.float()).long(), min=1)
        n_keep = torch.clamp(-(-n_keep // self.page), min=1)
        keep = put_back(expand_pages(select_pages(pscores, n_keep), self.page, kv_len), order) & visible
        exact = (q @ kf[:, :, None].transpose(-1, -2)) * scale
        probs = exact.masked_fill(~keep[:, :, None], float("-inf")).softmax(-1).nan_to_num(0.0)  # padding rows: zeros, not NaN
        out = probs @ value.float()[:, :, None]
        return out.reshape(batch, q_heads, q_len, dim).transpose(1, 2).to(query.dtype), None
