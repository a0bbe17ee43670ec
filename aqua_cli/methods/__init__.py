"""Every way aqua changes attention, in one shape: a :class:`Method` dataclass that installs one
:class:`AttentionHook` per layer, optionally builds the cache it needs, and undoes itself::

    from aqua_cli.methods import Aqua, AquaDecode, AquaKV, H2O, TopTokens
    with Aqua(artifact, k=0.5)(model):
        model.generate(...)
    with H2O(0.5, artifact=artifact, k=0.75)(model) as h2o:
        model.generate(..., past_key_values=h2o.new_cache())

docs/architecture.md has the recipe for adding one.
"""

from __future__ import annotations

from typing import Any

from .aqua import (
    MODES,
    Aqua,
    AquaPatch,
    ProjectionHook,
    load_patched,
    parse_mode,
    patch,
    select_dims,
)
from .base import AttentionHook, Dense, Method
from .fused import AquaDecode, DecodeHook, ProjectedKVCache, ProjectedKVLayer
from .h2o import H2O, H2OCache, H2OHook, H2OLayer, H2OState, patch_h2o
from .kv import AquaKV, ProjectedKeyCache, ProjectedKeyLayer, patch_kv, projected_cache
from .topt import TopTokens, TopTokensHook


def default_methods(artifact: Any) -> list[Method]:
    """One instance of every method at a budget that loses nothing (k = D, m = D, no eviction for the
    lengths tests use, all tokens): each must equal dense exactly. Tests run the list."""
    return [
        Dense(),
        Aqua(artifact, k=1.0, mode="static"),
        Aqua(artifact, k=1.0, mode="dynamic"),
        AquaKV(artifact, k=1.0, mode="dynamic", kv_dims=1.0),
        AquaKV(artifact, k=1.0, mode="dense", kv_dims=1.0),
        H2O(4096),
        H2O(4096, artifact=artifact, k=1.0),
        TopTokens(artifact, k=1.0, token_ratio=None),
        TopTokens(artifact, k=1.0, token_ratio=1.0),
        AquaDecode(artifact, k=1.0),
        AquaDecode(artifact, k=1.0, token_ratio=1.0, page=16, prefill="aqua", query_chunk=5),
    ]


__all__ = [
    "MODES", "Aqua", "AquaDecode", "AquaKV", "DecodeHook", "ProjectedKVCache", "ProjectedKVLayer", "AquaPatch", "AttentionHook", "Dense", "H2O", "H2OCache", "H2OHook", "H2OLayer",
    "H2OState", "Method", "ProjectedKeyCache", "ProjectedKeyLayer", "ProjectionHook", "TopTokens", "TopTokensHook",
    "default_methods", "load_patched", "parse_mode", "patch", "patch_h2o", "patch_kv", "projected_cache", "select_dims",
]
