"""The Hub registry end to end, with the real huggingface_hub client against a Hub on loopback (tests/hub_server.py).

No test reaches the network: the client is pointed at 127.0.0.1 through ``huggingface_hub.constants`` (in
process) or ``HF_ENDPOINT`` (in a subprocess), with a fresh HF cache, token file and registry per test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hub_server import FakeHub

from aqua_cli.artifact import TENSOR_FILE, Artifact
from aqua_cli.registry import default_artifact_name, shipped_dir
from aqua_cli.commands import main
from aqua_cli.errors import AquaError, FingerprintMismatch

TOKEN = "hf_alice"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A running loopback Hub, and huggingface_hub pointed at it with an empty cache and no saved token."""
    from huggingface_hub import constants

    server = FakeHub({TOKEN: ("alice", ["aqua-org"]), "hf_bob": ("bob", [])}).start()
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "no-token"))
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("AQUA_REGISTRY", str(tmp_path / "registry"))
    monkeypatch.delenv("AQUA_LOCK_TIMEOUT", raising=False)
    server.cache = cache
    yield server
    server.stop()


@pytest.fixture
def artifact_dir(tmp_path) -> Path:
    """A copy of the shipped SmolLM2 artifact in the registry (real tensors, 1.5 MB)."""
    target = tmp_path / "registry" / "smol"
    shutil.copytree(shipped_dir() / default_artifact_name(), target)
    return target


def run(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 1
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def assert_nothing_half_written(root: Path) -> None:
    """No temporary directories, partial downloads or empty repo folders anywhere under ``root``."""
    leftovers = [p for p in root.rglob("*") if ".tmp-" in p.name or p.name.endswith(".incomplete") or ".old-" in p.name]
    assert not leftovers, leftovers
    cache = root / "hf" / "hub"
    for repo in cache.glob("models--*") if cache.is_dir() else []:
        snapshots = list((repo / "snapshots").glob("*")) if (repo / "snapshots").is_dir() else []
        assert snapshots, f"empty repo folder left in the cache: {repo}"
        for snapshot in snapshots:
            Artifact.load(snapshot)  # whatever stayed in the cache verifies


def commits(hub: FakeHub) -> int:
    return sum(1 for method, path in hub.requests if method == "POST" and "/commit/" in path)


# -- round trips ---------------------------------------------------------------------------------------
def test_push_then_pull_round_trips_bytes_and_metadata(hub, artifact_dir):
    from aqua_cli.hub import pull_artifact, push

    pushed = push(artifact_dir, "alice/smol-aqua")
    assert commits(hub) == 1
    assert pushed.commit_url == f"{hub.url}/alice/smol-aqua/commit/{pushed.commit}"
    remote = hub.files("alice/smol-aqua")
    assert remote[TENSOR_FILE] == (artifact_dir / TENSOR_FILE).read_bytes()

    pulled = pull_artifact("hf://alice/smol-aqua")
    assert pulled.commit == pushed.commit and pulled.path.name == pushed.commit
    assert (pulled.path / TENSOR_FILE).read_bytes() == (artifact_dir / TENSOR_FILE).read_bytes()
    local, remote_art = Artifact.load(artifact_dir), Artifact.load(pulled.path)
    assert remote_art.metadata == local.metadata
    for a, b in zip(local.projections + local.singular_values, remote_art.projections + remote_art.singular_values):
        assert a.dtype == b.dtype and a.shape == b.shape and a.view(-1).tolist() == b.view(-1).tolist()
    # a second pull of a branch asks the Hub for the commit again, and reuses the cached files
    before = len(hub.requests)
    assert pull_artifact("hf://alice/smol-aqua").path == pulled.path
    assert not any("/resolve/" in path for _, path in hub.requests[before:])
    assert_nothing_half_written(hub.cache.parent.parent)


def test_card_has_hub_metadata_spectrum_and_usage(hub, artifact_dir):
    from aqua_cli.hub import push

    push(artifact_dir, "alice/smol-aqua")
    card = hub.files("alice/smol-aqua")["README.md"].decode()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert front["library_name"] == "aqua_cli" and "aqua" in front["tags"] and "llama" in front["tags"]
    assert "model-index" not in front and "datasets" not in front  # no eval results; pydoc is no Hub dataset
    assert "aqua calibrate --tokens 100000" in card and "| tokens | 99840" in card
    assert "| 0.75 |" in card and "<details>" in card  # spectrum summary and the per-layer table
    assert "--artifact hf://alice/smol-aqua" in card


def test_card_model_index_from_eval_results_and_hub_dataset(tmp_path):
    from aqua_cli.cards import model_card
    from aqua_cli.registry import load_artifact

    art = load_artifact(None)
    art.metadata = {**art.metadata, "data_id": "Salesforce/wikitext:config=wikitext-2-raw-v1:split=train:column=text",
                    "extra": {"eval_results": [{"task": "text-generation", "dataset": "pydoc", "metric": "perplexity", "value": 17.5, "k": 0.75, "mode": "dynamic"}]}}
    front = yaml.safe_load(model_card(art, hub_repo="org/repo").split("---\n")[1])
    assert front["datasets"] == ["Salesforce/wikitext"]
    (entry,) = front["model-index"]
    assert entry["name"] == "org/repo"
    (result,) = entry["results"]
    assert result["task"]["type"] == "text-generation" and result["dataset"]["name"] == "pydoc"
    assert result["metrics"] == [{"type": "perplexity", "value": 17.5, "name": "perplexity k=0.75 mode=dynamic"}]


def test_cli_push_pull_inspect_list(hub, artifact_dir, capsys):
    code, out, err = run(capsys, "push", str(artifact_dir), "aqua-org/smol", "--message", "first calibration", "--private")
    assert code == 0, err
    commit = hub.repos["aqua-org/smol"].branches["main"]
    assert out.strip() == f"{hub.url}/aqua-org/smol/commit/{commit}"
    assert hub.repos["aqua-org/smol"].private

    code, out, err = run(capsys, "pull", "hf://aqua-org/smol", "--json", "-")
    assert code == 0, err
    assert f'"commit": "{commit}"' in out

    code, out, err = run(capsys, "inspect", "hf://aqua-org/smol")  # every artifact argument takes hf:// names
    assert code == 0, err
    assert commit in out  # the snapshot path names the pinned commit

    code, out, err = run(capsys, "list", "--json", "-")
    assert code == 0, err
    assert '"name": "hf://aqua-org/smol"' in out and f'"revision": "main@{commit[:12]}"' in out
    assert '"where": "registry"' in out and '"tokens": 99840' in out


def test_push_to_branch_and_pull_that_revision(hub, artifact_dir, capsys):
    code, out, err = run(capsys, "push", str(artifact_dir), "alice/smol", "--revision", "calib-v2")
    assert code == 0, err
    repo = hub.repos["alice/smol"]
    assert TENSOR_FILE in repo.commits[repo.branches["calib-v2"]] and TENSOR_FILE not in repo.commits[repo.branches["main"]]
    code, out, err = run(capsys, "pull", "hf://alice/smol@calib-v2", "--json", "-")
    assert code == 0, err
    assert repo.branches["calib-v2"] in out
    # pinned: a commit id is a revision too, and needs no revision lookup
    from aqua_cli.hub import pull_artifact

    assert pull_artifact(f"hf://alice/smol@{repo.branches['calib-v2']}").commit == repo.branches["calib-v2"]


def test_offline_pull_from_the_cache(hub, artifact_dir, monkeypatch):
    from huggingface_hub import constants

    from aqua_cli.registry import load_artifact
    from aqua_cli.hub import pull_artifact, push

    push(artifact_dir, "alice/smol")
    online = pull_artifact("hf://alice/smol")
    hub.stop()  # no Hub at all now
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    offline = pull_artifact("hf://alice/smol")
    assert offline == online
    assert load_artifact("hf://alice/smol").metadata["tensors_sha256"] == Artifact.load(artifact_dir).metadata["tensors_sha256"]


def test_pulled_artifact_still_checks_the_model_fingerprint(hub, artifact_dir):
    from tiny_models import tiny_config

    from aqua_cli.registry import load_artifact
    from aqua_cli.hub import push

    push(artifact_dir, "alice/smol")
    with pytest.raises(FingerprintMismatch, match="calibrated for HuggingFaceTB/SmolLM2-135M-Instruct"):
        load_artifact("hf://alice/smol").check_model(tiny_config("llama"))


def test_calibrate_push(hub, model_dir, tmp_path, capsys):
    code, out, err = run(capsys, "calibrate", str(model_dir), "--tokens", "512", "--seq-len", "64", "--device", "cpu",
                         "--out", str(tmp_path / "registry" / "tiny"), "--push", "alice/tiny-aqua")
    assert code == 0, err
    commit = hub.repos["alice/tiny-aqua"].branches["main"]
    assert f"{hub.url}/alice/tiny-aqua/commit/{commit}" in out
    assert hub.files("alice/tiny-aqua")[TENSOR_FILE] == (tmp_path / "registry" / "tiny" / TENSOR_FILE).read_bytes()


def test_real_cli_in_a_fresh_process_reads_hf_endpoint(hub, artifact_dir, tmp_path):
    """HF_ENDPOINT is read when huggingface_hub is imported: a subprocess proves the documented way works."""
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0", "HF_TOKEN": TOKEN}
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run([sys.executable, "-m", "aqua_cli", "push", str(artifact_dir), "alice/from-subprocess"],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith(f"{hub.url}/alice/from-subprocess/commit/")
    assert hub.files("alice/from-subprocess")[TENSOR_FILE] == (artifact_dir / TENSOR_FILE).read_bytes()


# -- errors: one line, exit 1, nothing half-written ------------------------------------------------------
def _tampered(artifact_dir: Path, what: str) -> bytes:
    """The artifact file with one tensor value changed (``tensors``) or the fingerprint edited (``fingerprint``)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save

    with safe_open(str(artifact_dir / TENSOR_FILE), framework="pt") as fh:
        meta = dict(fh.metadata())
        tensors = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118 - safe_open is not a dict
    if what == "tensors":
        tensors["layers.3.projection"][0, 0, 0] += 1e-3
    else:
        fingerprint = json.loads(meta["fingerprint"])
        fingerprint["rope"] = {**fingerprint.get("rope", {}), "theta": 1.0}
        meta["fingerprint"] = json.dumps(fingerprint, sort_keys=True)
    return save(tensors, metadata=meta)


@pytest.mark.parametrize("what, needle", [("tensors", "sha256 of the tensors does not match"), ("fingerprint", "fingerprint hash does not match")])
def test_corrupt_download_is_refused_and_evicted(hub, artifact_dir, capsys, what, needle):
    from aqua_cli.hub import push

    push(artifact_dir, "alice/smol")
    hub.commit("alice/smol", {TENSOR_FILE: _tampered(artifact_dir, what)}, message="tampered")
    code, _, err = run(capsys, "pull", "hf://alice/smol")
    assert_one_line_error(code, err, "hf://alice/smol", "failed verification", needle, "removed from the cache")
    repo_folder = hub.cache / "models--alice--smol"
    assert not repo_folder.exists()  # no blob, snapshot or ref of the bad commit stays
    assert_nothing_half_written(hub.cache.parent.parent)
    # --artifact hf:// goes through the same check
    code, _, err = run(capsys, "inspect", "hf://alice/smol")
    assert_one_line_error(code, err, "failed verification")


def test_eviction_keeps_blobs_other_snapshots_share(hub, artifact_dir, capsys):
    from aqua_cli.hub import pull_artifact, push

    good = push(artifact_dir, "alice/smol")
    pull_artifact(f"hf://alice/smol@{good.commit}")
    hub.commit("alice/smol", {TENSOR_FILE: _tampered(artifact_dir, "tensors")}, message="tampered")  # same README blob
    code, _, err = run(capsys, "pull", "hf://alice/smol")
    assert_one_line_error(code, err, "failed verification")
    snapshots = [p.name for p in (hub.cache / "models--alice--smol" / "snapshots").iterdir()]
    assert snapshots == [good.commit]
    assert (hub.cache / "models--alice--smol" / "snapshots" / good.commit / "README.md").read_text().startswith("---")
    assert_nothing_half_written(hub.cache.parent.parent)


def test_push_without_token(hub, artifact_dir, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    code, _, err = run(capsys, "push", str(artifact_dir), "alice/smol")
    assert_one_line_error(code, err, "no Hugging Face token", "HF_TOKEN")
    assert hub.requests == []  # refused before any request


def test_push_with_rejected_token(hub, artifact_dir, capsys):
    code, _, err = run(capsys, "push", str(artifact_dir), "alice/smol", "--token", "hf_wrong")
    assert_one_line_error(code, err, "rejected the token", "valid token")
    assert "alice/smol" not in hub.repos


def test_pull_with_rejected_token(hub, artifact_dir, capsys, monkeypatch):
    from aqua_cli.hub import push

    push(artifact_dir, "alice/smol")
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    code, _, err = run(capsys, "pull", "hf://alice/smol")
    assert_one_line_error(code, err, "rejected the token")
    assert_nothing_half_written(hub.cache.parent.parent)
    assert not (hub.cache / "models--alice--smol").exists()


def test_push_to_a_namespace_the_token_cannot_write(hub, artifact_dir, capsys):
    code, _, err = run(capsys, "push", str(artifact_dir), "someone-else/smol")
    assert_one_line_error(code, err, "may not write to someone-else/smol", "write token")


@pytest.mark.parametrize(
    "ref, needles",
    [
        ("hf://alice/no-such-repo", ("Hub repo 'alice/no-such-repo' does not exist", "check the name")),
        ("hf://alice/smol@no-such-branch", ("revision 'no-such-branch' does not exist in alice/smol",)),
        ("hf://not a repo", ("is not a Hub artifact name", "hf://org/repo")),
    ],
)
def test_pull_missing_repo_or_revision(hub, artifact_dir, capsys, ref, needles):
    from aqua_cli.hub import push

    push(artifact_dir, "alice/smol")
    code, _, err = run(capsys, "pull", ref)
    assert_one_line_error(code, err, *needles)
    assert sorted(p.name for p in hub.cache.glob("models--*")) == []
    assert_nothing_half_written(hub.cache.parent.parent)


def test_private_repo_needs_a_token(hub, artifact_dir, capsys, monkeypatch):
    from aqua_cli.hub import push

    push(artifact_dir, "alice/secret", private=True)
    monkeypatch.delenv("HF_TOKEN")
    code, _, err = run(capsys, "inspect", "hf://alice/secret")
    assert_one_line_error(code, err, "does not exist or your token cannot see it", "HF_TOKEN")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    code, _, err = run(capsys, "inspect", "hf://alice/secret")
    assert code == 0, err


def test_network_down(hub, artifact_dir, capsys):
    hub.stop()  # the port now refuses connections
    code, _, err = run(capsys, "pull", "hf://alice/smol")
    assert_one_line_error(code, err, "cannot reach the Hub at http://127.0.0.1", "not in the local cache", "check your connection")
    code, _, err = run(capsys, "push", str(artifact_dir), "alice/smol")
    assert_one_line_error(code, err, "cannot reach the Hub at http://127.0.0.1", "check your connection")
    assert_nothing_half_written(hub.cache.parent.parent)


def test_offline_and_not_cached(hub, artifact_dir, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    code, _, err = run(capsys, "pull", "hf://alice/smol")
    assert_one_line_error(code, err, "not in the local Hugging Face cache", "HF_HUB_OFFLINE", "aqua pull hf://alice/smol")
    code, _, err = run(capsys, "push", str(artifact_dir), "alice/smol")
    assert_one_line_error(code, err, "HF_HUB_OFFLINE is set", "unset it")
    assert hub.requests == []
    assert_nothing_half_written(hub.cache.parent.parent)


def test_push_an_artifact_pulled_from_the_hub(hub, artifact_dir):
    """hf:// sources work too, and their push lock stays out of the HF cache."""
    from aqua_cli.hub import pull_artifact, push

    push(artifact_dir, "alice/smol")
    copied = push("hf://alice/smol", "aqua-org/smol-copy")
    assert hub.files("aqua-org/smol-copy")[TENSOR_FILE] == hub.files("alice/smol")[TENSOR_FILE]
    assert copied.commit == pull_artifact("hf://aqua-org/smol-copy").commit
    assert not list(hub.cache.rglob("*.lock")) or all(".locks" in p.parts for p in hub.cache.rglob("*.lock"))


def test_two_pushes_at_once(hub, artifact_dir, capsys):
    from filelock import FileLock

    from aqua_cli.hub import _push_lock_path

    with FileLock(str(_push_lock_path(artifact_dir))):  # another process is pushing (or writing) this artifact
        code, _, err = run(capsys, "push", str(artifact_dir), "alice/smol")
    assert_one_line_error(code, err, "another aqua process is pushing", "try again")
    assert hub.requests == []
    code, _, err = run(capsys, "push", str(artifact_dir), "alice/smol")
    assert code == 0, err


def test_two_pulls_at_once(hub, artifact_dir, capsys, monkeypatch):
    from filelock import FileLock

    from aqua_cli.hub import _pull_lock_path, push

    push(artifact_dir, "alice/smol")
    monkeypatch.setenv("AQUA_LOCK_TIMEOUT", "0")
    with FileLock(str(_pull_lock_path("alice/smol"))):
        code, _, err = run(capsys, "pull", "hf://alice/smol")
    assert_one_line_error(code, err, "another aqua process is pulling alice/smol", "try again")
    assert not any(p.name == "snapshots" for p in hub.cache.rglob("*"))
    code, _, err = run(capsys, "pull", "hf://alice/smol")
    assert code == 0, err


def test_repo_without_an_artifact(hub, capsys):
    hub.create("alice/empty")
    code, _, err = run(capsys, "pull", "hf://alice/empty")
    assert_one_line_error(code, err, f"has no {TENSOR_FILE}", "not an aqua artifact")
    assert not (hub.cache / "models--alice--empty").exists()


def test_hub_ref_parsing():
    from aqua_cli.hub import HubRef

    assert HubRef.parse("hf://org/repo@v1") == HubRef("org/repo", "v1")
    assert str(HubRef.parse("org/repo", revision="main")) == "hf://org/repo@main"
    for bad in ("hf://repo", "hf://a/b/c", "hf://org/../x", "hf://-x/y"):
        with pytest.raises(AquaError, match="not a Hub artifact name"):
            HubRef.parse(bad)
    with pytest.raises(AquaError, match="give one"):
        HubRef.parse("hf://org/repo@a", revision="b")


def test_calibrate_push_checks_the_target_before_calibrating(hub, model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    code, _, err = run(capsys, "calibrate", str(model_dir), "--tokens", "512", "--seq-len", "64", "--device", "cpu",
                       "--out", str(tmp_path / "registry" / "tiny"), "--push", "alice/tiny-aqua")
    assert_one_line_error(code, err, "no Hugging Face token")
    assert not (tmp_path / "registry" / "tiny").exists() and hub.requests == []


# -- no hangs: an endpoint that accepts the connection and never answers ----------------------------------
@pytest.fixture
def stalled(monkeypatch, tmp_path):
    """huggingface_hub pointed at a loopback endpoint that never answers, with 1 s timeouts (set the way a
    user sets them: huggingface_hub's HF_HUB_DOWNLOAD_TIMEOUT / HF_HUB_ETAG_TIMEOUT)."""
    from huggingface_hub import constants
    from hub_server import StalledEndpoint

    with StalledEndpoint(lifetime=120) as endpoint:
        monkeypatch.setattr(constants, "ENDPOINT", endpoint.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 1)
        monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 1)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_ENDPOINT", endpoint.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setenv("AQUA_REGISTRY", str(tmp_path / "registry"))
        endpoint.cache = tmp_path / "hf" / "hub"
        yield endpoint


def test_stalled_hub_pull_is_one_line(stalled, capsys):
    code, _, err = run(capsys, "pull", "hf://alice/smol")
    assert_one_line_error(code, err, "cannot reach the Hub", "no answer within 1 s", "not in the local cache")
    assert stalled.accepted and not stalled.closed  # it ended by its timeout while the endpoint still stalled
    assert_nothing_half_written(stalled.cache.parent.parent)


def test_stalled_hub_push_is_one_line(stalled, artifact_dir, capsys):
    code, _, err = run(capsys, "push", str(artifact_dir), "alice/smol")
    assert_one_line_error(code, err, "did not answer within 1 s", "HF_HUB_DOWNLOAD_TIMEOUT")
    assert stalled.accepted and not stalled.closed


def test_stalled_hub_calibrate_hub_model_is_one_line(stalled, capsys, tmp_path):
    code, _, err = run(capsys, "calibrate", "someorg/somemodel", "--tokens", "512", "--seq-len", "64", "--device", "cpu")
    assert_one_line_error(code, err, "not in the local Hugging Face cache", "cannot be reached or does not answer")
    assert not (tmp_path / "registry" / "someorg--somemodel").exists()
    assert stalled.accepted and not stalled.closed


def test_stalled_hub_in_a_fresh_process_uses_the_env_timeouts(tmp_path):
    """The documented way: HF_HUB_DOWNLOAD_TIMEOUT / HF_HUB_ETAG_TIMEOUT in the environment."""
    from hub_server import StalledEndpoint

    with StalledEndpoint(lifetime=120) as endpoint:
        env = {**os.environ, "HF_ENDPOINT": endpoint.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0",
               "HF_HUB_DOWNLOAD_TIMEOUT": "1", "HF_HUB_ETAG_TIMEOUT": "1", "HF_TOKEN": TOKEN}
        env.pop("HF_HUB_CACHE", None)
        proc = subprocess.run([sys.executable, "-m", "aqua_cli", "pull", "hf://alice/smol"], capture_output=True, text=True,
                              env=env, timeout=300, check=False)
        assert not endpoint.closed
    assert_one_line_error(proc.returncode, proc.stderr, "cannot reach the Hub", "no answer within 1 s")


# -- revisions are validated before any request ---------------------------------------------------------------
@pytest.mark.parametrize("ref", ["hf://alice/smol@../../x", "hf://alice/smol@a/../b", "hf://alice/smol@-rf", "hf://alice/smol@a b",
                                 "hf://alice/smol@x~1", "hf://alice/smol@"])
def test_bad_revision_is_refused_before_any_request(hub, capsys, ref):
    code, _, err = run(capsys, "pull", ref)
    assert_one_line_error(code, err)
    assert "revision" in err
    assert hub.requests == []
    assert not hub.cache.exists() or not any(hub.cache.rglob("snapshots"))


def test_bad_model_revision_is_refused_before_any_request(hub, capsys):
    code, _, err = run(capsys, "calibrate", "alice/model", "--revision", "../../etc", "--tokens", "512")
    assert_one_line_error(code, err, "invalid revision '../../etc'")
    assert hub.requests == []


def test_bad_push_branch_is_refused_before_any_request(hub, artifact_dir, capsys):
    code, _, err = run(capsys, "push", str(artifact_dir), "alice/smol", "--revision", "a/../../b")
    assert_one_line_error(code, err, "invalid --revision (branch) 'a/../../b'")
    assert hub.requests == []


def test_good_revisions_parse():
    from aqua_cli.hub import HubRef

    for rev in ("main", "v1.0", "calib-v2", "refs/pr/3", "0123456789abcdef0123456789abcdef01234567"):
        assert HubRef.parse(f"hf://org/repo@{rev}").revision == rev


# -- any verification failure of a pulled snapshot evicts it ----------------------------------------------------
def _resealed(artifact_dir: Path, mutate) -> bytes:
    import json as _json

    from safetensors import safe_open
    from safetensors.torch import save

    from aqua_cli.artifact import provenance_sha256, tensors_sha256
    from aqua_cli.models import fingerprint_hash

    with safe_open(str(artifact_dir / TENSOR_FILE), framework="pt") as fh:
        meta = dict(fh.metadata())
        tensors = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118
    mutate(tensors, meta)
    fp = _json.loads(meta["fingerprint"])
    if isinstance(fp, dict):
        meta["fingerprint_hash"] = fingerprint_hash(fp)
    meta["tensors_sha256"] = tensors_sha256(tensors)
    meta["provenance_sha256"] = provenance_sha256(meta)
    return save(tensors, metadata=meta)


def _drop_kv_heads(t, m):
    import json as _json

    fp = _json.loads(m["fingerprint"])
    del fp["num_kv_heads"]
    m["fingerprint"] = _json.dumps(fp)


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (_drop_kv_heads, "lacks num_kv_heads"),
        (lambda t, m: t.update({"layers.0.singular_values": t["layers.0.singular_values"][0, 0].clone()}), "layer 0"),  # 0-dim
        (lambda t, m: t["layers.2.projection"].zero_(), "not orthogonal"),
        (lambda t, m: m.update(extra="[" * 50_000 + "]" * 50_000), "malformed aqua metadata"),
    ],
)
def test_any_verification_failure_evicts_the_snapshot(hub, artifact_dir, capsys, mutate, needle):
    from aqua_cli.hub import push

    push(artifact_dir, "alice/smol")
    hub.commit("alice/smol", {TENSOR_FILE: _resealed(artifact_dir, mutate)}, message="broken")
    code, _, err = run(capsys, "pull", "hf://alice/smol")
    assert_one_line_error(code, err, "failed verification", "removed from the cache", needle)
    assert not (hub.cache / "models--alice--smol").exists()
    code, out, err = run(capsys, "list", "--json", "-")
    assert code == 0, err
    assert "hf://alice/smol" not in out


def test_list_shows_a_snapshot_altered_after_the_pull_as_broken(hub, artifact_dir, capsys):
    from aqua_cli.hub import pull_artifact, push

    push(artifact_dir, "alice/smol")
    pulled = pull_artifact("hf://alice/smol")
    blob = (pulled.path / TENSOR_FILE).resolve()
    blob.write_bytes(_resealed(artifact_dir, lambda t, m: m.update(model_id="org/[/]evil")).replace(b"provenance_sha256", b"provenance_sha257"))
    code, out, err = run(capsys, "list")
    assert code == 0, err
    assert "hf://alice/smol" in out and "broken" in out and "smol" in out
