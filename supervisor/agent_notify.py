"""An agent's notify socket (``notify = true``): where it says READY=1 and STATUS=, bound in a directory of its
own that only the agent's user can reach (``<notify_dir>/<name>/notify.sock``).

A socket left at the legacy path in the state directory (a supervisor before round 3 was killed, its agent lives
on) is bound again there, so that the adopted process still reaches us; the next spawn moves to the new path.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import pwd
import socket
import stat
from collections.abc import Callable
from pathlib import Path

from baton.config import AgentConfig, Config
from baton.strict_modes import UnsafePath, check_dir, make_dirs
from supervisor.agent_errors import AgentError
from supervisor.notify_socket import NotifySocket


def notify_path(config: Config, name: str) -> Path:
    """Where a process of agent ``name`` started now is told to notify: a directory of its own under
    ``Config.notify_dir``."""
    return config.notify_socket(name)


class AgentNotify:
    __slots__ = ("_accepts", "_cfg", "_config", "_dir", "_loop", "_on_message", "_sock")

    def __init__(self, cfg: AgentConfig, config: Config, agent_dir: Path,
                 on_message: Callable[[dict[str, str]], None], accepts: Callable[[int], bool]) -> None:
        self._cfg = cfg
        self._config = config
        self._dir = agent_dir
        self._on_message = on_message
        self._accepts = accepts
        self._loop = asyncio.get_running_loop()
        self._sock: NotifySocket | None = None

    def configure(self, config: Config) -> None:
        """The config after a reload that left this agent unchanged (the notify directory may have moved)."""
        self._config = config

    @property
    def path(self) -> Path:
        return notify_path(self._config, self._cfg.name)

    @property
    def legacy_path(self) -> Path:
        """Where versions before round 3 bound it, in the state directory: an agent they started still uses it."""
        return self._dir / "notify.sock"

    def open(self, inherited: socket.socket | None) -> None:
        """Read the notify socket handed over (bound wherever its version bound it), else bind one."""
        legacy = inherited is None and stat.S_ISSOCK(_lstat_mode(self.legacy_path))
        path = self.legacy_path if legacy else self.path
        owner = self._owner()
        if inherited is None and not legacy:
            self._prepare_dir(owner)
        self._sock = NotifySocket(path, self._on_message, self._accepts, f"agent {self._cfg.name}")
        self._sock.open(self._loop, inherited)
        if inherited is None and owner is not None:  # connect() needs write permission on the socket
            os.chown(path, *owner, follow_symlinks=False)

    def before_spawn(self) -> None:
        """A process is about to start: leave the legacy socket (the process that used it is gone)."""
        if self._sock is not None and self._sock.path != self.path:
            self._sock.close(self._loop)
            self.open(None)

    def spawned(self) -> None:
        """A process started: the senders refused so far are forgotten (it is a new sender to judge)."""
        if self._sock is not None:
            self._sock.forget_refused()

    def _owner(self) -> tuple[int, int] | None:
        """(uid, gid) the agent runs as when it is not the supervisor's user, else None."""
        if not self._cfg.user:
            return None
        try:
            pw = pwd.getpwnam(self._cfg.user)
            gid = grp.getgrnam(self._cfg.group).gr_gid if self._cfg.group else pw.pw_gid
        except KeyError:
            return None  # the spawn fails with the name; the socket stays root's meanwhile
        return None if pw.pw_uid == os.geteuid() else (pw.pw_uid, gid)

    def _prepare_dir(self, owner: tuple[int, int] | None) -> None:
        """``<notify_dir>/<name>/``: ours, reachable by the agent's group only (0710), or by us only (0700).

        Its parent is root's and 0711, so nobody but us can put anything in it and only its path is reachable:
        the state directory stays 0700. Opened without following a link and changed through the descriptor.
        """
        root = self._config.notify_dir
        make_dirs(root, 0o711)
        try:
            check_dir(root)
        except UnsafePath as e:
            raise AgentError(f"agent {self._cfg.name}: notify sockets' directory: {e}") from None
        d = root / self._cfg.name
        with contextlib.suppress(FileExistsError):
            os.mkdir(d, 0o700)
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if os.fstat(fd).st_uid != os.geteuid():
                raise AgentError(f"agent {self._cfg.name}: {d} is not owned by the supervisor's user")
            os.fchown(fd, os.geteuid(), owner[1] if owner else os.getegid())
            os.fchmod(fd, 0o710 if owner else 0o700)
        finally:
            os.close(fd)

    def detach(self) -> socket.socket | None:
        """Stop reading and give the socket away without closing it (a handover passes it on)."""
        sock = self._sock.detach(self._loop) if self._sock is not None else None
        self._sock = None
        return sock

    def close(self, unlink: bool) -> None:
        path = self._sock.path if self._sock is not None else None
        sock = self.detach()
        if sock is None:
            return
        sock.close()
        if unlink and path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            with contextlib.suppress(OSError):  # its own directory, if it is one (not the legacy one)
                if path.parent == self.path.parent:
                    os.rmdir(path.parent)


def _lstat_mode(path: Path) -> int:
    try:
        return os.lstat(path).st_mode
    except OSError:
        return 0
