"""AquaDecode: the projected KV cache (one copy of the keys, projected once, dimension-major) and the decode
path on it: layout and bytes, the PyTorch path against a brute-force definition, page top-T with sinks and a
recent window, prefill="aqua" equal to decoding token by token, and (on a GPU) the fused kernels inside the
model against the PyTorch path."""

from __future__ import annotations

import pytest
import torch
from tiny_models import rel_err, tiny_model, token_ids
from transformers import DynamicCache

from aqua_cli.cost import cache_bytes
from aqua_cli.errors import ConfigError
from aqua_cli.methods import AquaDecode
from aqua_cli.methods.fused import page_keep


def stepwise(model, x, cache, prefill=6):
    with torch.no_grad():
        out = model(x[:, :prefill], past_key_values=cache, use_cache=True)
        logits = [out.logits[:, -1]]
        for t in range(prefill, x.shape[1]):
            logits.append(model(x[:, t : t + 1], past_key_values=cache, use_cache=True).logits[:, -1])
    return torch.stack(logits, dim=1)


def test_cache_holds_projected_keys_dim_major_once(full):
    _, model, art = full
    x = token_ids(batch=2, length=12)
    m = art.head_dim // 2
    with AquaDecode(art, k=1.0, kv_dims=m, max_tokens=12)(model) as method:
        cache = method.new_cache()
        with torch.no_grad():
            model(x, past_key_values=cache, use_cache=True)
    dense = DynamicCache()
    with torch.no_grad():
        model(x, past_key_values=dense, use_cache=True)
    layer, ref = cache.layers[0], dense.layers[0]
    assert layer.keys.shape == (2, art.num_groups, m, 64)  # max_tokens rounded up to a whole page
    expected = (ref.keys.float() @ art.projections[0][:, :, :m]).transpose(-1, -2)
    assert torch.allclose(layer.keys[..., :12].float(), expected, atol=1e-5)
    assert torch.equal(layer.values[:, :, :12], ref.values)
    got, full_bytes = cache_bytes(cache), cache_bytes(dense)  # per token held: 64 here, 12 there
    assert got["keys"] * 12 * art.head_dim == full_bytes["keys"] * 64 * m  # keys shrink to m/D: no second copy
    assert got["total"] * 12 * 2 * art.head_dim == full_bytes["total"] * 64 * (art.head_dim + m)  # (1 + m/D) / 2 of dense
    with pytest.raises(ConfigError, match="holds 12 tokens"):  # the page's spare slots are not a larger limit
        with torch.no_grad():
            model(x[:, :1], past_key_values=cache, use_cache=True)


def test_full_dims_generate_same_tokens(full):
    _, model, art = full
    x = token_ids(length=8)
    kw = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        ref = model.generate(x, **kw)
        for ratio in (None, 1.0):
            with AquaDecode(art, k=1.0, token_ratio=ratio, page=16)(model) as method:
                assert torch.equal(model.generate(x, past_key_values=method.new_cache(), **kw), ref)


def test_decode_step_matches_brute_force(full):
    """One decode step at k < D: dims chosen per KV group by sum |qP|, scores over those dims of the stored
    projected keys, softmax, values; recomputed here from the captured q, k, v of the layer."""
    _, model, art = full
    x = token_ids(length=10, seed=7)
    captured = {}
    method = AquaDecode(art, k=max(1, art.head_dim // 4))
    with method(model), torch.no_grad():
        cache = method.new_cache()
        model(x[:, :9], past_key_values=cache, use_cache=True)
        hook = method.hooks[0]
        original = hook._reference

        def spy(query, key, value, mask, scale):
            out = original(query, key, value, mask, scale)
            captured.update(q=query, kd=key, v=value, scale=scale, out=out)
            return out

        hook._reference = spy
        model(x[:, 9:], past_key_values=cache, use_cache=True)
        del hook._reference
    q, kd, v, scale, out = (captured[n] for n in ("q", "kd", "v", "scale", "out"))
    batch, hq, _, d = q.shape
    groups = kd.shape[1]
    rep = hq // groups
    proj = art.projections[0]
    expected = torch.empty(batch, 1, hq, d)
    for g in range(groups):
        qp = q[0, g * rep : (g + 1) * rep, 0].float() @ proj[g]  # (rep, D)
        dims = qp.abs().sum(0).topk(method.dims).indices
        for r in range(rep):
            scores = (qp[r, dims] @ kd[0, g, dims].float()) * scale
            expected[0, 0, g * rep + r] = scores.softmax(-1) @ v[0, g].float()
    assert rel_err(out.float(), expected) <= 1e-5


def test_sum_and_max_over_the_group_choose_differently():
    """The group rule sums |qP| over the group's heads: here a max would pick dim 0, the sum picks dim 1."""
    from aqua_cli.methods.fused import group_dims

    qp = torch.tensor([[9.0, 5.0, 0.0], [0.0, 5.0, 1.0]]).view(1, 1, 2, 1, 3)
    assert group_dims(qp, 1).flatten().tolist() == [False, True, False]


def test_page_keep_sinks_recent_and_budget():
    length, page = 64, 8
    visible = torch.ones(1, 1, 1, length, dtype=torch.bool)
    scores = torch.zeros(1, 1, 1, length)
    scores[..., 30] = 5.0  # page 3 is the best scored
    keep = page_keep(scores, visible, ratio=1 / 8, page=page, sinks=1, recent=1)[0, 0, 0]
    pages = keep.view(-1, page).all(-1).tolist()
    assert pages == [True, False, False, True, False, False, False, True]  # the sink, the best, the recent one
    keep = page_keep(scores, visible, ratio=4 / 8, page=page, sinks=0, recent=0)[0, 0, 0]
    assert int(keep.view(-1, page).all(-1).sum()) == 4 and bool(keep[30])
    half = visible.clone()
    half[..., 20:] = False  # a query that sees 20 keys: its recent page is page 2, and nothing past it is kept
    keep = page_keep(scores.masked_fill(~half, float("-inf")), half, ratio=1 / 8, page=page, sinks=1, recent=1)[0, 0, 0]
    assert keep[:8].all() and keep[16:20].all() and not keep[20:].any()


@pytest.mark.parametrize("score", [{}, {"page_score": "bound"}, {"page_score": "bound", "bound_page": 4},
                                   {"page_score": "bound", "rerank": 2}, {"key_planes": True},
                                   {"key_planes": True, "page_score": "bound", "rerank": 2}])
def test_prefill_aqua_equals_token_by_token_decoding(full, score):
    """prefill="aqua" scores every prompt position as its own decode step would: one forward gives the logits
    that decoding token by token through the cache gives (what makes it a quality measure of the decode path);
    for pages ranked by their bounds too (cumulative bounds of the page being written, as the cache keeps them)."""
    _, model, art = full
    x = token_ids(length=160, seed=9)
    kw = dict(k=max(1, art.head_dim // 2), token_ratio=1 / 8, page=16, sink_pages=1, recent_pages=1, **score)
    with torch.no_grad():
        with AquaDecode(art, prefill="aqua", query_chunk=7, **kw)(model) as method:
            whole = model(x, past_key_values=method.new_cache(), use_cache=True).logits[:, 5:]
        with AquaDecode(art, prefill="aqua", **kw)(model) as method:
            steps = stepwise(model, x, method.new_cache(), prefill=6)
        dense = model(x).logits[:, 5:]
    assert rel_err(whole, steps) <= 1e-4
    assert rel_err(whole, dense) > 1e-3  # and it is an approximation


def test_key_planes_cache_holds_float16_keys_in_two_byte_planes(full):
    """key_planes=True: the cache holds the projected keys as float16 byte planes (the same bytes as float16 keys),
    through prefill, decode steps and growth; dims only and exact attention read them whole (k = D and T = L stay
    exact), page top-T scores pages on their high plane, which differs from scoring float keys."""
    from aqua_cli.kernels.reference import key_planes, planes_keys

    _, model, art = full
    x = token_ids(batch=2, length=40, seed=4)
    with AquaDecode(art, k=1.0, key_planes=True)(model) as method:
        cache = method.new_cache()
        got = stepwise(model, x, cache, prefill=7)
    dense = DynamicCache()
    want = stepwise(model, x, dense, prefill=7)
    assert rel_err(got, want) <= 2e-3  # float16 keys
    layer, ref = cache.layers[0], dense.layers[0]
    assert layer.keys.dtype == torch.uint8 and layer.keys.shape[:3] == (2, art.num_groups, 2 * art.head_dim)
    expected = key_planes((ref.keys.float() @ art.projections[0]).transpose(-1, -2))
    assert (layer.keys[..., :40] == expected).float().mean() > 0.99  # float32 sums of other shapes: an ulp apart at most
    assert torch.allclose(planes_keys(layer.keys[..., :40]).float(), (ref.keys.float() @ art.projections[0]).transpose(-1, -2),
                          rtol=1e-3, atol=1e-3)
    kw = dict(k=max(1, art.head_dim // 2), token_ratio=1 / 8, page=16, sink_pages=1, recent_pages=1, prefill="aqua")
    y = token_ids(length=160, seed=9)
    with torch.no_grad():
        with AquaDecode(art, **kw)(model) as method:
            plain = model(y, past_key_values=method.new_cache(), use_cache=True).logits
        with AquaDecode(art, key_planes=True, **kw)(model) as method:
            planes = model(y, past_key_values=method.new_cache(), use_cache=True).logits
        with AquaDecode(art, key_planes=True, **{**kw, "token_ratio": 1.0})(model) as method:
            whole = model(y, past_key_values=method.new_cache(), use_cache=True).logits
    assert rel_err(planes, plain) > 1e-3  # a different page choice somewhere
    assert rel_err(whole, model(y).logits) <= 2e-3


def test_cache_keeps_the_bounds_of_its_keys(full):
    """page_score="bound": the cache keeps each sub-page's min and max of the projected keys through prefill,
    decode steps, growth, crop and batch reordering."""
    from aqua_cli.kernels.paged import page_bounds

    _, model, art = full
    with AquaDecode(art, k=0.5, token_ratio=1 / 4, page=16, page_score="bound", bound_page=8)(model) as method:
        cache = method.new_cache()
        stepwise(model, token_ids(batch=2, length=45), cache, prefill=13)

        def consistent():
            for layer in cache.layers:
                n = -(-layer.length // 8)
                assert torch.equal(layer.bounds[..., :n], page_bounds(layer.keys[..., : layer.length], 8))

        consistent()
        cache.crop(37)  # 37 tokens stay: sub-page 4 keeps 5 of its 8
        consistent()
        cache.batch_select_indices(torch.tensor([1]))
        consistent()
        assert AquaDecode(art, k=0.5)(model).new_cache().layers[0].bounds is None  # only where scoring needs them
        method.remove()


def test_capacity_grows_unless_fixed(full):
    _, model, art = full
    with AquaDecode(art, k=1.0, page=16)(model) as method:
        cache = method.new_cache()
        stepwise(model, token_ids(length=40), cache, prefill=20)
        assert cache.get_seq_length() == 40 and cache.layers[0].keys.shape[-1] >= 40
        fixed = AquaDecode(art, k=1.0, max_tokens=24)(model)
        with pytest.raises(ConfigError, match="holds 24 tokens"), torch.no_grad():
            stepwise(model, token_ids(length=30), fixed.new_cache(), prefill=20)
        fixed.remove()


@pytest.mark.parametrize("kwargs, needle", [
    ({"token_ratio": 1.5}, "outside"), ({"page": 24}, "power of two"), ({"sink_pages": -1}, "0 or more"),
    ({"max_tokens": 0}, "at least 1"), ({"prefill": "fast"}, "prefill"), ({"kv_dims": 0}, "kv-dims"),
    ({"page_score": "mean"}, "page score"), ({"page_score": "bound", "bound_page": 48}, "bound_page"),
    ({"bound_page": 16}, "bound_page and rerank apply"), ({"page_score": "bound", "rerank": -1}, "rerank must be"),
])
def test_bad_settings_are_refused(full, kwargs, needle):
    _, _, art = full
    with pytest.raises(ConfigError, match=needle):
        AquaDecode(art, **kwargs)


@pytest.mark.parametrize("arch", ["mistral", "gemma3"])
def test_sliding_window_models_are_refused(arch):
    from conftest import tiny_artifact

    model = tiny_model(arch)
    with pytest.raises(ConfigError, match="full-attention layers only"):
        AquaDecode(tiny_artifact(model, arch))(model)


def real_shape_gpu_model(head_scale: float = 1.0):
    """A 2-layer Llama with a real head_dim (128) and GQA 4, bf16 on the GPU, and its artifact (calibrated in
    float32 first); ``head_scale`` sharpens the LM head's logits. Skips without Triton."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from aqua_cli.kernels import triton_available
    from conftest import tiny_artifact

    if not triton_available():
        pytest.skip("needs Triton")
    config = LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=1, head_dim=128, max_position_embeddings=8192)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa").eval()
    art = tiny_artifact(model, "llama")
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    return model.to("cuda", torch.bfloat16), art


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and Triton")
@pytest.mark.parametrize("ratio, score", [(None, {}), (1 / 8, {}), (1 / 8, {"page_score": "bound", "bound_page": 16}),
                                          (1 / 16, {"page_score": "bound", "rerank": 3}), (None, {"key_planes": True}),
                                          (1 / 8, {"key_planes": True})])
def test_fused_kernels_in_the_model_match_the_pytorch_path(ratio, score):
    """bf16 on the GPU, a model with real head_dim (128) and GQA 4: decode steps through the fused kernels
    give the logits of the PyTorch path on the same cache, to bf16 tolerance. (With 1 recent page instead of
    the default 8 the page path measured 3.9e-2 here: near-tied pages of a random model chosen differently.)"""
    model, art = real_shape_gpu_model()
    x = torch.randint(3, 256, (2, 700), generator=torch.Generator().manual_seed(1)).cuda()
    logits = {}
    for kernels in (False, True):
        with AquaDecode(art, k=0.5, token_ratio=ratio, page=64, hybrid=False, kernels=kernels, **score)(model) as method:
            cache = method.new_cache()
            logits[kernels] = stepwise(model, x, cache, prefill=690).float()
            if score.get("page_score"):  # the decode launches folded each new token into the cache's bounds
                from aqua_cli.kernels.paged import page_bounds

                layer = cache.layers[0]
                sub = score.get("bound_page", 64)
                assert torch.equal(layer.bounds[..., : -(-700 // sub)], page_bounds(layer.keys[..., :700], sub))
    err = rel_err(logits[True], logits[False])
    assert err <= 2e-2, f"fused vs PyTorch path: rel err {err:.3g}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and Triton")
def test_fused_kernels_generate_dense_tokens_at_full_budget():
    """k = D on the GPU: ``generate()`` through the fused kernels (every decode step on the projected cache)
    gives dense's greedy tokens, bf16, head_dim 128, GQA 4. The LM head is scaled so that the greedy choice
    does not hang on a near-tie of a random model's logits (bf16 rounding of kP differs from k's)."""
    model, art = real_shape_gpu_model(head_scale=20.0)
    x = torch.randint(3, 256, (2, 300), generator=torch.Generator().manual_seed(1)).cuda()
    kw = {"max_new_tokens": 24, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        ref = model.generate(x, **kw)
        for ratio in (None, 1.0):
            with AquaDecode(art, k=1.0, token_ratio=ratio, hybrid=False)(model) as method:
                got = model.generate(x, past_key_values=method.new_cache(), **kw)
                assert sum(h.calls["kernel"] for h in method.hooks) > 0
            assert torch.equal(got, ref), (ratio, (got != ref).sum().item())


def test_launch_parameters_follow_the_measured_cases():
    """The full-dim kernel (exact fallback) and short dims steps get their measured launch parameters; top-T
    and long dims steps keep the defaults (docs/bench.md, 'What was tried')."""
    from aqua_cli.kernels.decode import DecodeConfig, select_width
    from aqua_cli.methods.fused import launch_for

    assert launch_for(128, 128, None, 1 << 20) == {"block_n": 64, "waves": 2.0}
    assert launch_for(64, 128, None, 4096) == {"block_n": 64}
    assert launch_for(64, 128, None, 65536) == {}
    assert launch_for(64, 128, 1 / 16, 4096) == {} and launch_for(128, 128, 1 / 16, 4096) == {}
    DecodeConfig(dims=128, **launch_for(128, 128, None, 4096))  # a valid config
    # the page-selection tile holds the free pages only: 2049 pages, 1 sink, 8 recent -> 2040 free -> 2048 wide
    assert select_width(2049, 1, 8) == 2048 and select_width(2049, 0, 0) == 4096
    assert select_width(10, 4, 8) == 16 and select_width(513, 1, 8) == 512


def test_a_deferred_token_write_lands_before_any_other_use():
    """On a GPU in half precision a decode step's token is left for the hook's first kernel to write; whatever
    else comes first (the PyTorch path, the next update, a crop, a batch reorder) writes it the ordinary way.
    Simulated on the CPU by giving the layer its half-precision basis."""
    from aqua_cli.methods.fused import DecodeState, ProjectedKVLayer

    gen = torch.Generator().manual_seed(0)
    proj = torch.linalg.qr(torch.randn(2, 16, 16, generator=gen))[0]
    layer = ProjectedKVLayer(proj, 16, DecodeState(defer_writes=True), max_tokens=64, page=16)
    rnd = lambda n: torch.randn(1, 2, n, 16, generator=gen).to(torch.bfloat16)  # noqa: E731
    layer.update(rnd(5), rnd(5))  # a prefill: written at once
    assert layer.deferred is None
    layer._basis_half = layer._basis.to(torch.bfloat16)  # what lazy_initialization builds on a GPU

    def written(pos, key, value):
        want = torch.einsum("bgd,gde->bge", key[:, :, 0].float(), proj).to(torch.bfloat16)
        return torch.allclose(layer.keys[..., pos].float(), want.float(), atol=3e-2) and torch.equal(layer.values[:, :, pos], value[:, :, 0])

    k1, v1 = rnd(1), rnd(1)
    keys, values = layer.update(k1, v1)
    assert layer.deferred is not None and keys.shape[-1] == 6 and not written(5, k1, v1)
    layer.flush()
    assert layer.deferred is None and written(5, k1, v1)
    k2, v2 = rnd(1), rnd(1)
    layer.update(k2, v2)
    layer.update(rnd(1), rnd(1))  # no hook took token 6: this update writes it first
    assert written(6, k2, v2) and layer.deferred is not None
    k4, v4 = rnd(1), rnd(1)
    layer.crop(-1)  # drops token 7 (deferred, written first), keeps 0..6
    assert layer.length == 7 and layer.deferred is None
    layer.update(k4, v4)
    layer.batch_select_indices(torch.tensor([0]))
    assert written(7, k4, v4)
    taken = (layer.update(rnd(1), rnd(1)), layer.take_deferred())[1]
    assert taken is not None and taken[2] == 8 and layer.deferred is None  # the hook now owns the write
