"""One shape for every way aqua changes attention (modelled on NVIDIA kvpress's presses).

* An :class:`AttentionHook` serves one layer. Its one contract is ``attend(module, q, k, v, mask, **kw)``,
  called by the registered ``aqua`` attention function (:mod:`aqua_cli.attention`) with the post-RoPE
  queries ``(B, Hq, Sq, D)`` and the cached keys and values ``(B, Hkv, Skv, D)``; it returns
  ``((B, Sq, Hq, D), weights or None)``. The default rewrites q and k (:meth:`AttentionHook.rewrite`,
  identity here) and calls transformers' SDPA, so a method that only changes scores overrides ``rewrite``;
  one that computes attention itself (eviction, token selection, fused kernels) overrides ``attend``.
* A :class:`Method` is a dataclass of settings that builds one hook per layer, optionally the cache those
  hooks need (:meth:`Method.new_cache`: pass it as ``past_key_values=``), and installs and undoes itself::

      with Aqua(artifact, k=0.5)(model):
          model.generate(...)

  A method instance serves one model at a time. ``describe()`` gives the columns every harness
  (eval, memory, needle) writes beside its numbers.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from ..attention import HookedModel, attention_modules, unpatch
from ..errors import ConfigError


class AttentionHook:
    """One layer's part of a method (see module docstring)."""

    def rewrite(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys as the scores should see them; identity by default."""
        return query, key

    def attend(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        query, key = self.rewrite(module, query, key)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


@dataclass
class Method:
    """Settings, hooks, an optional cache, and install/undo (see module docstring).

    Subclasses implement :meth:`layer_hooks`; they may refuse a model in :meth:`check` (before anything
    is installed) and build a cache in :meth:`new_cache`.
    """

    name = "method"
    _installed: HookedModel | None = field(default=None, init=False, repr=False, compare=False)

    # -- what a subclass provides ----------------------------------------------------------------------
    def check(self, model: torch.nn.Module) -> None:
        """Refuse a model this method cannot serve (one line, before any hook is installed)."""

    def layer_hooks(self, model: torch.nn.Module) -> list[AttentionHook]:
        raise NotImplementedError

    def new_cache(self) -> Any:
        """A fresh cache for one generation, or None when the model's own cache will do."""
        return None

    def describe(self) -> dict[str, Any]:
        """The columns a results row carries for this method."""
        return {"method": self.name, "k": None, "kv_dims": None, "h2o_budget": None}

    # -- install and undo ------------------------------------------------------------------------------
    def install(self, model: torch.nn.Module) -> "Method":
        """Install on ``model`` (replacing any aqua hooks there); returns self, a context manager."""
        self.check(model)
        hooks = self.layer_hooks(model)
        if self._installed is not None:
            self.remove()
        unpatch(model)
        self._installed = HookedModel(model, hooks)
        return self

    __call__ = install

    def remove(self) -> None:
        if self._installed is not None:
            self._installed.remove()
            self._installed = None

    def __enter__(self) -> "Method":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    @property
    def installed(self) -> HookedModel:
        if self._installed is None:
            raise ConfigError(f"{type(self).__name__} is not installed on a model: call it on one first")
        return self._installed

    @property
    def model(self) -> torch.nn.Module:
        return self.installed.model

    @property
    def modules(self) -> list[torch.nn.Module]:
        return self.installed.modules

    @property
    def hooks(self) -> list[Any]:
        return self.installed.hooks

    @contextlib.contextmanager
    def wrapped(self, wrap: Callable[[Any], AttentionHook]) -> Iterator[None]:
        """Run with each installed hook wrapped (e.g. by a probe that compares it with dense), then put
        the method's own hooks back."""
        own = self.hooks
        self.installed.replace([wrap(h) for h in own])
        try:
            yield
        finally:
            self.installed.replace(own)


@dataclass
class Dense(Method):
    """Plain attention through the same code path (the reference every method is compared with)."""

    name = "dense"

    def layer_hooks(self, model: torch.nn.Module) -> list[AttentionHook]:
        return [AttentionHook() for _ in attention_modules(model)]
