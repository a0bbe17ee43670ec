"""aqua: AQUA attention (Attention via QUery mAgnitudes, arXiv 2509.11155) for transformers models.

The Python API is what the ``aqua`` CLI runs::

    import aqua_cli
    model, tokenizer = aqua_cli.load_model(aqua_cli.resolve_model())        # SmolLM2 by default
    artifact = aqua_cli.load_artifact()                                     # the shipped artifact
    with aqua_cli.patch(model, artifact, k=0.75, mode="dynamic"):
        model.generate(...)
"""

__version__ = "0.1.0"

from .artifact import Artifact, load_artifact, resolve_artifact  # noqa: E402
from .attention import AquaPatch, k_dims, parse_k, patch, register, unpatch  # noqa: E402
from .calibration import CalibrationConfig, calibrate  # noqa: E402
from .data import DataSpec  # noqa: E402
from .errors import AquaError  # noqa: E402
from .models import load_model, model_fingerprint, resolve_model  # noqa: E402

__all__ = [
    "Artifact",
    "AquaError",
    "AquaPatch",
    "CalibrationConfig",
    "DataSpec",
    "calibrate",
    "k_dims",
    "load_artifact",
    "load_model",
    "model_fingerprint",
    "parse_k",
    "patch",
    "register",
    "resolve_artifact",
    "resolve_model",
    "unpatch",
]
