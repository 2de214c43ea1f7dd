"""File safety: the download file is the helper's own, and a ``file://`` source is read only beneath its root.

The download file is the helper's own, whoever owns the directory: it is
created with ``O_EXCL|O_NOFOLLOW``, mode 0600, and its identity (device, inode)
is handed to the caller to record (the journal) before a byte is written. Only
that file is ever resumed, and only while it is still the helper's (owner =
euid, one link, mode 0600): no other user ever holds a descriptor that can
write it, so the bytes read back for extraction are the bytes that were hashed.
A file at ``dest`` that another user owns is refused, never adopted.

A ``file://`` source is opened component by component with ``O_NOFOLLOW`` (no
symlink anywhere below the root) and ``O_NONBLOCK`` (a FIFO cannot block).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from baton.errors import clip
from helper.download.errors import ConnectionFailed, InsufficientSpace, UntrustedDownloadFile


@dataclass(frozen=True)
class FileIdentity:
    """Which inode a download file is: what the journal records so that only that file is resumed."""

    dev: int
    ino: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_dev, st.st_ino)


def open_dest(dest: Path, owned: FileIdentity | None, created: Callable[[FileIdentity], None] | None
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
            unlink_if_same(dest, fd)
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


def unlink_if_same(dest: Path, fd: int) -> None:
    """Remove ``dest`` if it is still the file behind ``fd`` (never someone else's replacement)."""
    with contextlib.suppress(OSError):
        if FileIdentity.of(os.lstat(dest)) == FileIdentity.of(os.fstat(fd)):
            os.unlink(dest)


def check_free_space(dest: Path, needed_bytes: int) -> None:
    vfs = os.statvfs(dest.parent)
    free = vfs.f_bavail * vfs.f_frsize
    if free < needed_bytes:
        raise InsufficientSpace(dest, needed_bytes, free)


def read_only_handle(wfd: int) -> BinaryIO:
    """A second, read-only open of the inode behind ``wfd``, with its own offset.

    Reopening through ``/proc/self/fd`` reaches the inode, not the path, so a
    rename or replacement of ``dest`` cannot change what the caller reads.
    """
    try:
        rfd = os.open(f"/proc/self/fd/{wfd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        rfd = os.dup(wfd)  # no /proc: same inode, shared offset; seek(0) happens after writing
    return os.fdopen(rfd, "rb")


def open_beneath(url: str, root: Path, rel: PurePosixPath) -> int:
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

