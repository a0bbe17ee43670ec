"""Text generation with an AQUA-patched model, and what AQUA saved while doing it.

The model is an ordinary transformers model with AQUA hooks installed (:func:`aqua_cli.patch`), so
``generate()``, streamers, chat templates and ``pipeline("text-generation", model=model)`` work as
they do without AQUA. This module adds the bookkeeping a user wants next to the text: tokens/s, the
prompt length, the share of attention dot-product FLOPs that AQUA's selection removes at that length
(the cost model of :mod:`aqua_cli.bench`), and, for a comparison with dense attention, where the two
outputs first differ.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ConfigError


@dataclass
class SamplingConfig:
    """``temperature == 0`` is greedy decoding (deterministic, the setting for comparisons)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    chat: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ConfigError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p}")


@dataclass
class GenerationResult:
    text: str
    new_ids: list[int]
    prompt_tokens: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return len(self.new_ids) / max(self.seconds, 1e-9)


def encode_prompt(tokenizer: Any, prompt: str, chat: bool) -> torch.Tensor:
    """``[1, n]`` input ids; with ``chat`` the tokenizer's chat template wraps the prompt as a user turn."""
    if not prompt.strip():
        raise ConfigError("the prompt is empty: give text, --prompt-file or standard input")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("--chat needs a tokenizer with a chat template; this model has none")
        encoded = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        return encoded["input_ids"]
    return tokenizer(prompt, return_tensors="pt").input_ids


def check_context(model: torch.nn.Module, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse a prompt that, with the tokens to generate, does not fit the model's context
    (``max_position_embeddings``): beyond it a model returns garbage, slowly."""
    from .models import text_config

    limit = getattr(text_config(model.config), "max_position_embeddings", None)
    if isinstance(limit, int) and limit > 0 and prompt_tokens + max_new_tokens > limit:
        raise ConfigError(
            f"the prompt is {prompt_tokens} tokens and --max-new-tokens {max_new_tokens}: together more than the model's "
            f"context of {limit} tokens; shorten the prompt or lower --max-new-tokens"
        )


def generate_text(
    model: torch.nn.Module, tokenizer: Any, prompt: str, config: SamplingConfig, streamer: Any = None, cache: Any = None
) -> GenerationResult:
    """Generate from ``prompt``; ``streamer`` (e.g. transformers' ``TextStreamer``) sees tokens as they come;
    ``cache`` (e.g. a method's ``new_cache()``) is passed as ``past_key_values``."""
    ids = encode_prompt(tokenizer, prompt, config.chat).to(next(model.parameters()).device)
    check_context(model, int(ids.shape[-1]), config.max_new_tokens)
    torch.manual_seed(config.seed)
    sampling: dict[str, Any] = {"do_sample": False}
    if config.temperature > 0:
        sampling = {"do_sample": True, "temperature": config.temperature, "top_p": config.top_p}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=config.max_new_tokens,
            pad_token_id=pad, streamer=streamer, **({"past_key_values": cache} if cache is not None else {}), **sampling,
        )
    seconds = time.perf_counter() - started
    new = out[0, ids.shape[1] :].tolist()
    return GenerationResult(tokenizer.decode(new, skip_special_tokens=True), new, int(ids.shape[1]), seconds)


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first token where ``a`` and ``b`` differ (None if one is a prefix of the other
    and they have the same length)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def attention_flops_saved(config: Any, dims: int, prompt_tokens: int, new_tokens: int) -> float:
    """Fraction of attention dot-product FLOPs (scores and value sums, projection and selection
    included) that AQUA removes over a prefill of ``prompt_tokens`` and ``new_tokens`` decode steps."""
    from .cost import cost_model
    from .models import AttnShape
    from .models import attention_shape

    s = attention_shape(config)
    shape = AttnShape("model", s["num_heads"], s["num_kv_heads"], s["head_dim"], s["num_layers"])
    dense = aqua = 0.0
    if prompt_tokens:
        cost = cost_model(shape, 1, prompt_tokens, "prefill", dims)
        dense, aqua = cost["dense_flops"], cost["aqua_flops"]
    for step in range(new_tokens):
        cost = cost_model(shape, 1, prompt_tokens + step + 1, "decode", dims)
        dense += cost["dense_flops"]
        aqua += cost["aqua_flops"]
    return 1.0 - aqua / dense if dense else 0.0
