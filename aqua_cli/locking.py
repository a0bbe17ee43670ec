"""One lock helper for every writer: artifact saves, pushes and pulls take a file lock with a finite,
validated timeout, and a lock that cannot be had is one line that says who holds it (or why the lock
file cannot be made: an unwritable or special folder is said at once, not after the timeout)."""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Iterator

from .errors import AquaError

LOCK_TIMEOUT_ENV = "AQUA_LOCK_TIMEOUT"
MAX_LOCK_TIMEOUT = 7 * 24 * 3600.0  # a week: waits are always finite


def lock_timeout(default: float) -> float:
    """Seconds to wait for a lock: ``$AQUA_LOCK_TIMEOUT`` or ``default``; a finite number in 0 .. one week."""
    raw = os.environ.get(LOCK_TIMEOUT_ENV)
    if raw is None or not raw.strip():
        return float(default)
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 <= value <= MAX_LOCK_TIMEOUT):
        raise AquaError(
            f"{LOCK_TIMEOUT_ENV}={raw!r} is not a usable lock timeout: set it to a number of seconds from 0 to "
            f"{MAX_LOCK_TIMEOUT:.0f} (e.g. 60), or unset it"
        )
    return value


@contextlib.contextmanager
def file_lock(path: Path, what: str, timeout: float) -> Iterator[None]:
    """Hold ``path`` as a lock file or fail with one line: two writers of one artifact never interleave."""
    from filelock import FileLock, Timeout

    if not (math.isfinite(timeout) and timeout >= 0):
        raise AquaError(f"lock timeout {timeout!r} for {path} is not a finite number of seconds >= 0")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # filelock retries (until the timeout) on some errors that no other process causes, such as a
        # folder where files cannot be made: open the lock file once ourselves so those are said now
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o666))
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
