"""A loopback stand-in for the Hugging Face Hub, enough for ``huggingface_hub``'s own client to push and pull models.

Start it, point a client at it with ``HF_ENDPOINT=http://127.0.0.1:PORT`` (read at import: use a fresh process),
``HF_HUB_DISABLE_XET=1`` (so uploads take the plain HTTP path) and ``HF_TOKEN`` = one of its tokens::

    with LoopbackHub() as hub:          # thread, bound to 127.0.0.1 on a free port
        hub.url, hub.token              # "http://127.0.0.1:PORT", "hf_loopback_write_token"
        hub.faults["commit"] = "500"    # or "drop": close the connection without answering
        hub.files("tester/model")       # {path: bytes} at the head of main

Covered (model repos only; the wire formats are those of huggingface_hub 2.4.0 ``hf_api.py``, ``_commit_api.py``
and ``file_download.py``):

- ``POST /api/repos/create`` (409 when the repo exists; the repo starts with a ``.gitattributes`` commit);
- ``GET /api/models/{repo}[/revision/{rev}]`` (id, sha, private, siblings);
- ``POST /api/models/{repo}/branch/{branch}`` (409 when it exists; ``startingPoint`` honoured);
- ``POST /api/validate-yaml`` (the README front matter must be a YAML mapping);
- ``POST /api/models/{repo}/preupload/{rev}``: every file is ``regular``, ``oid`` = the git blob sha1 of the
  current file so the client skips unchanged files;
- ``POST /api/models/{repo}/commit/{rev}``: NDJSON, ``header`` + ``file`` (base64) + ``deletedFile`` /
  ``deletedFolder``; answers ``commitUrl``, ``commitOid``;
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` with ``X-Repo-Commit``, ``ETag`` (the git blob sha1),
  ``Content-Length``, single ``Range`` requests, and ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``,
  ``EntryNotFound``) on 404s; ``rev`` is a branch or a full commit sha.
- Auth: write routes need ``Authorization: Bearer <token>`` with a known token (else 401); private repos are
  invisible (404 ``RepoNotFound``) without one.
- Fault injection per route (``create``, ``branch``, ``preupload``, ``commit``, ``resolve``, ``info``): ``"500"``
  answers a 500 with a JSON error, ``"drop"`` reads the request and closes the socket without a response.

Not covered: LFS and Xet uploads (``lfsFile`` operations are answered 400), pull requests (``create_pr``), tags,
``list_repo_refs``/``tree``/``paths-info`` (so no ``snapshot_download``), datasets/spaces, token scopes and
namespace permissions (any known token writes anywhere), rate limits, pagination, redirects/CDN ``Location``
(``X-Linked-Size``/``X-Linked-Etag`` are never sent), repo deletion, and persistence (all state is in memory).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

DEFAULT_TOKEN = "hf_loopback_write_token"
DEFAULT_USER = "tester"
FAULT_MODES = ("500", "drop")

_REPO = r"(?P<repo>[^/]+(?:/[^/]+)?)"
_ROUTES = [
    ("POST", "create", re.compile(r"^/api/repos/create$")),
    ("POST", "validate", re.compile(r"^/api/validate-yaml$")),
    ("GET", "info", re.compile(rf"^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$")),
    ("POST", "branch", re.compile(rf"^/api/models/{_REPO}/branch/(?P<rev>[^/]+)$")),
    ("POST", "preupload", re.compile(rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$")),
    ("POST", "commit", re.compile(rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$")),
    ("HEAD", "resolve", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")),
    ("GET", "resolve", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")),
]
_COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob (what the Hub uses as a regular file's oid and ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    private: bool = False
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit sha
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> {path: content}

    def resolve(self, rev: str) -> str | None:
        if rev in self.branches:
            return self.branches[rev]
        return rev if _COMMIT_SHA.match(rev) and rev in self.commits else None


class _HttpError(Exception):
    def __init__(
        self, status: int, message: str, code: str | None = None, headers: dict | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class LoopbackHub:
    """A threaded in-memory Hub on ``127.0.0.1`` (see the module docstring for what it speaks)."""

    def __init__(self, tokens: dict[str, str] | None = None) -> None:
        self.tokens = dict(tokens) if tokens is not None else {DEFAULT_TOKEN: DEFAULT_USER}
        self.token = next(iter(self.tokens), None)
        self.repos: dict[str, Repo] = {}
        self.faults: dict[str, str] = {}  # route name -> "500" | "drop"
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, in order
        self._lock = threading.Lock()
        self._counter = itertools.count()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._sockets: set[socket.socket] = set()
        self._url: str | None = None

    # -- lifecycle -----------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (still the last address after :meth:`stop`, where nothing answers)."""
        if self._url is None:
            raise RuntimeError("the loopback hub was never started")
        return self._url

    def start(self) -> LoopbackHub:
        hub = self

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def get_request(self):  # track connections so stop() can cut them
                conn, addr = super().get_request()
                with hub._lock:
                    hub._sockets.add(conn)
                return conn, addr

            def shutdown_request(self, request):
                with hub._lock:
                    hub._sockets.discard(request)
                super().shutdown_request(request)

        self._server = Server(("127.0.0.1", 0), _make_handler(self))
        self._url = "http://{}:{}".format(*self._server.server_address[:2])
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="loopback-hub",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and cut every open connection (later requests get 'connection refused')."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            for conn in self._sockets:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            self._sockets.clear()
        self._server = None

    def __enter__(self) -> LoopbackHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- direct access for tests ---------------------------------------------------------------------
    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of ``repo_id`` at ``revision`` (a copy)."""
        repo = self.repos[repo_id]
        return dict(repo.commits[repo.resolve(revision)])

    def put_files(self, repo_id: str, files: dict[str, bytes], *, private: bool = False) -> str:
        """Create (or replace) ``repo_id`` with one commit on main holding exactly ``files``; returns its sha."""
        with self._lock:
            repo = self.repos[repo_id] = Repo(private=private)
            return self._commit(repo, "main", dict(files), "seed")

    def _commit(self, repo: Repo, branch: str, files: dict[str, bytes], summary: str) -> str:
        parent = repo.branches.get(branch, "")
        blob = json.dumps(
            [parent, summary, next(self._counter), sorted((p, git_blob_sha1(c)) for p, c in files.items())]
        )
        sha = hashlib.sha1(blob.encode()).hexdigest()
        repo.commits[sha] = files
        repo.branches[branch] = sha
        return sha

    # -- request handling (called from handler threads) ------------------------------------------------
    def _user(self, headers: Any) -> str | None:
        auth = headers.get("Authorization") or ""
        return self.tokens.get(auth[7:]) if auth.startswith("Bearer ") else None

    def _need_user(self, headers: Any) -> str:
        user = self._user(headers)
        if user is None:
            given = bool(headers.get("Authorization"))
            msg = "Invalid credentials in Authorization header" if given else "Invalid username or password."
            raise _HttpError(401, msg, headers={"X-Error-Message": msg})
        return user

    def _repo(self, repo_id: str, headers: Any) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and self._user(headers) is None):
            raise _HttpError(404, f"Repository not found: {repo_id}", "RepoNotFound")
        return repo

    def _rev(self, repo: Repo, rev: str) -> str:
        sha = repo.resolve(unquote(rev))
        if sha is None:
            raise _HttpError(404, f"Invalid rev id: {unquote(rev)}", "RevisionNotFound")
        return sha

    def handle(
        self, route: str, m: re.Match, headers: Any, body: bytes, query: str = ""
    ) -> tuple[int, dict, bytes]:
        """Answer one request: ``(status, headers, body)``; raises ``_HttpError`` for error answers."""
        g = m.groupdict()
        with self._lock:
            if route == "create":
                user = self._need_user(headers)
                req = json.loads(body or b"{}")
                if req.get("type", "model") != "model":
                    raise _HttpError(400, "the loopback hub only hosts model repos")
                repo_id = f"{req.get('organization') or user}/{req['name']}"
                url = f"{self._base(headers)}/{repo_id}"
                if (
                    repo_id in self.repos
                ):  # the Hub's 409 carries the url: create_repo(exist_ok=True) reads it
                    return _json(409, {"error": "You already created this model repo", "url": url})
                repo = self.repos[repo_id] = Repo(private=req.get("visibility", "public") != "public")
                self._commit(
                    repo,
                    "main",
                    {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                    "initial commit",
                )
                return _json(200, {"url": url, "name": repo_id, "id": repo_id})
            if route == "validate":
                content = json.loads(body).get("content", "")
                match = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.S)
                try:
                    meta = yaml.safe_load(match.group(1)) if match else {}
                except yaml.YAMLError as e:
                    raise _HttpError(400, "invalid YAML", headers={}) from e
                if meta is not None and not isinstance(meta, dict):
                    return _json(
                        400, {"errors": [{"message": "metadata must be a YAML mapping"}], "warnings": []}
                    )
                return _json(200, {"errors": [], "warnings": []})
            repo = self._repo(g["repo"], headers)
            if route == "info":
                sha = self._rev(repo, g["rev"] or "main")
                siblings = [{"rfilename": p} for p in sorted(repo.commits[sha])]
                return _json(
                    200, {"id": g["repo"], "sha": sha, "private": repo.private, "siblings": siblings}
                )
            if route == "resolve":
                sha = self._rev(repo, g["rev"])
                path = unquote(g["path"])
                content = repo.commits[sha].get(path)
                if content is None:
                    raise _HttpError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": sha})
                hdrs = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha1(content)}"'}
                return _ranged(content, headers.get("Range"), hdrs)
            self._need_user(headers)
            if route == "branch":
                branch = unquote(g["rev"])
                if branch in repo.branches:
                    raise _HttpError(409, f"Reference already exists: refs/heads/{branch}")
                start = json.loads(body or b"{}").get("startingPoint") or "main"
                repo.branches[branch] = self._rev(repo, start)
                return _json(200, {})
            sha = self._rev(repo, g["rev"])
            if route == "preupload":
                current = repo.commits[sha]
                files = [
                    {
                        "path": f["path"],
                        "uploadMode": "regular",
                        "shouldIgnore": False,
                        "oid": git_blob_sha1(current[f["path"]]) if f["path"] in current else None,
                    }
                    for f in json.loads(body)["files"]
                ]
                return _json(200, {"files": files, "commitOid": sha})
            if route == "commit":
                if "create_pr" in query:
                    raise _HttpError(400, "pull requests are not supported by the loopback hub")
                branch = unquote(g["rev"])
                if branch not in repo.branches:
                    raise _HttpError(400, f"can only commit to a branch, not {branch!r}")
                files = dict(repo.commits[sha])
                summary = ""
                for line in body.splitlines():
                    if not line.strip():
                        continue
                    item = json.loads(line)
                    key, value = item["key"], item["value"]
                    if key == "header":
                        summary = value.get("summary", "")
                        parent = value.get("parentCommit")
                        if parent and parent != sha:
                            raise _HttpError(412, f"parent commit {parent} is not the head of {branch}")
                    elif key == "file":
                        if value.get("encoding") != "base64":
                            raise _HttpError(400, f"unsupported encoding {value.get('encoding')!r}")
                        files[value["path"]] = base64.b64decode(value["content"])
                    elif key == "deletedFile":
                        files.pop(value["path"], None)
                    elif key == "deletedFolder":
                        prefix = value["path"].rstrip("/") + "/"
                        files = {p: c for p, c in files.items() if not p.startswith(prefix)}
                    else:
                        raise _HttpError(
                            400, f"the loopback hub does not support {key!r} operations (LFS/Xet/copy)"
                        )
                new = self._commit(repo, branch, files, summary)
                url = f"{self._base(headers)}/{g['repo']}/commit/{new}"
                return _json(
                    200, {"commitUrl": url, "commitOid": new, "pullRequestUrl": None, "success": True}
                )
        raise _HttpError(404, f"no route for {route}")

    def _base(self, headers: Any) -> str:
        return f"http://{headers.get('Host') or self.url.split('//', 1)[1]}"


def _match(method: str, path: str) -> tuple[str, re.Match] | None:
    for verb, route, pattern in _ROUTES:
        m = pattern.match(path) if verb == method else None
        if m is not None:
            return route, m
    return None


def _json(status: int, obj: Any) -> tuple[int, dict, bytes]:
    return status, {"Content-Type": "application/json"}, json.dumps(obj).encode()


def _ranged(content: bytes, range_header: str | None, headers: dict) -> tuple[int, dict, bytes]:
    headers = {**headers, "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
    m = re.fullmatch(r"bytes=(\d*)-(\d*)", range_header or "")
    if not m or not (m.group(1) or m.group(2)):
        return 200, headers, content
    size = len(content)
    if m.group(1):
        start, end = int(m.group(1)), int(m.group(2)) if m.group(2) else size - 1
    else:
        start, end = max(size - int(m.group(2)), 0), size - 1
    if start >= size or start > end:
        raise _HttpError(416, "range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
    end = min(end, size - 1)
    return 206, {**headers, "Content-Range": f"bytes {start}-{end}/{size}"}, content[start : end + 1]


def _make_handler(hub: LoopbackHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # one request per connection: nothing lingers after stop()

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def _body(self) -> bytes:
            if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _dispatch(self) -> None:
            url = urlsplit(self.path)
            path = url.path
            with hub._lock:
                hub.requests.append((self.command, path))
            body = self._body()
            found = _match(self.command, path)
            if found is None:
                return self._send(*_json(404, {"error": f"no route for {self.command} {path}"}))
            route, m = found
            fault = hub.faults.get(route)
            if fault == "drop":
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return None
            if fault == "500":
                return self._send(*_json(500, {"error": f"injected fault on {route}"}))
            try:
                status, headers, payload = hub.handle(route, m, self.headers, body, url.query)
            except _HttpError as e:
                headers = {**e.headers, **({"X-Error-Code": e.code} if e.code else {})}
                status, hdrs, payload = _json(e.status, {"error": e.message})
                return self._send(status, {**hdrs, **headers}, payload)
            return self._send(status, headers, payload)

        def _send(self, status: int, headers: dict, payload: bytes) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        do_GET = do_POST = do_HEAD = _dispatch

    return Handler
