"""Page-granular top-T (Quest-style) in plain PyTorch: the reference the page kernels must match.

Dims + top-T by *pages*: the sequence is cut into pages of ``page`` consecutive tokens; a page's score is the
max, over its tokens and the group's query heads, of the approximate logits on the selected projected dims;
each KV group keeps its ``pages_for(ratio, L, page)`` best pages (ties to the lower page index) and attends
exactly over every token of them. Compared with per-token selection the top-k problem is ``page`` times
smaller, and the exact pass reads whole contiguous pages, so it can read the *projected* keys (``kd``) that
the scoring pass already reads: ``q.k = (qP).(kP)`` for an orthogonal ``P``, so no token-major copy of the
keys is needed.

A page's score is ``"max"`` (the default: the max approximate logit over its tokens, so the scoring pass reads
the selected dims of every key) or ``"bound"`` (Quest's upper bound on the same quantity from per-page minima and
maxima of the projected keys, ``page_bounds``: ``sum_i max(q_i min_i, q_i max_i)`` over the selected dims, so
the scoring pass reads ``2k`` values per page instead of ``k`` per token -- a 32nd of the bytes at pages of 64).

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
    key_values,
    project_queries,
    put_back,
    score_values,
    select_dims,
    sparse_queries,
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


PAGE_SCORES = ("max", "bound")


def check_page_score(scoring: str) -> str:
    if scoring not in PAGE_SCORES:
        raise ConfigError(f"page score must be one of {', '.join(PAGE_SCORES)}, got {scoring!r}")
    return scoring


def check_bound_page(page: int, bound_page: int | None) -> int:
    """Tokens one bound covers: ``page`` by default, or a power-of-two divisor of it (tighter bounds, more bytes)."""
    bound_page = page if bound_page is None else bound_page
    if bound_page < 1 or page % bound_page or bound_page & (bound_page - 1):
        raise ConfigError(f"bound_page must be a power of two dividing the page ({page}), got {bound_page}")
    return bound_page


def pool_pages(scores: torch.Tensor, ratio: int) -> torch.Tensor:
    """``(..., NS)`` scores of sub-pages -> ``(..., ceil(NS / ratio))``: a page's score is its best sub-page's."""
    if ratio == 1:
        return scores
    n = -(-scores.shape[-1] // ratio)
    padded = torch.nn.functional.pad(scores, (0, n * ratio - scores.shape[-1]), value=float("-inf"))
    return padded.unflatten(-1, (n, ratio)).amax(-1)


def page_bounds(kd: torch.Tensor, page: int, length: int | None = None) -> torch.Tensor:
    """``(B, Hkv, D, L)`` projected keys -> ``(B, Hkv, 2, D, ceil(length / page))`` in ``kd``'s dtype: per page and
    projected dim the minimum ([:, :, 0]) and the maximum ([:, :, 1]) over the page's first ``length`` tokens
    (exact: a min or max of bf16 values is one of them). What the cache keeps beside the keys for ``"bound"``.
    Byte planes (``reference.key_planes``) are bounded by their float16 keys."""
    kd = key_values(kd)
    length = kd.shape[-1] if length is None else length
    full = length // page
    whole = kd[..., : full * page].unflatten(-1, (full, page))  # no copy: a cache fill bounds 32 layers of keys
    lo, hi = [whole.amin(-1)], [whole.amax(-1)]
    if length > full * page:
        lo.append(kd[..., full * page : length].amin(-1, keepdim=True))
        hi.append(kd[..., full * page : length].amax(-1, keepdim=True))
    return torch.stack([torch.cat(lo, -1), torch.cat(hi, -1)], 2)


def update_page_bounds(bounds: torch.Tensor, kd: torch.Tensor, pos: int, page: int) -> None:
    """Fold the key at ``pos`` of ``kd`` ``(B, Hkv, D, >pos)`` into ``bounds`` (``page_bounds``' layout, enough
    pages), in place: alone on a fresh page, else into the page's min and max. What the dim-selection kernel
    does with the cache write of a decode step."""
    key, p = key_values(kd[..., pos : pos + 1])[..., 0].to(bounds.dtype), pos // page
    if pos % page == 0:
        bounds[:, :, 0, :, p] = key
        bounds[:, :, 1, :, p] = key
    else:
        bounds[:, :, 0, :, p] = torch.minimum(bounds[:, :, 0, :, p], key)
        bounds[:, :, 1, :, p] = torch.maximum(bounds[:, :, 1, :, p], key)


def bound_scores(qsel: torch.Tensor, idx: torch.Tensor, count: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """``(B, Hkv, G, NP)`` float32 upper bounds of each page's approximate logits (unscaled) per query head:
    ``sum_i max(q_i lo_i, q_i hi_i)`` over the selected dims, computed as ``q+ . hi + q- . lo``."""
    dims = idx.shape[-1]
    valid = torch.arange(dims, device=idx.device)[None, None] < count[..., None]
    q = qsel.float() * valid[:, :, None]
    rows = bounds.gather(3, idx.long()[:, :, None, :, None].expand(*idx.shape[:2], 2, dims, bounds.shape[-1])).float()
    rows = rows * valid[:, :, None, :, None]
    return q.clamp(min=0) @ rows[:, :, 1] + q.clamp(max=0) @ rows[:, :, 0]


def prefix_bound_scores(qsparse: torch.Tensor, kp: torch.Tensor, visible: torch.Tensor, page: int) -> torch.Tensor:
    """Prefill twin of ``bound_scores``: ``(B, Hkv, Q, NP)`` page scores (max over the group's heads) of every query
    position over its own visible prefix, pages cut from each row's first visible key. A page wholly before the
    query's newest key is bounded by all its tokens; the page holding that key by its tokens up to it (cumulative
    min and max: no later key leaks into the choice); later pages are ``-inf``. ``qsparse`` ``(B, Hkv, G, Q, D)``
    zero outside the selected dims, ``kp`` ``(B, Hkv, L, D)``, ``visible`` ``(B, 1, Q, L)`` (left padding only)."""
    batch, groups, length, dim = kp.shape
    first = visible[:, 0, -1].to(torch.int8).argmax(-1)  # (B,) the last query sees its row's whole prefix
    order = (torch.arange(length, device=kp.device) + first[:, None]) % length  # (B, L)
    keys = kp.gather(2, order[:, None, :, None].expand(batch, groups, length, dim))
    n_pages = -(-length // page)
    pad = n_pages * page - length
    lo = torch.nn.functional.pad(keys, (0, 0, 0, pad), value=float("inf")).unflatten(2, (n_pages, page))
    hi = torch.nn.functional.pad(keys, (0, 0, 0, pad), value=float("-inf")).unflatten(2, (n_pages, page))
    qpos, qneg = qsparse.clamp(min=0), qsparse.clamp(max=0)
    whole = (qpos @ hi.amax(3).transpose(-1, -2)[:, :, None] + qneg @ lo.amin(3).transpose(-1, -2)[:, :, None]).amax(2)
    newest = (visible[:, 0].sum(-1) - 1).clamp(min=0)  # (B, Q) the newest visible key, counted from the first
    at = newest[:, None, :, None].expand(batch, groups, -1, dim)
    lo_now = lo.cummin(3).values.flatten(2, 3).gather(2, at)  # (B, Hkv, Q, D): its page's bounds so far
    hi_now = hi.cummax(3).values.flatten(2, 3).gather(2, at)
    own = ((qpos * hi_now[:, :, None]).sum(-1) + (qneg * lo_now[:, :, None]).sum(-1)).amax(2)  # (B, Hkv, Q)
    last = (newest // page)[:, None, :, None]
    idx = torch.arange(n_pages, device=kp.device)
    scores = torch.where(idx == last, own[..., None], whole)
    return scores.masked_fill(idx > last, float("-inf"))


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
                                recent_pages: int = 0, scoring: str = "max", bound_page: int | None = None,
                                rerank: int = 0) -> torch.Tensor:
    """Dims + top-T pages for one decode step; ``(B, Hq, D)``. Shapes as ``aqua_decode_reference``. The exact
    pass uses the original ``q``, ``k`` (equal to the projected ones for an orthogonal ``P``). ``sink_pages``,
    ``recent_pages``: always kept, on top of the best ``pages_for`` pages. ``scoring``: "max" or "bound"
    (module docstring); ``bound_page``: tokens a bound covers (``check_bound_page``); ``rerank`` (with "bound"):
    the ``rerank`` x budget best pages by bound (and the forced ones) are candidates, ranked by "max". ``kd`` may be
    byte planes (``reference.key_planes``): pages are then scored on the high plane, as the kernels do."""
    batch, q_heads, dim = q.shape
    groups, length = k.shape[1], k.shape[2]
    scale = dim ** -0.5
    qp = project_queries(q, proj).to(q.dtype)
    idx, count, qsel = select_dims(qp, dims, gqa)
    budget = pages_for(token_ratio, length, page)
    if check_page_score(scoring) == "bound":
        sub = check_bound_page(page, bound_page)
        pscores = pool_pages(bound_scores(qsel, idx, count, page_bounds(kd, sub, length)).amax(2), page // sub)
        if rerank > 0:
            cands = select_pages_forced(pscores, rerank * budget, sink_pages, recent_pages)
            best = page_scores(approx_logits(qsel, idx, count, score_values(kd)).amax(2), page)
            pscores = best.masked_fill(~cands, float("-inf"))
    else:
        pscores = page_scores(approx_logits(qsel, idx, count, score_values(kd)).amax(2), page)  # (B, Hkv, NP)
    mask = select_pages_forced(pscores, budget, sink_pages, recent_pages)
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
    scoring: str = "max"  # "max" or "bound" (module docstring)
    bound_page: int | None = None  # "bound": tokens a bound covers (a divisor of ``page``; None: ``page``)
    _cache: dict[Any, torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        check_page_score(self.scoring)
        self.bound_page = check_bound_page(self.page, self.bound_page)

    def attend(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        batch, q_heads, q_len, dim = query.shape
        kv_len = key.shape[2]
        scale = scaling if scaling is not None else dim ** -0.5
        if query.device not in self._cache:
            self._cache = {query.device: self.projection.to(query.device, torch.float32)}
        visible = visible_keys(attention_mask, batch, q_len, kv_len, query.device)  # (B, 1, Q, L)
        proj = self._cache[query.device]
        order = visible_order(visible)  # pages cut from each row's first visible key, as the row alone would
        if self.scoring == "bound":
            q, qsparse, kp = sparse_queries(query, key, proj, self.dims, self.gqa)
            pscores = pool_pages(prefix_bound_scores(qsparse, kp, visible, self.bound_page), self.page // self.bound_page)
            del qsparse, kp
        else:
            q, approx = dims_scores(query, key, proj, self.dims, self.gqa, scale, visible)
            pscores = page_scores(take(approx.amax(2), order), self.page)  # (B, Hkv, Q, P)
            del approx
        kf = key.float()
        lengths = visible.sum(-1)  # (B, 1, Q): from there the visible keys are a prefix (causal)
        n_keep = torch.clamp(torch.ceil(self.token_ratio * lengths.float()).long(), min=1)
        n_keep = torch.clamp(-(-n_keep // self.page), min=1)
        keep = put_back(expand_pages(select_pages(pscores, n_keep), self.page, kv_len), order) & visible
        exact = (q @ kf[:, :, None].transpose(-1, -2)) * scale
        probs = exact.masked_fill(~keep[:, :, None], float("-inf")).softmax(-1).nan_to_num(0.0)  # padding rows: zeros, not NaN
        out = probs @ value.float()[:, :, None]
        return out.reshape(batch, q_heads, q_len, dim).transpose(1, 2).to(query.dtype), None
