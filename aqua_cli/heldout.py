"""Held-out evaluation: the windows ``aqua eval`` scores, checked against the artifact's calibration windows.

An artifact records the windows it was calibrated on (``extra["calibration_windows"]``, written by
:func:`aqua_cli.calibration.calibrate`: data id, part, seed, seq-len, stream hash, window starts and a
hash of each window's token ids). ``aqua eval`` reads the *evaluation* part of its text by default
(:mod:`aqua_cli.data`), counts its windows that share tokens with a calibration window
(``calibration_overlap``), and refuses a run with any unless the user allows it: a perplexity measured
on calibration text flatters the projection.
"""

from __future__ import annotations

from typing import Any

import torch

from .data import WindowSet, load_window_set
from .errors import ConfigError


def calibration_record(artifact: Any) -> dict[str, Any] | None:
    """The artifact's record of its calibration windows, or None (artifacts made before aqua kept one)."""
    record = (artifact.metadata.get("extra") or {}).get("calibration_windows")
    return record if isinstance(record, dict) else None


def fitted_records(artifact: Any) -> list[dict[str, Any]]:
    """Every record of text the artifact was fitted on: the calibration windows and, where the
    sensitivity curves were measured (``aqua sensitivity``), their windows too."""
    extra = artifact.metadata.get("extra") or {}
    records = [calibration_record(artifact)]
    sens = extra.get("sensitivity")
    if isinstance(sens, dict):
        records.append(sens.get("windows_record"))
    return [r for r in records if isinstance(r, dict)]


def check_overlap(window_set: WindowSet, artifact: Any, allow_overlap: bool = False) -> dict[str, Any]:
    """Count the evaluation windows shared with calibration; raise unless ``allow_overlap`` when any are.

    Returns the JSON block ``aqua eval`` reports: ``calibration_overlap`` (a count, ``None`` when the
    artifact recorded no windows), the windows scored, the part of the text they came from, and what the
    artifact was calibrated on."""
    record = calibration_record(artifact)
    flags = [window_set.overlap_flags(r) for r in fitted_records(artifact)]
    overlap = None if record is None else sum(any(f) for f in zip(*flags))
    info = {
        "calibration_overlap": overlap,
        "windows": int(window_set.windows.shape[0]),
        "data_part": window_set.part,
        "window_prefix": window_set.prefix,
        "calibration_data": None if record is None else {
            key: record.get(key) for key in ("data_id", "part", "seed", "seq_len")
        } | {"windows": len(record.get("window_sha256") or [])},
    }
    if overlap and not allow_overlap:
        raise ConfigError(
            f"{overlap} of the {info['windows']} evaluation windows share tokens with the artifact's calibration "
            f"windows (calibrated on {record.get('data_id')}, part {record.get('part', '?')}): this would score AQUA "
            "on its own calibration text. Evaluate held-out text (--data-part evaluation, the default) or pass "
            "--allow-overlap to measure it anyway"
        )
    return info


def evaluation_windows(tokenizer: Any, config: Any, artifact: Any, allow_overlap: bool = False) -> tuple[torch.Tensor, dict[str, Any]]:
    """``config``'s windows (an :class:`aqua_cli.evaluate.EvalConfig`) and the overlap report."""
    window_set = load_window_set(config.data, tokenizer, config.seq_len, config.tokens, config.seed)
    return window_set.windows, check_overlap(window_set, artifact, allow_overlap)


def overlap_caption(info: dict[str, Any]) -> str:
    overlap = info["calibration_overlap"]
    shared = "unknown (the artifact records no calibration windows)" if overlap is None else f"{overlap} of {info['windows']} windows"
    return f"data part: {info['data_part']}; calibration overlap: {shared}"
