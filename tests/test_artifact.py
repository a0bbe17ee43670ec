"""The artifact: round trip, verification before use, atomic writes, registry names."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from conftest import tiny_artifact
from safetensors.torch import load_file, save_file
from tiny_models import tiny_model

from aqua_cli.artifact import TENSOR_FILE, Artifact, encode_metadata, registry_name
from aqua_cli.registry import load_artifact, resolve_artifact
from aqua_cli.errors import ArtifactError


@pytest.fixture(scope="module")
def art():
    return tiny_artifact(tiny_model("llama"), "llama")


def test_round_trip_is_byte_identical(art, tmp_path):
    path = art.save(tmp_path / "a")
    loaded = Artifact.load(path)
    for a, b in zip(art.projections, loaded.projections):
        assert torch.equal(a, b)
    assert loaded.metadata["fingerprint"] == art.fingerprint
    assert loaded.metadata["tokens"] == art.metadata["tokens"]
    card = (path / "README.md").read_text()
    assert card.startswith("---\nbase_model: tiny/llama\nlibrary_name: aqua_cli\ntags:\n- aqua")
    assert set(p.name for p in path.iterdir()) == {TENSOR_FILE, "README.md"}


def test_existing_artifact_needs_force(art, tmp_path):
    path = art.save(tmp_path / "a")
    with pytest.raises(ArtifactError, match="--force"):
        art.save(path)
    art.save(path, force=True)
    assert Artifact.load(path)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".a.")] == [".a.lock"]


def test_failed_write_leaves_nothing(art, tmp_path, monkeypatch):
    import safetensors.torch

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(ArtifactError, match="No space left"):
        art.save(tmp_path / "a")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".a.lock"]


def test_failed_replace_keeps_the_old_artifact(art, tmp_path, monkeypatch):
    path = art.save(tmp_path / "a")
    before = (path / TENSOR_FILE).read_bytes()
    import aqua_cli.artifact as mod

    monkeypatch.setattr(mod, "model_card", lambda a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        art.save(path, force=True)
    assert (path / TENSOR_FILE).read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def _rewrite(path: Path, mutate, reseal: bool = False) -> None:
    """Change the file behind aqua's back; ``reseal`` recomputes both hashes, as a careful forger would."""
    file = path / TENSOR_FILE
    from safetensors import safe_open

    from aqua_cli.artifact import provenance_sha256, tensors_sha256

    with safe_open(str(file), "pt") as fh:
        meta = fh.metadata()
    tensors = load_file(str(file))
    mutate(tensors, meta)
    if reseal:
        meta["tensors_sha256"] = tensors_sha256(tensors)
        meta["provenance_sha256"] = provenance_sha256(meta)
    save_file(tensors, str(file), metadata=meta)


def test_tampered_tensor_is_refused(art, tmp_path):
    path = art.save(tmp_path / "a")
    _rewrite(path, lambda t, m: t["layers.0.projection"].mul_(1.0001))
    with pytest.raises(ArtifactError, match="sha256"):
        Artifact.load(path)


def test_tampered_fingerprint_is_refused(art, tmp_path):
    path = art.save(tmp_path / "a")

    def mutate(t, m):
        fp = json.loads(m["fingerprint"])
        fp["head_dim"] = 32
        m["fingerprint"] = json.dumps(fp)

    _rewrite(path, mutate)
    with pytest.raises(ArtifactError, match="fingerprint hash"):
        Artifact.load(path)


def test_wrong_shape_is_refused(art, tmp_path):
    bad = Artifact([p[:, :8, :8].contiguous() for p in art.projections], [s[:, :8].contiguous() for s in art.singular_values], dict(art.metadata))
    with pytest.raises(ArtifactError, match="shape"):
        bad.save(tmp_path / "b")
    # and the same written behind our back (valid sha256 of the wrong tensors)
    path = art.save(tmp_path / "a")

    def mutate(t, m):
        t["layers.1.projection"] = t["layers.1.projection"][:, :8, :8].contiguous()

    _rewrite(path, mutate, reseal=True)
    with pytest.raises(ArtifactError, match="shape"):
        Artifact.load(path)


def test_wrong_dtype_is_refused(art, tmp_path):
    path = art.save(tmp_path / "a")

    def mutate(t, m):
        t["layers.0.projection"] = t["layers.0.projection"].double()

    _rewrite(path, mutate, reseal=True)
    with pytest.raises(ArtifactError, match="dtype"):
        Artifact.load(path)


def test_missing_layer_is_refused(art, tmp_path):
    path = art.save(tmp_path / "a")

    def mutate(t, m):
        del t["layers.1.singular_values"]

    _rewrite(path, mutate, reseal=True)
    with pytest.raises(ArtifactError, match="missing tensor"):
        Artifact.load(path)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty or truncated"),
        (b"\x01\x02", "empty or truncated"),
        (pickle.dumps({"layers.0.projection": [1, 2, 3]}), "not a safetensors file"),
        (b"PK\x03\x04" + b"\x00" * 100, "not a safetensors file"),
    ],
)
def test_garbage_files_are_refused(tmp_path, content, message):
    (tmp_path / TENSOR_FILE).write_bytes(content)
    with pytest.raises(ArtifactError, match=message):
        Artifact.load(tmp_path)


def test_torch_save_pickle_is_never_unpickled(tmp_path):
    torch.save({"layers.0.projection": torch.eye(4)}, tmp_path / TENSOR_FILE)
    with pytest.raises(ArtifactError, match="not a safetensors file"):
        Artifact.load(tmp_path)


def test_truncated_file_is_refused(art, tmp_path):
    path = art.save(tmp_path / "a")
    data = (path / TENSOR_FILE).read_bytes()
    (path / TENSOR_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="truncated or corrupt"):
        Artifact.load(path)


def test_foreign_safetensors_is_refused(tmp_path):
    save_file({"weight": torch.zeros(2, 2)}, str(tmp_path / TENSOR_FILE))
    with pytest.raises(ArtifactError, match="not an aqua artifact"):
        Artifact.load(tmp_path)


def test_future_format_is_refused(art, tmp_path):
    path = art.save(tmp_path / "a")
    _rewrite(path, lambda t, m: m.update(format_version="99"))
    with pytest.raises(ArtifactError, match="format version"):
        Artifact.load(path)


def test_registry_names_and_resolution(art, tmp_path, monkeypatch):
    assert registry_name("meta-llama/Llama-3.1-8B") == "meta-llama--Llama-3.1-8B"
    assert registry_name("/models/local-llama") == "local-llama"
    monkeypatch.setenv("AQUA_REGISTRY", str(tmp_path))
    art.save(tmp_path / "tiny--llama")
    assert resolve_artifact("tiny/llama") == tmp_path / "tiny--llama"
    assert resolve_artifact("tiny--llama") == tmp_path / "tiny--llama"
    assert load_artifact(str(tmp_path / "tiny--llama" / TENSOR_FILE)).model_id == "tiny/llama"
    with pytest.raises(ArtifactError, match="not found"):
        resolve_artifact("nobody--nothing")


def test_metadata_is_strings(art):
    assert all(isinstance(v, str) for v in encode_metadata(art.metadata).values())


def test_shipped_artifact_is_valid(shipped_artifact):
    assert shipped_artifact.model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert shipped_artifact.metadata["tokens"] >= 50_000
    assert shipped_artifact.num_layers == 30 and shipped_artifact.num_groups == 3 and shipped_artifact.head_dim == 64
