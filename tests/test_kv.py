"""The projected, truncated key cache: exact at m = D, then what m < D does (bytes, rank, selection)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_artifact
from tiny_models import rel_err, tiny_model, token_ids
from transformers import DynamicCache

from aqua_cli.budgets import parse_kv_dims
from aqua_cli.cost import cache_bytes, dense_bytes
from aqua_cli.methods import ProjectedKeyLayer, ProjectionHook, patch, patch_kv, projected_cache
from aqua_cli.errors import AquaError, ConfigError


def stepwise(model, x, cache=None, prefill=6):
    """Prefill ``prefill`` tokens, then decode one token at a time through the cache: logits per step."""
    with torch.no_grad():
        out = model(x[:, :prefill], past_key_values=cache if cache is not None else DynamicCache(), use_cache=True)
        cache, logits = out.past_key_values, [out.logits[:, -1]]
        for t in range(prefill, x.shape[1]):
            out = model(x[:, t : t + 1], past_key_values=cache, use_cache=True)
            logits.append(out.logits[:, -1])
    return torch.stack(logits), cache


# -- exactness -------------------------------------------------------------------------------------
def test_full_dims_prefill_equals_dense(full):
    _, model, art = full
    x = token_ids(batch=2)
    with torch.no_grad():
        ref = model(x).logits
        got = model(x, past_key_values=projected_cache(model, art, 1.0), use_cache=True).logits
    assert rel_err(got, ref) <= 1e-4


def test_full_dims_decode_equals_dense(full):
    _, model, art = full
    x = token_ids(length=14)
    ref, _ = stepwise(model, x)
    got, cache = stepwise(model, x, projected_cache(model, art, art.head_dim))
    assert rel_err(got, ref) <= 1e-4
    assert cache.get_seq_length() == x.shape[1]


def test_full_dims_generate_same_tokens(full):
    _, model, art = full
    x = token_ids(length=8)
    kw = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        ref = model.generate(x, **kw)
        got = model.generate(x, past_key_values=projected_cache(model, art, 1.0), **kw)
        with patch_kv(model, art, 1.0, k=1.0, mode="dynamic"):
            both = model.generate(x, past_key_values=projected_cache(model, art, 1.0), **kw)
    assert torch.equal(got, ref) and torch.equal(both, ref)


# -- what m < D does -------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_key_bytes_shrink_by_m_over_d(full, ratio):
    """Bytes from the tensors: keys shrink to m/D of dense, values are untouched."""
    _, model, art = full
    x = token_ids(batch=2, length=17)
    dense, proj = DynamicCache(), projected_cache(model, art, ratio)
    with torch.no_grad():
        model(x, past_key_values=dense, use_cache=True)
        model(x, past_key_values=proj, use_cache=True)
    d, p = cache_bytes(dense), cache_bytes(proj)
    m = parse_kv_dims(ratio, art.head_dim)
    assert p["keys"] * art.head_dim == d["keys"] * m
    assert p["values"] == d["values"]
    assert d["total"] == dense_bytes(model.config, 17, batch=2)
    assert proj.layers[0].keys.shape == (2, art.num_groups, 17, m)


def test_truncated_keys_equal_static_aqua_at_k_equals_m(full):
    """q . k_rec = (qP)[:m] . (kP)[:m]: the cache at m with dense attention is static AQUA at k = m."""
    _, model, art = full
    x = token_ids(batch=2)
    m = max(1, art.head_dim // 2)
    with torch.no_grad():
        got = model(x, past_key_values=projected_cache(model, art, m), use_cache=True).logits
        with patch(model, art, k=m, mode="static"):
            ref = model(x).logits
        dense = model(x).logits
    assert rel_err(got, ref) <= 1e-4
    assert rel_err(got, dense) > 1e-3  # and it is an approximation, not the dense model


def test_reconstruction_is_rank_m_projection():
    proj = torch.linalg.qr(torch.randn(2, 8, 8))[0]
    layer = ProjectedKeyLayer(proj, kv_dims=3)
    k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    rec, vals = layer.update(k, v)
    basis = proj[:, :, :3]
    expected = k @ basis @ basis.transpose(-1, -2)
    assert torch.allclose(rec, expected, atol=1e-5) and torch.equal(vals, v)
    rec2, _ = layer.update(k[:, :, :1], v[:, :, :1])  # decode appends in the projected basis
    assert rec2.shape == (1, 2, 6, 8) and torch.allclose(rec2[:, :, :5], expected, atol=1e-5)


def test_dynamic_selection_stays_within_kept_dims():
    """The hook's top-k is chosen among the first m projected dims, even where larger |qP| lie beyond."""
    d, m = 8, 4
    proj = torch.eye(d)[None]
    hook = ProjectionHook(proj, 2, "dynamic", kv_dims=m)
    q = torch.tensor([0.1, 0.5, 0.2, 0.4, 9.0, 9.0, 9.0, 9.0]).view(1, 1, 1, d)
    k = torch.ones(1, 1, 1, d)
    q2, k2 = hook.rewrite(torch.nn.Module(), q, k)
    assert torch.equal(q2.flatten().nonzero().flatten(), torch.tensor([1, 3]))
    assert bool((k2[..., m:] == 0).all())


# -- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, needle", [(0, "kv-dims"), (-3, "kv-dims"), (1.5, "kv-dims"), ("abc", "kv-dims"), (10**6, "head_dim")])
def test_bad_kv_dims(value, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_kv_dims(value, 64)


def test_cache_for_another_model_is_refused(full):
    arch, model, art = full
    other_arch = "llama" if arch != "llama" else "qwen2"
    other = tiny_model(other_arch)
    with pytest.raises(AquaError, match="calibrated for"):
        projected_cache(other, art, 0.5)
    cache = projected_cache(model, art, 0.5)
    with pytest.raises(ConfigError, match="built for"):
        cache.check_model(other.config)
    with pytest.raises(ConfigError, match="built for"), torch.no_grad():
        other(token_ids(), past_key_values=cache, use_cache=True)


@pytest.mark.parametrize("arch", ["mistral", "gemma3"])
def test_sliding_window_models_are_refused(arch):
    model = tiny_model(arch)
    art = tiny_artifact(model, arch)
    with pytest.raises(ConfigError, match="full-attention layers only"):
        projected_cache(model, art, 0.5)


def test_caches_refuse_a_layer_they_were_not_built_for(full):
    """Both projected caches (keys only, and AquaDecode's keys + values) name what they are and the fix when
    a model updates a layer beyond the artifact's (instead of an IndexError inside transformers) or gives keys
    of another shape."""
    from aqua_cli.methods import AquaDecode

    _, model, art = full
    k = torch.randn(1, art.num_groups, 3, art.head_dim)
    layers = len(art.projections)
    with pytest.raises(ConfigError, match=f"projected cache has {layers} layers .* updates layer {layers}: build the cache for this model"):
        projected_cache(model, art, 1.0).update(k, k, layers)
    with AquaDecode(art)(model) as method:
        with pytest.raises(ConfigError, match=f"projected KV cache has {layers} layers .* own AquaDecode"):
            method.new_cache().update(k, k, layers)
        wrong = torch.randn(1, art.num_groups, 3, art.head_dim * 2)  # another model's head dim
        with pytest.raises(ConfigError, match=f"this projected KV cache was built for {art.num_groups} KV heads of dim {art.head_dim}"):
            method.new_cache().update(wrong, wrong, 0)
    with pytest.raises(ConfigError, match=f"this projected cache was built for {art.num_groups} KV heads of dim {art.head_dim}"):
        projected_cache(model, art, 1.0).update(wrong, wrong, 0)
