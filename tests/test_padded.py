"""Left-padded batches at k < d, through every attention path: each padded row must equal the same row
run alone, with the positions and mask that ``generate()`` gives a left-padded batch, in prefill and in
the cached decode steps after it. (At k = 1 selection returns early, so only k < d tests the masking of
the selecting paths; a fully masked query row, the padding itself, must not turn into NaN either.)"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from tiny_models import rel_err, token_ids
from transformers import DynamicCache

from aqua_cli.errors import ConfigError
from aqua_cli.kernels.paged import TopPagesHook
from aqua_cli.methods import AquaDecode, H2O, Aqua, AquaKV, Dense, Method, TopTokens, default_methods

LENGTHS = (9, 14)  # row 0 is left-padded by 5
STEPS = 4  # cached decode steps after the prompt


def approximate_methods(art) -> list:
    """Every path at a budget that changes the result (k < d, m < d, top-T < all)."""
    return [
        Aqua(art, k=0.5, mode="static"),
        Aqua(art, k=0.5, mode="dynamic"),
        AquaKV(art, k=0.5, mode="dynamic", kv_dims=0.75),
        AquaKV(art, k=1.0, mode="dense", kv_dims=0.5),
        TopTokens(art, k=0.5, token_ratio=None),
        TopTokens(art, k=0.5, token_ratio=0.5),
        H2O(4096, artifact=art, k=0.5),
    ]


def label(method) -> str:
    d = method.describe()
    return f"{method.name}-{d.get('k')}-{getattr(method, 'mode', '')}-{d.get('kv_dims')}-{d.get('token_ratio', '')}"


def cache_for(method):
    """The method's own cache; H2O's refuses padded batches (eviction is per head), so H2O runs without
    eviction on the model's own cache: its hooks still compute attention themselves."""
    if isinstance(method, H2O):
        return DynamicCache()
    return method.new_cache()


def run(model, method, rows: list[torch.Tensor], new_tokens: torch.Tensor) -> list[torch.Tensor]:
    """Left-pad ``rows`` into one batch, prefill, then decode ``new_tokens`` ``(B, STEPS)`` one step at a
    time through the cache. Returns per row its logits over its own tokens then the decode steps."""
    batch, longest = len(rows), max(len(r) for r in rows)
    x = torch.zeros(batch, longest, dtype=torch.long)  # pad id 0
    mask = torch.zeros(batch, longest, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, longest - len(r):] = r
        mask[i, longest - len(r):] = 1
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as generate() computes them
    with torch.no_grad():
        out = model(x, attention_mask=mask, position_ids=positions, past_key_values=cache_for(method), use_cache=True)
        logits, cache = [out.logits], out.past_key_values
        for t in range(new_tokens.shape[1]):
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.long)], dim=-1)
            positions = positions[:, -1:] + 1
            out = model(new_tokens[:, t : t + 1], attention_mask=mask, position_ids=positions, past_key_values=cache,
                        use_cache=True)
            logits.append(out.logits)
    every = torch.cat(logits, dim=1)
    assert torch.isfinite(every).all(), "non-finite logits (a fully masked padding row went through softmax?)"
    return [every[i, longest - len(r):] for i, r in enumerate(rows)]


def check_rows_equal_alone(model, method, lengths=LENGTHS) -> list[torch.Tensor]:
    rows = [token_ids(1, n, seed=10 + n)[0] for n in lengths]
    new_tokens = token_ids(len(rows), STEPS, seed=3)
    with method(model):
        batched = run(model, method, rows, new_tokens)
        alone = [run(model, method, [r], new_tokens[i : i + 1])[0] for i, r in enumerate(rows)]
    for i, (b, a) in enumerate(zip(batched, alone)):
        assert b.shape == a.shape
        assert rel_err(b, a) <= 1e-4, f"row {i}: {rel_err(b, a):.2e}"
    return alone


@pytest.mark.parametrize("index", range(7), ids=lambda i: ["aqua-static", "aqua-dynamic", "kv-proj+aqua", "kv-proj",
                                                             "topt-dims", "topt-tokens", "aqua+h2o"][i])
def test_padded_rows_equal_rows_alone_at_small_k(full, index):
    _, model, art = full
    method = approximate_methods(art)[index]
    alone = check_rows_equal_alone(model, method)
    dense = [run(model, Dense(), [token_ids(1, n, seed=10 + n)[0]], token_ids(2, STEPS, seed=3)[i : i + 1])[0]
             for i, n in enumerate(LENGTHS)]
    # the budget really is below d: the method is an approximation (so selection and masking are exercised)
    assert all(rel_err(a, d) > 1e-4 for a, d in zip(alone, dense))


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_padded_rows_equal_rows_alone_sliding_window_models(tiny, mode):
    """The AQUA hook on every family, sliding-window layers included."""
    _, model, art = tiny
    check_rows_equal_alone(model, Aqua(art, k=0.25, mode=mode))


def test_padded_rows_equal_rows_alone_default_methods(full):
    """The lossless instances every test runs (``default_methods``), each with its own cache."""
    _, model, art = full
    for method in default_methods(art):
        check_rows_equal_alone(model, method)


@pytest.mark.parametrize("token_ratio", [None, 0.5])
def test_top_tokens_padding_gives_finite_logits(full, token_ratio):
    """The bug this guards: TopTokensHook sent a fully masked row (a padding query) through softmax, and
    the NaN it gave spread, through the next layer's values, to the valid positions of the padded row."""
    _, model, art = full
    x = token_ids(2, 12)
    mask = torch.ones_like(x)
    mask[0, :4] = 0
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with TopTokens(art, k=0.5, token_ratio=token_ratio)(model), torch.no_grad():
        logits = model(x, attention_mask=mask, position_ids=positions).logits
    assert torch.isfinite(logits).all()


def test_h2o_cache_refuses_padded_batches_even_without_eviction(full):
    """The documented limit: H2O's own cache and a padded batch are refused, not silently misaligned."""
    _, model, art = full
    x = token_ids(2, 10)
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    with H2O(4096, artifact=art, k=0.5)(model) as h2o, pytest.raises(ConfigError, match="padded"), torch.no_grad():
        model(x, attention_mask=mask, past_key_values=h2o.new_cache(), use_cache=True)


@pytest.fixture(scope="module")
def llama():
    from conftest import tiny_artifact
    from tiny_models import tiny_model

    model = tiny_model("llama")
    return model, tiny_artifact(model, "llama")


@dataclass
class TopPages(Method):
    """TopPagesHook (page top-T, the quality twin of the page kernels) as a method, for these tests."""

    artifact: Any = None
    dims: int = 8
    token_ratio: float = 0.5
    page: int = 16

    name = "aqua-pages"

    def layer_hooks(self, model):
        return [TopPagesHook(p, self.dims, self.token_ratio, page=self.page) for p in self.artifact.projections]


def test_top_pages_padding_gives_finite_logits(full):
    """The same NaN as TopTokensHook's, in the page hook: a padding query row is fully masked."""
    _, model, art = full
    x = token_ids(2, 40)
    mask = torch.ones_like(x)
    mask[0, :7] = 0
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with TopPages(art, art.head_dim // 2, 0.5, 16)(model), torch.no_grad():
        logits = model(x, attention_mask=mask, position_ids=positions).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("which,lengths", [
    pytest.param("pages", (24, 40), id="pages-whole-block-padding"),
    pytest.param("tokens", (24, 40), id="tokens-whole-block-padding"),
    pytest.param("pages", (29, 40), id="pages-partial-block-padding"),
    pytest.param("tokens", (29, 40), id="tokens-partial-block-padding"),
    pytest.param("decode", (29, 40), id="aqua-decode-pages-partial-block-padding"),
])
def test_block_selection_padded_rows_equal_alone(llama, which, lengths):
    """Top-T over several blocks (16 keys each) in a left-padded batch: each row as alone, with padding that
    is and is not a whole number of blocks (blocks are cut from each row's first visible key). One family
    (GQA) keeps it fast."""
    model, art = llama
    if which == "decode":  # the projected KV cache's decode path: dims by group, pages with a sink and a recent page
        method = AquaDecode(art, k=0.5, token_ratio=0.25, page=16, prefill="aqua")
    else:
        method = (TopTokens(art, k=0.5, token_ratio=0.25, select_block=16) if which == "tokens"
                  else TopPages(art, art.head_dim // 2, 0.25, 16))
    check_rows_equal_alone(model, method, lengths=lengths)
