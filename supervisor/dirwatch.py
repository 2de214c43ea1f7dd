"""Wake-ups when a file is renamed into a directory (Linux inotify through libc; no dependency).

The helper writes the update journal with write-temp + rename (baton/durable.py), so a rename of
``journal.json`` into the update's directory is exactly "the record changed". ``WatchUpdate`` waits on
this instead of a fixed sleep; it keeps a bounded fallback poll, so a missed or unavailable event
costs at most that poll, never a hang.
"""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

from supervisor.libc import errno_error, libc

IN_MOVED_TO = 0x00000080
IN_IGNORED = 0x00008000
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (struct inotify_event), then len bytes of name


class DirWatch:
    """A non-blocking inotify descriptor on one directory; :meth:`renamed_in` drains it."""

    def __init__(self, directory: Path) -> None:
        lib = libc()
        fd = lib.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise errno_error("inotify_init1")
        if lib.inotify_add_watch(fd, os.fsencode(directory), IN_MOVED_TO) < 0:
            err = errno_error(f"inotify_add_watch {directory}")
            os.close(fd)
            raise err
        self.fd = fd

    def renamed_in(self) -> set[str]:
        """The names renamed into the directory since the last call (empty when nothing is pending)."""
        names: set[str] = set()
        while True:
            try:
                buf = os.read(self.fd, 64 * 1024)
            except BlockingIOError:
                return names
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                raise
            if not buf:
                return names
            off = 0
            while off + _EVENT.size <= len(buf):
                _wd, mask, _cookie, length = _EVENT.unpack_from(buf, off)
                off += _EVENT.size
                if not mask & IN_IGNORED:
                    names.add(buf[off:off + length].split(b"\0", 1)[0].decode(errors="replace"))
                off += length

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def watch_dir(directory: Path) -> DirWatch | None:
    """A watch on ``directory``, or None where inotify is unavailable (the caller then polls)."""
    try:
        return DirWatch(directory)
    except (OSError, AttributeError):
        return None
