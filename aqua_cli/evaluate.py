"""How much quality AQUA costs: perplexity against dense in the same run, and attention retention.

Perplexity (docs/eval.md defines every number):

* windows of ``seq_len`` tokens, non-overlapping, the same windows for every (mode, k) point, so the
  relative change against dense is a paired comparison, not two samples;
* ``ppl = exp(sum NLL / predicted tokens)``; ``ppl_byte = exp(sum NLL / bytes)`` where ``bytes`` are the
  UTF-8 bytes of the predicted tokens' text, which compares across tokenizers and languages (Hindi
  takes more bytes per token than English); ``bpb`` is the same in bits per byte.

Retention (the paper's "information retention" view, per attention call): for a sample of windows the
model runs *dense*, and at every layer the same post-RoPE ``q, k, v`` also go through AQUA; we compare
the two attentions on identical inputs, so errors do not compound across layers and each number says
what AQUA does to one attention call:

* ``score_err``: ``||S_aqua - S||_F / ||S||_F`` over the causal (unmasked) scores ``S = q k^T * scale``;
* ``attn_tv``: mean over query rows of the total-variation distance ``0.5 * sum_j |p_aqua - p|`` between
  the softmax rows (0 = same distribution, 1 = disjoint);
* ``out_cos``: mean cosine similarity between AQUA and dense attention outputs, per token and head.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch

from .budgets import k_dims, parse_k
from .methods import Aqua, AttentionHook, parse_mode
from .data import DataSpec, load_windows
from .errors import ConfigError, DataError
from .policy import allocate, kept_energy, parse_policy


@dataclass(frozen=True)
class EvalConfig:
    """One ``aqua eval`` run over one text: every (mode, k, policy) point shares the same windows."""

    data: DataSpec = field(default_factory=lambda: DataSpec(part="evaluation"))  # held out from calibration
    ks: tuple[float | int, ...] = (0.5, 0.75, 1.0)
    modes: tuple[str, ...] = ("dense", "static", "dynamic")
    policies: tuple[str, ...] = ("uniform",)
    tokens: int = 2048
    seq_len: int = 512
    batch_size: int = 1
    seed: int = 0
    retention_windows: int = 1  # windows sampled for the retention metrics; 0 turns them off

    def validate(self, head_dim: int | None = None) -> None:
        """Fail fast, before any model is loaded, on values that can never work."""
        if not self.ks:
            raise ConfigError("--k is empty: give e.g. 0.5,0.75,1.0")
        for k in self.ks:
            parse_k(k)
            if head_dim is not None:
                k_dims(k, head_dim)
        if not self.modes:
            raise ConfigError("--mode is empty: give e.g. dense,static,dynamic")
        for mode in self.modes:
            parse_mode(mode)
        for policy in self.policies:
            parse_policy(policy)
        for name in ("tokens", "seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.retention_windows < 0:
            raise ConfigError("--retention-windows must be 0 or more")

    def describe(self) -> dict[str, Any]:
        return {**asdict(self), "data": self.data.describe()}


@dataclass
class Perplexity:
    nll: float  # summed natural-log loss
    tokens: int  # predicted tokens
    bytes: int  # UTF-8 bytes of the predicted tokens

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def ppl_byte(self) -> float:
        return math.exp(self.nll / max(1, self.bytes))

    @property
    def bpb(self) -> float:
        return self.nll / max(1, self.bytes) / math.log(2)


@dataclass
class EvalRow:
    """One (mode, k, policy) point; the JSON row of ``aqua eval --json``."""

    model: str
    data: str
    artifact: str
    mode: str
    k: float | int
    k_dims: float  # mean kept dims per head (per-layer policies: the mean over layers and groups)
    policy: str
    ppl: float
    ppl_rel_change: float
    ppl_byte: float
    bpb: float
    tokens: int
    bytes: int
    seq_len: int
    energy_kept: float | None = None  # mean static calibration energy of the budgets (None for dense)
    score_err: float | None = None
    attn_tv: float | None = None
    out_cos: float | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- perplexity ----------------------------------------------------------------------------------
def window_bytes(tokenizer: Any, windows: torch.Tensor) -> int:
    """UTF-8 bytes of the predicted tokens (``windows[:, 1:]``), special tokens left out.

    Decoding a window at once (not token by token) keeps multi-byte characters split across byte-level
    BPE tokens whole; a character cut at a window edge may count as a replacement character.
    """
    return sum(len(tokenizer.decode(w[1:].tolist(), skip_special_tokens=True).encode("utf-8")) for w in windows)


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 1, num_bytes: int = 0,
               on_batch: Callable[[int], None] | None = None, dist: Any = None) -> Perplexity:
    """Summed next-token NLL over ``[n, seq_len]`` windows (no cache, no padding).

    With ``dist`` (:mod:`aqua_cli.distributed`), each rank scores its shard of the windows and the sums
    are all-reduced: every rank returns the perplexity of all the windows.
    """
    from .distributed import all_reduce_sum, shard

    device = next(model.parameters()).device
    nll, count = 0.0, 0
    windows = shard(windows, dist)
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size].to(device)
        logits = model(batch, use_cache=False).logits[:, :-1].float()
        targets = batch[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        if not torch.isfinite(loss):
            raise ConfigError("the loss is not finite: the model overflows in this dtype; use --dtype float32")
        nll += float(loss)
        count += targets.numel()
        if on_batch is not None:
            on_batch(batch.numel())
    if dist is not None:
        sums = torch.tensor([nll, float(count)], dtype=torch.float64)
        all_reduce_sum([sums], dist)
        nll, count = float(sums[0]), int(sums[1])
    return Perplexity(nll, count, num_bytes)


# -- retention -----------------------------------------------------------------------------------
@dataclass
class RetentionStats:
    """Running sums over attention calls, so the result is a token-weighted mean over the sample."""

    score_sq_err: float = 0.0
    score_sq: float = 0.0
    tv_sum: float = 0.0
    rows: int = 0
    cos_sum: float = 0.0
    vectors: int = 0

    def result(self) -> dict[str, float]:
        return {
            "score_err": math.sqrt(self.score_sq_err / max(self.score_sq, 1e-30)),
            "attn_tv": self.tv_sum / max(1, self.rows),
            "out_cos": self.cos_sum / max(1, self.vectors),
        }


def _allowed(attention_mask: torch.Tensor | None, q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """Boolean ``[..., q_len, kv_len]``: True where a query may attend (causal when no mask is given)."""
    if attention_mask is None:
        return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)
    mask = attention_mask[..., -kv_len:] if attention_mask.shape[-1] >= kv_len else attention_mask
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


@dataclass
class RetentionProbe(AttentionHook):
    """Wraps a method's hook: runs dense and the hook's rewrite on the same q/k/v, records how they
    differ, and returns dense (so errors do not compound across layers)."""

    inner: AttentionHook
    stats: RetentionStats

    def attend(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        dense, _ = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        q2, k2 = self.inner.rewrite(module, query, key)
        approx, _ = sdpa_attention_forward(module, q2, k2, value, attention_mask, **kwargs)
        self._scores(module, query, key, q2, k2, attention_mask, kwargs.get("scaling"))
        cos = torch.nn.functional.cosine_similarity(approx.float(), dense.float(), dim=-1, eps=1e-12)
        self.stats.cos_sum += float(cos.sum())
        self.stats.vectors += cos.numel()
        return dense, None

    def _scores(self, module, q, k, q2, k2, attention_mask, scaling) -> None:
        rep = q.shape[1] // k.shape[1]
        scale = scaling if scaling is not None else getattr(module, "scaling", q.shape[-1] ** -0.5)
        s = (q.float() @ k.float().repeat_interleave(rep, 1).transpose(-1, -2)) * scale
        s2 = (q2.float() @ k2.float().repeat_interleave(rep, 1).transpose(-1, -2)) * scale
        allowed = _allowed(attention_mask, q.shape[2], k.shape[2], q.device).expand_as(s)
        self.stats.score_sq_err += float(((s2 - s) ** 2)[allowed].sum())
        self.stats.score_sq += float((s**2)[allowed].sum())
        neg = torch.finfo(torch.float32).min
        p = s.masked_fill(~allowed, neg).softmax(-1)
        p2 = s2.masked_fill(~allowed, neg).softmax(-1)
        tv = 0.5 * (p2 - p).abs().sum(-1)
        live = allowed.any(-1)  # rows with at least one key (all rows, in practice)
        self.stats.tv_sum += float(tv[live].sum())
        self.stats.rows += int(live.sum())


@torch.no_grad()
def retention(method: Aqua, windows: torch.Tensor) -> dict[str, float]:
    """Retention metrics of an installed method's current settings on ``windows`` (see module docstring)."""
    stats = RetentionStats()
    with method.wrapped(lambda hook: RetentionProbe(hook, stats)):
        device = next(method.model.parameters()).device
        for window in windows:
            method.model(window[None].to(device), use_cache=False)
    return stats.result()


# -- the run -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Point:
    mode: str
    k: float | int
    policy: str


def points(config: EvalConfig) -> list[Point]:
    """The (mode, k, policy) grid, dense once; full k runs under ``uniform`` only (policies coincide)."""
    out = [Point("dense", 1.0, "uniform")] if "dense" in config.modes else []
    for mode in config.modes:
        if mode == "dense":
            continue
        for k in config.ks:
            full = isinstance(k, float) and k == 1.0
            for policy in config.policies:
                if policy != "uniform" and full:
                    continue
                out.append(Point(mode, k, policy))
    return out


def point_setup(artifact: Any, point: Point) -> tuple[Aqua, list[Any] | None, float, float | None]:
    """The method that runs ``point``; its per-layer budgets (None: uniform k or dense); the mean kept
    dims and the mean static calibration energy those budgets keep (None for dense)."""
    method = Aqua(artifact, point.k, point.mode)
    if point.mode == "dense":
        return method, None, float(artifact.head_dim), None
    budgets = allocate(artifact, k_dims(point.k, artifact.head_dim), point.policy)
    mean_dims = sum(map(sum, budgets)) / (artifact.num_layers * artifact.num_groups)
    return method, None if point.policy == "uniform" else budgets, mean_dims, kept_energy(artifact, budgets)


def prepare_windows(tokenizer: Any, config: EvalConfig) -> torch.Tensor:
    windows = load_windows(config.data, tokenizer, config.seq_len, config.tokens, config.seed)
    if windows.shape[0] == 0:
        raise DataError(f"data '{config.data.describe()}' gave no windows of {config.seq_len} tokens")
    return windows


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    artifact: Any,
    config: EvalConfig,
    model_id: str = "?",
    windows: torch.Tensor | None = None,
    on_point: Callable[[EvalRow], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
    dist: Any = None,
) -> list[EvalRow]:
    """Perplexity (and retention) at every point of ``config``, against dense on the same windows.

    Dense is computed once (through the same attention code path, with no rewrite) and reused; when
    ``dense`` is not among the modes it is still computed, as the reference for ``ppl_rel_change``.
    """
    config.validate(artifact.head_dim)
    artifact.check_model(model.config)
    if windows is None:
        windows = prepare_windows(tokenizer, config)
    num_bytes = window_bytes(tokenizer, windows)
    sample = windows[: config.retention_windows]
    rows: list[EvalRow] = []
    grid = points(config)
    show_dense = bool(grid) and grid[0].mode == "dense"
    if not show_dense:
        grid = [Point("dense", 1.0, "uniform"), *grid]
    reference: Perplexity | None = None
    for point in grid:  # one loop: each point is a method, installed, measured, removed
        started = time.perf_counter()
        method, budgets, mean_dims, energy = point_setup(artifact, point)
        with method(model):
            if budgets is not None:
                method.set_layer_k(budgets)
            result = perplexity(model, windows, config.batch_size, num_bytes, on_batch, dist)
            kept = retention(method, sample) if (len(sample) and point.mode != "dense") else {}
        if reference is None:
            reference = result
        if point.mode == "dense" and len(sample):
            kept = {"score_err": 0.0, "attn_tv": 0.0, "out_cos": 1.0}
        row = EvalRow(
            model=model_id,
            data=config.data.describe(),
            artifact=artifact.name,
            mode=point.mode,
            k=point.k,
            k_dims=round(mean_dims, 4),
            policy=point.policy,
            ppl=result.ppl,
            ppl_rel_change=result.ppl / reference.ppl - 1.0,
            ppl_byte=result.ppl_byte,
            bpb=result.bpb,
            tokens=result.tokens,
            bytes=result.bytes,
            seq_len=config.seq_len,
            energy_kept=energy,
            seconds=round(time.perf_counter() - started, 2),
            **kept,
        )
        if point.mode != "dense" or show_dense:
            rows.append(row)
            if on_point is not None:
                on_point(row)
    return rows


def compare_policies(rows: Sequence[EvalRow]) -> list[dict[str, Any]]:
    """For each (data, mode, k): each non-uniform policy's ppl change against uniform at equal cost."""
    uniform = {(r.data, r.mode, r.k): r for r in rows if r.policy == "uniform"}
    out = []
    for r in rows:
        base = uniform.get((r.data, r.mode, r.k))
        if r.policy == "uniform" or base is None:
            continue
        out.append({
            "data": r.data, "mode": r.mode, "k": r.k, "policy": r.policy,
            "ppl_uniform": base.ppl, "ppl_policy": r.ppl,
            "ppl_change_vs_uniform": r.ppl / base.ppl - 1.0,
            "wins": r.ppl < base.ppl,
        })
    return out


def plot_rows(rows: Sequence[dict[str, Any]], path: Any, title: str = "aqua eval") -> Any:
    """ppl against k, one line per (mode, policy) and data; dense as a horizontal line."""
    import matplotlib.ticker

    from .plotting import pyplot, save_figure

    plt = pyplot()

    datas = list(dict.fromkeys(r["data"] for r in rows))
    fig, axes = plt.subplots(1, len(datas), figsize=(6 * len(datas), 4.2), dpi=120, squeeze=False)
    for ax, data in zip(axes[0], datas):
        mine = [r for r in rows if r["data"] == data]
        for r in mine:
            if r["mode"] == "dense":
                ax.axhline(r["ppl"], color="black", ls="--", lw=1, label=f"dense ({r['ppl']:.2f})")
        series = dict.fromkeys((r["mode"], r["policy"]) for r in mine if r["mode"] != "dense")
        for mode, policy in series:
            pts = sorted((r["k_dims"] / _head_dim(mine), r["ppl"]) for r in mine if r["mode"] == mode and r["policy"] == policy)
            label = mode if policy == "uniform" else f"{mode} ({policy})"
            ax.plot(*zip(*pts), marker="o", lw=1.2, label=label)
        ax.set_yscale("log")
        plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:.3g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_xlabel("k / head_dim (mean kept dims)")
        ax.set_ylabel("perplexity (per token)")
        ax.set_title(f"{title}: {data}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def _head_dim(rows: Sequence[dict[str, Any]]) -> float:
    dense = [r for r in rows if r["mode"] == "dense"]
    if dense:
        return dense[0]["k_dims"]
    full = [r["k_dims"] / r["k"] for r in rows if isinstance(r["k"], float) and r["policy"] == "uniform"]
    return full[0] if full else max(r["k_dims"] for r in rows)
