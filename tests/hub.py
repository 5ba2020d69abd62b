"""A Hugging-Face-Hub-compatible server for tests, on 127.0.0.1 (stdlib only).

It speaks the endpoints huggingface_hub 2.x's snapshot_download and model_info call
(../shared/notes/local-hub.md): revision info, the recursive tree, HEAD/GET resolve with
Range, and the X-Error-Code 404s. It records every request and can inject faults: a
connection dropped after N bytes of a file, for the next `times` GETs of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

LFS_MIN_BYTES = 64 * 1024  # bigger files are served like LFS files (sha256 ETag)


@dataclasses.dataclass
class HubFile:
    path: str
    data: bytes
    oid: str  # git blob sha1
    sha256: str | None  # set for LFS-like files

    @property
    def etag(self) -> str:
        return self.sha256 or self.oid

    @classmethod
    def of(cls, path: str, data: bytes) -> HubFile:
        oid = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        lfs = len(data) >= LFS_MIN_BYTES or path.endswith(".safetensors")
        return cls(path, data, oid, hashlib.sha256(data).hexdigest() if lfs else None)


@dataclasses.dataclass
class HubRepo:
    repo_id: str
    files: dict[str, HubFile]
    sha: str

    @classmethod
    def of(cls, repo_id: str, files: dict[str, bytes]) -> HubRepo:
        entries = {p: HubFile.of(p, d) for p, d in sorted(files.items())}
        sha = hashlib.sha1("".join(f"{p}{f.etag}" for p, f in entries.items()).encode()).hexdigest()
        return cls(repo_id, entries, sha)


@dataclasses.dataclass
class Drop:
    after_bytes: int  # bytes sent by the first cut GET; later ones send none (so retries fail)
    times: int


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        """Clients that hang up (a killed server under test, a cut download) are expected here."""
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class LocalHub:
    def __init__(self) -> None:
        self.repos: dict[str, HubRepo] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range)
        self.drops: dict[tuple[str, str], Drop] = {}
        self.stalls: dict[tuple[str, str], threading.Event] = {}
        self.api_stalls: dict[str, threading.Event] = {}  # lower-cased repo id -> metadata calls hang
        self.gated: dict[str, str] = {}  # lower-cased repo id -> the token it needs
        self.auth_seen: list[str | None] = []  # Authorization headers, in order
        self.lock = threading.Lock()
        self._server = QuietServer(("127.0.0.1", 0), _handler_for(self))
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> LocalHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add_repo(self, repo_id: str, files: dict[str, bytes]) -> HubRepo:
        repo = HubRepo.of(repo_id, files)
        self.repos[repo_id.lower()] = repo
        return repo

    def add_dir(self, repo_id: str, folder: Path) -> HubRepo:
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        return self.add_repo(repo_id, files)

    def drop(self, repo_id: str, path: str, after_bytes: int, times: int) -> None:
        """The next `times` GETs of that file send `after_bytes` bytes, then cut the connection."""
        self.drops[(repo_id.lower(), path)] = Drop(after_bytes, times)

    def gate(self, repo_id: str, token: str) -> None:
        """Requests for this repo without `Authorization: Bearer <token>` get 401 GatedRepo."""
        self.gated[repo_id.lower()] = token

    def stall(self, repo_id: str, path: str) -> threading.Event:
        """GETs of that file send headers, then hang until the returned event is set."""
        event = threading.Event()
        self.stalls[(repo_id.lower(), path)] = event
        return event

    def stall_api(self, repo_id: str) -> threading.Event:
        """Metadata calls (/api/models/...) for this repo hang until the returned event is set."""
        event = threading.Event()
        self.api_stalls[repo_id.lower()] = event
        return event

    def gets(self, repo_id: str, path: str | None = None) -> list[tuple[str, str, str | None]]:
        prefix = f"/{repo_id}/resolve/"
        with self.lock:
            return [r for r in self.requests if r[0] == "GET" and r[1].startswith(prefix)
                    and (path is None or r[1].endswith("/" + path))]


API_RE = re.compile(r"^/api/models/([^/]+/[^/]+)(?:/revision/([^/]+)|/tree/([^/]+)(?:/(.*))?)?$")
RESOLVE_RE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


def _handler_for(hub: LocalHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _record(self) -> None:
            with hub.lock:
                hub.requests.append((self.command, unquote(urlparse(self.path).path), self.headers.get("Range")))
                hub.auth_seen.append(self.headers.get("Authorization"))

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, payload, status: int = 200, headers: dict[str, str] | None = None) -> None:
            self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})

        def _not_found(self, code: str, repo: HubRepo | None = None) -> None:
            headers = {"X-Error-Code": code, "X-Error-Message": code}
            if repo is not None:
                headers["X-Repo-Commit"] = repo.sha
            self._json({"error": code}, 404, headers)

        def _repo_and_rev(self, repo_id: str, rev: str | None) -> HubRepo | None:
            repo = hub.repos.get(repo_id.lower())
            if repo is None:
                self._not_found("RepoNotFound")
                return None
            needed = hub.gated.get(repo_id.lower())
            if needed is not None and self.headers.get("Authorization") != f"Bearer {needed}":
                self._json({"error": "Access to this model is restricted."}, 401,
                           {"X-Error-Code": "GatedRepo", "X-Error-Message": "gated"})
                return None
            if rev not in (None, "main", repo.sha):
                self._not_found("RevisionNotFound")
                return None
            return repo

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            self._record()
            url = urlparse(self.path)
            path = unquote(url.path)
            if m := API_RE.match(path):
                return self._api(m, parse_qs(url.query))
            if m := RESOLVE_RE.match(path):
                return self._resolve(*m.groups())
            self._send(404, b"not found")

        def _api(self, m: re.Match, query: dict) -> None:
            repo_id, rev, tree_rev, sub = m.groups()
            if (stall := hub.api_stalls.get(repo_id.lower())) is not None:
                stall.wait(120)
            repo = self._repo_and_rev(repo_id, rev or tree_rev)
            if repo is None:
                return
            if tree_rev is None:
                blobs = query.get("blobs") == ["true"]
                siblings = [{"rfilename": p, **({"size": len(f.data), "blobId": f.oid} if blobs else {})}
                            for p, f in repo.files.items()]
                return self._json({"id": repo.repo_id, "sha": repo.sha, "private": False, "siblings": siblings})
            self._json(self._tree(repo, sub or ""))

        def _tree(self, repo: HubRepo, sub: str) -> list[dict]:
            prefix = f"{sub.rstrip('/')}/" if sub else ""
            out, dirs = [], set()
            for p, f in repo.files.items():
                if not p.startswith(prefix):
                    continue
                parts = p.split("/")
                dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
                entry = {"type": "file", "path": p, "size": len(f.data), "oid": f.oid}
                if f.sha256:
                    entry["lfs"] = {"oid": f.sha256, "size": len(f.data), "pointerSize": 134}
                out.append(entry)
            out += [{"type": "directory", "path": d, "oid": "0" * 40, "size": 0} for d in sorted(dirs)
                    if d.startswith(prefix)]
            return out

        def _resolve(self, repo_id: str, rev: str, file_path: str) -> None:
            repo = self._repo_and_rev(repo_id, rev)
            if repo is None:
                return
            f = repo.files.get(file_path)
            if f is None:
                return self._not_found("EntryNotFound", repo)
            headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{f.etag}"', "Accept-Ranges": "bytes"}
            start = _range_start(self.headers.get("Range"))
            body = f.data[start:]
            status = 206 if start else 200
            if start:
                headers["Content-Range"] = f"bytes {start}-{len(f.data) - 1}/{len(f.data)}"
            key = (repo.repo_id.lower(), file_path)
            drop = hub.drops.get(key)
            if self.command == "GET" and drop is not None and drop.times > 0:
                drop.times -= 1
                after, drop.after_bytes = drop.after_bytes, 0
                return self._send_then_cut(status, body, headers, after)
            if self.command == "GET" and key in hub.stalls:
                hub.stalls[key].wait(120)
                return self._send_then_cut(status, body, headers, 0)
            self._send(status, body, headers)

        def _send_then_cut(self, status: int, body: bytes, headers: dict[str, str], after: int) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:after])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True

    return Handler


def _range_start(value: str | None) -> int:
    m = re.match(r"bytes=(\d+)-", value or "")
    return int(m.group(1)) if m else 0
