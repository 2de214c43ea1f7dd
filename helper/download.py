"""Fetch an update package into the download directory, bounded and hashed on the fly.

The server is untrusted until the signature is checked, so everything it
controls is bounded: bytes (cut off at ``expected_size + 1``), time (a read
timeout, a whole-download deadline) and rate (a floor averaged over a sliding
window, the TUF "slow retrieval" defence). The bytes are hashed while they are
written, and :func:`download` hands back a read-only handle on the very inode it
wrote, so the installer verifies and extracts the same bytes without reopening
the file by path.

Every failure, whatever raised it underneath (http.client, the OS), reaches the
caller as a :class:`DownloadError` subclass: one family to handle.

The body costs one copy in the helper: the standard library's http.client
reads the head, then the body goes straight from the socket into one of a few
reused page-aligned buffers (``readinto``, no allocation per chunk). Each full
buffer is taken, in order, by three threads (:class:`baton.digest.PackageDigest`):
the write to disk (``O_DIRECT`` where the file system allows it: no page-cache
copy, and the final fsync finds little to do), SHA-256 and BLAKE2b-512. hashlib
and the system calls release the GIL, so the receiving thread and the three
consumers share the cores and a download runs at about the slower digest's
speed. (httpx, used before, handed the body over in 64 KiB ``bytes`` that h11
had copied twice more; receiving 1 GiB took it about three times as long.)

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
import fcntl
import http.client
import os
import re
import socket
import ssl
import stat
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any, BinaryIO
from urllib.parse import urljoin, urlsplit

from baton.admission import file_url_relative_path
from baton.config import UpdateConfig
from baton.digest import BUFFER_BYTES, Digests, PackageDigest
from baton.durable import fsync_dir
from baton.errors import BatonError, clip

PROGRESS_INTERVAL_S = 0.1
MAX_RESPONSE_HEAD_BYTES = 64 * 1024  # status line and headers together (also http.client's limit on one line)
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
    chunk_bytes: int = BUFFER_BYTES  # a tuning knob, not a bound: not in the config; BUFFERS of them in flight
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
    bytes_done: int  # on disk, including bytes resumed from an earlier attempt
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
    except TimeoutError as e:  # sending the request or waiting for the head
        raise DownloadTimeout(url, f"no answer within {limits.read_timeout_s:g} s", limits.read_timeout_s) from e
    except http.client.BadStatusLine as e:  # it answered: not a connection problem
        raise ProtocolViolation(url, f"malformed status line {clip(str(e))!r}") from e
    except http.client.HTTPException as e:
        raise ProtocolViolation(url, str(e) or type(e).__name__) from e
    except (ConnectionError, ssl.SSLError) as e:  # reset or closed while the request or head was in flight
        raise ConnectionFailed(url, str(e) or type(e).__name__) from e
    except OSError as e:
        raise DownloadError(f"download of {clip(url)} to {dest} failed: {e}") from e
    except Exception as e:
        raise DownloadError(f"download of {clip(url)} failed: {type(e).__name__}: {clip(str(e))}") from e


# --------------------------------------------------------------------------- workflow


@dataclass(frozen=True)
class _Body:
    """What a fetcher yields: where the bytes start in the file, and how to read them.

    ``readinto`` fills a prefix of the buffer it is given with the next bytes,
    at most one read of the source per call, and returns how many; 0 at the end.
    """

    start: int
    readinto: Callable[[memoryview], int]


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
    digest: PackageDigest | None = None
    try:
        st = os.fstat(wfd)
        have = st.st_size
        _check_free_space(dest, max(0, expected_size - have) + limits.free_space_reserve_bytes)
        reader = _read_only_handle(wfd)
        digest, writer = _writing_digest(wfd, limits)
        if have > expected_size:
            have = _restart(wfd)
        elif have:
            _hash_existing(wfd, have, digest)
        resumed_from = writer.on_disk = have

        backoff_s = BUSY_BACKOFF_INITIAL_S
        while have < expected_size:
            try:
                with fetch(url, have, expected_size, limits, meter.deadline) as body:
                    if body.start != have:  # the server ignored our Range: start over
                        digest.close()  # its last writes land before the truncation
                        have = _restart(wfd)
                        digest, writer = _writing_digest(wfd, limits)
                    resumed_from = have
                    meter.begin(have)
                    have = _receive(body, digest, writer, meter, url, have, expected_size)
            except ServerBusy as busy:
                backoff_s = _wait_while_busy(busy, backoff_s, meter.deadline, limits.total_timeout_s)

        digests = digest.finish()  # every byte written and hashed
        writer.done()
        os.fsync(wfd)
        fsync_dir(dest.parent)
        meter.done(have)
        reader.seek(0)
        return DownloadedFile(dest, digests, resumed_from, meter.elapsed_s(), reader)
    except BaseException as e:
        if digest is not None:
            digest.close()  # what was received is on disk (for a resume) before anything else happens
        if reader is not None:
            reader.close()
        # an overrunning server is not trusted for a resume; a file that never got a byte is no use
        if isinstance(e, DownloadTooLarge) or (fresh and isinstance(e, InsufficientSpace)):
            _unlink_if_same(dest, wfd)
        raise
    finally:
        if digest is not None:
            digest.close()  # its writer thread is done with the descriptor before it is closed
        os.close(wfd)


def _writing_digest(wfd: int, limits: DownloadLimits) -> tuple[PackageDigest, _DirectWriter]:
    """Both digests, and the write to ``wfd``, each on its own thread over ``limits.chunk_bytes`` buffers."""
    writer = _DirectWriter(wfd)
    return PackageDigest(write=writer, buffer_bytes=limits.chunk_bytes), writer


DIRECT_ALIGN = 4096  # O_DIRECT offsets and lengths: a multiple of every common logical block size


class _DirectWriter:
    """Appends to the download file past the page cache (``O_DIRECT``) where the file system allows it.

    Why: the bytes were hashed from our own buffer and are read back only for
    extraction, so caching them buys little, while putting a package in the
    page cache costs a CPU copy per byte, fresh memory for every page (slow on a
    VM that hands free memory back to its host) and an fsync that writes it
    all at the end. With ``O_DIRECT`` the device copies from our buffer while
    the digests run and the final fsync has almost nothing left to do. Buffers
    are page-aligned (:mod:`baton.digest`); a write whose offset or length is
    not a multiple of ``DIRECT_ALIGN`` (the tail, a resumed file's first bytes),
    or a file system that refuses ``O_DIRECT``, is written through the cache.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._direct: bool | None = None  # None: not tried yet
        self.on_disk = 0  # the file's length once the last write returned: what a crash would leave

    def __call__(self, view: memoryview) -> None:
        pos = os.lseek(self._fd, 0, os.SEEK_CUR)
        end = pos + len(view)
        if self._direct is None:
            self._direct = self._set_direct(True)
        if self._direct and pos % DIRECT_ALIGN == 0:
            aligned = len(view) - len(view) % DIRECT_ALIGN
            try:
                _write_all(self._fd, view[:aligned])
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._direct = False  # refused after all: the rest goes through the cache
                view = view[os.lseek(self._fd, 0, os.SEEK_CUR) - pos :]
            else:
                view = view[aligned:]
        if view:
            self._set_direct(False)
            _write_all(self._fd, view)
            if self._direct:
                self._set_direct(True)
        self.on_disk = end

    def _set_direct(self, on: bool) -> bool:
        try:
            flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
            fcntl.fcntl(self._fd, fcntl.F_SETFL, flags | os.O_DIRECT if on else flags & ~os.O_DIRECT)
        except OSError:
            return False
        return True

    def done(self) -> None:
        """Back to ordinary I/O: a ``dup`` of the descriptor (no /proc) shares the flag."""
        if self._direct:
            self._set_direct(False)


def _wait_while_busy(busy: ServerBusy, backoff_s: float, deadline: float, total_timeout_s: float) -> float:
    """Sleep as a 503 asks (its ``Retry-After``, else our doubling backoff), never past the deadline.

    Only a 503 is retried: the server is up and said when to come back. Returns the next backoff.
    """
    wait_s = busy.retry_after_s if busy.retry_after_s is not None else backoff_s
    time.sleep(max(0.0, min(wait_s, deadline - time.monotonic())))
    if time.monotonic() >= deadline:
        raise DownloadTimeout(busy.url, "the server was busy (HTTP 503) until the deadline", total_timeout_s)
    return min(backoff_s * 2, BUSY_BACKOFF_MAX_S)


def _retry_after_s(response: http.client.HTTPResponse) -> float | None:
    """``Retry-After`` in seconds (delta-seconds only; an HTTP-date or garbage counts as absent)."""
    value = response.headers.get("Retry-After", "").strip()
    return float(min(int(value), BUSY_BACKOFF_MAX_S)) if value.isdigit() else None


def _receive(body: _Body, digest: PackageDigest, writer: _DirectWriter, meter: _Meter, url: str, have: int,
             expected_size: int) -> int:
    """Read the body into the digest's buffers, which write and hash it on their threads.

    The first byte past ``expected_size`` is refused. Whatever arrived before
    an error is handed on, so a partial file holds every byte received. A
    buffer is handed on when full or after ``PROGRESS_INTERVAL_S``, so a slow
    download reaches the disk (and progress, which counts bytes on disk) as it
    goes, and a crash loses little of it.
    """
    while True:
        buf = digest.buffer()
        span = len(buf) - have % len(buf)  # after a partial buffer, end on a boundary: later writes are aligned
        filled = 0
        ended = False
        handed_at = time.monotonic() + PROGRESS_INTERVAL_S
        try:
            while filled < span:
                room = min(span - filled, expected_size - have - filled + 1)  # +1: see an overrun
                n = body.readinto(buf[filled : filled + room])
                if not n:
                    ended = True
                    break
                filled += n
                if have + filled > expected_size:
                    raise DownloadTooLarge(url, expected_size)
                meter.advance(have + filled, writer.on_disk)
                if time.monotonic() >= handed_at:
                    break
        finally:
            kept = min(filled, expected_size - have)
            digest.submit(buf, kept)
            have += kept
        if ended:
            break
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

    def advance(self, done: int, on_disk: int) -> None:
        """``done`` bytes received (bounds and rate), ``on_disk`` of them written (progress)."""
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
            self._report(on_disk, rate, now)

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
            yield _Body(start, _HttpBody(response, reader, url, start, expected_size, limits, clock).readinto)
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
    with os.fdopen(fd, "rb", buffering=0) as src:
        st = os.fstat(src.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise UnsupportedUrl(url, "not a regular file")
        if st.st_size > expected_size:
            raise DownloadTooLarge(url, expected_size, announced=st.st_size)
        if st.st_size < expected_size:
            raise DownloadTruncated(url, expected_size, st.st_size, "source file too small")
        src.seek(offset)
        yield _Body(offset, src.readinto)


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


def _hash_existing(wfd: int, size: int, digest: PackageDigest) -> None:
    """Hash the ``size`` bytes already on disk, once, and leave the offset at their end."""
    os.lseek(wfd, 0, os.SEEK_SET)
    left = size
    while left:
        buf = digest.buffer()
        n = os.readv(wfd, [buf[: min(len(buf), left)]])
        digest.submit(buf, n, write=False)
        if not n:
            raise DownloadError(f"partial download shrank while it was being read ({size - left} of {size})")
        left -= n


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
