"""The sd_notify-style datagram socket each notify-agent reports readiness on.

Each agent gets its own socket, passed in ``NOTIFY_SOCKET``. The path is stable, so
an agent adopted by a later supervisor process keeps reaching whoever supervises
it now; a handover passes the bound socket itself.

Who may speak on it is decided by the kernel's word, not by the path: the socket
has SO_PASSCRED set, so every datagram arrives with the sender's pid
(SCM_CREDENTIALS, which only CAP_SYS_ADMIN can forge), and a message is handed
on only if the agent accepts that pid (its main process, or its process group
with ``notify_access = "group"``), as systemd's ``NotifyAccess=`` does. Any other
process of the agent's user could otherwise make an agent that never became
ready RUNNING, and commit an update that should roll back. A refused sender is
logged once, not once per datagram.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import socket
import struct
from collections.abc import Callable
from pathlib import Path

from baton.log import logger

_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid
_CMSG_BYTES = socket.CMSG_SPACE(_UCRED.size)  # room for the credentials only: passed descriptors are discarded
MAX_DATAGRAM_BYTES = 4096
MAX_LOGGED_SENDERS = 256  # refused pids remembered for logging once each; past this, one line says so


def parse_notify(datagram: bytes) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in datagram.decode(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value
    return fields


def sender_of(ancdata: list[tuple[int, int, bytes]]) -> tuple[int, int, int]:
    """(pid, uid, gid) from a datagram's SCM_CREDENTIALS; pid 0 when there are none.

    A datagram queued before SO_PASSCRED was set (on a socket inherited from a version that did not set it)
    carries pid 0, which no agent accepts. Descriptors sent along (SCM_RIGHTS) are closed, never kept.
    """
    pid, uid, gid = 0, -1, -1
    for level, kind, data in ancdata:
        if level != socket.SOL_SOCKET:
            continue
        if kind == socket.SCM_CREDENTIALS and len(data) >= _UCRED.size:
            pid, uid, gid = _UCRED.unpack_from(data)
        elif kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
    return pid, uid, gid


class NotifySocket:
    """One agent's notify socket: messages from a sender that ``accepts(pid)`` go to ``on_message``."""

    def __init__(self, path: Path, on_message: Callable[[dict[str, str]], None], accepts: Callable[[int], bool],
                 owner: str) -> None:
        self.path = Path(path)
        self._on_message = on_message
        self._accepts = accepts
        self._owner = owner  # for the log: "agent web"
        self._refused: set[int] = set()
        self._sock: socket.socket | None = None

    def open(self, loop: asyncio.AbstractEventLoop, inherited: socket.socket | None = None) -> None:
        """Bind ``path`` anew, or read an inherited socket (whose bound path then becomes ``path``)."""
        if inherited is not None:
            sock = inherited
            with contextlib.suppress(OSError):
                name = sock.getsockname()
                if isinstance(name, str) and name.startswith("/"):
                    self.path = Path(name)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            old = os.umask(0o177)  # 0600 as it is bound: no chmod through a name afterwards
            try:
                sock.bind(str(self.path))
            finally:
                os.umask(old)
        # On an inherited socket too: a handover from a version that did not set it must not turn the check off.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.setblocking(False)
        self._sock = sock
        loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data, ancdata, _flags, _addr = self._sock.recvmsg(MAX_DATAGRAM_BYTES, _CMSG_BYTES)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            pid, uid, _gid = sender_of(ancdata)
            if pid and self._accepts(pid):
                self._on_message(parse_notify(data))
            else:
                self._refuse(pid, uid)

    def _refuse(self, pid: int, uid: int) -> None:
        if pid in self._refused:
            return
        if len(self._refused) >= MAX_LOGGED_SENDERS:
            if len(self._refused) == MAX_LOGGED_SENDERS:
                self._refused.add(-1)
                logger.warning("{}: more than {} processes were refused on {}; no longer logging each",
                               self._owner, MAX_LOGGED_SENDERS, self.path)
            return
        self._refused.add(pid)
        who = f"pid {pid} (uid {uid})" if pid else "a sender without credentials (queued before they were checked)"
        logger.warning("{}: ignored notify messages from {} on {}: not the agent's process", self._owner, who,
                       self.path)

    def forget_refused(self) -> None:
        """A new agent process: pids refused before may be logged again (pids are reused)."""
        self._refused.clear()

    @property
    def sock(self) -> socket.socket | None:
        return self._sock

    def detach(self, loop: asyncio.AbstractEventLoop) -> socket.socket | None:
        """Stop reading and give the socket away (a handover passes it on)."""
        sock = self._sock
        if sock is not None:
            loop.remove_reader(sock.fileno())
            self._sock = None
        return sock

    def close(self, loop: asyncio.AbstractEventLoop, unlink: bool = True) -> None:
        if self._sock is None:
            return
        loop.remove_reader(self._sock.fileno())
        self._sock.close()
        self._sock = None
        if unlink:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
