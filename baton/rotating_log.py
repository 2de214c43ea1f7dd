"""Log files with size-based rotation: each agent's output, and the supervisor's own ``supervisor.log``.

The supervisor drains each agent's output FIFO and appends it here (and :mod:`baton.log` its own lines); when
the file would pass ``max_bytes`` it is rotated (``name.log`` -> ``name.log.1`` ..., keeping ``backups`` old
files). Writes never block the agent: the FIFO is drained as fast as the event loop runs, and the disk write
goes to page cache. Files are opened like every log root writes (``baton/strict_modes.py``).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path

from baton.log import logger
from baton.strict_modes import UnsafePath, open_log

MAX_LINE_OVERSHOOT = 64 * 1024


class RotatingLog:
    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = open_log(self.path)
        self._size = os.fstat(self._fd).st_size
        self._at_line_start = True

    def write(self, data: bytes) -> None:
        """Append, rotating at a line boundary; a file passes ``max_bytes`` by at most one line."""
        while data and self._fd >= 0:
            room = self.max_bytes - self._size
            if len(data) <= room:
                self._append(data)
                return
            nl = data.rfind(b"\n", 0, max(room, 0))
            if nl < 0 and not self._at_line_start:
                nl = data.find(b"\n", 0, max(room, 0) + MAX_LINE_OVERSHOOT)
            if nl >= 0:
                self._append(data[: nl + 1])
                data = data[nl + 1 :]
            elif self._size == 0:
                self._append(data[:room])
                data = data[room:]
            self.rotate()

    def _append(self, data: bytes) -> None:
        os.write(self._fd, data)
        self._size += len(data)
        self._at_line_start = data.endswith(b"\n")

    def rotate(self) -> None:
        os.close(self._fd)
        if self.backups > 0:
            for i in range(self.backups - 1, 0, -1):
                src = self.path.with_name(f"{self.path.name}.{i}")
                if src.exists():
                    os.replace(src, self.path.with_name(f"{self.path.name}.{i + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self._size = 0
        try:
            self._fd = open_log(self.path)
        except (UnsafePath, OSError) as e:
            self._fd = -1  # output is dropped rather than written where someone else chose
            logger.error("log {}: {}; what goes to it is discarded until restart", self.path, e)

    def tail(self, max_bytes: int = 4096) -> str:
        try:
            with open(self.path, "rb", opener=_read_nofollow) as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - max_bytes))
                return f.read().decode(errors="replace")
        except OSError:  # missing, or a link someone planted: nothing to quote
            return ""

    def last_lines(self, n: int, max_bytes: int = 1 << 20) -> Awaitable[bytes]:
        """The last ``n`` lines of the file as it is now (at most ``max_bytes`` of them), for ``supervisor tail``.

        The file is opened and its size taken now, so what is appended after this call is not in the answer
        (``TailLog`` sends it from its queue) even once the file has rotated; the bytes are read off the event
        loop (aiofiles) when the result is awaited.
        """
        fd, end = -1, 0
        with contextlib.suppress(OSError):  # missing, or a link someone planted: nothing to show
            fd = _read_nofollow(str(self.path), os.O_RDONLY)
            end = os.fstat(fd).st_size
        return _last_lines(fd, end, n, max_bytes)

    def clear(self) -> int:
        """Truncate the log and remove its rotated files; returns the bytes removed."""
        removed = self._size
        for i in range(1, self.backups + 1):
            old = self.path.with_name(f"{self.path.name}.{i}")
            with contextlib.suppress(FileNotFoundError):
                removed += old.stat().st_size
                old.unlink()
        if self._fd >= 0:
            os.ftruncate(self._fd, 0)
        self._size = 0
        self._at_line_start = True
        return removed

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


async def _last_lines(fd: int, end: int, n: int, max_bytes: int) -> bytes:
    if fd < 0:
        return b""
    import aiofiles  # imported at the first tail, not at start

    async with aiofiles.open(fd, "rb") as f:  # closes fd
        if n <= 0:
            return b""
        await f.seek(max(0, end - max_bytes))
        data = await f.read(min(end, max_bytes))
    return b"".join(data.splitlines(keepends=True)[-n:])


def last_lines_of(path: Path, n: int, max_bytes: int = 1 << 20) -> bytes:
    """The last ``n`` lines of the log file ``path`` (at most ``max_bytes`` of them), not following a link."""
    if n <= 0:
        return b""
    try:
        with open(path, "rb", opener=_read_nofollow) as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:  # missing, or a link someone planted: nothing to show
        return b""
    lines = data.splitlines(keepends=True)
    return b"".join(lines[-n:])


def follow_file(path: Path, poll_s: float = 0.2) -> Iterator[bytes]:
    """What is appended to the log file ``path`` from now on, across its rotations and a `clear`, for ever.

    Polls (the file is written by another process): when ``path`` names another file than the one open (rotated)
    the rest of the open one is read first, then the new one from its start; a file that shrank (cleared) is
    read again from its start.
    """
    f = None
    while True:
        if f is None:
            with contextlib.suppress(OSError):
                f = open(path, "rb", opener=_read_nofollow)  # noqa: SIM115 (kept open across the loop)
                f.seek(0, os.SEEK_END)
        if f is None:
            time.sleep(poll_s)
            continue
        data = f.read()
        if data:
            yield data
            continue
        try:
            st = os.stat(path, follow_symlinks=False)
            rotated = st.st_ino != os.fstat(f.fileno()).st_ino
        except OSError:
            rotated = True
        if rotated:
            rest = f.read()
            if rest:
                yield rest
            f.close()
            try:
                f = open(path, "rb", opener=_read_nofollow)  # noqa: SIM115
            except OSError:
                f = None
            continue
        if os.fstat(f.fileno()).st_size < f.tell():
            f.seek(0)
            continue
        time.sleep(poll_s)


def _read_nofollow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
