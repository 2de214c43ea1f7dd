"""One download: the source's body through the rate meter into the writer, under the file-safety rules.

A partial file left by a failed download is kept for the next attempt, which
resumes it with an HTTP ``Range`` request. The caller removes ``dest`` when the
finished file fails verification. :func:`download` hands back a read-only
handle on the very inode it wrote, so the installer verifies and extracts the
same bytes without reopening the file by path.

Every failure, whatever raised it underneath (http.client, the OS), reaches the
caller as a :class:`~helper.download.errors.DownloadError` subclass: one family
to handle.
"""

from __future__ import annotations

import http.client
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from baton.digest import Digests, PackageDigest
from baton.durable import fsync_dir
from baton.errors import clip
from helper.download.errors import (
    ConnectionFailed,
    DownloadError,
    DownloadTimeout,
    DownloadTooLarge,
    DownloadTruncated,
    InsufficientSpace,
    ProtocolViolation,
    ServerBusy,
)
from helper.download.files import FileIdentity, check_free_space, open_dest, read_only_handle, unlink_if_same
from helper.download.limits import DownloadLimits
from helper.download.rate import BUSY_BACKOFF_INITIAL_S, PROGRESS_INTERVAL_S, DownloadProgress, Meter, wait_while_busy
from helper.download.transport import Body, Fetcher, fetcher_for
from helper.download.writer import DirectWriter, hash_existing, restart, writing_digest


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
    fetch: Fetcher | None = None,
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
        fetch: where the bytes come from; None picks the real transport for ``url``'s scheme.

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
    if fetch is None:
        fetch = fetcher_for(url)
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


def _download(
    fetch: Fetcher,
    url: str,
    dest: Path,
    expected_size: int,
    limits: DownloadLimits,
    progress: Callable[[DownloadProgress], None] | None,
    resume: bool,
    owned: FileIdentity | None,
    created: Callable[[FileIdentity], None] | None,
) -> DownloadedFile:
    meter = Meter(url, limits, expected_size, progress)
    wfd, fresh = open_dest(dest, owned if resume else None, created)
    reader: BinaryIO | None = None
    digest: PackageDigest | None = None
    try:
        st = os.fstat(wfd)
        have = st.st_size
        check_free_space(dest, max(0, expected_size - have) + limits.free_space_reserve_bytes)
        reader = read_only_handle(wfd)
        digest, writer = writing_digest(wfd, limits)
        if have > expected_size:
            have = restart(wfd)
        elif have:
            hash_existing(wfd, have, digest)
        resumed_from = writer.on_disk = have

        backoff_s = BUSY_BACKOFF_INITIAL_S
        while have < expected_size:
            try:
                with fetch(url, have, expected_size, limits, meter.deadline) as body:
                    if body.start != have:  # the server ignored our Range: start over
                        digest.close()  # its last writes land before the truncation
                        have = restart(wfd)
                        digest, writer = writing_digest(wfd, limits)
                    resumed_from = have
                    meter.begin(have)
                    have = _receive(body, digest, writer, meter, url, have, expected_size)
            except ServerBusy as busy:
                backoff_s = wait_while_busy(busy, backoff_s, meter.deadline, limits.total_timeout_s)

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
            unlink_if_same(dest, wfd)
        raise
    finally:
        if digest is not None:
            digest.close()  # its writer thread is done with the descriptor before it is closed
        os.close(wfd)


def _receive(body: Body, digest: PackageDigest, writer: DirectWriter, meter: Meter, url: str, have: int,
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

