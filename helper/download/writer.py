"""The writer: bytes go to the download file and through both digests in one pass, on three threads.

Each full buffer is taken, in order, by three threads
(:class:`baton.digest.PackageDigest`): the write to disk (``O_DIRECT`` where the
file system allows it: no page-cache copy, and the final fsync finds little to
do), SHA-256 and BLAKE2b-512. hashlib and the system calls release the GIL, so
the receiving thread and the three consumers share the cores and a download
runs at about the slower digest's speed.

What a crash leaves is a prefix of the body: bytes are appended in order and
``DirectWriter.on_disk`` is the file's length once the last write returned. A
partial file is resumed (its bytes hashed again once), never taken as finished:
only a file of exactly the expected size, fsynced, is handed on.
"""

from __future__ import annotations

import errno
import fcntl
import os

from baton.digest import PackageDigest
from helper.download.errors import DownloadError
from helper.download.limits import DownloadLimits


def writing_digest(wfd: int, limits: DownloadLimits) -> tuple[PackageDigest, DirectWriter]:
    """Both digests, and the write to ``wfd``, each on its own thread over ``limits.chunk_bytes`` buffers."""
    writer = DirectWriter(wfd)
    return PackageDigest(write=writer, buffer_bytes=limits.chunk_bytes), writer


DIRECT_ALIGN = 4096  # O_DIRECT offsets and lengths: a multiple of every common logical block size


class DirectWriter:
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
                write_all(self._fd, view[:aligned])
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._direct = False  # refused after all: the rest goes through the cache
                view = view[os.lseek(self._fd, 0, os.SEEK_CUR) - pos :]
            else:
                view = view[aligned:]
        if view:
            self._set_direct(False)
            write_all(self._fd, view)
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


def restart(wfd: int) -> int:
    os.ftruncate(wfd, 0)
    os.lseek(wfd, 0, os.SEEK_SET)
    return 0


def hash_existing(wfd: int, size: int, digest: PackageDigest) -> None:
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


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
