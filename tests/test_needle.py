"""Needle in a haystack and the `aqua needle` / `aqua memory` commands: scoring, prompt building, a run
on a tiny model (H2O that evicts nothing answers as dense), then bad input as one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_artifact
from test_cli import assert_one_line_error, run
from transformers import AutoModelForCausalLM, AutoTokenizer

from aqua_cli.data import DataSpec
from aqua_cli.errors import ConfigError
from aqua_cli.methods import H2O, Dense
from aqua_cli.needle import NeedleConfig, build_cells, run_grid, score


@pytest.fixture(scope="module")
def tiny_dir(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model_dir, model, tokenizer


def test_grid_h2o_without_eviction_answers_as_dense(tiny_dir, tmp_path):
    _, model, tokenizer = tiny_dir
    config = NeedleConfig(lengths=(160,), depths=(0.5,), data=DataSpec("pydoc"), max_new_tokens=6)
    methods = [Dense(), H2O(512), H2O(16)]
    rows = run_grid(model, tokenizer, methods, config)
    dense, full, small = rows
    assert full.answer == dense.answer and full.kv_bytes > dense.kv_bytes  # + the per-token scores
    assert dense.kv_bytes == dense.dense_kv_bytes  # the byte formula agrees with the real dense cache
    assert small.kv_bytes < dense.kv_bytes / 2


def test_cells_have_the_length_the_needle_and_the_same_codes(tiny_dir):
    _, _, tokenizer = tiny_dir
    config = NeedleConfig(lengths=(160, 224), depths=(0.1, 0.9), data=DataSpec("pydoc"))
    cells = build_cells(tokenizer, config)
    again = build_cells(tokenizer, config)
    assert [c.code for c in cells] == [c.code for c in again]
    for cell in cells:
        assert abs(cell.input_ids.shape[1] - cell.length) <= 8
        # this tiny tokenizer has no decoder: undo its byte-level markers to read the text back
        text = tokenizer.decode(cell.input_ids[0]).replace(" ", "").replace("Ġ", " ").replace("Ċ", "\n")
        assert f"The secret passcode is {cell.code}." in text
        needle = text.index("The secret passcode is")
        where = needle / (text.index("What is the secret") - len(f"The secret passcode is {cell.code}. "))
        assert abs(where - cell.depth) < 0.2  # the needle sits near its depth


@pytest.mark.parametrize(
    "answer, ok",
    [(" 4-7-1-9.", True), ("4719", True), ("is 4, 7, 1, 9", True), ("4-7-1-8", False), ("4-7", False),
     ("", False), ("\n4-7-1-9", True), ("no.\n4-7-1-9", False), ("14-7-1-92", True), ("4-7-3-1-9", False)],
)
def test_score_is_exact_digits_on_the_first_line(answer, ok):
    assert score(answer, "4-7-1-9") is ok


def test_needle_command_end_to_end(capsys, tiny_dir, tmp_path):
    model_dir, model, _ = tiny_dir
    art = tiny_artifact(model, "llama")
    art.save(tmp_path / "art")
    code, _out, err = run(
        capsys, "needle", str(model_dir), "--artifact", str(tmp_path / "art"), "--lengths", "160", "--depths", "0.5",
        "--k", "0.5", "--h2o-budget", "0.5", "--data", "pydoc", "--max-new-tokens", "4", "--device", "cpu",
        "--json", str(tmp_path / "n.json"), "--plot", str(tmp_path / "n.png"),
    )
    assert code == 0, err
    payload = json.loads((tmp_path / "n.json").read_text())
    methods = {(r["method"], r["k"], r["h2o_budget"]) for r in payload["rows"]}
    assert methods == {("dense", None, None), ("aqua", 0.5, None), ("h2o", None, 0.5), ("aqua+h2o", 0.75, 0.5)}
    for r in payload["rows"]:
        assert {"method", "k", "kv_dims", "h2o_budget", "kv_bytes", "dense_kv_bytes", "accuracy"} <= set(r)
    assert (tmp_path / "n.png").read_bytes()[:4] == b"\x89PNG"


def test_memory_command_end_to_end(capsys, tiny_dir, tmp_path):
    model_dir, model, _ = tiny_dir
    art = tiny_artifact(model, "llama")
    art.save(tmp_path / "art")
    code, out, err = run(
        capsys, "memory", str(model_dir), "--artifact", str(tmp_path / "art"), "--kv-dims", "0.5,1.0", "--k", "0.5",
        "--h2o-budget", "8", "--seq-len", "32", "--tokens", "64", "--prompt-len", "16", "--device", "cpu", "--json", "-",
        "--plot", str(tmp_path / "m.png"),
    )
    assert code == 0, err
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
    rows = json.loads(out[out.index('{\n  "rows"'):])["rows"]
    kv = {(r["method"], r["k"], r["kv_dims"]): r for r in rows if "prompt_len" not in r}
    by = {(r["method"], r["k"], r["h2o_budget"]): r for r in rows if "prompt_len" in r}
    dense = kv[("dense", None, None)]
    half = kv[("kv-proj", None, 0.5)]
    assert half["key_bytes"] * 2 == dense["kv_bytes"] // 2 and half["value_bytes"] == dense["kv_bytes"] // 2
    assert abs(kv[("kv-proj", None, 1.0)]["ppl"] - dense["ppl"]) <= 1e-3 * dense["ppl"]
    assert ("kv-proj+aqua", 0.5, 0.5) in kv
    assert by[("h2o", None, 8)]["kv_bytes"] < by[("dense", None, None)]["kv_bytes"] / 2
    assert ("aqua+h2o", 0.5, 8) in by


@pytest.mark.parametrize(
    "args, needle",
    [
        (["needle", "--h2o-budget", "0"], "--h2o-budget must be at least 2"),
        (["needle", "--h2o-budget", "1.5"], "outside (0, 1]"),
        (["needle", "--depths", "1.5"], "outside [0, 1]"),
        (["needle", "--lengths", "10"], "too short"),
        (["needle", "--lengths", "abc"], "--lengths takes integers"),
        (["memory", "--h2o-budget", "-0.5"], "budget"),
        (["memory", "--kv-dims", "0"], "invalid --kv-dims"),
        (["memory", "--kv-dims", "", "--h2o-budget", ""], "nothing to measure"),
        (["memory", "{model}", "--artifact", "{art}", "--kv-dims", "999"], "more than head_dim"),
        (["memory", "{model}", "--artifact", "{shipped}"], "calibrated for"),
        (["needle", "{model}", "--artifact", "{shipped}", "--lengths", "160"], "calibrated for"),
    ],
)
def test_bad_input_is_one_line(capsys, tiny_dir, tmp_path, shipped_artifact, args, needle):
    model_dir, model, _ = tiny_dir
    art = tmp_path / "art"
    if any("{art}" in a for a in args):
        tiny_artifact(model, "llama").save(art)
    args = [a.format(model=model_dir, art=art, shipped=shipped_artifact.path) for a in args]
    code, _, err = run(capsys, *args)
    assert_one_line_error(code, err, needle)


def test_needle_config_refuses_more_positions_than_the_model_has():
    with pytest.raises(ConfigError, match="exceeds the model's 256 positions"):
        NeedleConfig(lengths=(512,)).validate(256)


@pytest.mark.slow
def test_smollm2_finds_the_needle_dense_and_with_full_h2o(smollm2):
    """Dense SmolLM2 retrieves a 512-token needle; H2O whose budget holds everything answers the same."""
    from aqua_cli.methods import patch_h2o
    from aqua_cli.needle import answer

    _, model, tokenizer = smollm2
    cell = build_cells(tokenizer, NeedleConfig(lengths=(512,), depths=(0.5,)))[0]
    dense, _ = answer(model, tokenizer, cell, None, 12)
    with patch_h2o(model, 1024) as h:
        full, cache = answer(model, tokenizer, cell, h.new_cache(), 12)
    assert score(dense, cell.code) and full == dense
    assert cache.get_seq_length() > cell.input_ids.shape[1]
    assert all(layer.keys.shape[-2] == cache.get_seq_length() for layer in cache.layers)  # nothing evicted
