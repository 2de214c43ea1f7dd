"""The agent channel: how a helper asks its supervisor to restart, stop or watch an agent, without gRPC.

An agent update's helper needs four things of the supervisor (restart, stop, the agent now, each change of
it); gRPC and protobuf would be a third of a helper's imports (tests/test_startup_rules.py). This
channel is newline-delimited JSON over ``<run_dir>/agents.sock`` (0600, peers checked by SO_PEERCRED: root
or the supervisor's own uid), one request per connection. The protocol is ``docs/protocols.md``, "Agent
channel"; this module is its one encoder and decoder on both sides.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from baton.errors import BatonError
from baton.states import AgentState

VERSION = 1
SOCKET_NAME = "agents.sock"
MAX_LINE_BYTES = 64 * 1024  # a request or a reply, newline included
HEARTBEAT_S = 0.1  # a watch sends the agent at least this often, changed or not

OPS = frozenset({"get", "restart", "stop", "watch"})

# Error codes of a refused request (``Reply.code``): what the caller should make of it.
NOT_FOUND = "not_found"  # no such agent
REFUSED = "refused"  # the agent cannot do it now (leaving the config, no process to stop): AgentError
BAD_REQUEST = "bad_request"  # not a request of this version
PERMISSION_DENIED = "permission_denied"  # the peer is neither root nor the supervisor's uid
UNAVAILABLE = "unavailable"  # this supervisor process is handing over or stopping: the next one answers


def socket_path(run_dir: Path) -> Path:
    return Path(run_dir) / SOCKET_NAME


class ChannelError(BatonError):
    """A line that is not a message of this protocol (the peer is not what it should be)."""


@dataclass(frozen=True)
class AgentView:
    """What the helper judges an agent by: the fields of ``common.AgentInfo`` it reads."""

    name: str
    state: AgentState
    pid: int = 0
    version: str = ""
    restarts: int = 0
    exit_status: int | None = None  # the last exit: a code, or -signal
    error: str = ""
    adopted: bool = False  # its process was started by an earlier supervisor process

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state.value, "pid": self.pid, "version": self.version,
                "restarts": self.restarts, "exit_status": self.exit_status, "error": self.error,
                "adopted": self.adopted}

    @classmethod
    def from_json(cls, d: Any) -> AgentView:
        if not isinstance(d, dict):
            raise ChannelError(f"an agent is an object, not {type(d).__name__}")
        try:
            exit_status = d.get("exit_status")
            view = cls(name=_typed(d, "name", str), state=AgentState(d.get("state")), pid=_typed(d, "pid", int),
                       version=_typed(d, "version", str), restarts=_typed(d, "restarts", int),
                       exit_status=None if exit_status is None else _typed(d, "exit_status", int),
                       error=_typed(d, "error", str), adopted=d.get("adopted") is True)
        except ValueError as e:
            raise ChannelError(f"agent: {e}") from None
        return view


@dataclass(frozen=True)
class Request:
    op: str
    agent: str

    def encode(self) -> bytes:
        return _line({"v": VERSION, "op": self.op, "agent": self.agent})

    @classmethod
    def decode(cls, line: bytes) -> Request:
        d = _object(line)
        if d.get("v") != VERSION:
            raise ChannelError(f"protocol version {d.get('v')!r} (this supervisor speaks {VERSION})")
        op, agent = d.get("op"), d.get("agent")
        if op not in OPS:
            raise ChannelError(f"unknown op {op!r} (one of {', '.join(sorted(OPS))})")
        if not isinstance(agent, str) or not agent:
            raise ChannelError("agent: a non-empty string")
        return cls(op=op, agent=agent)


@dataclass(frozen=True)
class Reply:
    """The agent after the request (``ok``), or why it was refused (``code``, ``error``)."""

    agent: AgentView | None = None
    code: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.code

    def encode(self) -> bytes:
        if self.ok:
            assert self.agent is not None
            return _line({"v": VERSION, "ok": True, "agent": self.agent.to_json()})
        return _line({"v": VERSION, "ok": False, "code": self.code, "error": self.error})

    @classmethod
    def decode(cls, line: bytes) -> Reply:
        d = _object(line)
        if d.get("v") != VERSION:
            raise ChannelError(f"reply of protocol version {d.get('v')!r}, expected {VERSION}")
        if d.get("ok") is True:
            return cls(agent=AgentView.from_json(d.get("agent")))
        code = d.get("code")
        if not isinstance(code, str) or not code:
            raise ChannelError("a refusal without a code")
        return cls(code=code, error=str(d.get("error", "")))


def _line(d: dict[str, Any]) -> bytes:
    out = json.dumps(d, separators=(",", ":")).encode() + b"\n"
    if len(out) > MAX_LINE_BYTES:
        raise ChannelError(f"a message of {len(out)} bytes (at most {MAX_LINE_BYTES})")
    return out


def _object(line: bytes) -> dict[str, Any]:
    if len(line) > MAX_LINE_BYTES or not line.endswith(b"\n"):
        raise ChannelError(f"not a line of at most {MAX_LINE_BYTES} bytes")
    try:
        d = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ChannelError(f"not JSON: {e}") from None
    if not isinstance(d, dict):
        raise ChannelError(f"a message is an object, not {type(d).__name__}")
    return d


def _typed(d: dict[str, Any], key: str, kind: type) -> Any:
    v = d.get(key)
    if not isinstance(v, kind) or isinstance(v, bool):
        raise ValueError(f"{key}: {kind.__name__}, not {type(v).__name__}")
    return v
