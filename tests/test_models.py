"""Model names, fingerprints and loading errors (no network: the Hub path must fail fast and clearly)."""

from __future__ import annotations

import pytest
from tiny_models import tiny_config, tiny_model

from aqua_cli.errors import ConfigError, ModelLoadError
from aqua_cli.models import (
    fingerprint_hash,
    load_model,
    model_fingerprint,
    parse_device,
    parse_dtype,
    resolve_model,
)


def test_resolve_kinds(tmp_path):
    src = resolve_model("meta-llama/Llama-3.1-8B", revision="main")
    assert (src.kind, src.model_id, src.revision) == ("hub", "meta-llama/Llama-3.1-8B", "main")
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    local = resolve_model(str(tmp_path / "m"))
    assert local.kind == "local"


@pytest.mark.parametrize(
    "name, message",
    [
        ("/definitely/not/here.gguf", "GGUF file not found"),
        ("not a model!", "neither a local path nor a valid Hub id"),
        ("a/b/c", "neither a local path nor a valid Hub id"),
    ],
)
def test_resolve_errors(name, message):
    with pytest.raises(ModelLoadError, match=message):
        resolve_model(name)


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "f.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf model"):
        resolve_model(str(tmp_path / "f.bin"))


def test_unreachable_hub_model_fails_fast():
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        load_model(resolve_model("nobody/no-such-model-aqua"), "cpu")


def test_fingerprint_covers_shape_and_rope():
    a = model_fingerprint(tiny_config("llama"))
    assert a["architecture"] == "llama" and a["num_kv_heads"] == 2 and a["head_dim"] == 16
    cfg = tiny_config("llama")
    cfg.rope_parameters = {**cfg.rope_parameters, "rope_theta": 1234.0}
    assert fingerprint_hash(model_fingerprint(cfg)) != fingerprint_hash(a)
    g = model_fingerprint(tiny_config("gemma3"))
    assert g["head_dim"] == 256


def test_parse_dtype_and_device():
    import torch

    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("auto") is None
    with pytest.raises(ConfigError, match="unknown dtype"):
        parse_dtype("int3")
    assert parse_device("cpu").type == "cpu"
    with pytest.raises(ConfigError, match="unknown device"):
        parse_device("tpu:banana")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            parse_device("cuda")
