"""A KV cache that stores keys in the AQUA basis, truncated to the first ``m`` projected dimensions.

Why it is sound: ``P`` (per layer and KV group, ``[D, D]`` orthogonal, columns by decreasing calibration
energy) satisfies ``q · k = (qP) · (kP)``. Storing only ``k_proj = (kP)[:m]`` and handing attention the
reconstruction ``k_rec = k_proj P[:, :m]^T`` gives ``q · k_rec = (qP)[:m] · k_proj``: the dot product over
the ``m`` highest-energy directions, i.e. AQUA's static selection at ``k = m``, now paid for in memory.
With ``m = D`` the reconstruction is ``k P P^T = k`` (to float rounding): exact.

Because every attention path (SDPA, static and dynamic AQUA hooks) receives keys in the original basis,
nothing else changes. Dynamic AQUA should then pick its top-k *among the kept m dimensions* (the others
are zero in ``k_rec P``): :class:`KeptDimsHook` does that, and :func:`patch_kv` installs it.

Layout per layer (a :class:`ProjectedKeyLayer`, a ``DynamicLayer`` subclass, so ``generate()`` works):

* ``keys``: ``(batch, num_kv_heads, seq_len, m)`` in the model's dtype, in the projected basis;
* ``values``: ``(batch, num_kv_heads, seq_len, head_dim)``, untouched (values are mixed by attention
  weights, not dotted with queries, so the query-energy basis says nothing about which value
  directions matter).

:func:`cache_bytes` sums ``numel() * element_size()`` of the tensors a cache holds, for any cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .attention import AquaPatch, ProjectionHook, k_dims, parse_k, select_dims
from .errors import ConfigError


def parse_kv_dims(value: str | float, head_dim: int) -> int:
    """``--kv-dims`` as given: a ratio of head_dim (``0.5``) or a number of dimensions (``32``).

    Same grammar as ``k`` (:func:`aqua_cli.attention.parse_k`), with its own messages."""
    try:
        parsed = parse_k(value)
    except ConfigError:
        raise ConfigError(f"invalid --kv-dims {value!r}: give a ratio in (0, 1] such as 0.5, or a number of dimensions such as 32") from None
    if isinstance(parsed, int) and parsed > head_dim:
        raise ConfigError(f"--kv-dims {parsed} is more than head_dim = {head_dim}: give at most {head_dim} or a ratio")
    return k_dims(parsed, head_dim)


def full_attention_only(config: Any, what: str) -> None:
    """Refuse models with sliding-window or chunked layers: those layers keep their own window logic,
    which these caches do not reproduce (one line, not a wrong answer later)."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    decoder = config.get_text_config(decoder=True)
    types = set(get_layer_types_and_kwargs(decoder)[0])
    if types - {"full_attention"}:
        raise ConfigError(
            f"{what} supports full-attention layers only; {getattr(config, 'model_type', 'this model')} has "
            f"{', '.join(sorted(types - {'full_attention'}))} layers"
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
        groups, head_dim = self.projection.shape[0], self.projection.shape[-1]
        if key_states.shape[1] != groups or key_states.shape[-1] != head_dim:
            raise ConfigError(
                f"layer {self.layer_idx}: this projected cache was built for {groups} KV heads of dim {head_dim}, "
                f"the model gives {key_states.shape[1]} of dim {key_states.shape[-1]}: build the cache for this model"
            )
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


class ProjectedKeyCache(Cache):
    """A cache of :class:`ProjectedKeyLayer`, one per layer of the model it was built for.

    Build it with :func:`projected_cache` (checks the model); pass it as ``past_key_values=`` to
    ``model(...)`` or ``generate(...)``; one cache serves one sequence batch, as any transformers cache."""

    def __init__(self, artifact: Any, kv_dims: int):
        super().__init__(layers=[ProjectedKeyLayer(p, kv_dims, i) for i, p in enumerate(artifact.projections)])
        self.kv_dims = kv_dims
        self.fingerprint_hash = artifact.metadata.get("fingerprint_hash")
        self.model_id = artifact.model_id

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        if layer_idx >= len(self.layers):
            raise ConfigError(
                f"this projected cache has {len(self.layers)} layers (built for {self.model_id}) but the model "
                f"updates layer {layer_idx}: build the cache for this model"
            )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def check_model(self, config: Any) -> None:
        """Refuse a model other than the one the cache was built for (same test as the artifact's)."""
        from .models import fingerprint_hash, model_fingerprint

        if fingerprint_hash(model_fingerprint(config)) != self.fingerprint_hash:
            raise ConfigError(
                f"this projected cache was built for {self.model_id}, not for "
                f"{getattr(config, '_name_or_path', '') or 'this model'}: build one with projected_cache(model, artifact)"
            )


def projected_cache(model: torch.nn.Module, artifact: Any, kv_dims: str | float) -> ProjectedKeyCache:
    """A fresh projected-key cache for ``model`` keeping ``kv_dims`` (ratio or count) of each key."""
    artifact.check_model(model.config)
    full_attention_only(model.config, "the projected key cache")
    return ProjectedKeyCache(artifact, parse_kv_dims(kv_dims, artifact.head_dim))


@dataclass
class KeptDimsHook(ProjectionHook):
    """AQUA whose selection sees only the first ``kv_dims`` projected dimensions (those the projected
    cache keeps): static keeps ``min(k, m)``; dynamic picks the ``k`` largest ``|qP|`` among the ``m``."""

    kv_dims: int = 0

    def __call__(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "dense" or not self.kv_dims or self.kv_dims >= query.shape[-1]:
            return super().__call__(module, query, key)
        batch, q_heads, q_len, head_dim = query.shape
        groups = key.shape[1]
        proj = self._projection_on(query.device)
        if proj.shape[0] != groups or proj.shape[-1] != head_dim:
            raise ConfigError(f"layer {getattr(module, 'layer_idx', '?')}: projection {tuple(proj.shape)} does not fit {groups} KV heads of dim {head_dim}")
        m = self.kv_dims
        q = query.float().view(batch, groups, q_heads // groups, q_len, head_dim) @ proj[:, None, :, :m]
        k = key.float() @ proj[:, :, :m]
        budget = self.k.view(groups, 1, 1) if isinstance(self.k, torch.Tensor) else self.k
        if isinstance(budget, torch.Tensor):
            budget = budget.clamp(max=m)
        else:
            budget = min(budget, m)
        q = select_dims(q, budget, self.mode)
        # the dot product only needs the kept dims; pad back to head_dim so SDPA sees the usual shapes
        q = torch.nn.functional.pad(q, (0, head_dim - m)).view(batch, q_heads, q_len, head_dim)
        k = torch.nn.functional.pad(k, (0, head_dim - m))
        return q.to(query.dtype), k.to(key.dtype)


def patch_kv(model: torch.nn.Module, artifact: Any, kv_dims: str | float, k: float = 1.0,
             mode: str = "dynamic") -> AquaPatch:
    """Patch ``model`` with AQUA whose selection is restricted to the ``kv_dims`` kept by the projected
    cache; build caches with :func:`projected_cache`. Undo with ``remove()`` / ``with``."""
    from .attention import patch

    m = parse_kv_dims(kv_dims, artifact.head_dim)
    full_attention_only(model.config, "the projected key cache")
    handle = patch(model, artifact, k=k, mode=mode)
    for module, hook in zip(handle.modules, handle.hooks):
        module._aqua_hook = KeptDimsHook(hook.projection, hook.k, hook.mode, kv_dims=m)
    return handle


# -- bytes -----------------------------------------------------------------------------------------
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
    (tests/test_cache.py checks)."""
    from .models import attention_shape

    shape = attention_shape(config)
    per_token = 2 * shape["num_kv_heads"] * shape["head_dim"] * torch.empty((), dtype=dtype).element_size()
    return batch * shape["num_layers"] * tokens * per_token


# -- quality and bytes against dense (aqua memory, scripts/memory_results.py) ------------------------
class WithCache(torch.nn.Module):
    """Adapter for :func:`aqua_cli.evaluate.perplexity` (which calls ``model(batch, use_cache=False)``):
    every batch runs through a fresh cache from ``factory``, so a projected cache's rank-m keys are what
    attention sees, in prefill as in decoding. ``last`` keeps the latest cache for byte counts."""

    def __init__(self, model: torch.nn.Module, factory: Any):
        super().__init__()
        self.model, self.factory, self.last = model, factory, None

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False, **kwargs: Any) -> Any:
        self.last = self.factory()
        return self.model(input_ids, past_key_values=self.last, use_cache=True, **kwargs)


def kv_rows(model: torch.nn.Module, tokenizer: Any, artifact: Any, windows: torch.Tensor,
            kv_dims: tuple[str | float | int, ...] = (0.5, 0.75, 1.0), ks: tuple[float | int | None, ...] = (None, 0.5),
            on_row: Any = None) -> list[dict[str, Any]]:
    """Perplexity and real cache bytes at each kept-key size ``m``, against a dense ``DynamicCache`` on the
    same windows. ``k`` None = dense attention over the kept dims (which is static AQUA at ``k = m``);
    a number = dynamic AQUA choosing ``k`` dims (of head_dim, capped at m) among the m kept."""
    from transformers import DynamicCache

    from .evaluate import perplexity, window_bytes

    num_bytes = window_bytes(tokenizer, windows)
    dense = WithCache(model, DynamicCache)
    ref = perplexity(dense, windows, 1, num_bytes)
    dense_kv = cache_bytes(dense.last)["total"]
    rows = [{"method": "dense", "k": None, "kv_dims": None, "kv_dims_count": artifact.head_dim, "h2o_budget": None,
                 "kv_bytes": dense_kv, "dense_kv_bytes": dense_kv, "ppl": ref.ppl, "ppl_rel_change": 0.0, "tokens": ref.tokens,
                 "seq_len": int(windows.shape[1])}]
    if on_row:
        on_row(rows[-1])
    for k in ks:
        for m in kv_dims:
            dims = parse_kv_dims(m, artifact.head_dim)
            handle = patch_kv(model, artifact, m, k=k, mode="dynamic") if k is not None else None
            try:
                wrapped = WithCache(model, lambda m=m: projected_cache(model, artifact, m))
                result = perplexity(wrapped, windows, 1, num_bytes)
            finally:
                if handle is not None:
                    handle.remove()
            got = cache_bytes(wrapped.last)
            rows.append({"method": "kv-proj" if k is None else "kv-proj+aqua", "k": k, "kv_dims": m, "kv_dims_count": dims,
                             "h2o_budget": None, "kv_bytes": got["total"], "key_bytes": got["keys"], "value_bytes": got["values"],
                             "dense_kv_bytes": dense_kv, "ppl": result.ppl, "ppl_rel_change": result.ppl / ref.ppl - 1.0,
                             "tokens": result.tokens, "seq_len": int(windows.shape[1])})
            if on_row:
                on_row(rows[-1])
    return rows
