"""DaemonService: the supervisor's gRPC API, served with grpc.aio."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import grpc

from baton.config import ConfigError
from baton.holds import Holds
from baton.pb import common_pb2, daemon_pb2, daemon_pb2_grpc
from baton.reasons import without_output
from baton.states import AgentState
from supervisor.agents import AgentError, AgentSnapshot, ProcessManager, UnknownAgent, parse_signal
from supervisor.authz import Policy

TAIL_MAX_LINES = 10_000
WATCH_AGENT_HEARTBEAT_S = 0.1  # WatchAgent sends the agent at least this often (daemon.proto)


class UpdateManager(Protocol):
    """What DaemonService needs from the update side (supervisor/updates.py)."""

    async def push(self, request: daemon_pb2.UpdateRequest, context: grpc.aio.ServicerContext
                   ) -> daemon_pb2.UpdateAccepted: ...

    async def get(self, update_id: str, context: grpc.aio.ServicerContext) -> daemon_pb2.UpdateStatus: ...

    def watch(self, update_id: str, context: grpc.aio.ServicerContext) -> AsyncIterator[daemon_pb2.UpdateStatus]: ...

    async def cancel(self, update_id: str, context: grpc.aio.ServicerContext) -> daemon_pb2.UpdateStatus: ...
    async def recent(self, limit: int, component: str) -> daemon_pb2.ListUpdatesResponse: ...

    def refused_because(self) -> str: ...

DEFAULT_LIST_LIMIT = 50
MAX_LIST_LIMIT = 1000

_AGENT_STATE_PB = {s: getattr(common_pb2, f"AGENT_STATE_{s.name}") for s in AgentState}


def agent_info(s: AgentSnapshot) -> common_pb2.AgentInfo:
    return common_pb2.AgentInfo(
        name=s.name,
        state=_AGENT_STATE_PB[s.state],
        pid=s.pid,
        start_time=s.start_time,
        restarts=s.restarts,
        has_exit_status=s.last_exit_status is not None,
        last_exit_status=s.last_exit_status or 0,
        version=s.version,
        last_error=s.last_error,
        adopted=s.adopted,
        last_exit_signal=s.last_exit_signal,
        kept=s.kept,
        log_path=s.log_path,
    )


@functools.cache
def _dependencies() -> dict[str, str]:
    from baton.dependencies import dependency_versions

    return dependency_versions()


class DaemonService(daemon_pb2_grpc.DaemonServiceServicer):
    def __init__(self, node_id: str, version: str, started_at: float, pm: ProcessManager,
                 updates: UpdateManager | None, manager_connected: object = None,
                 reload: Callable[[], Awaitable[Any]] | None = None,
                 state_dir: Path | None = None, policy: Policy | None = None) -> None:
        self.node_id = node_id
        self.version = version
        self.started_at = started_at
        self.pm = pm
        self.updates = updates
        self._manager_connected = manager_connected
        self._reload = reload
        self._holds = Holds(state_dir) if state_dir is not None else None
        self.policy = policy or Policy(())  # without one: only the Unix socket's callers may operate

    def _shown(self, status: daemon_pb2.UpdateStatus, context: grpc.aio.ServicerContext) -> daemon_pb2.UpdateStatus:
        """``status`` as this caller may see it: a failed version's last output (``last_log`` and its quote in
        ``error``) only for a caller allowed to operate (``Policy.may_operate``); it may have printed a secret."""
        if not status.last_log or self.policy.context_may_operate(context):
            return status
        shown = daemon_pb2.UpdateStatus()
        shown.CopyFrom(status)
        shown.error = without_output(status.error, status.last_log)
        shown.last_log = ""
        return shown

    async def GetStatus(self, request: daemon_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> daemon_pb2.Status:
        connected = bool(getattr(self._manager_connected, "connected", False))
        offset, measured_at = getattr(self._manager_connected, "manager_clock", (0.0, 0.0))
        return daemon_pb2.Status(
            node_id=self.node_id,
            supervisor_version=self.version,
            uptime_seconds=time.time() - self.started_at,
            agents=[agent_info(s) for s in self.pm.snapshots()],
            pid=os.getpid(),
            started_at=self.started_at,
            manager_connected=connected,
            manager_configured=bool(getattr(self._manager_connected, "manager_configured", False)),
            holds=[daemon_pb2.ComponentHold(component=h.component, reason=h.reason, since=h.since)
                   for h in (self._holds.all() if self._holds is not None else [])],
            dependencies=_dependencies(),
            manager_clock_offset_s=offset,
            manager_clock_measured_at=measured_at,
            updates_refused=self.updates.refused_because() if self.updates is not None else "",
        )

    async def ListAgents(self, request: daemon_pb2.ListAgentsRequest, context: grpc.aio.ServicerContext
                         ) -> daemon_pb2.ListAgentsResponse:
        return daemon_pb2.ListAgentsResponse(agents=[agent_info(s) for s in self.pm.snapshots()])

    async def WatchAgent(self, request: daemon_pb2.AgentRef, context: grpc.aio.ServicerContext
                         ) -> AsyncIterator[common_pb2.AgentInfo]:
        """The agent now, then on each change it goes through, with a heartbeat (daemon.proto, contract 3).

        Woken by the process manager's change listener, so a helper waiting for READY=1 learns of it in the
        same event-loop turn rather than at its next poll; the heartbeat bounds any wait on a missed event.
        """
        try:
            async with contextlib.aclosing(self.pm.watch(request.name, WATCH_AGENT_HEARTBEAT_S)) as changes:
                async for snap in changes:
                    yield agent_info(snap)
        except UnknownAgent as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))

    async def _agent(self, name: str, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        try:
            return self.pm.get(name)
        except UnknownAgent as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))

    async def StartAgent(self, request: daemon_pb2.AgentRef, context: grpc.aio.ServicerContext
    ) -> common_pb2.AgentInfo:
        agent = await self._agent(request.name, context)
        try:
            await agent.start()
        except AgentError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        return agent_info(agent.snapshot())

    async def StopAgent(self, request: daemon_pb2.AgentRef, context: grpc.aio.ServicerContext
    ) -> common_pb2.AgentInfo:
        agent = await self._agent(request.name, context)
        await agent.stop()
        return agent_info(agent.snapshot())

    async def RestartAgent(self, request: daemon_pb2.AgentRef, context: grpc.aio.ServicerContext
    ) -> common_pb2.AgentInfo:
        agent = await self._agent(request.name, context)
        try:
            await agent.restart()
        except AgentError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        return agent_info(agent.snapshot())

    async def PushUpdate(self, request: daemon_pb2.UpdateRequest, context: grpc.aio.ServicerContext
                         ) -> daemon_pb2.UpdateAccepted:
        if self.updates is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "updates are not enabled on this supervisor")
        assert self.updates is not None
        return await self.updates.push(request, context)

    async def GetUpdate(self, request: daemon_pb2.UpdateRef, context: grpc.aio.ServicerContext
    ) -> daemon_pb2.UpdateStatus:
        if self.updates is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "updates are not enabled on this supervisor")
        assert self.updates is not None
        return self._shown(await self.updates.get(request.update_id, context), context)

    async def WatchUpdate(self, request: daemon_pb2.UpdateRef, context: grpc.aio.ServicerContext
                          ) -> AsyncIterator[daemon_pb2.UpdateStatus]:
        if self.updates is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "updates are not enabled on this supervisor")
        assert self.updates is not None
        async for status in self.updates.watch(request.update_id, context):
            yield self._shown(status, context)

    async def CancelUpdate(self, request: daemon_pb2.UpdateRef, context: grpc.aio.ServicerContext
                           ) -> daemon_pb2.UpdateStatus:
        if self.updates is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "updates are not enabled on this supervisor")
        assert self.updates is not None
        return await self.updates.cancel(request.update_id, context)

    # ---- contract version 2: the operator's methods (supervisor signal|tail|clear|reload) ---------------

    async def SignalAgent(self, request: daemon_pb2.SignalRequest, context: grpc.aio.ServicerContext
                          ) -> common_pb2.AgentInfo:
        agent = await self._agent(request.name, context)
        try:
            agent.send_signal(parse_signal(request.signal))
        except AgentError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        return agent_info(agent.snapshot())

    async def TailLog(self, request: daemon_pb2.TailRequest, context: grpc.aio.ServicerContext
                      ) -> AsyncIterator[daemon_pb2.LogChunk]:
        agent = await self._agent(request.name, context)
        try:
            log = agent.log_for(request.stderr)
        except AgentError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
            return
        # Drained before the queue exists: what is drained now goes into the log, which the head is read from,
        # and not also into the queue, which would show it twice. Nothing can run between these lines: the head
        # is the file as it is here (opened and measured), its bytes read after; what comes later is the queue's.
        agent.flush_output()
        queue = agent.follow(request.stderr) if request.follow else None
        head_read = log.last_lines(min(request.lines, TAIL_MAX_LINES))  # the file as it is now, read below
        try:
            head = await head_read
            if head:
                yield daemon_pb2.LogChunk(data=head)
            while queue is not None:
                data = await queue.get()
                if data is None:
                    return
                yield daemon_pb2.LogChunk(data=data)
        finally:
            if queue is not None:
                agent.unfollow(queue)

    async def ClearLog(self, request: daemon_pb2.ClearLogRequest, context: grpc.aio.ServicerContext
                       ) -> daemon_pb2.ClearLogResponse:
        agent = await self._agent(request.name, context)
        try:
            removed = agent.log_for(request.stderr).clear()
        except AgentError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        return daemon_pb2.ClearLogResponse(bytes_removed=removed)

    async def Reload(self, request: daemon_pb2.ReloadRequest, context: grpc.aio.ServicerContext
                     ) -> daemon_pb2.ReloadResponse:
        if self._reload is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this supervisor cannot reload")
        assert self._reload is not None
        try:
            done = await asyncio.shield(self._reload())  # a client that goes away does not cut a reload short
        except ConfigError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"config error: {e}; the running config stays")
        r = done.agents
        return daemon_pb2.ReloadResponse(started=r.started, stopped=r.stopped, restarted=r.restarted,
                                         unchanged=r.unchanged, not_applied=done.not_applied, tls=done.tls,
                                         tls_kept_old=done.tls_kept_old)

    async def ListUpdates(self, request: daemon_pb2.ListUpdatesRequest, context: grpc.aio.ServicerContext
                          ) -> daemon_pb2.ListUpdatesResponse:
        if self.updates is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "updates are not enabled on this supervisor")
        assert self.updates is not None
        limit = min(request.limit or DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT)
        recent = await self.updates.recent(limit, request.component)
        return daemon_pb2.ListUpdatesResponse(updates=[self._shown(u, context) for u in recent.updates])
