"""Artifacts on the Hugging Face Hub: push a verified artifact as one commit, pull one by ``hf://`` name.

``hf://org/repo[@revision]`` names an artifact repo (a ``projections.safetensors`` and its ``README.md``).
Pulling goes through ``huggingface_hub.snapshot_download``, so the files land in the normal HF cache
(``HF_HOME`` / ``HF_HUB_CACHE``), ``HF_HUB_OFFLINE``, ``HF_TOKEN`` and ``HF_ENDPOINT`` mean what they mean
everywhere else, and a branch or tag is resolved to one commit before any file is fetched (the snapshot
directory is named by that commit, which :func:`pull_artifact` returns). Every pulled artifact is verified
like a local one (``Artifact.load``: sha256 of the tensors, shapes, fingerprint hash); one that fails is
evicted from the cache so that nothing unverified stays there.

Pushing verifies the artifact, renders a fresh model card for the target repo, creates the repo (and the
branch) if missing, and uploads both files in one commit. Pushes and pulls take file locks, so two of the
same artifact cannot interleave.

Every Hub failure becomes one :class:`AquaError` line that says what to do (:func:`_hub_errors`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from . import __version__
from .artifact import CARD_FILE, TENSOR_FILE, Artifact
from .cards import model_card
from .errors import AquaError, ArtifactError, first_line
from .locking import file_lock, lock_timeout

HF_SCHEME = "hf://"
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")


@dataclass(frozen=True)
class HubRef:
    """``org/repo`` and an optional revision (branch, tag or commit), as written in ``hf://org/repo@rev``."""

    repo_id: str
    revision: str | None = None

    @classmethod
    def parse(cls, text: str, revision: str | None = None) -> HubRef:
        body = text.removeprefix(HF_SCHEME)
        repo_id, _, rev = body.partition("@")
        repo_id = repo_id.strip("/")
        if not _REPO_ID.fullmatch(repo_id) or repo_id.endswith((".", "-")) or ".." in repo_id:
            raise AquaError(f"'{text}' is not a Hub artifact name: write hf://org/repo or hf://org/repo@revision")
        if rev and revision and rev != revision:
            raise AquaError(f"'{text}' names revision '{rev}' but --revision says '{revision}': give one")
        if "@" in body and not rev:
            raise AquaError(f"'{text}' has an empty revision after '@': write hf://org/repo@revision, or leave out the '@'")
        if rev or revision:
            from .models import check_revision

            check_revision(rev or revision or "")
        return cls(repo_id, rev or revision or None)

    def __str__(self) -> str:
        return f"{HF_SCHEME}{self.repo_id}" + (f"@{self.revision}" if self.revision else "")


@dataclass(frozen=True)
class Pulled:
    """A verified artifact in the HF cache and the commit it was pinned to."""

    path: Path
    repo_id: str
    revision: str
    commit: str


@dataclass(frozen=True)
class Pushed:
    repo_id: str
    revision: str
    commit: str
    commit_url: str
    tensors_sha256: str


# -- the client ---------------------------------------------------------------------------------------
def build_api(token: str | None = None) -> Any:
    """The one ``HfApi`` aqua uses: it names aqua in the user agent, and takes the endpoint from ``HF_ENDPOINT``."""
    from huggingface_hub import HfApi

    return HfApi(library_name="aqua_cli", library_version=__version__, token=token)


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def cache_dir() -> Path:
    """The HF cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``); a path that exists and is not a directory is one line."""
    from huggingface_hub import constants

    path = Path(constants.HF_HUB_CACHE)
    if path.exists() and not path.is_dir():
        raise AquaError(f"the Hugging Face cache {path} is not a directory: point HF_HUB_CACHE (or HF_HOME) at a directory")
    return path


# -- errors -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _hub_errors(ref: HubRef, action: str) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into one line each; the order matters (subclasses first)."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    token_hint = "set HF_TOKEN, pass --token, or run `hf auth login`"
    try:
        yield
    except OfflineModeIsEnabled:
        raise AquaError(f"cannot {action} {ref}: HF_HUB_OFFLINE is set; unset it to reach the Hub") from None
    except RevisionNotFoundError:
        raise AquaError(f"revision '{ref.revision}' does not exist in {ref.repo_id}: check the branch, tag or commit (hf://{ref.repo_id}@REVISION)") from None
    except RepositoryNotFoundError:
        raise AquaError(f"Hub repo '{ref.repo_id}' does not exist or your token cannot see it: check the name, or for a private repo {token_hint}") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status == 401:
            raise AquaError(f"the Hub rejected the token (401) while trying to {action} {ref}: {token_hint} with a valid token") from None
        if status == 403:
            raise AquaError(f"your token may not write to {ref.repo_id} (403): use a write token of a user or org that owns it") from None
        raise AquaError(f"the Hub answered {status} when trying to {action} {ref}: {first_line(exc, 160)}") from None
    except ValueError as exc:  # invalid repo id, or a card the Hub refused ("Invalid metadata in README.md")
        raise AquaError(f"cannot {action} {ref}: {first_line(exc, 200)}") from None
    except LocalEntryNotFoundError:
        if _offline():
            raise AquaError(f"{ref} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: pull it once online (`aqua pull {ref}`)") from None
        from .network import read_timeout

        raise AquaError(
            f"cannot reach the Hub at {_endpoint()} (down, refused, or no answer within {read_timeout():g} s) and {ref} is not in the local cache: "
            "check your connection or HF_ENDPOINT, then retry"
        ) from None
    except _transport_errors() as exc:
        if "timeout" in type(exc).__name__.lower():
            from .network import read_timeout

            raise AquaError(
                f"the Hub at {_endpoint()} did not answer within {read_timeout():g} s when trying to {action} {ref} ({type(exc).__name__}): "
                "check your connection or HF_ENDPOINT, or raise HF_HUB_DOWNLOAD_TIMEOUT, then retry"
            ) from None
        raise AquaError(f"cannot reach the Hub at {_endpoint()} to {action} {ref} ({type(exc).__name__}): check your connection or HF_ENDPOINT, then retry") from None


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection failures of whichever HTTP client this huggingface_hub uses (httpx2, httpx or requests)."""
    import importlib

    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError")):
        with contextlib.suppress(ImportError, AttributeError):
            found.append(getattr(importlib.import_module(module), name))
    return tuple(found)


def _push_lock_path(artifact_dir: Path) -> Path:
    """The lock ``Artifact.save`` takes (``.<name>.lock`` beside it), so a push never reads a half-replaced artifact;
    a read-only parent (an installed package) or a snapshot in the HF cache locks in the temp directory instead."""
    parent = artifact_dir.resolve().parent
    if os.access(parent, os.W_OK) and cache_dir().resolve() not in parent.parents:
        return parent / f".{artifact_dir.name}.lock"
    digest = hashlib.sha256(str(artifact_dir.resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"aqua-push-{digest}.lock"


def _pull_lock_path(repo_id: str) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return cache_dir() / ".locks" / repo_folder_name(repo_id=repo_id, repo_type="model") / "aqua-pull.lock"


# -- pull ---------------------------------------------------------------------------------------------
def pull(ref: str, token: str | None = None) -> Path:
    """The directory of a verified Hub artifact in the HF cache (what ``resolve_artifact`` returns for ``hf://``)."""
    return pull_artifact(ref, token=token).path


def pull_artifact(ref: str, revision: str | None = None, token: str | None = None) -> Pulled:
    """Download ``hf://org/repo[@revision]`` (or read it from the cache), pinned to one commit, and verify it."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.file_download import repo_folder_name

    from .network import configure

    hub_ref = HubRef.parse(ref, revision)
    configure()
    storage = cache_dir() / repo_folder_name(repo_id=hub_ref.repo_id, repo_type="model")
    existed = storage.exists()
    with file_lock(_pull_lock_path(hub_ref.repo_id), f"pulling {hub_ref.repo_id}", lock_timeout(60.0)):
        try:
            with _hub_errors(hub_ref, "pull"), _quiet_unless_terminal(), _hub_warnings_off():
                folder = Path(
                    snapshot_download(
                        hub_ref.repo_id,
                        revision=hub_ref.revision,
                        allow_patterns=[TENSOR_FILE, CARD_FILE],
                        token=token,
                        library_name="aqua_cli",
                        library_version=__version__,
                    )
                )
        except BaseException:
            if not existed:  # a failed first pull leaves no empty repo folder behind
                shutil.rmtree(storage, ignore_errors=True)
            raise
        commit = folder.name
        _verify_or_evict(folder, hub_ref, commit)
    return Pulled(folder, hub_ref.repo_id, hub_ref.revision or "main", commit)


@contextlib.contextmanager
def _quiet_unless_terminal() -> Iterator[None]:
    """Download progress bars only on a terminal: piped stderr stays one line per diagnostic."""
    import sys

    if sys.stderr.isatty():
        yield
        return
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


@contextlib.contextmanager
def _hub_warnings_off() -> Iterator[None]:
    """huggingface_hub logs warnings (e.g. "No files matched") that aqua's own one-line error says better."""
    import logging

    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _verify_or_evict(folder: Path, ref: HubRef, commit: str) -> None:
    """Verify as ``Artifact.load`` does; a snapshot that fails is removed from the cache before the error."""
    try:
        if not (folder / TENSOR_FILE).is_file():
            raise ArtifactError(f"the repo has no {TENSOR_FILE}: it is not an aqua artifact")
        Artifact.load(folder)
    except Exception as exc:  # any failure, not only ArtifactError: nothing unverified stays in the cache
        _evict_snapshot(folder)
        reason = str(exc) if isinstance(exc, AquaError) else f"{type(exc).__name__}: {first_line(exc)}"
        reason = reason.replace(str(folder / TENSOR_FILE), TENSOR_FILE).replace(str(folder), "the snapshot")
        raise ArtifactError(
            f"{ref} (commit {commit[:12]}) failed verification and was removed from the cache: {reason}; "
            "ask its owner to push it again"
        ) from None


def _evict_snapshot(folder: Path) -> None:
    """Remove one snapshot, the blobs only it links to, its tree listing and the refs that point at it."""
    storage = folder.parent.parent
    commit = folder.name

    def blobs(snapshot: Path) -> set[str]:
        return {os.path.realpath(link) for link in snapshot.rglob("*") if link.is_symlink()}

    others = [o for o in folder.parent.iterdir() if o != folder and o.is_dir()] if folder.parent.is_dir() else []
    shared = set().union(*(blobs(other) for other in others))
    for blob in blobs(folder) - shared:
        with contextlib.suppress(OSError):
            Path(blob).unlink()
    shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):
        (storage / "trees" / f"{commit}.json").unlink()
    refs = storage / "refs"
    for ref_file in refs.rglob("*") if refs.is_dir() else []:
        if ref_file.is_file() and ref_file.read_text().strip() == commit:
            ref_file.unlink()
    snapshots = storage / "snapshots"
    if not snapshots.is_dir() or not any(snapshots.iterdir()):
        shutil.rmtree(storage, ignore_errors=True)


# -- push ---------------------------------------------------------------------------------------------
def check_push_target(repo_id: str, token: str | None = None) -> str:
    """Fail before any work when the target is malformed or there is no token; returns the token to use."""
    from huggingface_hub import get_token

    HubRef.parse(repo_id)
    if "@" in repo_id or repo_id.startswith(HF_SCHEME):
        raise AquaError(f"push to a repo id (org/repo), not '{repo_id}': give the branch with --revision")
    token = token or get_token()
    if not token:
        raise AquaError("no Hugging Face token: set HF_TOKEN, pass --token, or run `hf auth login` (pushing needs a write token)")
    return token


def render_card(artifact: Artifact, repo_id: str) -> str:
    """The model card for ``repo_id``: the artifact's own card, with usage pointing at ``hf://repo_id``."""
    return model_card(artifact, hub_repo=repo_id)


def push(
    artifact: str | Path,
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool = False,
    token: str | None = None,
    message: str | None = None,
) -> Pushed:
    """Verify ``artifact`` (a directory or ``hf://`` name), then create ``repo_id`` (and branch ``revision``) if missing and upload it as one commit."""
    from huggingface_hub import CommitOperationAdd

    from .models import check_revision
    from .network import configure

    token = check_push_target(repo_id, token)
    if revision is not None:
        check_revision(revision, "--revision (branch)")
    configure()
    path = pull(str(artifact), token=token) if str(artifact).startswith(HF_SCHEME) else Path(artifact).expanduser()
    if not path.exists():
        raise ArtifactError(f"no artifact at {path}: give its directory or hf://org/repo (`aqua push` also takes registry names)")
    path = path if path.is_dir() else path.parent
    branch = revision or "main"
    ref = HubRef(repo_id, branch)
    with file_lock(_push_lock_path(path), f"pushing or writing {path}", timeout=0.0):  # never queue a second push
        art = Artifact.load(path)
        card = render_card(art, repo_id).encode("utf-8")
        api = build_api(token)
        with _hub_errors(ref, "push to"):
            api.create_repo(repo_id, private=private or None, exist_ok=True)
            if branch != "main":
                api.create_branch(repo_id, branch=branch, exist_ok=True)
            info = api.create_commit(
                repo_id,
                operations=[
                    CommitOperationAdd(TENSOR_FILE, str(path / TENSOR_FILE)),
                    CommitOperationAdd(CARD_FILE, card),
                ],
                commit_message=message or f"aqua artifact for {art.model_id} ({art.metadata.get('tokens')} tokens)",
                revision=branch,
            )
    return Pushed(repo_id, branch, info.oid, info.commit_url, str(art.metadata["tensors_sha256"]))


def push_saved(path: Path, repo_id: str, token: str | None = None) -> Pushed:
    """``aqua calibrate --push``: push a just-saved artifact; a failure says where it is saved and how to retry."""
    try:
        return push(path, repo_id, token=token)
    except AquaError as exc:
        raise AquaError(f"{exc} (the artifact is saved in {path}: retry with `aqua push {path} {repo_id}`)") from None
