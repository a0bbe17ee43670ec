"""H2O eviction, alone and over AQUA scores: exact with a budget that evicts nothing, then eviction itself
(exact budget, heavy hitters by accumulated score, positions after eviction), then bad input."""

from __future__ import annotations

import pytest
import torch
from tiny_models import rel_err, tiny_model, token_ids
from transformers import DynamicCache

from aqua_cli.cost import cache_bytes
from aqua_cli.errors import AquaError, ConfigError
from aqua_cli.budgets import parse_budget
from aqua_cli.memory import continuation_nll
from aqua_cli.methods import AttentionHook, H2OLayer, H2OState, patch, patch_h2o


def stepwise(model, x, cache, prefill=6):
    with torch.no_grad():
        out = model(x[:, :prefill], past_key_values=cache, use_cache=True)
        logits = [out.logits[:, -1]]
        for t in range(prefill, x.shape[1]):
            out = model(x[:, t : t + 1], past_key_values=cache, use_cache=True)
            logits.append(out.logits[:, -1])
    return torch.stack(logits)


# -- exactness: a budget that never evicts ------------------------------------------------------------
@pytest.mark.parametrize("aqua", [False, True])
def test_full_budget_prefill_equals_dense(full, aqua):
    _, model, art = full
    x = token_ids(batch=2)
    with torch.no_grad():
        ref = model(x).logits
        with patch_h2o(model, 1.0, artifact=art if aqua else None, k=1.0) as h:
            cache = h.new_cache()
            got = model(x, past_key_values=cache, use_cache=True).logits
    assert rel_err(got, ref) <= 1e-4
    assert cache.layers[0].keys.shape[-2] == x.shape[1]  # ratio 1.0 of the prompt keeps it all


@pytest.mark.parametrize("aqua", [False, True])
def test_full_budget_decode_and_generate_equal_dense(full, aqua):
    _, model, art = full
    x = token_ids(length=16)
    ref = stepwise(model, x, DynamicCache())
    kw = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        ref_tokens = model.generate(x[:, :8], **kw)
    with patch_h2o(model, 64, artifact=art if aqua else None, k=art.head_dim) as h:
        got = stepwise(model, x, h.new_cache())
        with torch.no_grad():
            tokens = model.generate(x[:, :8], past_key_values=h.new_cache(), **kw)
    assert rel_err(got, ref) <= 1e-4
    assert torch.equal(tokens, ref_tokens)


def test_aqua_h2o_without_eviction_equals_aqua(full):
    """With nothing evicted, AQUA + H2O is AQUA: the explicit attention matches the SDPA path at k < D."""
    _, model, art = full
    x = token_ids(batch=2)
    with torch.no_grad():
        with patch(model, art, k=0.5, mode="dynamic"):
            ref = model(x).logits
        with patch_h2o(model, 1.0, artifact=art, k=0.5, mode="dynamic") as h:
            got = model(x, past_key_values=h.new_cache(), use_cache=True).logits
    assert rel_err(got, ref) <= 1e-4


# -- eviction -----------------------------------------------------------------------------------------
def test_eviction_keeps_exactly_the_budget_and_counts_positions(full):
    _, model, _ = full
    x = token_ids(batch=2, length=20)
    with patch_h2o(model, 8) as h:
        cache = h.new_cache()
        with torch.no_grad():
            model(x, past_key_values=cache, use_cache=True)
            assert all(layer.keys.shape[-2] == 8 and layer.scores.shape[-1] == 8 for layer in cache.layers)
            for t in range(5):
                model(token_ids(batch=2, length=1, seed=10 + t), past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == 25  # tokens seen: the next token's RoPE position
    assert all(layer.keys.shape[-2] == 8 for layer in cache.layers)
    held = cache_bytes(cache)
    assert held["keys"] == held["values"] == 2 * len(cache.layers) * cache.layers[0].keys.shape[1] * 8 * cache.layers[0].keys.shape[-1] * 4


def test_ratio_budget_is_fixed_by_the_prompt(full):
    _, model, _ = full
    with patch_h2o(model, 0.25) as h:
        cache = h.new_cache()
        with torch.no_grad():
            model(token_ids(length=40), past_key_values=cache, use_cache=True)
            model(token_ids(length=3, seed=4), past_key_values=cache, use_cache=True)
    assert cache.layers[0].capacity == 10 and cache.layers[0].keys.shape[-2] == 10


def test_heavy_hitters_are_chosen_by_accumulated_score():
    """Half recent, half the highest accumulated scores among the older tokens, kept in order."""
    state = H2OState(budget=4)
    layer = H2OLayer(state)
    k = torch.arange(10.0).view(1, 1, 10, 1).expand(1, 2, 10, 3).contiguous()
    layer.update(k, k.clone())
    scores = torch.zeros(1, 2, 10)
    scores[0, 0, [2, 5]] = 1.0  # head 0: heavy hitters 2 and 5
    scores[0, 1, [0, 7]] = 1.0  # head 1: 0 and 7
    scores[0, :, 9] = 5.0  # a recent token: kept anyway, not counted as a heavy hitter
    layer.scores = scores
    layer.evict()
    kept = layer.keys[0, :, :, 0]
    assert kept[0].tolist() == [2.0, 5.0, 8.0, 9.0]
    assert kept[1].tolist() == [0.0, 7.0, 8.0, 9.0]
    assert layer.scores[0, 0].tolist() == [1.0, 1.0, 0.0, 5.0]


def test_attention_accumulates_probability_mass(full):
    """Scores sum, over queries and the group's query heads, to (queries x heads per group) per KV head."""
    _, model, _ = full
    x = token_ids(length=12)
    with patch_h2o(model, 1.0) as h:
        cache = h.new_cache()
        with torch.no_grad():
            model(x, past_key_values=cache, use_cache=True)
    rep = model.config.num_attention_heads // cache.layers[0].keys.shape[1]
    total = cache.layers[0].scores.sum(-1)
    assert torch.allclose(total, torch.full_like(total, 12.0 * rep), rtol=1e-4)


def test_positions_stay_right_after_eviction(full):
    """Under the budget nothing is evicted and decode equals dense. After evictions (in prefill and at
    every step), each decode step must equal dense attention over exactly the tokens H2O kept, with the
    new token at its true position (tokens seen): an ordinary cache holding the kept keys and values,
    position_ids given. A cache that counted stored tokens would put it at the stored count instead,
    which gives other logits (checked too, so the comparison can tell the two apart)."""
    _, model, _ = full
    x = token_ids(length=18)
    ref = stepwise(model, x, DynamicCache(), prefill=10)
    with patch_h2o(model, 18) as h:  # longer than the sequence: no eviction
        got = stepwise(model, x, h.new_cache(), prefill=10)
    assert rel_err(got, ref) <= 1e-4
    wrong_positions_differ = []
    with patch_h2o(model, 6) as h, torch.no_grad():
        cache = h.new_cache()
        model(x[:, :10], past_key_values=cache, use_cache=True)
        for t in range(10, 18):
            stored = cache.layers[0].keys.shape[-2]
            assert stored == 6

            def kept_then_step(position: int) -> torch.Tensor:
                plain = DynamicCache()
                for i, layer in enumerate(cache.layers):
                    plain.update(layer.keys.clone(), layer.values.clone(), i)
                with h.wrapped(lambda hook: AttentionHook()):  # plain SDPA, nothing evicted
                    return model(x[:, t : t + 1], past_key_values=plain, position_ids=torch.tensor([[position]]),
                                 use_cache=True).logits

            want, wrong = kept_then_step(t), kept_then_step(stored)
            got = model(x[:, t : t + 1], past_key_values=cache, use_cache=True).logits
            assert rel_err(got, want) <= 1e-4, t
            wrong_positions_differ.append(rel_err(got, wrong) > 1e-4)
    assert all(wrong_positions_differ)
    assert cache.get_seq_length() == 18 and cache.get_mask_sizes(1, 0) == (7, 12)


def test_rope_positions_after_eviction_are_tokens_seen(full):
    """The RoPE module must see position 20, 21, ... for the decode steps after a 20-token prompt was
    compressed to 6 tokens (a cache that reported its stored length would give 6, 7, ...)."""
    _, model, _ = full
    seen: list[int] = []

    def record(module, args, kwargs, out):
        positions = kwargs["position_ids"] if "position_ids" in kwargs else args[1]
        seen.append(int(positions[0, -1]))

    hook = model.model.rotary_emb.register_forward_hook(record, with_kwargs=True)
    try:
        with patch_h2o(model, 6) as h:
            cache = h.new_cache()
            with torch.no_grad():
                model(token_ids(length=20), past_key_values=cache, use_cache=True)
                for t in range(3):
                    model(token_ids(length=1, seed=5 + t), past_key_values=cache, use_cache=True)
    finally:
        hook.remove()
    assert seen == [19, 20, 21, 22]
    assert all(layer.keys.shape[-2] == 6 for layer in cache.layers)


def test_evicting_changes_outputs_and_aqua_changes_the_choice(full):
    _, model, art = full
    x = token_ids(length=24)
    ref = stepwise(model, x, DynamicCache(), prefill=16)
    with patch_h2o(model, 6) as h:
        plain_cache = h.new_cache()
        plain = stepwise(model, x, plain_cache, prefill=16)
    with patch_h2o(model, 6, artifact=art, k=1, mode="dynamic") as h:
        aqua_cache = h.new_cache()
        stepwise(model, x, aqua_cache, prefill=16)
    assert rel_err(plain, ref) > 1e-4
    # the approximate scores drive the accumulation: different accumulated scores in every layer (on these
    # random-weight models the position bias of causal attention often still keeps the same tokens; that
    # AQUA's scores can change which tokens survive is shown on a constructed case below)
    assert all(rel_err(a.scores, p.scores) > 1e-3 for a, p in zip(aqua_cache.layers, plain_cache.layers))


@pytest.mark.parametrize("aqua, survivor", [(False, 1), (True, 0)])
def test_aqua_scores_change_which_token_survives(aqua, survivor):
    """Keys A = [1, 0] (token 0) and B = [0, 3] (token 1), three zero keys after them; every query is
    [2, 1.5]. Dense scores favour B (4.5 against 2); AQUA at k = 1 (P = I) keeps only dim 0, where B
    scores 0, so A gathers the mass. Budget 3 = 2 recent + 1 heavy hitter among tokens 0-2."""
    from aqua_cli.methods import H2OHook, ProjectionHook

    state = H2OState(budget=3)
    layer = H2OLayer(state)
    keys = torch.tensor([[1.0, 0.0], [0.0, 3.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]).view(1, 1, 5, 2)
    values = torch.arange(5.0).view(1, 1, 5, 1).expand(1, 1, 5, 2).contiguous()  # value = token index
    query = torch.tensor([2.0, 1.5]).expand(1, 1, 5, 2).contiguous()
    k, v = layer.update(keys, values)
    hook = H2OHook(state, ProjectionHook(torch.eye(2)[None], 1, "dynamic") if aqua else None)
    hook.attend(torch.nn.Module(), query, k, v, None, scaling=1.0)
    assert layer.values[0, 0, :, 0].tolist() == [float(survivor), 3.0, 4.0]


def test_continuation_nll_full_budget_equals_dense(full):
    _, model, _ = full
    x = token_ids(length=16)
    dense = continuation_nll(model, x, 8, DynamicCache())
    with patch_h2o(model, 32) as h:
        got = continuation_nll(model, x, 8, h.new_cache())
    assert got[1] == dense[1] == 8 and abs(got[0] - dense[0]) <= 1e-3 * abs(dense[0])


# -- bad input -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0, -1, 1, 0.0, 1.5, -0.2, "x", "nan"])
def test_bad_budget(value):
    with pytest.raises(ConfigError, match="budget"):
        parse_budget(value)


def test_cache_without_its_hooks_is_refused(full):
    _, model, _ = full
    h = patch_h2o(model, 8)
    cache = h.new_cache()
    h.remove()
    with pytest.raises(AquaError, match="without its attention hooks"), torch.no_grad():
        for t in range(2):
            model(token_ids(length=4, seed=t), past_key_values=cache, use_cache=True)


def test_cache_for_another_model_is_refused(full):
    arch, model, _ = full
    other = tiny_model("llama" if arch != "llama" else "olmoe")
    with patch_h2o(other, 8) as h:
        cache = h.new_cache()
    with patch_h2o(model, 8), pytest.raises(ConfigError, match="built for"), torch.no_grad():
        model(token_ids(), past_key_values=cache, use_cache=True)


@pytest.mark.parametrize("arch", ["mistral", "gemma3"])
def test_sliding_window_models_are_refused(arch):
    with pytest.raises(ConfigError, match="full-attention layers only"):
        patch_h2o(tiny_model(arch), 0.5)


def test_padded_batch_is_refused_after_eviction():
    model = tiny_model("llama")
    x = token_ids(batch=2, length=12)
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    with patch_h2o(model, 6) as h, pytest.raises(ConfigError, match="padded"), torch.no_grad():
        model.generate(x, attention_mask=mask, past_key_values=h.new_cache(), max_new_tokens=3, do_sample=False, pad_token_id=0)
