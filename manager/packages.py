"""The Manager's package server: the files of one directory over HTTP, with Range.

Supervisors download the packages a push names from here. GET and HEAD; a
single ``Range: bytes=`` range is answered 206 with ``Content-Range`` (the
helper resumes an interrupted download that way), an unsatisfiable one 416,
several ranges are ignored (200, the whole file, as RFC 9110 allows). Only
regular files inside the directory are served: ``..``, absolute paths, and
symlinks leading out are refused with 404, and there are no directory listings.
Packages are public by design (they are signed, not secret).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from loguru import logger

COPY_CHUNK = 256 * 1024
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def resolve_inside(root: Path, url_path: str) -> Path | None:
    """The regular file ``url_path`` names inside ``root``, or None (outside, missing, not a file)."""
    rel = unquote(urlsplit(url_path).path).lstrip("/")
    if not rel or "\x00" in rel or any(part in ("..", ".") for part in rel.split("/")):
        return None
    root = root.resolve()
    try:
        target = (root / rel).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if root not in target.parents or not target.is_file():
        return None
    return target


def parse_range(header: str, size: int) -> tuple[int, int] | bool | None:
    """(first, last) inclusive for one satisfiable range; None to ignore it; False when unsatisfiable."""
    m = _RANGE.match(header.replace(" ", ""))
    if m is None:
        return None  # several ranges or another unit: serve the whole file
    first, last = m.group(1), m.group(2)
    if not first and not last:
        return None
    if not first:  # a suffix: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            return False
        return max(0, size - n), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or (last and int(last) < start):
        return False
    return start, end


class _Handler(BaseHTTPRequestHandler):
    server: PackageHTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("package server: {} {}", self.address_string(), format % args)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        path = resolve_inside(self.server.root, self.path)
        if path is None:
            self.send_error(HTTPStatus.NOT_FOUND, "no such package")
            return
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            header = self.headers.get("Range")
            rng = parse_range(header, size) if header else None
            if rng is False:
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if isinstance(rng, tuple):
                first, last = rng
                self.send_response(HTTPStatus.PARTIAL_CONTENT)
                self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
            else:
                first, last = 0, size - 1
                self.send_response(HTTPStatus.OK)
            length = last - first + 1
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(length))
            self.end_headers()
            if not body:
                return
            f.seek(first)
            remaining = length
            with contextlib.suppress(ConnectionError):
                while remaining > 0:
                    chunk = f.read(min(COPY_CHUNK, remaining))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    remaining -= len(chunk)


class PackageHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], root: Path) -> None:
        self.root = Path(root)
        super().__init__(address, _Handler)


class PackageServer:
    """The HTTP server on its own thread: ``start()``, ``url``, ``stop()``."""

    def __init__(self, root: Path, host: str, port: int) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.httpd = PackageHTTPServer((host, port), self.root)
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="package-server", daemon=True)

    @property
    def address(self) -> str:
        host, port = self.httpd.server_address[:2]
        host = str(host)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def start(self) -> PackageServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)


def copy_into(src: Path, dest: Path) -> None:
    """Copy ``src`` to ``dest`` atomically (a partly copied file is never served)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    with open(src, "rb") as fin, open(tmp, "wb") as fout:
        shutil.copyfileobj(fin, fout, COPY_CHUNK)
        fout.flush()
        os.fsync(fout.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, dest)
