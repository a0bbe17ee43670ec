"""A small Hugging Face Hub on loopback, for testing the real ``huggingface_hub`` client without the internet.

It speaks the subset of the Hub's HTTP API that ``HfApi.create_repo``, ``create_branch``, ``create_commit``
(regular uploads: the preupload answer is always ``"regular"``, so no LFS or Xet), ``repo_info`` /
``model_info``, ``list_repo_tree``, ``whoami`` and ``hf_hub_download`` / ``snapshot_download`` use, with the
status codes and ``X-Error-Code`` / ``X-Error-Message`` headers the client turns into its typed errors
(``RepositoryNotFoundError``, ``RevisionNotFoundError``, 401 for a rejected token, 403 for no write access).

Repos are held in memory as commits of whole file trees. It binds 127.0.0.1 only, caps request bodies, and
is started and stopped by the test that uses it (``with FakeHub() as hub: ...``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

MAX_BODY = 64 * 1024 * 1024
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_sha1(data: bytes) -> str:
    """The id git (and the Hub's ETag for a regular file) gives a blob."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    owner: str
    private: bool
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        matches = [c for c in self.commits if c.startswith(revision)] if len(revision) >= 7 else []
        return matches[0] if len(matches) == 1 else None


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class FakeHub:
    """The server and its state: ``tokens`` maps a token to (user, orgs it may write to)."""

    def __init__(self, tokens: dict[str, tuple[str, list[str]]] | None = None):
        self.tokens = tokens if tokens is not None else {"hf_alice": ("alice", ["aqua-org"])}
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._counter = 0
        self.server: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self.server is not None, "the hub is not running"
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        handler = type("Handler", (_Handler,), {"hub": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(timeout=5)
            self.server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- state helpers for tests ----------------------------------------------------------------
    def commit(self, repo_id: str, files: dict[str, bytes | None], branch: str = "main", message: str = "") -> str:
        """Apply ``files`` (None deletes) on top of ``branch`` and move it; returns the new commit id."""
        with self._lock:
            repo = self.repos[repo_id]
            parent = repo.branches.get(branch)
            tree = dict(repo.commits[parent]) if parent else {}
            for path, data in files.items():
                if data is None:
                    tree.pop(path, None)
                else:
                    tree[path] = data
            self._counter += 1
            digest = hashlib.sha1(f"{repo_id}|{parent}|{message}|{self._counter}".encode())
            for path in sorted(tree):
                digest.update(path.encode() + git_blob_sha1(tree[path]).encode())
            sha = digest.hexdigest()
            repo.commits[sha] = tree
            repo.branches[branch] = sha
            return sha

    def create(self, repo_id: str, owner: str = "alice", private: bool = False) -> None:
        """Create a repo with its initial commit (a ``.gitattributes``, as the Hub does)."""
        with self._lock:
            self.repos[repo_id] = Repo(owner, private)
        self.commit(repo_id, {".gitattributes": GITATTRIBUTES}, message="initial commit")

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.commits[repo.resolve(revision)]

    def paths(self) -> list[str]:
        return [path for _, path in self.requests]


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"
    timeout = 10

    def log_message(self, format: str, *args: Any) -> None:  # quiet: pytest shows failures, not traffic
        pass

    # -- plumbing -------------------------------------------------------------------------------
    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise HubError(413, "payload too large")
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, payload: Any = None, headers: dict[str, str] | None = None, raw: bytes | None = None, head: bool = False) -> None:
        body = raw if raw is not None else json.dumps(payload if payload is not None else {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _error(self, exc: HubError, head: bool = False) -> None:
        headers = {"X-Error-Message": exc.message}
        if exc.code:
            headers["X-Error-Code"] = exc.code
        self._send(exc.status, {"error": exc.message}, headers, head=head)

    def _user(self, required: bool) -> tuple[str, list[str]] | None:
        auth = self.headers.get("Authorization", "")
        if not auth:
            if required:
                raise HubError(401, "Invalid username or password.")
            return None
        token = auth.removeprefix("Bearer ").strip()
        if token not in self.hub.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.hub.tokens[token]

    def _repo(self, repo_id: str, write: bool = False) -> Repo:
        user = self._user(required=write)
        repo = self.hub.repos.get(repo_id)
        may_read = repo is not None and (not repo.private or (user is not None and _may_write(user, repo_id)))
        if not may_read:
            raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        if write and not _may_write(user, repo_id):
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _commit_of(self, repo: Repo, revision: str) -> str:
        sha = repo.resolve(unquote(revision))
        if sha is None:
            raise HubError(404, f"Invalid rev id: {unquote(revision)}", "RevisionNotFound")
        return sha

    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        path, query = unquote(parts.path), parse_qs(parts.query)
        self.hub.requests.append((method, path))
        head = method == "HEAD"
        try:
            for pattern, handler_method, name in _ROUTES:
                match = re.fullmatch(pattern, path)
                if match and method in handler_method:
                    getattr(self, name)(method, query, *match.groups())
                    return
            raise HubError(404, f"no route for {method} {path}")
        except HubError as exc:
            self._error(exc, head=head)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    # -- endpoints ------------------------------------------------------------------------------
    def whoami(self, method: str, query: dict) -> None:
        name, orgs = self._user(required=True)
        self._send(200, {"type": "user", "name": name, "orgs": [{"name": o} for o in orgs], "auth": {"accessToken": {"role": "write"}}})

    def create_repo(self, method: str, query: dict) -> None:
        user = self._user(required=True)
        payload = json.loads(self._body() or b"{}")
        repo_id = f"{payload.get('organization') or user[0]}/{payload['name']}"
        if not _may_write(user, repo_id):
            raise HubError(403, f"You don't have the rights to create a model under the namespace {repo_id.split('/')[0]}")
        if repo_id in self.hub.repos:
            self._send(409, {"error": "You already created this model repo", "url": f"{self.hub.url}/{repo_id}"})
            return
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        self.hub.create(repo_id, owner=user[0], private=private)
        self._send(200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id})

    def validate_yaml(self, method: str, query: dict) -> None:
        import yaml

        content = json.loads(self._body())["content"]
        match = re.match(r"^---\n(.*?)\n---\n", content, re.DOTALL)
        try:
            meta = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as exc:
            self._send(400, {"errors": [{"message": f"invalid YAML: {exc}"}]}, {"X-Error-Message": "invalid YAML"})
            return
        if not isinstance(meta, dict) or not isinstance(meta.get("tags", []), list):
            self._send(400, {"errors": [{"message": "metadata must be a mapping with a list of tags"}]})
            return
        self._send(200, {"errors": [], "warnings": []})

    def create_branch(self, method: str, query: dict, repo_id: str, branch: str) -> None:
        repo = self._repo(repo_id, write=True)
        payload = json.loads(self._body() or b"{}")
        if branch in repo.branches:
            self._send(409, {"error": f"Reference already exists: refs/heads/{branch}"})
            return
        repo.branches[branch] = self._commit_of(repo, payload.get("startingPoint") or "main")
        self._send(200, {})

    def preupload(self, method: str, query: dict, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_id, write=True)
        tree = repo.commits[self._commit_of(repo, revision)]
        files = json.loads(self._body())["files"]
        answer = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": git_blob_sha1(tree[f["path"]]) if f["path"] in tree else None}
            for f in files
        ]
        self._send(200, {"files": answer, "commitOid": repo.branches.get(unquote(revision))})

    def commit(self, method: str, query: dict, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_id, write=True)
        branch = unquote(revision)
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        changes: dict[str, bytes | None] = {}
        for item in lines:
            if item["key"] == "file":
                changes[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] == "deletedFile":
                changes[item["value"]["path"]] = None
            elif item["key"] != "header":
                raise HubError(400, f"this test hub does not support {item['key']} operations")
        sha = self.hub.commit(repo_id, changes, branch, header.get("summary", ""))
        self._send(200, {"commitUrl": f"{self.hub.url}/{repo_id}/commit/{sha}", "commitOid": sha, "success": True})

    def repo_info(self, method: str, query: dict, repo_id: str, revision: str | None = None) -> None:
        repo = self._repo(repo_id)
        sha = self._commit_of(repo, revision or "main")
        tree = repo.commits[sha]
        self._send(200, {
            "id": repo_id, "modelId": repo_id, "author": repo.owner, "sha": sha, "private": repo.private,
            "lastModified": "2026-01-01T00:00:00.000Z", "tags": [], "downloads": 0, "likes": 0,
            "siblings": [{"rfilename": p} for p in sorted(tree)],
        })

    def tree(self, method: str, query: dict, repo_id: str, revision: str, prefix: str | None = None) -> None:
        repo = self._repo(repo_id)
        tree = repo.commits[self._commit_of(repo, revision)]
        prefix = (prefix or "").strip("/")
        entries = [
            {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": p}
            for p, data in sorted(tree.items())
            if not prefix or p.startswith(prefix + "/")
        ]
        self._send(200, entries)

    def resolve(self, method: str, query: dict, repo_id: str, revision: str, filename: str) -> None:
        head = method == "HEAD"
        try:
            repo = self._repo(repo_id)
            sha = self._commit_of(repo, revision)
            tree = repo.commits[sha]
            if filename not in tree:
                raise HubError(404, "Entry not found", "EntryNotFound")
        except HubError as exc:
            self._error(exc, head=head)
            return
        data = tree[filename]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha1(data)}"', "Accept-Ranges": "bytes"}
        start = _range_start(self.headers.get("Range"))
        if start and not head:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            self._send(206, raw=data[start:], headers=headers)
            return
        self._send(200, raw=data, headers=headers, head=head)


def _may_write(user: tuple[str, list[str]], repo_id: str) -> bool:
    name, orgs = user
    return repo_id.split("/")[0] in (name, *orgs)


def _range_start(value: str | None) -> int:
    match = re.fullmatch(r"bytes=(\d+)-", value or "")
    return int(match.group(1)) if match else 0


_REPO = r"([\w.-]+/[\w.-]+)"
_ROUTES: list[tuple[str, tuple[str, ...], str]] = [
    (r"/api/whoami-v2", ("GET",), "whoami"),
    (r"/api/repos/create", ("POST",), "create_repo"),
    (r"/api/validate-yaml", ("POST",), "validate_yaml"),
    (rf"/api/models/{_REPO}/branch/([^/]+)", ("POST",), "create_branch"),
    (rf"/api/models/{_REPO}/preupload/([^/]+)", ("POST",), "preupload"),
    (rf"/api/models/{_REPO}/commit/([^/]+)", ("POST",), "commit"),
    (rf"/api/models/{_REPO}/revision/([^/]+)", ("GET",), "repo_info"),
    (rf"/api/models/{_REPO}", ("GET",), "repo_info"),
    (rf"/api/models/{_REPO}/tree/([^/]+)(/.*)?", ("GET",), "tree"),
    (rf"/{_REPO}/resolve/([^/]+)/(.+)", ("GET", "HEAD"), "resolve"),
]


class StalledEndpoint:
    """A loopback endpoint that accepts every connection and never answers (a hung proxy or server).

    Bounded: it binds 127.0.0.1 only, holds at most ``max_connections`` sockets, and closes them all, and
    stops accepting, when the ``with`` block ends (or after ``lifetime`` seconds at the latest)."""

    def __init__(self, lifetime: float = 300.0, max_connections: int = 256):
        import socket

        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self._socket.listen(64)
        self._socket.settimeout(0.05)
        self.lifetime, self.max_connections = lifetime, max_connections
        self.accepted: list[Any] = []
        self.closed = False  # True once it stopped stalling (a client that ended after this did not time out)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._socket.getsockname()[:2]
        return f"http://{host}:{port}"

    def _serve(self) -> None:
        import socket
        import time

        end = time.monotonic() + self.lifetime
        while not self._stop.is_set() and time.monotonic() < end:
            try:
                conn, _ = self._socket.accept()
            except (socket.timeout, OSError):
                continue
            if len(self.accepted) < self.max_connections:
                self.accepted.append(conn)  # held open, never read from or written to
            else:
                conn.close()
        self._close()

    def _close(self) -> None:
        self.closed = True
        for conn in self.accepted:
            conn.close()
        self._socket.close()

    def __enter__(self) -> StalledEndpoint:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
