"""AQUA's math recomputed by hand, in loops over rows, heads and groups (small shapes, fast): which dims a
query keeps (per head, and per KV group by the SUM of |qP| over the group's heads), what static and
dynamic attention compute, the calibration basis, and cached decoding against full prefill at k < d."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import rel_err, tiny_model, token_ids
from transformers import DynamicCache

from aqua_cli.attention import HookedModel
from aqua_cli.calibration import GramAccumulator, accumulate, eigenbasis
from aqua_cli.kernels import reference
from aqua_cli.methods import H2O, Aqua, AquaKV, AttentionHook, ProjectionHook, TopTokens, select_dims


def orthogonal(groups: int, dim: int, seed: int = 0) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(groups, dim, dim, generator=torch.Generator().manual_seed(seed)))[0]


def top_by_hand(values: list[float], k: int) -> list[int]:
    """Indices of the k largest values (no ties in these tests), ascending."""
    return sorted(sorted(range(len(values)), key=lambda i: -values[i])[:k])


# -- which dims: per head ------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3, 7])
def test_dynamic_dims_by_hand_per_head(k):
    """aqua.select_dims, dynamic: every (row, head, position) keeps its own k largest |qP|, values as they were."""
    q = torch.randn(2, 3, 2, 5, 8, generator=torch.Generator().manual_seed(k))  # (B, G, rep, S, D)
    got = select_dims(q, k, "dynamic")
    for index in torch.cartesian_prod(*(torch.arange(n) for n in q.shape[:-1])):
        row = q[tuple(index)]
        keep = top_by_hand(row.abs().tolist(), k)
        want = torch.zeros_like(row)
        want[keep] = row[keep]
        assert torch.equal(got[tuple(index)], want), (tuple(index.tolist()), keep)


def test_static_dims_are_the_first_k_whatever_the_magnitudes():
    q = torch.tensor([[0.1, 0.2, 9.0, -8.0, 7.0]])
    assert torch.equal(select_dims(q, 2, "static"), torch.tensor([[0.1, 0.2, 0.0, 0.0, 0.0]]))
    assert torch.equal(select_dims(q, 2, "dynamic"), torch.tensor([[0.0, 0.0, 9.0, -8.0, 0.0]]))
    budgets = torch.tensor([1, 3])  # per-row budgets (a tensor broadcasting against q.shape[:-1]): same rules
    two = q.expand(2, 5)
    assert torch.equal(select_dims(two, budgets, "static"), torch.tensor([[0.1, 0, 0, 0, 0], [0.1, 0.2, 9.0, 0, 0]]))
    assert torch.equal(select_dims(two, budgets, "dynamic"), torch.tensor([[0, 0, 9.0, 0, 0], [0, 0, 9.0, -8.0, 7.0]]))


# -- which dims: per KV group (the kernels' rule) ------------------------------------------------------
@pytest.mark.parametrize("k", [1, 5, 15])
def test_group_dims_by_hand_sum_over_heads(k):
    """reference.select_dims, group: per (row, KV head) the k dims with the largest sum over the group's
    query heads of |qP|, ascending; qsel holds every head's qP at those dims; count = k."""
    qp = torch.randn(2, 3, 4, 16, generator=torch.Generator().manual_seed(k))  # (B, Hkv, G, D)
    idx, count, qsel = reference.select_dims(qp, k, "group")
    assert idx.dtype == torch.int32 and count.tolist() == [[k] * 3] * 2
    for b in range(2):
        for g in range(3):
            score = [sum(abs(float(qp[b, g, h, d])) for h in range(4)) for d in range(16)]
            keep = top_by_hand(score, k)
            assert idx[b, g].tolist() == keep
            for h in range(4):
                assert qsel[b, g, h].tolist() == [float(qp[b, g, h, d]) for d in keep]


def test_group_selection_is_the_sum_not_the_max_over_heads():
    """Head 0 alone would pick dim 0 (5.0 is the largest |qP| of the group), but the group's SUM is
    larger on dim 1 (3.0 + 3.0 = 6.0 > 5.0 + 0.1): the kernels' rule keeps dim 1."""
    qp = torch.tensor([[[[5.0, 3.0, 0.2, 0.0], [0.1, -3.0, 0.0, 0.3]]]])  # (1, 1, G=2, D=4)
    idx, count, qsel = reference.select_dims(qp, 1, "group")
    assert idx.tolist() == [[[1]]] and count.tolist() == [[1]]
    assert qsel[0, 0].tolist() == [[3.0], [-3.0]]
    idx, _, _ = reference.select_dims(qp, 2, "group")  # sums 5.1, 6.0, 0.2, 0.3; maxima 5, 3, 0.2, 0.3
    assert idx.tolist() == [[[0, 1]]]


def test_head_selection_by_hand_union_and_zeros():
    """gqa='head': each head its own top-k; the group reads the union, a head is zero outside its own set."""
    qp = torch.randn(1, 2, 3, 8, generator=torch.Generator().manual_seed(5))
    idx, count, qsel = reference.select_dims(qp, 2, "head")
    for g in range(2):
        own = [top_by_hand(qp[0, g, h].abs().tolist(), 2) for h in range(3)]
        union = sorted(set().union(*own))
        assert count[0, g] == len(union) and idx[0, g, : len(union)].tolist() == union
        for h in range(3):
            for slot, d in enumerate(union):
                want = float(qp[0, g, h, d]) if d in own[h] else 0.0
                assert float(qsel[0, g, h, slot]) == want


def test_decode_reference_group_rule_by_hand():
    """aqua_decode_reference (group): softmax over the group-selected dims of (qP)·(kP), times v, by hand."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(1, 4, 8, generator=gen), torch.randn(1, 2, 11, 8, generator=gen), torch.randn(1, 2, 11, 8, generator=gen)
    proj = orthogonal(2, 8, 1)
    out = reference.aqua_decode_reference(q, k, v, reference.project_keys(k, proj), proj, 3, "group")
    for g in range(2):
        qp = [q[0, 2 * g + r] @ proj[g] for r in range(2)]
        keep = top_by_hand([sum(abs(float(x[d])) for x in qp) for d in range(8)], 3)
        kp = k[0, g] @ proj[g]
        for r in range(2):
            logits = (qp[r][keep] @ kp[:, keep].T) / math.sqrt(8)
            assert torch.allclose(out[0, 2 * g + r], logits.softmax(-1) @ v[0, g], atol=1e-5)


# -- what static and dynamic compute -------------------------------------------------------------------
def hand_scores(query, key, proj, k, mode):
    """(B, Hq, S, L) dot products over the kept dims of qP, one (row, head, position) at a time."""
    batch, heads, seq, dim = query.shape
    groups = key.shape[1]
    out = torch.zeros(batch, heads, seq, key.shape[2])
    for b in range(batch):
        for h in range(heads):
            g = h // (heads // groups)
            kp = key[b, g] @ proj[g]
            for t in range(seq):
                qp = query[b, h, t] @ proj[g]
                keep = list(range(k)) if mode == "static" else top_by_hand(qp.abs().tolist(), k)
                out[b, h, t] = kp[:, keep] @ qp[keep]
    return out


def test_hook_scores_static_and_dynamic_by_hand():
    """The hook's rewritten q·k equal the hand-computed dot products over the kept dims, and static and
    dynamic differ (so a hook that ran the wrong mode fails here)."""
    gen = torch.Generator().manual_seed(0)
    query, key = torch.randn(2, 4, 3, 8, generator=gen), torch.randn(2, 2, 5, 8, generator=gen)
    proj = orthogonal(2, 8, 3)
    got = {}
    for mode in ("static", "dynamic"):
        q2, k2 = ProjectionHook(proj, 3, mode).rewrite(torch.nn.Module(), query, key)
        got[mode] = q2 @ k2.repeat_interleave(2, dim=1).transpose(-1, -2)
        assert torch.allclose(got[mode], hand_scores(query, key, proj, 3, mode), atol=1e-5)
    assert rel_err(got["static"], got["dynamic"]) > 0.1


def test_dynamic_hook_is_not_static():
    """With P = I the kept coordinates are those of q itself: the largest |q| sit in the LAST dims, so a
    dynamic hook keeps those and zeroes the first ones (a hook that ran static would do the opposite)."""
    d = 8
    hook = ProjectionHook(torch.eye(d)[None], 3, "dynamic")
    q = torch.tensor([0.1, -0.2, 0.3, 0.1, 0.2, 4.0, -5.0, 6.0]).view(1, 1, 1, d)
    q2, k2 = hook.rewrite(torch.nn.Module(), q, torch.ones(1, 1, 1, d))
    assert q2.flatten().nonzero().flatten().tolist() == [5, 6, 7]
    assert torch.equal(q2.flatten()[5:], q.flatten()[5:]) and torch.equal(k2, torch.ones(1, 1, 1, d))
    hook.mode = "static"
    assert hook.rewrite(torch.nn.Module(), q, torch.ones(1, 1, 1, d))[0].flatten().nonzero().flatten().tolist() == [0, 1, 2]


class HandAqua(AttentionHook):
    """AQUA written out by hand (a loop per row, head and position) for the model-level comparison."""

    def __init__(self, proj, k, mode):
        self.proj, self.k, self.mode = proj, k, mode

    def rewrite(self, module, query, key):
        batch, heads, seq, dim = query.shape
        groups = key.shape[1]
        q = torch.zeros_like(query)
        for b in range(batch):
            for h in range(heads):
                g = h // (heads // groups)
                for t in range(seq):
                    qp = query[b, h, t] @ self.proj[g]
                    keep = list(range(self.k)) if self.mode == "static" else top_by_hand(qp.abs().tolist(), self.k)
                    q[b, h, t, keep] = qp[keep]
        kp = key @ self.proj  # (B, Hkv, L, m): m < D when restricted to the first m projected dims
        return q, torch.nn.functional.pad(kp, (0, dim - kp.shape[-1]))


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_model_with_aqua_equals_hand_written_aqua(full, mode):
    """The whole model with Aqua at k < d against the same model with HandAqua: equal logits; and the
    two modes give different logits."""
    _, model, art = full
    x = token_ids(2, 10)
    k = art.head_dim // 4
    with torch.no_grad():
        with Aqua(art, k=k, mode=mode)(model):
            got = model(x).logits
        with Aqua(art, k=k, mode="static" if mode == "dynamic" else "dynamic")(model):
            other = model(x).logits
        with HookedModel(model, [HandAqua(p, k, mode) for p in art.projections]):
            want = model(x).logits
    assert rel_err(got, want) <= 1e-4
    assert rel_err(got, other) > 1e-3


# -- the calibration basis -----------------------------------------------------------------------------
def test_eigenbasis_reconstructs_the_gram_in_decreasing_energy():
    """P diag(s^2) P^T = G, G P = P diag(s^2), and column j carries energy p_j^T G p_j = s_j^2, decreasing."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 400, 6, generator=gen, dtype=torch.float64) * torch.tensor([0.3, 4.0, 1.0, 2.5, 0.1, 6.0], dtype=torch.float64)
    gram = x.transpose(1, 2) @ x  # (G=2, D, D)
    p, s = eigenbasis(gram)
    p64, s2 = p.double(), s.double() ** 2
    assert rel_err(p64 @ torch.diag_embed(s2) @ p64.transpose(1, 2), gram) <= 1e-6
    assert rel_err(gram @ p64, p64 * s2[:, None]) <= 1e-6
    energy = torch.einsum("gdj,gde,gej->gj", p64, gram, p64)
    assert torch.allclose(energy, s2, rtol=1e-5)
    assert bool((energy[:, :-1] > energy[:, 1:]).all())


def test_eigenbasis_of_a_diagonal_gram_is_the_axes_largest_first():
    gram = torch.diag(torch.tensor([1.0, 9.0, 4.0, 16.0], dtype=torch.float64))[None]
    p, s = eigenbasis(gram)
    assert torch.equal(p[0], torch.eye(4)[:, [3, 1, 2, 0]])
    assert s[0].tolist() == [4.0, 3.0, 2.0, 1.0]


def test_calibrated_basis_reconstructs_the_models_gram():
    """From a real (tiny) model's captured q/k: the Gram is X^T X of the post-RoPE vectors, and the basis
    the artifact would hold reconstructs it, largest energy first."""
    model = tiny_model("llama")
    windows = token_ids(4, 16, seed=7)
    acc = accumulate(model, windows, batch_size=2)
    grams = acc.stacked()
    assert grams.shape == (2, 2, 16, 16) and acc.vectors.tolist() == [4 * 16 * 3] * 2  # 2 q heads + 1 k head per group
    for gram in grams:
        p, s = eigenbasis(gram)
        rebuilt = p.double() @ torch.diag_embed(s.double() ** 2) @ p.double().transpose(1, 2)
        assert rel_err(rebuilt, gram) <= 1e-5
        assert bool((s[:, :-1] >= s[:, 1:]).all())


def test_gram_accumulator_is_uncentered_and_float64():
    """The mean is signal (q·k is not translation invariant): a constant vector contributes n c c^T."""
    acc = GramAccumulator(1, 1, 3)
    c = torch.tensor([1.0, 2.0, 3.0])
    acc.add(0, c.expand(1, 1, 4, 3), c.expand(1, 1, 4, 3))
    assert acc.grams[0].dtype == torch.float64
    assert torch.equal(acc.grams[0][0], 8 * torch.outer(c, c).double())


# -- cached decode equals full prefill at k < d --------------------------------------------------------
def decode_methods(art) -> list:
    return [
        Aqua(art, k=0.5, mode="static"),
        Aqua(art, k=0.5, mode="dynamic"),
        AquaKV(art, k=0.5, mode="dynamic", kv_dims=0.75),
        AquaKV(art, k=1.0, mode="dense", kv_dims=0.5),
        TopTokens(art, k=0.5, token_ratio=None),
        TopTokens(art, k=0.5, token_ratio=0.25, select_block=16),
        H2O(4096, artifact=art, k=0.5),
    ]


def own_cache(method):
    cache = method.new_cache()
    return DynamicCache() if cache is None else cache


@pytest.mark.parametrize("index", range(7), ids=["aqua-static", "aqua-dynamic", "kv-proj+aqua", "kv-proj", "topt-dims",
                                                 "topt-tokens", "aqua+h2o"])
def test_cached_decode_equals_full_prefill_at_small_k(full, index):
    """Each query's selection depends only on what it sees, so decoding token by token through the
    method's cache gives the logits of one full prefill, at k < d too (and they are not dense)."""
    _, model, art = full
    method = decode_methods(art)[index]
    x = token_ids(1, 22, seed=4)
    prefill = 5
    with method(model), torch.no_grad():
        full_logits = model(x, past_key_values=own_cache(method), use_cache=True).logits
        cache = own_cache(method)
        out = model(x[:, :prefill], past_key_values=cache, use_cache=True)
        steps = [out.logits]
        for t in range(prefill, x.shape[1]):
            steps.append(model(x[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    stepwise = torch.cat(steps, dim=1)
    assert rel_err(stepwise, full_logits) <= 1e-4
    with torch.no_grad():
        dense = model(x).logits
    assert rel_err(full_logits, dense) > 1e-4


# -- added for the mutants that survived the first run (docs/testing.md) --------------------------------
class HandAquaKV(HandAqua):
    """HandAqua restricted to the first m projected dims (what the projected key cache keeps)."""

    def __init__(self, proj, k, mode, m):
        super().__init__(proj[..., :m], k, mode)


def test_projected_cache_with_dynamic_aqua_equals_hand_written(full):
    """AquaKV at k < m < d, with its rank-m cache: dynamic selection among the first m dims by hand,
    over the full-precision keys of an ordinary cache (q·k_rec = (qP)[:m]·(kP)[:m])."""
    _, model, art = full
    d = art.head_dim
    k, m = d // 4, d // 2
    x = token_ids(2, 12, seed=8)
    with torch.no_grad():
        with AquaKV(art, k=k, mode="dynamic", kv_dims=m)(model) as method:
            got = model(x, past_key_values=method.new_cache(), use_cache=True).logits
        with HookedModel(model, [HandAquaKV(p, k, "dynamic", m) for p in art.projections]):
            want = model(x).logits
        with HookedModel(model, [HandAqua(p, k, "dynamic") for p in art.projections]):
            unrestricted = model(x).logits
    assert rel_err(got, want) <= 1e-4
    assert rel_err(got, unrestricted) > 1e-3  # the restriction to m dims matters here


def test_approx_logits_ignore_slots_past_count():
    """The kernels' contract: entries of idx/qsel past ``count`` are padding and never contribute."""
    gen = torch.Generator().manual_seed(4)
    kd = torch.randn(1, 2, 8, 9, generator=gen)  # (B, Hkv, D, L)
    qsel = torch.randn(1, 2, 3, 5, generator=gen)  # (B, Hkv, G, KP)
    idx = torch.tensor([[[1, 4, 6, 0, 2], [0, 3, 5, 7, 7]]], dtype=torch.int32)
    count = torch.tensor([[3, 2]], dtype=torch.int32)
    got = reference.approx_logits(qsel, idx, count, kd)
    for g in range(2):
        n = int(count[0, g])
        for h in range(3):
            want = sum(float(qsel[0, g, h, s]) * kd[0, g, int(idx[0, g, s])] for s in range(n))
            assert torch.allclose(got[0, g, h], want, atol=1e-5)


def test_decode_reference_top_tokens_by_hand():
    """Dims + top-T: a token's score is the MAX over the group's heads of the selected-dims logits; each
    block of ``select_block`` keys keeps ceil(n * ceil(ratio * block) / block) of its n tokens; exact
    attention (full q, k) over those."""
    gen = torch.Generator().manual_seed(6)
    length, dim, block, ratio = 21, 8, 8, 0.25  # the last block holds 5 keys: keeps ceil(5 * 2 / 8) = 2
    q, k, v = torch.randn(1, 4, dim, generator=gen), torch.randn(1, 2, length, dim, generator=gen), torch.randn(1, 2, length, dim, generator=gen)
    proj = orthogonal(2, dim, 2)
    out = reference.aqua_decode_reference(q, k, v, reference.project_keys(k, proj), proj, 3, "group", ratio, block)
    for g in range(2):
        qp = [q[0, 2 * g + r] @ proj[g] for r in range(2)]
        keep_dims = top_by_hand([sum(abs(float(x[d])) for x in qp) for d in range(dim)], 3)
        kp = k[0, g] @ proj[g]
        approx = [[float(qp[r][keep_dims] @ kp[t, keep_dims]) / math.sqrt(dim) for t in range(length)] for r in range(2)]
        score = [max(approx[0][t], approx[1][t]) for t in range(length)]
        kept = []
        for start in range(0, length, block):
            n = min(block, length - start)
            take = math.ceil(n * math.ceil(ratio * block) / block)
            kept += [start + i for i in top_by_hand(score[start : start + n], take)]
        for r in range(2):
            logits = (q[0, 2 * g + r] @ k[0, g, kept].T) / math.sqrt(dim)
            assert torch.allclose(out[0, 2 * g + r], logits.softmax(-1) @ v[0, g, kept], atol=1e-5)


@pytest.mark.parametrize("token_ratio", [None, 0.25])
def test_top_tokens_hook_decode_step_equals_the_kernels_reference(token_ratio):
    """One decode step of TopTokensHook (the quality path) equals aqua_decode_reference (what the fused
    kernels implement), dims only and dims + top-T."""
    from aqua_cli.methods import TopTokensHook

    gen = torch.Generator().manual_seed(9)
    q, k, v = torch.randn(2, 6, 16, generator=gen), torch.randn(2, 3, 40, 16, generator=gen), torch.randn(2, 3, 40, 16, generator=gen)
    proj = orthogonal(3, 16, 5)
    hook = TopTokensHook(proj, 5, token_ratio, select_block=16)
    got, _ = hook.attend(torch.nn.Module(), q[:, :, None], k, v, None, scaling=16 ** -0.5)
    want = reference.aqua_decode_reference(q, k, v, reference.project_keys(k, proj), proj, 5, "group", token_ratio, 16)
    assert torch.allclose(got[:, 0], want, atol=1e-5)


def test_gram_running_sum_is_float64():
    """Each batch's Gram is a float32 product (issue 20: the speed), the running sum over batches is float64:
    after 2^12 batches of a value whose float32 sum would stall (2^24 + small), the total is exact to float64."""
    x = torch.full((1, 1, 1, 2), 1.0)
    acc = GramAccumulator(1, 1, 2)
    for _ in range(8):
        acc.add(0, x, x)
    assert acc.grams[0].dtype == torch.float64
    big = torch.full((1, 1, 1, 2), 2.0**12)  # 2^24 per entry: float32 sums of 1s past it are lost
    acc.add(0, big, big)
    for _ in range(64):
        acc.add(0, x, x)
    assert float(acc.grams[0][0, 0, 0]) == 2 * (8 + 2.0**24 + 64)  # q and k rows both count


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_per_group_budgets_above_kv_dims_are_clamped(mode):
    """Per-group budgets [2, 8] with the projected cache's m = 4 of d = 8: group 1 keeps its 4 dims
    (the budget is clamped to m), group 0 keeps 2 of the first 4, by hand."""
    proj = orthogonal(2, 8, 7)
    gen = torch.Generator().manual_seed(1)
    query, key = torch.randn(1, 4, 3, 8, generator=gen), torch.randn(1, 2, 5, 8, generator=gen)
    hook = ProjectionHook(proj, torch.tensor([2, 8]), mode, kv_dims=4)
    q2, k2 = hook.rewrite(torch.nn.Module(), query, key)
    scores = q2 @ k2.repeat_interleave(2, dim=1).transpose(-1, -2)
    want = torch.cat([hand_scores(query[:, :2], key[:, :1], proj[:1, :, :4], 2, mode),
                      hand_scores(query[:, 2:], key[:, 1:], proj[1:, :, :4], 4, mode)], dim=1)
    assert torch.allclose(scores, want, atol=1e-5)


def test_tokens_in_block_rounds_up():
    """A block of n visible keys keeps ceil(n * block_keep / block): at least one as soon as n >= 1
    (a query that sees one key must keep it), the same in the int and the tensor forms."""
    block, keep = 16, reference.block_keep_for(0.25, 16)
    assert keep == 4
    want = [math.ceil(n * keep / block) for n in range(block + 1)]
    assert [reference.tokens_in_block(n, keep, block) for n in range(block + 1)] == want
    assert reference.tokens_in_block(torch.arange(block + 1), keep, block).tolist() == want
    assert want[1] == 1 and want[5] == 2 and want[16] == 4
