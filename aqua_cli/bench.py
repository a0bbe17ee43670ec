"""`aqua bench` as a Python API: the analytical cost model and the timing harness.

Decode attention reads the whole KV cache per step, so on a GPU it is bound by bytes, not FLOPs: the
paper's saving (a FLOP count) pays only when a kernel reads fewer bytes. This module puts both side by
side for every sequence length: FLOPs and bytes of dense vs AQUA (projection and top-k selection
included), and measured latencies of dense SDPA, the PyTorch reference and the fused kernels.

No weights are needed: random tensors of the model's attention shape and a random orthogonal projection
(or a real artifact's) time the same as real ones.
"""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .budgets import k_dims
from .cost import cost_model, pages_bytes, paper_break_even
from .errors import ConfigError
from .models import AttnShape

MAX_SEQ = 1 << 20  # 1M tokens: beyond any model we bench, and beyond one GPU's memory at batch 8
PHASES = ("decode", "prefill")


# -- sequence lengths ----------------------------------------------------------------------------------
def _seq_int(text: str, spec: str) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*([kK]?)\s*", text)
    if not match:
        raise ConfigError(f"invalid --seq '{spec}': '{text}' is not a number (use e.g. 64..4096, 64..4096:x4, 1024,4096, 32k)")
    value = int(match.group(1)) * (1024 if match.group(2) else 1)
    if value < 1:
        raise ConfigError(f"invalid --seq '{spec}': sequence lengths must be at least 1")
    if value > MAX_SEQ:
        raise ConfigError(f"invalid --seq '{spec}': {value} tokens is more than the limit of {MAX_SEQ}")
    return value


def parse_seq(spec: str, default_start: int = 64) -> list[int]:
    """Sequence lengths from ``64..4096`` (doubling), ``64..4096:x4`` (times 4), ``1024,4096`` or
    ``..131072`` (from ``default_start``); ``k`` suffix = 1024."""
    spec = spec.strip()
    if not spec:
        raise ConfigError("invalid --seq '': give e.g. 64..4096 or 1024,4096")
    if ".." not in spec:
        values = [_seq_int(part, spec) for part in spec.split(",")]
        return sorted(set(values))
    body, _, step_text = spec.partition(":")
    factor = 2
    if step_text:
        match = re.fullmatch(r"\s*[xX]?(\d+)\s*", step_text)
        if not match or int(match.group(1)) < 2:
            raise ConfigError(f"invalid --seq '{spec}': the step must be a factor such as :x2 or :x4")
        factor = int(match.group(1))
    start_text, _, end_text = body.partition("..")
    start = _seq_int(start_text, spec) if start_text.strip() else default_start
    end = _seq_int(end_text, spec)
    if start > end:
        raise ConfigError(f"invalid --seq '{spec}': the range is reversed ({start} > {end})")
    values = []
    value = start
    while value <= end:
        values.append(value)
        value *= factor
    return values


# -- timing --------------------------------------------------------------------------------------------
def time_us(fn: Callable[[], Any], device: torch.device, warmup: int = 3, repeats: int = 20, graph: bool = True) -> float:
    """Median latency of ``fn`` in microseconds: CUDA events around CUDA-graph replays on a GPU (launch gaps
    out, as a serving loop would run), ``perf_counter`` on the CPU. Warm-up (compilation) is not timed."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            fn()
            times.append((time.perf_counter() - began) * 1e6)
        return statistics.median(times)
    torch.cuda.synchronize(device)
    run = fn
    if graph:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph):
            fn()
        run = cuda_graph.replay
        run()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


# -- the benchmark -------------------------------------------------------------------------------------
@dataclass
class BenchConfig:
    """One ``aqua bench`` run. ``k`` is a ratio of head_dim; ``token_ratios`` are the T/L of dims + top-T
    rows; ``reference_max_seq`` bounds the slow PyTorch reference; ``rotate_bytes`` is how much distinct
    input a timed call cycles through, so that small shapes are not timed out of the L2 cache."""

    seqs: list[int]
    batch: int = 1
    ks: list[float] = field(default_factory=lambda: [0.5])
    phase: str = "decode"
    device: str = "cpu"
    dtype: str = "bfloat16"
    token_ratios: list[float] = field(default_factory=list)
    gqa: str = "group"
    select_block: int = 512
    kernels: bool = True
    hybrid: bool = True
    reference_max_seq: int = 32768
    warmup: int = 3
    repeats: int = 20
    rotate_bytes: int = 256 << 20
    seed: int = 0
    bound_page: int | None = None  # tokens a bound covers in the aqua-bounds rows (None: the page of 64)
    rerank: int = 4  # aqua-rerank rows: candidates by bound per kept page, re-ranked by max (0: no such rows)

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ConfigError(f"unknown phase '{self.phase}': use decode or prefill")
        if self.batch < 1:
            raise ConfigError(f"--batch must be at least 1, got {self.batch}")
        for k in self.ks:
            if not (0.0 < k <= 1.0):
                raise ConfigError(f"k ratio {k} is outside (0, 1]: give e.g. 0.5 or 0.75")
        for ratio in self.token_ratios:
            if not (0.0 < ratio <= 1.0):
                raise ConfigError(f"token ratio T/L = {ratio} is outside (0, 1]: give e.g. 0.0625 (1/16)")
        if self.repeats < 1 or self.warmup < 0:
            raise ConfigError("--repeats must be at least 1 and --warmup at least 0")


def random_projection(groups: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """A random orthogonal ``(groups, D, D)`` float32 matrix (QR of a Gaussian): timing needs no calibration."""
    q, r = torch.linalg.qr(torch.randn(groups, dim, dim, generator=generator))
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]


@dataclass
class _Inputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kd: torch.Tensor
    bounds: torch.Tensor | None = None  # page bounds of kd at pages of 64 (``paged.page_bounds``), for "bound" rows
    planes: torch.Tensor | None = None  # kd as float16 byte planes (``reference.key_planes``), for "planes" rows


def _decode_inputs(shape: AttnShape, batch: int, seq: int, proj: torch.Tensor, dtype: torch.dtype,
                   device: torch.device, sets: int, bound_page: int = 64, pages: bool = True) -> list[_Inputs]:
    """``sets`` random inputs; ``pages``: also the page bounds and key planes that only the page rows read (each
    as large as the projected keys: built only where such rows run)."""
    from .kernels.paged import page_bounds
    from .kernels.reference import key_planes, project_keys

    out = []
    for _ in range(sets):
        q = torch.randn(batch, shape.num_heads, shape.head_dim, device=device, dtype=dtype)
        k = torch.randn(batch, shape.num_kv_heads, seq, shape.head_dim, device=device, dtype=dtype)
        v = torch.randn_like(k)
        kd = project_keys(k, proj)
        if pages:
            out.append(_Inputs(q, k, v, kd, page_bounds(kd, bound_page), key_planes(kd)))  # bf16 kd: exact in float16
        else:
            out.append(_Inputs(q, k, v, kd))
    return out


def _rotating(fn: Callable[[_Inputs], Any], sets: Sequence[_Inputs]) -> Callable[[], None]:
    def run() -> None:
        for inputs in sets:
            fn(inputs)
    return run


def decode_impls(config: BenchConfig, shape: AttnShape, dims: int, proj: torch.Tensor, device: torch.device,
                 seq: int) -> dict[str, tuple[Callable[[_Inputs], torch.Tensor], dict[str, Any]]]:
    """Name -> (step function, row fields) for one k: dense, reference, fused kernels, hybrid."""
    from .kernels.hybrid import HybridDecode
    from .kernels.reference import aqua_decode_reference, dense_decode

    impls: dict[str, tuple[Callable[[_Inputs], torch.Tensor], dict[str, Any]]] = {}
    impls["dense"] = (lambda x: dense_decode(x.q, x.k, x.v), {})
    run_ref = seq <= config.reference_max_seq
    if run_ref:
        impls["reference"] = (lambda x: aqua_decode_reference(x.q, x.k, x.v, x.kd, proj, dims, config.gqa), {})
    use_kernels = config.kernels and device.type in ("cuda", "meta")  # meta: recorded, not run (kernels.resources)
    if use_kernels:
        from .kernels.decode import DecodeConfig, aqua_decode

        cfg = DecodeConfig(dims, config.gqa, None, config.select_block)
        impls["aqua-dims"] = (lambda x, c=cfg: aqua_decode(x.q, x.k, x.v, x.kd, proj, c), {})
        if config.hybrid:
            hyb = HybridDecode(cfg)
            impls["hybrid-dims"] = (lambda x, h=hyb: h(x.q, x.k, x.v, x.kd, proj), {"uses_aqua": hyb.uses_aqua(config.batch, seq, shape.head_dim)})
    for ratio in config.token_ratios:
        extra = {"token_ratio": ratio, "select_block": config.select_block}
        if run_ref:
            impls[f"reference-topt-1/{round(1 / ratio)}"] = (
                lambda x, r=ratio: aqua_decode_reference(x.q, x.k, x.v, x.kd, proj, dims, config.gqa, r, config.select_block), extra)
        if use_kernels:
            cfg = DecodeConfig(dims, config.gqa, ratio, config.select_block)
            impls[f"aqua-topt-1/{round(1 / ratio)}"] = (lambda x, c=cfg: aqua_decode(x.q, x.k, x.v, x.kd, proj, c), extra)
            if config.hybrid:
                hyb = HybridDecode(cfg)
                impls[f"hybrid-topt-1/{round(1 / ratio)}"] = (
                    lambda x, h=hyb: h(x.q, x.k, x.v, x.kd, proj), {**extra, "uses_aqua": hyb.uses_aqua(config.batch, seq, shape.head_dim)})
            if config.gqa == "group":  # top-T by pages of 64 tokens (kernels.paged); its own reference comes first
                from .kernels.paged import aqua_decode_pages_reference

                pextra = {**extra, "granularity": "pages", "page": 64}
                if run_ref:
                    impls[f"reference-pages-1/{round(1 / ratio)}"] = (
                        lambda x, r=ratio: aqua_decode_pages_reference(x.q, x.k, x.v, x.kd, proj, dims, r, 64), pextra)
                pcfg = DecodeConfig(dims, config.gqa, ratio, config.select_block, granularity="pages", page=64)
                impls[f"aqua-pages-1/{round(1 / ratio)}"] = (lambda x, c=pcfg: aqua_decode(x.q, None, x.v, x.kd, proj, c), pextra)
                # the same, the keys in float16 byte planes: pages scored on the high plane (half the scoring bytes)
                qextra = {**pextra, "key_planes": True}
                if run_ref:
                    impls[f"reference-planes-1/{round(1 / ratio)}"] = (
                        lambda x, r=ratio: aqua_decode_pages_reference(x.q, x.k, x.v, x.planes, proj, dims, r, 64), qextra)
                impls[f"aqua-planes-1/{round(1 / ratio)}"] = (lambda x, c=pcfg: aqua_decode(x.q, None, x.v, x.planes, proj, c),
                                                              qextra)
                # the same pages ranked by Quest's bound from the cache's per-page min and max (a 32nd of the scoring bytes)
                sub = config.bound_page or 64
                bextra = {**pextra, "page_score": "bound", "bound_page": sub}
                if run_ref:
                    impls[f"reference-bounds-1/{round(1 / ratio)}"] = (
                        lambda x, r=ratio: aqua_decode_pages_reference(x.q, x.k, x.v, x.kd, proj, dims, r, 64, scoring="bound",
                                                                       bound_page=sub), bextra)
                bcfg = DecodeConfig(dims, config.gqa, ratio, config.select_block, granularity="pages", page=64, page_score="bound",
                                    bound_page=sub)
                impls[f"aqua-bounds-1/{round(1 / ratio)}"] = (
                    lambda x, c=bcfg: aqua_decode(x.q, None, x.v, x.kd, proj, c, bounds=x.bounds), bextra)
                if config.rerank > 0:  # ... the best of them by bound re-ranked by max
                    rextra = {**bextra, "rerank": config.rerank}
                    if run_ref:
                        impls[f"reference-rerank-1/{round(1 / ratio)}"] = (
                            lambda x, r=ratio: aqua_decode_pages_reference(x.q, x.k, x.v, x.kd, proj, dims, r, 64, scoring="bound",
                                                                           bound_page=sub, rerank=config.rerank), rextra)
                    rcfg = DecodeConfig(dims, config.gqa, ratio, config.select_block, granularity="pages", page=64,
                                        page_score="bound", bound_page=sub, rerank=config.rerank)
                    impls[f"aqua-rerank-1/{round(1 / ratio)}"] = (
                        lambda x, c=rcfg: aqua_decode(x.q, None, x.v, x.kd, proj, c, bounds=x.bounds), rextra)
    return impls


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def bench_decode_seq(config: BenchConfig, shape: AttnShape, seq: int, proj: torch.Tensor, device: torch.device,
                     dtype: torch.dtype) -> list[dict[str, Any]]:
    """All rows of one decode sequence length: every k, every implementation, with its error vs the
    reference where the reference ran (a speed number is worthless if the output is wrong)."""
    elem = torch.finfo(dtype).bits // 8
    set_bytes = 2 * config.batch * shape.num_kv_heads * seq * shape.head_dim * elem
    sets = max(1, min(8, -(-config.rotate_bytes // set_bytes))) if device.type == "cuda" else 1
    inputs = _decode_inputs(shape, config.batch, seq, proj, dtype, device, sets, config.bound_page or 64,
                            pages=bool(config.token_ratios) and config.gqa == "group")  # as decode_impls adds page rows
    runs = []  # (k, dims, name, step, fields) for every k; the composed PyTorch references last: their float32
    # temporaries of the whole cache, once allocated, were seen to slow the kernels timed after them on one H100
    # (docs/bench.md, "a timing trap")
    for k in config.ks:
        dims = k_dims(k, shape.head_dim)
        for name, (fn, extra) in decode_impls(config, shape, dims, proj, device, seq).items():
            if name != "dense" or not runs:
                runs.append((k, dims, name, fn, extra))
    runs.sort(key=lambda run: run[2].startswith("reference"))
    rows: list[dict[str, Any]] = []
    outs: list[torch.Tensor] = []
    refs: dict[tuple[float, str], torch.Tensor] = {}
    dense_us = None
    for k, dims, name, fn, extra in runs:
        out = fn(inputs[0])
        slow = name.startswith("reference")
        if slow:
            refs[(k, name)] = out
        # the composed reference makes host->device copies that a CUDA graph cannot capture: time it eagerly
        latency = time_us(_rotating(fn, inputs), device, config.warmup, max(3, config.repeats // 4) if slow else config.repeats,
                          graph=not slow) / sets
        if name == "dense":
            dense_us = latency
        rows.append(_decode_row(config, shape, seq, name, k, dims, extra, latency, dense_us, elem))
        outs.append(out)
    for row, out, (k, _, name, _, extra) in zip(rows, outs, runs):  # errors against the reference of the same selection
        ref = refs.get((k, _reference_of(name)))
        if ref is not None and extra.get("uses_aqua", True):
            row["rel_err_vs_reference"] = _rel_err(out, ref)
    return sorted(rows, key=lambda row: config.ks.index(row["k"]) if row["impl"] != "dense" else -1)


def _reference_of(impl: str) -> str:
    """The reference row an implementation is checked against: ``aqua-pages-1/16`` -> ``reference-pages-1/16``,
    the dims rows (``aqua-dims``, ``hybrid-dims``) -> ``reference``; dense and the references themselves -> none."""
    kind, _, rest = impl.partition("-")
    if kind not in ("aqua", "hybrid"):
        return ""
    return "reference" if rest == "dims" else f"reference-{rest}"


def _decode_row(config: BenchConfig, shape: AttnShape, seq: int, name: str, k: float, dims: int, extra: dict[str, Any],
                latency: float, dense_us: float | None, elem: int) -> dict[str, Any]:
    """One decode row: the latency, its ratio to dense, and the byte and FLOP model of what the step must read."""
    ratio = extra.get("token_ratio")
    model = cost_model(shape, config.batch, seq, "decode", dims if name != "dense" else shape.head_dim, ratio, elem)
    if extra.get("granularity") == "pages":  # whole pages are read: the bytes of the pages chosen
        model["aqua_bytes"] = float(pages_bytes(config.batch, shape.num_kv_heads, seq, dims, shape.head_dim, ratio,
                                                extra["page"], elem, extra.get("page_score", "max"),
                                                extra.get("bound_page"), extra.get("rerank", 0),
                                                1 if extra.get("key_planes") else elem))
        model["byte_bound_speedup"] = model["dense_bytes"] / model["aqua_bytes"]
    moved = model["dense_bytes"] if name == "dense" else model["aqua_bytes"]
    return {
        "seq": seq, "batch": config.batch, "phase": "decode", "impl": name,
        "k": 1.0 if name == "dense" else k, "dims": shape.head_dim if name == "dense" else dims,
        "gqa": config.gqa, "token_ratio": ratio, "latency_us": round(latency, 2),
        "speedup_vs_dense": round(dense_us / latency, 4) if dense_us else None,
        "model_bytes": model["dense_bytes"] if name == "dense" else model["aqua_bytes"],
        "model_flops": model["dense_flops"] if name == "dense" else model["aqua_flops"],
        "byte_bound_speedup": 1.0 if name == "dense" else round(model["byte_bound_speedup"], 4),
        "achieved_tb_s": round(moved / latency / 1e6, 3),
        **{key: val for key, val in extra.items() if key not in ("token_ratio",)},
    }


def bench_prefill_seq(config: BenchConfig, shape: AttnShape, seq: int, proj: torch.Tensor, device: torch.device,
                      dtype: torch.dtype) -> list[dict[str, Any]]:
    """Prefill: dense causal SDPA vs the static-slice path (the first ``k`` projected dims of q and k,
    projection included, then SDPA with a narrower q/k than v)."""
    import torch.nn.functional as F

    elem = torch.finfo(dtype).bits // 8
    q = torch.randn(config.batch, shape.num_heads, seq, shape.head_dim, device=device, dtype=dtype)
    k = torch.randn(config.batch, shape.num_kv_heads, seq, shape.head_dim, device=device, dtype=dtype)
    v = torch.randn_like(k)
    scale = shape.head_dim ** -0.5
    proj_d = proj.to(device, dtype)
    dense = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
    dense_us = time_us(dense, device, config.warmup, config.repeats, graph=False)
    rows = [{"seq": seq, "batch": config.batch, "phase": "prefill", "impl": "dense", "k": 1.0, "dims": shape.head_dim,
             "latency_us": round(dense_us, 2), "speedup_vs_dense": 1.0,
             "model_flops": cost_model(shape, config.batch, seq, "prefill", shape.head_dim, None, elem)["dense_flops"]}]
    group = shape.group
    for kr in config.ks:
        dims = k_dims(kr, shape.head_dim)
        p = proj_d[:, :, :dims]

        def static(p: torch.Tensor = p) -> torch.Tensor:
            qp = (q.view(config.batch, shape.num_kv_heads, group * seq, shape.head_dim) @ p[None]).view(
                config.batch, shape.num_heads, seq, p.shape[-1])
            kp = k @ p[None]
            return F.scaled_dot_product_attention(qp, kp, v, is_causal=True, enable_gqa=True, scale=scale)

        latency = time_us(static, device, config.warmup, config.repeats, graph=False)
        rows.append({"seq": seq, "batch": config.batch, "phase": "prefill", "impl": "aqua-static", "k": kr, "dims": dims,
                     "latency_us": round(latency, 2), "speedup_vs_dense": round(dense_us / latency, 4),
                     "model_flops": cost_model(shape, config.batch, seq, "prefill", dims, None, elem)["aqua_flops"]})
    return rows


def run_bench(config: BenchConfig, shape: AttnShape, projection: torch.Tensor | None = None,
              on_seq: Callable[[int, list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
    """Every row of a benchmark (see :func:`bench_decode_seq`); ``on_seq`` reports progress."""
    from .models import parse_device, parse_dtype

    device = parse_device(config.device)
    dtype = parse_dtype(config.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    proj = projection if projection is not None else random_projection(shape.num_kv_heads, shape.head_dim, generator)
    if tuple(proj.shape) != (shape.num_kv_heads, shape.head_dim, shape.head_dim):
        raise ConfigError(f"projection {tuple(proj.shape)} does not fit {shape.num_kv_heads} KV heads of dim {shape.head_dim}")
    proj = proj.to(device, torch.float32)
    rows: list[dict[str, Any]] = []
    step = bench_decode_seq if config.phase == "decode" else bench_prefill_seq
    for seq in config.seqs:
        try:
            seq_rows = step(config, shape, seq, proj, device, dtype)
        except torch.OutOfMemoryError:
            raise ConfigError(f"out of memory at --seq {seq} --batch {config.batch}: give shorter sequences or a smaller batch") from None
        rows.extend(seq_rows)
        if on_seq is not None:
            on_seq(seq, seq_rows)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def launch_resources(config: BenchConfig, shape: AttnShape, seq: int, sms: int = 132,
                     capability: int = 90) -> list[dict[str, Any]]:
    """One row per launch of every fused implementation of ``decode_impls`` (the catalog and configs of a timed run)
    at ``config.batch`` x ``seq`` for each of ``config.ks``: impl, k, then what the launch's program occupies on an
    SM (``kernels.resources``: the launchers run on meta tensors, each launch compiled offline for sm_{capability}),
    whether two of its programs fit one SM, and whether one fits beside a program of the step's launch before it
    (None for a step's first launch)."""
    from .kernels.resources import fit_together, step_resources

    meta = torch.device("meta")
    proj = random_projection(shape.num_kv_heads, shape.head_dim, torch.Generator().manual_seed(config.seed)).to(meta)
    inputs = _decode_inputs(shape, config.batch, seq, proj, getattr(torch, config.dtype), meta, 1,
                            config.bound_page or 64, bool(config.token_ratios))[0]
    rows: list[dict[str, Any]] = []
    cache: dict[str, Any] = {}
    for k in config.ks:
        dims = k_dims(k, shape.head_dim)
        for name, (fn, _) in decode_impls(config, shape, dims, proj, meta, seq).items():
            if not name.startswith("aqua-"):
                continue
            prev = None
            for r in step_resources(lambda fn=fn: fn(inputs), sms, capability, cache):
                rows.append({"impl": name, "k": k, "dims": dims, "seq": seq, "batch": config.batch, **r.as_dict(),
                             "two_per_sm": fit_together(r, r),
                             "beside_previous": None if prev is None else fit_together(prev, r)})
                prev = r
    return rows


def measured_break_even(rows: Sequence[dict[str, Any]], impl: str, k: float | None = None) -> int | None:
    """Smallest measured length from which ``impl`` (at ``k``) is at least as fast as dense at every longer
    length (None if it never is)."""
    points = sorted((r["seq"], r["speedup_vs_dense"]) for r in rows
                    if r["impl"] == impl and r["speedup_vs_dense"] and (k is None or r["k"] == k))
    found = None
    for seq, speedup in reversed(points):
        if speedup < 1.0:
            break
        found = seq
    return found


def plot_rows(rows: Sequence[dict[str, Any]], path: str | Path, title: str) -> Path:
    """Speedup vs dense against sequence length, one line per implementation and k (log-2 x axis)."""
    from .plotting import pyplot, save_figure

    plt = pyplot()
    path = Path(path)
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if r["impl"] == "dense" or not r.get("speedup_vs_dense"):
            continue
        label = f"{r['impl']} k={r['k']:g} B{r['batch']} {r['phase']}"
        series.setdefault(label, []).append((r["seq"], r["speedup_vs_dense"]))
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for label, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3, label=label)
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("speedup vs dense SDPA (same run)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    return save_figure(fig, path, dpi=120)


def summary(config: BenchConfig, shape: AttnShape, rows: Sequence[dict[str, Any]], device_name: str) -> dict[str, Any]:
    impls = sorted({r["impl"] for r in rows if r["impl"] != "dense"})
    ks = sorted({r["k"] for r in rows if r["impl"] != "dense"})
    return {
        "device": device_name,
        "torch": torch.__version__,
        "shape": asdict(shape),
        "config": {key: val for key, val in asdict(config).items()},
        "paper_break_even": {f"k={k:g}": paper_break_even(shape.head_dim, round(k * shape.head_dim)) for k in ks},
        "measured_break_even": {f"{impl} k={k:g}": measured_break_even(rows, impl, k) for impl in impls for k in ks},
    }


def device_name(device: str) -> str:
    from .models import parse_device

    dev = parse_device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    import platform

    return f"CPU ({platform.processor() or platform.machine()})"
