"""The Manager's package server: the files of one directory over HTTP, with Range.

Supervisors download the packages a push names from here. GET and HEAD; a
single ``Range: bytes=`` range is answered 206 with ``Content-Range`` (the
helper resumes an interrupted download that way), an unsatisfiable one 416,
several ranges are ignored (200, the whole file, as RFC 9110 allows). Only
regular files inside the directory are served: ``..``, absolute paths, and
symlinks leading out are refused with 404, and there are no directory listings.
Packages are public by design (they are signed, not secret).

Content addresses: ``publish`` stores a package as ``<sha256>/<name>`` and names it
``/by-sha256/<sha256>/<name>`` (the older ``/<sha256>/<name>`` is served too). Such
a response carries ``ETag: "<sha256>"`` and ``Cache-Control: public, max-age=31536000,
immutable``, and ``If-None-Match`` with that tag is answered 304: the bytes behind
the URL never change, so any HTTP cache or CDN in front of the Manager may keep them.

Load: at most ``max_downloads`` package bodies are sent at once; a GET beyond that
is answered ``503`` with ``Retry-After: RETRY_AFTER_S`` (the helper waits and
retries within its deadline). A client that stops reading gives its slot back:
the server is a ``baton.bounded_http`` server, so a body the client acknowledges
no byte of for ``idle_timeout_s``, or less than ``min_rate_bytes_per_s`` over a
window, is cut and its connection reset; ``max_downloads + HttpLimits.max_connections``
connections have a thread, and idle or half-sent requests are evicted first.
``on_served(sha256, bytes)`` is called after each body of a content-addressed
package with the bytes actually sent (``serve`` adds them to the store's counter
for that package).
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from collections.abc import Callable
from dataclasses import replace
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from baton.bounded_http import BoundedHTTPServer, BoundedRequestHandler, HttpLimits
from baton.log import logger

COPY_CHUNK = 256 * 1024
DEFAULT_MAX_DOWNLOADS = 64  # package bodies sent at once (serve --max-downloads)
RETRY_AFTER_S = 1  # what a 503 beyond that bound asks the client to wait
IMMUTABLE = "public, max-age=31536000, immutable"
BY_SHA256 = "/by-sha256/"
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def content_address(url_path: str) -> tuple[str, str]:
    """(sha256, the path inside the package directory); sha256 is "" for a path that is not content-addressed.

    ``/by-sha256/<hex>/<name>`` must name a 64-hex digest; ``/<hex>/<name>`` is publish's layout itself.
    """
    raw = urlsplit(url_path).path  # still percent-encoded: resolve_inside decodes it, once
    by_address = raw.startswith(BY_SHA256)
    rest = raw[len(BY_SHA256) - 1:] if by_address else raw
    first = unquote(rest.lstrip("/").split("/", 1)[0])
    if _SHA256_HEX.match(first):
        return first, rest
    return "", ("" if by_address else raw)


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


class _Handler(BoundedRequestHandler):
    server: PackageHTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("package server: {} {}", self.address_string(), format % args)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        sha256, rel = content_address(self.path)
        path = resolve_inside(self.server.root, rel) if rel else None
        if path is None:
            self.send_error(HTTPStatus.NOT_FOUND, "no such package")
            return
        etag = f'"{sha256}"' if sha256 else ""
        if etag and etag in {t.strip() for t in self.headers.get("If-None-Match", "").split(",")}:
            self.send_response(HTTPStatus.NOT_MODIFIED)
            self._cache_headers(etag)
            self.end_headers()
            return
        slot = self.server.slots if body else None
        if slot is not None and not slot.acquire(blocking=False):
            self.send_response(HTTPStatus.SERVICE_UNAVAILABLE)
            self.send_header("Retry-After", str(RETRY_AFTER_S))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        try:
            sent = self._send_file(path, body, etag)
        finally:
            if slot is not None:
                slot.release()
        if sha256 and sent and self.server.on_served is not None:
            try:
                self.server.on_served(sha256, sent)
            except Exception as e:  # counting must never break serving
                logger.warning("package server: cannot count {} bytes of {}: {}", sent, sha256, e)

    def _cache_headers(self, etag: str) -> None:
        if etag:
            self.send_header("ETag", etag)
            self.send_header("Cache-Control", IMMUTABLE)

    def _send_file(self, path: Path, body: bool, etag: str) -> int:
        """The file or its range; returns the body bytes sent."""
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            header = self.headers.get("Range")
            rng = parse_range(header, size) if header else None
            if rng is False:
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return 0
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
            self._cache_headers(etag)
            self.end_headers()
            if not body:
                return 0
            f.seek(first)
            return self.send_range(f, length, COPY_CHUNK)


class PackageHTTPServer(BoundedHTTPServer):
    def __init__(self, address: tuple[str, int], root: Path, max_downloads: int,
                 on_served: Callable[[str, int], None] | None, limits: HttpLimits | None = None) -> None:
        self.root = Path(root)
        self.slots = threading.BoundedSemaphore(max_downloads)
        self.on_served = on_served
        # every download has a thread, and as many again answer HEADs, 304s and 503s
        limits = limits or HttpLimits()
        super().__init__(address, _Handler,
                         limits=replace(limits, max_connections=max_downloads + limits.max_connections))


class PackageServer:
    """The HTTP server on its own thread: ``start()``, ``url``, ``stop()``."""

    def __init__(self, root: Path, host: str, port: int, *, max_downloads: int = DEFAULT_MAX_DOWNLOADS,
                 on_served: Callable[[str, int], None] | None = None, limits: HttpLimits | None = None) -> None:
        if max_downloads < 1:
            raise ValueError("max_downloads must be at least 1")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.httpd = PackageHTTPServer((host, port), self.root, max_downloads, on_served, limits)
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
