"""The sd_notify-style datagram socket each notify-agent reports readiness on.

Each agent gets its own socket (``<state>/agents/<name>/notify.sock``) passed in
``NOTIFY_SOCKET``, so the sender is known from the socket and no credential
lookup is needed. The path is stable, so an agent adopted by a later supervisor
process keeps reaching whoever supervises it now.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable
from pathlib import Path


def parse_notify(datagram: bytes) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in datagram.decode(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value
    return fields


class NotifySocket:
    def __init__(self, path: Path, on_message: Callable[[dict[str, str]], None]) -> None:
        self.path = Path(path)
        self._on_message = on_message
        self._sock: socket.socket | None = None

    def open(self, loop: asyncio.AbstractEventLoop, inherited: socket.socket | None = None) -> None:
        if inherited is not None:
            sock = inherited
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            old = os.umask(0o177)  # 0600 as it is bound: no chmod through a name afterwards
            try:
                sock.bind(str(self.path))
            finally:
                os.umask(old)
        sock.setblocking(False)
        self._sock = sock
        loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data = self._sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            self._on_message(parse_notify(data))

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
