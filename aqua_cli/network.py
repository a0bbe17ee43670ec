"""Timeouts for every request aqua makes to the Hugging Face Hub, so that no command waits forever.

huggingface_hub's shared HTTP client has no timeout of its own (``timeout=None``): only its file
downloads and metadata requests pass one, so an endpoint that accepts the connection and never answers
hangs ``repo_info``, ``create_repo``, ``create_commit``... forever. aqua therefore, before its first
request (:func:`configure`):

* gives every request of that client that has no timeout (huggingface_hub passes ``timeout=None`` to its
  API calls) a read timeout of ``HF_HUB_DOWNLOAD_TIMEOUT`` seconds (huggingface_hub's own setting, default
  10) and a connect timeout of at most :data:`CONNECT_TIMEOUT` seconds;
* caps huggingface_hub's second metadata attempt (60 s per try by default) at the same timeout;
* refuses a malformed ``HF_HUB_ETAG_TIMEOUT`` / ``HF_HUB_DOWNLOAD_TIMEOUT`` with one line (huggingface_hub
  would fail at import with a ``ValueError``).

Loading a model or dataset from the Hub first asks :func:`hub_reachable`: the endpoint must answer an HTTP
request within ``HF_HUB_ETAG_TIMEOUT`` seconds (connect: 3 s), otherwise aqua uses the local cache or says
in one line that the Hub cannot be reached, instead of entering huggingface_hub's retries.
docs/reliability.md lists these numbers.
"""

from __future__ import annotations

import os
from typing import Any

from .errors import AquaError

TIMEOUT_ENVS = ("HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT")
DEFAULT_TIMEOUT = 10  # huggingface_hub's default for both
CONNECT_TIMEOUT = 10.0
PROBE_CONNECT_TIMEOUT = 3.0


def check_env() -> None:
    """The timeout variables huggingface_hub reads at import must be whole seconds >= 1."""
    for name in TIMEOUT_ENVS:
        value = os.environ.get(name)
        if value is None:
            continue
        text = value.strip()
        if not text.isdigit() or int(text) < 1:
            raise AquaError(f"{name}={value!r} is not a whole number of seconds: set it to an integer >= 1 (default {DEFAULT_TIMEOUT}) or unset it")


def read_timeout() -> float:
    """Seconds a Hub request may wait for data (``HF_HUB_DOWNLOAD_TIMEOUT``, default 10)."""
    check_env()
    from huggingface_hub import constants

    return float(constants.HF_HUB_DOWNLOAD_TIMEOUT or DEFAULT_TIMEOUT)


def metadata_timeout() -> float:
    """Seconds a metadata request (and the reachability probe) may wait (``HF_HUB_ETAG_TIMEOUT``, default 10)."""
    check_env()
    from huggingface_hub import constants

    return float(constants.HF_HUB_ETAG_TIMEOUT or DEFAULT_TIMEOUT)


def _timeout_for(client: Any, read: float, connect: float) -> Any:
    """A timeout object of the client's own HTTP library (httpx or httpx2)."""
    kind = type(getattr(client, "timeout", None))
    try:
        return kind(read, connect=connect)
    except TypeError:
        return read


def _fill_timeouts(request: Any) -> None:
    """Request hook: every phase huggingface_hub left without a timeout (``timeout=None``, its default for
    API calls) gets one; timeouts it set itself (downloads, metadata) are kept."""
    timeouts = request.extensions.get("timeout")
    if not isinstance(timeouts, dict) or all(v is not None for v in timeouts.values()):
        return
    read = read_timeout()
    default = {"connect": min(CONNECT_TIMEOUT, read), "read": read, "write": read, "pool": read}
    request.extensions["timeout"] = {k: default.get(k, read) if v is None else v for k, v in timeouts.items()}


def configure() -> None:
    """Install the timeouts on huggingface_hub's shared client (once; a client factory the user set is kept)."""
    check_env()
    try:
        from huggingface_hub import file_download
        from huggingface_hub.utils import _http
    except ImportError:  # another huggingface_hub layout: its own timeouts apply
        return
    factory = getattr(_http, "_GLOBAL_CLIENT_FACTORY", None)
    default = getattr(_http, "default_client_factory", None)
    if factory is not None and factory is default:

        def client_with_timeouts() -> Any:
            client = default()
            hooks = dict(client.event_hooks)
            hooks["request"] = [*hooks.get("request", []), _fill_timeouts]
            client.event_hooks = hooks
            return client

        _http.set_client_factory(client_with_timeouts)
    if isinstance(getattr(file_download, "_ETAG_RETRY_TIMEOUT", None), (int, float)):
        file_download._ETAG_RETRY_TIMEOUT = max(metadata_timeout(), read_timeout())


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def endpoint() -> str:
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


def hub_reachable(timeout: float | None = None) -> bool:
    """Whether the Hub endpoint answers an HTTP request (any status) in time: an endpoint that is down,
    refuses, or accepts and never answers is unreachable within seconds, not after a minute of retries."""
    if offline():
        return False
    configure()
    from huggingface_hub.utils import get_session

    session = get_session()
    read = metadata_timeout() if timeout is None else timeout
    connect = min(PROBE_CONNECT_TIMEOUT, read)
    try:
        if type(session).__module__.startswith("requests"):  # huggingface_hub < 1.0
            session.head(endpoint(), timeout=(connect, read), allow_redirects=False)
        else:
            session.head(endpoint(), timeout=_timeout_for(session, read, connect), follow_redirects=False)
    except Exception:  # any transport failure (refused, DNS, TLS, timeout) means: not reachable
        return False
    return True
