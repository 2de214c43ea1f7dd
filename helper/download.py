"""Fetch an update package into the download directory, bounded and hashed on the fly.

The server is untrusted until the signature is checked, so everything it
controls is bounded: bytes (cut off at ``expected_size + 1``), time (a read
timeout, a whole-download deadline) and rate (a floor averaged over a sliding
window, the TUF "slow retrieval" defence). The bytes are hashed while they are
written, and :func:`download` hands back a read-only handle on the very inode it
wrote, so the installer verifies and extracts the same bytes without reopening
the file by path.

Every failure, whatever raised it underneath (httpx, the OS), reaches the
caller as a :class:`DownloadError` subclass: one family to handle.

The download file is the helper's own, whoever owns the directory: it is
created with ``O_EXCL|O_NOFOLLOW``, mode 0600, and its identity (device, inode)
is handed to the caller to record (the journal) before a byte is written. Only
that file is ever resumed, and only while it is still the helper's (owner =
euid, one link, mode 0600): no other user ever holds a descriptor that can
write it, so the bytes read back for extraction are the bytes that were hashed.
A file at ``dest`` that another user owns is refused, never adopted.

A partial file left by a failed download is kept for the next attempt, which
resumes it with an HTTP ``Range`` request. The caller removes ``dest`` when the
finished file fails verification.

``file://`` URLs are refused unless ``file_url_root`` is set; then only regular
files beneath it are read, opened component by component with ``O_NOFOLLOW``
(no symlink anywhere below the root) and ``O_NONBLOCK`` (a FIFO cannot block).

Error texts quote remote or pushed data (URLs, headers, protocol errors) only
clipped (:func:`baton.errors.clip`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import ssl
import stat
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import httpcore
import httpx

from baton.admission import file_url_relative_path
from baton.config import UpdateConfig
from baton.digest import Digests, PackageDigest
from baton.durable import fsync_dir
from baton.errors import BatonError, clip

PROGRESS_INTERVAL_S = 0.1
# h11 (inside httpcore) refuses a response head longer than this: the head-size cap.
MAX_RESPONSE_HEAD_BYTES = httpcore.HTTP11Connection.MAX_INCOMPLETE_EVENT_SIZE
BUSY_BACKOFF_INITIAL_S = 0.5  # after a 503 without Retry-After; doubles per 503
BUSY_BACKOFF_MAX_S = 30.0  # and at most this, a Retry-After included
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)


# --------------------------------------------------------------------------- errors


class DownloadError(BatonError):
    """A package could not be fetched; the family of every error this module raises."""


class ProtocolViolation(DownloadError):
    """The server answered, but not in HTTP: a malformed status line, conflicting headers, an oversized head."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"{clip(url)} broke the HTTP protocol: {clip(reason)}")
        self.url = url
        self.reason = reason


class UntrustedDownloadFile(DownloadError):
    """``dest`` exists and is not a file this helper created: someone else writes in the download directory."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"refusing {path}: {reason}; it was not created by this helper")
        self.path = path
        self.reason = reason


class UnsupportedUrl(DownloadError):
    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot download {clip(url)}: {reason}")
        self.url = url
        self.reason = reason


class ConnectionFailed(DownloadError):
    """No connection: refused, DNS, TLS, connect timeout, or a local source that cannot be opened."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot connect to {clip(url)}: {clip(reason)}")
        self.url = url
        self.reason = reason


class HttpStatusError(DownloadError):
    def __init__(self, status: int, url: str) -> None:
        super().__init__(f"{clip(url)} answered HTTP {status}")
        self.status = status
        self.url = url


class ServerBusy(HttpStatusError):
    """HTTP 503: the server bounds its concurrent downloads; ``retry_after_s`` is its ``Retry-After``, if any."""

    def __init__(self, url: str, retry_after_s: float | None) -> None:
        super().__init__(503, url)
        self.url = url
        self.retry_after_s = retry_after_s


class UnexpectedResponse(DownloadError):
    """The server answered something we did not ask for (a wrong Content-Range, a stray status)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"unexpected response from {clip(url)}: {clip(reason)}")
        self.url = url
        self.reason = reason


class DownloadTimeout(DownloadError):
    """No byte for ``read_timeout_s``, or the whole download passed ``total_timeout_s``."""

    def __init__(self, url: str, what: str, limit_s: float) -> None:
        super().__init__(f"download of {clip(url)} timed out: {what} (limit {limit_s:g} s)")
        self.url = url
        self.what = what
        self.limit_s = limit_s


class DownloadTooSlow(DownloadError):
    """The average rate over the window fell below the floor: slow-retrieval defence."""

    def __init__(self, url: str, rate_bytes_per_s: float, min_rate_bytes_per_s: int, window_s: float) -> None:
        super().__init__(
            f"download of {clip(url)} too slow: {rate_bytes_per_s:.0f} B/s over the last {window_s:g} s, "
            f"floor is {min_rate_bytes_per_s} B/s"
        )
        self.url = url
        self.rate_bytes_per_s = rate_bytes_per_s
        self.min_rate_bytes_per_s = min_rate_bytes_per_s
        self.window_s = window_s


class DownloadTooLarge(DownloadError):
    """The server announced or sent more than ``expected_size`` bytes."""

    def __init__(self, url: str, expected_size: int, announced: int | None = None) -> None:
        detail = f"announced {announced} bytes" if announced is not None else "sent more bytes"
        super().__init__(f"{clip(url)} {detail}, expected exactly {expected_size}")
        self.url = url
        self.expected_size = expected_size
        self.announced = announced


class DownloadTruncated(DownloadError):
    """The server announced or sent fewer than ``expected_size`` bytes."""

    def __init__(self, url: str, expected_size: int, received: int, reason: str = "") -> None:
        tail = f" ({clip(reason)})" if reason else ""
        super().__init__(f"{clip(url)} ended after {received} of {expected_size} bytes{tail}")
        self.url = url
        self.expected_size = expected_size
        self.received = received
        self.reason = reason


class InsufficientSpace(DownloadError):
    def __init__(self, path: Path, needed_bytes: int, free_bytes: int) -> None:
        super().__init__(
            f"not enough free space for {path}: need {needed_bytes} bytes (package plus reserve), {free_bytes} free"
        )
        self.path = path
        self.needed_bytes = needed_bytes
        self.free_bytes = free_bytes


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class DownloadLimits:
    """Every bound on one download. Timeouts in seconds, sizes in bytes.

    Built from the validated config with :meth:`from_config`; the config is the
    one place for each default. The rate floor is checked as bytes arrive; a
    connection that delivers nothing at all is the read timeout's job. The
    deadline covers the whole request (connect, response head, body): every
    socket read waits at most until it.
    """

    connect_timeout_s: float
    read_timeout_s: float
    total_timeout_s: float
    min_rate_bytes_per_s: int
    min_rate_window_s: float
    free_space_reserve_bytes: int
    chunk_bytes: int = 256 * 1024  # a tuning knob, not a bound: not in the config
    max_redirects: int = 5
    file_url_root: Path | None = None  # file:// URLs are read only beneath it; None refuses them

    def __post_init__(self) -> None:
        for name in ("connect_timeout_s", "read_timeout_s", "total_timeout_s", "min_rate_window_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"DownloadLimits.{name} must be positive")
        if self.chunk_bytes <= 0:
            raise ValueError("DownloadLimits.chunk_bytes must be positive")
        if self.min_rate_bytes_per_s < 0 or self.free_space_reserve_bytes < 0 or self.max_redirects < 0:
            raise ValueError("DownloadLimits: rate floor, reserve and redirects must not be negative")

    @classmethod
    def from_config(cls, u: UpdateConfig) -> DownloadLimits:
        """The limits the validated ``[update]`` section names."""
        return cls(
            connect_timeout_s=u.connect_timeout_s,
            read_timeout_s=u.read_timeout_s,
            total_timeout_s=u.download_timeout_s,
            min_rate_bytes_per_s=u.min_rate_bytes_per_s,
            min_rate_window_s=u.min_rate_window_s,
            free_space_reserve_bytes=u.free_space_reserve_bytes,
            file_url_root=u.file_url_root,
        )


@dataclass(frozen=True)
class FileIdentity:
    """Which inode a download file is: what the journal records so that only that file is resumed."""

    dev: int
    ino: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_dev, st.st_ino)


@dataclass(frozen=True)
class DownloadProgress:
    bytes_done: int  # including bytes resumed from an earlier attempt
    bytes_total: int
    rate_bytes_per_s: float  # of this attempt, over the rate window
    elapsed_s: float
    resumed_from: int


@dataclass(frozen=True)
class DownloadedFile:
    """A finished download: its digests and a read-only handle on the bytes that were hashed.

    ``file`` is positioned at 0 and reads the inode that was written, whatever
    happens to ``path`` afterwards: verify ``digests``, then extract from
    ``file``. Use as a context manager, or call :meth:`close`.
    """

    path: Path
    digests: Digests
    resumed_from: int
    elapsed_s: float
    file: BinaryIO = field(repr=False, compare=False)

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> DownloadedFile:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# --------------------------------------------------------------------------- public


def download(
    url: str,
    dest: Path,
    *,
    expected_size: int,
    limits: DownloadLimits,
    progress: Callable[[DownloadProgress], None] | None = None,
    resume: bool = True,
    owned: FileIdentity | None = None,
    created: Callable[[FileIdentity], None] | None = None,
) -> DownloadedFile:
    """Fetch ``url`` (http, https or file) into ``dest``, exactly ``expected_size`` bytes.

    Args:
        url: where the package is; ``file://`` URLs are read beneath ``limits.file_url_root`` only.
        dest: a path in the download directory; created ``O_EXCL``, mode 0600.
        expected_size: the size the signed update request names.
        limits: every bound on time, rate, size and disk space.
        progress: called at most every ``PROGRESS_INTERVAL_S`` and once at the end.
        resume: continue a partial ``dest`` with a Range request instead of starting over.
        owned: the identity ``created`` reported for ``dest`` in an earlier attempt; only that
            file, still private to this euid, is resumed. A different file of ours is discarded.
        created: called with the identity of a newly created ``dest`` before any byte is
            written: record it durably to resume it later.

    Raises:
        UntrustedDownloadFile: ``dest`` exists and belongs to someone else, or is not a regular file.
        InsufficientSpace: before any byte is written.
        ConnectionFailed, HttpStatusError, UnexpectedResponse, ProtocolViolation, UnsupportedUrl.
        DownloadTimeout, DownloadTooSlow: the partial file is kept for a resume. A 503 is retried after its
            ``Retry-After`` (else a doubling backoff) until the deadline, which then raises DownloadTimeout.
        DownloadTruncated: fewer bytes announced or sent; the partial file is kept.
        DownloadTooLarge: more bytes announced or sent; ``dest`` is removed.
        DownloadError: anything else (disk errors included).

    Returns:
        A :class:`DownloadedFile` whose open ``file`` the caller must close.
    """
    if expected_size < 0:
        raise ValueError("expected_size must not be negative")
    scheme = urlsplit(url).scheme.lower()
    fetch = _FETCHERS.get(scheme)
    if fetch is None:
        raise UnsupportedUrl(url, f"scheme {scheme!r} is not one of {sorted(_FETCHERS)}")
    try:
        return _download(fetch, url, Path(dest), expected_size, limits, progress, resume, owned, created)
    except DownloadError:
        raise
    except httpx.ConnectTimeout as e:
        raise ConnectionFailed(url, f"no connection within {limits.connect_timeout_s:g} s") from e
    except httpx.TimeoutException as e:
        raise DownloadTimeout(url, f"no answer within {limits.read_timeout_s:g} s", limits.read_timeout_s) from e
    except httpx.TooManyRedirects as e:
        raise UnexpectedResponse(url, f"more than {limits.max_redirects} redirects") from e
    except httpx.RemoteProtocolError as e:  # it answered: not a connection problem
        raise ProtocolViolation(url, _protocol_reason(e)) from e
    except httpx.TransportError as e:
        raise ConnectionFailed(url, str(e) or type(e).__name__) from e
    except OSError as e:
        raise DownloadError(f"download of {clip(url)} to {dest} failed: {e}") from e
    except Exception as e:
        raise DownloadError(f"download of {clip(url)} failed: {type(e).__name__}: {clip(str(e))}") from e


def _protocol_reason(e: httpx.RemoteProtocolError) -> str:
    text = str(e) or type(e).__name__
    if "Receive buffer too long" in text:  # h11's words for an oversized head
        return f"response head longer than {MAX_RESPONSE_HEAD_BYTES} bytes"
    return text


# --------------------------------------------------------------------------- workflow


@dataclass(frozen=True)
class _Body:
    """What a fetcher yields: where the bytes start in the file, and the bytes."""

    start: int
    chunks: Iterator[bytes]


# (url, offset, expected_size, limits, deadline on the monotonic clock) -> the body from offset
_Fetcher = Callable[[str, int, int, DownloadLimits, float], contextlib.AbstractContextManager[_Body]]


def _download(
    fetch: _Fetcher,
    url: str,
    dest: Path,
    expected_size: int,
    limits: DownloadLimits,
    progress: Callable[[DownloadProgress], None] | None,
    resume: bool,
    owned: FileIdentity | None,
    created: Callable[[FileIdentity], None] | None,
) -> DownloadedFile:
    meter = _Meter(url, limits, expected_size, progress)
    wfd, fresh = _open_dest(dest, owned if resume else None, created)
    reader: BinaryIO | None = None
    try:
        st = os.fstat(wfd)
        have = st.st_size
        _check_free_space(dest, max(0, expected_size - have) + limits.free_space_reserve_bytes)
        reader = _read_only_handle(wfd)
        digest = PackageDigest()
        if have > expected_size:
            have = _restart(wfd)
        elif have:
            _hash_existing(wfd, have, digest, limits.chunk_bytes)
        resumed_from = have

        backoff_s = BUSY_BACKOFF_INITIAL_S
        while have < expected_size:
            try:
                with fetch(url, have, expected_size, limits, meter.deadline) as body:
                    if body.start != have:  # the server ignored our Range: start over
                        have = _restart(wfd)
                        digest = PackageDigest()
                    resumed_from = have
                    meter.begin(have)
                    have = _receive(body.chunks, wfd, digest, meter, url, have, expected_size)
            except ServerBusy as busy:
                backoff_s = _wait_while_busy(busy, backoff_s, meter.deadline, limits.total_timeout_s)

        os.fsync(wfd)
        fsync_dir(dest.parent)
        meter.done(have)
        digests = digest.finish()
        reader.seek(0)
        return DownloadedFile(dest, digests, resumed_from, meter.elapsed_s(), reader)
    except BaseException as e:
        if reader is not None:
            reader.close()
        # an overrunning server is not trusted for a resume; a file that never got a byte is no use
        if isinstance(e, DownloadTooLarge) or (fresh and isinstance(e, InsufficientSpace)):
            _unlink_if_same(dest, wfd)
        raise
    finally:
        os.close(wfd)


def _wait_while_busy(busy: ServerBusy, backoff_s: float, deadline: float, total_timeout_s: float) -> float:
    """Sleep as a 503 asks (its ``Retry-After``, else our doubling backoff), never past the deadline.

    Only a 503 is retried: the server is up and said when to come back. Returns the next backoff.
    """
    wait_s = busy.retry_after_s if busy.retry_after_s is not None else backoff_s
    time.sleep(max(0.0, min(wait_s, deadline - time.monotonic())))
    if time.monotonic() >= deadline:
        raise DownloadTimeout(busy.url, "the server was busy (HTTP 503) until the deadline", total_timeout_s)
    return min(backoff_s * 2, BUSY_BACKOFF_MAX_S)


def _retry_after_s(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds (delta-seconds only; an HTTP-date or garbage counts as absent)."""
    value = response.headers.get("Retry-After", "").strip()
    return float(min(int(value), BUSY_BACKOFF_MAX_S)) if value.isdigit() else None


def _receive(
    chunks: Iterator[bytes],
    wfd: int,
    digest: PackageDigest,
    meter: _Meter,
    url: str,
    have: int,
    expected_size: int,
) -> int:
    """Append, hash and account for each chunk; refuse the first byte past ``expected_size``."""
    for chunk in chunks:
        if len(chunk) > expected_size - have:
            raise DownloadTooLarge(url, expected_size)
        _write_all(wfd, chunk)
        digest.update(chunk)
        have += len(chunk)
        meter.advance(have)
    if have < expected_size:
        raise DownloadTruncated(url, expected_size, have, "connection closed early")
    return have


class _Meter:
    """Deadline, rate floor and progress reports for one download."""

    def __init__(
        self,
        url: str,
        limits: DownloadLimits,
        total: int,
        progress: Callable[[DownloadProgress], None] | None,
    ) -> None:
        self._url = url
        self._limits = limits
        self._total = total
        self._progress = progress
        self._t0 = time.monotonic()
        self.deadline = self._t0 + limits.total_timeout_s  # on the monotonic clock
        self._last_report = self._t0
        self._resumed_from = 0
        self._body_t0 = self._t0
        # (time, bytes of this attempt) samples covering at least the last window
        self._samples: deque[tuple[float, int]] = deque()

    def elapsed_s(self) -> float:
        return time.monotonic() - self._t0

    def begin(self, resumed_from: int) -> None:
        self._resumed_from = resumed_from
        self._body_t0 = time.monotonic()
        self._samples = deque([(self._body_t0, 0)])

    def advance(self, done: int) -> None:
        now = time.monotonic()
        if now > self.deadline:
            self._timed_out()
        moved = done - self._resumed_from
        window = self._limits.min_rate_window_s
        if now - self._samples[-1][0] >= window / 32:
            self._samples.append((now, moved))
        while len(self._samples) > 1 and self._samples[1][0] <= now - window:
            self._samples.popleft()
        rate = self._rate(now, moved)
        if self._samples[0][0] <= now - window and rate < self._limits.min_rate_bytes_per_s:
            raise DownloadTooSlow(self._url, rate, self._limits.min_rate_bytes_per_s, window)
        if self._progress is not None and now - self._last_report >= PROGRESS_INTERVAL_S:
            self._last_report = now
            self._report(done, rate, now)

    def done(self, done: int) -> None:
        if self._progress is not None:
            now = time.monotonic()
            self._report(done, self._rate(now, done - self._resumed_from), now)

    def _rate(self, now: float, moved: int) -> float:
        t, b = self._samples[0] if self._samples else (self._body_t0, 0)
        return (moved - b) / (now - t) if now > t else 0.0

    def _report(self, done: int, rate: float, now: float) -> None:
        assert self._progress is not None
        self._progress(DownloadProgress(done, self._total, rate, now - self._t0, self._resumed_from))

    def _timed_out(self) -> None:
        raise DownloadTimeout(self._url, "the whole download took too long", self._limits.total_timeout_s)


# --------------------------------------------------------------------------- fetchers


@contextlib.contextmanager
def _fetch_http(url: str, offset: int, expected_size: int, limits: DownloadLimits, deadline: float) -> Iterator[_Body]:
    """GET ``url`` from ``offset``; check status and lengths before the body is read.

    Every socket operation, the response head's included, waits at most until
    ``deadline``: a server dripping its head a byte at a time meets the
    whole-download limit like a slow body does.
    """
    left_s = max(0.001, deadline - time.monotonic())
    timeout = httpx.Timeout(
        connect=min(limits.connect_timeout_s, left_s),
        read=min(limits.read_timeout_s, left_s),
        write=min(limits.read_timeout_s, left_s),
        pool=min(limits.connect_timeout_s, left_s),
    )
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    transport = _deadline_transport(_DeadlineBackend(url, deadline, limits.total_timeout_s))
    with (
        httpx.Client(timeout=timeout, follow_redirects=True, max_redirects=limits.max_redirects,
                     transport=transport, trust_env=False) as client,
        client.stream("GET", url, headers=headers) as response,
    ):
        start = _check_response(response, url, offset, expected_size)
        yield _Body(start, _http_chunks(response, url, start, expected_size, limits))


def _deadline_transport(backend: httpcore.NetworkBackend) -> httpx.HTTPTransport:
    """httpx's own transport over a pool whose sockets honour the deadline.

    httpx has no public hook for httpcore's ``network_backend``, so its pool is
    replaced by one built with the same public httpcore API; one connection,
    no retries. The client is made with ``trust_env=False``: a proxy taken from
    the environment would get a transport of its own, outside the deadline.
    """
    ssl_context = httpx.create_ssl_context()  # certifi, or SSL_CERT_FILE/SSL_CERT_DIR as httpx reads them
    transport = httpx.HTTPTransport(verify=ssl_context, retries=0)
    transport._pool = httpcore.ConnectionPool(ssl_context=ssl_context, max_connections=1, network_backend=backend)
    return transport


class _DeadlineBackend(httpcore.NetworkBackend):
    """Opens TCP connections whose every wait is cut at the whole-download deadline."""

    def __init__(self, url: str, deadline: float, total_timeout_s: float) -> None:
        self._inner = httpcore.SyncBackend()
        self._clock = _Deadline(url, deadline, total_timeout_s)

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        with self._clock.bounded():
            stream = self._inner.connect_tcp(host, port, self._clock.wait_s(timeout), local_address, socket_options)
        return _DeadlineStream(stream, self._clock)

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None
    ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("package downloads do not use Unix sockets")

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(min(seconds, self._clock.wait_s(seconds)))


class _Deadline:
    def __init__(self, url: str, deadline: float, total_timeout_s: float) -> None:
        self.url = url
        self.deadline = deadline
        self.total_timeout_s = total_timeout_s

    def wait_s(self, timeout: float | None) -> float:
        """How long the next socket operation may wait: its own timeout, cut at the deadline."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise self.passed()
        return left if timeout is None else min(timeout, left)

    def passed(self) -> DownloadTimeout:
        return DownloadTimeout(self.url, "the whole download took too long", self.total_timeout_s)

    @contextlib.contextmanager
    def bounded(self) -> Iterator[None]:
        """A timeout that ends at the deadline is the deadline's, not the per-read limit's."""
        try:
            yield
        except httpcore.TimeoutException:
            if time.monotonic() >= self.deadline:
                raise self.passed() from None
            raise


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream, clock: _Deadline) -> None:
        self._inner = inner
        self._clock = clock

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        with self._clock.bounded():
            return self._inner.read(max_bytes, self._clock.wait_s(timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        with self._clock.bounded():
            self._inner.write(buffer, self._clock.wait_s(timeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        with self._clock.bounded():
            tls = self._inner.start_tls(ssl_context, server_hostname, self._clock.wait_s(timeout))
        return _DeadlineStream(tls, self._clock)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


def _check_response(response: httpx.Response, url: str, offset: int, expected_size: int) -> int:
    """Return where the body starts in the file, or raise before the body is read."""
    status = response.status_code
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


def _check_content_range(response: httpx.Response, url: str, offset: int, expected_size: int) -> int:
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


def _http_chunks(
    response: httpx.Response, url: str, start: int, expected_size: int, limits: DownloadLimits
) -> Iterator[bytes]:
    """The raw body as the socket delivers it; a broken body becomes DownloadTimeout/Truncated."""
    received = start
    try:
        for chunk in response.iter_raw():
            received += len(chunk)
            yield chunk
    except httpx.ReadTimeout as e:
        raise DownloadTimeout(
            url, f"no byte for {limits.read_timeout_s:g} s after {received} bytes", limits.read_timeout_s
        ) from e
    except httpx.TransportError as e:
        raise DownloadTruncated(url, expected_size, received, str(e) or type(e).__name__) from e


@contextlib.contextmanager
def _fetch_file(url: str, offset: int, expected_size: int, limits: DownloadLimits, deadline: float) -> Iterator[_Body]:
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
    fd = _open_beneath(url, limits.file_url_root, rel)
    with os.fdopen(fd, "rb") as src:
        st = os.fstat(src.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise UnsupportedUrl(url, "not a regular file")
        if st.st_size > expected_size:
            raise DownloadTooLarge(url, expected_size, announced=st.st_size)
        if st.st_size < expected_size:
            raise DownloadTruncated(url, expected_size, st.st_size, "source file too small")
        src.seek(offset)
        yield _Body(offset, iter(lambda: src.read(limits.chunk_bytes), b""))


def _open_beneath(url: str, root: Path, rel: PurePosixPath) -> int:
    """Open ``root/rel`` read-only, no symlink below ``root``, never blocking on a FIFO or device."""
    try:
        dfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise ConnectionFailed(url, f"cannot open update.file_url_root: {e.strerror}") from e
    try:
        for part in rel.parts[:-1]:
            nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            os.close(dfd)
            dfd = nfd
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC
        return os.open(rel.parts[-1], flags, dir_fd=dfd)
    except OSError as e:
        reason = "a symbolic link (refused)" if e.errno in (errno.ELOOP, errno.ENOTDIR) else e.strerror
        raise ConnectionFailed(url, f"cannot open {clip(str(rel))}: {reason}") from e
    finally:
        os.close(dfd)


_FETCHERS: dict[str, _Fetcher] = {"http": _fetch_http, "https": _fetch_http, "file": _fetch_file}


# --------------------------------------------------------------------------- disk


def _open_dest(dest: Path, owned: FileIdentity | None, created: Callable[[FileIdentity], None] | None
               ) -> tuple[int, bool]:
    """A writable descriptor on the helper's own download file, and whether it was created just now.

    An existing ``dest`` is resumed only if it is ``owned`` (the identity the
    caller recorded) and still private to this euid; another file of ours is
    removed and a new one created. A file of another owner, a symlink or a
    non-regular file is refused, not touched.
    """
    for _ in range(3):
        try:
            fd = os.open(dest, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            own = _open_own(dest, owned)
            if own is None:
                continue
            return own, False
        try:
            st = os.fstat(fd)
            problem = _not_private(st)
            if problem:  # e.g. a file system that maps root to another user
                raise UntrustedDownloadFile(dest, f"the file just created is {problem}")
            if created is not None:
                created(FileIdentity.of(st))
        except BaseException:
            _unlink_if_same(dest, fd)
            os.close(fd)
            raise
        return fd, True
    raise UntrustedDownloadFile(dest, "it reappeared each time it was removed")


def _open_own(dest: Path, owned: FileIdentity | None) -> int | None:
    """The descriptor of ``dest`` if it is the recorded, private file; None after removing a stale one of ours."""
    try:
        st = os.lstat(dest)
    except FileNotFoundError:  # gone since the O_EXCL create failed: create it
        return None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
        raise UntrustedDownloadFile(dest, "it is not a regular file")
    if st.st_uid != os.geteuid():
        raise UntrustedDownloadFile(dest, f"it is owned by uid {st.st_uid}")
    if owned is None or FileIdentity.of(st) != owned or _not_private(st):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(dest)
        return None
    fd = os.open(dest, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    st = os.fstat(fd)
    if FileIdentity.of(st) != owned or _not_private(st):  # swapped between lstat and open
        os.close(fd)
        raise UntrustedDownloadFile(dest, "it changed while it was being opened")
    return fd


def _not_private(st: os.stat_result) -> str:
    """Why ``st`` is not a file only this euid can write, or ""."""
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}"
    if st.st_nlink != 1:
        return f"linked {st.st_nlink} times"
    if stat.S_IMODE(st.st_mode) != 0o600:
        return f"mode {stat.S_IMODE(st.st_mode):04o}, not 0600"
    return ""


def _unlink_if_same(dest: Path, fd: int) -> None:
    """Remove ``dest`` if it is still the file behind ``fd`` (never someone else's replacement)."""
    with contextlib.suppress(OSError):
        if FileIdentity.of(os.lstat(dest)) == FileIdentity.of(os.fstat(fd)):
            os.unlink(dest)


def _check_free_space(dest: Path, needed_bytes: int) -> None:
    vfs = os.statvfs(dest.parent)
    free = vfs.f_bavail * vfs.f_frsize
    if free < needed_bytes:
        raise InsufficientSpace(dest, needed_bytes, free)


def _read_only_handle(wfd: int) -> BinaryIO:
    """A second, read-only open of the inode behind ``wfd``, with its own offset.

    Reopening through ``/proc/self/fd`` reaches the inode, not the path, so a
    rename or replacement of ``dest`` cannot change what the caller reads.
    """
    try:
        rfd = os.open(f"/proc/self/fd/{wfd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        rfd = os.dup(wfd)  # no /proc: same inode, shared offset; seek(0) happens after writing
    return os.fdopen(rfd, "rb")


def _restart(wfd: int) -> int:
    os.ftruncate(wfd, 0)
    os.lseek(wfd, 0, os.SEEK_SET)
    return 0


def _hash_existing(wfd: int, size: int, digest: PackageDigest, chunk_bytes: int) -> None:
    """Hash the ``size`` bytes already on disk, once, and leave the offset at their end."""
    os.lseek(wfd, 0, os.SEEK_SET)
    left = size
    while left:
        chunk = os.read(wfd, min(chunk_bytes, left))
        if not chunk:
            raise DownloadError(f"partial download shrank while it was being read ({size - left} of {size})")
        digest.update(chunk)
        left -= len(chunk)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
