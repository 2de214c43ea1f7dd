"""Unpack a verified package (tar, optionally gzip) into a fresh private staging directory.

The package is signed, but the signing key may be the thing an attacker got,
and ``tarfile``'s own ``data`` filter has had bypasses (CVE-2025-4517). So every
member is checked here first, the whole member list before a single byte is
written, and the ``data`` filter runs as a second line of defence (where the
interpreter has it: Python 3.11.4 and later).

Decompression is bounded while the archive is read: the unpacked-size limit
stops a gzip bomb at the member header that announces it, and a cap on the
decompressed stream (data plus header overhead) stops anything that hides its
size in headers. Nothing outside the new staging directory is touched; on any
error it is removed.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import stat
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from baton.config import UpdateConfig
from baton.durable import fsync_dir
from baton.errors import BatonError
from baton.layout import reserved_name_problem

_GZIP_MAGIC = b"\x1f\x8b"
_BLOCK = tarfile.BLOCKSIZE
_MAX_SYMLINK_HOPS = 40  # as Linux's MAXSYMLINKS
_COPY_BUFFER_BYTES = 64 * 1024
_GUNZIP_IN_BYTES = 16 * 1024  # compressed bytes read at once: a bomb's first read stays small
_GUNZIP_OUT_BYTES = 1024 * 1024  # decompressed bytes skipped at once by a forward seek


# --------------------------------------------------------------------------- errors


class ArchiveError(BatonError):
    """The package cannot be unpacked: corrupt, truncated, unsafe or too large."""


class UnsafeArchive(ArchiveError):
    """A member could write outside the staging directory, or is a kind we never install."""

    def __init__(self, member: str, reason: str) -> None:
        super().__init__(f"unsafe archive member {member!r}: {reason}")
        self.member = member
        self.reason = reason


class ArchiveTooLarge(ArchiveError):
    def __init__(self, what: str, limit: int) -> None:
        super().__init__(f"archive too large: {what} over the limit of {limit}")
        self.what = what
        self.limit = limit


# --------------------------------------------------------------------------- limits


@dataclass(frozen=True)
class ExtractLimits:
    """Bounds on what one package may unpack to."""

    max_files: int  # members of any kind, directories included
    max_unpacked_bytes: int  # sum of regular file sizes
    max_path_length: int = 4096  # bytes of a member name
    max_header_bytes: int = 1024 * 1024  # one pax or GNU long-name header; tarfile reads it whole

    def __post_init__(self) -> None:
        if min(self.max_files, self.max_unpacked_bytes, self.max_path_length, self.max_header_bytes) < 0:
            raise ValueError("ExtractLimits must not be negative")

    @classmethod
    def from_config(cls, u: UpdateConfig) -> ExtractLimits:
        """The limits the validated ``[update]`` section names; the rest are format bounds, not policy."""
        return cls(max_files=u.max_files, max_unpacked_bytes=u.max_unpacked_bytes)

    def max_stream_bytes(self) -> int:
        """Decompressed bytes a conforming archive can need: data, plus headers and padding per member."""
        per_member = 4 * _BLOCK + 2 * (self.max_path_length + _BLOCK)
        return self.max_unpacked_bytes + (self.max_files + 1) * per_member + 20 * _BLOCK


# --------------------------------------------------------------------------- public


def extract_package(fileobj: BinaryIO, parent: Path, limits: ExtractLimits) -> Path:
    """Unpack the archive in ``fileobj`` (read from its start) into a new directory under ``parent``.

    Args:
        fileobj: the open, verified package; plain tar or tar.gz.
        parent: where the staging directory is made; the caller renames it into place later.
        limits: bounds on member count, unpacked bytes and name lengths.

    Raises:
        UnsafeArchive: a member that escapes, links, or is a device, FIFO or duplicate.
        ArchiveTooLarge: too many members, too many unpacked bytes, or oversized headers.
        ArchiveError: a corrupt or truncated archive, or a failure while writing.

    Returns:
        The staging directory (mode 0700, named ``.staging-*``): directories
        inside are 0755, files 0644 or 0755, all fsynced.
    """
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=".staging-"))
    try:
        _extract(fileobj, staging, limits)
        fix_modes_and_sync(staging)
        fsync_dir(parent)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, ArchiveError) or not isinstance(e, Exception):
            raise
        raise ArchiveError(f"cannot unpack package: {type(e).__name__}: {e}") from e
    return staging


# --------------------------------------------------------------------------- workflow


def _extract(fileobj: BinaryIO, staging: Path, limits: ExtractLimits) -> None:
    fileobj.seek(0)
    compressed = fileobj.read(len(_GZIP_MAGIC)) == _GZIP_MAGIC
    fileobj.seek(0)
    inner: _Seekable = _Gunzip(fileobj) if compressed else fileobj
    stream = _BoundedStream(inner, limits.max_stream_bytes(), limits.max_header_bytes)
    try:
        with tarfile.TarFile(fileobj=stream, mode="r", errorlevel=2, copybufsize=_COPY_BUFFER_BYTES) as tar:
            members = _check_members(tar, limits)
            if hasattr(tarfile, "data_filter"):
                tar.extractall(staging, members=members, filter="data")
            else:  # Python before 3.11.4 (Debian 12's 3.11.2, which runs releases): our own checks only
                tar.extractall(staging, members=members)
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise ArchiveError(f"corrupt or truncated archive: {e}") from e


def _check_members(tar: tarfile.TarFile, limits: ExtractLimits) -> list[tarfile.TarInfo]:
    """Read and check every member header; return the members to extract.

    Counting and size checks run as each header is read, so a bomb stops at
    the first header past a limit. Checks that need the whole list (links
    through other links, members under a symlink) run after it.
    """
    kinds: dict[str, str] = {}  # normalised name -> "file" | "dir" | "symlink"
    links: dict[str, str] = {}  # normalised name -> link target
    members: list[tarfile.TarInfo] = []
    count = 0
    unpacked = 0
    while (member := tar.next()) is not None:
        count += 1
        if count > limits.max_files:
            raise ArchiveTooLarge("number of members", limits.max_files)
        key = _check_name(member.name, limits)
        kind = _kind(member)
        if kind == "file":
            unpacked += member.size
            if unpacked > limits.max_unpacked_bytes:
                raise ArchiveTooLarge("unpacked bytes", limits.max_unpacked_bytes)
        if key == "." and kind == "dir":
            continue  # "./" entry of `tar -C dir .`: the staging directory itself
        if key in kinds:
            raise UnsafeArchive(member.name, "duplicate member name")
        if kind == "symlink":
            _check_link_target(member.name, key, member.linkname)
            links[key] = member.linkname
        kinds[key] = kind
        members.append(member)
    if not members:
        raise ArchiveError("archive has no members")
    for member in members:
        key = posixpath.normpath(member.name)
        _check_parents(member.name, key, kinds)
        problem = _resolve_link(key, links) if key in links else None
        if problem is not None:
            raise UnsafeArchive(member.name, f"symlink target {member.linkname!r} {problem}")
    return members


def _check_name(name: str, limits: ExtractLimits) -> str:
    """Refuse names that could land outside the root; return the normalised name."""
    if len(name.encode("utf-8", "surrogateescape")) > limits.max_path_length:
        raise UnsafeArchive(name[:200], f"path longer than {limits.max_path_length} bytes")
    if not name:
        raise UnsafeArchive(name, "empty name")
    if name.startswith("/"):
        raise UnsafeArchive(name, "absolute path")
    if ".." in name.split("/"):
        raise UnsafeArchive(name, "'..' path component")
    key = posixpath.normpath(name)
    if key == ".." or key.startswith("../") or key.startswith("/"):
        raise UnsafeArchive(name, "path leaves the package")
    reserved = reserved_name_problem(key)
    if reserved is not None:
        raise UnsafeArchive(name, reserved)
    return key


def _kind(member: tarfile.TarInfo) -> str:
    if member.islnk():
        raise UnsafeArchive(member.name, "hard link")
    if member.ischr():
        raise UnsafeArchive(member.name, "character device")
    if member.isblk():
        raise UnsafeArchive(member.name, "block device")
    if member.isfifo():
        raise UnsafeArchive(member.name, "FIFO")
    if member.issparse():
        raise UnsafeArchive(member.name, "sparse file")
    if member.isreg():
        return "file"
    if member.isdir():
        return "dir"
    if member.issym():
        return "symlink"
    raise UnsafeArchive(member.name, f"unsupported member type {member.type!r}")


def _check_link_target(name: str, key: str, target: str) -> None:
    """The lexical check: no absolute target, none that climbs out from the link's own directory."""
    if not target:
        raise UnsafeArchive(name, "symlink with an empty target")
    if target.startswith("/"):
        raise UnsafeArchive(name, f"absolute symlink target {target!r}")
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(key), target))
    if resolved == ".." or resolved.startswith("../"):
        raise UnsafeArchive(name, f"symlink target {target!r} leaves the package")


def _check_parents(name: str, key: str, kinds: dict[str, str]) -> None:
    """Refuse a member placed under a symlink (``link -> .`` then ``link/x``) or under a file."""
    parts = key.split("/")
    for i in range(1, len(parts)):
        parent = "/".join(parts[:i])
        kind = kinds.get(parent)
        if kind == "symlink":
            raise UnsafeArchive(name, f"parent {parent!r} is a symlink in the archive")
        if kind == "file":
            raise UnsafeArchive(name, f"parent {parent!r} is a regular file in the archive")


def _resolve_link(key: str, links: dict[str, str]) -> str | None:
    """Resolve a symlink through the archive's own symlinks; say why it is unsafe, or None.

    ``d/a -> ..`` is harmless alone, but ``d/b -> a/..`` goes through it to the
    parent of the root: a lexical check of ``b`` alone cannot see that.
    """
    parts = key.split("/")[:-1]
    pending = links[key].split("/")
    hops = 0
    while pending:
        part = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                return "leaves the package"
            parts.pop()
            continue
        parts.append(part)
        target = links.get("/".join(parts))
        if target is not None:
            hops += 1
            if hops > _MAX_SYMLINK_HOPS:
                return f"does not resolve within {_MAX_SYMLINK_HOPS} links (a loop)"
            if target.startswith("/"):
                return "leads to an absolute symlink"
            parts.pop()
            pending[:0] = target.split("/")
    return None


def fix_modes_and_sync(staging: Path) -> None:
    """Directories 0755, files 0644 or 0755 by their owner exec bit; fsync everything, leaves first.

    So nothing installed is setuid, setgid, sticky or writable by others, whatever the source said (a package's
    members, or a release tree ``install-self`` copies).
    """
    for dirpath, dirnames, filenames in os.walk(staging, topdown=False):
        for name in (*filenames, *dirnames):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                os.chmod(path, 0o755 if st.st_mode & stat.S_IXUSR else 0o644)
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            elif stat.S_ISDIR(st.st_mode):
                os.chmod(path, 0o755)
        if Path(dirpath) != staging:
            fsync_dir(Path(dirpath))
    fsync_dir(staging)


# --------------------------------------------------------------------------- gzip stream


class _Gunzip:
    """A gzip file (one member or several) read as its decompressed stream, forward; seeking back starts over.

    ``gzip.GzipFile`` does the same through four layers of Python for every 8 KiB, twice per package (tarfile
    lists the members, then rewinds to extract them): unpacking 10 MiB took 33 ms of CPU with it, 23 ms here.
    Here a call moves up to ``_GUNZIP_IN_BYTES`` in and at most what was asked for out, so a bomb inflates no
    further than ``_BoundedStream`` lets it read. (The package was verified whole before this reads it.)
    """

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._rewind()

    def _rewind(self) -> None:
        self._raw.seek(0)
        self._z = zlib.decompressobj(wbits=31)  # 31: a gzip header and trailer around deflate
        self._pending = b""  # compressed input zlib has not taken yet
        self._pos = 0  # decompressed bytes returned so far
        self._eof = False

    def _inflate(self, size: int) -> bytes:
        """Up to ``size`` decompressed bytes (fewer only at the end of the stream)."""
        parts: list[bytes] = []
        want = size
        while want > 0 and not self._eof:
            if self._z.eof:  # a member ended: zero padding or the end of the file, else the next member
                rest = self._pending.lstrip(b"\0") or self._raw.read(_GUNZIP_IN_BYTES).lstrip(b"\0")
                if not rest:
                    self._eof = True
                    break
                self._z, self._pending = zlib.decompressobj(wbits=31), rest
            data = self._pending or self._raw.read(_GUNZIP_IN_BYTES)
            if not data:
                raise EOFError("compressed file ended before the end-of-stream marker was reached")
            out = self._z.decompress(data, want)
            self._pending = self._z.unconsumed_tail or self._z.unused_data
            parts.append(out)
            want -= len(out)
        return b"".join(parts)

    def read(self, size: int = -1, /) -> bytes:
        if size < 0:
            raise ValueError("_Gunzip reads a bounded size")
        out = self._inflate(size)
        self._pos += len(out)
        return out

    def seek(self, pos: int, whence: int = os.SEEK_SET, /) -> int:
        if whence != os.SEEK_SET:
            raise ValueError("_Gunzip seeks to absolute positions only")
        if pos < self._pos:
            self._rewind()
        while self._pos < pos and not self._eof:
            self._pos += len(self._inflate(min(pos - self._pos, _GUNZIP_OUT_BYTES)))
        return self._pos

    def tell(self) -> int:
        return self._pos


# --------------------------------------------------------------------------- bounded stream


class _Seekable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...
    def seek(self, pos: int, whence: int = os.SEEK_SET, /) -> int: ...
    def tell(self) -> int: ...


class _BoundedStream:
    """The (decompressed) archive stream as ``tarfile`` sees it, with two caps.

    No position past ``max_stream_bytes`` is ever read or sought to, so a bomb
    cannot make us inflate more than a conforming archive could need; and no
    single read exceeds ``max_header_bytes`` (tarfile reads data in small
    chunks, but a pax or GNU long-name header in one piece, into memory).
    """

    def __init__(self, inner: _Seekable, max_stream_bytes: int, max_header_bytes: int) -> None:
        self._inner = inner
        self._max_stream_bytes = max_stream_bytes
        self._max_read_bytes = max(max_header_bytes, _COPY_BUFFER_BYTES, _BLOCK)

    def read(self, size: int = -1) -> bytes:
        if size < 0 or size > self._max_read_bytes:
            raise ArchiveTooLarge("bytes in one tar header", self._max_read_bytes)
        if self._inner.tell() + size > self._max_stream_bytes:
            raise ArchiveTooLarge("decompressed archive bytes", self._max_stream_bytes)
        return self._inner.read(size)

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        if whence != os.SEEK_SET:
            raise ArchiveError("tar stream: only absolute seeks are supported")
        if pos > self._max_stream_bytes:
            raise ArchiveTooLarge("decompressed archive bytes", self._max_stream_bytes)
        return self._inner.seek(pos)

    def tell(self) -> int:
        return self._inner.tell()

    def write(self, data: bytes) -> int:
        raise ArchiveError("tar stream is read-only")

    def close(self) -> None:
        """Closing the TarFile must not close the caller's file, which the caller owns."""
