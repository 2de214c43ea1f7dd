"""The helper's side of the supervisor: restart an agent and judge its health.

The supervisor owns the agent processes, so the helper never starts or kills
an agent itself: it asks the supervisor over its private control socket and
watches what the supervisor reports.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Generator
from pathlib import Path

import grpc

from baton.pb import common_pb2, daemon_pb2, daemon_pb2_grpc
from baton.reasons import FailureReason
from helper.control_errors import HealthCheckFailed, SupervisorUnavailable

POLL_S = 0.1  # the fallback poll, and how often WatchAgent reports at least (its heartbeat)
WATCH_MARGIN_S = 5.0  # the stream's deadline beyond the health wait's own, which is checked first

__all__ = ["HealthCheckFailed", "SupervisorControl", "SupervisorUnavailable", "state_name"]


def state_name(state: int) -> str:
    return common_pb2.AgentState.Name(state).removeprefix("AGENT_STATE_").lower()  # type: ignore[arg-type]


class SupervisorControl:
    def __init__(self, socket_path: Path, rpc_timeout_s: float = 30.0) -> None:
        self.target = f"unix:{socket_path}"
        self.rpc_timeout_s = rpc_timeout_s
        self._channel = grpc.insecure_channel(self.target)
        self._stub = daemon_pb2_grpc.DaemonServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: str, request: object) -> object:
        try:
            return getattr(self._stub, method)(request, timeout=self.rpc_timeout_s)
        except grpc.RpcError as e:
            raise SupervisorUnavailable(
                f"supervisor at {self.target}: {method} failed: {e.code().name} {e.details()}"
            ) from None

    def reachable(self) -> bool:
        try:
            self._stub.GetStatus(daemon_pb2.GetStatusRequest(), timeout=2.0)
            return True
        except grpc.RpcError:
            return False

    def agent(self, name: str) -> common_pb2.AgentInfo:
        resp = self._call("ListAgents", daemon_pb2.ListAgentsRequest())
        for a in resp.agents:  # type: ignore[attr-defined]
            if a.name == name:
                return a
        raise SupervisorUnavailable(f"the supervisor does not know agent {name!r}")

    def restart(self, name: str) -> common_pb2.AgentInfo:
        return self._call("RestartAgent", daemon_pb2.AgentRef(name=name))  # type: ignore[return-value]

    def stop(self, name: str) -> common_pb2.AgentInfo:
        return self._call("StopAgent", daemon_pb2.AgentRef(name=name))  # type: ignore[return-value]

    def watch(self, name: str, timeout_s: float) -> Generator[common_pb2.AgentInfo, None, None]:
        """The agent at once, on every change and at least every POLL_S, for up to ``timeout_s``.

        ``WatchAgent`` (contract version 3) pushes each change as the supervisor makes it. A stream that breaks
        after it has answered (the supervisor replacing itself: its sockets are handed over, so the next process
        answers) is opened again, waiting for the channel, within ``timeout_s``. A supervisor without the method
        (UNIMPLEMENTED) is polled with ListAgents every POLL_S instead.
        """
        deadline = time.monotonic() + timeout_s
        ref = daemon_pb2.AgentRef(name=name)
        answered = False
        while True:
            call = self._stub.WatchAgent(ref, timeout=max(0.1, deadline - time.monotonic()), wait_for_ready=answered)
            try:
                for info in call:
                    answered = True
                    yield info
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
            yield self.agent(name)
            time.sleep(POLL_S)
        raise SupervisorUnavailable(f"supervisor at {self.target}: no answer about agent {name} in {timeout_s:g}s")

    def wait_healthy(self, name: str, version: str, ready_timeout_s: float, window_s: float,
                     check: Callable[[], None] | None = None) -> common_pb2.AgentInfo:
        """Ready (READY=1 or start_seconds) within ``ready_timeout_s``, then up for ``window_s`` with one pid.

        Judged on every change the supervisor reports (:meth:`watch`), so readiness is seen as it happens;
        ``check`` runs at every report (at least every POLL_S); whatever it raises (a cancel) ends the wait.

        Raises:
            HealthCheckFailed: with what was seen (state, exit status, last error).
            SupervisorUnavailable: the supervisor did not answer.
        """
        check = check or (lambda: None)
        deadline = time.monotonic() + ready_timeout_s
        ready: common_pb2.AgentInfo | None = None
        window_end = 0.0
        with contextlib.closing(self.watch(name, ready_timeout_s + window_s + WATCH_MARGIN_S)) as reports:
            for a in reports:
                check()
                if ready is None:
                    if a.version != version and a.pid:
                        raise HealthCheckFailed(f"agent {name} runs version {a.version!r}, expected {version!r}")
                    if a.state in (common_pb2.AGENT_STATE_BACKOFF, common_pb2.AGENT_STATE_FATAL,
                                   common_pb2.AGENT_STATE_EXITED, common_pb2.AGENT_STATE_STOPPED):
                        raise HealthCheckFailed(f"agent {name} {version} is {state_name(a.state)} before it was ready: "
                                                f"{_describe(a)}", FailureReason.NEW_VERSION_EXITED)
                    if a.state != common_pb2.AGENT_STATE_RUNNING:
                        if time.monotonic() > deadline:
                            raise HealthCheckFailed(f"agent {name} {version} not ready within {ready_timeout_s:g}s "
                                                    f"(still {state_name(a.state)})")
                        continue
                    ready, window_end = a, time.monotonic() + window_s
                elif a.state != common_pb2.AGENT_STATE_RUNNING or a.pid != ready.pid or a.restarts != ready.restarts:
                    raise HealthCheckFailed(f"agent {name} {version} died within the {window_s:g}s health window: "
                                            f"{state_name(a.state)}, {_describe(a)}", FailureReason.NEW_VERSION_EXITED)
                if time.monotonic() >= window_end:
                    return a
        raise SupervisorUnavailable(f"supervisor at {self.target}: the watch of agent {name} ended")  # not reached


def _describe(a: common_pb2.AgentInfo) -> str:
    parts = []
    if a.has_exit_status:
        parts.append(f"last exit status {a.last_exit_status}")
    if a.last_error:
        parts.append(a.last_error)
    return "; ".join(parts) or "no exit status"
