"""The fused kernels' pure-Python glue on the CPU, without Triton: the padded selection layout the kernels
read, the choice between in-kernel and PyTorch selection, launch geometry, layouts and byte counts.
(test_suite.py runs this file again with ``triton`` made unimportable.) Last, where triton is installed,
the kernel paths that test_kernels.py's interpreter test does not reach, under the interpreter."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aqua_cli.cost import dims_bytes, pages_bytes, topt_bytes
from aqua_cli.kernels import decode
from aqua_cli.kernels.decode import (
    DecodeConfig,
    fused_selection_supported,
    kd_layout,
    pad_selection,
    select_for_kernels,
)
from aqua_cli.kernels.reference import project_queries, select_dims


def qp_and_q(batch=2, heads=6, kv_heads=3, dim=32, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, dim, generator=gen).to(dtype)
    proj = torch.linalg.qr(torch.randn(kv_heads, dim, dim, generator=gen))[0]
    return q, proj


@pytest.mark.parametrize("gqa", ["group", "head"])
@pytest.mark.parametrize("dims", [3, 16, 20])
def test_pad_selection_layout(gqa, dims):
    """(B, Hkv, G, k) -> (B*Hkv, G, KP) with KP = max(16, next power of two), zeros past the selection;
    idx int32 (B*Hkv, KP); count flat int32."""
    q, proj = qp_and_q()
    idx, count, qsel = select_dims(project_queries(q, proj), dims, gqa)
    padded_q, padded_idx, flat_count = pad_selection(qsel, idx, count)
    width = qsel.shape[-1]
    kp = max(16, 1 << (width - 1).bit_length())
    assert padded_q.shape == (6, 2, kp) and padded_idx.shape == (6, kp) and flat_count.shape == (6,)
    assert padded_idx.dtype == torch.int32 and flat_count.dtype == torch.int32
    assert torch.equal(padded_q[..., :width], qsel.reshape(6, 2, width))
    assert torch.equal(padded_idx[:, :width], idx.reshape(6, width))
    assert not padded_q[..., width:].any() and not padded_idx[:, width:].any()
    assert torch.equal(flat_count, count.reshape(-1))


@pytest.mark.parametrize("gqa,dims,full_rows", [("group", 16, True), ("group", 12, False), ("group", 32, True),
                                                ("head", 16, False)])
def test_select_for_kernels_without_triton_is_the_torch_selection(gqa, dims, full_rows):
    """float32 queries never take the in-kernel selection: the padded PyTorch selection, and whether all
    KP slots are valid (group selection with a power-of-two k >= 16)."""
    q, proj = qp_and_q()
    sel, full = select_for_kernels(q, proj, DecodeConfig(dims, gqa))
    want = pad_selection(*_reorder(select_dims(project_queries(q, proj), dims, gqa)))
    assert all(torch.equal(a, b) for a, b in zip(sel, want))
    assert full is full_rows


def _reorder(result):
    idx, count, qsel = result
    return qsel, idx, count


def test_dims_are_clamped_to_head_dim():
    q, proj = qp_and_q(dim=16)
    (qsel, idx, count), full = select_for_kernels(q, proj, DecodeConfig(40))
    assert count.tolist() == [16] * 6 and idx[0].tolist() == list(range(16)) and full


def test_fused_selection_needs_group_bf16_power_of_two_and_float32_projection():
    q, proj = qp_and_q(dtype=torch.bfloat16)
    assert fused_selection_supported(q, proj, "group")
    assert not fused_selection_supported(q, proj, "head")
    assert not fused_selection_supported(q.float(), proj, "group")
    assert not fused_selection_supported(q, proj.to(torch.bfloat16), "group")
    q48, proj48 = qp_and_q(dim=48, dtype=torch.bfloat16)
    assert not fused_selection_supported(q48, proj48, "group")
    q8, proj8 = qp_and_q(dim=8, dtype=torch.bfloat16)
    assert not fused_selection_supported(q8, proj8, "group")


@pytest.mark.parametrize("kwargs,needle", [
    ({"select_block": 24}, "select_block"), ({"select_block": 8}, "select_block"),
    ({"granularity": "rows"}, "granularity"), ({"page": 48}, "page"), ({"page": 8}, "page"),
    ({"token_ratio": 0.0}, "outside"), ({"token_ratio": 1.5}, "outside"),
])
def test_decode_config_rejects(kwargs, needle):
    with pytest.raises(Exception, match=needle):
        DecodeConfig(32, **kwargs)


def test_launch_geometry_helpers():
    assert [decode._pow2(n) for n in (1, 2, 3, 16, 17)] == [1, 2, 4, 16, 32]
    assert [decode._kp(n) for n in (1, 16, 17, 100)] == [16, 16, 32, 128]
    assert decode._gp(4) == 16 and decode._gp(32) == 32
    # splits: enough programs for ``waves`` x SMs, never more than the blocks of the sequence
    assert decode._num_splits(work_items=2, length=4096, block=128, sms=132) == 32
    assert decode._num_splits(work_items=1024, length=4096, block=128, sms=132) == 1
    assert decode._num_splits(work_items=1, length=100, block=128, sms=132) == 1
    assert decode._sms(torch.device("cpu")) == 8
    # dims only: 2 programs per SM for a step of at most 16 KV groups, 4 above, unless the config says
    kd1, kd8 = torch.empty(1, 8, 16, 64), torch.empty(8, 8, 16, 64)
    assert decode.dims_waves(DecodeConfig(8), kd1) == 2.0 and decode.dims_waves(DecodeConfig(8), kd8) == 4.0
    assert decode.dims_waves(DecodeConfig(8, waves=3.0), kd1) == 3.0
    # dims only: 4 pipeline stages at 64 KV groups or more with at most 64 dims kept, else 3, unless the config says
    assert decode.dims_stages(DecodeConfig(8), kd8) == 4 and decode.dims_stages(DecodeConfig(8), kd1) == 3
    assert decode.dims_stages(DecodeConfig(16), torch.empty(8, 8, 128, 64)) == 4
    assert decode.dims_stages(DecodeConfig(96), torch.empty(8, 8, 128, 64)) == 3
    assert decode.dims_stages(DecodeConfig(8, num_stages=2), kd8) == 2


def test_page_scoring_launch_by_layout():
    """Page scoring on key planes at 32 kept dims takes the measured planar launch (2 warps, 2 stages, 8 programs per
    SM); other widths, bf16 keys and pages ranked by bound the bf16 one; what a caller sets wins."""
    from aqua_cli.kernels.reference import key_planes

    bf16 = torch.zeros(1, 2, 128, 64, dtype=torch.bfloat16)
    planes = key_planes(bf16)
    assert decode.score_launch(planes, 32, 64, 4.0) == (256, 2, 2, 8.0)
    assert decode.score_launch(planes, 30, 8, 4.0) == (256, 2, 2, 8.0)  # 30 dims: 32 slots
    assert decode.score_launch(planes, 64, 8, 4.0) == (256, 4, 3, 2.0)  # measured no better at B8 x 128K
    assert decode.score_launch(planes, 32, 8, 4.0, by_max=False) == (256, 4, 3, 2.0)
    assert decode.score_launch(bf16, 64, 8, 4.0) == (256, 4, 3, 2.0)
    assert decode.score_launch(bf16, 64, 64, 4.0) == (256, 4, 3, 4.0)
    assert decode.score_launch(planes, 32, 8, 4.0, block=512, warps=8, stages=3, score_waves=1.0) == (512, 8, 3, 1.0)
    assert DecodeConfig(64, token_ratio=1 / 16, granularity="pages").score_block is None  # resolved at launch


def test_projected_key_layouts():
    kd = torch.zeros(2, 3, 16, 40)
    assert kd_layout(kd, 8) == (kd.stride(0), kd.stride(1), 8, kd.stride(2), 16)
    paged = torch.zeros(2, 3, 5, 16, 8)  # (B, Hkv, NP, D, page)
    assert kd_layout(paged, 8) == (paged.stride(0), paged.stride(1), paged.stride(2), paged.stride(3), 16)
    with pytest.raises(AssertionError, match="pages of 16"):
        kd_layout(paged, 16)
    with pytest.raises(ValueError, match="must be"):
        kd_layout(torch.zeros(2, 3, 16), 8)
    v = torch.zeros(2, 3, 40, 16)
    assert decode._v_rows(v, 8) == (v.stride(0), v.stride(1), v.stride(2))
    v_paged = torch.zeros(2, 3, 5, 8, 16)
    assert decode._v_rows(v_paged, 8) == (v_paged.stride(0), v_paged.stride(1), v_paged.stride(3))


def test_byte_counts():
    # dims: k rows of kd and all of v; top-T: k rows of kd, then T rows of k and of v; pages: whole pages
    assert dims_bytes(1, 2, 100, 16, 64) == 2 * 100 * (16 + 64) * 2
    assert topt_bytes(1, 2, 100, 16, 64, 0.25) == 2 * (100 * 16 + 2 * 25 * 64) * 2
    assert pages_bytes(1, 2, 100, 16, 64, 0.25, 16) == 2 * (100 * 16 + 2 * 32 * 64) * 2  # 25 tokens -> 2 pages
    assert pages_bytes(1, 2, 100, 16, 64, 1.0, 64) == 2 * (100 * 16 + 2 * 100 * 64) * 2  # capped at the length
    assert pages_bytes(1, 2, 100, 16, 64, 0.25, 16, page_score="bound") == 2 * (2 * 7 * 16 + 2 * 32 * 64) * 2  # 7 pages, 2 bounds each
    assert pages_bytes(1, 2, 100, 16, 64, 0.25, 16, page_score="bound", rerank=2) == 2 * ((2 * 7 + 64) * 16 + 2 * 32 * 64) * 2
    assert pages_bytes(1, 2, 100, 16, 64, 0.25, 16, score_elem=1) == 2 * (100 * 16 * 1 + 2 * 32 * 64 * 2)  # key planes


def test_launchers_without_triton_say_what_to_install(monkeypatch):
    monkeypatch.setattr(decode, "triton", None)
    q, proj = qp_and_q(dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="pip install triton"):
        decode.launch_select_dims(q, proj, 8)


# -- the kernel paths test_kernels.py's interpreter test does not reach, under TRITON_INTERPRET=1 -----------
INTERP_PATHS = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_kernels import inputs, rel
from aqua_cli.kernels import decode as dk
from aqua_cli.kernels.reference import aqua_decode_reference
for b, hq, hk, L, D in [(1, 4, 2, 100, 64), (2, 6, 3, 77, 32)]:
    q, k, v, proj, kd = inputs(b, hq, hk, L, D, torch.bfloat16, "cpu", seed=L)
    dims = 3 * D // 8 + 1  # odd: padded slots in the selection
    for gqa in ("group", "head"):  # dims kernel over the PyTorch selection (pad_selection), per group and per head
        ref = aqua_decode_reference(q, k, v, kd, proj, dims, gqa)
        out = dk.aqua_decode(q, k, v, kd, proj, dk.DecodeConfig(dims, gqa, fused_select=False, block_n=32))
        assert rel(out, ref) < 3e-2, (gqa, rel(out, ref))
    # token top-T: score + select kernel, exact pass over the chosen tokens, combine
    ref = aqua_decode_reference(q, k, v, kd, proj, dims, "group", 1 / 4, 32)
    out = dk.aqua_decode(q, k, v, kd, proj, dk.DecodeConfig(dims, token_ratio=1 / 4, select_block=32, tokens_block_n=16))
    assert rel(out, ref) < 3e-2, ("topt", rel(out, ref))
print("INTERPRETER OK")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs the triton package (no GPU)")
def test_unfused_and_token_kernels_under_triton_interpreter():
    """The dims kernel over the PyTorch selection (group and head) and the token top-T kernels, on the
    CPU through Triton's interpreter, against the reference (same bound as test_kernels.py's: under the
    interpreter dots run in float32 and casts to bf16 truncate)."""
    tests = str(Path(__file__).parent)
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", INTERP_PATHS.format(tests=tests)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "INTERPRETER OK" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.parametrize("groups,length,block,programs", [(64, 32768, 128, 132), (8, 32768, 128, 132), (3, 77, 32, 2),
                                                          (6, 4097, 128, 264), (1, 33, 32, 8), (64, 100, 128, 132)])
def test_stream_layout_deals_every_block_once(groups, length, block, programs):
    """The balanced dims kernel's split: every block of every KV group in exactly one program, programs at most as
    asked, and no group touched by more programs than it has partial slots."""
    nb, w, progs, slots = decode.stream_layout(groups, length, block, programs)
    assert nb == -(-length // block) and progs <= max(1, programs) and (progs - 1) * w < groups * nb <= progs * w
    owner = [g // w for g in range(groups * nb)]  # program of each block
    assert sorted(set(owner)) == list(range(progs))
    for bh in range(groups):
        touching = set(owner[bh * nb:(bh + 1) * nb])
        assert len(touching) <= slots and touching == set(range(bh * nb // w, ((bh + 1) * nb - 1) // w + 1))


def test_dims_stream_from_batch_eight():
    """Dims only takes the balanced kernel from ``STREAM_MIN_GROUPS`` KV groups a step (batch 8 of an 8-KV-head
    model), the split kernel below; what a caller sets wins."""
    many, few = torch.empty(8, 8, 1, 1), torch.empty(1, 8, 1, 1)
    assert decode.dims_stream(DecodeConfig(64), many) and not decode.dims_stream(DecodeConfig(64), few)
    assert not decode.dims_stream(DecodeConfig(64, stream=False), many) and decode.dims_stream(DecodeConfig(64, stream=True), few)


def test_stream_tile_fits_shared_memory():
    """256 tokens a step at head_dim 128 (k = d/2 and 3d/4 measured), halved where a stage would pass
    ``STREAM_TILE_BYTES`` (head_dim 256); a caller's smaller block is kept."""
    kd128, kd256 = torch.empty(1, 1, 128, 8), torch.empty(1, 1, 256, 8)
    assert decode.stream_tile(DecodeConfig(64), kd128) == 256 and decode.stream_tile(DecodeConfig(96), kd128) == 256
    assert decode.stream_tile(DecodeConfig(128), kd256) == 128 and decode.stream_tile(DecodeConfig(64, stream_block=64), kd128) == 64
    for dims, kd in ((256, kd256), (8, kd128), (1, kd256)):
        block = decode.stream_tile(DecodeConfig(dims), kd)
        assert (decode._kp(min(dims, kd.shape[2])) + kd.shape[2]) * 2 * block <= decode.STREAM_TILE_BYTES
