"""The one place aqua touches transformers' attention: a registered attention function, its mask
function, and the installer that puts one hook on every attention module.

transformers calls a registered attention function with the post-RoPE queries ``(B, Hq, Sq, D)`` and the
keys and values after the cache update ``(B, Hkv, Skv, D)``. We register one function, ``"aqua"``, and a
mask function beside it (``sdpa_mask``: without one a padded batch silently loses its mask). The function
hands the call to the module's *hook*, whose one method is ``attend(module, q, k, v, mask, **kw)``
(:class:`aqua_cli.methods.AttentionHook`; its default rewrites q and k and calls transformers' own SDPA, so
masking, GQA, sliding windows, caches and ``generate()`` behave exactly as with ``attn_implementation="sdpa"``).
A module without a hook runs plain SDPA.

What the hooks do, and how a method pairs them with a cache, lives in :mod:`aqua_cli.methods`; this module
knows nothing of AQUA. Installing never touches model code and can be undone.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .errors import ConfigError

ATTN_NAME = "aqua"
HOOK_ATTR = "_aqua_hook"


def aqua_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """The registered attention function: the module's hook attends, else transformers' SDPA."""
    hook = getattr(module, HOOK_ATTR, None)
    if hook is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return hook.attend(module, query, key, value, attention_mask, **kwargs)


def aqua_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """transformers' ``sdpa_mask``, made explicit for one case: a one-token step, causal, with no padding
    mask and no window, gets no mask (every key is visible). ``sdpa_mask`` decides the same in eager mode,
    but some transformers versions (5.17) treat CUDA-graph capture as tracing and build a full mask there:
    SDPA then leaves flash for a masked kernel with the KV heads repeated, and AQUA's decode step leaves the
    fused kernels for its reference path, so a captured step would compute differently from the eager one."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    if (not args and kwargs.get("attention_mask") is None and kwargs.get("allow_is_causal_skip", True)
            and kwargs.get("local_size") is None and kwargs.get("mask_function", causal_mask_function) is causal_mask_function
            and _query_length(kwargs) == 1):
        return None
    return sdpa_mask(*args, **kwargs)


def _query_length(kwargs: dict[str, Any]) -> int | None:
    """``q_length`` (transformers >= 5.20) or the length of ``cache_position`` (earlier)."""
    if isinstance(kwargs.get("q_length"), int):
        return kwargs["q_length"]
    positions = kwargs.get("cache_position")
    return int(positions.shape[0]) if isinstance(positions, torch.Tensor) else None


def register() -> None:
    """Register the ``aqua`` attention and mask functions with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, aqua_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, aqua_mask)


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


def full_attention_only(config: Any, what: str) -> None:
    """Refuse models with sliding-window or chunked layers, for methods whose caches do not reproduce
    those layers' window logic (one line now, not a wrong answer later)."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    decoder = config.get_text_config(decoder=True)
    types = set(get_layer_types_and_kwargs(decoder)[0])
    if types - {"full_attention"}:
        raise ConfigError(
            f"{what} supports full-attention layers only; {getattr(config, 'model_type', 'this model')} has "
            f"{', '.join(sorted(types - {'full_attention'}))} layers"
        )


class HookedModel:
    """Hooks installed on a model's attention modules, with the attention implementation switched to
    ``aqua``; ``remove()`` (or leaving the ``with`` block) restores the model exactly."""

    def __init__(self, model: torch.nn.Module, hooks: Sequence[Any]):
        modules = attention_modules(model)
        if len(hooks) != len(modules):
            raise ConfigError(f"{len(hooks)} hooks for {len(modules)} attention layers")
        register()
        self.model = model
        self.modules = modules
        self.previous_impl = model.config._attn_implementation
        self._own = list(hooks)
        for module, hook in zip(modules, hooks):
            setattr(module, HOOK_ATTR, hook)
        model.set_attn_implementation(ATTN_NAME)

    @property
    def hooks(self) -> list[Any]:
        return [getattr(m, HOOK_ATTR) for m in self.modules]

    def replace(self, hooks: Sequence[Any]) -> None:
        """Swap the installed hooks for others (one per module), e.g. probes around them."""
        if len(hooks) != len(self.modules):
            raise ConfigError(f"{len(hooks)} hooks for {len(self.modules)} attention layers")
        self._own = list(hooks)
        for module, hook in zip(self.modules, hooks):
            setattr(module, HOOK_ATTR, hook)

    def remove(self) -> None:
        """Remove this installation's hooks; hooks another installation put there since are left alone."""
        mine = [getattr(m, HOOK_ATTR, None) is h for m, h in zip(self.modules, self._own)]
        for module, own in zip(self.modules, mine):
            if own:
                delattr(module, HOOK_ATTR)
        if any(hasattr(m, HOOK_ATTR) for m in self.modules):
            return  # another installation is live
        if self.model.config._attn_implementation == ATTN_NAME:
            self.model.set_attn_implementation(self.previous_impl or "sdpa")

    def __enter__(self) -> "HookedModel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def unpatch(model: torch.nn.Module) -> None:
    """Remove any aqua hooks from ``model`` and restore SDPA attention."""
    try:
        modules = attention_modules(model)
    except ConfigError:
        return
    for module in modules:
        if hasattr(module, HOOK_ATTR):
            delattr(module, HOOK_ATTR)
    if model.config._attn_implementation == ATTN_NAME:
        model.set_attn_implementation("sdpa")
