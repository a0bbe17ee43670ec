"""H2O heavy-hitter eviction (Zhang et al., 2023), alone or driven by AQUA's approximate scores.

H2O keeps, per layer, batch row and KV head, a token budget of ``recent`` most recent tokens plus the
``budget - recent`` older tokens with the largest *accumulated attention* (the sum, over every query so
far and over the query heads of the KV group, of the softmax probability given to that token). The
paper's default is half heavy hitters, half recent (``recent_ratio = 0.5``).

Two pieces share one :class:`H2OState` per layer:

* :class:`H2OLayer`, a ``DynamicLayer`` subclass: stores K, V and the accumulated scores
  ``(batch, num_kv_heads, stored)``; tracks ``cumulative_length`` (tokens seen) apart from the tokens
  stored, like transformers' ``DynamicSlidingWindowLayer``, so ``get_seq_length()`` (which fixes the
  RoPE positions of new tokens) stays right after eviction and ``get_mask_sizes()`` covers only what
  is stored. ``update()`` appends and marks itself *pending* on the state.
* :class:`H2OHook`, an attention hook that overrides ``attend()``: computes attention explicitly (scores on the
  AQUA-projected, selected dimensions when combined with AQUA, as the AQUA paper composes them; else
  dense), adds the probabilities to the pending layer's scores, then evicts down to the budget.

Attention therefore always sees every token the cache holds plus the new ones; eviction happens after
each forward, in prefill (the prompt is compressed to the budget) and at every decode step.

The budget is a token count, or a ratio of the prompt (the first forward's length), fixed then.
Limits (refused or documented, never silently wrong): full-attention models only; no padded batches
(eviction is per head, so a 2-D padding mask no longer lines up with the stored tokens); greedy or
sampling ``generate()``, not beam search.

:class:`H2O` is the method: the hooks, and ``new_cache()`` for each generation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..attention import attention_modules, full_attention_only
from ..budgets import k_dims, parse_budget
from ..errors import ConfigError
from .aqua import ProjectionHook, parse_mode
from .base import AttentionHook, Method


@dataclass
class H2OState:
    """What a layer's cache and its attention hook share: the budget and the layer awaiting eviction."""

    budget: float | int
    recent_ratio: float = 0.5
    pending: H2OLayer | None = field(default=None, repr=False)

    def capacity(self, prompt_len: int) -> int:
        if isinstance(self.budget, float):
            return max(2, round(self.budget * prompt_len))
        return self.budget


class H2OLayer(DynamicLayer):
    """One layer's H2O cache: K, V ``(batch, num_kv_heads, stored, head_dim)`` and accumulated attention
    ``scores`` ``(batch, num_kv_heads, stored)`` float32, at most ``capacity`` tokens after each forward."""

    is_croppable = False

    def __init__(self, state: H2OState, layer_idx: int = 0, num_kv_heads: int | None = None, head_dim: int | None = None):
        super().__init__()
        self.state = state
        self.layer_idx = layer_idx
        self.expected = (num_kv_heads, head_dim)
        self.cumulative_length = 0
        self.capacity: int | None = None  # fixed by the first update (the prompt)
        self.scores: torch.Tensor | None = None
        self.evicted = 0  # tokens dropped so far

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        heads, dim = self.expected
        if (heads is not None and key_states.shape[1] != heads) or (dim is not None and key_states.shape[-1] != dim):
            raise ConfigError(
                f"layer {self.layer_idx}: this H2O cache was built for {heads} KV heads of dim {dim}, the model gives "
                f"{key_states.shape[1]} of dim {key_states.shape[-1]}: build the cache with the model's own patch_h2o handle"
            )
        super().lazy_initialization(key_states, value_states)
        self.scores = torch.zeros((*key_states.shape[:2], 0), dtype=torch.float32, device=self.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if self.state.pending is self:
            raise ConfigError(
                "an H2O cache was used without its attention hooks (nothing evicted after the last forward): "
                "run the model patched by the patch_h2o handle that built the cache"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.capacity is None:
            self.capacity = self.state.capacity(key_states.shape[-2])
        self.cumulative_length += key_states.shape[-2]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        zeros = self.scores.new_zeros((*key_states.shape[:2], key_states.shape[-2]))
        self.scores = torch.cat([self.scores, zeros], dim=-1)
        self.state.pending = self
        return self.keys, self.values

    def get_seq_length(self) -> int:
        """Tokens seen (decides the positions of the next tokens), not tokens stored."""
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = 0 if self.keys is None or not self.is_initialized else self.keys.shape[-2]
        return stored + query_length, self.cumulative_length - stored

    def reset(self) -> None:
        super().reset()
        self.scores, self.capacity, self.evicted = None, None, 0
        if self.state.pending is self:
            self.state.pending = None

    def accumulate(self, probs: torch.Tensor) -> None:
        """probs: ``(batch, num_kv_heads, queries_per_group, q_len, stored)`` softmax probabilities."""
        self.scores += probs.sum(dim=(2, 3))

    def evict(self) -> None:
        """Keep the ``recent`` newest tokens and the highest-scoring others, ``capacity`` in all, in order."""
        stored = self.keys.shape[-2]
        if self.capacity is None or stored <= self.capacity:
            return
        recent = min(self.capacity - 1, max(1, round(self.capacity * self.state.recent_ratio)))
        heavy = self.capacity - recent
        old = stored - recent
        top = self.scores[..., :old].topk(heavy, dim=-1).indices.sort(dim=-1).values
        tail = torch.arange(old, stored, device=top.device).expand(*top.shape[:2], recent)
        keep = torch.cat([top, tail], dim=-1)  # (B, G, capacity)
        gather = keep.unsqueeze(-1).expand(-1, -1, -1, self.keys.shape[-1])
        self.keys = self.keys.gather(2, gather)
        self.values = self.values.gather(2, keep.unsqueeze(-1).expand(-1, -1, -1, self.values.shape[-1]))
        self.scores = self.scores.gather(2, keep)
        self.evicted += stored - self.capacity

    # beam search would need scores reordered too; refuse instead of drifting
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise ConfigError("H2O does not support beam search")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise ConfigError("H2O does not support beam search or num_return_sequences > 1")

    def crop(self, tokens_to_remove: int) -> None:
        raise ConfigError("H2O caches cannot be cropped (evicted tokens are gone): assisted decoding is not supported")


class H2OCache(Cache):
    """One :class:`H2OLayer` per layer, tied to the states of the patch that built it."""

    def __init__(self, states: list[H2OState], num_kv_heads: int, head_dim: int):
        super().__init__(layers=[H2OLayer(s, i, num_kv_heads, head_dim) for i, s in enumerate(states)])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        if layer_idx >= len(self.layers):
            raise ConfigError(
                f"this H2O cache has {len(self.layers)} layers but the model updates layer {layer_idx}: "
                "build the cache with the model's own patch_h2o handle"
            )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def _allowed(mask: torch.Tensor | None, q_len: int, kv_len: int, device: torch.device) -> torch.Tensor | None:
    """Boolean ``[..., q_len, kv_len]`` (True = may attend), or None when every pair is allowed."""
    if mask is None:
        if q_len == 1:
            return None
        return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)
    mask = mask[..., -kv_len:]
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


@dataclass
class H2OHook(AttentionHook):
    """Attention with accumulation and eviction for one layer; ``inner`` (an AQUA hook) makes the scores
    approximate, and those approximate probabilities then drive the accumulation."""

    state: H2OState
    inner: ProjectionHook | None = None
    query_chunk: int = 1024  # queries per score block: bounds memory at long prefill

    def attend(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        """query ``(B, Hq, Sq, D)``; key, value ``(B, Hkv, Skv, D)``; returns ``(B, Sq, Hq, D)``."""
        layer, self.state.pending = self.state.pending, None
        if layer is not None and layer.keys.shape[-2] != key.shape[-2]:
            layer = None  # not this call's cache (defensive: never evict from the wrong tensors)
        batch, q_heads, q_len, head_dim = query.shape
        groups, kv_len = key.shape[1], key.shape[2]
        rep = q_heads // groups
        scale = kwargs.get("scaling")
        if scale is None:
            scale = getattr(module, "scaling", head_dim**-0.5)
        q, k = (query, key) if self.inner is None else self.inner.rewrite(module, query, key)
        q = q.float().view(batch, groups, rep, q_len, head_dim)
        k, v = k.float()[:, :, None], value.float()[:, :, None]
        allowed = _allowed(attention_mask, q_len, kv_len, query.device)
        if attention_mask is not None and layer is not None:
            causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
            if not bool((allowed == causal).all()):
                raise ConfigError("H2O does not support padded batches (eviction is per head): run one prompt at a time or prompts of equal length")
        if allowed is not None:
            allowed = allowed.view(allowed.shape[0], 1, 1, *allowed.shape[-2:]) if allowed.dim() == 4 else allowed
        outs = []
        for start in range(0, q_len, self.query_chunk):
            stop = min(q_len, start + self.query_chunk)
            scores = (q[..., start:stop, :] @ k.transpose(-1, -2)) * scale  # (B, G, rep, s, Skv)
            if allowed is not None:
                scores = scores.masked_fill(~allowed[..., start:stop, :], float("-inf"))
            probs = scores.softmax(-1).nan_to_num(0.0)  # fully masked rows (padding) give zeros
            outs.append(probs @ v)
            if layer is not None:
                layer.accumulate(probs)
        out = torch.cat(outs, dim=-2).view(batch, q_heads, q_len, head_dim)
        if layer is not None:
            layer.evict()
        return out.transpose(1, 2).contiguous().to(query.dtype), None


@dataclass
class H2O(Method):
    """H2O under ``budget`` (ratio of the prompt or token count); with ``artifact``, attention and the
    accumulated scores use AQUA (``k``, ``mode``). Pass ``new_cache()`` as ``past_key_values`` to every
    generation; without an H2O cache, attention is exact (nothing to evict)."""

    budget: float | int | str = 0.5
    artifact: Any = None
    k: float | int = 1.0
    mode: str = "dynamic"
    recent_ratio: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.recent_ratio < 1.0:
            raise ConfigError(f"recent_ratio {self.recent_ratio} is outside [0, 1)")
        self.budget = parse_budget(self.budget)
        self.states: list[H2OState] = []
        self._kv_shape: tuple[int, int] | None = None

    @property
    def name(self) -> str:  # type: ignore[override]
        return "h2o" if self.artifact is None else "aqua+h2o"

    def check(self, model: torch.nn.Module) -> None:
        full_attention_only(model.config, "H2O")
        if self.artifact is not None:
            self.artifact.check_model(model.config)

    def layer_hooks(self, model: torch.nn.Module) -> list[AttentionHook]:
        from ..models import attention_shape

        self.states = [H2OState(self.budget, self.recent_ratio) for _ in attention_modules(model)]
        inners: list[ProjectionHook | None] = [None] * len(self.states)
        if self.artifact is not None:
            dims = k_dims(self.k, self.artifact.head_dim)
            inners = [ProjectionHook(p, dims, parse_mode(self.mode)) for p in self.artifact.projections]
        shape = attention_shape(model.config)
        self._kv_shape = (shape["num_kv_heads"], shape["head_dim"])
        return [H2OHook(s, inner) for s, inner in zip(self.states, inners)]

    def new_cache(self) -> H2OCache:
        if self._kv_shape is None:
            raise ConfigError("install the H2O method on a model before building its cache")
        for state in self.states:
            state.pending = None
        return H2OCache(self.states, *self._kv_shape)

    def remove(self) -> None:
        for state in self.states:
            state.pending = None
        super().remove()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "k": None if self.artifact is None else self.k, "h2o_budget": self.budget}


def patch_h2o(model: torch.nn.Module, budget: str | float, artifact: Any = None, k: float = 1.0,
              mode: str = "dynamic", recent_ratio: float = 0.5) -> H2O:
    """Install :class:`H2O` on ``model``; returns the method (``new_cache()``, ``remove()``, ``with``)."""
    return H2O(budget, artifact, k, mode, recent_ratio).install(model)
