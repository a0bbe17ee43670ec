"""`aqua bench`: sequence parsing, cost model, the CPU reference run end to end, and one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import assert_one_line_error, run

from aqua_cli.bench import measured_break_even, parse_seq
from aqua_cli.cost import cost_model, paper_break_even
from aqua_cli.models import PRESETS
from aqua_cli.errors import ConfigError


def test_parse_seq_forms():
    assert parse_seq("64..512") == [64, 128, 256, 512]
    assert parse_seq("64..4096:x4") == [64, 256, 1024, 4096]
    assert parse_seq("4096,1024") == [1024, 4096]
    assert parse_seq("..256") == [64, 128, 256]
    assert parse_seq("1k..4k") == [1024, 2048, 4096]
    assert parse_seq("100..300") == [100, 200]


@pytest.mark.parametrize("spec", ["4096..64", "0..64", "a..b", "64..x", "", "64..4096:x1", "1,abc", str(1 << 30)])
def test_parse_seq_rejects(spec):
    with pytest.raises(ConfigError):
        parse_seq(spec)


def test_cost_model_byte_bounds_match_the_perf_notes():
    shape = PRESETS["llama-3.1-8b"]
    dims = cost_model(shape, 8, 32768, "decode", 64)
    assert dims["byte_bound_speedup"] == pytest.approx(4 / 3)
    assert cost_model(shape, 8, 32768, "decode", 96)["byte_bound_speedup"] == pytest.approx(2 / 1.75)
    topt = cost_model(shape, 8, 32768, "decode", 64, token_ratio=1 / 16)
    assert topt["byte_bound_speedup"] == pytest.approx(2 / (0.5 + 2 / 16))
    assert dims["flop_ratio"] < 1.0 and cost_model(shape, 1, 64, "decode", 64)["flop_ratio"] > 1.0


def test_paper_break_even_is_where_flops_cross():
    shape = PRESETS["llama-3.1-8b"]
    length = paper_break_even(128, 64)
    assert length == pytest.approx((128 * 128 + 128) / 64)
    assert cost_model(shape, 1, int(length) - 1, "decode", 64)["flop_ratio"] > 1.0
    assert cost_model(shape, 1, int(length) + 1, "decode", 64)["flop_ratio"] < 1.0


def test_measured_break_even_needs_every_longer_length():
    rows = [{"impl": "a", "k": 0.5, "seq": s, "speedup_vs_dense": x} for s, x in [(64, 1.2), (128, 0.9), (256, 1.1), (512, 1.3)]]
    assert measured_break_even(rows, "a") == 256
    assert measured_break_even(rows[:2], "a") is None


def test_bench_cpu_end_to_end(capsys, tmp_path):
    target, plot = tmp_path / "b.json", tmp_path / "b.png"
    code, out, err = run(capsys, "bench", "--seq", "16,48", "--model", "smollm2-135m", "--k", "0.5", "--tokens", "1/4",
                         "--repeats", "2", "--select-block", "16", "--json", str(target), "--plot", str(plot))
    assert code == 0, err
    data = json.loads(target.read_text())
    rows = data["rows"]
    shape = PRESETS["smollm2-135m"]
    elem = 2 if data["config"]["dtype"] in ("bfloat16", "float16") else 4  # CPU default: float32
    assert {r["seq"] for r in rows} == {16, 48}
    for seq in (16, 48):
        here = {r["impl"]: r for r in rows if r["seq"] == seq}
        assert {"dense", "reference", "reference-topt-1/4"} <= here.keys()
        assert sum(r["impl"] == "dense" for r in rows if r["seq"] == seq) == 1  # timed once per length
        dense = here["dense"]
        assert (dense["k"], dense["dims"], dense["speedup_vs_dense"]) == (1.0, shape.head_dim, 1.0)
        for name, ratio in (("reference", None), ("reference-topt-1/4", 0.25)):
            row = here[name]
            assert row["phase"] == "decode" and row["batch"] == 1 and row["k"] == 0.5 and row["token_ratio"] == ratio
            assert row["dims"] == shape.head_dim // 2
            assert row["latency_us"] > 0 and dense["latency_us"] > 0
            # the speedup is the ratio of the two measured latencies, and the byte model is the cost model's
            assert row["speedup_vs_dense"] == pytest.approx(dense["latency_us"] / row["latency_us"], rel=1e-3, abs=1e-4)  # rows round to 4 places
            model = cost_model(shape, 1, seq, "decode", row["dims"], ratio, elem)
            assert row["model_bytes"] == model["aqua_bytes"] and dense["model_bytes"] == model["dense_bytes"]
            assert row["byte_bound_speedup"] == pytest.approx(model["byte_bound_speedup"], rel=1e-3)
    assert plot.read_bytes()[:4] == b"\x89PNG" and "reference" in out


def test_bench_prefill_cpu(capsys, tmp_path):
    target = tmp_path / "p.json"
    code, _, err = run(capsys, "bench", "--phase", "prefill", "--seq", "32", "--model", "smollm2-135m", "--repeats", "1", "--json", str(target))
    assert code == 0, err
    assert {r["impl"] for r in json.loads(target.read_text())["rows"]} == {"dense", "aqua-static"}


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--seq", "4096..64"], "reversed"),
        (["--seq", "0"], "at least 1"),
        (["--seq", "abc"], "not a number"),
        (["--seq", "64..99999999999"], "limit"),
        (["--k", "1.5"], "outside (0, 1]"),
        (["--k", "0"], "outside (0, 1]"),
        (["--tokens", "2"], "outside (0, 1]"),
        (["--model", "no-such-preset"], "unknown model"),
        (["--phase", "train"], "unknown phase"),
        (["--gqa", "row"], "unknown --gqa"),
        (["--batch", "0"], "--batch"),
    ],
)
def test_bench_bad_input_is_one_line(capsys, args, needle):
    code, _, err = run(capsys, "bench", "--seq", "16", *args) if "--seq" not in args else run(capsys, "bench", *args)
    assert_one_line_error(code, err, needle)


def test_bench_cuda_without_cuda_is_one_line(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = run(capsys, "bench", "--device", "cuda", "--seq", "16")
    assert_one_line_error(code, err, "CUDA is not available")


def test_each_row_is_checked_against_its_own_reference():
    """A fused row's error is measured against the reference of the same selection (the references run after every
    fused row now, so they can no longer be matched by order)."""
    from aqua_cli.bench import _reference_of

    assert _reference_of("aqua-dims") == _reference_of("hybrid-dims") == "reference"
    assert _reference_of("aqua-pages-1/16") == "reference-pages-1/16"
    assert _reference_of("aqua-planes-1/32") == "reference-planes-1/32"
    assert _reference_of("hybrid-topt-1/16") == "reference-topt-1/16"
    assert _reference_of("aqua-rerank-1/16") == "reference-rerank-1/16"
    assert _reference_of("dense") == _reference_of("reference-pages-1/16") == ""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (and Triton for the AQUA kernels)")
def test_bench_rows_on_gpu_agree_with_their_references():
    """On a GPU every fused row carries its error against its own reference, and each is small (pages: the same
    pages chosen as by the reference on the same scores, so only rounding differs); references are timed last."""
    from aqua_cli.bench import BenchConfig, run_bench

    config = BenchConfig(seqs=[3000], batch=2, ks=[0.5, 0.75], device="cuda", token_ratios=[1 / 8], repeats=2, warmup=1,
                         hybrid=True)
    rows = run_bench(config, PRESETS["llama-3.1-8b"])
    page_errs = []
    for k in (0.5, 0.75):
        fused = [r for r in rows if r["k"] == k and r["impl"].split("-")[0] in ("aqua", "hybrid") and r.get("uses_aqua", True)]
        assert {r["impl"] for r in fused} >= {"aqua-dims", "aqua-topt-1/8", "aqua-pages-1/8", "aqua-planes-1/8", "aqua-rerank-1/8"}
        for r in fused:
            if r.get("granularity") == "pages":  # a near-tie may swap one page between kernel and reference
                assert r["rel_err_vs_reference"] < 0.1, r
                page_errs.append(r["rel_err_vs_reference"])
            else:
                assert r["rel_err_vs_reference"] < 2e-2, r
    assert sorted(page_errs)[len(page_errs) // 2] < 2e-2, page_errs
    assert [r["impl"] for r in rows][0] == "dense"
