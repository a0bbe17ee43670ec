"""The memory harness: what a method's cache holds in bytes, and what it costs in perplexity, against a
dense cache on the same windows (``aqua memory``, scripts/memory_results.py; docs/memory.md).

One loop (:func:`run_methods`) installs each method in turn and measures it; two measures exist:

* :func:`prefill_measure`: perplexity of whole windows, each forward through a fresh cache from the
  method (so a projected cache's rank-m keys are what attention sees), and that cache's bytes;
* :func:`decode_measure`: each window's continuation after ``prompt_len`` tokens decoded token by token
  (eviction happens between steps, so H2O needs this), and the cache's bytes at the end.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

from .cost import cache_bytes
from .methods import H2O, Aqua, AquaKV, Dense, Method

Row = dict[str, Any]


class WithCache(torch.nn.Module):
    """Adapter for :func:`aqua_cli.evaluate.perplexity` (which calls ``model(batch, use_cache=False)``):
    every batch runs through a fresh cache from ``factory``. ``last`` keeps the latest cache for byte counts."""

    def __init__(self, model: torch.nn.Module, factory: Callable[[], Any]):
        super().__init__()
        self.model, self.factory, self.last = model, factory, None

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False, **kwargs: Any) -> Any:
        self.last = self.factory()
        return self.model(input_ids, past_key_values=self.last, use_cache=True, **kwargs)


def _cache_factory(method: Method) -> Callable[[], Any]:
    from transformers import DynamicCache

    return lambda: method.new_cache() or DynamicCache()


def prefill_measure(model: torch.nn.Module, tokenizer: Any, windows: torch.Tensor) -> Callable[[Method], Row]:
    """Perplexity of whole windows through the method's cache, and that cache's bytes."""
    from .evaluate import perplexity, window_bytes

    num_bytes = window_bytes(tokenizer, windows)

    def measure(method: Method) -> Row:
        wrapped = WithCache(model, _cache_factory(method))
        result = perplexity(wrapped, windows, 1, num_bytes)
        held = cache_bytes(wrapped.last)
        return {"ppl": result.ppl, "tokens": result.tokens, "kv_bytes": held["total"], "key_bytes": held["keys"],
                "value_bytes": held["values"], "seq_len": int(windows.shape[1])}

    return measure


@torch.no_grad()
def continuation_nll(model: torch.nn.Module, window: torch.Tensor, prompt_len: int, cache: Any) -> tuple[float, int]:
    """Summed NLL of ``window[prompt_len:]`` predicted token by token through ``cache``: the prompt is
    prefilled (and compressed to the budget), then every next token is fed alone, as in generation.

    window: ``(1, seq_len)``. Returns ``(nll, predicted tokens)``."""
    device = next(model.parameters()).device
    window = window.to(device)
    out = model(window[:, :prompt_len], past_key_values=cache, use_cache=True)
    logits = [out.logits[:, -1].float()]
    for t in range(prompt_len, window.shape[1] - 1):
        out = model(window[:, t : t + 1], past_key_values=cache, use_cache=True)
        logits.append(out.logits[:, -1].float())
    stacked = torch.cat(logits, dim=0)
    targets = window[0, prompt_len:]
    return float(torch.nn.functional.cross_entropy(stacked, targets, reduction="sum")), int(targets.numel())


def decode_measure(model: torch.nn.Module, windows: torch.Tensor, prompt_len: int) -> Callable[[Method], Row]:
    """Perplexity of each window's continuation decoded token by token; bytes of the last window's cache."""

    def measure(method: Method) -> Row:
        nll, count, held = 0.0, 0, 0
        make = _cache_factory(method)
        for w in windows:
            cache = make()
            n, c = continuation_nll(model, w[None], prompt_len, cache)
            nll, count, held = nll + n, count + c, cache_bytes(cache)["total"]
        return {"ppl": math.exp(nll / count), "tokens": count, "kv_bytes": held, "prompt_len": prompt_len,
                "seq_len": int(windows.shape[1])}

    return measure


def run_methods(model: torch.nn.Module, methods: Sequence[Method], measure: Callable[[Method], Row],
                on_row: Callable[[Row], None] | None = None) -> list[Row]:
    """Each method installed in turn and measured; the first is the reference (dense) that every row's
    ``ppl_rel_change`` and ``dense_kv_bytes`` refer to."""
    rows: list[Row] = []
    for method in methods:
        with method(model):
            row = {**method.describe(), **measure(method)}
        ref = rows[0] if rows else row
        row.update(ppl_rel_change=row["ppl"] / ref["ppl"] - 1.0, dense_kv_bytes=ref["kv_bytes"])
        rows.append(row)
        if on_row:
            on_row(row)
    return rows


def kv_rows(model: torch.nn.Module, tokenizer: Any, artifact: Any, windows: torch.Tensor,
            kv_dims: tuple[float | int, ...] = (0.5, 0.75, 1.0), ks: tuple[float | int | None, ...] = (None, 0.5),
            on_row: Callable[[Row], None] | None = None) -> list[Row]:
    """Perplexity and real cache bytes at each kept-key size ``m``, against a dense cache on the same
    windows. ``k`` None = dense attention over the kept dims (which is static AQUA at ``k = m``); a number =
    dynamic AQUA choosing ``k`` dims (of head_dim, capped at m) among the m kept."""
    methods: list[Method] = [Dense()]
    for k in ks:
        for m in kv_dims:
            methods.append(AquaKV(artifact, 1.0 if k is None else k, "dense" if k is None else "dynamic", kv_dims=m))
    rows = run_methods(model, methods, prefill_measure(model, tokenizer, windows), on_row)
    rows[0].update(kv_dims_count=artifact.head_dim)
    return rows


def h2o_rows(model: torch.nn.Module, artifact: Any, windows: torch.Tensor, prompt_len: int,
             budgets: tuple[float | int, ...] = (0.5, 0.25), ks: tuple[float | int | None, ...] = (None, 0.75),
             on_row: Callable[[Row], None] | None = None) -> list[Row]:
    """Perplexity of each window's continuation after ``prompt_len`` tokens, decoded token by token,
    for dense, AQUA alone (each k), H2O alone and AQUA + H2O (each k x budget): equal budgets, so
    H2O vs H2O + AQUA is a paired comparison. Bytes are the cache's at the end of the window."""
    methods: list[Method] = [Dense()]
    for k in ks:
        if k is not None:
            methods.append(Aqua(artifact, k, "dynamic"))
        methods += [H2O(b) if k is None else H2O(b, artifact=artifact, k=k) for b in budgets]
    return run_methods(model, methods, decode_measure(model, windows, prompt_len), on_row)
