"""Transport: where a package's bytes come from (http, https, file), behind one small interface, :class:`Fetcher`.

A fetcher opens the source at an offset and yields a :class:`Body` whose
``readinto`` fills the caller's buffer; it checks status, lengths and ranges
before the body is read, and bounds everything the server controls in time:
every socket operation, the connect and the response head's included, waits at
most its own timeout and never past the whole download's deadline.

The body costs one copy: the standard library's http.client reads the head,
then the body goes straight from the socket into the writer's reused
page-aligned buffers (``readinto``, no allocation per chunk); the README's
dependency table says why http.client and not httpx.

``file://`` URLs are refused unless ``file_url_root`` is set; then only regular
files beneath it are read (:func:`helper.download.files.open_beneath`).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import socket
import ssl
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol
from urllib.parse import urljoin, urlsplit

from baton.admission import file_url_relative_path
from baton.errors import clip
from helper.download.errors import (
    ConnectionFailed,
    DownloadTimeout,
    DownloadTooLarge,
    DownloadTruncated,
    HttpStatusError,
    ProtocolViolation,
    ServerBusy,
    UnexpectedResponse,
    UnsupportedUrl,
)
from helper.download.files import open_beneath
from helper.download.limits import DownloadLimits
from helper.download.rate import BUSY_BACKOFF_MAX_S

MAX_RESPONSE_HEAD_BYTES = 64 * 1024  # status line and headers together (also http.client's limit on one line)
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Body:
    """What a fetcher yields: where the bytes start in the file, and how to read them.

    ``readinto`` fills a prefix of the buffer it is given with the next bytes,
    at most one read of the source per call, and returns how many; 0 at the end.
    """

    start: int
    readinto: Callable[[memoryview], int]


class Fetcher(Protocol):
    """Opens ``url`` at ``offset`` for a download of ``expected_size`` bytes, bounded by ``limits`` and ``deadline``.

    ``deadline`` is on the monotonic clock. The context manager yields the
    body from the offset (or from 0 when the source ignored the offset) and
    releases the connection or file on exit. It raises a
    :class:`~helper.download.errors.DownloadError` (a 503 as
    :class:`~helper.download.errors.ServerBusy`, which the caller retries).
    """

    def __call__(self, url: str, offset: int, expected_size: int, limits: DownloadLimits, deadline: float, /
                 ) -> contextlib.AbstractContextManager[Body]: ...


def fetcher_for(url: str) -> Fetcher:
    """The fetcher for ``url``'s scheme."""
    scheme = urlsplit(url).scheme.lower()
    fetch = FETCHERS.get(scheme)
    if fetch is None:
        raise UnsupportedUrl(url, f"scheme {scheme!r} is not one of {sorted(FETCHERS)}")
    return fetch


@contextlib.contextmanager
def fetch_http(url: str, offset: int, expected_size: int, limits: DownloadLimits, deadline: float) -> Iterator[Body]:
    """GET ``url`` from ``offset``, following redirects; check status and lengths before the body is read.

    Every socket operation, the connect and the response head's included,
    waits at most until ``deadline``: a server dripping its head a byte at a
    time meets the whole-download limit like a slow body does.
    """
    clock = _Deadline(url, deadline, limits.total_timeout_s)
    target = url
    for _ in range(limits.max_redirects + 1):
        conn, response, reader = _request(url, target, offset, limits, clock)
        try:
            location = response.headers.get("Location")
            if response.status in _REDIRECTS and location:
                target = _redirect_target(url, target, location)
                continue
            start = _check_response(response, url, offset, expected_size)
            yield Body(start, _HttpBody(response, reader, url, start, expected_size, limits, clock).readinto)
            return
        finally:
            response.close()
            conn.close()
    raise UnexpectedResponse(url, f"more than {limits.max_redirects} redirects")


_REDIRECTS = frozenset({301, 302, 303, 307, 308})


def _redirect_target(url: str, current: str, location: str) -> str:
    target = urljoin(current, location.strip())
    if urlsplit(target).scheme.lower() not in ("http", "https"):
        raise UnexpectedResponse(url, f"redirect to a non-HTTP URL {target!r}")
    return target


def _request(url: str, target: str, offset: int, limits: DownloadLimits, clock: _Deadline
             ) -> tuple[_Connection, http.client.HTTPResponse, _Reader]:
    """Connect, send the GET and read the response head: the connection, the response and its reader."""
    parts = urlsplit(target)
    tls = parts.scheme.lower() == "https"
    try:
        host, port = parts.hostname, parts.port or (443 if tls else 80)
    except ValueError as e:  # a port out of range or not a number
        raise UnsupportedUrl(url, f"bad port: {e}") from None
    if not host:
        raise UnsupportedUrl(url, "no host")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    conn = _Connection(host, port, clock, limits.connect_timeout_s, _ssl_context() if tls else None)
    try:
        conn.connect()
        headers = {"Accept-Encoding": "identity", "User-Agent": "baton-helper"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        with clock.bounded():
            assert conn.sock is not None
            conn.sock.settimeout(clock.wait_s(limits.read_timeout_s))
            try:
                conn.request("GET", path, headers=headers)
            except http.client.InvalidURL as e:
                raise UnsupportedUrl(url, str(e)) from None
        response = http.client.HTTPResponse(conn.sock, method="GET")
        reader = _Reader(response.fp, conn.sock, clock, limits.read_timeout_s)
        response.fp = reader  # type: ignore[assignment]  # every read of the head under the deadline and the cap
        try:
            with clock.bounded():
                response.begin()
        except BaseException:
            response.close()
            raise
        reader.head_done()
        _check_framing(response, url)
        return conn, response, reader
    except BaseException:
        conn.close()
        raise


def _ssl_context() -> ssl.SSLContext:
    """The trust store httpx used before: ``SSL_CERT_FILE`` or ``SSL_CERT_DIR`` if set, else certifi's bundle."""
    if os.environ.get("SSL_CERT_FILE"):
        return ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
    if os.environ.get("SSL_CERT_DIR"):
        return ssl.create_default_context(capath=os.environ["SSL_CERT_DIR"])
    try:
        import certifi
    except ImportError:  # no bundle installed: the system's store
        return ssl.create_default_context()
    return ssl.create_default_context(cafile=certifi.where())


class _Connection(http.client.HTTPConnection):
    """http.client's request writer over a socket connected (and TLS set up) under the deadline; no proxy."""

    def __init__(self, host: str, port: int, clock: _Deadline, connect_timeout_s: float,
                 tls: ssl.SSLContext | None) -> None:
        super().__init__(host, port)
        self.default_port = 443 if tls else 80  # no port in Host when it is the scheme's default
        self._clock = clock
        self._connect_timeout_s = connect_timeout_s
        self._tls = tls

    def connect(self) -> None:
        url = self._clock.url
        try:
            with self._clock.bounded():
                sock = socket.create_connection((self.host, self.port), self._clock.wait_s(self._connect_timeout_s))
        except TimeoutError:
            raise ConnectionFailed(url, f"no connection within {self._connect_timeout_s:g} s") from None
        except OSError as e:
            raise ConnectionFailed(url, str(e) or type(e).__name__) from e
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not None:
                with self._clock.bounded():
                    sock.settimeout(self._clock.wait_s(self._connect_timeout_s))
                    sock = self._tls.wrap_socket(sock, server_hostname=self.host)
        except (TimeoutError, ssl.SSLError) as e:
            sock.close()
            raise ConnectionFailed(url, f"TLS: {e}") from e
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class _Deadline:
    def __init__(self, url: str, deadline: float, total_timeout_s: float) -> None:
        self.url = url
        self.deadline = deadline
        self.total_timeout_s = total_timeout_s

    def wait_s(self, timeout: float) -> float:
        """How long the next socket operation may wait: its own timeout, cut at the deadline."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise self.passed()
        return min(timeout, left)

    def passed(self) -> DownloadTimeout:
        return DownloadTimeout(self.url, "the whole download took too long", self.total_timeout_s)

    @contextlib.contextmanager
    def bounded(self) -> Iterator[None]:
        """A timeout that ends at the deadline is the deadline's, not the per-read limit's."""
        try:
            yield
        except TimeoutError:
            if time.monotonic() >= self.deadline:
                raise self.passed() from None
            raise


class _Reader:
    """The response's byte stream: each socket read waits at most the read timeout, cut at the deadline.

    It stands in for the buffered socket file that http.client reads the head
    from, and reads at most one socket read's worth per step (never a loop of
    reads that could outlast the deadline). Until :meth:`head_done`, lines add
    up against ``MAX_RESPONSE_HEAD_BYTES``.
    """

    def __init__(self, fp: BinaryIO, sock: socket.socket, clock: _Deadline, read_timeout_s: float) -> None:
        self._fp: Any = fp  # an io.BufferedReader over the socket
        self._sock = sock
        self._clock = clock
        self._read_timeout_s = read_timeout_s
        self._head_left: int | None = MAX_RESPONSE_HEAD_BYTES
        self._first_line = True

    def head_done(self) -> None:
        self._head_left = None

    def arm(self) -> None:
        """Set the socket's timeout for the next read."""
        self._sock.settimeout(self._clock.wait_s(self._read_timeout_s))

    def readline(self, limit: int = -1) -> bytes:
        cap = self._head_left
        if cap is not None:
            limit = cap + 1 if limit < 0 else min(limit, cap + 1)
        parts: list[bytes] = []
        got = 0
        while limit < 0 or got < limit:
            self.arm()
            ahead = self._fp.peek(1)  # at most one socket read
            if not ahead:
                break
            if limit >= 0:
                ahead = ahead[: limit - got]
            end = ahead.find(b"\n")
            take = end + 1 if end >= 0 else len(ahead)
            parts.append(self._fp.read(take))  # from the buffer: no socket read
            got += take
            if end >= 0:
                break
        line = b"".join(parts)
        if cap is not None:
            self._head_left = cap - len(line)
            if self._head_left < 0:
                if self._first_line and not _STATUS_LINE_START.match(line):
                    raise ProtocolViolation(self._clock.url, f"malformed status line {line[:200]!r}")
                raise ProtocolViolation(self._clock.url, f"response head longer than {MAX_RESPONSE_HEAD_BYTES} bytes")
        self._first_line = False
        return line

    def read1(self, n: int = -1) -> bytes:
        self.arm()
        return bytes(self._fp.read1(n))

    def readinto1(self, b: memoryview) -> int:
        self.arm()
        return int(self._fp.readinto1(b))

    def read(self, n: int = -1) -> bytes:
        """``n`` bytes or up to EOF, one socket read per step (http.client reads a chunk's CRLF with it)."""
        parts: list[bytes] = []
        while n < 0 or n > 0:
            chunk = self.read1(n if n > 0 else 64 * 1024)
            if not chunk:
                break
            parts.append(chunk)
            if n > 0:
                n -= len(chunk)
        return b"".join(parts)

    def readinto(self, b: memoryview) -> int:
        return self.readinto1(b)

    def close(self) -> None:
        self._fp.close()

    def flush(self) -> None:
        pass


_STATUS_LINE_START = re.compile(rb"^HTTP/\d\.\d \d{3}(?: |\r?\n?$)")


def _check_framing(response: http.client.HTTPResponse, url: str) -> None:
    """Refuse a head whose body length is ambiguous: a request smuggler's or a broken server's."""
    lengths = set(response.headers.get_all("Content-Length") or ())
    if len(lengths) > 1:
        raise ProtocolViolation(url, f"conflicting Content-Length headers {sorted(lengths)!r}")
    encodings = response.headers.get_all("Transfer-Encoding") or ()
    if encodings:
        if [e.strip().lower() for e in encodings] != ["chunked"]:
            raise ProtocolViolation(url, f"unsupported Transfer-Encoding {', '.join(encodings)!r}")
        if lengths:
            raise ProtocolViolation(url, "both Transfer-Encoding and Content-Length")


class _HttpBody:
    """The raw body, read straight into the caller's buffer; a broken body becomes DownloadTimeout/Truncated."""

    def __init__(self, response: http.client.HTTPResponse, reader: _Reader, url: str, start: int,
                 expected_size: int, limits: DownloadLimits, clock: _Deadline) -> None:
        self._response = response
        self._reader = reader
        self._url = url
        self._received = start
        self._expected_size = expected_size
        self._read_timeout_s = limits.read_timeout_s
        self._clock = clock
        self._left = response.length  # None: chunked, or up to the end of the connection

    def readinto(self, b: memoryview) -> int:
        try:
            with self._clock.bounded():
                if self._response.chunked:
                    data = self._response.read1(len(b))  # http.client undoes the chunk framing
                    n = len(data)
                    b[:n] = data
                elif self._left == 0:
                    n = 0
                else:
                    n = self._reader.readinto1(b if self._left is None else b[: self._left])
                    if self._left is not None:
                        self._left -= n
        except TimeoutError as e:
            raise DownloadTimeout(
                self._url, f"no byte for {self._read_timeout_s:g} s after {self._received} bytes",
                self._read_timeout_s) from e
        except (OSError, http.client.HTTPException) as e:
            raise DownloadTruncated(self._url, self._expected_size, self._received, str(e) or type(e).__name__
                                    ) from e
        self._received += n
        return n


def _check_response(response: http.client.HTTPResponse, url: str, offset: int, expected_size: int) -> int:
    """Return where the body starts in the file, or raise before the body is read."""
    status = response.status
    if status == 503:
        raise ServerBusy(url, _retry_after_s(response))
    if status >= 400:
        raise HttpStatusError(status, url)
    if status == 206 and offset:
        start = _check_content_range(response, url, offset, expected_size)
    elif status == 200:
        start = 0
    else:
        raise UnexpectedResponse(url, f"HTTP {status}")
    announced = response.headers.get("Content-Length")
    if announced is not None:
        try:
            length = int(announced)
        except ValueError:
            raise UnexpectedResponse(url, f"bad Content-Length {announced!r}") from None
        if start + length > expected_size:
            raise DownloadTooLarge(url, expected_size, announced=start + length)
        if start + length < expected_size:
            raise DownloadTruncated(url, expected_size, start + length, "Content-Length too small")
    return start


def _check_content_range(response: http.client.HTTPResponse, url: str, offset: int, expected_size: int) -> int:
    header = response.headers.get("Content-Range", "")
    m = _CONTENT_RANGE.match(header)
    if m is None:
        raise UnexpectedResponse(url, f"206 with unusable Content-Range {header!r}")
    first, last, total = int(m[1]), int(m[2]), m[3]
    if total != "*" and int(total) > expected_size:
        raise DownloadTooLarge(url, expected_size, announced=int(total))
    if total != "*" and int(total) < expected_size:
        raise DownloadTruncated(url, expected_size, int(total), "Content-Range total too small")
    if first != offset or last > expected_size - 1:
        raise UnexpectedResponse(url, f"asked for bytes {offset}-, got Content-Range {header!r}")
    return offset


def _retry_after_s(response: http.client.HTTPResponse) -> float | None:
    """``Retry-After`` in seconds (delta-seconds only; an HTTP-date or garbage counts as absent)."""
    value = response.headers.get("Retry-After", "").strip()
    return float(min(int(value), BUSY_BACKOFF_MAX_S)) if value.isdigit() else None


@contextlib.contextmanager
def fetch_file(url: str, offset: int, expected_size: int, limits: DownloadLimits, deadline: float) -> Iterator[Body]:
    """Copy from a regular file beneath ``limits.file_url_root``, under the same bounds as a network source.

    Nothing outside the root is opened or even looked at, so an error never
    says whether a foreign file exists or how large it is.
    """
    parts = urlsplit(url)
    if limits.file_url_root is None:
        raise UnsupportedUrl(url, "file:// URLs are disabled (update.file_url_root is not set)")
    if parts.netloc not in ("", "localhost"):
        raise UnsupportedUrl(url, f"file URL names a remote host {clip(parts.netloc)!r}")
    rel = file_url_relative_path(url, limits.file_url_root)
    if rel is None:
        raise UnsupportedUrl(url, f"not a file beneath update.file_url_root {str(limits.file_url_root)!r}")
    fd = open_beneath(url, limits.file_url_root, rel)
    with os.fdopen(fd, "rb", buffering=0) as src:
        st = os.fstat(src.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise UnsupportedUrl(url, "not a regular file")
        if st.st_size > expected_size:
            raise DownloadTooLarge(url, expected_size, announced=st.st_size)
        if st.st_size < expected_size:
            raise DownloadTruncated(url, expected_size, st.st_size, "source file too small")
        src.seek(offset)
        yield Body(offset, src.readinto)


FETCHERS: dict[str, Fetcher] = {"http": fetch_http, "https": fetch_http, "file": fetch_file}
