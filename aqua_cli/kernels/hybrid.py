"""Hybrid decode: dense below the measured break-even, the fused AQUA kernel above it.

Short contexts are launch-bound and dense SDPA is one kernel; AQUA adds a projection, a selection and a
combine. Below the break-even AQUA can only lose, so the hybrid switches on the sequence length
(both paths are bound by bytes once the GPU is full) per batch size. The thresholds are
the break-evens measured by ``aqua bench`` on an H100 (docs/results/bench-h100.md); re-measure on
other GPUs and pass your own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .reference import dense_decode

# Smallest sequence length per batch size from which the kernel beat SDPA at every longer length in
# docs/results/bench-h100-b{1,8}.json (4K..128K, k=0.5; top-T: tokens and pages alike); batch sizes in
# between use the nearest smaller key. NEVER: dense always.
NEVER = 1 << 40
DEFAULT_MIN_SEQ_DIMS = {1: 65536, 8: 8192}
DEFAULT_MIN_SEQ_TOPT = {1: 32768, 8: 4096}
MAX_DEFAULT_RATIO = 0.5  # with the defaults, k/d above this never beat dense on the H100: stay dense


def min_seq_for(table: dict[int, int], batch: int) -> int:
    """The break-even of ``table`` for ``batch``: the entry of the nearest smaller batch size (the smallest
    one for batches below every key)."""
    keys = [b for b in sorted(table) if b <= batch] or [min(table)]
    return table[keys[-1]]


@dataclass
class HybridDecode:
    """Callable decode step that is never slower than dense by construction of its threshold."""

    config: "object"  # a decode.DecodeConfig (kept untyped so this module imports without Triton)
    min_seq: dict[int, int] | None = None  # batch size -> smallest L that runs AQUA

    def threshold(self, batch: int) -> int:
        table = self.min_seq
        if table is None:
            table = DEFAULT_MIN_SEQ_DIMS if getattr(self.config, "token_ratio", None) is None else DEFAULT_MIN_SEQ_TOPT
        return min_seq_for(table, batch)

    def uses_aqua(self, batch: int, length: int, head_dim: int) -> bool:
        if self.min_seq is None and getattr(self.config, "dims") > MAX_DEFAULT_RATIO * head_dim:
            return False
        return length >= self.threshold(batch)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kd: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
        if not self.uses_aqua(q.shape[0], k.shape[2], q.shape[-1]):
            return dense_decode(q, k, v)
        from .decode import aqua_decode

        return aqua_decode(q, k, v, kd, proj, self.config)
