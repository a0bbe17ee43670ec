"""One lock helper for every writer: artifact saves, pushes and pulls take a file lock with a finite,
validated timeout, and a lock that cannot be had is one line that says who holds it."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from .errors import AquaError

LOCK_TIMEOUT_ENV = "AQUA_LOCK_TIMEOUT"


def lock_timeout(default: float) -> float:
    """Seconds to wait for a lock: ``$AQUA_LOCK_TIMEOUT`` or ``default``."""
    try:
        return float(os.environ.get(LOCK_TIMEOUT_ENV, default))
    except ValueError:
        raise AquaError(f"{LOCK_TIMEOUT_ENV} must be a number of seconds") from None


@contextlib.contextmanager
def file_lock(path: Path, what: str, timeout: float) -> Iterator[None]:
    """Hold ``path`` as a lock file or fail with one line: two writers of one artifact never interleave."""
    from filelock import FileLock, Timeout

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path))
        lock.acquire(timeout=timeout)
    except Timeout:
        raise AquaError(f"another aqua process is {what}; try again when it finishes (lock: {path})") from None
    except OSError as exc:
        raise AquaError(f"cannot take the lock {path}: {exc.strerror or exc}") from None
    try:
        yield
    finally:
        lock.release()
