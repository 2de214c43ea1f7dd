"""Who may own the directories and log files a root supervisor writes to (like sshd's StrictModes).

A directory Baton writes to as root (``node.state_dir``, ``update.download_dir``,
``log.dir``, ``node.install_root``), and every existing parent of it, must be
owned by root or by the supervisor's own user, and must not be writable by
group or others: whoever can write to one of them can swap a file or a
directory under root's hands. A parent may be world-writable only if it is
sticky and owned by root (``/tmp``): there, nobody can rename or remove what
another user created. Symbolic links on the way are followed, and each link
must itself belong to root or our user.

Baton creates a missing directory with its own mode and never changes the mode
of a directory it did not create (:func:`make_dirs`).

Log files are opened with ``O_NOFOLLOW`` and the opened descriptor is checked
(:func:`open_log`): a regular file, owned by root or our user, with one link.
So a symbolic or hard link planted in a log directory never makes root append
to a file of someone else's choosing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from baton.errors import BatonError

LOG_FILE_MODE = 0o640


class UnsafePath(BatonError):
    """A directory or file that someone other than root (or our user) could change under us."""


def trusted_uids() -> frozenset[int]:
    return frozenset({0, os.geteuid()})


def _describe(st: os.stat_result) -> str:
    return f"owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}"


def _chain(path: Path) -> Iterator[tuple[Path, bool]]:
    """(directory, is the target itself) for the target if it exists and each existing parent, resolved."""
    p = Path(os.path.abspath(path))
    target = True
    while not os.path.lexists(p):
        p, target = p.parent, False
    real = Path(os.path.realpath(p))
    yield real, target
    for parent in real.parents:
        yield parent, False


def _links(path: Path) -> Iterator[Path]:
    """Each symbolic link on the way to ``path`` as written (its owner decides where it points)."""
    p = Path(os.path.abspath(path))
    for part in [*reversed(p.parents), p]:
        if os.path.islink(part):
            yield part


def check_dir(path: Path) -> None:
    """Raise UnsafePath unless ``path`` (if it exists) and every existing parent are safe for root to use."""
    uids = trusted_uids()
    for link in _links(path):
        st = os.lstat(link)
        if st.st_uid not in uids:
            raise UnsafePath(f"symbolic link {link} is owned by uid {st.st_uid} (must be root or uid "
                             f"{os.geteuid()})")
    for d, is_target in _chain(path):
        st = os.stat(d)
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafePath(f"{d} is not a directory")
        if st.st_uid not in uids:
            raise UnsafePath(f"{d} is owned by uid {st.st_uid} (must be root or uid {os.geteuid()}): "
                             f"{_describe(st)}")
        if st.st_mode & 0o022:
            if not is_target and st.st_mode & stat.S_ISVTX and st.st_uid == 0:
                continue  # a sticky root directory such as /tmp: nobody can replace what we create there
            raise UnsafePath(f"{d} is writable by group or others ({_describe(st)})")


def make_dirs(path: Path, mode: int) -> None:
    """Create ``path`` and missing parents (parents 0755, ``path`` ``mode``); existing ones keep their mode."""
    path = Path(path)
    missing = []
    p = path
    while not os.path.lexists(p):
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        want = mode if d == path else 0o755
        with contextlib.suppress(FileExistsError):
            os.mkdir(d, want)
            os.chmod(d, want)  # the umask must not widen or narrow what we asked for


def open_log(path: Path | str, flags: int = os.O_WRONLY | os.O_CREAT | os.O_APPEND) -> int:
    """Open a log file for appending without following a link; raise UnsafePath for a file not ours alone."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, LOG_FILE_MODE)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafePath(f"log file {path} is a symbolic link: refusing to follow it") from None
        raise
    try:
        st = os.fstat(fd)
        problem = ""
        if not stat.S_ISREG(st.st_mode):
            problem = "is not a regular file"
        elif st.st_uid not in trusted_uids():
            problem = f"is owned by uid {st.st_uid} (must be root or uid {os.geteuid()})"
        elif st.st_nlink != 1:
            problem = f"has {st.st_nlink} hard links"
        if problem:
            raise UnsafePath(f"log file {path} {problem}: refusing to write to it")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def log_opener(path: str, flags: int) -> int:
    """``opener`` for ``open()``: :func:`open_log` with the caller's flags."""
    return open_log(path, flags)
