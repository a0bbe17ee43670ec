"""AQUA as a rewrite of q and k (the paper's method; the reference path every kernel is checked against).

With ``P`` orthogonal (columns ordered by calibration energy), ``q · k = (qP) · (kP)``. Zeroing all but the
selected coordinates of ``qP`` leaves exactly the dot product over the selected dimensions, which is what
the paper computes:

* ``static``: the first ``k`` projected dimensions (the highest-energy directions);
* ``dynamic``: per query token and head, the ``k`` dimensions with the largest ``|qP|``;
* ``dense``: no rewrite (the reference through the same code path).

This path still multiplies all ``D`` dimensions (zeros included); the FLOP and byte savings are realised
by the fused kernels in :mod:`aqua_cli.kernels`. With ``k = D`` it is exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..budgets import k_dims
from ..errors import ConfigError
from .base import AttentionHook, Method

MODES = ("dense", "static", "dynamic")


def parse_mode(mode: str) -> str:
    if mode not in MODES:
        raise ConfigError(f"unknown mode '{mode}': use one of {', '.join(MODES)}")
    return mode


def select_dims(q: torch.Tensor, k: int | torch.Tensor, mode: str) -> torch.Tensor:
    """Zero all but ``k`` coordinates of projected queries ``(..., D)`` (see module docstring).

    ``k`` is an int, or a tensor that broadcasts against ``q.shape[:-1]`` (per-group budgets, e.g.
    shape ``(G, 1, 1)`` for ``q`` of shape ``(B, G, rep, S, D)``).
    """
    head_dim = q.shape[-1]
    if mode == "dense":
        return q
    if isinstance(k, torch.Tensor):
        k = k.to(q.device)
        if bool((k >= head_dim).all()):
            return q
        kmax = int(k.max())
        rank = torch.arange(head_dim, device=q.device)
        if mode == "static":
            return q * (rank < k.unsqueeze(-1))
        top = q.abs().topk(kmax, dim=-1).indices
        kept = q.gather(-1, top) * (rank[:kmax] < k.unsqueeze(-1))
        return torch.zeros_like(q).scatter_(-1, top, kept)
    if k >= head_dim:
        return q
    if mode == "static":
        keep = torch.zeros(head_dim, dtype=q.dtype, device=q.device)
        keep[:k] = 1
        return q * keep
    top = q.abs().topk(k, dim=-1).indices
    return torch.zeros_like(q).scatter_(-1, top, q.gather(-1, top))


@dataclass
class ProjectionHook(AttentionHook):
    """AQUA for one layer: project q and k with the layer's per-group ``P``, keep ``k`` dims of q.

    ``projection`` is ``[groups, D, D]`` float32; group ``g`` serves KV head ``g`` and its query heads.
    ``kv_dims`` (the projected key cache's ``m``) restricts everything to the first ``m`` projected dims:
    static keeps ``min(k, m)``, dynamic picks the ``k`` largest ``|qP|`` among the ``m``. Computed in
    float32 whatever the model's dtype, then cast back.
    """

    projection: torch.Tensor
    k: int | torch.Tensor  # dims kept: one int, or a LongTensor [groups] (per-group budgets)
    mode: str = "dynamic"
    kv_dims: int | None = None  # None: all D dims
    _cache: dict[Any, torch.Tensor] = field(default_factory=dict, repr=False)

    def _projection_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._cache:
            self._cache.clear()
            self._cache[device] = self.projection.to(device=device, dtype=torch.float32)
        return self._cache[device]

    def budget(self, groups: int, m: int) -> int | torch.Tensor:
        """Dims kept among the first ``m``: ``k`` capped at ``m`` (per-group budgets shaped ``(G, 1, 1)`` to
        broadcast over ``(B, G, rep, Q, m)`` queries)."""
        if isinstance(self.k, torch.Tensor):
            return self.k.view(groups, 1, 1).clamp(max=m)
        return min(self.k, m)

    def rewrite(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "dense":
            return query, key
        batch, q_heads, q_len, head_dim = query.shape
        groups = key.shape[1]
        proj = self._projection_on(query.device)
        if proj.shape[0] != groups or proj.shape[-1] != head_dim:
            raise ConfigError(
                f"layer {getattr(module, 'layer_idx', '?')}: projection {tuple(proj.shape)} does not fit "
                f"{groups} KV heads of dim {head_dim}"
            )
        m = min(self.kv_dims or head_dim, head_dim)
        if m < head_dim:
            proj = proj[..., :m]
        q = query.float().view(batch, groups, q_heads // groups, q_len, head_dim) @ proj[:, None]
        k = key.float() @ proj
        q = select_dims(q, self.budget(groups, m), self.mode)
        if m < head_dim:  # the dot product needs only the kept dims; pad back so SDPA sees the usual shapes
            q, k = torch.nn.functional.pad(q, (0, head_dim - m)), torch.nn.functional.pad(k, (0, head_dim - m))
        return q.reshape(batch, q_heads, q_len, head_dim).to(query.dtype), k.to(key.dtype)


@dataclass
class Aqua(Method):
    """AQUA attention from an artifact at ``k`` (ratio or dims) and ``mode``; change both live with
    :meth:`set`, per-layer budgets with :meth:`set_layer_k`."""

    artifact: Any = None
    k: float | int | str = 0.75
    mode: str = "dynamic"

    name = "aqua"

    def __post_init__(self) -> None:
        if self.artifact is None:
            raise ConfigError(f"{type(self).__name__} needs an artifact")
        self.dims = k_dims(self.k, self.artifact.head_dim)
        parse_mode(self.mode)

    def check(self, model: torch.nn.Module) -> None:
        self.artifact.check_model(model.config)

    def make_hook(self, projection: torch.Tensor) -> ProjectionHook:
        return ProjectionHook(projection, self.dims, self.mode)

    def layer_hooks(self, model: torch.nn.Module) -> list[AttentionHook]:
        return [self.make_hook(p) for p in self.artifact.projections]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "k": self.k}

    def set_layer_k(self, budgets: Sequence[int | Sequence[int]]) -> None:
        """Per-layer (and optionally per-group) numbers of kept dimensions, e.g. from a k-policy."""
        if len(budgets) != len(self.hooks):
            raise ConfigError(f"{len(budgets)} layer budgets for {len(self.hooks)} layers")
        d, groups = self.artifact.head_dim, self.artifact.num_groups
        for i, (hook, budget) in enumerate(zip(self.hooks, budgets)):
            values = torch.as_tensor(budget, dtype=torch.long).reshape(-1)
            if values.numel() not in (1, groups) or bool((values < 1).any() or (values > d).any()):
                raise ConfigError(f"layer {i}: budget {values.tolist()} must be 1 or {groups} values in 1..{d}")
            hook.k = int(values) if values.numel() == 1 else values
        self.k = "per-layer"

    def set(self, k: float | int | None = None, mode: str | None = None) -> None:
        if k is not None:
            dims = k_dims(k, self.artifact.head_dim)
            for hook in self.hooks:
                hook.k = dims
            self.k, self.dims = k, dims
        if mode is not None:
            parse_mode(mode)
            for hook in self.hooks:
                hook.mode = mode
            self.mode = mode


AquaPatch = Aqua  # the handle patch() returns (its earlier name)


def patch(model: torch.nn.Module, artifact: Any, k: float | int = 0.75, mode: str = "dynamic") -> Aqua:
    """Run ``model`` with AQUA attention from ``artifact`` (an Artifact, a path or a registry name).

    Returns the installed :class:`Aqua` method, which undoes the patch on ``remove()`` or at the end of a
    ``with`` block.
    """
    from ..registry import as_artifact

    return Aqua(as_artifact(artifact), k, mode).install(model)


def load_patched(
    model: str | None = None,
    artifact: Any = None,
    k: float | int = 0.75,
    mode: str = "dynamic",
    revision: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> tuple[torch.nn.Module, Any, Aqua]:
    """Load a model (Hub id, directory, .gguf, or the default SmolLM2) and patch it in one call.

    ``artifact`` is a path, a registry name or ``hf://org/repo``; None picks the registry entry named
    after the model (the shipped one for SmolLM2). Returns ``(model, tokenizer, handle)``.
    """
    from ..models import load_model, resolve_model
    from ..registry import artifact_for_model

    source = resolve_model(model, revision)
    art = artifact_for_model(artifact, source.model_id)
    loaded, tokenizer = load_model(source, device, dtype)
    return loaded, tokenizer, patch(loaded, art, k=k, mode=mode)
