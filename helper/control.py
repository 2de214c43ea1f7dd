"""The helper's side of the supervisor: restart an agent and judge its health.

The supervisor owns the agent processes, so the helper never starts or kills an agent itself: it asks the
supervisor and watches what the supervisor reports. It asks over the agent channel (``baton/agent_channel.py``:
JSON lines on ``<run_dir>/agents.sock``), which needs none of gRPC's imports. A supervisor with no agent
channel (older than it) is asked over gRPC on its control socket, as helpers did before: that client is
imported only then.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

from baton import agent_channel
from baton.agent_channel import NOT_FOUND, UNAVAILABLE, AgentView, ChannelError, Reply, Request
from baton.reasons import FailureReason
from baton.states import AgentState
from helper.control_errors import HealthCheckFailed, SupervisorUnavailable

POLL_S = 0.1  # the fallback poll, and how often a watch reports at least (its heartbeat)
WATCH_MARGIN_S = 5.0  # the stream's deadline beyond the health wait's own, which is checked first
RECONNECT_S = 0.05  # between attempts to open a watch again while the supervisor is being replaced
NOT_READY_YET = (AgentState.BACKOFF, AgentState.FATAL, AgentState.EXITED, AgentState.STOPPED)

__all__ = ["HealthCheckFailed", "SupervisorControl", "SupervisorUnavailable"]


class _NoChannel(Exception):
    """Nothing listens on the agent channel's path: a supervisor without it, or none at all."""


class SupervisorControl:
    def __init__(self, socket_path: Path, rpc_timeout_s: float = 30.0, agent_socket: Path | None = None) -> None:
        """``socket_path``: the control socket (gRPC); ``agent_socket``: default, beside it in the run directory."""
        self.socket_path = Path(socket_path)
        self.target = f"unix:{socket_path}"
        self.agent_socket = agent_socket or agent_channel.socket_path(self.socket_path.parent)
        self.rpc_timeout_s = rpc_timeout_s
        self._grpc: _GrpcControl | None = None  # set once the agent channel is found missing

    def close(self) -> None:
        if self._grpc is not None:
            self._grpc.close()

    def _fallback(self) -> _GrpcControl:
        if self._grpc is None:
            self._grpc = _GrpcControl(self.target, self.rpc_timeout_s)
        return self._grpc

    # ---- the agent channel -------------------------------------------------------------------------------

    def _connect(self, timeout_s: float) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.settimeout(timeout_s)
        try:
            s.connect(str(self.agent_socket))
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            raise _NoChannel from None
        except BaseException:
            s.close()
            raise
        return s

    def _ask(self, op: str, name: str) -> AgentView:
        """One request; the gRPC client for this and every later call when there is no agent channel."""
        if self._grpc is None:
            try:
                with self._connect(self.rpc_timeout_s) as s, s.makefile("rb") as lines:
                    s.sendall(Request(op=op, agent=name).encode())
                    reply = _read_reply(lines)
                    if reply is not None and reply.code == UNAVAILABLE:
                        raise _NoChannel  # a handover: over gRPC, the call waits for the next process
            except _NoChannel:
                pass
            except (OSError, ChannelError) as e:
                raise SupervisorUnavailable(f"supervisor at {self.agent_socket}: {op} {name} failed: {e}") from None
            else:
                if reply is None:
                    raise SupervisorUnavailable(f"supervisor at {self.agent_socket}: {op} {name}: no answer")
                return _agent_of(reply, op, name, self.agent_socket)
        return self._fallback().ask(op, name)

    def reachable(self) -> bool:
        return self._fallback().reachable()

    def agent(self, name: str) -> AgentView:
        return self._ask("get", name)

    def restart(self, name: str) -> AgentView:
        return self._ask("restart", name)

    def stop(self, name: str) -> AgentView:
        return self._ask("stop", name)

    def watch(self, name: str, timeout_s: float) -> Generator[AgentView, None, None]:
        """The agent at once, on every change and at least every POLL_S, for up to ``timeout_s``.

        The supervisor pushes each change as it makes it. A watch that breaks after it has answered (the
        supervisor replacing itself: the next process binds the channel again) is opened again within
        ``timeout_s``. With no agent channel from the start, the gRPC client watches instead.
        """
        deadline = time.monotonic() + timeout_s
        answered = False
        while self._grpc is None:
            try:
                with self._connect(max(0.1, deadline - time.monotonic())) as s, s.makefile("rb") as lines:
                    s.sendall(Request(op="watch", agent=name).encode())
                    while (reply := _read_reply(lines)) is not None:
                        if reply.code == UNAVAILABLE:
                            raise _NoChannel  # a handover: the next process, or gRPC if none answers yet
                        answered = True
                        yield _agent_of(reply, "watch", name, self.agent_socket)
                        s.settimeout(max(0.1, deadline - time.monotonic()))
            except _NoChannel:
                if not answered:
                    break  # no channel: gRPC below
            except (OSError, ChannelError) as e:
                if not answered or time.monotonic() >= deadline:
                    raise SupervisorUnavailable(f"supervisor at {self.agent_socket}: watch {name} failed: "
                                                f"{e or type(e).__name__}") from None
            if not answered:
                raise SupervisorUnavailable(f"supervisor at {self.agent_socket}: watch {name} ended early")
            if time.monotonic() >= deadline:
                raise SupervisorUnavailable(f"supervisor at {self.agent_socket}: no answer about agent {name} in "
                                            f"{timeout_s:g}s")
            time.sleep(RECONNECT_S)  # broken or closed by a supervisor going away: the next one answers
        yield from self._fallback().watch(name, deadline)

    def wait_healthy(self, name: str, version: str, ready_timeout_s: float, window_s: float,
                     check: Callable[[], None] | None = None) -> AgentView:
        """Ready (READY=1 or start_seconds) within ``ready_timeout_s``, then up for ``window_s`` with one pid.

        Judged on every change the supervisor reports (:meth:`watch`), so readiness is seen as it happens;
        ``check`` runs at every report (at least every POLL_S); whatever it raises (a cancel) ends the wait.

        Raises:
            HealthCheckFailed: with what was seen (state, exit status, last error).
            SupervisorUnavailable: the supervisor did not answer.
        """
        check = check or (lambda: None)
        deadline = time.monotonic() + ready_timeout_s
        ready: AgentView | None = None
        window_end = 0.0
        with contextlib.closing(self.watch(name, ready_timeout_s + window_s + WATCH_MARGIN_S)) as reports:
            for a in reports:
                check()
                if ready is None:
                    if a.version != version and a.pid:
                        raise HealthCheckFailed(f"agent {name} runs version {a.version!r}, expected {version!r}")
                    if a.state in NOT_READY_YET:
                        raise HealthCheckFailed(f"agent {name} {version} is {a.state.value} before it was ready: "
                                                f"{_describe(a)}", FailureReason.NEW_VERSION_EXITED)
                    if a.state is not AgentState.RUNNING:
                        if time.monotonic() > deadline:
                            raise HealthCheckFailed(f"agent {name} {version} not ready within {ready_timeout_s:g}s "
                                                    f"(still {a.state.value})")
                        continue
                    ready, window_end = a, time.monotonic() + window_s
                elif a.state is not AgentState.RUNNING or a.pid != ready.pid or a.restarts != ready.restarts:
                    raise HealthCheckFailed(f"agent {name} {version} died within the {window_s:g}s health window: "
                                            f"{a.state.value}, {_describe(a)}", FailureReason.NEW_VERSION_EXITED)
                if time.monotonic() >= window_end:
                    return a
        raise SupervisorUnavailable(f"supervisor at {self.target}: the watch of agent {name} ended")  # not reached


def _read_reply(lines: Any) -> Reply | None:
    """The next reply, or None at the end of the stream."""
    line = lines.readline(agent_channel.MAX_LINE_BYTES + 1)
    return Reply.decode(line) if line else None


def _agent_of(reply: Reply, op: str, name: str, where: Path) -> AgentView:
    if reply.agent is not None:
        return reply.agent
    if reply.code == NOT_FOUND:
        raise SupervisorUnavailable(f"the supervisor does not know agent {name!r}")
    raise SupervisorUnavailable(f"supervisor at {where}: {op} {name} refused ({reply.code}): {reply.error}")


def _describe(a: AgentView) -> str:
    parts = []
    if a.exit_status is not None:
        parts.append(f"last exit status {a.exit_status}")
    if a.error:
        parts.append(a.error)
    return "; ".join(parts) or "no exit status"


class _GrpcControl:
    """The same questions over gRPC (DaemonService on the control socket), for a supervisor without the channel."""

    def __init__(self, target: str, rpc_timeout_s: float) -> None:
        import grpc

        from baton.pb import daemon_pb2_grpc

        self.target = target
        self.rpc_timeout_s = rpc_timeout_s
        self._channel = grpc.insecure_channel(target)
        self._stub = daemon_pb2_grpc.DaemonServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def reachable(self) -> bool:
        import grpc

        from baton.pb import daemon_pb2

        try:
            self._stub.GetStatus(daemon_pb2.GetStatusRequest(), timeout=2.0)
            return True
        except grpc.RpcError:
            return False

    def ask(self, op: str, name: str) -> AgentView:
        import grpc

        from baton.pb import daemon_pb2

        try:
            if op == "get":
                resp = self._stub.ListAgents(daemon_pb2.ListAgentsRequest(), timeout=self.rpc_timeout_s)
                for a in resp.agents:
                    if a.name == name:
                        return _view(a)
                raise SupervisorUnavailable(f"the supervisor does not know agent {name!r}")
            method = {"restart": self._stub.RestartAgent, "stop": self._stub.StopAgent}[op]
            return _view(method(daemon_pb2.AgentRef(name=name), timeout=self.rpc_timeout_s))
        except grpc.RpcError as e:
            raise SupervisorUnavailable(
                f"supervisor at {self.target}: {op} {name} failed: {e.code().name} {e.details()}"
            ) from None

    def watch(self, name: str, deadline: float) -> Generator[AgentView, None, None]:
        """WatchAgent, opened again after a break once it has answered; ListAgents every POLL_S without it."""
        import grpc

        from baton.pb import daemon_pb2

        ref = daemon_pb2.AgentRef(name=name)
        answered = False
        while True:
            call = self._stub.WatchAgent(ref, timeout=max(0.1, deadline - time.monotonic()), wait_for_ready=answered)
            try:
                for info in call:
                    answered = True
                    yield _view(info)
            except grpc.RpcError as e:
                code = e.code()
                if code == grpc.StatusCode.UNIMPLEMENTED:
                    break
                if not (answered and code == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline):
                    raise SupervisorUnavailable(
                        f"supervisor at {self.target}: WatchAgent {name} failed: {code.name} {e.details()}"
                    ) from None
            else:
                raise SupervisorUnavailable(f"supervisor at {self.target}: WatchAgent {name} ended early")
            finally:
                call.cancel()
        while time.monotonic() < deadline:
            yield self.ask("get", name)
            time.sleep(POLL_S)
        raise SupervisorUnavailable(f"supervisor at {self.target}: no answer about agent {name} in time")


def _view(info: Any) -> AgentView:
    """A ``common.AgentInfo`` as the channel would have said it."""
    from baton.pb import common_pb2

    state = common_pb2.AgentState.Name(info.state).removeprefix("AGENT_STATE_").lower()
    return AgentView(name=info.name, state=AgentState(state), pid=info.pid, version=info.version,
                     restarts=info.restarts, exit_status=info.last_exit_status if info.has_exit_status else None,
                     error=info.last_error, adopted=info.adopted)
