"""kernels.resources: recording a step's launches on meta tensors, compiling them offline for sm_90, the occupancy
arithmetic, and the script that reports them. No GPU: Triton compiles for a target it is told, and ships ptxas
and cuobjdump."""

import json
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

from aqua_cli.bench import BenchConfig, launch_resources, random_projection  # noqa: E402
from aqua_cli.kernels import decode as dk  # noqa: E402
from aqua_cli.kernels import resources as rs  # noqa: E402
from aqua_cli.models import AttnShape  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
META = torch.device("meta")


def meta_inputs(batch: int, heads: int, kv_heads: int, length: int, dim: int):
    proj = random_projection(kv_heads, dim, torch.Generator().manual_seed(0)).to(META)
    q = torch.empty(batch, heads, dim, device=META, dtype=torch.bfloat16)
    v = torch.empty(batch, kv_heads, length, dim, device=META, dtype=torch.bfloat16)
    kd = torch.empty(batch, kv_heads, dim, length, device=META, dtype=torch.bfloat16)
    return q, v, kd, proj


def test_recording_gives_the_launchers_choices_and_restores_the_kernels():
    q, v, kd, proj = meta_inputs(8, 32, 8, 32768, 128)
    cfg = dk.DecodeConfig(64)
    kernels = {name: getattr(dk, name) for name in ("_select_dims_kernel", "_dims_stream_kernel", "_sms", "use_pdl")}
    launches = rs.record_launches(lambda: dk.aqua_decode(q, None, v, kd, proj, cfg), sms=132)
    assert [x.kernel for x in launches] == ["_select_dims_kernel", "_dims_stream_kernel"]
    select, stream = launches
    assert select.grid == (64,) and select.args["K"] == 64 and select.args["GDC"] == 2
    nb, w, programs, slots = dk.stream_layout(64, 32768, dk.stream_tile(cfg, kd), 132)
    assert stream.grid == (programs,) and stream.args["BLOCK_N"] == dk.stream_tile(cfg, kd) and stream.args["W"] == w
    assert stream.options == {"num_warps": 4, "num_stages": cfg.stream_stages, "launch_pdl": True}
    assert {name: getattr(dk, name) for name in kernels} == kernels  # nothing left patched
    with pytest.raises(RuntimeError, match="boom"):
        with rs.recording():
            raise RuntimeError("boom")
    assert {name: getattr(dk, name) for name in kernels} == kernels
    # the batch-1 path: split kernel and combine, 2 programs per SM aimed for on 16 SMs
    q, v, kd, proj = meta_inputs(1, 32, 8, 4096, 128)
    names = [x.kernel for x in rs.record_launches(lambda: dk.aqua_decode(q, None, v, kd, proj, cfg), sms=16, pdl=False)]
    assert names == ["_select_dims_kernel", "_dims_split_kernel", "_combine_kernel"]


def test_occupancy_arithmetic():
    assert rs.ctas_per_sm(108544, 255, 4) == 2  # shared memory and registers both allow two
    assert rs.ctas_per_sm(143360, 200, 4) == 1
    assert rs.ctas_per_sm(228 * 1024, 32, 4) == 0  # over the most one program may take
    assert rs.ctas_per_sm(0, None, 4) == 16  # threads: 2048 / 128
    assert rs.ctas_per_sm(1024, 64, 1) == 32  # the program limit
    assert rs.ctas_per_sm(2048, 168, 8) == 1  # 168 registers x 256 threads: 43008 of 65536
    big = rs.Resources("a", (1,), 4, 2, 143360, 255, 0, 1, 1, 0)
    small = rs.Resources("b", (1,), 4, None, 16384, 120, 0, 0, 1, 0)
    assert not rs.fit_together(big, big) and rs.fit_together(big, small) and rs.fit_together(small, small)


def test_offline_compile_of_the_balanced_kernel():
    """Head_dim 128 and 256 (where ``stream_tile`` halves the step): the program fits one SM, its loads are
    pipelined through shared memory (asynchronous copies), and the selection launch fits beside it."""
    for heads, kv_heads, dim in ((32, 8, 128), (8, 4, 256)):
        q, v, kd, proj = meta_inputs(8, heads, kv_heads, 8192, dim)
        select, stream = rs.step_resources(lambda: dk.aqua_decode(q, None, v, kd, proj, dk.DecodeConfig(dim // 2, stream=True)))
        assert stream.kernel == "_dims_stream_kernel" and select.kernel == "_select_dims_kernel"
        assert 0 < stream.shared <= rs.HOPPER.shared_per_cta and stream.ctas_per_sm >= 1
        assert stream.async_copies > 0 and stream.mma > 0
        if stream.registers is not None:  # cuobjdump shipped with Triton
            assert 0 < stream.registers <= 255 and stream.local is not None
        assert rs.fit_together(select, stream)


def test_launch_resources_cover_the_fused_catalog():
    shape = AttnShape("tiny", 8, 2, 64)
    config = BenchConfig(seqs=[1024], batch=2, ks=[0.5], token_ratios=[1 / 8], hybrid=False, rerank=2)
    rows = launch_resources(config, shape, 1024, sms=8)
    impls = {r["impl"] for r in rows}
    assert {"aqua-dims", "aqua-topt-1/8", "aqua-pages-1/8", "aqua-planes-1/8", "aqua-bounds-1/8", "aqua-rerank-1/8"} <= impls
    assert all(r["shared"] > 0 and r["ctas_per_sm"] >= 1 for r in rows)
    assert [r["kernel"] for r in rows if r["impl"] == "aqua-pages-1/8"] == [
        "_select_dims_kernel", "_page_score_kernel", "_page_select_kernel", "_page_attend_kernel", "_combine_kernel"]


def test_script_prints_a_table_and_writes_json(tmp_path):
    out = tmp_path / "r.json"
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "kernel_resources.py"), "--model", "smollm2-135m",
                           "--batch", "2", "--seq", "2k", "--k", "0.5", "--tokens", "", "--json", str(out)],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "dims_split_kernel" in proc.stdout and "smem KB" in proc.stdout
    info = json.loads(out.read_text())
    assert info["capability"] == 90 and info["triton"] == triton.__version__
    assert [r["kernel"] for r in info["rows"]] == ["_select_dims_kernel", "_dims_split_kernel", "_combine_kernel"]
    assert info["rows"][1]["beside_previous"] is True and info["rows"][0]["beside_previous"] is None
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "kernel_resources.py"), "--k", "2"],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert bad.returncode == 2 and "error:" in bad.stderr and "Traceback" not in bad.stderr


def _ptx_diff():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ptx_diff", os.path.join(ROOT, "scripts", "ptx_diff.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ptx_diff_compare_names_each_kind_of_difference():
    compare = _ptx_diff().compare
    row = dict(batch=8, seq=4096, impl="aqua-dims", k=0.5, index=0, kernel="_a", grid=[4], ptx="p", lines="l")
    same = [row, {**row, "index": 1, "kernel": "_b"}]
    assert compare(same, [dict(r) for r in same]) == []
    out = compare(same, [{**row, "ptx": "q"}, {**row, "index": 1, "kernel": "_b", "ptx": "r", "lines": "m"},
                         {**row, "index": 2, "kernel": "_c"}])
    assert out == ["B8 x 4096 aqua-dims k=0.5 launch 0 (_a): the same instructions in another order",
                   "B8 x 4096 aqua-dims k=0.5 launch 1 (_b): PTX differs",
                   "B8 x 4096 aqua-dims k=0.5 launch 2: added (_c)"]
    assert compare([row], [{**row, "grid": [8]}]) == ["B8 x 4096 aqua-dims k=0.5 launch 0: _a [4] -> _a [8]"]
    assert compare([row], []) == ["B8 x 4096 aqua-dims k=0.5 launch 0: dropped (_a)"]


@pytest.mark.skipif(not os.path.isdir(os.path.join(ROOT, ".git")), reason="needs the git checkout")
def test_ptx_diff_script_on_one_revision_and_a_bad_one(tmp_path):
    script = os.path.join(ROOT, "scripts", "ptx_diff.py")
    args = ["--model", "smollm2-135m", "--batch", "2", "--seq", "1k", "--k", "0.5", "--tokens", ""]
    proc = subprocess.run([sys.executable, script, "--base", "HEAD", "--head", "HEAD", *args], capture_output=True,
                          text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "3 launches compiled for sm_90 in each tree; 0 differ from HEAD"
    bad = subprocess.run([sys.executable, script, "--base", "no-such-revision", *args], capture_output=True, text=True,
                         cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("error: no such revision") and "Traceback" not in bad.stderr
