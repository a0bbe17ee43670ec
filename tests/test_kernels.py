"""Fused AQUA kernels against the PyTorch reference (GPU, skipped without CUDA), and the reference itself
against dense attention and a brute-force definition (CPU)."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from aqua_cli.errors import ConfigError
from aqua_cli.kernels import triton_available
from aqua_cli.kernels.reference import (
    approx_logits,
    aqua_decode_reference,
    dense_decode,
    project_keys,
    project_queries,
    select_dims,
    select_tokens,
)

try:  # the hook moved to aqua_cli.methods
    from aqua_cli.methods import TopTokensHook
except ImportError:  # pragma: no cover
    from aqua_cli.kernels.reference import TopTokensHook


def orthogonal(groups: int, dim: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(groups, dim, dim, generator=g))[0]


def inputs(batch, heads, kv_heads, length, dim, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(batch, heads, dim, generator=g, device=device).to(dtype)
    k = torch.randn(batch, kv_heads, length, dim, generator=g, device=device).to(dtype)
    v = torch.randn(batch, kv_heads, length, dim, generator=g, device=device).to(dtype)
    proj = orthogonal(kv_heads, dim, seed).to(device)
    return q, k, v, proj, project_keys(k, proj)


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


# -- CPU: the reference ----------------------------------------------------------------------------------
@pytest.mark.parametrize("gqa", ["group", "head"])
def test_reference_full_dims_is_dense(gqa):
    q, k, v, proj, kd = inputs(2, 6, 2, 37, 16)
    assert rel(aqua_decode_reference(q, k, v, kd, proj, 16, gqa), dense_decode(q, k, v)) < 1e-5
    # every token kept: top-T is exact attention whatever the dims
    assert rel(aqua_decode_reference(q, k, v, kd, proj, 4, gqa, token_ratio=1.0, select_block=16), dense_decode(q, k, v)) < 1e-5


def test_reference_dims_match_brute_force():
    """Per-head selection = the paper's rule: each query head keeps its own top-k |qP| dims."""
    q, k, v, proj, kd = inputs(1, 4, 2, 23, 8, seed=3)
    out = aqua_decode_reference(q, k, v, kd, proj, 3, "head")
    for h in range(4):
        g = h // 2
        qp = q[0, h] @ proj[g]
        keep = qp.abs().topk(3).indices
        logits = (qp[keep] @ (k[0, g] @ proj[g])[:, keep].T) / math.sqrt(8)
        want = logits.softmax(-1) @ v[0, g]
        assert torch.allclose(out[0, h], want, atol=1e-5)


def test_select_dims_group_sums_abs_over_heads():
    qp = torch.tensor([[[[3.0, 0.1, -0.2, 0.0], [-3.0, 0.0, 0.3, 2.0]]]])  # (1, 1, G=2, D=4)
    idx, count, qsel = select_dims(qp, 2, "group")
    assert idx.tolist() == [[[0, 3]]] and count.tolist() == [[2]]
    assert qsel[0, 0].tolist() == [[3.0, 0.0], [-3.0, 2.0]]
    idx, count, qsel = select_dims(qp, 1, "head")  # head 0 -> dim 0, head 1 -> dim 0: union of one
    assert count.tolist() == [[1]] and idx[0, 0, 0] == 0


def test_select_tokens_keeps_block_share():
    scores = torch.tensor([[5.0, 1.0, 3.0, 2.0, 0.0, 9.0, float("-inf"), float("-inf")]])
    keep = select_tokens(scores, 6, ratio=0.5, block=4)  # block 0 keeps 2 of 4, block 1 keeps ceil(2*2/4)=1 of 2
    assert keep.tolist() == [[True, False, True, False, False, True, False, False]]


def test_topt_hook_on_tiny_model_runs_and_is_exact_at_full_budget():
    from tiny_models import tiny_model

    from aqua_cli.attention import HookedModel

    model = tiny_model("llama").eval()
    cfg = model.config
    kv_heads = cfg.num_key_value_heads
    dim = cfg.hidden_size // cfg.num_attention_heads
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(ids).logits
        proj = [orthogonal(kv_heads, dim, i) for i in range(cfg.num_hidden_layers)]
        with HookedModel(model, [TopTokensHook(p, dim, 1.0, select_block=16) for p in proj]):
            full = model(ids).logits
        with HookedModel(model, [TopTokensHook(p, max(1, dim // 2), 0.25, select_block=16) for p in proj]):
            sparse = model(ids).logits
    assert rel(full, dense) < 1e-4
    assert torch.isfinite(sparse).all() and rel(sparse, dense) > 1e-4


# -- GPU: kernels vs reference ---------------------------------------------------------------------------
gpu = pytest.mark.skipif(not triton_available(), reason="needs CUDA and Triton")
SHAPES = [  # (batch, q heads, kv heads, length, head_dim): Llama-like, odd lengths, MHA, long (int64 offsets), d=256
    (2, 32, 8, 4097, 128),
    (3, 9, 3, 777, 64),
    (1, 4, 4, 33, 64),
    (1, 8, 1, 70001, 128),
    (2, 16, 4, 1500, 256),
]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gqa", ["group", "head"])
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.75])
def test_dims_kernel_matches_reference(shape, gqa, ratio):
    from aqua_cli.kernels.decode import DecodeConfig, aqua_decode

    batch, heads, kv_heads, length, dim = shape
    q, k, v, proj, kd = inputs(batch, heads, kv_heads, length, dim, torch.bfloat16, "cuda", seed=length)
    dims = round(ratio * dim)
    ref = aqua_decode_reference(q, k, v, kd, proj, dims, gqa)
    out = aqua_decode(q, k, v, kd, proj, DecodeConfig(dims, gqa))
    assert torch.isfinite(out).all()
    assert rel(out, ref) < 2e-2


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ratio", [0.3, 0.5, 1.0])
def test_dims_stream_kernel_matches_reference(shape, ratio):
    """The balanced (stream-K) dims kernel: programs that cross KV groups, one to many programs a group, the
    partials merged in the launch or by the combine launch."""
    from aqua_cli.kernels.decode import DecodeConfig, _kp, aqua_decode, launch_dims_stream, launch_select_dims

    batch, heads, kv_heads, length, dim = shape
    q, k, v, proj, kd = inputs(batch, heads, kv_heads, length, dim, torch.bfloat16, "cuda", seed=length + 1)
    dims = round(ratio * dim)
    ref = aqua_decode_reference(q, k, v, kd, proj, dims)
    sel = launch_select_dims(q, proj, dims)
    stages = 2 if dim * _kp(dims) > 128 * 64 else 3
    for ctas in (0.05, 1, 2):
        for fuse in (True, False):
            out = launch_dims_stream(sel, kd, v, dim ** -0.5, num_stages=stages, ctas=ctas, full_rows=dims == _kp(dims),
                                     fuse=fuse)
            assert torch.isfinite(out).all() and rel(out, ref) < 2e-2, (ctas, fuse, rel(out, ref))
    out = aqua_decode(q, k, v, kd, proj, DecodeConfig(dims, stream=True))  # the step's own tile and stages
    assert torch.isfinite(out).all() and rel(out, ref) < 2e-2


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_dims_kernel_full_k_is_dense(shape):
    from aqua_cli.kernels.decode import DecodeConfig, aqua_decode

    batch, heads, kv_heads, length, dim = shape
    q, k, v, proj, kd = inputs(batch, heads, kv_heads, length, dim, torch.bfloat16, "cuda", seed=1)
    assert rel(aqua_decode(q, k, v, kd, proj, DecodeConfig(dim)), dense_decode(q, k, v)) < 2e-2


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("token_ratio,block", [(1 / 16, 512), (1 / 8, 128), (1.0, 64)])
def test_topt_kernel_matches_reference(shape, token_ratio, block):
    from aqua_cli.kernels.decode import DecodeConfig, aqua_decode

    batch, heads, kv_heads, length, dim = shape
    q, k, v, proj, kd = inputs(batch, heads, kv_heads, length, dim, torch.bfloat16, "cuda", seed=7)
    dims = dim // 2
    ref = aqua_decode_reference(q, k, v, kd, proj, dims, "group", token_ratio, block)
    out = aqua_decode(q, k, v, kd, proj, DecodeConfig(dims, "group", token_ratio, block))
    assert torch.isfinite(out).all()
    # near-ties in the approximate scores may swap a token or two between kernel and reference
    assert rel(out, ref) < 3e-2
    if token_ratio == 1.0:
        assert rel(out, dense_decode(q, k, v)) < 2e-2


@gpu
@pytest.mark.gpu
def test_select_kernel_picks_reference_tokens():
    from aqua_cli.kernels.decode import launch_select, pad_selection
    from aqua_cli.kernels.reference import approx_logits, project_queries

    q, k, v, proj, kd = inputs(2, 32, 8, 3000, 128, torch.bfloat16, "cuda", seed=5)
    qp = project_queries(q, proj).to(q.dtype)
    idx, count, qsel = select_dims(qp, 64, "group")
    sel, keep = launch_select(pad_selection(qsel, idx, count), kd, 1 / 16, 256)
    ref = select_tokens(approx_logits(qsel, idx, count, kd).amax(2) * 128 ** -0.5, 3000, 1 / 16, 256).view(16, -1)
    agree = 0
    for row in range(16):
        n_last = 3000 - 11 * 256
        valid = [sel[row, c * keep : c * keep + (keep if c < 11 else -(-n_last * keep // 256))] for c in range(12)]
        chosen = torch.cat(valid).long()
        mask = torch.zeros(3000, dtype=torch.bool, device="cuda")
        mask[chosen] = True
        assert chosen.unique().numel() == chosen.numel()
        agree += int((mask == ref[row]).all())
    assert agree >= 14  # a near-tie may differ in a row or two


@gpu
@pytest.mark.gpu
def test_hybrid_switches_to_dense_below_threshold():
    from aqua_cli.kernels import HybridDecode
    from aqua_cli.kernels.decode import DecodeConfig

    q, k, v, proj, kd = inputs(1, 8, 2, 100, 64, torch.bfloat16, "cuda")
    assert not HybridDecode(DecodeConfig(48)).uses_aqua(8, 1 << 20, 64)  # k = 0.75 never beat dense
    hyb = HybridDecode(DecodeConfig(32), min_seq={1: 1000, 8: 50})
    assert not hyb.uses_aqua(1, 100, 64) and hyb.uses_aqua(16, 100, 64)
    assert torch.equal(hyb(q, k, v, kd, proj), dense_decode(q, k, v))
    hyb.min_seq = {1: 1}
    assert rel(hyb(q, k, v, kd, proj), aqua_decode_reference(q, k, v, kd, proj, 32)) < 2e-2


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75, 1.0])
def test_fused_dim_selection_matches_topk_mass(shape, ratio):
    """The one-launch selection keeps a set with the same total sum_g |qP| as torch.topk (it may differ
    only on exact ties), ascending, with the projected q values at those dims."""
    from aqua_cli.kernels.decode import launch_select_dims
    from aqua_cli.kernels.reference import project_queries

    batch, heads, kv_heads, length, dim = shape
    q, k, v, proj, kd = inputs(batch, heads, kv_heads, 8, dim, torch.bfloat16, "cuda", seed=11 + length)
    dims = round(ratio * dim)
    qsel, idx, count = launch_select_dims(q, proj, dims)
    qp = project_queries(q, proj).to(q.dtype).float().flatten(0, 1)  # (B*Hkv, G, D)
    score = qp.abs().sum(1)
    chosen = idx[:, :dims].long()
    assert (count == dims).all()
    assert (chosen[:, 1:] > chosen[:, :-1]).all()
    got, want = score.gather(-1, chosen).sum(-1), score.topk(dims, -1).values.sum(-1)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    want_q = qp.gather(-1, chosen[:, None].expand(-1, qp.shape[1], -1))
    assert torch.allclose(qsel[..., :dims].float(), want_q, rtol=1e-2, atol=1e-2)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("fused", [True, False])
def test_kernel_selection_paths_agree(fused):
    from aqua_cli.kernels.decode import DecodeConfig, aqua_decode

    q, k, v, proj, kd = inputs(2, 32, 8, 5000, 128, torch.bfloat16, "cuda", seed=3)
    ref = aqua_decode_reference(q, k, v, kd, proj, 64)
    out = aqua_decode(q, k, v, kd, proj, DecodeConfig(64, fused_select=fused, block_n=128, num_warps=8))
    assert rel(out, ref) < 2e-2


@gpu
@pytest.mark.gpu
def test_decode_is_graph_capturable():
    from aqua_cli.kernels.decode import DecodeConfig, aqua_decode

    q, k, v, proj, kd = inputs(2, 32, 8, 3000, 128, torch.bfloat16, "cuda", seed=4)
    for cfg in (DecodeConfig(64), DecodeConfig(96), DecodeConfig(64, token_ratio=1 / 16)):
        eager = aqua_decode(q, k, v, kd, proj, cfg)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = aqua_decode(q, k, v, kd, proj, cfg)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.isfinite(out).all() and rel(out, eager) < 1e-3


# -- page top-T ------------------------------------------------------------------------------------------
def test_page_reference_helpers():
    from aqua_cli.kernels.paged import expand_pages, page_scores, pages_for, select_pages

    assert pages_for(1 / 16, 4096, 64) == 4 and pages_for(1 / 16, 100, 64) == 1 and pages_for(1.0, 100, 64) == 2
    s = torch.tensor([[1.0, 5.0, 2.0, 2.0, 7.0, float("-inf")]])
    ps = page_scores(s, 2)
    assert ps.tolist() == [[5.0, 2.0, 7.0]]
    mask = select_pages(torch.tensor([[3.0, 9.0, 3.0, 1.0]]), 2)  # tie 3.0: the lower index wins
    assert mask.tolist() == [[True, True, False, False]]
    assert expand_pages(mask, 2, 7).tolist() == [[True] * 4 + [False] * 3]
    from aqua_cli.kernels.paged import n_forced, select_pages_forced

    assert n_forced(5, 1, 1) == 2 and n_forced(2, 1, 3) == 2 and n_forced(4, 0, 0) == 0
    forced = select_pages_forced(torch.tensor([[0.0, 9.0, 8.0, 1.0, -5.0]]), 1, 1, 1)  # pages 0, 4 + the best other
    assert forced.tolist() == [[True, True, False, False, True]]


def test_page_reference_full_budget_is_dense():
    from aqua_cli.kernels.paged import aqua_decode_pages_reference

    q, k, v, proj, kd = inputs(2, 6, 2, 77, 16)
    assert rel(aqua_decode_pages_reference(q, k, v, kd, proj, 4, 1.0, 16), dense_decode(q, k, v)) < 1e-5


def test_top_pages_hook_is_exact_at_full_budget():
    from tiny_models import tiny_model

    from aqua_cli.attention import HookedModel
    from aqua_cli.kernels.paged import TopPagesHook

    model = tiny_model("llama").eval()
    cfg = model.config
    dim = cfg.hidden_size // cfg.num_attention_heads
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    proj = [orthogonal(cfg.num_key_value_heads, dim, i) for i in range(cfg.num_hidden_layers)]
    with torch.no_grad():
        dense = model(ids).logits
        with HookedModel(model, [TopPagesHook(p, dim, 1.0, page=16) for p in proj]):
            full = model(ids).logits
        with HookedModel(model, [TopPagesHook(p, max(1, dim // 2), 0.25, page=16) for p in proj]):
            sparse = model(ids).logits
    assert rel(full, dense) < 1e-4
    assert torch.isfinite(sparse).all() and rel(sparse, dense) > 1e-4


def test_page_bounds_bound_every_token_of_their_page():
    from aqua_cli.kernels.paged import bound_scores, page_bounds, page_scores

    q, k, v, proj, kd = inputs(2, 8, 2, 77, 16, seed=3)
    qp = project_queries(q, proj)
    idx, count, qsel = select_dims(qp, 5, "group")
    logits = approx_logits(qsel, idx, count, kd)  # (B, Hkv, G, L)
    bounds = page_bounds(kd, 16)
    assert bounds.shape == (2, 2, 2, 16, 5)
    assert torch.equal(bounds[..., 0, :, 4], kd[..., 64:].amin(-1)) and torch.equal(bounds[..., 1, :, 4], kd[..., 64:].amax(-1))
    bound = bound_scores(qsel, idx, count, bounds)  # (B, Hkv, G, NP)
    tight = page_scores(logits, 16)
    assert (bound >= tight - 1e-5).all() and (bound > tight + 1e-3).any()
    # pages of one token: the bound is the logit itself
    assert torch.allclose(bound_scores(qsel, idx, count, page_bounds(kd, 1)), logits, atol=1e-5)
    assert torch.equal(page_bounds(kd, 16, 70)[..., 4], page_bounds(kd[..., :70], 16)[..., 4])  # a shorter length


def test_bound_reference_full_budget_is_dense():
    from aqua_cli.kernels.paged import aqua_decode_pages_reference

    q, k, v, proj, kd = inputs(2, 6, 2, 77, 16)
    assert rel(aqua_decode_pages_reference(q, k, v, kd, proj, 4, 1.0, 16, scoring="bound"), dense_decode(q, k, v)) < 1e-5
    with pytest.raises(ConfigError):
        aqua_decode_pages_reference(q, k, v, kd, proj, 4, 0.5, 16, scoring="mean")


@pytest.mark.parametrize("scoring", ["max", "bound"])
def test_top_pages_hook_positions_match_decode_steps(scoring):
    """Each prefill position of the quality hook picks what a decode step over its prefix picks."""
    from aqua_cli.kernels.paged import TopPagesHook, aqua_decode_pages_reference

    batch, heads, kv_heads, length, dim, page = 1, 6, 2, 45, 16, 8
    q, k, v, proj, _ = inputs(batch, heads, kv_heads, length, dim, seed=5)
    query = torch.randn(batch, heads, length, dim, generator=torch.Generator().manual_seed(6))
    hook = TopPagesHook(proj, 5, 0.2, page=page, scoring=scoring)
    out, _ = hook.attend(torch.nn.Module(), query, k, v, None)  # (B, Q, Hq, D)
    for t in (0, 7, 8, 20, length - 1):
        kt, vt = k[:, :, : t + 1], v[:, :, : t + 1]
        ref = aqua_decode_pages_reference(query[:, :, t], kt, vt, project_keys(kt, proj), proj, 5, 0.2, page, scoring=scoring)
        assert rel(out[:, t], ref) < 1e-4, t


def _page_cases():
    return [(s, r, p) for s in SHAPES for r, p in ((1 / 16, 64), (1 / 8, 16), (1.0, 32))]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("shape,token_ratio,page", _page_cases())
def test_page_kernel_matches_reference(shape, token_ratio, page):
    from aqua_cli.kernels.decode import DecodeConfig, aqua_decode
    from aqua_cli.kernels.paged import aqua_decode_pages_reference

    batch, heads, kv_heads, length, dim = shape
    q, k, v, proj, kd = inputs(batch, heads, kv_heads, length, dim, torch.bfloat16, "cuda", seed=9)
    for dims in (dim // 2, 3 * dim // 8 + 1):  # a power of two and an odd k
        ref = aqua_decode_pages_reference(q, k, v, kd, proj, dims, token_ratio, page)
        out = aqua_decode(q, None, v, kd, proj, DecodeConfig(dims, token_ratio=token_ratio, granularity="pages", page=page))
        assert torch.isfinite(out).all()
        assert rel(out, ref) < 3e-2  # a near-tie of two page scores may swap a page
        if token_ratio == 1.0:
            assert rel(out, dense_decode(q, k, v)) < 2e-2
    # attention sinks and a recent window (the cache's defaults), and a softmax scale of the caller's
    ref = aqua_decode_pages_reference(q, k, v, kd, proj, dim // 2, token_ratio, page, sink_pages=1, recent_pages=2)
    out = aqua_decode(q, None, v, kd, proj, DecodeConfig(dim // 2, token_ratio=token_ratio, granularity="pages", page=page),
                      scale=dim ** -0.5, sink_pages=1, recent_pages=2)
    assert rel(out, ref) < 3e-2


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES)
def test_bound_kernels_match_reference(shape):
    """Pages ranked by their bounds: the scores, the step, and the decode write that folds the new token into the
    cache's bounds (which must then equal the bounds of the keys as written), eager and in a CUDA graph."""
    from aqua_cli.kernels.decode import DecodeConfig, aqua_decode, launch_bound_scores
    from aqua_cli.kernels.paged import aqua_decode_pages_reference, bound_scores, page_bounds, pool_pages

    batch, heads, kv_heads, length, dim = shape
    q, k, v, proj, kd = inputs(batch, heads, kv_heads, length, dim, torch.bfloat16, "cuda", seed=11)
    for dims, sub in ((dim // 2, 64), (3 * dim // 8 + 1, 64), (dim // 2, 16)):
        bnd = page_bounds(kd, sub)
        idx, count, qsel = select_dims(project_queries(q, proj).to(q.dtype), dims, "group")
        want = pool_pages(bound_scores(qsel, idx, count, bnd).amax(2).flatten(0, 1), 64 // sub)
        got = launch_bound_scores(q, proj, bnd, dims, 64, length, bound_page=sub)[0]
        assert (got - want).abs().max() <= 1e-2 * want.abs().max()
        cfg = DecodeConfig(dims, token_ratio=1 / 16, granularity="pages", page=64, page_score="bound", bound_page=sub)
        ref = aqua_decode_pages_reference(q, k, v, kd, proj, dims, 1 / 16, 64, sink_pages=1, recent_pages=2, scoring="bound",
                                          bound_page=sub)
        out = aqua_decode(q, None, v, kd, proj, cfg, sink_pages=1, recent_pages=2, bounds=bnd)
        assert torch.isfinite(out).all() and rel(out, ref) < 3e-2
        for rerank in (2, 4):  # candidates by bound, re-ranked by max
            ref = aqua_decode_pages_reference(q, k, v, kd, proj, dims, 1 / 16, 64, sink_pages=1, recent_pages=2,
                                              scoring="bound", bound_page=sub, rerank=rerank)
            rcfg = DecodeConfig(dims, token_ratio=1 / 16, granularity="pages", page=64, page_score="bound", bound_page=sub,
                                rerank=rerank)
            out = aqua_decode(q, None, v, kd, proj, rcfg, sink_pages=1, recent_pages=2, bounds=bnd)
            assert torch.isfinite(out).all() and rel(out, ref) < 3e-2, rerank
    with pytest.raises(ValueError, match="bounds"):
        aqua_decode(q, None, v, kd, proj, cfg)
    for pos in (length - 1, 64 * (length // 64)):  # into a page, onto a fresh page
        cap = 64 * (pos // 64 + 1)
        kdc = torch.zeros(batch, kv_heads, dim, cap, device="cuda", dtype=kd.dtype)
        vc = torch.zeros(batch, kv_heads, cap, dim, device="cuda", dtype=v.dtype)
        kdc[..., :pos], vc[:, :, :pos] = kd[..., :pos], v[:, :, :pos]
        bc = torch.full((batch, kv_heads, 2, dim, cap // 16), 9.0, device="cuda", dtype=kd.dtype)
        bc[..., : -(-pos // 16)] = page_bounds(kd[..., :pos], 16)
        kn, vn = torch.randn_like(q[:, :kv_heads]), torch.randn_like(q[:, :kv_heads])
        kdv, vv = kdc[..., : pos + 1], vc[:, :, : pos + 1]  # the views a cache passes: its first pos + 1 tokens
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = aqua_decode(q, None, vv, kdv, proj, cfg, bounds=bc, new_kv=(kn, vn, kdv, vv, pos))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(bc[..., : pos // 16 + 1], page_bounds(kdc[..., : pos + 1], 16)), pos
        ref = aqua_decode_pages_reference(q, kdc[..., : pos + 1].transpose(-1, -2) @ proj.transpose(-1, -2)[None].to(kd.dtype),
                                          vc[:, :, : pos + 1], kdc[..., : pos + 1], proj, cfg.dims, 1 / 16, 64, scoring="bound",
                                          bound_page=16)
        assert rel(out, ref) < 3e-2


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("page", [16, 64])
def test_page_scores_and_selection_match_reference(shape, page):
    """Pass 1's page scores equal the reference's on the same dims; pass 2's output equals exact attention
    over the reference selection made from the kernel's own scores (the same scores: no tie effects)."""
    from aqua_cli.kernels.decode import launch_pages, launch_page_scores, launch_select_dims
    from aqua_cli.kernels.paged import expand_pages, page_scores, pages_for, select_pages
    from aqua_cli.kernels.reference import approx_logits

    batch, heads, kv_heads, length, dim = shape
    q, k, v, proj, kd = inputs(batch, heads, kv_heads, length, dim, torch.bfloat16, "cuda", seed=21)
    dims, ratio = dim // 2 - 3, 1 / 8
    pscores, qf = launch_page_scores(q, proj, kd, dims, page, length)
    qsel, idx, count = launch_select_dims(q, proj, dims)
    rep = heads // kv_heads
    logits = approx_logits(qsel.view(batch, kv_heads, rep, -1), idx.view(batch, kv_heads, -1), count.view(batch, kv_heads), kd)
    want = page_scores(logits.amax(2), page).flatten(0, 1)
    assert torch.allclose(pscores, want, rtol=1e-2, atol=1e-2)
    keep = expand_pages(select_pages(pscores.view(batch, kv_heads, -1), pages_for(ratio, length, page)), page, length)
    exact = q.float().view(batch, kv_heads, rep, dim) @ k.float().transpose(-1, -2) * dim ** -0.5
    ref = (exact.masked_fill(~keep[:, :, None], float("-inf")).softmax(-1) @ v.float()).view(batch, heads, dim)
    out = launch_pages(q, proj, kd, v, dims, ratio, dim ** -0.5, page)
    assert rel(out, ref) < 2e-2


def _planes(k, proj):
    from aqua_cli.kernels.reference import key_planes

    return key_planes((k.float() @ proj[None].to(k.device)).transpose(-1, -2)).contiguous()


def test_key_planes_round_trip_and_high_plane():
    """Byte planes hold the float16 key exactly; the high plane alone is the key rounded to 2 mantissa bits
    (at most 1/8 relative error, to nearest), never infinite; planar caches are bounded and written as float ones."""
    from aqua_cli.kernels.decode import key_dim, write_new_kv
    from aqua_cli.kernels.paged import page_bounds, update_page_bounds
    from aqua_cli.kernels.reference import PLANE_MAX, key_planes, key_values, planes_keys, planes_score_keys

    x = torch.randn(2, 3, 16, 200, generator=torch.Generator().manual_seed(0)) * torch.logspace(-4, 5, 200)
    planes = key_planes(x)
    assert planes.dtype == torch.uint8 and planes.shape == (2, 3, 32, 200) and key_dim(planes) == 16
    want = x.clamp(-PLANE_MAX, PLANE_MAX).half()
    assert torch.equal(planes_keys(planes).view(torch.int16), want.view(torch.int16))
    high = planes_score_keys(planes).float()
    assert torch.isfinite(high).all()
    normal = want.float().abs() > 2 ** -14
    err = ((high - want.float()).abs() / want.float().abs())[normal]
    assert err.max() <= 0.125 + 1e-6 and err.mean() > 0.01  # coarse, but only to nearest
    assert torch.equal(torch.sign(high[normal]), torch.sign(want.float()[normal]))
    assert torch.equal(page_bounds(planes, 64), page_bounds(key_values(planes), 64))
    k_new, proj = torch.randn(2, 3, 16), torch.linalg.qr(torch.randn(3, 16, 16))[0]
    kd, v = planes.clone(), torch.zeros(2, 3, 200, 16)
    write_new_kv((k_new, torch.ones(2, 3, 16), kd, v, 130), proj)
    assert torch.equal(kd[..., :130], planes[..., :130]) and torch.equal(kd[..., 131:], planes[..., 131:])
    assert torch.allclose(planes_keys(kd)[..., 130].float(), torch.einsum("bhd,hde->bhe", k_new, proj), rtol=1e-3, atol=1e-4)
    bounds = page_bounds(planes, 64, 130)
    bounds = torch.cat([bounds, torch.zeros_like(bounds[..., :1])], -1)
    update_page_bounds(bounds, kd, 130, 64)
    assert torch.equal(bounds[..., :3], page_bounds(kd, 64, 131))


def test_key_planes_refused_where_not_read():
    """Token top-T and the prologue variant read float keys only: planes are refused with a clear error."""
    from aqua_cli.kernels.decode import DecodeConfig, aqua_decode

    q, k, v, proj, _ = inputs(1, 4, 2, 64, 32, torch.bfloat16)
    planes = _planes(k, proj)
    with pytest.raises(ValueError, match="planes"):
        aqua_decode(q, k, v, planes, proj, DecodeConfig(16, token_ratio=0.25))
    with pytest.raises(ValueError, match="planes"):
        aqua_decode(q, k, v, planes, proj, DecodeConfig(16, prologue=True))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES)
def test_key_planes_kernels_match_reference(shape):
    """Keys in byte planes: dims only, pages by max (scored on the high plane, as the reference does), pages by
    bound re-ranked, the page scores themselves, and the decode write of a new token into the planes (in a CUDA
    graph, with the bounds folded): each against its reference."""
    from aqua_cli.kernels.decode import DecodeConfig, aqua_decode, launch_page_scores, launch_select_dims
    from aqua_cli.kernels.paged import aqua_decode_pages_reference, page_bounds, page_scores
    from aqua_cli.kernels.reference import approx_logits, planes_keys, score_values

    batch, heads, kv_heads, length, dim = shape
    q, k, v, proj, kd = inputs(batch, heads, kv_heads, length, dim, torch.bfloat16, "cuda", seed=13)
    planes = _planes(k, proj)
    for dims in (dim // 2, 3 * dim // 8 + 1, dim):
        ref = aqua_decode_reference(q, k, v, kd, proj, dims)
        out = aqua_decode(q, k, v, planes, proj, DecodeConfig(dims))
        assert torch.isfinite(out).all() and rel(out, ref) < 2e-2, dims
        ref = aqua_decode_pages_reference(q, k, v, planes, proj, dims, 1 / 16, 64, sink_pages=1, recent_pages=2)
        cfg = DecodeConfig(dims, token_ratio=1 / 16, granularity="pages")
        out = aqua_decode(q, None, v, planes, proj, cfg, sink_pages=1, recent_pages=2)
        assert torch.isfinite(out).all() and rel(out, ref) < 3e-2, dims
    assert rel(aqua_decode(q, None, v, planes, proj, DecodeConfig(dim)), dense_decode(q, k, v)) < 2e-2
    dims, rep = dim // 2 - 3, heads // kv_heads
    pscores, _ = launch_page_scores(q, proj, planes, dims, 64, length)
    qsel, idx, count = launch_select_dims(q, proj, dims)
    logits = approx_logits(qsel.view(batch, kv_heads, rep, -1), idx.view(batch, kv_heads, -1), count.view(batch, kv_heads),
                           score_values(planes))
    assert torch.allclose(pscores, page_scores(logits.amax(2), 64).flatten(0, 1), rtol=1e-2, atol=1e-2)
    bnd = page_bounds(planes, 64)
    assert bnd.dtype == torch.float16
    ref = aqua_decode_pages_reference(q, k, v, planes, proj, dim // 2, 1 / 16, 64, sink_pages=1, recent_pages=2,
                                      scoring="bound", rerank=4)
    rcfg = DecodeConfig(dim // 2, token_ratio=1 / 16, granularity="pages", page_score="bound", rerank=4)
    assert rel(aqua_decode(q, None, v, planes, proj, rcfg, sink_pages=1, recent_pages=2, bounds=bnd), ref) < 3e-2
    pos = length - 1
    cap = 64 * (pos // 64 + 1)
    kdc = torch.zeros(batch, kv_heads, 2 * dim, cap, device="cuda", dtype=torch.uint8)
    vc = torch.zeros(batch, kv_heads, cap, dim, device="cuda", dtype=v.dtype)
    kdc[..., :pos], vc[:, :, :pos] = planes[..., :pos], v[:, :, :pos]
    bc = torch.full((batch, kv_heads, 2, dim, cap // 64), 9.0, device="cuda", dtype=torch.float16)
    bc[..., : -(-pos // 64)] = page_bounds(planes[..., :pos], 64)
    kn, vn = k[:, :, pos], v[:, :, pos]
    kdv, vv = kdc[..., : pos + 1], vc[:, :, : pos + 1]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = aqua_decode(q, None, vv, kdv, proj, rcfg, bounds=bc, new_kv=(kn, vn, kdv, vv, pos))
    graph.replay()
    torch.cuda.synchronize()
    got, want = planes_keys(kdc[..., pos : pos + 1]).float(), planes_keys(planes[..., pos : pos + 1]).float()
    assert (got - want).abs().max() <= 2e-3 * want.abs().max() and torch.equal(vc[:, :, pos], v[:, :, pos])
    assert torch.equal(bc[..., : pos // 64 + 1], page_bounds(kdc[..., : pos + 1], 64))
    ref = aqua_decode_pages_reference(q, k, v, kdc[..., : pos + 1], proj, dim // 2, 1 / 16, 64, scoring="bound", rerank=4)
    assert rel(out, ref) < 3e-2


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("planes", [False, True])
def test_page_kernel_reads_paged_layout(planes):
    """The same result from (B, Hkv, D, L) keys and from paged (B, Hkv, NP, D, page) keys + values (key planes:
    (B, Hkv, NP, 2D, page), a page's two planes one block)."""
    from aqua_cli.kernels.decode import launch_pages

    page, length = 32, 32 * 50
    q, k, v, proj, kd = inputs(2, 32, 8, length, 128, torch.bfloat16, "cuda", seed=2)
    if planes:
        kd = _planes(k, proj)
    kd_paged = kd.view(2, 8, kd.shape[2], 50, page).permute(0, 1, 3, 2, 4).contiguous()  # (B, Hkv, NP, D, page)
    v_paged = v.view(2, 8, 50, page, 128)
    flat = launch_pages(q, proj, kd, v, 64, 1 / 8, 128 ** -0.5, page)
    paged = launch_pages(q, proj, kd_paged, v_paged, 64, 1 / 8, 128 ** -0.5, page, length=length)
    assert rel(paged, flat) < 1e-3


@gpu
@pytest.mark.gpu
def test_page_decode_is_graph_capturable():
    from aqua_cli.kernels.decode import DecodeConfig, aqua_decode

    q, k, v, proj, kd = inputs(2, 32, 8, 3000, 128, torch.bfloat16, "cuda", seed=4)
    base = aqua_decode(q, None, v, kd, proj, DecodeConfig(64, token_ratio=1 / 16, granularity="pages"))
    for fold in (False, True):  # fold: the scoring pass's last program selects the pages (atomic counters)
        cfg = DecodeConfig(64, token_ratio=1 / 16, granularity="pages", fold_select=fold)
        eager = aqua_decode(q, None, v, kd, proj, cfg)
        assert rel(eager, base) < 1e-3
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = aqua_decode(q, None, v, kd, proj, cfg)
        for _ in range(2):  # replays reuse the counters: each run must leave them at zero
            out.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            assert torch.isfinite(out).all() and rel(out, eager) < 1e-3


@gpu
@pytest.mark.gpu
def test_programmatic_dependent_launch_changes_nothing_but_timing():
    """PDL (Hopper+) overlaps a kernel's launch with the previous one; every kernel waits before touching
    memory, so outputs are bit-identical to plain launches, eager and in a captured graph, on every path."""
    from aqua_cli.kernels.decode import DecodeConfig, aqua_decode, use_pdl

    if not use_pdl(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs compute capability 9 or later")
    from aqua_cli.kernels.paged import page_bounds

    q, k, v, proj, kd = inputs(2, 32, 8, 3001, 128, torch.bfloat16, "cuda", seed=5)
    bnd = page_bounds(kd, 64)
    for kw in (dict(dims=64), dict(dims=128), dict(dims=96), dict(dims=64, token_ratio=1 / 16),
               dict(dims=64, token_ratio=1 / 16, granularity="pages"), dict(dims=32, token_ratio=1 / 32, granularity="pages"),
               dict(dims=64, token_ratio=1 / 16, granularity="pages", page_score="bound")):
        plain = aqua_decode(q, k, v, kd, proj, DecodeConfig(**kw, pdl=False), sink_pages=1, recent_pages=2, bounds=bnd)
        cfg = DecodeConfig(**kw, pdl=True)
        assert torch.equal(aqua_decode(q, k, v, kd, proj, cfg, sink_pages=1, recent_pages=2, bounds=bnd), plain), kw
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = aqua_decode(q, k, v, kd, proj, cfg, sink_pages=1, recent_pages=2, bounds=bnd)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, plain), kw
    # the step's token written by the selection launch: the same cache and output
    kn, vn = torch.randn_like(q[:, :8]), torch.randn_like(q[:, :8])
    kdw, vw = kd.contiguous(), v.contiguous()
    runs = []
    for cfg in (DecodeConfig(64, pdl=False), DecodeConfig(64, pdl=True)):
        kdc, vc = kdw.clone(), vw.clone()
        runs.append((aqua_decode(q, None, vc, kdc, proj, cfg, new_kv=(kn, vn, kdc, vc, 3000)), kdc, vc))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_programmatic_dependent_launch_only_where_it_exists(monkeypatch):
    from aqua_cli.kernels.decode import use_pdl

    assert use_pdl(torch.device("cpu")) is False and use_pdl(torch.device("cpu"), True) is False
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_pdl(torch.device("cuda")) is False  # the interpreter has no grid dependency control
    monkeypatch.delenv("TRITON_INTERPRET")
    assert use_pdl(torch.device("cuda"), False) is False


# -- CPU: the kernels under Triton's interpreter ---------------------------------------------------------
INTERP_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_kernels import inputs, rel
from aqua_cli.kernels import decode as dk
from aqua_cli.kernels.reference import aqua_decode_reference, project_queries, select_dims
from aqua_cli.kernels.paged import aqua_decode_pages_reference, bound_scores, page_bounds, pool_pages, update_page_bounds
for b, hq, hk, L, D in [(1, 4, 2, 100, 64), (2, 6, 3, 77, 32)]:
    q, k, v, proj, kd = inputs(b, hq, hk, L, D, torch.bfloat16, "cpu", seed=L)
    for dims in (1, D - 1, D):  # selection edge cases
        idx = dk.launch_select_dims(q, proj, dims)[1][:, :dims]
        ref_idx = select_dims(project_queries(q, proj).to(q.dtype), dims, "group")[0].flatten(0, 1)
        assert torch.equal(idx, ref_idx), (dims, idx, ref_idx)
    for dims in (D // 2, 3 * D // 4 - 1):
        idx = dk.launch_select_dims(q, proj, dims)[1][:, :dims]
        ref_idx = select_dims(project_queries(q, proj).to(q.dtype), dims, "group")[0].flatten(0, 1)
        assert torch.equal(idx, ref_idx), (idx, ref_idx)
        ref = aqua_decode_reference(q, k, v, kd, proj, dims)
        assert rel(dk.aqua_decode(q, k, v, kd, proj, dk.DecodeConfig(dims, block_n=32)), ref) < 3e-2
        assert rel(dk.aqua_decode(q, k, v, kd, proj, dk.DecodeConfig(dims, block_n=32, prologue=True)), ref) < 3e-2
        ref = aqua_decode_pages_reference(q, k, v, kd, proj, dims, 1 / 4, 16)
        for fold in (False, True):
            cfg = dk.DecodeConfig(dims, token_ratio=1 / 4, granularity="pages", page=16, score_block=32, fold_select=fold)
            assert rel(dk.aqua_decode(q, None, v, kd, proj, cfg), ref) < 3e-2
            ref2 = aqua_decode_pages_reference(q, k, v, kd, proj, dims, 1 / 8, 16, sink_pages=1, recent_pages=1)
            out2 = dk.aqua_decode(q, None, v, kd, proj, dk.DecodeConfig(dims, token_ratio=1 / 8, granularity="pages", page=16,
                                  score_block=32, fold_select=fold), sink_pages=1, recent_pages=1)
            assert rel(out2, ref2) < 3e-2
        # pages ranked by their bounds (of whole pages, of quarter pages): the scores, then the whole step
        for sub in (16, 4):
            bnd = page_bounds(kd, sub)
            idx_r, cnt_r, qsel_r = select_dims(project_queries(q, proj).to(q.dtype), dims, "group")
            want_ps = pool_pages(bound_scores(qsel_r, idx_r, cnt_r, bnd).amax(2).flatten(0, 1), 16 // sub)
            got_ps = dk.launch_bound_scores(q, proj, bnd, dims, 16, L, block=8, bound_page=sub)[0]
            assert (got_ps - want_ps).abs().max() <= 1e-2 * want_ps.abs().max(), (got_ps, want_ps)  # casts truncate here
            ref = aqua_decode_pages_reference(q, k, v, kd, proj, dims, 1 / 4, 16, scoring="bound", sink_pages=1,
                                              recent_pages=1, bound_page=sub)
            cfg = dk.DecodeConfig(dims, token_ratio=1 / 4, granularity="pages", page=16, page_score="bound", bound_block=8,
                                  bound_page=sub)
            assert rel(dk.aqua_decode(q, None, v, kd, proj, cfg, sink_pages=1, recent_pages=1, bounds=bnd), ref) < 3e-2
            # the 2 x budget best by bound, re-ranked by their tokens' max score
            ref = aqua_decode_pages_reference(q, k, v, kd, proj, dims, 1 / 4, 16, scoring="bound", sink_pages=1,
                                              recent_pages=1, bound_page=sub, rerank=2)
            cfg = dk.DecodeConfig(dims, token_ratio=1 / 4, granularity="pages", page=16, page_score="bound", bound_block=8,
                                  bound_page=sub, rerank=2)
            assert rel(dk.aqua_decode(q, None, v, kd, proj, cfg, sink_pages=1, recent_pages=1, bounds=bnd), ref) < 3e-2
# keys in float16 byte planes: dims, pages scored on the high plane, re-rank, and the decode write into the planes
from aqua_cli.kernels.reference import key_planes, planes_keys
for b, hq, hk, L, D in [(1, 4, 2, 100, 64), (2, 6, 3, 77, 32)]:
    q, k, v, proj, kd = inputs(b, hq, hk, L, D, torch.bfloat16, "cpu", seed=L + 3)
    kp = key_planes((k.float() @ proj[None]).transpose(-1, -2)).contiguous()
    for dims in (D // 2, 3 * D // 4 - 1):
        assert rel(dk.aqua_decode(q, k, v, kp, proj, dk.DecodeConfig(dims, block_n=32)),
                   aqua_decode_reference(q, k, v, kd, proj, dims)) < 3e-2
        ref = aqua_decode_pages_reference(q, k, v, kp, proj, dims, 1 / 4, 16, sink_pages=1, recent_pages=1)
        cfg = dk.DecodeConfig(dims, token_ratio=1 / 4, granularity="pages", page=16, score_block=32)
        assert rel(dk.aqua_decode(q, None, v, kp, proj, cfg, sink_pages=1, recent_pages=1), ref) < 3e-2
        ref = aqua_decode_pages_reference(q, k, v, kp, proj, dims, 1 / 4, 16, scoring="bound", sink_pages=1, recent_pages=1,
                                          rerank=2)
        cfg = dk.DecodeConfig(dims, token_ratio=1 / 4, granularity="pages", page=16, page_score="bound", bound_block=8, rerank=2)
        assert rel(dk.aqua_decode(q, None, v, kp, proj, cfg, sink_pages=1, recent_pages=1, bounds=page_bounds(kp, 16)), ref) < 3e-2
    for cfg in (dk.DecodeConfig(D // 2, block_n=32), dk.DecodeConfig(D // 2, token_ratio=1 / 4, granularity="pages", page=16)):
        want_kd, want_v = kp.clone(), v.clone()
        dk.write_new_kv((k[:, :, -1], v[:, :, -1], want_kd, want_v, L - 1), proj)
        ref = dk.aqua_decode(q, None, want_v, want_kd, proj, cfg)
        got_kd, got_v = kp.clone(), v.clone()
        got_kd[..., -1] = 0
        out = dk.aqua_decode(q, None, got_v, got_kd, proj, cfg, new_kv=(k[:, :, -1], v[:, :, -1], got_kd, got_v, L - 1))
        assert (planes_keys(got_kd).float() - planes_keys(want_kd).float()).abs().max() <= 2e-2 and rel(out, ref) < 1e-2
# the new token folded into its page's bounds by the same launch (on a fresh page at L = 49; sub-pages of 8 at L = 70)
for b, hq, hk, L, D, sub in [(2, 4, 2, 70, 64, 16), (1, 8, 1, 49, 32, 16), (2, 4, 2, 70, 64, 8)]:
    q, k, v, proj, kd = inputs(b, hq, hk, L, D, torch.bfloat16, "cpu", seed=L + 2)
    cfg = dk.DecodeConfig(D // 2, token_ratio=1 / 4, granularity="pages", page=16, page_score="bound", bound_page=sub)
    want_kd, want_v = kd.clone(), v.clone()
    dk.write_new_kv((k[:, :, -1], v[:, :, -1], want_kd, want_v, L - 1), proj)
    want_bnd = page_bounds(want_kd, sub)
    ref = dk.aqua_decode(q, None, want_v, want_kd, proj, cfg, bounds=want_bnd)
    got_kd, got_v = kd.clone(), v.clone()
    got_kd[..., -1] = 0
    got_bnd = torch.full_like(want_bnd, 7.0)  # a fresh page's stale values must not survive
    got_bnd[..., : -(-(L - 1) // sub)] = page_bounds(kd[..., : L - 1], sub)
    py_bnd = got_bnd.clone()
    update_page_bounds(py_bnd, want_kd, L - 1, sub)
    assert torch.equal(py_bnd, want_bnd)
    out = dk.aqua_decode(q, None, got_v, got_kd, proj, cfg, new_kv=(k[:, :, -1], v[:, :, -1], got_kd, got_v, L - 1), bounds=got_bnd)
    assert (got_bnd.float() - want_bnd.float()).abs().max() <= 2e-2
    assert rel(out, ref) < 1e-2, rel(out, ref)
# the step's new token written by the dim-selection launch (new_kv): the same cache and output as writing it first
for b, hq, hk, L, D in [(2, 4, 2, 70, 64), (1, 8, 1, 50, 32)]:
    q, k, v, proj, kd = inputs(b, hq, hk, L, D, torch.bfloat16, "cpu", seed=L + 1)
    for cfg in (dk.DecodeConfig(D // 2, block_n=32), dk.DecodeConfig(D, block_n=32),
                dk.DecodeConfig(D // 2, block_n=32, stream=True, stream_ctas=0.25),
                dk.DecodeConfig(D // 2, block_n=32, prologue=True), dk.DecodeConfig(D, block_n=32, prologue=True),
                dk.DecodeConfig(D // 2, token_ratio=1 / 4, granularity="pages", page=16, score_block=32)):
        want_kd, want_v = kd.clone(), v.clone()
        dk.write_new_kv((k[:, :, -1], v[:, :, -1], want_kd, want_v, L - 1), proj)
        ref = dk.aqua_decode(q, None, want_v, want_kd, proj, cfg)
        got_kd, got_v = kd.clone(), v.clone()
        got_kd[..., -1] = 0
        got_v[:, :, -1] = 0
        out = dk.aqua_decode(q, None, got_v, got_kd, proj, cfg, new_kv=(k[:, :, -1], v[:, :, -1], got_kd, got_v, L - 1))
        assert torch.equal(got_v, want_v) and (got_kd.float() - want_kd.float()).abs().max() <= 2e-2, cfg
        assert rel(out, ref) < 1e-2, (cfg, rel(out, ref))
# dims only balanced to the block (stream-K): programs spanning 1-3 KV groups or a part of one, merged in the launch
# or by the combine launch, bf16 keys and key planes
for b, hq, hk, L, D in [(2, 6, 3, 77, 32), (1, 4, 4, 33, 32)]:
    q, k, v, proj, kd = inputs(b, hq, hk, L, D, torch.bfloat16, "cpu", seed=L + 4)
    sel = dk.launch_select_dims(q, proj, D // 2)
    want = dk.launch_dims(sel, kd, v, D ** -0.5, block_n=32, full_rows=True)
    assert rel(want, aqua_decode_reference(q, k, v, kd, proj, D // 2)) < 3e-2
    for ctas in (0.125, 0.25, 1, 8):  # 1, 2, 8 and 64 programs (8 "SMs" under the interpreter)
        for fuse in (True, False):
            out = dk.launch_dims_stream(sel, kd, v, D ** -0.5, block_n=32, ctas=ctas, full_rows=True, fuse=fuse)
            assert rel(out, want) < 1e-2, (ctas, fuse, rel(out, want))
    sel = dk.launch_select_dims(q, proj, 3 * D // 4 - 1)  # k not a power of two: masked rows
    out = dk.launch_dims_stream(sel, kd, v, D ** -0.5, block_n=32, ctas=0.25)
    assert rel(out, aqua_decode_reference(q, k, v, kd, proj, 3 * D // 4 - 1)) < 3e-2
    kp = key_planes(kd.float())
    out = dk.launch_dims_stream(dk.launch_select_dims(q, proj, D // 2), kp, v, D ** -0.5, block_n=32, ctas=0.25, full_rows=True)
    assert rel(out, dk.launch_dims(dk.launch_select_dims(q, proj, D // 2), kp, v, D ** -0.5, block_n=32, full_rows=True)) < 1e-2
from aqua_cli.kernels.paged import n_forced, select_pages_forced
for n_pages, keep, sinks, recent in [(1, 1, 1, 1), (7, 2, 0, 0), (50, 5, 1, 2), (300, 19, 4, 4), (64, 60, 1, 1), (33, 1, 0, 33), (33, 3, 40, 2),
                                      (20, 2, 3, 30), (18, 5, 1, 1), (40, 40, 2, 3)]:
    scores = torch.randn(3, n_pages).mul(20).float()  # distinct scores: the selection is unique
    n_sel = min(n_pages, keep + n_forced(n_pages, sinks, recent))
    chosen = torch.full((3, n_sel), -1, dtype=torch.int32)
    nfull = torch.empty(3, dtype=torch.int32)
    npp = dk.select_width(n_pages, sinks, recent)
    dk._page_select_kernel[(3,)](scores, chosen, nfull, n_pages, n_sel, n_pages * 16 - 5, sinks, recent, PAGE=16, NPP=npp, GDC=0)
    want = select_pages_forced(scores, keep, sinks, recent)
    got = torch.zeros_like(want).scatter_(1, chosen.long(), True)
    assert torch.equal(got, want) and bool((chosen.diff(dim=1) > 0).all()), (n_pages, keep, chosen, want.nonzero())
    assert torch.equal(nfull, got[:, : n_pages - 1].sum(1).int())  # the last page holds 11 of 16 tokens
print("INTERPRETER OK")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs the triton package (no GPU)")
def test_kernels_under_triton_interpreter():
    """The fused dims and page kernels on the CPU through ``TRITON_INTERPRET=1`` (tiny shapes, ~10 s):
    kernel logic is checked on machines without a GPU. (Under the interpreter dots run in float32 and
    float32 -> bf16 casts truncate, hence the looser bound.)"""
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests = str(Path(__file__).parent)
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", INTERP_SCRIPT.format(tests=tests)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "INTERPRETER OK" in proc.stdout, proc.stderr[-3000:]
