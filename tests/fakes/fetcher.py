"""A fetcher serving packages from memory, that can fail with each download failure or be killed mid-bytes."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from baton.digest import digest_stream
from helper.download import (
    ConnectionFailed,
    DownloadedFile,
    DownloadError,
    DownloadLimits,
    DownloadProgress,
    DownloadTooLarge,
    DownloadTruncated,
    FileIdentity,
)
from tests.fakes.crash import Crash


class FakeFetcher:
    """A ``Fetcher`` with ``helper.download.download``'s file rules: ``dest`` is created private and reported
    through ``created`` before a byte is written; only the file ``owned`` names is resumed.

    ``fail``: raised at every call (a server that stays down). ``crash_after_bytes``: the helper is killed
    once that many bytes are on disk (one shot).
    """

    def __init__(self) -> None:
        self.served: dict[str, bytes] = {}
        self.fail: DownloadError | None = None
        self.crash_after_bytes: int | None = None
        self.resumed_from: list[int] = []  # per call: the bytes it kept from an earlier attempt

    def __call__(self, url: str, dest: Path, *, expected_size: int, limits: DownloadLimits,
                 progress: Callable[[DownloadProgress], None] | None = None, resume: bool = True,
                 owned: FileIdentity | None = None,
                 created: Callable[[FileIdentity], None] | None = None) -> DownloadedFile:
        if self.fail is not None:
            raise self.fail
        if url not in self.served:
            raise ConnectionFailed(url, "nothing serves it")
        body = self.served[url]
        if len(body) > expected_size:
            raise DownloadTooLarge(url, expected_size, len(body))
        start, resuming = 0, False
        if dest.exists():
            if resume and owned == FileIdentity.of(dest.stat()):
                start, resuming = dest.stat().st_size, True
            else:
                dest.unlink()
        if not resuming:
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
            if created is not None:
                created(FileIdentity.of(dest.stat()))
        self.resumed_from.append(start)
        end = len(body)
        if self.crash_after_bytes is not None:
            end = min(end, max(start, self.crash_after_bytes))
        with open(dest, "ab") as f:
            f.write(body[start:end])
        if progress is not None:
            progress(DownloadProgress(end, expected_size, 0.0, 0.0, start))
        if self.crash_after_bytes is not None:
            self.crash_after_bytes = None
            raise Crash(f"killed with {end} of {len(body)} bytes on disk")
        if end < expected_size:
            raise DownloadTruncated(url, expected_size, end)
        f2 = open(dest, "rb")  # noqa: SIM115 - the DownloadedFile owns it, as the real one does
        digests = digest_stream(f2)
        f2.seek(0)
        return DownloadedFile(dest, digests, start, 0.0, f2)
