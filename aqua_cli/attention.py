"""AQUA attention inside any transformers model, through the public attention interface.

transformers calls a registered attention function with the post-RoPE queries ``(B, Hq, Sq, D)`` and the
keys and values after the cache update ``(B, Hkv, Skv, D)``. We register one function, ``"aqua"``, and a
mask function beside it (``sdpa_mask``: without one a padded batch silently loses its mask). The function
looks for a *hook* on the attention module; a hook rewrites the queries and keys (``hook(module, q, k)
-> (q, k)``), and the rest is transformers' own SDPA path, so masking, GQA, sliding windows, caches and ``generate()`` behave exactly as
with ``attn_implementation="sdpa"``.

AQUA as a rewrite of q and k: with ``P`` orthogonal (columns ordered by calibration energy),
``q · k = (qP) · (kP)``. Zeroing all but the selected coordinates of ``qP`` leaves exactly the
dot product over the selected dimensions, which is what the paper computes:

* ``static``: the first ``k`` projected dimensions (the highest-energy directions);
* ``dynamic``: per query token and head, the ``k`` dimensions with the largest ``|qP|``;
* ``dense``: no rewrite (the reference through the same code path).

This reference path still multiplies all ``D`` dimensions (zeros included); the FLOP and byte savings
are realised by the fused kernels in :mod:`aqua_cli.kernels`. With ``k = D`` it is exact.

Patching never touches model code and can be undone::

    with aqua_cli.patch(model, "artifacts/HuggingFaceTB--SmolLM2-135M-Instruct", k=0.75):
        model.generate(...)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .errors import ConfigError

ATTN_NAME = "aqua"
HOOK_ATTR = "_aqua_hook"
MODES = ("dense", "static", "dynamic")

Hook = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def aqua_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The registered attention function: run the module's hook, then transformers' SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    hook = getattr(module, HOOK_ATTR, None)
    if hook is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    attend = getattr(hook, "attend", None)
    if attend is not None:  # a hook that computes attention itself (fused kernels, token selection)
        return attend(module, query, key, value, attention_mask, **kwargs)
    query, key = hook(module, query, key)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register() -> None:
    """Register the ``aqua`` attention and mask functions with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, aqua_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The attention modules of a decoder, ordered by ``layer_idx``.

    transformers' attention modules carry ``layer_idx`` and ``num_key_value_groups``; decoder layers may
    carry ``layer_idx`` too, but not the latter.
    """
    found: dict[int, torch.nn.Module] = {}
    for module in model.modules():
        idx = getattr(module, "layer_idx", None)
        if isinstance(idx, int) and hasattr(module, "num_key_value_groups"):
            found.setdefault(idx, module)
    if not found:
        raise ConfigError(
            f"{type(model).__name__} has no attention modules that use transformers' attention interface"
        )
    return [found[i] for i in sorted(found)]


class HookedModel:
    """Hooks installed on a model's attention modules, with the attention implementation switched to
    ``aqua``; ``remove()`` (or leaving the ``with`` block) restores the model exactly."""

    def __init__(self, model: torch.nn.Module, hooks: Sequence[Hook]):
        modules = attention_modules(model)
        if len(hooks) != len(modules):
            raise ConfigError(f"{len(hooks)} hooks for {len(modules)} attention layers")
        register()
        self.model = model
        self.modules = modules
        self.previous_impl = model.config._attn_implementation
        for module, hook in zip(modules, hooks):
            setattr(module, HOOK_ATTR, hook)
        model.set_attn_implementation(ATTN_NAME)

    @property
    def hooks(self) -> list[Hook]:
        return [getattr(m, HOOK_ATTR) for m in self.modules]

    def remove(self) -> None:
        for module in self.modules:
            if hasattr(module, HOOK_ATTR):
                delattr(module, HOOK_ATTR)
        if self.model.config._attn_implementation == ATTN_NAME:
            self.model.set_attn_implementation(self.previous_impl or "sdpa")

    def __enter__(self) -> "HookedModel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def ratio_or_count(text: str) -> float | int:
    """The convention every budget option shares: an integer string is a count, anything with a
    decimal point a ratio. Raises ValueError for text that is neither."""
    text = text.strip()
    return int(text) if text.lstrip("+-").isdigit() else float(text)


def parse_k(value: str | float | int) -> float | int:
    """``k`` as the user gives it: a ratio of head_dim (has a decimal point, ``0 < k <= 1``) or a count
    of dimensions (an integer, ``1 <= k <= head_dim``). ``"1"`` is one dimension, ``"1.0"`` all of them."""
    if isinstance(value, bool):
        raise ConfigError(f"invalid k {value!r}")
    if isinstance(value, str):
        text = value.strip()
        try:
            value = ratio_or_count(text)
        except ValueError:
            raise ConfigError(f"invalid k '{text}': give a ratio such as 0.75 or a number of dimensions such as 48") from None
    if isinstance(value, float):
        if not (0.0 < value <= 1.0) or value != value:
            raise ConfigError(f"k ratio {value} is outside (0, 1]: give e.g. 0.75, or an integer number of dimensions")
        return value
    if value < 1:
        raise ConfigError(f"k must be at least 1 dimension, got {value}")
    return int(value)


def k_dims(k: float | int, head_dim: int) -> int:
    """Number of dimensions kept for ``k`` on heads of ``head_dim``."""
    k = parse_k(k)
    if isinstance(k, float):
        return max(1, min(head_dim, round(k * head_dim)))
    if k > head_dim:
        raise ConfigError(f"k = {k} dimensions is more than head_dim = {head_dim}: give at most {head_dim} or a ratio")
    return k


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
class ProjectionHook:
    """AQUA for one layer: project q and k with the layer's per-group ``P``, keep ``k`` dims of q.

    ``projection`` is ``[groups, D, D]`` float32; group ``g`` serves KV head ``g`` and its query heads.
    Computed in float32 whatever the model's dtype, then cast back.
    """

    projection: torch.Tensor
    k: int | torch.Tensor  # dims kept: one int, or a LongTensor [groups] (per-group budgets)
    mode: str = "dynamic"
    _cache: dict[Any, torch.Tensor] = field(default_factory=dict, repr=False)

    def _projection_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._cache:
            self._cache.clear()
            self._cache[device] = self.projection.to(device=device, dtype=torch.float32)
        return self._cache[device]

    def __call__(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
        q = query.float().view(batch, groups, q_heads // groups, q_len, head_dim) @ proj[:, None]
        k = key.float() @ proj
        budget = self.k.view(groups, 1, 1) if isinstance(self.k, torch.Tensor) else self.k
        q = select_dims(q, budget, self.mode)
        return q.view(batch, q_heads, q_len, head_dim).to(query.dtype), k.to(key.dtype)


class AquaPatch(HookedModel):
    """A model running AQUA attention from an artifact. Change ``k``/``mode`` live with :meth:`set`."""

    def __init__(self, model: torch.nn.Module, artifact: Any, k: float | int = 0.75, mode: str = "dynamic"):
        artifact.check_model(model.config)
        self.artifact = artifact
        head_dim = artifact.head_dim
        hooks = [ProjectionHook(p, k_dims(k, head_dim), parse_mode(mode)) for p in artifact.projections]
        super().__init__(model, hooks)
        self.k, self.mode = k, mode

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
            self.k = k
        if mode is not None:
            parse_mode(mode)
            for hook in self.hooks:
                hook.mode = mode
            self.mode = mode


def patch(model: torch.nn.Module, artifact: Any, k: float | int = 0.75, mode: str = "dynamic") -> AquaPatch:
    """Run ``model`` with AQUA attention from ``artifact`` (an Artifact, a path or a registry name).

    Returns a handle that undoes the patch on ``remove()`` or at the end of a ``with`` block.
    """
    from .artifact import Artifact, load_artifact

    if not isinstance(artifact, Artifact):
        artifact = load_artifact(artifact)
    unpatch(model)
    return AquaPatch(model, artifact, k=k, mode=mode)


def unpatch(model: torch.nn.Module) -> None:
    """Remove any AQUA hooks from ``model`` and restore SDPA attention."""
    try:
        modules = attention_modules(model)
    except ConfigError:
        return
    for module in modules:
        if hasattr(module, HOOK_ATTR):
            delattr(module, HOOK_ATTR)
    if model.config._attn_implementation == ATTN_NAME:
        model.set_attn_implementation("sdpa")


def load_patched(
    model: str | None = None,
    artifact: Any = None,
    k: float | int = 0.75,
    mode: str = "dynamic",
    revision: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> tuple[torch.nn.Module, Any, AquaPatch]:
    """Load a model (Hub id, directory, .gguf, or the default SmolLM2) and patch it in one call.

    ``artifact`` is a path, a registry name or ``hf://org/repo``; None picks the registry entry named
    after the model (the shipped one for SmolLM2). Returns ``(model, tokenizer, handle)``.
    """
    from .artifact import artifact_for_model
    from .models import load_model, resolve_model

    source = resolve_model(model, revision)
    art = artifact_for_model(artifact, source.model_id)
    loaded, tokenizer = load_model(source, device, dtype)
    return loaded, tokenizer, patch(loaded, art, k=k, mode=mode)
