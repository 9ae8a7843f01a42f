"""A small Hugging Face hub on 127.0.0.1, for pull tests that never reach the internet.

It answers what `huggingface_hub` asks (see its file_download.py and hf_api.py):
- HEAD/GET /{repo}/resolve/{revision}/{path}: X-Repo-Commit, ETag, Content-Length; LFS files
  (model files) answer 302 to a "CDN" on another host name (localhost) with X-Linked-Etag
  (the sha256) and X-Linked-Size, as the real hub does, so the token never follows them.
- GET /cdn/{repo}/{sha256}: the bytes, with Range support (206 + Content-Range).
- GET /api/models/{repo}[/revision/{rev}], GET /api/models/{repo}/tree/{rev},
  POST /api/models/{repo}/paths-info/{rev}.
- Errors carry X-Error-Code (RepoNotFound, EntryNotFound, GatedRepo) like the hub's.

Faults for tests: `cut_at(path, offset)` drops the connection once `offset` bytes of the file
were sent and answers 503 until `heal()`; `corrupt(path)` serves altered bytes under the
right sha256; `hold_at(path, offset)` pauses the body there until `release()`.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

COMMIT = hashlib.sha1(b"rkllama test commit").hexdigest()
_CHUNK = 256 * 1024
_LFS_SUFFIXES = (".gguf", ".rkllm", ".bin", ".safetensors")


@dataclass
class HubFile:
    path: str
    source: bytes | Path
    size: int
    sha256: str
    git_sha1: str
    lfs: bool
    advertised_size: int | None = None  # what HEAD claims, when a test wants it to lie

    def read(self, start: int, end: int) -> bytes:
        if isinstance(self.source, bytes):
            return self.source[start:end]
        with self.source.open("rb") as handle:
            handle.seek(start)
            return handle.read(end - start)


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names


@dataclass
class _Faults:
    cut: dict[str, int] = field(default_factory=dict)
    broken: set[str] = field(default_factory=set)
    corrupt: set[str] = field(default_factory=set)
    hold: dict[str, int] = field(default_factory=dict)
    gate: threading.Event = field(default_factory=threading.Event)


class HubEmulator:
    def __init__(self, cdn_host: str = "localhost") -> None:
        self.repos: dict[str, dict[str, HubFile]] = {}
        self.gated: dict[str, str] = {}  # repo_id -> the token that may read it
        self.requests: list[RecordedRequest] = []
        self.faults = _Faults()
        self.cdn_host = cdn_host
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # --- setup ----------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> HubEmulator:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> HubEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add_repo(self, repo_id: str, gated_token: str | None = None) -> None:
        self.repos.setdefault(repo_id, {})
        if gated_token:
            self.gated[repo_id] = gated_token

    def add_file(
        self,
        repo_id: str,
        path: str,
        source: bytes | Path,
        lfs: bool | None = None,
        advertised_size: int | None = None,
    ) -> HubFile:
        self.add_repo(repo_id)
        sha256, git_sha1, size = _digests(source)
        entry = HubFile(
            path=path,
            source=source,
            size=size,
            sha256=sha256,
            git_sha1=git_sha1,
            lfs=path.endswith(_LFS_SUFFIXES) if lfs is None else lfs,
            advertised_size=advertised_size,
        )
        self.repos[repo_id][path] = entry
        return entry

    # --- faults ---------------------------------------------------------------------------
    def cut_at(self, path: str, offset: int) -> None:
        self.faults.cut[path] = offset

    def heal(self) -> None:
        self.faults.cut.clear()
        self.faults.broken.clear()

    def corrupt(self, path: str) -> None:
        self.faults.corrupt.add(path)

    def hold_at(self, path: str, offset: int) -> None:
        self.faults.gate.clear()
        self.faults.hold[path] = offset

    def release(self) -> None:
        self.faults.hold.clear()
        self.faults.gate.set()

    def downloads(self, repo_id: str, path: str) -> list[RecordedRequest]:
        """The GETs that fetched the bytes of a file (from the CDN for LFS files)."""
        entry = self.repos[repo_id][path]
        wanted = f"/cdn/{repo_id}/{entry.sha256}" if entry.lfs else f"/{repo_id}/resolve/main/{path}"
        return [r for r in self.requests if r.method == "GET" and r.path == wanted]


def _digests(source: bytes | Path) -> tuple[str, str, int]:
    sha256 = hashlib.sha256()
    size = len(source) if isinstance(source, bytes) else source.stat().st_size
    git = hashlib.sha1(f"blob {size}\0".encode())
    chunks = [source] if isinstance(source, bytes) else _file_chunks(source)
    for chunk in chunks:
        sha256.update(chunk)
        git.update(chunk)
    return sha256.hexdigest(), git.hexdigest(), size


def _file_chunks(path: Path):
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            yield chunk


_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_CDN = re.compile(r"^/cdn/(?P<repo>[^/]+/[^/]+)/(?P<sha>[0-9a-f]{64})$")
_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/(?P<kind>revision|tree|paths-info)(?:/(?P<rev>[^/]+))?)?$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


def _handler_for(hub: HubEmulator) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet tests
            return None

        # --- plumbing -------------------------------------------------------------------
        def _record(self) -> str:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append(RecordedRequest(self.command, path, {k.lower(): v for k, v in self.headers.items()}))
            return path

        def _send(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            if "Content-Length" not in headers:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD" and body:
                self.wfile.write(body)

        def _json(self, payload: object) -> None:
            self._send(200, {"Content-Type": "application/json"}, json.dumps(payload).encode())

        def _error(self, status: int, code: str, message: str) -> None:
            headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}
            self._send(status, headers, json.dumps({"error": message}).encode())

        def _repo(self, repo_id: str) -> dict[str, HubFile] | None:
            """The repo's files, or None after answering with the hub's error."""
            if repo_id not in hub.repos:
                self._error(404, "RepoNotFound", "Repository not found")
                return None
            token = hub.gated.get(repo_id)
            if token and self.headers.get("Authorization") != f"Bearer {token}":
                self._error(401, "GatedRepo", "Access to this model is restricted: you must be authenticated.")
                return None
            return hub.repos[repo_id]

        # --- verbs ----------------------------------------------------------------------
        def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
            self._route()

        def do_GET(self) -> None:  # noqa: N802
            self._route()

        def do_POST(self) -> None:  # noqa: N802
            self._route()

        def _route(self) -> None:
            path = self._record()
            if match := _RESOLVE.match(path):
                return self._resolve(match["repo"], match["path"])
            if match := _CDN.match(path):
                return self._cdn(match["repo"], match["sha"])
            if match := _API.match(path):
                return self._api(match["repo"], match["kind"])
            self._error(404, "NotFound", f"Not found: {path}")

        def _resolve(self, repo_id: str, path: str) -> None:
            files = self._repo(repo_id)
            if files is None:
                return
            entry = files.get(path)
            if entry is None:
                self._send(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT, "Content-Length": "0"})
                return
            if entry.lfs:
                location = f"http://{hub.cdn_host}:{hub.port}/cdn/{repo_id}/{entry.sha256}"
                headers = {
                    "Location": location,
                    "X-Repo-Commit": COMMIT,
                    "ETag": f'"{entry.git_sha1}"',
                    "X-Linked-Etag": f'"{entry.sha256}"',
                    "X-Linked-Size": str(entry.advertised_size or entry.size),
                    "Content-Length": "0",
                }
                self._send(302, headers)
                return
            self._body(entry, {"X-Repo-Commit": COMMIT, "ETag": f'"{entry.git_sha1}"'})

        def _cdn(self, repo_id: str, sha: str) -> None:
            entry = next((f for f in hub.repos.get(repo_id, {}).values() if f.sha256 == sha), None)
            if entry is None:
                self._send(404, {"Content-Length": "0"})
                return
            self._body(entry, {"ETag": f'"{entry.sha256}"'})

        def _body(self, entry: HubFile, headers: dict[str, str]) -> None:
            if entry.path in hub.faults.broken and self.command == "GET":
                self._send(503, {"Content-Length": "0"})
                return
            start, end = 0, entry.size
            status = 200
            wanted = self.headers.get("Range")
            if wanted and (match := _RANGE.match(wanted)):
                start = int(match[1])
                end = int(match[2]) + 1 if match[2] else entry.size
                if start >= entry.size:
                    self._send(416, {"Content-Range": f"bytes */{entry.size}", "Content-Length": "0"})
                    return
                status = 206
                headers = {**headers, "Content-Range": f"bytes {start}-{end - 1}/{entry.size}"}
            headers = {**headers, "Content-Length": str(end - start), "Accept-Ranges": "bytes"}
            headers.setdefault("Content-Type", "application/octet-stream")
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            if self.command == "HEAD":
                return
            self._stream(entry, start, end)

        def _stream(self, entry: HubFile, start: int, end: int) -> None:
            cut = hub.faults.cut.get(entry.path)
            hold = hub.faults.hold.get(entry.path)
            position = start
            while position < end:
                stop = min(end, position + _CHUNK)
                for limit in (cut, hold):
                    if limit is not None and position < limit < stop:
                        stop = limit
                if cut is not None and position >= cut:
                    # Drop the connection mid-body; later GETs fail until heal().
                    hub.faults.broken.add(entry.path)
                    hub.faults.cut.pop(entry.path, None)
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if hold is not None and position >= hold:
                    self.wfile.flush()
                    hub.faults.gate.wait(60)
                    hold = None
                chunk = entry.read(position, stop)
                if entry.path in hub.faults.corrupt:
                    chunk = bytes(b ^ 0xFF for b in chunk)
                self.wfile.write(chunk)
                position = stop

        def _api(self, repo_id: str, kind: str | None) -> None:
            files = self._repo(repo_id)
            if files is None:
                return
            if kind == "paths-info" and self.command == "POST":
                length = int(self.headers.get("Content-Length") or 0)
                form = parse_qs(self.rfile.read(length).decode())
                wanted = form.get("paths", [])
                return self._json([_tree_entry(files[p]) for p in wanted if p in files])
            if kind == "tree":
                return self._json([_tree_entry(f) for f in files.values()])
            return self._json(
                {
                    "_id": repo_id,
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": COMMIT,
                    "private": False,
                    "gated": "manual" if repo_id in hub.gated else False,
                    "disabled": False,
                    "tags": [],
                    "siblings": [{"rfilename": p} for p in files],
                }
            )

    return Handler


def _tree_entry(entry: HubFile) -> dict[str, object]:
    info: dict[str, object] = {"type": "file", "path": entry.path, "size": entry.size, "oid": entry.git_sha1}
    if entry.lfs:
        info["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": 134}
    return info
