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

A partial file left by a failed download is kept for the next attempt, which
resumes it with an HTTP ``Range`` request. The caller removes ``dest`` when the
finished file fails verification.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

import httpx

from baton.digest import Digests, PackageDigest
from baton.durable import fsync_dir
from baton.errors import BatonError

PROGRESS_INTERVAL_S = 0.1
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)


# --------------------------------------------------------------------------- errors


class DownloadError(BatonError):
    """A package could not be fetched; the family of every error this module raises."""


class UnsupportedUrl(DownloadError):
    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot download {url}: {reason}")
        self.url = url
        self.reason = reason


class ConnectionFailed(DownloadError):
    """No connection: refused, DNS, TLS, connect timeout, or a local source that cannot be opened."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot connect to {url}: {reason}")
        self.url = url
        self.reason = reason


class HttpStatusError(DownloadError):
    def __init__(self, status: int, url: str) -> None:
        super().__init__(f"{url} answered HTTP {status}")
        self.status = status
        self.url = url


class UnexpectedResponse(DownloadError):
    """The server answered something we did not ask for (a wrong Content-Range, a stray status)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"unexpected response from {url}: {reason}")
        self.url = url
        self.reason = reason


class DownloadTimeout(DownloadError):
    """No byte for ``read_timeout_s``, or the whole download passed ``total_timeout_s``."""

    def __init__(self, url: str, what: str, limit_s: float) -> None:
        super().__init__(f"download of {url} timed out: {what} (limit {limit_s:g} s)")
        self.url = url
        self.what = what
        self.limit_s = limit_s


class DownloadTooSlow(DownloadError):
    """The average rate over the window fell below the floor: slow-retrieval defence."""

    def __init__(self, url: str, rate_bytes_per_s: float, min_rate_bytes_per_s: int, window_s: float) -> None:
        super().__init__(
            f"download of {url} too slow: {rate_bytes_per_s:.0f} B/s over the last {window_s:g} s, "
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
        super().__init__(f"{url} {detail}, expected exactly {expected_size}")
        self.url = url
        self.expected_size = expected_size
        self.announced = announced


class DownloadTruncated(DownloadError):
    """The server announced or sent fewer than ``expected_size`` bytes."""

    def __init__(self, url: str, expected_size: int, received: int, reason: str = "") -> None:
        tail = f" ({reason})" if reason else ""
        super().__init__(f"{url} ended after {received} of {expected_size} bytes{tail}")
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

    The rate floor is checked as bytes arrive; a connection that delivers
    nothing at all is the read timeout's job. The deadline is checked between
    reads, so it can be overshot by at most ``read_timeout_s``.
    """

    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0
    total_timeout_s: float = 3600.0
    min_rate_bytes_per_s: int = 1024
    min_rate_window_s: float = 60.0
    free_space_reserve_bytes: int = 64 * 1024 * 1024
    chunk_bytes: int = 256 * 1024
    max_redirects: int = 5

    def __post_init__(self) -> None:
        for name in ("connect_timeout_s", "read_timeout_s", "total_timeout_s", "min_rate_window_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"DownloadLimits.{name} must be positive")
        if self.chunk_bytes <= 0:
            raise ValueError("DownloadLimits.chunk_bytes must be positive")
        if self.min_rate_bytes_per_s < 0 or self.free_space_reserve_bytes < 0 or self.max_redirects < 0:
            raise ValueError("DownloadLimits: rate floor, reserve and redirects must not be negative")


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
) -> DownloadedFile:
    """Fetch ``url`` (http, https or file) into ``dest``, exactly ``expected_size`` bytes.

    Args:
        url: where the package is; ``file://`` URLs are copied from the local path.
        dest: a path in the private download directory; created mode 0600.
        expected_size: the size the signed update request names.
        limits: every bound on time, rate, size and disk space.
        progress: called at most every ``PROGRESS_INTERVAL_S`` and once at the end.
        resume: continue a partial ``dest`` with a Range request instead of starting over.

    Raises:
        InsufficientSpace: before any byte is written.
        ConnectionFailed, HttpStatusError, UnexpectedResponse, UnsupportedUrl.
        DownloadTimeout, DownloadTooSlow: the partial file is kept for a resume.
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
        return _download(fetch, url, Path(dest), expected_size, limits, progress, resume)
    except DownloadError:
        raise
    except httpx.ConnectTimeout as e:
        raise ConnectionFailed(url, f"no connection within {limits.connect_timeout_s:g} s") from e
    except httpx.TimeoutException as e:
        raise DownloadTimeout(url, f"no answer within {limits.read_timeout_s:g} s", limits.read_timeout_s) from e
    except httpx.TooManyRedirects as e:
        raise UnexpectedResponse(url, f"more than {limits.max_redirects} redirects") from e
    except httpx.TransportError as e:
        raise ConnectionFailed(url, str(e) or type(e).__name__) from e
    except OSError as e:
        raise DownloadError(f"download of {url} to {dest} failed: {e}") from e
    except Exception as e:
        raise DownloadError(f"download of {url} failed: {type(e).__name__}: {e}") from e


# --------------------------------------------------------------------------- workflow


@dataclass(frozen=True)
class _Body:
    """What a fetcher yields: where the bytes start in the file, and the bytes."""

    start: int
    chunks: Iterator[bytes]


_Fetcher = Callable[[str, int, int, DownloadLimits, float], contextlib.AbstractContextManager[_Body]]


def _download(
    fetch: _Fetcher,
    url: str,
    dest: Path,
    expected_size: int,
    limits: DownloadLimits,
    progress: Callable[[DownloadProgress], None] | None,
    resume: bool,
) -> DownloadedFile:
    meter = _Meter(url, limits, expected_size, progress)
    have = _existing_size(dest)
    _check_free_space(dest, max(0, expected_size - have) + limits.free_space_reserve_bytes)

    wfd = os.open(dest, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    reader: BinaryIO | None = None
    try:
        st = os.fstat(wfd)
        if not stat.S_ISREG(st.st_mode):
            raise DownloadError(f"{dest} is not a regular file")
        os.fchmod(wfd, 0o600)
        reader = _read_only_handle(wfd)
        digest = PackageDigest()
        have = st.st_size
        if have > expected_size or not resume:
            have = _restart(wfd)
        elif have:
            _hash_existing(wfd, have, digest, limits.chunk_bytes)
        resumed_from = have

        if have < expected_size:
            with fetch(url, have, expected_size, limits, meter.remaining_s()) as body:
                if body.start != have:  # the server ignored our Range: start over
                    have = _restart(wfd)
                    digest = PackageDigest()
                resumed_from = have
                meter.begin(have)
                have = _receive(body.chunks, wfd, digest, meter, url, have, expected_size)

        os.fsync(wfd)
        fsync_dir(dest.parent)
        meter.done(have)
        digests = digest.finish()
        reader.seek(0)
        return DownloadedFile(dest, digests, resumed_from, meter.elapsed_s(), reader)
    except BaseException as e:
        if reader is not None:
            reader.close()
        if isinstance(e, DownloadTooLarge):  # an overrunning server is not trusted for a resume
            with contextlib.suppress(OSError):
                os.unlink(dest)
        raise
    finally:
        os.close(wfd)


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
        self._deadline = self._t0 + limits.total_timeout_s
        self._last_report = self._t0
        self._resumed_from = 0
        self._body_t0 = self._t0
        # (time, bytes of this attempt) samples covering at least the last window
        self._samples: deque[tuple[float, int]] = deque()

    def elapsed_s(self) -> float:
        return time.monotonic() - self._t0

    def remaining_s(self) -> float:
        left = self._deadline - time.monotonic()
        if left <= 0:
            self._timed_out()
        return left

    def begin(self, resumed_from: int) -> None:
        self._resumed_from = resumed_from
        self._body_t0 = time.monotonic()
        self._samples = deque([(self._body_t0, 0)])

    def advance(self, done: int) -> None:
        now = time.monotonic()
        if now > self._deadline:
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
def _fetch_http(url: str, offset: int, expected_size: int, limits: DownloadLimits, left_s: float) -> Iterator[_Body]:
    """GET ``url`` from ``offset``; check status and lengths before the body is read."""
    timeout = httpx.Timeout(
        connect=min(limits.connect_timeout_s, left_s),
        read=min(limits.read_timeout_s, left_s),
        write=min(limits.read_timeout_s, left_s),
        pool=min(limits.connect_timeout_s, left_s),
    )
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with (
        httpx.Client(timeout=timeout, follow_redirects=True, max_redirects=limits.max_redirects) as client,
        client.stream("GET", url, headers=headers) as response,
    ):
        start = _check_response(response, url, offset, expected_size)
        yield _Body(start, _http_chunks(response, url, start, expected_size, limits))


def _check_response(response: httpx.Response, url: str, offset: int, expected_size: int) -> int:
    """Return where the body starts in the file, or raise before the body is read."""
    status = response.status_code
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
def _fetch_file(url: str, offset: int, expected_size: int, limits: DownloadLimits, left_s: float) -> Iterator[_Body]:
    """Copy from a local regular file, under the same bounds as a network source."""
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise UnsupportedUrl(url, f"file URL names a remote host {parts.netloc!r}")
    path = unquote(parts.path)
    try:
        src = open(path, "rb")  # noqa: SIM115 - closed by the with below
    except OSError as e:
        raise ConnectionFailed(url, f"cannot open {path}: {e.strerror}") from e
    with src:
        st = os.fstat(src.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise UnsupportedUrl(url, f"{path} is not a regular file")
        if st.st_size > expected_size:
            raise DownloadTooLarge(url, expected_size, announced=st.st_size)
        if st.st_size < expected_size:
            raise DownloadTruncated(url, expected_size, st.st_size, "source file too small")
        src.seek(offset)
        yield _Body(offset, iter(lambda: src.read(limits.chunk_bytes), b""))


_FETCHERS: dict[str, _Fetcher] = {"http": _fetch_http, "https": _fetch_http, "file": _fetch_file}


# --------------------------------------------------------------------------- disk


def _existing_size(dest: Path) -> int:
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        return 0
    if not stat.S_ISREG(st.st_mode):
        raise DownloadError(f"{dest} exists and is not a regular file")
    return st.st_size


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
