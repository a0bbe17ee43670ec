"""User-facing errors.

Every failure a user can cause (a bad model id, a corrupt artifact, a k out of range) is raised as an
`AquaError` whose message is one line that names the problem and what to do. The CLI prints it on
stderr and exits 1 with no traceback; library users can catch the class.
"""

from __future__ import annotations


class AquaError(Exception):
    """A problem the user can fix; the message is shown as is."""


class AquaWarning(UserWarning):
    """Something the user should know that does not stop the command; the CLI prints it as one ``Warning:`` line."""


class ModelLoadError(AquaError):
    """The model could not be found, downloaded or loaded."""


class DataError(AquaError):
    """Calibration or evaluation text is missing, empty or malformed."""


class ArtifactError(AquaError):
    """An artifact is missing, corrupt, tampered with, or made for another model."""


class FingerprintMismatch(ArtifactError):
    """The artifact was calibrated on a model of another shape."""


class ConfigError(AquaError):
    """An option value is out of range (k, mode, sequence lengths...)."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message: third-party errors can span pages."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:limit]
