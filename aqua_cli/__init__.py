"""aqua: AQUA attention (Attention via QUery mAgnitudes, arXiv 2509.11155) for transformers models.

The Python API is what the ``aqua`` CLI runs::

    import aqua_cli
    model, tokenizer = aqua_cli.load_model(aqua_cli.resolve_model())        # SmolLM2 by default
    artifact = aqua_cli.load_artifact()                                     # the shipped artifact
    with aqua_cli.patch(model, artifact, k=0.75, mode="dynamic"):
        model.generate(...)

Names are imported on first use, so ``import aqua_cli`` (and the CLI's start) does not pay for torch
and transformers until they are needed.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Artifact": "artifact",
    "load_artifact": "registry",
    "resolve_artifact": "registry",
    "register": "attention",
    "unpatch": "attention",
    "k_dims": "budgets",
    "parse_k": "budgets",
    "Aqua": "methods",
    "AquaKV": "methods",
    "AquaPatch": "methods",
    "Dense": "methods",
    "H2O": "methods",
    "Method": "methods",
    "TopTokens": "methods",
    "load_patched": "methods",
    "patch": "methods",
    "CalibrationConfig": "calibration",
    "calibrate": "calibration",
    "DataSpec": "data",
    "AquaError": "errors",
    "load_model": "models",
    "model_fingerprint": "models",
    "resolve_model": "models",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'aqua_cli' has no attribute '{name}'")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
