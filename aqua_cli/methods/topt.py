"""AQUA dims + top-T tokens (as SparQ and Loki do), on any device, prefill and decode.

The selected projected dims give approximate scores; per KV group and block of ``select_block`` keys
the best ``T/L`` share of tokens is kept (:func:`aqua_cli.kernels.reference.select_tokens`, the rule the
fused kernels implement), and attention is exact over those. ``token_ratio=None`` is AQUA dims only
(softmax over the approximate scores). This is the quality reference for the top-T kernels: it
materialises ``(B, H, Q, L)`` scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..budgets import k_dims
from ..kernels.reference import dims_scores, select_tokens, visible_keys
from .base import AttentionHook, Method


@dataclass
class TopTokensHook(AttentionHook):
    """AQUA dims + top-T tokens for one layer, as an ``attend()`` hook (prefill and decode, any device).

    Scores every visible key on the ``k`` selected projected dims, keeps per KV group and block of
    ``select_block`` keys the best ``T/L`` share, and attends exactly over those. ``token_ratio=None``
    gives AQUA dims only (softmax over the approximate logits), ``dims=D`` and ``token_ratio=None`` dense.
    Quality reference only: it materialises ``(B, H, Q, L)`` scores.
    """

    projection: torch.Tensor  # (Hkv, D, D) float32
    dims: int
    token_ratio: float | None = None
    gqa: str = "group"
    select_block: int = 512
    _cache: dict[Any, torch.Tensor] = field(default_factory=dict, repr=False)

    def _proj(self, device: torch.device) -> torch.Tensor:
        if device not in self._cache:
            self._cache = {device: self.projection.to(device, torch.float32)}
        return self._cache[device]

    def attend(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        batch, q_heads, q_len, dim = query.shape
        kv_len = key.shape[2]
        scale = scaling if scaling is not None else dim ** -0.5
        visible = visible_keys(attention_mask, batch, q_len, kv_len, query.device)  # (B, 1, Q, L) bool
        q, approx = dims_scores(query, key, self._proj(query.device), self.dims, self.gqa, scale, visible)
        kf = key.float()
        if self.token_ratio is None:
            probs = approx.softmax(-1).nan_to_num(0.0)  # a fully masked row (left padding) gives zeros, not NaN
        else:
            keep = _keep_causal(approx.amax(2), visible, self.token_ratio, self.select_block)  # (B, Hkv, Q, L)
            exact = (q @ kf[:, :, None].transpose(-1, -2)) * scale
            probs = exact.masked_fill(~keep[:, :, None], float("-inf")).softmax(-1).nan_to_num(0.0)
        out = probs @ value.float()[:, :, None]  # (B, Hkv, G, Q, D)
        out = out.reshape(batch, q_heads, q_len, dim).transpose(1, 2).to(query.dtype)
        return out, None


def _keep_causal(scores: torch.Tensor, visible: torch.Tensor, ratio: float, block: int) -> torch.Tensor:
    """Top-T per block for every query row, blocks cut from the row's first visible key (so a left-padded row
    selects as it would alone); from there its visible keys are a prefix, whose length is their count."""
    from ..kernels.reference import put_back, take, visible_order

    order = visible_order(visible)  # (B, 1, Q, L)
    lengths = visible.sum(-1)  # (B, 1, Q)
    return put_back(select_tokens(take(scores, order), lengths, ratio, block), order) & visible


@dataclass
class TopTokens(Method):
    """Dims (``k``, ratio or count) + top-T (``token_ratio`` = T/L, None: dims only) from ``artifact``."""

    artifact: Any = None
    k: float | int = 0.5
    token_ratio: float | None = 1 / 16
    gqa: str = "group"
    select_block: int = 512

    name = "aqua-topt"

    def __post_init__(self) -> None:
        from ..errors import ConfigError
        from ..kernels.reference import GQA_MODES, block_keep_for

        if self.artifact is None:
            raise ConfigError("TopTokens needs an artifact")
        self.dims = k_dims(self.k, self.artifact.head_dim)
        if self.gqa not in GQA_MODES:
            raise ConfigError(f"unknown GQA selection '{self.gqa}': use one of {', '.join(GQA_MODES)}")
        if self.token_ratio is not None:
            block_keep_for(self.token_ratio, self.select_block)

    def check(self, model: torch.nn.Module) -> None:
        self.artifact.check_model(model.config)

    def layer_hooks(self, model: torch.nn.Module) -> list[AttentionHook]:
        return [TopTokensHook(p, self.dims, self.token_ratio, self.gqa, self.select_block) for p in self.artifact.projections]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "k": self.k, "token_ratio": self.token_ratio}
