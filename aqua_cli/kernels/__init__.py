"""Fused AQUA kernels (Triton) and their PyTorch references.

The references (:mod:`.reference`) and the hybrid switch import anywhere; the Triton kernels
(:mod:`.decode`) need ``triton`` and a CUDA GPU and are imported on first use, so ``import aqua_cli``
works on machines without either.
"""

from __future__ import annotations

from .hybrid import HybridDecode
from .reference import (
    aqua_decode_reference,
    dense_decode,
    project_keys,
    project_queries,
    select_dims,
    select_tokens,
)


def triton_available() -> bool:
    """True when the fused kernels can run here (Triton importable and a CUDA device present)."""
    import importlib.util

    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


__all__ = [
    "HybridDecode",
    "aqua_decode_reference",
    "dense_decode",
    "project_keys",
    "project_queries",
    "select_dims",
    "select_tokens",
    "triton_available",
]
