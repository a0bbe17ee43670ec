"""The projection artifact: one directory, verified on every load, written atomically.

Layout (docs/artifact-format.md is the reference)::

    <name>/
      projections.safetensors   layers.{i}.projection [G, D, D] f32, layers.{i}.singular_values [G, D] f32,
                                header metadata (strings; JSON for structured values)
      README.md                 model card (YAML front matter) generated from the metadata

Loading checks, before any tensor is used: the safetensors header parses (never pickle), every layer's
tensors are present with the declared shapes and dtype, the sha256 of the tensors matches the header,
and the fingerprint hash matches the fingerprint. Saving writes into a temporary sibling directory and
renames it into place under a file lock, so readers see the old artifact or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .cards import model_card
from .errors import ArtifactError, FingerprintMismatch, first_line
from .locking import file_lock, lock_timeout
from .models import describe_fingerprint, fingerprint_hash, model_fingerprint

FORMAT_VERSION = "1"
TENSOR_FILE = "projections.safetensors"
CARD_FILE = "README.md"
BASIS = "qk-joint-postrope-uncentered"
_JSON_KEYS = ("fingerprint", "command", "extra")
_INT_KEYS = ("tokens", "seq_len", "seed", "num_layers")


@dataclass
class Artifact:
    """Per-layer projections ``P`` ([groups, D, D], columns = basis vectors by decreasing energy) and the
    singular values of the calibration data in that basis, with their provenance."""

    projections: list[torch.Tensor]
    singular_values: list[torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    # -- shape -----------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.projections)

    @property
    def head_dim(self) -> int:
        return int(self.projections[0].shape[-1])

    @property
    def num_groups(self) -> int:
        return int(self.projections[0].shape[0])

    @property
    def fingerprint(self) -> dict[str, Any]:
        return self.metadata["fingerprint"]

    @property
    def model_id(self) -> str:
        return str(self.metadata.get("model_id", "?"))

    @property
    def name(self) -> str:
        return self.path.name if self.path else registry_name(self.model_id)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, (p, s) in enumerate(zip(self.projections, self.singular_values)):
            out[f"layers.{i}.projection"] = p.contiguous()
            out[f"layers.{i}.singular_values"] = s.contiguous()
        return out

    # -- checks ----------------------------------------------------------------------------------
    def check_model(self, config: Any) -> None:
        """Refuse a model whose attention shape or RoPE differs from the calibrated one."""
        theirs = model_fingerprint(config)
        if fingerprint_hash(theirs) != self.metadata.get("fingerprint_hash"):
            raise FingerprintMismatch(
                f"artifact '{self.name}' was calibrated for {self.model_id} ({describe_fingerprint(self.fingerprint)}) "
                f"but the model is {getattr(config, '_name_or_path', '') or 'another model'} ({describe_fingerprint(theirs)}"
                f"{'' if describe_fingerprint(theirs) != describe_fingerprint(self.fingerprint) else ', other RoPE'}); "
                "calibrate one for this model with `aqua calibrate`"
            )

    def validate(self) -> None:
        """Shapes, dtypes and finiteness, against the fingerprint."""
        fp = self.fingerprint
        if self.num_layers != fp["num_layers"]:
            raise ArtifactError(f"artifact has {self.num_layers} layers but its fingerprint says {fp['num_layers']}")
        groups = fp["num_kv_heads"]
        d = fp["head_dim"]
        for i, (p, s) in enumerate(zip(self.projections, self.singular_values)):
            if tuple(p.shape) != (groups, d, d) or tuple(s.shape) != (groups, d):
                raise ArtifactError(
                    f"layer {i}: tensors of shape {tuple(p.shape)}/{tuple(s.shape)}, expected "
                    f"{(groups, d, d)}/{(groups, d)}: the artifact is corrupt"
                )
            if p.dtype != torch.float32 or s.dtype != torch.float32:
                raise ArtifactError(f"layer {i}: dtype {p.dtype}/{s.dtype}, expected float32: the artifact is corrupt")
            if not (torch.isfinite(p).all() and torch.isfinite(s).all()):
                raise ArtifactError(f"layer {i}: non-finite values in the artifact")

    # -- persistence -----------------------------------------------------------------------------
    def save(self, out_dir: str | Path, force: bool = False) -> Path:
        """Write atomically to ``out_dir`` (a directory); refuse to replace one without ``force``."""
        from safetensors.torch import save_file

        self.validate()
        target = Path(out_dir).expanduser().resolve()
        meta = dict(self.metadata)
        meta["tensors_sha256"] = tensors_sha256(self.tensors())
        self.metadata = meta
        parent = target.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ArtifactError(f"cannot create {parent}: {exc.strerror or exc}") from exc
        if not os.access(parent, os.W_OK):
            raise ArtifactError(f"{parent} is not writable: choose another --out")
        with _lock(target):
            _remove_stale(target)
            if target.exists() and not force:
                raise ArtifactError(f"{target} already exists: pass --force to replace it, or choose another --out")
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
            try:
                save_file(self.tensors(), str(tmp / TENSOR_FILE), metadata=encode_metadata(meta))
                (tmp / CARD_FILE).write_text(model_card(self), encoding="utf-8")
                _fsync_dir(tmp)
                _replace_dir(tmp, target)
            except OSError as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                raise ArtifactError(f"could not write {target}: {exc.strerror or exc}") from exc
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        self.path = target
        return target

    @classmethod
    def load(cls, path: str | Path) -> "Artifact":
        """Load and verify an artifact directory (or its ``projections.safetensors``)."""
        path = Path(path).expanduser()
        file = path / TENSOR_FILE if path.is_dir() else path
        if not file.is_file():
            raise ArtifactError(f"no {TENSOR_FILE} in {path}: not an aqua artifact")
        tensors, raw_meta = _read_safetensors(file)
        meta = decode_metadata(raw_meta, file)
        if meta.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(
                f"{file}: artifact format version {meta.get('format_version')!r}, this aqua reads {FORMAT_VERSION!r}: upgrade aqua_cli"
            )
        if fingerprint_hash(meta["fingerprint"]) != meta.get("fingerprint_hash"):
            raise ArtifactError(f"{file}: fingerprint hash does not match the fingerprint: the metadata was altered")
        actual = tensors_sha256(tensors)
        if actual != meta.get("tensors_sha256"):
            raise ArtifactError(f"{file}: sha256 of the tensors does not match the header: the file was modified or is corrupt")
        layers = meta["fingerprint"]["num_layers"]
        try:
            projections = [tensors[f"layers.{i}.projection"] for i in range(layers)]
            singular = [tensors[f"layers.{i}.singular_values"] for i in range(layers)]
        except KeyError as exc:
            raise ArtifactError(f"{file}: missing tensor {exc.args[0]}: the artifact is incomplete") from None
        artifact = cls(projections, singular, meta, path if path.is_dir() else path.parent)
        artifact.validate()
        return artifact


def registry_name(model_id: str) -> str:
    """``org/name`` -> ``org--name``, the directory name in the registry (as the HF cache does)."""
    name = model_id.strip("/").replace("\\", "/")
    if os.path.isabs(model_id) or name.count("/") > 1:
        name = Path(model_id).name
    return name.replace("/", "--")


# -- metadata -------------------------------------------------------------------------------------
def build_metadata(
    *,
    model_id: str,
    config: Any,
    revision: str | None,
    data_id: str,
    tokens: int,
    seq_len: int,
    seed: int,
    dtype: str,
    command: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    fp = model_fingerprint(config)
    return {
        "format_version": FORMAT_VERSION,
        "tool": "aqua_cli",
        "tool_version": __version__,
        "model_id": model_id,
        "model_revision": revision or "",
        "fingerprint": fp,
        "fingerprint_hash": fingerprint_hash(fp),
        "num_layers": fp["num_layers"],
        "data_id": data_id,
        "tokens": int(tokens),
        "seq_len": int(seq_len),
        "seed": int(seed),
        "basis": BASIS,
        "dtype": dtype,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command or [],
        "extra": extra or {},
    }


def encode_metadata(meta: dict[str, Any]) -> dict[str, str]:
    return {k: json.dumps(v, sort_keys=True) if k in _JSON_KEYS else str(v) for k, v in meta.items()}


def decode_metadata(raw: dict[str, str] | None, file: Path) -> dict[str, Any]:
    if not raw or raw.get("tool") != "aqua_cli":
        raise ArtifactError(f"{file} is a safetensors file but not an aqua artifact (no aqua metadata)")
    meta: dict[str, Any] = dict(raw)
    try:
        for key in _JSON_KEYS:
            if key in meta:
                meta[key] = json.loads(meta[key])
        for key in _INT_KEYS:
            if key in meta:
                meta[key] = int(meta[key])
        meta["fingerprint"]["num_layers"] = int(meta["fingerprint"]["num_layers"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{file}: malformed aqua metadata ({first_line(exc)})") from exc
    return meta


def read_header(file: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, read without touching the tensors; ArtifactError if the file
    is not one (too short, a header length beyond the file: truncated, corrupt, or a pickle)."""
    try:
        size = file.stat().st_size
        if size < 8:
            raise ArtifactError(f"{file} is empty or truncated ({size} bytes)")
        with open(file, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            if header_len <= 0 or header_len > min(size - 8, 100_000_000):
                raise ArtifactError(f"{file} is not a safetensors file (bad header length): truncated, corrupt or a pickle")
            header = json.loads(fh.read(header_len))
    except OSError as exc:
        raise ArtifactError(f"cannot read {file}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ArtifactError(f"{file} is not a valid safetensors file ({first_line(exc, 120)}): truncated or corrupt") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{file} is not a valid safetensors file (the header is not an object)")
    return header


def header_metadata(file: Path) -> dict[str, Any]:
    """The decoded aqua metadata of an artifact file, from its header alone (no tensors loaded)."""
    return decode_metadata(read_header(file).get("__metadata__"), file)


def _read_safetensors(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    from safetensors import safe_open

    read_header(file)  # refuses what is not safetensors before the parser sees it
    try:
        with safe_open(str(file), framework="pt") as fh:
            meta = fh.metadata()
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    except Exception as exc:  # SafetensorError and friends
        raise ArtifactError(f"{file} is not a valid safetensors file ({first_line(exc, 120)}): truncated or corrupt") from exc
    return tensors, meta


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """Hash of names, dtypes, shapes and bytes, in name order: independent of file layout."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()





# -- atomic directory replacement -----------------------------------------------------------------
def _lock(target: Path) -> Any:
    """The lock every writer of ``target`` takes (``.<name>.lock`` beside it); ``aqua push`` takes it too."""
    return file_lock(target.parent / f".{target.name}.lock", f"writing {target}", lock_timeout(600))


def _replace_dir(tmp: Path, target: Path) -> None:
    """Move ``tmp`` to ``target``; an existing ``target`` is moved aside first and removed after."""
    backup = None
    if target.exists():
        backup = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, backup)
    try:
        os.replace(tmp, target)
    except OSError:
        if backup is not None:
            os.replace(backup, target)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def _remove_stale(target: Path) -> None:
    """Temporary or moved-aside directories of ``target`` left by a killed writer (we hold the lock, so
    no live writer owns them). A moved-aside artifact with no artifact in place is restored first."""
    backups = sorted(target.parent.glob(f".{target.name}.old-*"))
    if backups and not target.exists():
        os.replace(backups.pop(), target)
    for stale in [*target.parent.glob(f".{target.name}.tmp-*"), *backups]:
        shutil.rmtree(stale, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    for child in path.iterdir():
        with open(child, "rb") as fh:
            os.fsync(fh.fileno())
