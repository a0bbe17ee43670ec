"""The projection artifact: one directory, verified on every load, written atomically.

Layout (docs/artifact-format.md is the reference)::

    <name>/
      projections.safetensors   layers.{i}.projection [G, D, D] f32, layers.{i}.singular_values [G, D] f32,
                                header metadata (strings; JSON for structured values)
      README.md                 model card (YAML front matter) generated from the metadata

Loading checks, before any tensor is used: the safetensors header parses (never pickle), the fingerprint
is well formed and its hash matches, the provenance hash matches the provenance fields (format 2), the
sha256 of the tensors matches the header, and every layer's tensors are present with the declared shapes
and dtype, finite, with each ``P`` orthogonal. Saving writes into a temporary sibling directory and
renames it into place under a file lock, so readers see the old artifact or the new one, never a mix;
``force`` replaces only an artifact (or an empty directory), never other files.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .cards import model_card
from .errors import AquaError, AquaWarning, ArtifactError, FingerprintMismatch, first_line
from .locking import file_lock, lock_timeout
from .models import describe_fingerprint, fingerprint_hash, model_fingerprint

FORMAT_VERSION = "2"
READABLE_VERSIONS = ("1", "2")  # 1: no provenance hash; read with a warning
TENSOR_FILE = "projections.safetensors"
CARD_FILE = "README.md"
BASIS = "qk-joint-postrope-uncentered"
_JSON_KEYS = ("fingerprint", "command", "extra")
_INT_KEYS = ("tokens", "seq_len", "seed", "num_layers")
# The metadata keys ``provenance_sha256`` covers (format 2). A new provenance field is added here, and to
# docs/artifact-format.md; an artifact written before the key existed still verifies (absent keys are not hashed).
PROVENANCE_KEYS = (
    "format_version", "tool", "tool_version", "model_id", "model_revision", "fingerprint", "fingerprint_hash",
    "num_layers", "data_id", "tokens", "seq_len", "seed", "basis", "dtype", "created", "command", "extra",
    "tensors_sha256",
)
ORTHOGONALITY_TOLERANCE = 1e-4  # max |P^T P - I| over every layer and group, computed in float64
_FINGERPRINT_INTS = ("num_layers", "num_heads", "num_kv_heads", "head_dim")
_MAX_DIM = 1 << 16


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
            p64 = p.double()
            error = float((p64.transpose(-1, -2) @ p64 - torch.eye(d, dtype=torch.float64)).abs().max()) if p.numel() else 0.0
            if not error <= ORTHOGONALITY_TOLERANCE:
                raise ArtifactError(
                    f"layer {i}: the projection is not orthogonal (max |PᵀP − I| = {error:.3g} > {ORTHOGONALITY_TOLERANCE:g}): "
                    "the artifact is corrupt; calibrate it again"
                )
            if bool((s < 0).any()):
                raise ArtifactError(f"layer {i}: negative singular values: the artifact is corrupt")

    # -- persistence -----------------------------------------------------------------------------
    def save(self, out_dir: str | Path, force: bool = False) -> Path:
        """Write atomically to ``out_dir`` (a directory); replace an existing artifact only with ``force``,
        and never anything that is not an artifact (see :func:`check_output`)."""
        from safetensors.torch import save_file

        self.validate()
        target = check_output(out_dir, force, probe_lock=False, create=True)
        meta = dict(self.metadata)
        meta["format_version"] = FORMAT_VERSION
        meta["tensors_sha256"] = tensors_sha256(self.tensors())
        meta.pop("provenance_sha256", None)
        meta["provenance_sha256"] = provenance_sha256(encode_metadata(meta))
        self.metadata = meta
        with _lock(target):
            _remove_stale(target)
            _check_existing(target, force)  # again, under the lock: another writer may have been first
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
            try:
                save_file(self.tensors(), str(tmp / TENSOR_FILE), metadata=encode_metadata(meta))
                (tmp / CARD_FILE).write_text(model_card(self), encoding="utf-8")
                _umask_permissions(tmp)
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
        """Load and verify an artifact directory (or its ``projections.safetensors``); every failure is
        one :class:`ArtifactError` line."""
        path = Path(path).expanduser()
        file = path / TENSOR_FILE if path.is_dir() else path
        if not file.is_file():
            raise ArtifactError(f"no {TENSOR_FILE} in {path}: not an aqua artifact")
        try:
            return cls._load(path, file)
        except (AquaError, Warning):
            raise
        except Exception as exc:  # a shape of corruption no check names: still one line, never a traceback
            raise ArtifactError(f"{file}: malformed artifact ({type(exc).__name__}: {first_line(exc, 160)}): the artifact is corrupt") from exc

    @classmethod
    def _load(cls, path: Path, file: Path) -> "Artifact":
        tensors, raw_meta = _read_safetensors(file)
        meta = verify_metadata(raw_meta, file)
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


def decode_metadata(raw: Any, file: Path) -> dict[str, Any]:
    if not isinstance(raw, dict) or raw.get("tool") != "aqua_cli":
        raise ArtifactError(f"{file} is a safetensors file but not an aqua artifact (no aqua metadata)")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
        raise ArtifactError(f"{file}: malformed aqua metadata (values must be strings)")
    meta: dict[str, Any] = dict(raw)
    try:
        for key in _JSON_KEYS:
            if key in meta:
                meta[key] = json.loads(meta[key])
        for key in _INT_KEYS:
            if key in meta:
                meta[key] = int(meta[key])
    except (ValueError, TypeError, RecursionError) as exc:
        raise ArtifactError(f"{file}: malformed aqua metadata ({first_line(exc, 120)})") from None
    meta["fingerprint"] = check_fingerprint(meta.get("fingerprint"), file)
    return meta


def verify_metadata(raw: Any, file: Path, warn: bool = True) -> dict[str, Any]:
    """The header checks of a load, without the tensors: aqua metadata of a readable format version, a well
    formed fingerprint matching its hash, and (format 2) the provenance hash. A format-1 artifact warns."""
    meta = decode_metadata(raw, file)
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ArtifactError(f"{file}: artifact format version {version!r}, this aqua reads {', '.join(READABLE_VERSIONS)}: upgrade aqua_cli")
    if fingerprint_hash(meta["fingerprint"]) != meta.get("fingerprint_hash"):
        raise ArtifactError(f"{file}: fingerprint hash does not match the fingerprint: the metadata was altered")
    if version == "1":
        if warn:
            warnings.warn(
                f"{file} is a format-1 artifact: its provenance (model id, data, command) is covered by no hash; "
                "re-save it with this aqua (Artifact.load(path).save(path, force=True)) to add one",
                AquaWarning,
                stacklevel=4,
            )
    elif provenance_sha256(raw) != meta.get("provenance_sha256"):
        raise ArtifactError(f"{file}: provenance hash does not match the metadata (model id, data, command...): the metadata was altered")
    return meta


def check_fingerprint(fp: Any, file: Path | str) -> dict[str, Any]:
    """The fingerprint must be an object with an architecture and positive whole attention sizes."""
    if not isinstance(fp, dict):
        raise ArtifactError(f"{file}: the metadata has no fingerprint object: the artifact is corrupt or not aqua's")
    missing = [k for k in ("architecture", *_FINGERPRINT_INTS) if k not in fp]
    if missing:
        raise ArtifactError(f"{file}: the fingerprint lacks {', '.join(missing)}: the artifact is corrupt; calibrate it again")
    for key in _FINGERPRINT_INTS:
        value = fp[key]
        if isinstance(value, str) and value.isdigit():
            value = fp[key] = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_DIM:
            raise ArtifactError(f"{file}: fingerprint {key} is {value!r}, not a whole number in 1..{_MAX_DIM}: the artifact is corrupt")
    return fp


def provenance_sha256(raw: dict[str, str]) -> str:
    """sha256 of the stored (string) values of :data:`PROVENANCE_KEYS` that are present, as canonical JSON."""
    covered = {key: raw[key] for key in PROVENANCE_KEYS if key in raw}
    return hashlib.sha256(json.dumps(covered, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()).hexdigest()


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
    except RecursionError:
        raise ArtifactError(f"{file} is not a valid safetensors file (its header is nested too deeply): corrupt or hostile") from None
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
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()





# -- where an artifact may be written ----------------------------------------------------------------
def is_artifact_dir(path: Path) -> bool:
    """A directory holding an aqua ``projections.safetensors`` (its header says so) and at most a README.md."""
    try:
        if path.is_symlink() or not path.is_dir():
            return False
        names = set(os.listdir(path))
        file = path / TENSOR_FILE
        if TENSOR_FILE not in names or not names <= {TENSOR_FILE, CARD_FILE} or file.is_symlink() or not file.is_file():
            return False
        meta = read_header(file).get("__metadata__")
    except (OSError, ArtifactError):
        return False
    return isinstance(meta, dict) and meta.get("tool") == "aqua_cli"


def enclosing_artifact(path: Path) -> Path | None:
    """The artifact directory ``path`` lies in (itself excluded), if any; ``path`` is resolved."""
    for parent in path.parents:
        with_file = parent / TENSOR_FILE
        if with_file.exists() or with_file.is_symlink():
            return parent
    return None


def resolve_path(path: str | Path, what: str) -> Path:
    """``path`` made absolute with ``~``, ``..`` and symbolic links resolved; a symlink loop is one line."""
    try:
        return Path(path).expanduser().resolve()
    except (OSError, RuntimeError) as exc:
        raise AquaError(f"{what} {path} cannot be resolved ({first_line(exc, 120)}): a symbolic link loop? choose another path") from None


def check_output(out_dir: str | Path, force: bool, probe_lock: bool = True, create: bool = False) -> Path:
    """Resolve where an artifact will be written (``~``, ``..``, symlinks, the working directory) and check,
    before any work, that it may be: not inside an artifact; absent, an empty directory, or (with ``force``)
    an artifact, never other files; its folder can be created and written (a probe that leaves nothing);
    its lock, if one exists, can be taken. ``create`` makes the folder. Returns the resolved path."""
    target = resolve_path(out_dir, "--out")
    inside = enclosing_artifact(target)
    if inside is not None:
        raise ArtifactError(f"{target} is inside the artifact {inside}: choose an --out outside it")
    _check_existing(target, force)
    parent = target.parent
    if target == parent:
        raise ArtifactError(f"{target} is the root directory: choose another --out")
    existing = next(p for p in (parent, *parent.parents) if p.exists() or p.is_symlink())
    if not existing.is_dir():
        raise ArtifactError(f"cannot create the output directory {parent}: {existing} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{target.name}.check-", dir=existing))  # can anything be made there?
        if create:
            parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArtifactError(f"cannot write in {existing} ({exc.strerror or exc}): choose another --out") from None
    lock_timeout(600)  # a malformed AQUA_LOCK_TIMEOUT is said now, not after the run
    lock = _lock_path(target)
    if probe_lock and lock.exists():  # no lock file: nobody holds it (and none is left behind by a failed run)
        with _lock(target):
            pass
    return target


def _check_existing(target: Path, force: bool) -> None:
    """What is at ``target`` may be replaced: nothing, an empty directory, or an artifact with ``force``."""
    if not (target.exists() or target.is_symlink()):
        return
    if target.is_symlink() and not target.exists():
        raise ArtifactError(f"{target} is a broken symbolic link: remove it or choose another --out")
    if not target.is_dir():
        raise ArtifactError(f"{target} exists and is not a directory: aqua replaces only artifacts, even with --force; choose another --out")
    try:
        empty = not os.listdir(target)
    except OSError as exc:
        raise ArtifactError(f"cannot read {target} ({exc.strerror or exc}): choose another --out") from None
    if empty:
        return
    if not is_artifact_dir(target):
        raise ArtifactError(
            f"{target} is a directory that is not an aqua artifact (it holds other files): aqua replaces only artifacts, "
            "even with --force; choose another --out, or remove it yourself"
        )
    if not force:
        raise ArtifactError(f"{target} already exists: pass --force to replace it, or choose another --out")


# -- atomic directory replacement -----------------------------------------------------------------
def _lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


def _lock(target: Path) -> Any:
    """The lock every writer of ``target`` takes (``.<name>.lock`` beside it); ``aqua push`` takes it too."""
    return file_lock(_lock_path(target), f"writing {target}", lock_timeout(600))


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


def _debris(target: Path) -> tuple[list[Path], list[Path]]:
    """Temporary (``.<name>.tmp-XXXXXXXX``, letters, digits and ``_``) and moved-aside (``.<name>.old-PID``) directories of ``target``,
    matched literally: a name with glob characters never matches another writer's directories."""
    name = re.escape(target.name)
    tmp, old = re.compile(rf"\.{name}\.(tmp|check)-[A-Za-z0-9_]+"), re.compile(rf"\.{name}\.old-[0-9]+")
    try:
        entries = sorted(os.listdir(target.parent))
    except OSError:
        return [], []
    temps = [target.parent / e for e in entries if tmp.fullmatch(e)]
    backups = [target.parent / e for e in entries if old.fullmatch(e)]
    return temps, backups


def _remove_stale(target: Path) -> None:
    """Temporary or moved-aside directories of ``target`` left by a killed writer (we hold the lock, so
    no live writer owns them). A moved-aside artifact with no artifact in place is restored first."""
    temps, backups = _debris(target)
    backups = [b for b in backups if b.is_dir() and not b.is_symlink()]
    backups.sort(key=lambda b: b.stat().st_mtime)
    if backups and not (target.exists() or target.is_symlink()):
        os.replace(backups.pop(), target)
    for stale in [*temps, *backups]:
        if stale.is_symlink():
            stale.unlink()
        else:
            shutil.rmtree(stale, ignore_errors=True)


def _umask_permissions(folder: Path) -> None:
    """mkdtemp makes 0700: give the artifact what any new file or folder gets (0777/0666 less the umask)."""
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for child in folder.iterdir():
        os.chmod(child, 0o666 & ~mask)


def _umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    for child in path.iterdir():
        with open(child, "rb") as fh:
            os.fsync(fh.fileno())
