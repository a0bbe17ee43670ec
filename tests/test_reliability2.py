"""Reliability, round 2 (issue 19): --force never loses data, output checks come before any work, user text
is printed literally, the Hub never hangs, every load is verified, and the smaller one-line errors.
Through the real CLI where the CLI is what a user meets; the Hub cases with a stalled loopback endpoint
are in tests/test_hub.py beside the other Hub tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_artifact
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import tiny_model

from aqua_cli.artifact import TENSOR_FILE, Artifact, provenance_sha256, tensors_sha256
from aqua_cli.commands import main
from aqua_cli.errors import AquaWarning, ArtifactError

SHORT = ["--tokens", "512", "--seq-len", "64", "--device", "cpu"]


@pytest.fixture(scope="module")
def art():
    return tiny_artifact(tiny_model("llama"), "llama")


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if a command loads model weights (the checks under test must come first)."""
    import aqua_cli.models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(aqua_cli.models, "load_model", refuse)


def run(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def one_line_error(code: int, err: str, *needles: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 1, err
    assert len(lines) == 1 and lines[0].startswith("Error:"), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def user_files(root: Path) -> dict[str, bytes]:
    """A folder of someone's own files; returns their contents to compare after."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "notes.txt").write_text("my notes")
    (root / "sub").mkdir(exist_ok=True)
    (root / "sub" / "data.bin").write_bytes(b"\x00\x01")
    return snapshot(root)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def reseal(path: Path, mutate) -> None:
    """Change an artifact file and recompute both hashes, as a careful forger (or a buggy tool) would."""
    file = path / TENSOR_FILE
    with safe_open(str(file), "pt") as fh:
        meta = dict(fh.metadata())
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open is not a dict
    mutate(tensors, meta)
    meta["tensors_sha256"] = tensors_sha256(tensors)
    meta["provenance_sha256"] = provenance_sha256(meta)
    save_file(tensors, str(file), metadata=meta)


# -- 1. --force never loses data ------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["dir", "cwd", "symlink", "dotdot"])
def test_force_never_replaces_a_folder_of_user_files(capsys, model_dir, tmp_path, monkeypatch, no_model_load, how):
    mine = tmp_path / "mine"
    before = user_files(mine)
    out = {"dir": str(mine), "cwd": ".", "symlink": str(tmp_path / "link"), "dotdot": str(tmp_path / "x" / ".." / "mine")}[how]
    if how == "cwd":
        monkeypatch.chdir(mine)
    if how == "symlink":
        (tmp_path / "link").symlink_to(mine)
    code, _, err = run(capsys, "calibrate", model_dir, *SHORT, "--out", out, "--force")
    one_line_error(code, err, "not an aqua artifact", "even with --force")
    assert snapshot(mine) == before


def test_force_refuses_an_output_inside_an_artifact(capsys, model_dir, tmp_path, art, no_model_load):
    target = art.save(tmp_path / "art")
    before = snapshot(target)
    for out in (target / TENSOR_FILE, target / "sub", target / "README.md" / "x"):
        code, _, err = run(capsys, "calibrate", model_dir, *SHORT, "--out", out, "--force")
        one_line_error(code, err, "is inside the artifact")
    assert snapshot(target) == before
    Artifact.load(target)


def test_force_refuses_a_file_and_a_symlink_loop(capsys, model_dir, tmp_path, no_model_load):
    (tmp_path / "afile").write_text("keep me")
    code, _, err = run(capsys, "calibrate", model_dir, *SHORT, "--out", tmp_path / "afile", "--force")
    one_line_error(code, err, "is not a directory")
    assert (tmp_path / "afile").read_text() == "keep me"
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    code, _, err = run(capsys, "calibrate", model_dir, *SHORT, "--out", tmp_path / "loop", "--force")
    one_line_error(code, err, "cannot be resolved")


def test_force_replaces_an_artifact_and_an_empty_dir_is_used(capsys, model_dir, tmp_path, art):
    target = art.save(tmp_path / "art")
    code, _, err = run(capsys, "calibrate", model_dir, *SHORT, "--out", tmp_path / "sub" / ".." / "art", "--force")
    assert code == 0, err
    assert Artifact.load(target).model_id != art.model_id  # the new one, from model_dir
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "calibrate", model_dir, *SHORT, "--out", tmp_path / "empty")
    assert code == 0, err
    Artifact.load(tmp_path / "empty")


def test_existing_artifact_without_force_is_refused_before_loading(capsys, model_dir, tmp_path, art, no_model_load):
    target = art.save(tmp_path / "art")
    code, _, err = run(capsys, "calibrate", model_dir, *SHORT, "--out", target)
    one_line_error(code, err, "already exists", "--force")


def test_save_api_refuses_user_files_with_force(tmp_path, art):
    before = user_files(tmp_path / "mine")
    with pytest.raises(ArtifactError, match="not an aqua artifact"):
        art.save(tmp_path / "mine", force=True)
    assert snapshot(tmp_path / "mine") == before


@pytest.mark.parametrize("name", ["*", "a*", "[ab]", "?"])
def test_glob_characters_in_out_never_touch_other_writers(tmp_path, art, name):
    """Stale-write cleanup matches its own debris literally: another writer's temporary and moved-aside
    directories (here of artifacts "a" and "b") survive a save to a name with glob characters."""
    others = [".a.tmp-abcd1234", ".b.tmp-zz99zz99", ".a.old-4242", ".ab.old-17"]
    for other in others:
        (tmp_path / other).mkdir()
        (tmp_path / other / TENSOR_FILE).write_bytes(b"someone else's half-written artifact")
    art.save(tmp_path / name)
    art.save(tmp_path / name, force=True)
    for other in others:
        assert (tmp_path / other / TENSOR_FILE).read_bytes() == b"someone else's half-written artifact"
    Artifact.load(tmp_path / name)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing was "restored" either


def test_artifacts_get_umask_permissions(tmp_path, art):
    old = os.umask(0o022)
    try:
        path = art.save(tmp_path / "art")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in path.iterdir()} == {TENSOR_FILE: 0o644, "README.md": 0o644}


# -- 2. output checks before any work; finite locks -------------------------------------------------------
@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
def test_special_output_path_is_one_line_at_once(capsys, model_dir, no_model_load, monkeypatch):
    monkeypatch.setenv("AQUA_LOCK_TIMEOUT", "600")  # a lock wait would show as a hang, and blame another process
    code, _, err = run(capsys, "calibrate", model_dir, *SHORT, "--out", "/proc/self/aqua-art")
    line = one_line_error(code, err, "cannot write in /proc/")
    assert "another aqua process" not in line


@pytest.mark.parametrize("value", ["-1", "inf", "nan", "abc", "1e9"])
def test_lock_timeout_must_be_finite(capsys, model_dir, tmp_path, monkeypatch, no_model_load, value):
    from filelock import FileLock

    monkeypatch.setenv("AQUA_LOCK_TIMEOUT", value)
    with FileLock(str(tmp_path / ".art.lock")):  # held: an infinite wait would hang here
        code, _, err = run(capsys, "calibrate", model_dir, *SHORT, "--out", tmp_path / "art")
    one_line_error(code, err, "AQUA_LOCK_TIMEOUT", "not a usable lock timeout")


def test_held_lock_is_reported_before_loading(capsys, model_dir, tmp_path, monkeypatch, no_model_load):
    from filelock import FileLock

    monkeypatch.setenv("AQUA_LOCK_TIMEOUT", "0")
    with FileLock(str(tmp_path / ".art.lock")):
        code, _, err = run(capsys, "calibrate", model_dir, *SHORT, "--out", tmp_path / "art")
    one_line_error(code, err, "another aqua process is writing")
    assert not (tmp_path / "art").exists()


def test_json_onto_a_directory_is_refused_first_and_leaves_nothing(capsys, tmp_path, art):
    (tmp_path / "out").mkdir()
    code, _, err = run(capsys, "list", "--json", tmp_path / "out")
    one_line_error(code, err, "--json", "is a directory")
    assert list((tmp_path / "out").iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    from aqua_cli.cli import write_json
    from aqua_cli.errors import AquaError

    with pytest.raises(AquaError, match="is a directory"):
        write_json(str(tmp_path / "out"), {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_json_and_plot_inside_the_input_artifact_are_refused(capsys, tmp_path, art):
    target = art.save(tmp_path / "art")
    before = snapshot(target)
    for option, name in (("--json", TENSOR_FILE), ("--json", "x.json"), ("--plot", "p.png")):
        code, _, err = run(capsys, "inspect", target, option, target / name)
        one_line_error(code, err, "is inside the artifact")
    assert snapshot(target) == before


def test_plot_reports_the_path_it_wrote(capsys, tmp_path, art):
    target = art.save(tmp_path / "art")
    code, _, err = run(capsys, "inspect", target, "--plot", tmp_path / "plots" / "energy")
    assert code == 0, err
    written = tmp_path / "plots" / "energy.png"
    assert written.is_file() and f"wrote {written}" in err
    code, _, err = run(capsys, "inspect", target, "--plot", tmp_path / "energy.foo")
    one_line_error(code, err, "unknown image format")
    assert not (tmp_path / "energy.foo").exists()


# -- 3. user text is printed literally ---------------------------------------------------------------------
@pytest.mark.parametrize("text", ["[/]", "[bold]x", "[red]a[/red]", ":smile:"])
def test_markup_in_a_path_is_printed_literally(capsys, text):
    code, _, err = run(capsys, "inspect", f"no-such-{text}-artifact")
    one_line_error(code, err, f"no-such-{text}-artifact", "not found")


def test_markup_in_data_name_is_literal(capsys, model_dir, tmp_path):
    code, _, err = run(capsys, "calibrate", model_dir, *SHORT, "--data", f"{tmp_path}/no[/]such[bold]x.txt", "--out", tmp_path / "o")
    one_line_error(code, err, "data file not found", "no[/]such[bold]x.txt")


def test_markup_in_artifact_metadata_is_listed_and_inspected_literally(capsys, tmp_path, monkeypatch, art):
    evil = Artifact(art.projections, art.singular_values, {**art.metadata, "model_id": "org/[/]x[bold]y", "data_id": "[red]d"})
    evil.save(tmp_path / "registry" / "evil")
    monkeypatch.setenv("AQUA_REGISTRY", str(tmp_path / "registry"))
    code, out, err = run(capsys, "list")
    assert code == 0, err
    assert "org/[/]x[bold]y" in out
    code, out, err = run(capsys, "inspect", tmp_path / "registry" / "evil")
    assert code == 0, err
    assert "org/[/]x[bold]y" in out and "[red]d" in out


def test_markup_in_a_model_path_calibrates(capsys, model_dir, tmp_path):
    """The model id (a local path) goes into the loading spinner and the result table."""
    import shutil

    odd = tmp_path / "m[" / "]x[bold]"
    shutil.copytree(model_dir, odd)
    code, out, err = run(capsys, "calibrate", odd, *SHORT, "--out", tmp_path / "art")
    assert code == 0, err
    assert "]x[bold]" in out
    assert Artifact.load(tmp_path / "art").model_id == str(odd)


# -- 4. every load verified --------------------------------------------------------------------------------
def _zero(t, m):
    t["layers.0.projection"].zero_()


def _nan(t, m):
    t["layers.1.projection"][0, 0, 0] = float("nan")


def _scaled(t, m):
    t["layers.1.projection"].mul_(1.01)


def _no_kv_heads(t, m):
    from aqua_cli.models import fingerprint_hash

    fp = json.loads(m["fingerprint"])
    del fp["num_kv_heads"]
    m["fingerprint"] = json.dumps(fp)
    m["fingerprint_hash"] = fingerprint_hash(fp)


def _zero_dim(t, m):
    t["layers.0.singular_values"] = torch.tensor(1.0)


def _nested_metadata(t, m):
    m["extra"] = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (_zero, "not orthogonal"),
        (_nan, "non-finite"),
        (_scaled, "not orthogonal"),
        (_no_kv_heads, "lacks num_kv_heads"),
        (_zero_dim, "layer 0"),
        (_nested_metadata, "malformed aqua metadata"),
    ],
)
def test_resealed_corruption_is_refused_in_one_line(capsys, tmp_path, art, mutate, needle):
    path = art.save(tmp_path / "a")
    reseal(path, mutate)
    with pytest.raises(ArtifactError, match=needle):
        Artifact.load(path)
    code, _, err = run(capsys, "inspect", path)
    one_line_error(code, err, needle)


@pytest.mark.parametrize("key, value", [("model_id", "someone/else"), ("data_id", "other.txt"), ("command", '["aqua", "x"]'), ("seed", "7")])
def test_provenance_edits_are_refused(tmp_path, art, key, value):
    path = art.save(tmp_path / "a")
    file = path / TENSOR_FILE
    with safe_open(str(file), "pt") as fh:
        meta = dict(fh.metadata())
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    meta[key] = value
    save_file(tensors, str(file), metadata=meta)  # tensors and their sha256 untouched
    with pytest.raises(ArtifactError, match="provenance hash does not match"):
        Artifact.load(path)


def test_format_1_is_read_with_a_warning(capsys, tmp_path, art):
    path = art.save(tmp_path / "a")
    file = path / TENSOR_FILE
    with safe_open(str(file), "pt") as fh:
        meta = dict(fh.metadata())
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    meta["format_version"] = "1"
    del meta["provenance_sha256"]
    save_file(tensors, str(file), metadata=meta)
    with pytest.warns(AquaWarning, match="format-1 artifact"):
        assert Artifact.load(path).model_id == art.model_id
    code, _, err = run(capsys, "inspect", path)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("Warning:")]
    assert len(warnings) == 1 and "format-1" in warnings[0]
    # re-saving upgrades it
    with pytest.warns(AquaWarning):
        Artifact.load(path).save(path, force=True)
    assert Artifact.load(path).metadata["format_version"] == "2"


def test_list_shows_broken_entries_and_the_rest(capsys, tmp_path, monkeypatch, art):
    registry = tmp_path / "registry"
    art.save(registry / "good")
    (registry / "list-header").mkdir()
    header = json.dumps([1, 2, 3]).encode()
    (registry / "list-header" / TENSOR_FILE).write_bytes(len(header).to_bytes(8, "little") + header)
    meta_list = json.dumps({"__metadata__": ["tool", "aqua_cli"]}).encode()
    (registry / "meta-is-list").mkdir()
    (registry / "meta-is-list" / TENSOR_FILE).write_bytes(len(meta_list).to_bytes(8, "little") + meta_list)
    nested = b'{"__metadata__": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    (registry / "nested").mkdir()
    (registry / "nested" / TENSOR_FILE).write_bytes(len(nested).to_bytes(8, "little") + nested)
    path = art.save(registry / "meta-list")
    reseal(path, lambda t, m: m.update(fingerprint="[]"))
    monkeypatch.setenv("AQUA_REGISTRY", str(registry))
    code, out, err = run(capsys, "list", "--json", "-")
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out[: out.rindex("]") + 1][out.index("["):]) if r["where"] == "registry"}
    assert rows["good"]["status"] == "ok" and rows["good"]["model"] == "tiny/llama"
    for name in ("list-header", "meta-is-list", "nested", "meta-list"):
        assert rows[name]["status"].startswith("broken: "), rows[name]
    code, out, err = run(capsys, "list")
    assert code == 0, err
    assert "broken" in out and "good" in out


# -- 5. smaller one-line errors -----------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [str(2**64), "-1", "99999999999999999999999999"])
def test_seed_beyond_64_bits(capsys, model_dir, tmp_path, seed, no_model_load):
    code, _, err = run(capsys, "calibrate", model_dir, *SHORT, "--seed", seed, "--out", tmp_path / "o")
    one_line_error(code, err, "--seed must be between 0 and 2**64 - 1")


def test_hf_hub_cache_that_is_a_file(capsys, tmp_path, monkeypatch, art):
    from huggingface_hub import constants

    (tmp_path / "cache-file").write_text("not a folder")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache-file"))
    code, _, err = run(capsys, "pull", "hf://org/repo")
    one_line_error(code, err, "is not a directory", "HF_HUB_CACHE")
    art.save(tmp_path / "registry" / "good")
    monkeypatch.setenv("AQUA_REGISTRY", str(tmp_path / "registry"))
    code, out, err = run(capsys, "list")
    assert code == 0, err
    assert "good" in out and "Warning: the Hugging Face cache is not listed" in err


@pytest.mark.parametrize("name, value", [("HF_HUB_ETAG_TIMEOUT", "abc"), ("HF_HUB_DOWNLOAD_TIMEOUT", "0.5"), ("HF_HUB_DOWNLOAD_TIMEOUT", "-3")])
def test_malformed_hub_timeout_variables(capsys, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    code, _, err = run(capsys, "list")
    one_line_error(code, err, name, "whole number of seconds")


def test_malformed_hub_timeout_in_a_fresh_process(tmp_path):
    """huggingface_hub itself fails at import on this; aqua says it in one line first."""
    env = {**os.environ, "HF_HUB_ETAG_TIMEOUT": "ten", "AQUA_REGISTRY": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "aqua_cli", "pull", "hf://org/repo"], capture_output=True, text=True, env=env, timeout=300, check=False)
    one_line_error(proc.returncode, proc.stderr, "HF_HUB_ETAG_TIMEOUT='ten'")


def test_jsonl_null_text_is_skipped_and_a_bom_is_accepted(tmp_path):
    from aqua_cli.data import DataSpec, load_texts
    from aqua_cli.errors import DataError

    lines = ['{"text": "first doc"}', '{"text": null}', '{"text": "second doc"}']
    (tmp_path / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode())
    assert load_texts(DataSpec(str(tmp_path / "a.jsonl"))) == ["first doc", "second doc"]
    (tmp_path / "b.txt").write_bytes(b"\xef\xbb\xbfhello")
    assert load_texts(DataSpec(str(tmp_path / "b.txt"))) == ["hello"]
    (tmp_path / "c.jsonl").write_text('{"text": 5}\n')
    with pytest.raises(DataError, match="c.jsonl:1: 'text' is int, not a string"):
        load_texts(DataSpec(str(tmp_path / "c.jsonl")))


def test_missing_path_like_data_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    import datasets

    from aqua_cli.data import DataSpec, load_texts
    from aqua_cli.errors import DataError

    def no_hub(*args, **kwargs):
        raise AssertionError("a path was sent to the Hub dataset lookup")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for name in ("data/corpus", "a/b/corpus", "data\\corpus", str(tmp_path / "corpus")):
        with pytest.raises(DataError, match="data file not found"):
            load_texts(DataSpec(name))


def test_unreachable_hub_dataset_is_one_line_at_once(tmp_path, monkeypatch):
    """Not offline, the Hub refuses: the dataset lookup is not tried (its retries take half a minute)."""
    import socket

    import datasets
    from huggingface_hub import constants

    from aqua_cli.data import DataSpec, load_texts
    from aqua_cli.errors import DataError

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: (_ for _ in ()).throw(AssertionError("looked up")))
    with pytest.raises(DataError, match="cannot be reached to look it up as a dataset"):
        load_texts(DataSpec("mycorpus"))


def test_generate_refuses_a_prompt_beyond_the_context(capsys, model_dir, tmp_path, art):
    good = art.save(tmp_path / "art")
    code, _, err = run(capsys, "generate", model_dir, "word " * 400, "--artifact", good, "--device", "cpu")
    one_line_error(code, err, "more than the model's context of 256 tokens", "--max-new-tokens")


def test_a_failed_check_or_load_leaves_nothing_behind(capsys, model_dir, tmp_path, monkeypatch):
    """The checks before work probe without writing: a load that fails after them leaves no lock file,
    no folder, no debris."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_bytes((model_dir / "config.json").read_bytes())  # no weights
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AQUA_REGISTRY", raising=False)
    code, _, err = run(capsys, "calibrate", "nobody/no-such-model-aqua")
    one_line_error(code, err, "not in the local Hugging Face cache")
    code, _, err = run(capsys, "calibrate", tmp_path / "m", *SHORT, "--out", tmp_path / "a" / "b" / "art")
    one_line_error(code, err, "could not load model")
    assert [p.name for p in tmp_path.rglob("*")] == ["m", "config.json"]


def test_malformed_lock_timeout_is_said_before_loading(capsys, model_dir, tmp_path, monkeypatch, no_model_load):
    monkeypatch.setenv("AQUA_LOCK_TIMEOUT", "soon")
    code, _, err = run(capsys, "calibrate", model_dir, *SHORT, "--out", tmp_path / "art")
    one_line_error(code, err, "AQUA_LOCK_TIMEOUT='soon'")
    assert list(tmp_path.iterdir()) == []
