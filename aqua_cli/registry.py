"""Names of artifacts, and where they live: the one module that turns what a user types into a path.

An artifact name is a path, a registry name (``org--name`` or ``org/name``, looked up in ``$AQUA_REGISTRY``
or ``./artifacts`` and then in the artifacts shipped with aqua), or ``hf://org/repo[@revision]`` (pulled
into the HF cache and verified, :mod:`aqua_cli.hub`). ``aqua list`` shows all three places.

Layers: this module sits above :mod:`aqua_cli.artifact` (the format) and :mod:`aqua_cli.hub` (transport);
neither imports it.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .artifact import TENSOR_FILE, Artifact, read_header, registry_name, verify_metadata
from .errors import AquaError, ArtifactError, AquaWarning, first_line
from .hub import HF_SCHEME, cache_dir
from .models import DEFAULT_MODEL_ID

REGISTRY_ENV = "AQUA_REGISTRY"


@dataclass(frozen=True)
class Listed:
    """One row of ``aqua list``."""

    name: str
    where: str  # registry, shipped or hf-cache
    model: str
    revision: str
    tokens: int | None
    size: int
    path: str
    status: str = "ok"  # or "broken: <why>" (read from the header; such an entry fails to load)


def registry_dir() -> Path:
    """Where ``aqua calibrate`` writes by default: ``$AQUA_REGISTRY`` or ``./artifacts``."""
    return Path(os.environ.get(REGISTRY_ENV) or "artifacts").expanduser()


def shipped_dir() -> Path:
    """The artifacts shipped with the source tree (next to the package in an editable install)."""
    return Path(__file__).resolve().parent.parent / "artifacts"


def default_artifact_name() -> str:
    return registry_name(DEFAULT_MODEL_ID)


def resolve_artifact(name: str | Path | None) -> Path:
    """An artifact path from a path, a registry name (``org--name`` or ``org/name``), or the default."""
    if name is None:
        name = default_artifact_name()
    text = str(name)
    if text.startswith("hf://"):
        from .hub import pull

        return pull(text)
    path = Path(text).expanduser()
    if path.exists():
        return path
    candidates = [root / registry_name(text) for root in (registry_dir(), shipped_dir())]
    for candidate in candidates:
        if (candidate / TENSOR_FILE).is_file():
            return candidate
    raise ArtifactError(
        f"artifact '{text}' not found (looked for a path, then {', '.join(str(c) for c in candidates)}): "
        "run `aqua calibrate` or `aqua list`"
    )


def load_artifact(name: str | Path | None = None) -> Artifact:
    return Artifact.load(resolve_artifact(name))


def artifact_for_model(name: str | Path | None, model_id: str) -> Artifact:
    """The artifact the user named, else the registry entry named after the model (for the default
    model, the shipped one)."""
    return load_artifact(name if name is not None else registry_name(model_id))


def as_artifact(artifact: Any) -> Artifact:
    """An :class:`Artifact` as given, or loaded from a name (see module docstring)."""
    return artifact if isinstance(artifact, Artifact) else load_artifact(artifact)


def list_artifacts() -> list[Listed]:
    """Artifacts in the registry, shipped with aqua, and in the HF cache (read from headers: no tensors
    loaded). An entry whose header fails the checks of a load is listed as broken; the others still are."""
    return _local_artifacts() + _cached_artifacts()


def _local_artifacts() -> list[Listed]:
    rows, seen = [], set()
    for where, root in (("registry", registry_dir()), ("shipped", shipped_dir())):
        try:
            folders = sorted(root.iterdir()) if root.is_dir() else []
        except OSError as exc:
            warnings.warn(f"cannot read the {where} folder {root}: {exc.strerror or exc}", AquaWarning, stacklevel=2)
            continue
        for folder in folders:
            file = folder / TENSOR_FILE
            try:
                if folder.name.startswith(".") or not file.is_file() or folder.resolve() in seen:
                    continue
            except OSError:
                continue
            seen.add(folder.resolve())
            try:
                size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
            except OSError:
                size = 0
            meta, status = _checked_header(file)
            rows.append(_row(folder.name, where, meta, status, size, folder))
    return rows


def _cached_artifacts() -> list[Listed]:
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        cache = scan_cache_dir(cache_dir())
    except CacheNotFound:
        return []
    except (AquaError, OSError, ValueError) as exc:  # HF_HUB_CACHE is a file, unreadable...: list the rest
        warnings.warn(f"the Hugging Face cache is not listed: {first_line(exc)}", AquaWarning, stacklevel=2)
        return []
    rows = []
    for repo in sorted(cache.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for rev in sorted(repo.revisions, key=lambda r: r.commit_hash):
            file = rev.snapshot_path / TENSOR_FILE
            if not file.is_file():
                continue
            meta, status = _checked_header(file)
            if status != "ok" and not _claims_aqua(file):
                continue  # some other model's projections.safetensors
            refs = ",".join(sorted(rev.refs))
            name = f"{HF_SCHEME}{repo.repo_id}" + (f"@{refs.split(',')[0]}" if refs and refs != "main" else "" if refs else f"@{rev.commit_hash}")
            revision = f"{refs}@{rev.commit_hash[:12]}" if refs else rev.commit_hash[:12]
            rows.append(_row(name, "hf-cache", meta, status, rev.size_on_disk, rev.snapshot_path, revision))
    return rows


def _checked_header(file: Path) -> tuple[dict[str, Any], str]:
    """The verified header metadata of an entry and ``"ok"``, or ``{}`` and ``"broken: <why>"``."""
    try:
        return verify_metadata(read_header(file).get("__metadata__"), file, warn=False), "ok"
    except Exception as exc:  # whatever is wrong with one entry, the others are still listed
        reason = str(exc) if isinstance(exc, AquaError) else f"{type(exc).__name__}: {first_line(exc)}"
        return {}, "broken: " + reason.replace(f"{file}: ", "").replace(str(file), TENSOR_FILE)


def _claims_aqua(file: Path) -> bool:
    try:
        meta = read_header(file).get("__metadata__")
    except ArtifactError:
        return True  # unreadable: say so
    return isinstance(meta, dict) and meta.get("tool") == "aqua_cli"


def _row(name: str, where: str, meta: dict[str, Any], status: str, size: int, path: Path, revision: str | None = None) -> Listed:
    tokens = meta.get("tokens")
    return Listed(
        name, where, str(meta.get("model_id", "?")), revision or str(meta.get("model_revision") or "-"),
        tokens if isinstance(tokens, int) else None, size, str(path), status,
    )


def listed_as_dict(row: Listed) -> dict[str, Any]:
    return asdict(row)
