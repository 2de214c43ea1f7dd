"""A one-file HTTP server on loopback: how ``supervisor update --package FILE`` hands its file to the helper.

Its own module so that the daemon, which builds the same command-line parser, does not load ``http.server``.
The server is a ``baton.bounded_http`` one: another local user connecting to its port can neither pin its
threads (idle and half-sent requests are timed out and evicted) nor hold the file open by never reading.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from baton.bounded_http import BoundedHTTPServer, BoundedRequestHandler, HttpLimits

CHUNK = 256 * 1024


class _OneFileHandler(BoundedRequestHandler):
    server: _OneFileServer

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        if self.path != self.server.url_path:
            self.send_error(404)
            return
        size = self.server.file.stat().st_size
        start = 0
        rng = self.headers.get("Range", "")
        if rng.startswith("bytes=") and rng.endswith("-") and rng[6:-1].isdigit():
            start = int(rng[6:-1])
            if start >= size:
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size - start))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if not body:
            return
        with open(self.server.file, "rb") as f:
            f.seek(start)
            self.send_range(f, size - start, CHUNK)


class _OneFileServer(BoundedHTTPServer):
    def __init__(self, file: Path, limits: HttpLimits | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _OneFileHandler, limits=limits)
        self.file = file
        self.url_path = f"/{secrets.token_hex(16)}/{quote(file.name)}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{self.url_path}"


@contextlib.contextmanager
def serve_file(path: Path, limits: HttpLimits | None = None) -> Iterator[str]:
    """The file's URL on loopback for the duration of the block; the server is stopped and joined after."""
    server = _OneFileServer(path.resolve(), limits)
    thread = threading.Thread(target=server.serve_forever, name="package-server", daemon=True)
    thread.start()
    try:
        yield server.url
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
