"""The handover wire format: supervisor <-> helper during a supervisor self-update.

One JSON object per SOCK_SEQPACKET message (message boundaries are kept, so no
framing is needed), file descriptors alongside with SCM_RIGHTS. Every message
carries ``protocol``. See docs/handover.md for the sequence, timeouts and who
does what on each failure.

Versioning: a speaker sends the highest version it speaks; the other side
answers with ``min(theirs, ours)`` if that is at least its own minimum, or
``refused``. An old helper can therefore drive a new supervisor (the new one
steps down to the helper's version) and the reverse.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from baton import durable
from baton.errors import BatonError

PROTOCOL_VERSION = 1
MIN_PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 1 << 20
MAX_FDS = 250

# message types
PREPARE = "prepare"      # helper -> old supervisor: give me your state, then exec the current version
STATE = "state"          # old supervisor -> helper, and helper -> new supervisor: agent table + fds
EXEC = "exec"            # helper -> old supervisor: state stored, exec now
HELLO = "hello"          # new supervisor -> helper: protocol, version, pid
HEALTHY = "healthy"      # new supervisor -> helper: every agent adopted, gRPC serving
UNHEALTHY = "unhealthy"  # new supervisor -> helper: why not
COMMIT = "commit"        # helper -> new supervisor: you are the supervisor now
REFUSED = "refused"      # either side: protocol or state not acceptable


class HandoverError(BatonError):
    pass


class HandshakeTimeout(HandoverError):
    def __init__(self, waiting_for: str, timeout_s: float) -> None:
        super().__init__(f"no {waiting_for} within {timeout_s:g}s")
        self.waiting_for = waiting_for


class HandoverRefused(HandoverError):
    pass


class PeerGone(HandoverError):
    pass


def negotiate(their_version: int) -> int:
    """The protocol both sides speak, or raise HandoverRefused."""
    v = min(int(their_version), PROTOCOL_VERSION)
    if v < MIN_PROTOCOL_VERSION:
        raise HandoverRefused(f"peer speaks handover protocol {their_version}; this side needs "
                              f"{MIN_PROTOCOL_VERSION}..{PROTOCOL_VERSION}")
    return v


def send(sock: socket.socket, msg: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps({"protocol": PROTOCOL_VERSION, **msg}).encode()
    if len(data) > MAX_MESSAGE_BYTES:
        raise HandoverError(f"handover message of {len(data)} bytes is too large")
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.sendall(data)


def recv(sock: socket.socket, timeout_s: float, waiting_for: str) -> tuple[dict[str, Any], list[int]]:
    """One message and the fds that came with it (owned by the caller)."""
    sock.settimeout(max(timeout_s, 0.001))
    try:
        data, ancdata, flags, _ = sock.recvmsg(MAX_MESSAGE_BYTES, socket.CMSG_SPACE(MAX_FDS * 4))
    except TimeoutError:
        raise HandshakeTimeout(waiting_for, timeout_s) from None
    except OSError as e:
        raise PeerGone(f"handover peer went away while waiting for {waiting_for}: {e}") from None
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - (len(payload) % arr.itemsize)])
            fds.extend(arr)
    for fd in fds:
        os.set_inheritable(fd, False)
    if not data:
        for fd in fds:
            os.close(fd)
        raise PeerGone(f"handover peer closed the connection while waiting for {waiting_for}")
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        raise HandoverError("handover message or its fds were truncated")
    try:
        msg = json.loads(data)
    except ValueError:
        raise HandoverError("handover message is not JSON") from None
    if not isinstance(msg, dict) or "type" not in msg:
        raise HandoverError("handover message has no type")
    return msg, fds


def seqpacket_listener(path: Path) -> socket.socket:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(8)
    return sock


def connect(path: Path, timeout_s: float = 5.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout_s)
    try:
        sock.connect(str(path))
    except OSError as e:
        sock.close()
        raise PeerGone(f"cannot connect to {path}: {e.strerror or e}") from None
    return sock


def peer_uid(sock: socket.socket) -> int:
    import struct

    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", data)[1])


@dataclass(frozen=True)
class ActiveHandover:
    """``<run_dir>/handover.json``: a helper is waiting for a supervisor's handshake on ``socket``."""

    update_id: str
    socket: str
    helper_pid: int
    expect_version: str
    created_at: float

    @staticmethod
    def path(run_dir: Path) -> Path:
        return Path(run_dir) / "handover.json"

    def write(self, run_dir: Path) -> None:
        durable.write_json(self.path(run_dir), self.__dict__, 0o600)

    @classmethod
    def read(cls, run_dir: Path) -> ActiveHandover | None:
        try:
            d = durable.read_json(cls.path(run_dir))
            return cls(str(d["update_id"]), str(d["socket"]), int(d["helper_pid"]), str(d["expect_version"]),
                       float(d.get("created_at", time.time())))
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None

    @classmethod
    def clear(cls, run_dir: Path) -> None:
        durable.remove_file(cls.path(run_dir))
