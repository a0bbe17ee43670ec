"""The paper's offline step: a basis per layer and KV group from the model's own queries and keys.

The paper (arXiv 2509.11155, abstract) has "an efficient offline step where we compute a universal,
language agnostic projection matrix via SVD on a calibration dataset, and an online inference step where
we project query and key vectors and dynamically select a sparse subset of dimensions based on the
query's magnitude". In the SVD basis the coordinates are ordered by how much q/k energy they carry, and
a query's large-magnitude coordinates say which dimensions dominate its dot products. The choices the
paper's wording leaves open, and why we made them:

* **post-RoPE**: attention scores are dot products of rotated vectors; the basis must describe the
  vectors that are actually multiplied, and the attention interface receives them after RoPE.
* **joint query + key basis**: one projection ``P`` is applied to both sides, so ``(qP)·(kP) = q·k``
  holds exactly for orthogonal ``P``; a basis fitted to queries alone would ignore where keys live.
  Under GQA a group's query heads and its key head share that ``P`` (MHA: one per head).
* **uncentered**: the dot product is not translation invariant, so the mean is signal, not noise;
  the right singular vectors of the raw data matrix ``X`` are the eigenvectors of ``X^T X``.

``X^T X`` is accumulated while streaming (``D x D`` per group, never the vectors): each batch's Gram in
float32 (the activations' own precision, read in place, no stacked copy), the running sum in float64,
and eigen-decomposed once at the end: ``P`` = eigenvectors by decreasing eigenvalue, singular values
``sqrt(eigenvalues)``. Each eigenvector's sign is fixed (largest entry positive) so runs compare.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .artifact import Artifact, build_metadata
from .attention import HookedModel, attention_modules
from .data import DataSpec, load_window_set, window_hash
from .distributed import DistContext, agree, all_reduce_sum, shard
from .errors import AquaError
from .methods.base import AttentionHook
from .models import ModelSource, attention_shape


@dataclass
class CalibrationConfig:
    """How much text, cut how, in what order."""

    data: DataSpec = field(default_factory=lambda: DataSpec(part="calibration"))
    tokens: int = 100_000
    seq_len: int = 512
    batch_size: int = 4
    seed: int = 0


class GramAccumulator:
    """Streaming ``X^T X`` per layer and KV group, float64. ``grams[layer]`` is ``[groups, D, D]``,
    kept on the device of that layer's activations (layers may sit on different GPUs)."""

    def __init__(self, num_layers: int, groups: int, head_dim: int):
        self.shape = (groups, head_dim, head_dim)
        self.grams: list[torch.Tensor | None] = [None] * num_layers
        self.vectors = torch.zeros(num_layers, dtype=torch.long)
        self.nonfinite: list[torch.Tensor | None] = [None] * num_layers

    def add(self, layer: int, query: torch.Tensor, key: torch.Tensor) -> None:
        """query ``(B, Hq, S, D)``, key ``(B, Hkv, S, D)``: each group's q heads and its k head, stacked.

        ``G_g += sum over the group's q and k vectors of x x^T``: the batch's Gram is formed in float32 by
        batched matrix products on views of the activations (a group's query heads are adjacent, so
        ``query[b]`` views as ``[groups, rep * S, D]``), then added to the float64 running sum.
        """
        batch, q_heads, seq, d = query.shape
        groups = key.shape[1]
        q = query.float()
        k = key.float()
        gram = torch.empty(self.shape, dtype=torch.float32, device=q.device)
        for b in range(batch):
            qb = q[b].reshape(groups, -1, d)
            kb = k[b].reshape(groups, -1, d)
            if b == 0:
                torch.bmm(qb.transpose(1, 2), qb, out=gram)
            else:
                gram.baddbmm_(qb.transpose(1, 2), qb)
            gram.baddbmm_(kb.transpose(1, 2), kb)
        if self.grams[layer] is None:
            self.grams[layer] = torch.zeros(self.shape, dtype=torch.float64, device=q.device)
            self.nonfinite[layer] = torch.zeros((), dtype=torch.long, device=q.device)
        # an inf/NaN activation makes its Gram diagonal inf/NaN: counted on the device from the D x D
        # result (no pass over the activations), checked once per batch by check_finite()
        self.nonfinite[layer] += (~torch.isfinite(gram.diagonal(dim1=-2, dim2=-1))).sum()
        self.grams[layer] += gram
        self.vectors[layer] += batch * seq * (q_heads + groups) // groups

    def check_finite(self) -> None:
        """Raise if any captured query/key was inf or NaN (float16 overflow), naming the first layer."""
        for layer, count in enumerate(self.nonfinite):
            if count is not None and int(count) > 0:
                raise AquaError(
                    f"non-finite query/key activations in layer {layer} (overflow, e.g. float16): "
                    "calibrate with --dtype float32 or bfloat16"
                )

    def stacked(self) -> torch.Tensor:
        """``[layers, groups, D, D]`` on the CPU; a layer never seen is an error."""
        missing = [i for i, g in enumerate(self.grams) if g is None]
        if missing:
            raise AquaError(f"no queries/keys were captured for layers {missing[:5]}: does the model use the attention interface?")
        return torch.stack([g.cpu() for g in self.grams])  # type: ignore[union-attr]

    def hook(self, layer: int, stop: bool = False) -> AttentionHook:
        """The capture hook of ``layer``: records its post-RoPE q and k and leaves attention unchanged; with
        ``stop`` it ends the forward pass once it has captured (the last attention layer: nothing after it
        is needed)."""
        return CaptureHook(self, layer, stop)


class CaptureHook(AttentionHook):
    def __init__(self, acc: GramAccumulator, layer: int, stop: bool = False):
        self.acc, self.layer, self.stop = acc, layer, stop

    def rewrite(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.acc.add(self.layer, query.detach(), key.detach())
        if self.stop:
            raise StopForward
        return query, key


class StopForward(Exception):
    """Raised by the last layer's capture hook: the rest of the forward pass (that layer's attention
    output and MLP, the final norm) computes nothing calibration uses."""


def eigenbasis(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[G, D, D]`` Gram -> (P ``[G, D, D]`` float32, columns by decreasing eigenvalue; singular values ``[G, D]``)."""
    values, vectors = torch.linalg.eigh(gram.double().cpu())
    values, vectors = values.flip(-1), vectors.flip(-1)
    idx = vectors.abs().argmax(dim=-2, keepdim=True)
    signs = torch.sign(vectors.gather(-2, idx))
    signs[signs == 0] = 1
    vectors = vectors * signs
    return vectors.float().contiguous(), values.clamp_min(0).sqrt().float().contiguous()


def _input_device(model: torch.nn.Module) -> torch.device:
    """Where input ids go: the embedding's device (models split by ``device_map`` start there)."""
    get_emb = getattr(model, "get_input_embeddings", None)
    emb = get_emb() if callable(get_emb) else None
    if isinstance(emb, torch.nn.Module):
        return next(emb.parameters()).device
    return next(model.parameters()).device


def _forward_fn(model: torch.nn.Module) -> Callable[[torch.Tensor], Any]:
    """The decoder without its LM head: calibration needs attention inputs, not logits."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    target = decoder if isinstance(decoder, torch.nn.Module) else model
    return lambda ids: target(input_ids=ids, use_cache=False)


def accumulate(
    model: torch.nn.Module,
    windows: torch.Tensor,
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
) -> GramAccumulator:
    """Run ``windows`` ``[n, seq_len]`` through ``model`` and collect the Gram matrices."""
    if batch_size < 1:
        raise AquaError(f"--batch-size must be at least 1, got {batch_size}")
    shape = attention_shape(model.config)
    device = _input_device(model)
    modules = attention_modules(model)
    acc = GramAccumulator(len(modules), shape["num_kv_heads"], shape["head_dim"])
    forward = _forward_fn(model)
    hooks = [acc.hook(i, stop=i == len(modules) - 1) for i in range(len(modules))]
    with HookedModel(model, hooks), torch.inference_mode():
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start : start + batch_size].to(device)
            try:
                forward(batch)
            except StopForward:
                pass
            acc.check_finite()
            if on_batch is not None:
                on_batch(batch.numel())
    return acc


def calibrate(
    model: torch.nn.Module,
    tokenizer: Any,
    source: ModelSource,
    config: CalibrationConfig | None = None,
    on_batch: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    command: list[str] | None = None,
    dist: DistContext | None = None,
) -> Artifact:
    """Calibrate ``model`` on ``config.data`` and return an (unsaved) artifact.

    ``on_start(total_tokens)`` and ``on_batch(tokens)`` report progress (the CLI draws a bar with them).
    With ``dist`` (see :mod:`aqua_cli.distributed`) each rank calibrates its shard of the windows and the
    Grams are summed over ranks; every rank returns the same artifact.
    """
    config = config or CalibrationConfig()
    window_set = agree(dist, lambda: load_window_set(config.data, tokenizer, config.seq_len, config.tokens, config.seed), "loading the data")
    windows = window_set.windows
    if on_start is not None:
        on_start(int(windows.numel()))
    return calibrate_windows(
        model,
        windows,
        model_id=source.model_id,
        revision=source.revision or _commit_hash(model),
        data_id=config.data.describe(),
        batch_size=config.batch_size,
        seed=config.seed,
        on_batch=on_batch,
        command=command if command is not None else ["aqua", *sys.argv[1:]],
        dist=dist,
        windows_record=window_set.record(),
    )


def calibrate_windows(
    model: torch.nn.Module,
    windows: torch.Tensor,
    *,
    model_id: str,
    revision: str | None = None,
    data_id: str = "custom",
    batch_size: int = 4,
    seed: int = 0,
    on_batch: Callable[[int], None] | None = None,
    command: list[str] | None = None,
    dist: DistContext | None = None,
    windows_record: dict[str, Any] | None = None,
) -> Artifact:
    """Calibrate on ready token windows ``[n, seq_len]`` (any tokenizer, any source).

    With ``dist``, ``windows`` are all the windows; this rank takes its shard. ``windows_record``
    (:meth:`aqua_cli.data.WindowSet.record`) is stored as ``extra["calibration_windows"]``; without it
    the window hashes alone are stored, so that ``aqua eval`` can still count shared windows.
    """
    started = time.perf_counter()
    acc = agree(dist, lambda: accumulate(model, shard(windows, dist), batch_size, on_batch), "calibration")
    grams = acc.stacked().to(_reduce_device(dist))
    reduce_s = all_reduce_sum([grams], dist)
    seconds = time.perf_counter() - started
    extra = {
        "seconds": round(seconds, 3),
        "tokens_per_s": round(windows.numel() / max(seconds, 1e-9), 1),
        "batch_size": batch_size,
        "world_size": dist.world_size if dist else 1,
        "all_reduce_s": round(reduce_s, 4),
        "calibration_windows": windows_record or {
            "data_id": data_id, "seed": seed, "seq_len": int(windows.shape[1]),
            "window_sha256": [window_hash(w) for w in windows],
        },
    }
    return artifact_from_grams(
        grams.cpu(),
        model,
        model_id=model_id,
        revision=revision,
        data_id=data_id,
        tokens=int(windows.numel()),
        seq_len=int(windows.shape[1]),
        seed=seed,
        command=command or [],
        extra=extra,
    )


def _reduce_device(dist: DistContext | None) -> torch.device:
    return dist.device() if dist is not None else torch.device("cpu")


def artifact_from_grams(grams: torch.Tensor, model: torch.nn.Module, **metadata: Any) -> Artifact:
    """Eigen-decompose accumulated ``[layers, groups, D, D]`` Grams into an artifact for ``model``."""
    projections, singular = zip(*(eigenbasis(g) for g in grams))
    meta = build_metadata(
        config=model.config,
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        **metadata,
    )
    return Artifact(list(projections), list(singular), meta)


def _commit_hash(model: torch.nn.Module) -> str | None:
    return getattr(model.config, "_commit_hash", None)
