"""The handover wire format: supervisor <-> helper during a supervisor self-update.

One JSON object per SOCK_SEQPACKET message (message boundaries are kept, so no
framing is needed), file descriptors alongside with SCM_RIGHTS. Every message
carries ``protocol``. See docs/handover.md for the sequence, timeouts and who
does what on each failure.

Every message is a frozen dataclass below with one encoder (``to_wire``) and
one decoder (``from_wire``); :func:`send` and :func:`recv` are the only ways
onto and off the socket, so no side builds or parses a dict by hand. A message
that is not JSON, has an unknown ``type``, lacks a field or has one of the
wrong type raises :class:`ProtocolError`; unknown extra fields are ignored.

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
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from baton import durable
from baton.agent_table import AgentRecord
from baton.errors import BatonError

PROTOCOL_VERSION = 1
MIN_PROTOCOL_VERSION = 1
SOCKET_NAME = "handover.sock"  # in the run directory: where a helper asks the running supervisor for its state
# The listening socket of the private control socket (<run_dir>/control.sock) among the "listen" descriptors;
# the others are named by their config address. Helpers talk to the supervisor on it.
CONTROL_LISTENER = "control"
MAX_MESSAGE_BYTES = 1 << 20
# What a client is told (UNAVAILABLE, which gRPC clients retry) when it asks for a change during a self-update:
# by the old process after it handed over, and by the helper's bridge (helper/bridge.py).
BETWEEN = "the supervisor is being replaced (self-update); retry in a moment"
MAX_FDS = 250


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


class ProtocolError(HandoverError):
    """A message that is not JSON, of an unknown or unexpected type, or with a missing or mistyped field."""


def negotiate(their_version: int) -> int:
    """The protocol both sides speak, or raise HandoverRefused."""
    v = min(int(their_version), PROTOCOL_VERSION)
    if v < MIN_PROTOCOL_VERSION:
        raise HandoverRefused(f"peer speaks handover protocol {their_version}; this side needs "
                              f"{MIN_PROTOCOL_VERSION}..{PROTOCOL_VERSION}")
    return v


# ---- messages: one frozen dataclass each, one encoder (to_wire) and one decoder (from_wire) --------------

_MISSING: Any = object()


def _get(d: Mapping[str, Any], msg_type: str, key: str, kind: type, default: Any = _MISSING) -> Any:
    """``d[key]`` if it is a ``kind`` (a bool is not an int), else ProtocolError; ``default`` if absent."""
    if key not in d:
        if default is _MISSING:
            raise ProtocolError(f"handover message {msg_type!r} lacks {key!r}")
        return default
    v = d[key]
    if not isinstance(v, kind) or (kind is not bool and isinstance(v, bool)):
        raise ProtocolError(f"handover message {msg_type!r}: {key!r} must be {kind.__name__}, "
                            f"not {type(v).__name__}")
    return v


FD_KINDS: dict[str, str] = {"listen": "address", "fifo": "agent", "stderr_fifo": "agent", "notify": "agent",
                            "stdio": "name"}
"""Descriptor kind -> the field that names it (a listen address, an agent, a stdio stream)."""


@dataclass(frozen=True)
class FdDescriptor:
    """What one passed descriptor is. A kind this side does not know decodes (name "") and is closed."""

    kind: str
    name: str = ""

    @property
    def known(self) -> bool:
        return self.kind in FD_KINDS

    def to_wire(self) -> dict[str, str]:
        key = FD_KINDS.get(self.kind)
        return {"kind": self.kind, key: self.name} if key else {"kind": self.kind}

    @classmethod
    def from_wire(cls, d: object) -> FdDescriptor:
        if not isinstance(d, dict):
            raise ProtocolError(f"a descriptor must be an object, not {type(d).__name__}")
        kind = _get(d, "fd", "kind", str)
        key = FD_KINDS.get(kind)
        return cls(kind, _get(d, f"fd {kind}", key, str) if key else "")


@dataclass(frozen=True)
class Prepare:
    """helper -> old supervisor: give me your state, then exec the current version."""

    TYPE: ClassVar[str] = "prepare"
    update_id: str

    def to_wire(self) -> dict[str, Any]:
        return {"update_id": self.update_id}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Prepare:
        return cls(_get(d, cls.TYPE, "update_id", str))


@dataclass(frozen=True)
class State:
    """old supervisor -> helper (with ``pid``), and helper -> new supervisor (with ``negotiated``).

    ``fds`` describes, in order, the descriptors sent alongside with SCM_RIGHTS.
    """

    TYPE: ClassVar[str] = "state"
    agents: tuple[AgentRecord, ...]
    fds: tuple[FdDescriptor, ...]
    supervisor_version: str = ""
    pid: int = 0          # the old supervisor's pid (old -> helper only)
    negotiated: int = 0   # the protocol agreed at HELLO (helper -> new only)

    def to_wire(self) -> dict[str, Any]:
        d: dict[str, Any] = {"supervisor_version": self.supervisor_version,
                             "agents": [r.to_dict() for r in self.agents],
                             "fds": [f.to_wire() for f in self.fds]}
        if self.pid:
            d["pid"] = self.pid
        if self.negotiated:
            d["negotiated"] = self.negotiated
        return d

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> State:
        agents = []
        for a in _get(d, cls.TYPE, "agents", list):
            if not isinstance(a, dict):
                raise ProtocolError(f"an agent record must be an object, not {type(a).__name__}")
            try:
                agents.append(AgentRecord.from_dict(a))
            except (KeyError, TypeError, ValueError) as e:
                raise ProtocolError(f"malformed agent record in state: {e!r}") from None
        return cls(
            agents=tuple(agents),
            fds=tuple(FdDescriptor.from_wire(f) for f in _get(d, cls.TYPE, "fds", list)),
            supervisor_version=_get(d, cls.TYPE, "supervisor_version", str, ""),
            pid=_get(d, cls.TYPE, "pid", int, 0),
            negotiated=_get(d, cls.TYPE, "negotiated", int, 0),
        )


@dataclass(frozen=True)
class Exec:
    """helper -> old supervisor: the state is stored, exec now."""

    TYPE: ClassVar[str] = "exec"

    def to_wire(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Exec:
        return cls()


@dataclass(frozen=True)
class Hello:
    """new supervisor -> helper: who answers the announced handover."""

    TYPE: ClassVar[str] = "hello"
    version: str
    pid: int
    update_id: str

    def to_wire(self) -> dict[str, Any]:
        return {"version": self.version, "pid": self.pid, "update_id": self.update_id}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Hello:
        return cls(_get(d, cls.TYPE, "version", str), _get(d, cls.TYPE, "pid", int),
                   _get(d, cls.TYPE, "update_id", str))


@dataclass(frozen=True)
class Healthy:
    """new supervisor -> helper: every agent adopted, gRPC serving."""

    TYPE: ClassVar[str] = "healthy"
    version: str
    pid: int
    agents: Mapping[str, int] = field(default_factory=dict)  # agent name -> pid

    def to_wire(self) -> dict[str, Any]:
        return {"version": self.version, "pid": self.pid, "agents": dict(self.agents)}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Healthy:
        agents = _get(d, cls.TYPE, "agents", dict, {})
        if not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in agents.items()):
            raise ProtocolError("handover message 'healthy': 'agents' must map names to pids")
        return cls(_get(d, cls.TYPE, "version", str), _get(d, cls.TYPE, "pid", int), dict(agents))


@dataclass(frozen=True)
class Unhealthy:
    """new supervisor -> helper: why it must not be committed."""

    TYPE: ClassVar[str] = "unhealthy"
    reason: str
    version: str = ""
    pid: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {"reason": self.reason, "version": self.version, "pid": self.pid}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Unhealthy:
        return cls(_get(d, cls.TYPE, "reason", str), _get(d, cls.TYPE, "version", str, ""),
                   _get(d, cls.TYPE, "pid", int, 0))


@dataclass(frozen=True)
class Commit:
    """helper -> new supervisor: you are the supervisor now."""

    TYPE: ClassVar[str] = "commit"

    def to_wire(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Commit:
        return cls()


@dataclass(frozen=True)
class Refused:
    """either side: the protocol or the state is not acceptable, and why."""

    TYPE: ClassVar[str] = "refused"
    reason: str

    def to_wire(self) -> dict[str, Any]:
        return {"reason": self.reason}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Refused:
        return cls(_get(d, cls.TYPE, "reason", str))


Message = Prepare | State | Exec | Hello | Healthy | Unhealthy | Commit | Refused
MESSAGES: dict[str, type[Message]] = {m.TYPE: m for m in (Prepare, State, Exec, Hello, Healthy, Unhealthy, Commit,
                                                            Refused)}
M = TypeVar("M", Prepare, State, Exec, Hello, Healthy, Unhealthy, Commit, Refused)


@dataclass(frozen=True)
class Frame:
    """A decoded message and the protocol version its sender speaks (the highest it knows)."""

    protocol: int
    message: Message

    def expect(self, cls: type[M], waiting_for: str = "") -> M:
        """The message if it is a ``cls``, else ProtocolError naming both types."""
        if not isinstance(self.message, cls):
            raise ProtocolError(f"expected {waiting_for or cls.TYPE}, got {self.message.TYPE}")
        return self.message


def encode(msg: Message) -> bytes:
    """The one way a message becomes bytes: its fields, ``type`` and our highest ``protocol``."""
    return json.dumps({"protocol": PROTOCOL_VERSION, "type": msg.TYPE, **msg.to_wire()}).encode()


def decode(data: bytes) -> Frame:
    """The one way bytes become a message.

    Raises:
        ProtocolError: not a JSON object, no ``protocol`` integer, an unknown ``type``, or a field missing or
            of the wrong type (the negotiation of ``protocol`` is the caller's, see :func:`negotiate`).
    """
    try:
        d = json.loads(data)
    except ValueError:
        raise ProtocolError("handover message is not JSON") from None
    if not isinstance(d, dict):
        raise ProtocolError(f"handover message must be a JSON object, not {type(d).__name__}")
    kind = d.get("type")
    cls = MESSAGES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown handover message type {str(kind)[:64]!r}")
    protocol = _get(d, cls.TYPE, "protocol", int)
    return Frame(protocol, cls.from_wire(d))


def send(sock: socket.socket, msg: Message, fds: list[int] | None = None) -> None:
    data = encode(msg)
    if len(data) > MAX_MESSAGE_BYTES:
        raise HandoverError(f"handover message of {len(data)} bytes is too large")
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.sendall(data)


def recv(sock: socket.socket, timeout_s: float, waiting_for: str) -> tuple[Frame, list[int]]:
    """One decoded message and the fds that came with it (owned by the caller; closed here on any error)."""
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
    try:
        if not data:
            raise PeerGone(f"handover peer closed the connection while waiting for {waiting_for}")
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise HandoverError("handover message or its fds were truncated")
        return decode(data), fds
    except HandoverError:
        close_fds(fds)
        raise


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


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
