"""`aqua generate` and the one-call API: streaming output, dense comparison, pipeline use, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from aqua_cli.methods import load_patched, patch
from aqua_cli.commands import main
from aqua_cli.errors import ConfigError
from aqua_cli.generation import SamplingConfig, attention_flops_saved, first_divergence, generate_text

from conftest import tiny_artifact


@pytest.fixture(scope="module")
def tiny_setup(model_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    art = tiny_artifact(model, "llama")
    path = art.save(tmp_path_factory.mktemp("gen") / "art")
    return model, tokenizer, path


def run(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def test_full_k_generation_equals_dense(tiny_setup):
    model, tokenizer, path = tiny_setup
    config = SamplingConfig(max_new_tokens=12)
    dense = generate_text(model, tokenizer, "def function(x): return", config)
    with patch(model, str(path), k=1.0, mode="dynamic"):
        aqua = generate_text(model, tokenizer, "def function(x): return", config)
    assert aqua.new_ids == dense.new_ids and len(aqua.new_ids) == 12
    assert first_divergence(aqua.new_ids, dense.new_ids) is None


def test_pipeline_runs_a_patched_model(tiny_setup):
    from transformers import pipeline

    model, tokenizer, path = tiny_setup
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    dense = pipe("class Foo", max_new_tokens=6, do_sample=False)[0]["generated_text"]
    with patch(model, str(path), k=1.0):
        aqua = pipe("class Foo", max_new_tokens=6, do_sample=False)[0]["generated_text"]
    assert aqua == dense


def test_cli_generate_streams_and_reports(capsys, model_dir, tiny_setup, tmp_path):
    _, _, path = tiny_setup
    code, out, err = run(
        capsys, "generate", str(model_dir), "The value of", "--artifact", str(path), "--k", "0.5",
        "--max-new-tokens", "8", "--device", "cpu", "--json", str(tmp_path / "g.json"),
    )
    assert code == 0, err
    report = json.loads((tmp_path / "g.json").read_text())
    assert report["new_tokens"] == 8 and report["dims"] == 8 and report["prompt_tokens"] > 0
    assert report["text"] and report["text"] in out  # streamed to stdout
    assert "tok/s" in err and "attention FLOPs saved" in err


def test_cli_generate_compare_marks_first_difference(capsys, model_dir, tiny_setup, tmp_path):
    _, _, path = tiny_setup
    code, out, err = run(
        capsys, "generate", str(model_dir), "--artifact", str(path), "--k", "1.0", "--compare",
        "--max-new-tokens", "6", "--device", "cpu", "--json", str(tmp_path / "c.json"), "the",
    )
    assert code == 0, err
    report = json.loads((tmp_path / "c.json").read_text())
    assert report["first_divergence"] is None and report["dense_text"] == report["text"]
    assert "identical outputs" in out


def test_prompt_from_file_and_stdin(capsys, model_dir, tiny_setup, tmp_path, monkeypatch):
    import io

    _, _, path = tiny_setup
    (tmp_path / "p.txt").write_text("import os")
    code, _, err = run(capsys, "generate", str(model_dir), "--prompt-file", str(tmp_path / "p.txt"), "--artifact", str(path), "--max-new-tokens", "2")
    assert code == 0, err
    monkeypatch.setattr("sys.stdin", io.StringIO("from x import y"))
    code, _, err = run(capsys, "generate", str(model_dir), "-", "--artifact", str(path), "--max-new-tokens", "2")
    assert code == 0, err


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--k", "2.5"], "outside (0, 1]"),
        (["--mode", "fast"], "unknown mode"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
        (["--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--chat"], "chat template"),
    ],
)
def test_bad_input(capsys, model_dir, tiny_setup, extra, needle):
    _, _, path = tiny_setup
    code, _, err = run(capsys, "generate", str(model_dir), "hello", "--artifact", str(path), *extra)
    assert code == 1 and needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_foreign_artifact_is_refused(capsys, model_dir):
    code, _, err = run(capsys, "generate", str(model_dir), "hello")  # default: registry entry named after the model -> missing
    assert code == 1 and "not found" in err
    code, _, err = run(capsys, "generate", str(model_dir), "hello", "--artifact", "HuggingFaceTB--SmolLM2-135M-Instruct")
    assert code == 1 and "calibrated for HuggingFaceTB/SmolLM2-135M-Instruct" in err


def test_flops_saved_follows_the_break_even():
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128, num_hidden_layers=2)
    short = attention_flops_saved(cfg, 64, 16, 4)
    long = attention_flops_saved(cfg, 64, 8192, 4)
    assert short < 0 < long < 0.5  # the projection costs more than it saves on short prompts
    assert attention_flops_saved(cfg, 128, 8192, 4) < 0  # k = d saves nothing


def test_sampling_config_validates():
    with pytest.raises(ConfigError):
        SamplingConfig(temperature=-1)


@pytest.mark.slow
def test_load_patched_default_smollm2(smollm2):
    model, tokenizer, handle = load_patched(k=1.0, device="cpu")
    try:
        assert handle.artifact.model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
        ids = tokenizer("Paris is", return_tensors="pt").input_ids
        with torch.no_grad():
            got = model(ids).logits
            handle.remove()
            ref = model(ids).logits
        assert float((got - ref).norm() / ref.norm()) <= 1e-4
    finally:
        handle.remove()
