"""Who may own the files and directories a root supervisor trusts (like sshd's StrictModes).

One rule for every path on :func:`trusted_paths`' list (the config file, the trusted keys, the TLS files, the
command of an agent that runs as root, ``update.file_url_root``, the socket directory and the directories
Baton writes to): the path and every existing parent must be owned by root or by the supervisor's own user,
and must not be writable by others, nor by the group unless that group is root's (gid 0): whoever can write
to one of them can swap a file or a directory under root's hands. A parent may be world-writable only if it
is sticky and owned by root (``/tmp``): there, nobody can rename or remove what another user created.
Symbolic links on the way are followed, and each link must itself belong to root or our user.
:func:`check_trusted` applies the rule to one entry and raises :class:`UnsafePath` naming its config key, so
a caller can refuse one entry (a key file, for the helper) without judging the rest.

Baton creates a missing directory with its own mode and never changes the mode
of a directory it did not create (:func:`make_dirs`).

Log files are opened with ``O_NOFOLLOW`` and the opened descriptor is checked
(:func:`open_log`): a regular file, owned by root or our user, with one link.
So a symbolic or hard link planted in a log directory never makes root append
to a file of someone else's choosing.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import pwd
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from baton.errors import BatonError

if TYPE_CHECKING:
    from baton.config import AgentConfig, Config

LOG_FILE_MODE = 0o640


class UnsafePath(BatonError):
    """A directory or file that someone other than root (or our user) could change under us.

    ``key`` names the config key (or option) the path came from, "" when the caller did not say; ``at`` is
    the path at fault (the file, a parent or a link on the way), None when not known.
    """

    def __init__(self, message: str, key: str = "", at: Path | None = None) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
        self.problem = message
        self.at = at


class Kind(enum.Enum):
    """What root does with a trusted path, which decides what it must be."""

    DIR = "directory"  # root writes in it or reads from it; one that does not exist yet is created by Baton
    FILE = "file"      # root reads it (a key, a certificate, the config) or executes it (an agent's command)


@dataclass(frozen=True)
class Trusted:
    """One path root trusts, with the config key that names it."""

    key: str
    path: Path
    kind: Kind


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


def _writable_by_others(st: os.stat_result) -> bool:
    """Writable by others, or by a group other than root's (gid 0 holds only who root put there)."""
    return bool(st.st_mode & 0o002 or (st.st_mode & 0o020 and st.st_gid != 0))


def check_path(path: Path, kind: Kind = Kind.DIR) -> None:
    """Raise UnsafePath unless ``path`` (if it exists) and every existing parent are safe for root to trust."""
    uids = trusted_uids()
    for link in _links(path):
        st = os.lstat(link)
        if st.st_uid not in uids:
            raise UnsafePath(f"symbolic link {link} is owned by uid {st.st_uid} (must be root or uid "
                             f"{os.geteuid()})", at=link)
    for d, is_target in _chain(path):
        st = os.stat(d)
        if is_target and kind is Kind.FILE:
            if not stat.S_ISREG(st.st_mode):
                raise UnsafePath(f"{d} is not a regular file", at=d)
        elif not stat.S_ISDIR(st.st_mode):
            raise UnsafePath(f"{d} is not a directory", at=d)
        if st.st_uid not in uids:
            raise UnsafePath(f"{d} is owned by uid {st.st_uid} (must be root or uid {os.geteuid()}): "
                             f"{_describe(st)}", at=d)
        if _writable_by_others(st):
            if not is_target and st.st_mode & stat.S_ISVTX and st.st_uid == 0:
                continue  # a sticky root directory such as /tmp: nobody can replace what we create there
            raise UnsafePath(f"{d} is writable by group or others ({_describe(st)}, group {st.st_gid})", at=d)


def check_dir(path: Path) -> None:
    """:func:`check_path` for a directory."""
    check_path(path, Kind.DIR)


def check_trusted(item: Trusted) -> None:
    """The one rule, for one entry of :func:`trusted_paths`: UnsafePath naming ``item.key``."""
    try:
        check_path(item.path, item.kind)
    except UnsafePath as e:
        raise UnsafePath(e.problem, key=item.key, at=e.at) from None
    except OSError as e:
        raise UnsafePath(f"cannot check {item.path}: {e.strerror}", key=item.key, at=item.path) from None


def runs_as_trusted_user(agent: AgentConfig) -> bool:
    """The agent's process would run as root or as our own user (so its command is code we run)."""
    if not agent.user:
        return True
    try:
        return pwd.getpwnam(agent.user).pw_uid in trusted_uids()
    except KeyError:
        return False  # refused as an unknown user by the config's own checks


def trusted_key_files(cfg: Config) -> tuple[Trusted, ...]:
    """The ``update.trusted_keys`` entries of :func:`trusted_paths` (the helper checks them before it reads them)."""
    return tuple(Trusted(f"update.trusted_keys[{i}]", p, Kind.FILE) for i, p in enumerate(cfg.update.trusted_keys))


def trusted_paths(cfg: Config) -> tuple[Trusted, ...]:
    """Every file and directory root reads, executes or writes on trust: the one list the rule covers.

    The command of a packaged agent given relative to its version directory is under ``node.install_root``,
    which Baton itself writes; a command is a path, never looked up in PATH (the spawn does not either).
    """
    out: list[Trusted] = []
    if cfg.source is not None:
        out.append(Trusted("config file", cfg.source, Kind.FILE))
    out += trusted_key_files(cfg)
    for section, tls in (("grpc", cfg.grpc), ("manager", cfg.manager)):
        for name in ("tls_cert", "tls_key", "tls_ca"):
            p = getattr(tls, name)
            if p is not None:
                out.append(Trusted(f"{section}.{name}", p, Kind.FILE))
    for i, a in enumerate(cfg.agents):
        if Path(a.command).is_absolute() and runs_as_trusted_user(a):
            out.append(Trusted(f"agents[{i}].command", Path(a.command), Kind.FILE))
        if a.env_file is not None:  # root reads it for any agent: a swapped file would hand over others' secrets
            out.append(Trusted(f"agents[{i}].env_file", a.env_file, Kind.FILE))
    if cfg.update.file_url_root is not None:
        out.append(Trusted("update.file_url_root", cfg.update.file_url_root, Kind.DIR))
    if cfg.grpc.unix_socket is not None:
        out.append(Trusted("grpc.unix_socket", cfg.grpc.unix_socket.parent, Kind.DIR))
    out += [Trusted("node.state_dir", cfg.node.state_dir, Kind.DIR),
            Trusted("update.download_dir", cfg.download_dir, Kind.DIR),
            Trusted("log.dir", cfg.log_dir, Kind.DIR),
            Trusted("node.install_root", cfg.node.install_root, Kind.DIR)]
    return tuple(out)


def check_config_paths(cfg: Config) -> None:
    """:func:`check_trusted` for every entry of :func:`trusted_paths` but the trusted keys; the first unsafe one
    raises.

    An unsafe key refuses updates, not the start: ``baton.config.trusted_keys_problem`` judges the keys (for
    ``check-config``, the push and status) and the helper judges them again before it reads one.
    """
    keys = set(trusted_key_files(cfg))
    for item in trusted_paths(cfg):
        if item not in keys:
            check_trusted(item)


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
