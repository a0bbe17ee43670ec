"""Every method through one parametrised suite (as kvpress runs its list of presses): at a budget that loses
nothing each equals dense in prefill, in cached decoding and on a left-padded batch, and leaving it
restores the model. Each method's own edge cases live in its own file (test_attention, test_kv, test_h2o...)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_artifact
from tiny_models import ARCHS, rel_err, tiny_model, token_ids
from transformers import DynamicCache

from aqua_cli.attention import ATTN_NAME, HOOK_ATTR, attention_modules
from aqua_cli.errors import ConfigError
from aqua_cli.methods import H2O, AttentionHook, Dense, Method, default_methods

COUNT = 11  # len(default_methods(artifact)); checked by test_default_methods_cover_every_method


@pytest.fixture(scope="module", params=ARCHS)
def arch_model(request):
    model = tiny_model(request.param)
    return request.param, model, tiny_artifact(model, request.param)


def installed(method: Method, model: torch.nn.Module) -> Method:
    """Install, or skip where the method refuses this architecture (sliding-window layers) by design."""
    try:
        return method(model)
    except ConfigError as exc:
        assert "full-attention layers only" in str(exc)
        pytest.skip(f"{type(method).__name__} refuses this model by design: {exc}")


def cache_of(method: Method):
    return method.new_cache() or DynamicCache()


def test_default_methods_cover_every_method(full):
    _, _, art = full
    methods = default_methods(art)
    assert len(methods) == COUNT
    kinds = {type(m).__name__ for m in methods}
    assert kinds == {"Dense", "Aqua", "AquaKV", "H2O", "TopTokens", "AquaDecode"}
    assert all(isinstance(m, Method) for m in methods)


@pytest.mark.parametrize("index", range(COUNT))
def test_full_budget_prefill_equals_dense(arch_model, index):
    _, model, art = arch_model
    x = token_ids(batch=2, length=18)
    with torch.no_grad():
        ref = model(x).logits
        method = default_methods(art)[index]
        with installed(method, model):
            got = model(x, past_key_values=cache_of(method), use_cache=True).logits
    assert rel_err(got, ref) <= 1e-4


@pytest.mark.parametrize("index", range(COUNT))
def test_cached_decode_equals_no_cache(arch_model, index):
    """Prefill 6 tokens, then one token at a time through the method's own cache: the logits of every step
    equal one forward over the whole sequence without a cache (and dense, at this budget)."""
    _, model, art = arch_model
    x = token_ids(length=16, seed=3)
    method = default_methods(art)[index]
    with torch.no_grad():
        dense = model(x).logits[:, 5:]
        with installed(method, model):
            whole = model(x).logits[:, 5:]
            cache = cache_of(method)
            out = model(x[:, :6], past_key_values=cache, use_cache=True)
            steps = [out.logits[:, -1]]
            for t in range(6, x.shape[1]):
                steps.append(model(x[:, t : t + 1], past_key_values=cache, use_cache=True).logits[:, -1])
    got = torch.stack(steps, dim=1)
    assert cache.get_seq_length() == x.shape[1]
    assert rel_err(got, whole) <= 1e-4 and rel_err(got, dense) <= 1e-4


@pytest.mark.parametrize("index", range(COUNT))
def test_left_padded_batch_equals_rows_alone(arch_model, index):
    """A left-padded row gives the logits of the same tokens run alone (positions as generate() sets them)."""
    _, model, art = arch_model
    x = token_ids(batch=2, length=14, seed=5)
    mask = torch.ones_like(x)
    mask[0, :4] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    method = default_methods(art)[index]
    # H2O evicts per head, which a padding mask cannot follow: it refuses padded batches with a cache
    # (test_h2o.py), so its attention path is checked here without one
    with torch.no_grad(), installed(method, model):
        cache = None if isinstance(method, H2O) else cache_of(method)
        batch = model(x, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=cache is not None).logits
        alone = model(x[:1, 4:], past_key_values=None if cache is None else cache_of(method), use_cache=cache is not None).logits
        full_row = model(x[1:]).logits
    assert torch.isfinite(batch).all()
    assert rel_err(batch[:1, 4:], alone) <= 1e-4
    assert rel_err(batch[1:], full_row) <= 1e-4


@pytest.mark.parametrize("index", range(COUNT))
def test_leaving_restores_the_model(full, index):
    _, model, art = full
    x = token_ids(batch=2)
    impl = model.config._attn_implementation
    with torch.no_grad():
        before = model(x).logits
        method = default_methods(art)[index]
        with method(model):
            assert model.config._attn_implementation == ATTN_NAME
            assert all(isinstance(getattr(m, HOOK_ATTR), AttentionHook) for m in attention_modules(model))
        after = model(x).logits
    assert model.config._attn_implementation == impl
    assert not any(hasattr(m, HOOK_ATTR) for m in attention_modules(model))
    assert torch.equal(before, after)
    with pytest.raises(ConfigError, match="not installed"):
        method.hooks


def test_installing_a_method_replaces_the_previous_one(full):
    _, model, art = full
    first, second = default_methods(art)[1], Dense()
    first(model)
    second(model)
    assert all(type(getattr(m, HOOK_ATTR)) is AttentionHook for m in attention_modules(model))
    first.remove()  # the replaced method leaves the live one alone
    assert all(type(getattr(m, HOOK_ATTR)) is AttentionHook for m in attention_modules(model))
    assert model.config._attn_implementation == ATTN_NAME
    second.remove()
    assert not any(hasattr(m, HOOK_ATTR) for m in attention_modules(model))
    assert model.config._attn_implementation != ATTN_NAME


def test_describe_names_every_column_the_harnesses_write(full):
    _, _, art = full
    for method in default_methods(art):
        about = method.describe()
        assert {"method", "k", "kv_dims", "h2o_budget"} <= set(about)
        assert about["method"] == method.name
