"""Tiny random-weight decoders of each architecture family AQUA must support (built from configs:
no download). Shapes are small but keep each family's quirks: GQA groups, MHA, head_dim != hidden/heads,
Gemma3's head_dim 256 with sliding-window layers, Qwen2's q/k biases, OLMoE's experts and q/k norms."""

from __future__ import annotations

import torch

VOCAB = 128


def tiny_config(arch: str):
    from transformers import (
        Gemma3TextConfig,
        LlamaConfig,
        MistralConfig,
        OlmoeConfig,
        Qwen2Config,
    )

    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=256)
    if arch == "llama":
        return LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    if arch == "qwen2":
        return Qwen2Config(**common, num_attention_heads=4, num_key_value_heads=1)
    if arch == "mistral":
        return MistralConfig(**common, num_attention_heads=4, num_key_value_heads=2, sliding_window=8)
    if arch == "gemma3":
        return Gemma3TextConfig(
            **{**common, "num_hidden_layers": 3},
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=256,
            sliding_window=6,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        )
    if arch == "olmoe":
        return OlmoeConfig(**common, num_attention_heads=4, num_key_value_heads=4, num_experts=4, num_experts_per_tok=2)
    raise ValueError(arch)


ARCHS = ("llama", "qwen2", "mistral", "gemma3", "olmoe")


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32, attn_implementation="sdpa")
    return model.eval()


FULL_ATTENTION = ("llama", "qwen2", "olmoe")  # mistral and gemma3 use sliding windows


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖: the exactness measure of every test (fp32, 1e-4 for k = d)."""
    return float((a - b).norm() / b.norm())


def token_ids(batch: int = 1, length: int = 20, seed: int = 1) -> torch.Tensor:
    """Random ids of the tiny vocabulary (ids 0-2 are the special tokens)."""
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_no_single_move_improves(cost: torch.Tensor, budgets: list[int], low: int, high: int) -> None:
    """A budget allocation is optimal for ``sum_u cost[u, b_u]`` at its total: moving one dimension from one
    unit to another (within ``low..high``) never lowers the sum (what the policies' exact DP must give)."""
    total = sum(float(cost[u, b]) for u, b in enumerate(budgets))
    for i in range(len(budgets)):
        for j in range(len(budgets)):
            if i != j and budgets[i] > low and budgets[j] < high:
                moved = list(budgets)
                moved[i] -= 1
                moved[j] += 1
                assert sum(float(cost[u, b]) for u, b in enumerate(moved)) >= total - 1e-12, (i, j, budgets)
