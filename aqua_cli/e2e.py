"""Whole-model decode speed: tokens/s, KV-cache bytes and peak memory of a real decoder for dense and AQUA.

A kernel's speed-up means little until a model's own decode step shows it: weights, norms, MLPs and the
LM head are paid by every path, and only attention's share can shrink. This harness builds a decoder
from a preset or a Hub config with random weights (timing does not depend on them), gives every path the
same kind of cache (preallocated, written in place, read as views: no concatenation), fills it with
``seq`` random tokens (the values do not change the work, and no prefill is timed), and times ``steps``
single-token decode steps through ``model(...)``:

* ``dense``: :class:`StaticKVCache` and transformers' SDPA through :class:`aqua_cli.methods.Dense` (the same
  attention and mask functions as AQUA), pinned to the flash and memory-efficient backends on CUDA (cuDNN
  re-plans for every new key length);
* ``aqua-dims`` / ``aqua-topt``: :class:`aqua_cli.methods.AquaDecode` and its projected KV cache, whose
  decode steps run the fused kernels on CUDA (dims only, or dims + top-T pages).

On CUDA both paths are timed as CUDA-graph replays of one decode step (``graphs=True``, the default): an
eager transformers step is bound by Python and launches (a 32-layer 8B step at batch 1 takes ~40 ms of CPU
for ~9 ms of GPU work, measured replayed), which hides what attention costs. The kernels take the cache
length as a launch argument, so a graph is captured *per length*: the step that writes token ``seq`` and
attends over ``seq + 1`` tokens, replayed ``steps`` times (the cache is cropped back to ``seq`` before
capture, so every replay does the same work). Dense gets the same: its static cache, the same capture, the same replays.
``graphs=False`` times eager steps (the cache growing by one token a step), as a plain ``generate()`` runs.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from transformers.cache_utils import Cache

from .errors import ConfigError
from .methods.fused import InPlaceLayer

E2E_PAGE_SCORES = ("max", "bound", "planes")  # "planes": "max" on the high plane of float16 key planes


def check_e2e_page_score(score: str) -> str:
    """One value of ``aqua bench --phase e2e --page-score`` (the rows it adds: aqua-topt, -bound, -planes)."""
    if score not in E2E_PAGE_SCORES:
        raise ConfigError(f"--page-score takes a comma list of max, bound and planes, got {score!r}")
    return score


E2E_PRESETS: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, rope_theta=500000.0,
                         max_position_embeddings=131072, rms_norm_eps=1e-5),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, rope_theta=500000.0,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=49152, rope_theta=100000.0,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True),
}


class StaticKVLayer(InPlaceLayer):
    """The dense baseline's cache layer: preallocated ``(B, Hkv, capacity, D)`` keys and values written in
    place; ``update`` returns views of the first ``length`` tokens (what :class:`ProjectedKVLayer` does for
    AQUA), so SDPA reads exactly the tokens seen and no step concatenates."""

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self.capacity = capacity

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.is_initialized = key_states.device, True
        shape = (*key_states.shape[:2], self.capacity, key_states.shape[-1])
        self.keys, self.values = key_states.new_zeros(shape), value_states.new_zeros(shape)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, new = self.length, key_states.shape[-2]
        if start + new > self.capacity:
            raise ConfigError(f"this static cache holds {self.capacity} tokens; {start + new} were written")
        self.keys[:, :, start : start + new] = key_states
        self.values[:, :, start : start + new] = value_states
        self.length = start + new
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]


class StaticKVCache(Cache):
    def __init__(self, num_layers: int, capacity: int):
        super().__init__(layers=[StaticKVLayer(capacity) for _ in range(num_layers)])


def e2e_config(model: str | None, layers: int | None = None) -> Any:
    """A decoder config from a preset (``llama-3.1-8b``...) or a Hub id / local model (config only)."""
    from transformers import LlamaConfig

    name = (model or "llama-3.1-8b").strip()
    if name.lower() in E2E_PRESETS:
        config = LlamaConfig(**E2E_PRESETS[name.lower()])
        config._name_or_path = name.lower()
    else:
        from .models import load_config, resolve_model

        config = load_config(resolve_model(name)).get_text_config(decoder=True)
    if layers is not None:
        if layers < 1:
            raise ConfigError(f"--layers must be at least 1, got {layers}")
        config.num_hidden_layers = layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:layers]
    return config


def random_artifact(config: Any, seed: int = 0) -> Any:
    """An artifact of random orthogonal projections for ``config`` (timing needs no calibration)."""
    from .artifact import Artifact, build_metadata
    from .bench import random_projection
    from .models import attention_shape

    shape = attention_shape(config)
    gen = torch.Generator().manual_seed(seed)
    projections = [random_projection(shape["num_kv_heads"], shape["head_dim"], gen) for _ in range(shape["num_layers"])]
    singular = [torch.linspace(1.0, 0.1, shape["head_dim"]).expand(shape["num_kv_heads"], -1).contiguous() for _ in projections]
    meta = build_metadata(model_id=getattr(config, "_name_or_path", "") or "random", config=config, revision=None,
                          data_id="random-orthogonal", tokens=0, seq_len=0, seed=seed, dtype=str(config.dtype or ""))
    return Artifact(projections, singular, meta)


@dataclass
class E2EConfig:
    """One ``aqua bench --phase e2e`` run."""

    seqs: list[int]
    batches: list[int] = field(default_factory=lambda: [1])
    ks: list[float] = field(default_factory=lambda: [0.5])
    token_ratios: list[float] = field(default_factory=lambda: [1 / 16])
    kv_dims: float = 1.0
    page: int = 64
    page_scores: list[str] = field(default_factory=lambda: ["max"])  # top-T rows: "max" (aqua-topt), "bound"
    # (aqua-topt-bound), "planes" (aqua-topt-planes: "max" on the high plane of float16 key planes)
    bound_page: int | None = None  # "bound": tokens a bound covers (None: the page)
    rerank: int = 0  # "bound": candidates per kept page re-ranked by max (0: off)
    model: str | None = None
    layers: int | None = None
    device: str = "cuda"
    dtype: str = "bfloat16"
    steps: int = 16
    warmup: int = 16  # Triton specialises integer arguments: the first steps at a new length may compile
    hybrid: bool = True
    graphs: bool = True  # CUDA only: time CUDA-graph replays of one step (see the module docstring)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.warmup < 0:
            raise ConfigError("--repeats (decode steps) must be at least 1")
        from .kernels.paged import check_bound_page

        for score in self.page_scores:
            check_e2e_page_score(score)
        if self.bound_page is not None:
            check_bound_page(self.page, self.bound_page)
        for k in self.ks:
            if not 0.0 < k <= 1.0:
                raise ConfigError(f"k ratio {k} is outside (0, 1]")
        if any(b < 1 for b in self.batches):
            raise ConfigError("--batch values must be at least 1")
        if self.layers is not None and self.layers < 1:
            raise ConfigError(f"--layers must be at least 1, got {self.layers}")


def build_model(config: Any, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Random weights, initialised on the device (an 8B model initialises in seconds on a GPU)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def _fill(cache: Any, num_layers: int, batch: int, kv_heads: int, head_dim: int, seq: int, dtype: torch.dtype,
          device: torch.device, gen: torch.Generator) -> None:
    """Write ``seq`` random tokens into every layer, as a prefill would (keys projected once, for AQUA), and
    drop what the prefill's attention would have consumed layer by layer (AQUA's fresh keys and values)."""
    for index in range(num_layers):
        k = torch.randn(batch, kv_heads, seq, head_dim, device=device, dtype=dtype, generator=gen)
        cache.update(k, torch.randn_like(k), index)
        layer = cache.layers[index]
        if getattr(layer, "state", None) is not None:
            layer.state.pending = None
        if hasattr(layer, "fresh"):
            layer.fresh = None
        del k


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_decode(model: torch.nn.Module, cache: Any, batch: int, seq: int, steps: int, warmup: int,
                device: torch.device, context: Callable[[], Any], graphs: bool = False) -> float:
    """Seconds per decode step: the mean over ``steps`` steps after ``warmup`` (eager: consecutive steps,
    the cache growing; ``graphs``: replays of one captured step at ``seq`` tokens)."""
    tok = torch.randint(3, 1000, (batch, 1), device=device)
    if graphs:
        return _time_graph(model, cache, tok, seq, steps, max(warmup, 2), device, context)
    pos = seq
    with context():
        for _ in range(warmup):
            model(input_ids=tok, position_ids=torch.full((batch, 1), pos, device=device), past_key_values=cache, use_cache=True)
            pos += 1
        _sync(device)
        started = time.perf_counter()
        for _ in range(steps):
            model(input_ids=tok, position_ids=torch.full((batch, 1), pos, device=device), past_key_values=cache, use_cache=True)
            pos += 1
        _sync(device)
    return (time.perf_counter() - started) / steps


def capture_step(model: torch.nn.Module, cache: Any, tok: torch.Tensor, seq: int, warmup: int,
                 context: Callable[[], Any]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """A CUDA graph of the decode step at ``seq`` tokens and the logits tensor each replay writes.

    Eager warm-up steps at the same length run first on a side stream, so that Triton compiles and the
    allocator settles outside the capture; the cache is cropped back to ``seq`` before every step, so
    every replay writes token ``seq`` and attends over ``seq + 1`` tokens."""
    device = tok.device
    pos = torch.full_like(tok, seq)

    def step() -> torch.Tensor:
        cache.crop(seq)
        return model(input_ids=tok, position_ids=pos, past_key_values=cache, use_cache=True).logits

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with context(), torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with context(), torch.cuda.graph(graph):
        logits = step()
    return graph, logits


def _time_graph(model: torch.nn.Module, cache: Any, tok: torch.Tensor, seq: int, steps: int, warmup: int,
                device: torch.device, context: Callable[[], Any]) -> float:
    graph, _ = capture_step(model, cache, tok, seq, warmup, context)
    graph.replay()
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        graph.replay()
    _sync(device)
    seconds = (time.perf_counter() - started) / steps
    del graph
    return seconds


def _sdpa_context(device: torch.device) -> Callable[[], Any]:
    import contextlib

    if device.type != "cuda":
        return contextlib.nullcontext
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])


def fits(config: Any, batch: int, seq: int, elem: int, device: torch.device) -> bool:
    """Whether weights + a dense KV cache of ``batch x seq`` fit in 90% of the GPU (always True on CPU)."""
    if device.type != "cuda":
        return True
    from .models import attention_shape

    shape = attention_shape(config)
    weights = sum(p.numel() for p in build_params(config)) * elem
    kv = 2 * shape["num_layers"] * batch * seq * shape["num_kv_heads"] * shape["head_dim"] * elem
    return weights + kv * 1.1 < 0.9 * torch.cuda.get_device_properties(device).total_memory


def build_params(config: Any) -> list[torch.Tensor]:
    """Parameter shapes of the model ``config`` describes, without building it (meta device)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [p for p in model.parameters()]


def run_e2e(config: E2EConfig, on_row: Callable[[dict[str, Any]], None] | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows ``batch, seq, impl, k, tokens, tokens_per_s, speedup_vs_dense, kv_cache_bytes,
    peak_memory_bytes`` (and the shape and GPU in the second value)."""
    from .cost import cache_bytes
    from .methods import AquaDecode, Dense
    from .models import attention_shape, parse_device, parse_dtype

    device = parse_device(config.device)
    dtype = parse_dtype(config.dtype) or torch.bfloat16
    model_config = e2e_config(config.model, config.layers)
    shape = attention_shape(model_config)
    model = build_model(model_config, device, dtype)
    art = random_artifact(model_config, config.seed)
    elem = torch.empty((), dtype=dtype).element_size()
    gen = torch.Generator(device=device).manual_seed(config.seed)
    impls: list[tuple[str, float | None, float | None]] = [("dense", None, None)]
    impls += [("aqua-dims", k, None) for k in config.ks]
    impls += [("aqua-topt" if score == "max" else f"aqua-topt-{score}", k, r)
              for score in config.page_scores for k in config.ks for r in config.token_ratios]
    rows: list[dict[str, Any]] = []
    for batch in config.batches:
        for seq in config.seqs:
            if not fits(model_config, batch, seq, elem, device):
                continue
            capacity = config.page * -(-(seq + config.warmup + config.steps) // config.page)  # whole pages, both paths
            dense_rate = None
            for impl, k, ratio in impls:
                if impl == "dense":
                    method = Dense()(model)
                else:
                    bound = impl.endswith("-bound")
                    method = AquaDecode(art, k=k, token_ratio=ratio, kv_dims=config.kv_dims, page=config.page,
                                        max_tokens=capacity, hybrid=config.hybrid, page_score="bound" if bound else "max",
                                        bound_page=config.bound_page if bound else None,
                                        rerank=config.rerank if bound else 0, key_planes=impl.endswith("-planes"))(model)
                try:
                    gc.collect()  # the previous path's cache (a layer and its state refer to each other)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats(device)
                    cache = StaticKVCache(shape["num_layers"], capacity) if impl == "dense" else method.new_cache()
                    _fill(cache, shape["num_layers"], batch, shape["num_kv_heads"], shape["head_dim"], seq, dtype, device, gen)
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)  # peak of the decode steps, not of the fill
                    step = time_decode(model, cache, batch, seq, config.steps, config.warmup, device, _sdpa_context(device),
                                       graphs=config.graphs and device.type == "cuda")
                    calls = {"kernel": 0, "reference": 0}
                    for hook in method.hooks if impl != "dense" else []:
                        calls = {n: calls[n] + hook.calls[n] for n in calls}
                    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
                    held = cache_bytes(cache)["total"]
                except torch.cuda.OutOfMemoryError:
                    rows.append({"batch": batch, "seq": seq, "impl": impl, "k": k, "token_ratio": ratio, "error": "out of memory"})
                    continue
                finally:
                    method.remove()
                    cache = None
                rate = batch / step
                dense_rate = dense_rate or rate
                row = {"batch": batch, "seq": seq, "impl": impl, "k": k,
                       "tokens": None if ratio is None else max(1, round(ratio * seq)), "token_ratio": ratio,
                       "tokens_per_s": rate, "step_ms": step * 1e3, "speedup_vs_dense": rate / dense_rate,
                       "kv_cache_bytes": held, "peak_memory_bytes": peak,
                       "kernel_share": None if impl == "dense" else calls["kernel"] / max(1, sum(calls.values()))}
                rows.append(row)
                if on_row:
                    on_row(row)
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "model": getattr(model_config, "_name_or_path", None) or config.model, "shape": shape,
            "dtype": str(dtype), "sdpa_backend": "flash or efficient (pinned)" if device.type == "cuda" else "default",
            "cuda_graphs": config.graphs and device.type == "cuda", "steps": config.steps, "warmup": config.warmup, "hybrid": config.hybrid,
            "page": config.page, "kv_dims": config.kv_dims, "bound_page": config.bound_page or config.page,
            "rerank": config.rerank}
    return rows, info


def plot_rows(rows: list[dict[str, Any]], path: Any, title: str) -> Any:
    """tokens/s ratio to dense against sequence length, one line per (impl, batch)."""
    from .plotting import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=120)
    for (impl, k, ratio, batch) in dict.fromkeys((r["impl"], r["k"], r["token_ratio"], r["batch"]) for r in rows if r["impl"] != "dense"):
        pts = sorted((r["seq"], r["speedup_vs_dense"]) for r in rows
                     if (r["impl"], r["k"], r["token_ratio"], r["batch"]) == (impl, k, ratio, batch) and "error" not in r)
        label = f"{impl} k={k:g}" + (f" T=L/{round(1 / ratio)}" if ratio else "") + f", batch {batch}"
        ax.plot(*zip(*pts), marker="o", label=label)
    ax.axhline(1.0, color="black", lw=1, ls="--")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="tokens in the cache", ylabel="decode tokens/s vs dense", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
