"""AQUA over a KV cache that stores keys in the AQUA basis, truncated to the first ``m`` projected dims.

Why it is sound: ``P`` (per layer and KV group, ``[D, D]`` orthogonal, columns by decreasing calibration
energy) satisfies ``q · k = (qP) · (kP)``. Storing only ``k_proj = (kP)[:m]`` and handing attention the
reconstruction ``k_rec = k_proj P[:, :m]^T`` gives ``q · k_rec = (qP)[:m] · k_proj``: the dot product over
the ``m`` highest-energy directions, i.e. AQUA's static selection at ``k = m``, now paid for in memory.
With ``m = D`` the reconstruction is ``k P P^T = k`` (to float rounding): exact.

:class:`AquaKV` is :class:`~aqua_cli.methods.aqua.Aqua` whose hooks select among the ``m`` kept dims and
whose :meth:`AquaKV.new_cache` builds the cache. ``mode="dense"`` is the cache alone (plain attention
over the rank-``m`` keys, i.e. static AQUA at ``k = m``).

Layout per layer (a :class:`ProjectedKeyLayer`, a ``DynamicLayer`` subclass, so ``generate()`` works):

* ``keys``: ``(batch, num_kv_heads, seq_len, m)`` in the model's dtype, in the projected basis;
* ``values``: ``(batch, num_kv_heads, seq_len, head_dim)``, untouched (values are mixed by attention
  weights, not dotted with queries, so the query-energy basis says nothing about which value
  directions matter).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..attention import full_attention_only
from ..budgets import parse_kv_dims
from ..errors import ConfigError
from .aqua import Aqua, ProjectionHook


def check_key_shape(key_states: torch.Tensor, projection: torch.Tensor, layer_idx: int, what: str) -> None:
    """Refuse keys whose KV heads or head dim are not those the layer's projection ``[groups, D, D]`` was
    calibrated for (a cache built for another model)."""
    groups, head_dim = projection.shape[0], projection.shape[-1]
    if key_states.shape[1] != groups or key_states.shape[-1] != head_dim:
        raise ConfigError(
            f"layer {layer_idx}: this {what} was built for {groups} KV heads of dim {head_dim}, "
            f"the model gives {key_states.shape[1]} of dim {key_states.shape[-1]}: build the cache for this model"
        )


class ProjectedKeyLayer(DynamicLayer):
    """One layer's cache: keys stored as ``(k P)[..., :m]``, values as is; ``update`` returns the keys
    reconstructed in the original basis (rank ``m``), so attention code needs no change."""

    def __init__(self, projection: torch.Tensor, kv_dims: int, layer_idx: int = 0):
        super().__init__()
        self.projection = projection.float()  # [groups, D, D]
        self.kv_dims = kv_dims
        self.layer_idx = layer_idx
        self._basis: torch.Tensor | None = None  # [groups, D, m] on the cache's device, float32

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        check_key_shape(key_states, self.projection, self.layer_idx, "projected cache")
        super().lazy_initialization(key_states, value_states)
        self._basis = self.projection[:, :, : self.kv_dims].to(self.device)
        self.keys = key_states.new_zeros((*key_states.shape[:2], 0, self.kv_dims))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """key_states, value_states: ``(batch, num_kv_heads, new_tokens, head_dim)``."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif key_states.shape[1] != self.keys.shape[1] or key_states.shape[-1] != self.projection.shape[-1]:
            raise ConfigError(f"layer {self.layer_idx}: keys of shape {tuple(key_states.shape)} do not fit this projected cache")
        new = (key_states.float() @ self._basis).to(key_states.dtype)  # (B, G, L, m)
        self.keys = torch.cat([self.keys, new], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        return self.reconstructed(), self.values

    def reconstructed(self) -> torch.Tensor:
        """Keys in the original basis, ``k_proj P[:, :m]^T``: ``(batch, num_kv_heads, seq_len, head_dim)``."""
        return (self.keys.float() @ self._basis.transpose(-1, -2)).to(self.values.dtype)


class ModelBoundCache(Cache):
    """A cache built for one model's layers (``model_id``): an update of a layer it does not have is refused
    with ``what`` it is and ``fix``, instead of an IndexError deep in transformers."""

    what = "projected cache"
    fix = "build the cache for this model"
    model_id: str = ""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        if layer_idx >= len(self.layers):
            raise ConfigError(
                f"this {self.what} has {len(self.layers)} layers (built for {self.model_id}) but the model "
                f"updates layer {layer_idx}: {self.fix}"
            )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


class ProjectedKeyCache(ModelBoundCache):
    """A cache of :class:`ProjectedKeyLayer`, one per layer of the model it was built for.

    Build it with :func:`projected_cache` or :meth:`AquaKV.new_cache`; pass it as ``past_key_values=`` to
    ``model(...)`` or ``generate(...)``; one cache serves one sequence batch, as any transformers cache."""

    def __init__(self, artifact: Any, kv_dims: int):
        super().__init__(layers=[ProjectedKeyLayer(p, kv_dims, i) for i, p in enumerate(artifact.projections)])
        self.kv_dims = kv_dims
        self.fingerprint_hash = artifact.metadata.get("fingerprint_hash")
        self.model_id = artifact.model_id

    def check_model(self, config: Any) -> None:
        """Refuse a model other than the one the cache was built for (same test as the artifact's)."""
        from ..models import fingerprint_hash, model_fingerprint

        if fingerprint_hash(model_fingerprint(config)) != self.fingerprint_hash:
            raise ConfigError(
                f"this projected cache was built for {self.model_id}, not for "
                f"{getattr(config, '_name_or_path', '') or 'this model'}: build one with projected_cache(model, artifact)"
            )


@dataclass
class AquaKV(Aqua):
    """AQUA restricted to the ``kv_dims`` (ratio or count) that a projected key cache keeps, with that cache."""

    kv_dims: float | int | str = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.m = parse_kv_dims(self.kv_dims, self.artifact.head_dim)

    @property
    def name(self) -> str:  # type: ignore[override]
        return "kv-proj" if self.mode == "dense" else "kv-proj+aqua"

    def check(self, model: torch.nn.Module) -> None:
        super().check(model)
        full_attention_only(model.config, "the projected key cache")

    def make_hook(self, projection: torch.Tensor) -> ProjectionHook:
        return ProjectionHook(projection, self.dims, self.mode, kv_dims=self.m)

    def new_cache(self) -> ProjectedKeyCache:
        return ProjectedKeyCache(self.artifact, self.m)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "k": None if self.mode == "dense" else self.k, "kv_dims": self.kv_dims,
                "kv_dims_count": self.m}


def projected_cache(model: torch.nn.Module, artifact: Any, kv_dims: str | float) -> ProjectedKeyCache:
    """A fresh projected-key cache for ``model`` keeping ``kv_dims`` (ratio or count) of each key."""
    artifact.check_model(model.config)
    full_attention_only(model.config, "the projected key cache")
    return ProjectedKeyCache(artifact, parse_kv_dims(kv_dims, artifact.head_dim))


def patch_kv(model: torch.nn.Module, artifact: Any, kv_dims: str | float, k: float = 1.0,
             mode: str = "dynamic") -> AquaKV:
    """Patch ``model`` with AQUA whose selection is restricted to the ``kv_dims`` kept by the projected
    cache; build caches with ``handle.new_cache()`` or :func:`projected_cache`. Undo with ``remove()`` / ``with``."""
    return AquaKV(artifact, k, mode, kv_dims=kv_dims).install(model)
