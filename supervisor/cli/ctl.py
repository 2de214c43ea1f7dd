"""The operator's commands against a running supervisor, over its local Unix socket.

``supervisor status|start|stop|restart|signal|tail|clear|reload`` each open one
channel to ``grpc.unix_socket`` (the peer is checked with SO_PEERCRED there),
print a human line per agent by default or JSON with ``--json``, and turn an
unreachable supervisor into one line on stderr and exit 1 (never raw gRPC text).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from baton.errors import BatonError
from baton.pb import common_pb2, daemon_pb2, daemon_pb2_grpc
from baton.strict_modes import Kind, Trusted, UnsafePath, check_trusted

EXIT_FAILED = 1
SETTLED = frozenset({common_pb2.AGENT_STATE_RUNNING, common_pb2.AGENT_STATE_STOPPED, common_pb2.AGENT_STATE_EXITED,
                     common_pb2.AGENT_STATE_FATAL, common_pb2.AGENT_STATE_BACKOFF})
POLL_S = 0.1


class CtlError(BatonError):
    """A command failed; the message is the one line printed."""


def state_name(state: int) -> str:
    return common_pb2.AgentState.Name(common_pb2.AgentState.ValueType(state)).removeprefix("AGENT_STATE_").lower()


def to_json(msg: Message) -> dict[str, Any]:
    """Every field, zeros and empty strings included (a script must not guess at absent keys)."""
    return MessageToDict(msg, always_print_fields_with_no_presence=True)


def checked_socket(path: Path, key: str) -> Path:
    """As root, refuse a socket in a directory another user could change: they could have moved the
    supervisor's socket aside and be listening in its place (``baton/strict_modes.py``, the daemon's rule)."""
    if os.geteuid() == 0:
        try:
            check_trusted(Trusted(key, path.parent, Kind.DIR))
        except UnsafePath as e:
            raise CtlError(f"refusing to talk to {path}: {e}") from None
    return path


class Client:
    """One channel to the supervisor's Unix socket; gRPC errors become :class:`CtlError` with one line."""

    def __init__(self, socket_path: Path, timeout: float) -> None:
        self.path = socket_path
        self.timeout = timeout
        self.channel = grpc.insecure_channel(f"unix:{socket_path}")
        self.stub = daemon_pb2_grpc.DaemonServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def unreachable(self, e: grpc.RpcError) -> CtlError:
        if not self.path.exists():
            why = "no socket there: is the supervisor running?"
        elif not os.access(self.path, os.R_OK | os.W_OK):
            why = "permission denied (run as root, the supervisor's user, or grpc.unix_socket_group)"
        else:
            why = f"it does not answer ({e.code().name.lower()}): not running, or this user is not allowed"
        return CtlError(f"cannot reach the supervisor at {self.path}: {why}")

    def call(self, method: str, request: Message, timeout: float | None = None) -> Any:
        try:
            return getattr(self.stub, method)(request, timeout=timeout or self.timeout)
        except grpc.RpcError as e:
            raise self.error(e) from None

    def error(self, e: grpc.RpcError) -> CtlError:
        if e.code() == grpc.StatusCode.UNAVAILABLE or (e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                                                       and not self.path.exists()):
            return self.unreachable(e)
        if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return CtlError(f"no answer from the supervisor at {self.path} in time (raise --timeout or --wait)")
        return CtlError(e.details() or e.code().name)

    def agents(self) -> list[common_pb2.AgentInfo]:
        return list(self.call("ListAgents", daemon_pb2.ListAgentsRequest()).agents)

    def names(self, wanted: list[str]) -> list[str]:
        """``all`` means every agent; unknown names are refused before anything is done."""
        known = [a.name for a in self.agents()]
        if wanted == ["all"]:
            return known
        unknown = [n for n in wanted if n not in known]
        if unknown:
            raise CtlError(f"unknown agent {unknown[0]!r} (known: {', '.join(known) or 'none'})")
        return wanted

    def wait_settled(self, name: str, timeout: float, done: Callable[[common_pb2.AgentInfo], bool]
                     ) -> common_pb2.AgentInfo:
        """Poll until the agent's state settles (not starting/stopping) and ``done`` holds, or the timeout."""
        deadline = time.monotonic() + timeout
        while True:
            info = next(a for a in self.agents() if a.name == name)
            if (info.state in SETTLED and done(info)) or time.monotonic() >= deadline:
                return info
            time.sleep(POLL_S)


@contextmanager
def client(socket_path: Path, timeout: float) -> Iterator[Client]:
    c = Client(socket_path, timeout)
    try:
        yield c
    finally:
        c.close()


def describe(a: common_pb2.AgentInfo) -> str:
    """``web: running (pid 1234)``, ``web: fatal (exited with status 3 ...)``, printable."""
    from baton.text import printable

    text = f"{a.name}: {state_name(a.state)}"
    if a.pid:
        text += f" (pid {a.pid})"
    if a.state in (common_pb2.AGENT_STATE_FATAL, common_pb2.AGENT_STATE_BACKOFF, common_pb2.AGENT_STATE_EXITED) \
            and a.last_error:
        text += f": {a.last_error}"
    return printable(text)


def emit(results: list[common_pb2.AgentInfo], as_json: bool) -> None:
    if as_json:
        import json

        print(json.dumps([to_json(a) for a in results], indent=2))
    else:
        for a in results:
            print(describe(a))


def control(c: Client, action: str, names: list[str], wait_s: float, signal: str = "") -> tuple[
        list[common_pb2.AgentInfo], bool]:
    """Run ``action`` on each agent and wait for its new state; (final infos, all reached what was asked)."""
    out: list[common_pb2.AgentInfo] = []
    ok = True
    chosen = c.names(names)  # `all`: in the agents' start order (the supervisor lists them so)
    backwards = action == "stop" and names == ["all"]  # stopped in the reverse of that order
    if backwards:
        chosen.reverse()
    for name in chosen:
        ref = daemon_pb2.AgentRef(name=name)
        if action == "stop":
            info = c.call("StopAgent", ref, timeout=max(wait_s, c.timeout))
            info = c.wait_settled(name, wait_s, lambda a: True)
            ok &= info.state == common_pb2.AGENT_STATE_STOPPED
        elif action == "signal":
            c.call("SignalAgent", daemon_pb2.SignalRequest(name=name, signal=signal))
            time.sleep(POLL_S)
            info = c.wait_settled(name, wait_s, lambda a: True)
        else:  # the RPC returns once the new process is spawned (STARTING): wait for it to be ready or fail
            c.call("StartAgent" if action == "start" else "RestartAgent", ref, timeout=max(wait_s, c.timeout))
            info = c.wait_settled(name, wait_s, lambda a: True)
            ok &= info.state == common_pb2.AGENT_STATE_RUNNING
        out.append(info)
    if backwards:
        out.reverse()  # printed in the order `status` lists them, whatever order they were stopped in
    return out, ok
