"""What the loss depends on: how much each layer's AQUA budget costs the model's predictions.

The spectrum-based k-policies (``energy``, ``equal-energy``) move dimensions to where calibration
*energy* is spread out, and lose to uniform k at equal cost on SmolLM2 (docs/eval.md): energy is not
what the loss depends on. Here we measure the loss itself. On calibration windows, for every layer
``l`` and budget ``k`` of a grid, AQUA runs at layer ``l`` only (every other layer dense) and we record

    KL_l(k) = mean over predicted tokens of KL(p_dense || p_aqua)

(nats per token; next-token distributions of the whole model). The ``sensitivity`` k-policy
(:mod:`aqua_cli.policy`) then picks per-layer budgets that minimise ``sum_l KL_l(k_l)`` under the
total budget ``sum_l k_l = layers * k`` exactly (a knapsack, solved exactly by dynamic programming on
the piecewise-linear interpolation of the measured curves): first-order additivity of the layers'
damage is the one assumption, and ``aqua eval --k-policy uniform,sensitivity`` checks the result on
held-out text.

Cost: the dense forward pass of each window is run once with the input of every decoder layer kept;
perturbing layer ``l`` re-runs only layers ``l..L-1`` and the LM head from that input (exactly dense
up to ``l``; tested against full forward passes).

Per KV group (``groups=True``, ``aqua sensitivity --groups``): also ``KL_lg(k)`` with AQUA at group
``g`` of layer ``l`` only (the layer's other groups at ``k = D``, which is dense up to float rounding),
on the same windows and positions, for the ``sensitivity-group`` and ``sensitivity-joint`` policies.
It costs ``groups`` more resumed passes per (layer, k); with one KV group per layer the group curves
are the layer curves and nothing more is run.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from .budgets import k_dims
from .methods import patch
from .errors import ConfigError

DEFAULT_RATIOS = (0.25, 0.375, 0.5, 0.625, 0.75, 0.875)


def decoder_parts(model: torch.nn.Module) -> tuple[torch.nn.ModuleList, torch.nn.Module, torch.nn.Module] | None:
    """(decoder layers, final norm, LM head) when the model has the usual layout, else None."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    layers = getattr(decoder, "layers", None)
    norm = getattr(decoder, "norm", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(layers, torch.nn.ModuleList) and isinstance(norm, torch.nn.Module) and isinstance(head, torch.nn.Module):
        return layers, norm, head
    return None


class LayerInputs:
    """Forward pre-hooks that keep every decoder layer's positional and keyword inputs of one pass."""

    def __init__(self, layers: torch.nn.ModuleList):
        self.inputs: list[tuple[tuple, dict] | None] = [None] * len(layers)
        self.handles = [
            layer.register_forward_pre_hook(self._keep(i), with_kwargs=True) for i, layer in enumerate(layers)
        ]

    def _keep(self, i: int) -> Callable:
        def hook(module, args, kwargs):
            self.inputs[i] = (tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args), dict(kwargs))

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _softcap(model: torch.nn.Module, logits: torch.Tensor) -> torch.Tensor:
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def resume_logits(model: torch.nn.Module, parts: tuple, inputs: list, start: int,
                  positions: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of a pass that re-runs decoder layers ``start..L-1`` from layer ``start``'s kept input
    (at ``positions`` of the sequence only, when given: the LM head is the costly part of big vocabularies)."""
    layers, norm, head = parts
    args, kwargs = inputs[start]
    hidden = args[0] if args else kwargs["hidden_states"]
    for j in range(start, len(layers)):
        a, kw = inputs[j]
        kw = dict(kw)
        if a:
            out = layers[j](hidden, *a[1:], **kw)
        else:
            kw["hidden_states"] = hidden
            out = layers[j](**kw)
        hidden = out[0] if isinstance(out, tuple) else out
    if positions is not None:
        hidden = hidden[:, positions]
    return _softcap(model, head(norm(hidden)))


def _kl_sum(ref_logp: torch.Tensor, logits: torch.Tensor) -> float:
    """Sum over tokens of KL(p_ref || p) for ``[S, V]`` log-probs and logits."""
    logq = torch.log_softmax(logits.float(), dim=-1)
    return float((ref_logp.exp() * (ref_logp - logq)).sum())


@torch.no_grad()
def measure(
    model: torch.nn.Module,
    artifact: Any,
    windows: torch.Tensor,
    ratios: tuple[float, ...] = DEFAULT_RATIOS,
    mode: str = "dynamic",
    on_step: Callable[[int, int], None] | None = None,
    stride: int = 1,
    groups: bool = False,
) -> dict[str, Any]:
    """``KL_l(k)`` for every layer and every ``k`` of ``ratios`` on ``windows`` ``[n, seq_len]``; the KL is
    averaged over every ``stride``-th predicted position (1: all of them). With ``groups``, also
    ``KL_lg(k)`` for every KV group (``kl_groups``, ``[layers][groups][len(dims)]``)."""
    if mode not in ("static", "dynamic"):
        raise ConfigError(f"sensitivity is measured for static or dynamic AQUA, not '{mode}'")
    d = artifact.head_dim
    dims = sorted({k_dims(r, d) for r in ratios if k_dims(r, d) < d})
    if not dims:
        raise ConfigError("no budget below head_dim to measure: give ratios below 1.0")
    parts = decoder_parts(model)
    device = next(model.parameters()).device
    layers_n = artifact.num_layers
    groups_n = artifact.num_groups
    per_group = groups and groups_n > 1  # one group: its curve is the layer's
    kl = torch.zeros(layers_n, len(dims), dtype=torch.float64)
    kl_groups = torch.zeros(layers_n, groups_n, len(dims), dtype=torch.float64)
    tokens = 0
    started = time.perf_counter()
    steps, total = 0, windows.shape[0] * layers_n * len(dims) * (1 + (groups_n if per_group else 0))
    if stride < 1:
        raise ConfigError(f"--stride must be at least 1, got {stride}")
    positions = torch.arange(0, windows.shape[1] - 1, stride, device=device)

    def kl_of_pass(layer: int) -> float:
        if keeper is not None:
            logits = resume_logits(model, parts, keeper.inputs, layer, positions)[0]
        else:
            logits = model(ids, use_cache=False).logits[0, positions]
        return _kl_sum(ref_logp, logits)

    with patch(model, artifact, k=1.0, mode="dense") as handle:
        for window in windows:
            ids = window[None].to(device)
            keeper = LayerInputs(parts[0]) if parts else None
            try:
                ref = model(ids, use_cache=False).logits[0, positions].float()
            finally:
                if keeper is not None:
                    keeper.remove()
            ref_logp = torch.log_softmax(ref, dim=-1)
            del ref
            tokens += ref_logp.shape[0]
            for layer in range(layers_n):
                hook = handle.hooks[layer]
                hook.mode = mode
                for j, k in enumerate(dims):
                    hook.k = k
                    kl[layer, j] += kl_of_pass(layer)
                    steps += 1
                    if on_step is not None:
                        on_step(steps, total)
                    for g in range(groups_n if per_group else 0):
                        budget = torch.full((groups_n,), d, dtype=torch.long)
                        budget[g] = k
                        hook.k = budget
                        kl_groups[layer, g, j] += kl_of_pass(layer)
                        steps += 1
                        if on_step is not None:
                            on_step(steps, total)
                hook.mode, hook.k = "dense", d
    if groups and not per_group:
        kl_groups = kl[:, None, :].clone()
    extra = {"kl_groups": (kl_groups / max(tokens, 1)).tolist(),
             "metric_groups": "mean KL(p_dense || p_aqua) per predicted token, nats, AQUA at one KV group of one layer"} if groups else {}
    return {
        "mode": mode,
        "dims": dims,
        "ratios": [k / d for k in dims],
        "kl": (kl / max(tokens, 1)).tolist(),
        **extra,
        "predicted_tokens": tokens,
        "windows": int(windows.shape[0]),
        "seq_len": int(windows.shape[1]),
        "stride": stride,
        "metric": "mean KL(p_dense || p_aqua) per predicted token, nats, AQUA at one layer",
        "seconds": round(time.perf_counter() - started, 1),
    }
