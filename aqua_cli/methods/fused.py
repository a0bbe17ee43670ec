"""AQUA inside the model's own decode step: one copy of the keys, projected once, in the kernels' layout.

``P`` is orthogonal, so ``q · k = (qP) · (kP)``: a cache that stores ``kP`` *instead of* ``k`` changes no
score and costs no extra memory. :class:`ProjectedKVLayer` keeps, per layer,

* ``keys``: ``(batch, num_kv_heads, m, capacity)`` the projected keys, **dimension-major** (one projected
  dimension of every token is one contiguous row, so reading ``k`` of ``D`` dims reads ``k/D`` of the key
  bytes), truncated to the first ``m`` projected dims (``kv_dims``; ``m = D`` keeps everything, exact);
* ``values``: ``(batch, num_kv_heads, capacity, D)`` as they are.

With ``key_planes`` the keys are float16 in two byte planes (``kernels.reference.key_planes``: uint8, ``2m`` rows),
so that top-T's page scoring reads one byte a value.

Keys are projected once, when written (prefill and each new token), never again. ``capacity`` is fixed
when ``max_tokens`` is given (a static shape) and grows by whole pages otherwise.

:class:`AquaDecode` is the method: its hooks

* run exact attention (SDPA) on the fresh queries and keys of a prefill into an empty cache, and write
  ``kP`` into the cache;
* send single-token decode steps on CUDA to the fused Triton kernels (:mod:`aqua_cli.kernels.decode`):
  dims only, or dims + top-T pages (exact attention below top-T's measured break-even: the hybrid switch);
* run the same math in PyTorch everywhere else (CPU, padded batches, multi-token steps, ``m < D``), on the
  same cache: the scores are ``(qP)_sel · kP`` read straight from the dimension-major keys;
* without a projected cache (``use_cache=False``, e.g. ``aqua eval``'s perplexity) behave as :class:`Aqua`.

Under GQA the dims are chosen per KV group (the largest ``sum_g |qP|`` over the group's query heads), as
the kernels do. Top-T keeps whole pages of ``page`` tokens (the best by their max approximate score), and
always the first ``sink_pages`` pages (attention sinks) and the last ``recent_pages`` pages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from ..attention import full_attention_only
from ..budgets import parse_kv_dims
from ..errors import ConfigError
from ..kernels.hybrid import DEFAULT_MIN_SEQ_TOPT, min_seq_for
from ..kernels.reference import is_planes, key_dim, key_planes, key_values, score_values, visible_keys
from .aqua import Aqua, ProjectionHook, select_dims
from .base import AttentionHook
from .kv import ModelBoundCache, check_key_shape


@dataclass
class DecodeState:
    """What a layer's cache and its hook share: the layer the last ``update`` wrote (consumed by the hook)."""

    pending: "ProjectedKVLayer | None" = field(default=None, repr=False)
    defer_writes: bool = False  # the hook may write a decode step's token from its first kernel (set by AquaDecode)


class InPlaceLayer(DynamicLayer):
    """A cache layer whose buffers are written in place and read as views of their first ``length`` tokens
    (no concatenation per step); ``max_tokens`` fixes the capacity (None: the subclass may grow it)."""

    is_croppable = True

    def __init__(self, max_tokens: int | None = None):
        super().__init__()
        self.max_tokens, self.length = max_tokens, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query: Any) -> tuple[int, int]:
        """``query``: the query length (transformers >= 5.20) or the cache positions (earlier)."""
        query_length = query if isinstance(query, int) else int(query.shape[0])
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return self.max_tokens if self.max_tokens is not None else -1

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:  # transformers' legacy form: the length to keep
            self.length = min(self.length, tokens_to_remove)
        else:
            self.length = max(0, self.length + tokens_to_remove)


class ProjectedKVLayer(InPlaceLayer):
    """One layer's projected KV cache (see module docstring). ``update`` returns the dimension-major
    projected keys ``(B, Hkv, m, L)`` and the values ``(B, Hkv, L, D)`` as views of the buffers."""

    def __init__(self, projection: torch.Tensor, kv_dims: int, state: DecodeState, layer_idx: int = 0,
                 max_tokens: int | None = None, page: int = 64, bound_page: int | None = None, key_planes: bool = False):
        super().__init__(max_tokens)
        self.key_planes = key_planes  # keys as float16 byte planes (``reference.key_planes``): uint8 (B, Hkv, 2m, cap)
        self.projection = projection.float()
        self.kv_dims, self.state, self.layer_idx, self.page = kv_dims, state, layer_idx, page
        self.bound_page = bound_page  # keep per-sub-page min/max of the keys (``paged.page_bounds``) for bound scoring
        self.bounds: torch.Tensor | None = None  # (B, Hkv, 2, m, capacity / bound_page)
        self.fresh: tuple[torch.Tensor, torch.Tensor] | None = None
        self.deferred: tuple[torch.Tensor, torch.Tensor, int] | None = None
        self._basis: torch.Tensor | None = None
        self._basis_half: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        check_key_shape(key_states, self.projection, self.layer_idx, "projected KV cache")
        groups, head_dim = self.projection.shape[0], self.projection.shape[-1]
        self.device, self.is_initialized = key_states.device, True
        self._basis = self.projection[:, :, : self.kv_dims].to(self.device)
        if key_states.is_cuda and key_states.dtype in (torch.bfloat16, torch.float16):
            self._basis_half = self._basis.to(key_states.dtype)
        batch = key_states.shape[0]
        # whole pages: a dimension-major row of keys then starts 16-byte aligned (a capacity that is not a
        # multiple of 16 tokens made Triton drop its vector loads: the kernels ran ~25% slower in a model)
        cap = self.page * -(-self.max_tokens // self.page) if self.max_tokens else 0
        rows = 2 * self.kv_dims if self.key_planes else self.kv_dims
        self.keys = key_states.new_zeros((batch, groups, rows, cap), dtype=torch.uint8 if self.key_planes else None)
        self.values = value_states.new_zeros((batch, groups, cap, head_dim))
        if self.bound_page:  # of planes: float16, as the keys they bound
            self.bounds = key_states.new_zeros((batch, groups, 2, self.kv_dims, cap // self.bound_page),
                                               dtype=torch.float16 if self.key_planes else None)

    def _reserve(self, needed: int) -> None:
        if self.max_tokens is not None and needed > self.max_tokens:
            raise ConfigError(f"this projected KV cache holds {self.max_tokens} tokens; {needed} were written: "
                              "build it with a larger max_tokens")
        cap = self.keys.shape[-1]
        if needed <= cap:
            return
        new_cap = self.page * -(-max(needed, cap + cap // 2) // self.page)
        keys = self.keys.new_zeros((*self.keys.shape[:3], new_cap))
        values = self.values.new_zeros((*self.values.shape[:2], new_cap, self.values.shape[-1]))
        keys[..., : self.length] = self.keys[..., : self.length]
        values[:, :, : self.length] = self.values[:, :, : self.length]
        self.keys, self.values = keys, values
        if self.bounds is not None:
            bounds = self.bounds.new_zeros((*self.bounds.shape[:4], new_cap // self.bound_page))
            bounds[..., : self.bounds.shape[-1]] = self.bounds
            self.bounds = bounds

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """key_states, value_states: ``(batch, num_kv_heads, new_tokens, head_dim)``."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif key_states.shape[1] != self.keys.shape[1] or key_states.shape[-1] != self.projection.shape[-1]:
            raise ConfigError(f"layer {self.layer_idx}: keys of shape {tuple(key_states.shape)} do not fit this projected KV cache")
        self.flush()  # a deferred write that no hook took
        start, new = self.length, key_states.shape[-2]
        self._reserve(start + new)
        if new == 1 and self.state.defer_writes and self._basis_half is not None and self.kv_dims == key_states.shape[-1]:
            # a decode step on the GPU: the hook writes the token from its first kernel launch (one launch where a
            # projection and two copies were), or with ``flush`` before any other use of the cache
            self.deferred = (key_states[:, :, 0], value_states[:, :, 0], start)
        else:
            projected = self._project(key_states)  # (B, G, n, m)
            self.keys[..., start : start + new] = self._stored(projected.transpose(-1, -2))
            self.values[:, :, start : start + new] = value_states
            self._rebound(start, start + new)
        self.length = start + new
        self.fresh = (key_states, value_states) if start == 0 else None
        self.state.pending = self
        return self.keys[..., : self.length], self.values[:, :, : self.length]

    def take_deferred(self) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """The token ``update`` left unwritten (the caller now owns writing it), or None."""
        deferred, self.deferred = self.deferred, None
        return deferred

    def flush(self) -> None:
        """Write a deferred token the ordinary way (projection in the cache's dtype, two copies)."""
        deferred = self.take_deferred()
        if deferred is not None:
            key, value, pos = deferred
            self.keys[..., pos : pos + 1] = self._stored(self._project(key[:, :, None]).transpose(-1, -2))
            self.values[:, :, pos] = value
            self._rebound(pos, pos + 1)

    def _rebound(self, start: int, end: int) -> None:
        """Recompute the bounds of the sub-pages holding tokens ``[start, end)`` from the keys ``[.., end)``."""
        if self.bounds is None or end <= start:
            return
        from ..kernels.paged import page_bounds

        first = start // self.bound_page
        self.bounds[..., first : -(-end // self.bound_page)] = page_bounds(
            self.keys[..., first * self.bound_page : end], self.bound_page)

    def _stored(self, kd: torch.Tensor) -> torch.Tensor:
        """Dimension-major projected keys as the buffer holds them: themselves, or their byte planes."""
        return key_planes(kd) if self.key_planes else kd

    def _project(self, key_states: torch.Tensor) -> torch.Tensor:
        """``kP`` in the cache's dtype. On CUDA in half precision one matmul in that dtype (float32
        accumulation): a decode step writes one token per layer, and the float32 round trip was three
        extra launches a layer; elsewhere float32, so the CPU path stays exact at ``m = D`` (key planes: float32,
        rounded once to their float16)."""
        if self._basis_half is not None:
            return key_states @ self._basis_half
        projected = key_states.float() @ self._basis
        return projected if self.key_planes else projected.to(self.keys.dtype)

    def reset(self) -> None:
        self.length, self.fresh, self.deferred = 0, None, None
        if self.state.pending is self:
            self.state.pending = None

    def crop(self, tokens_to_remove: int) -> None:
        self.flush()
        super().crop(tokens_to_remove)
        if self.length and self.bounds is not None:  # the last sub-page may have lost tokens
            self._rebound(self.bound_page * ((self.length - 1) // self.bound_page), self.length)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.flush()
        if self.is_initialized:
            self.keys = self.keys.repeat_interleave(repeats, dim=0)
            self.values = self.values.repeat_interleave(repeats, dim=0)
            if self.bounds is not None:
                self.bounds = self.bounds.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.flush()
        if self.is_initialized:
            self.keys, self.values = self.keys[indices], self.values[indices]
            if self.bounds is not None:
                self.bounds = self.bounds[indices]


class ProjectedKVCache(ModelBoundCache):
    """A :class:`ProjectedKVLayer` per layer, tied to the states of the :class:`AquaDecode` that built it."""

    what = "projected KV cache"
    fix = "build the cache with the model's own AquaDecode"

    def __init__(self, artifact: Any, kv_dims: int, states: list[DecodeState], max_tokens: int | None = None, page: int = 64,
                 bound_page: int | None = None, key_planes: bool = False):
        super().__init__(layers=[ProjectedKVLayer(p, kv_dims, s, i, max_tokens, page, bound_page, key_planes)
                                 for i, (p, s) in enumerate(zip(artifact.projections, states))])
        self.kv_dims, self.model_id = kv_dims, artifact.model_id


# -- the reference decode on the projected cache (any device) ------------------------------------------
def group_dims(qp: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean ``(B, G, 1, Q, m)`` dims kept per KV group and query: the ``k`` largest ``sum_g |qP|``
    (float32 sums, as the kernels rank them); ``qp`` ``(B, G, rep, Q, m)``."""
    m = qp.shape[-1]
    if k >= m:
        return torch.ones_like(qp[:, :, :1], dtype=torch.bool)
    top = qp.float().abs().sum(2, keepdim=True).topk(k, dim=-1).indices
    return torch.zeros_like(qp[:, :, :1], dtype=torch.bool).scatter_(-1, top, True)


def page_keep(scores: torch.Tensor | None, visible: torch.Tensor, ratio: float, page: int, sinks: int, recent: int,
              pscores: torch.Tensor | None = None) -> torch.Tensor:
    """Token keep-mask ``(B, G, Q, L)`` of top-T by pages: per query, the first ``sinks`` and the last
    ``recent`` visible pages, and on top of them the ``ceil(ratio * visible / page)`` visible pages of highest
    max score. ``scores`` ``(B, G, Q, L)`` with ``-inf`` where not visible; or ``pscores`` ``(B, G, Q, NP)``, page
    scores already cut from each row's first visible key (``ordered_page_scores``, ``paged.prefix_bound_scores``)."""
    from ..kernels.reference import put_back, take, visible_order

    order = visible_order(visible)  # pages cut from each row's first visible key, as the row alone would
    if pscores is None:
        pscores = ordered_page_scores(scores, visible, page)
    keep_pages = best_pages(pscores, visible, ratio, page, sinks, recent)
    keep = keep_pages.repeat_interleave(page, dim=-1)[..., : visible.shape[-1]] & take(visible, order)
    return put_back(keep, order)


def ordered_page_scores(scores: torch.Tensor, visible: torch.Tensor, page: int) -> torch.Tensor:
    """``(B, G, Q, NP)`` max token score per page, pages cut from each row's first visible key."""
    from ..kernels.reference import take, visible_order

    scores = take(scores, visible_order(visible))
    length = scores.shape[-1]
    n_pages = -(-length // page)
    padded = torch.nn.functional.pad(scores, (0, n_pages * page - length), value=float("-inf"))
    return padded.view(*scores.shape[:-1], n_pages, page).amax(-1)


def best_pages(pscores: torch.Tensor, visible: torch.Tensor, ratio: float, page: int, sinks: int, recent: int,
               times: int = 1) -> torch.Tensor:
    """Page keep-mask ``(B, G, Q, NP)`` (pages as ``ordered_page_scores`` cuts them): the forced pages, and
    ``times`` x ``ceil(ratio * visible / page)`` of the others by score."""
    n_pages = pscores.shape[-1]
    seen = visible.sum(-1)  # (B, 1, Q) visible keys (a prefix, causal)
    last = (seen - 1).clamp(min=0) // page  # the page holding the newest visible key
    idx = torch.arange(n_pages, device=visible.device)
    forced = (idx < sinks) | ((idx <= last[..., None]) & (idx > last[..., None] - recent))
    pscores = torch.where(forced & (pscores > float("-inf")), torch.full_like(pscores, float("inf")), pscores)
    budget = times * torch.clamp(torch.ceil(ratio * seen.float() / page), min=1).long()  # (B, 1, Q)
    budget = budget + (forced & (idx <= last[..., None])).sum(-1)  # the forced pages come on top
    rank = torch.sort(pscores, dim=-1, descending=True, stable=True).indices.argsort(-1)
    return rank < budget[..., None]


@dataclass
class DecodeHook(ProjectionHook):
    """One layer of :class:`AquaDecode`: see the module docstring for which path runs when."""

    state: DecodeState = field(default_factory=DecodeState)
    token_ratio: float | None = None
    page: int = 64
    sink_pages: int = 1
    recent_pages: int = 8
    kernels: bool = True
    hybrid: bool = True
    prefill: str = "dense"
    query_chunk: int = 512  # queries per score block in the PyTorch path: bounds memory at long prefill
    page_score: str = "max"
    bound_page: int | None = None
    rerank: int = 0
    calls: dict[str, int] = field(default_factory=lambda: {"kernel": 0, "reference": 0, "prefill": 0}, repr=False)
    _configs: dict[tuple, Any] = field(default_factory=dict, repr=False)

    def attend(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        layer, self.state.pending = self.state.pending, None
        if layer is None or key.dim() != 4 or key.shape[-1] != layer.length:
            if layer is not None:
                layer.flush()
            return super().attend(module, query, key, value, attention_mask, **kwargs)  # no projected cache: Aqua
        fresh, layer.fresh = layer.fresh, None
        if fresh is not None and self.prefill == "dense":  # prefill into an empty cache: exact, on the fresh keys
            layer.flush()  # a one-token prompt
            self.calls["prefill"] += 1
            return sdpa_attention_forward(module, query, fresh[0], fresh[1], attention_mask, **kwargs)
        scale = kwargs.get("scaling")
        if scale is None:
            scale = getattr(module, "scaling", query.shape[-1] ** -0.5)
        if self._kernel_ready(query, key, attention_mask):
            self.calls["kernel"] += 1
            return self._kernel(query, key, value, scale, layer.take_deferred(), layer.bounds), None
        layer.flush()
        self.calls["reference"] += 1
        return self._reference(query, key, value, attention_mask, scale), None

    # -- the fused kernels ------------------------------------------------------------------------------
    def _kernel_ready(self, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None) -> bool:
        if not (self.kernels and query.is_cuda and query.shape[2] == 1 and self.mode == "dynamic"):
            return False
        if isinstance(self.k, torch.Tensor) or key_dim(key) != query.shape[-1] or query.dtype != torch.bfloat16:
            return False  # per-group budgets and truncated keys (m < D) run the reference
        if mask is not None:
            return False  # transformers passes no mask to a decode step without padding; with one, the reference
        return _triton_ready()

    def _kernel(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                deferred: tuple[torch.Tensor, torch.Tensor, int] | None = None,
                bounds: torch.Tensor | None = None) -> torch.Tensor:
        from ..kernels.decode import DecodeConfig, aqua_decode

        batch, q_heads, _, dim = query.shape
        length = key.shape[-1]
        dims, ratio = min(int(self.k), dim), self.token_ratio
        if ratio is not None and self.hybrid and not self.uses_topt(batch, length):
            dims, ratio = dim, None  # below top-T's break-even: exact attention (every dim) over the same cache
        launch = launch_for(dims, dim, ratio, batch * length)
        setting = (dims, ratio, tuple(launch.items()))  # not ``key``: that is the projected keys
        config = self._configs.get(setting)
        if config is None:  # built once per setting: this runs in every layer of every decode step
            config = self._configs[setting] = DecodeConfig(dims=dims, token_ratio=ratio, granularity="pages", page=self.page,
                                                       page_score=self.page_score, bound_page=self.bound_page,
                                                       rerank=self.rerank, **launch)
        new_kv = None if deferred is None else (deferred[0], deferred[1], key, value, deferred[2])
        out = aqua_decode(query[:, :, 0], None, value, key, self._projection_on(query.device), config,
                          scale=scale, sink_pages=self.sink_pages, recent_pages=self.recent_pages, new_kv=new_kv,
                          bounds=bounds)  # the deferred token lands in the bounds too, whichever path runs
        return out[:, None]  # (B, 1, Hq, D)

    @staticmethod
    def uses_topt(batch: int, length: int) -> bool:
        """The hybrid switch inside a model: top-T pages from the break-even measured for this batch size
        (kernels/hybrid.py), exact attention below it (the dims kernel over every dim of the projected cache:
        dense's quality where top-T would save nothing; dims only with top-T's k cost +26% ppl on SmolLM2 at
        4K, top-T +1.9%). Dims only runs at every length: with the keys stored projected, "dense" is that same
        full-dim kernel, which the whole model measured slower than k = D/2 at every length from 4K in session 3
        (docs/results/e2e-nohybrid-h100.json); with today's launch parameters dims only is >= 1.01x of dense at
        every length (docs/results/e2e-h100.json)."""
        return length >= min_seq_for(DEFAULT_MIN_SEQ_TOPT, batch)

    # -- the same math in PyTorch -----------------------------------------------------------------------
    def _reference(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                   scale: float) -> torch.Tensor:
        """query ``(B, Hq, Q, D)``; key ``(B, Hkv, m, L)`` projected, dimension-major (or its byte planes,
        ``(B, Hkv, 2m, L)`` uint8); value ``(B, Hkv, L, D)``."""
        batch, q_heads, q_len, dim = query.shape
        kd = key_values(key).float()[:, :, None]  # (B, G, 1, m, L)
        ks = score_values(key).float()[:, :, None] if is_planes(key) else kd  # what page scoring reads
        groups, m, length = kd.shape[1], kd.shape[3], kd.shape[4]
        proj = self._projection_on(query.device)[..., :m]
        qp = query.float().view(batch, groups, q_heads // groups, q_len, dim) @ proj[:, None]  # (B, G, rep, Q, m)
        v = value.float()[:, :, None]  # (B, G, 1, L, D)
        visible = visible_keys(mask, batch, q_len, length, query.device)[:, :, None]  # (B, 1, 1, Q, L)
        outs = [self._attend_chunk(qp[:, :, :, i : i + self.query_chunk], kd, ks, v, visible[:, :, :, i : i + self.query_chunk],
                                   m, scale) for i in range(0, q_len, self.query_chunk)]
        out = torch.cat(outs, dim=3)  # (B, G, rep, Q, D)
        return out.reshape(batch, q_heads, q_len, dim).transpose(1, 2).to(query.dtype)

    def _attend_chunk(self, qp: torch.Tensor, kd: torch.Tensor, ks: torch.Tensor, v: torch.Tensor, visible: torch.Tensor,
                      m: int, scale: float) -> torch.Tensor:
        groups = qp.shape[1]
        if self.mode == "dense":
            kept = qp
        elif isinstance(self.k, torch.Tensor) or self.mode == "static":
            kept = select_dims(qp, self.budget(groups, m), self.mode)
        else:
            kept = qp * group_dims(qp, min(int(self.k), m))
        if self.token_ratio is None:
            probs = ((kept @ kd) * scale).masked_fill(~visible, float("-inf")).softmax(-1)  # (B, G, rep, Q, L)
        else:
            vis = visible[:, :, 0]
            keep = page_keep(None, vis, self.token_ratio, self.page, self.sink_pages, self.recent_pages,
                             self._page_scores(kept, kd, ks, visible, scale))
            exact = (qp @ kd) * scale
            probs = exact.masked_fill(~keep[:, :, None], float("-inf")).softmax(-1)
        return probs.nan_to_num(0.0) @ v  # a fully masked row (left padding) gives zeros, not NaN


    def _page_scores(self, kept: torch.Tensor, kd: torch.Tensor, ks: torch.Tensor, visible: torch.Tensor,
                     scale: float) -> torch.Tensor:
        """``(B, G, Q, NP)`` top-T's page scores (pages as ``ordered_page_scores`` cuts them), as ``page_score``
        says: the best approximate logit of each page, its bound, or the bound's best ``rerank`` x budget ranked
        by their best logit. The logits ``(B, G, rep, Q, L)`` are only formed where a ranking reads them, from
        ``ks``: the keys as scoring reads them (``kd`` itself, or the high plane of key planes)."""
        vis = visible[:, :, 0]

        def by_max() -> torch.Tensor:
            approx = ((kept @ ks) * scale).masked_fill(~visible, float("-inf"))
            return ordered_page_scores(approx.amax(2), vis, self.page)

        if self.page_score != "bound":
            return by_max()
        from ..kernels.paged import pool_pages, prefix_bound_scores

        sub = self.bound_page or self.page
        pscores = pool_pages(prefix_bound_scores(kept, kd[:, :, 0].transpose(-1, -2), vis, sub), self.page // sub)
        if self.rerank > 0:
            cands = best_pages(pscores, vis, self.token_ratio, self.page, self.sink_pages, self.recent_pages, self.rerank)
            pscores = by_max().masked_fill(~cands, float("-inf"))
        return pscores


def launch_for(dims: int, dim: int, ratio: float | None, tokens: int) -> dict[str, Any]:
    """Launch parameters of the dims kernel where the defaults were measured slower (H100, docs/bench.md):
    over every dim (exact attention over the projected cache, the hybrid's short side) blocks of 64 tokens and
    2 programs per SM (batch 1 x 4K / 8K / 16K: 13.3 / 16.7 / 37.3 us against 15.5 / 24.0 / 40.3); dims only
    with up to 32K tokens in the batch, blocks of 64 (batch 1 x 4K / 8K: 16.4 / 18.3 us against 16.8 / 20.7)."""
    if ratio is not None:
        return {}
    if dims >= dim:
        return {"block_n": 64, "waves": 2.0}
    return {"block_n": 64} if tokens <= 32768 else {}


_TRITON: list[bool] = []


def _triton_ready() -> bool:
    """Whether the fused kernels can run here (asked once per process)."""
    if not _TRITON:
        from ..kernels import triton_available

        _TRITON.append(triton_available())
    return _TRITON[0]


@dataclass
class AquaDecode(Aqua):
    """AQUA with a projected KV cache and, on CUDA, the fused kernels in every decode step.

    ``k``: dims kept (ratio or count); ``token_ratio``: T/L for dims + top-T pages (None: dims only);
    ``kv_dims``: projected key dims stored (ratio or count; 1.0 = all, exact at ``k = D``); ``page``: tokens
    per page; ``sink_pages``/``recent_pages``: pages always kept by top-T (1 and 8 by default: on SmolLM2 at
    4K, k=0.5, T=L/16, 1 recent page cost +8.3% ppl, 4 +2.9%, 8 +1.9%; docs/decode.md); ``max_tokens``: a
    fixed cache capacity (None: grows); ``kernels``: use the fused kernels where they apply; ``hybrid``: top-T
    only from its measured break-even, exact attention below it (:meth:`DecodeHook.uses_topt`); ``prefill``:
    "dense" (exact attention on the prompt, as a server would) or "aqua" (every prompt position attends as a
    decode step at that position would: what a quality run of the decode path measures in one forward);
    ``page_score``: how top-T ranks pages, "max" (their tokens' best approximate logit: reads the kept dims of
    every key) or "bound" (Quest's bound from the per-page min and max of the projected keys, which the cache
    then keeps: reads 2 values a kept dim per ``bound_page`` tokens, default ``page``; faster, coarser: see
    docs/decode.md for both on SmolLM2); ``rerank`` (with "bound"): the ``rerank`` x budget best pages by bound
    are ranked again by "max", which reads only their keys; ``key_planes``: the cache stores the projected keys
    in float16 split into two byte planes (``kernels.reference.key_planes``), and "max" scores pages on the high
    plane only (an fp8 e5m2 key: half the scoring bytes, same cache size; docs/decode.md for its cost). Pass
    ``new_cache()`` as ``past_key_values``.
    """

    token_ratio: float | None = None
    kv_dims: float | int = 1.0
    page: int = 64
    sink_pages: int = 1
    recent_pages: int = 8
    max_tokens: int | None = None
    kernels: bool = True
    hybrid: bool = True
    prefill: str = "dense"
    query_chunk: int = 512
    page_score: str = "max"
    bound_page: int | None = None
    rerank: int = 0
    key_planes: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        from ..kernels.paged import check_bound_page, check_page_score

        check_page_score(self.page_score)
        if self.prefill not in ("dense", "aqua"):
            raise ConfigError(f"prefill must be dense or aqua, got {self.prefill!r}")
        self.m = parse_kv_dims(self.kv_dims, self.artifact.head_dim)
        if self.token_ratio is not None and not 0.0 < self.token_ratio <= 1.0:
            raise ConfigError(f"token ratio T/L = {self.token_ratio} is outside (0, 1]")
        if self.page < 16 or self.page & (self.page - 1):
            raise ConfigError(f"page must be a power of two >= 16, got {self.page}")
        if self.page_score == "bound":
            self.bound_page = check_bound_page(self.page, self.bound_page)
        elif self.bound_page is not None or self.rerank:
            raise ConfigError("bound_page and rerank apply to page_score='bound'")
        if self.rerank < 0:
            raise ConfigError(f"rerank must be 0 (off) or more, got {self.rerank}")
        if self.sink_pages < 0 or self.recent_pages < 0:
            raise ConfigError("sink_pages and recent_pages must be 0 or more")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be at least 1, got {self.max_tokens}")
        self.states: list[DecodeState] = []

    @property
    def name(self) -> str:  # type: ignore[override]
        return "aqua-decode" if self.token_ratio is None else "aqua-decode-topt"

    def check(self, model: torch.nn.Module) -> None:
        super().check(model)
        full_attention_only(model.config, "the projected KV cache")

    def make_hook(self, projection: torch.Tensor) -> ProjectionHook:
        state = DecodeState(defer_writes=self.kernels)
        self.states.append(state)
        return DecodeHook(projection, self.dims, self.mode, kv_dims=self.m, state=state, token_ratio=self.token_ratio,
                          page=self.page, sink_pages=self.sink_pages, recent_pages=self.recent_pages,
                          kernels=self.kernels, hybrid=self.hybrid, prefill=self.prefill,
                          query_chunk=self.query_chunk, page_score=self.page_score, bound_page=self.bound_page,
                          rerank=self.rerank)

    def layer_hooks(self, model: torch.nn.Module) -> list[AttentionHook]:
        self.states = []
        return super().layer_hooks(model)

    def new_cache(self) -> ProjectedKVCache:
        if not self.states:
            raise ConfigError("install AquaDecode on a model before building its cache")
        for state in self.states:
            state.pending = None
        return ProjectedKVCache(self.artifact, self.m, self.states, self.max_tokens, self.page, self.bound_page,
                                self.key_planes)

    def remove(self) -> None:
        for state in self.states:
            state.pending = None
        super().remove()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "kv_dims": self.kv_dims, "token_ratio": self.token_ratio, "page": self.page,
                "sink_pages": self.sink_pages, "recent_pages": self.recent_pages, "page_score": self.page_score,
                "bound_page": self.bound_page, "rerank": self.rerank, "key_planes": self.key_planes}

