"""A fake Hugging Face hub on 127.0.0.1 that serves model folders the tests built.

Enough of the hub's HTTP API for ``huggingface_hub.snapshot_download`` and
``from_pretrained``: repo info, the recursive tree listing, and ``resolve`` URLs
(HEAD for metadata, GET for bytes, with ``Range``). Files are plain (no LFS, no
xet), which the client handles as a small repository's files. Every request is
recorded so a test can see what the product asked for.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class FakeRepo:
    folder: Path
    commit: str = field(init=False)
    files: dict[str, bytes] = field(init=False)

    def __post_init__(self) -> None:
        self.files = {
            p.relative_to(self.folder).as_posix(): p.read_bytes() for p in sorted(self.folder.rglob("*")) if p.is_file()
        }
        digest = hashlib.sha1(b"".join(name.encode() + data for name, data in self.files.items()))
        self.commit = digest.hexdigest()

    @staticmethod
    def blob_id(data: bytes) -> str:
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """``with FakeHub({"org/name": folder}) as hub:`` then point ``HF_ENDPOINT`` at ``hub.url``.

    ``slow_files`` maps a file name to seconds its download takes (a big model on a slow link).
    """

    def __init__(self, repos: dict[str, Path], slow_files: dict[str, float] | None = None) -> None:
        self.repos = {repo_id: FakeRepo(folder) for repo_id, folder in repos.items()}
        self.slow_files = slow_files or {}
        self.requests: list[tuple[str, str]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def downloads(self) -> list[str]:
        """Paths fetched with GET through ``resolve``."""
        return [path for method, path in self.requests if method == "GET" and "/resolve/" in path]

    def _find(self, path: str) -> tuple[str, FakeRepo, str] | None:
        """(repo_id, repo, rest of the path) for a path that names a served repo."""
        for repo_id, repo in self.repos.items():
            for prefix in (f"/api/models/{repo_id}", f"/{repo_id}"):
                if path == prefix or path.startswith(prefix + "/"):
                    return repo_id, repo, path[len(prefix) :]
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet test output
                pass

            def do_HEAD(self) -> None:
                self._answer(send_body=False)

            def do_GET(self) -> None:
                self._answer(send_body=True)

            def _json(self, value: object, status: int = 200) -> None:
                body = json.dumps(value).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _missing(self, code: str) -> None:
                # The client tells "no such repo" from "no such file" by this header.
                self.send_response(404)
                self.send_header("X-Error-Code", code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _answer(self, send_body: bool) -> None:
                path = unquote(urlsplit(self.path).path)
                hub.requests.append((self.command, path))
                found = hub._find(path)
                if found is None:
                    self._missing("RepoNotFound")
                    return
                repo_id, repo, rest = found
                if self.path.startswith("/api/models/"):
                    if rest.startswith("/tree/"):
                        tree = [
                            {"type": "file", "path": name, "size": len(data), "oid": repo.blob_id(data)}
                            for name, data in repo.files.items()
                        ]
                        self._json(tree)
                    else:  # repo info, with or without /revision/<rev>
                        siblings = [{"rfilename": name} for name in repo.files]
                        self._json({"id": repo_id, "modelId": repo_id, "sha": repo.commit, "siblings": siblings})
                    return
                if not rest.startswith("/resolve/"):
                    self._missing("EntryNotFound")
                    return
                name = rest.split("/", 3)[3] if rest.count("/") >= 3 else ""
                data = repo.files.get(name)
                if data is None:
                    self._missing("EntryNotFound")
                    return
                start, end = 0, len(data)
                ranged = self.headers.get("Range", "")
                if ranged.startswith("bytes=") and send_body:
                    first, _, last = ranged[6:].partition("-")
                    start, end = int(first or 0), (int(last) + 1 if last else len(data))
                self.send_response(206 if (start, end) != (0, len(data)) else 200)
                self.send_header("ETag", f'"{repo.blob_id(data)}"')
                self.send_header("X-Repo-Commit", repo.commit)
                self.send_header("Content-Length", str(end - start))
                self.end_headers()
                if send_body:
                    time.sleep(hub.slow_files.get(name, 0.0))
                    self.wfile.write(data[start:end])

        return Handler
