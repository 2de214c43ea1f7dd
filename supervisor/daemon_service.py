"""DaemonService: the supervisor's gRPC API, served with grpc.aio."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import AsyncIterator
from typing import Protocol

import grpc

from baton.pb import common_pb2, daemon_pb2, daemon_pb2_grpc
from baton.states import AgentState
from supervisor.agents import AgentSnapshot, ProcessManager, UnknownAgent


class UpdateManager(Protocol):
    """What DaemonService needs from the update side (supervisor/updates.py)."""

    async def push(self, request: daemon_pb2.UpdateRequest, context: grpc.aio.ServicerContext
                   ) -> daemon_pb2.UpdateAccepted: ...

    async def get(self, update_id: str, context: grpc.aio.ServicerContext) -> daemon_pb2.UpdateStatus: ...

    def watch(self, update_id: str, context: grpc.aio.ServicerContext) -> AsyncIterator[daemon_pb2.UpdateStatus]: ...

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
    )


@functools.cache
def _dependencies() -> dict[str, str]:
    from helper.release import dependency_versions

    return dependency_versions()


class DaemonService(daemon_pb2_grpc.DaemonServiceServicer):
    def __init__(self, node_id: str, version: str, started_at: float, pm: ProcessManager,
                 updates: UpdateManager | None, manager_connected: object = None) -> None:
        self.node_id = node_id
        self.version = version
        self.started_at = started_at
        self.pm = pm
        self.updates = updates
        self._manager_connected = manager_connected

    async def GetStatus(self, request: daemon_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> daemon_pb2.Status:
        connected = bool(getattr(self._manager_connected, "connected", False))
        return daemon_pb2.Status(
            node_id=self.node_id,
            supervisor_version=self.version,
            uptime_seconds=time.time() - self.started_at,
            agents=[agent_info(s) for s in self.pm.snapshots()],
            pid=os.getpid(),
            started_at=self.started_at,
            manager_connected=connected,
            dependencies=_dependencies(),
        )

    async def ListAgents(self, request: daemon_pb2.ListAgentsRequest, context: grpc.aio.ServicerContext
                         ) -> daemon_pb2.ListAgentsResponse:
        return daemon_pb2.ListAgentsResponse(agents=[agent_info(s) for s in self.pm.snapshots()])

    async def _agent(self, name: str, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        try:
            return self.pm.get(name)
        except UnknownAgent as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))

    async def StartAgent(self, request: daemon_pb2.AgentRef, context: grpc.aio.ServicerContext
    ) -> common_pb2.AgentInfo:
        agent = await self._agent(request.name, context)
        await agent.start()
        return agent_info(agent.snapshot())

    async def StopAgent(self, request: daemon_pb2.AgentRef, context: grpc.aio.ServicerContext
    ) -> common_pb2.AgentInfo:
        agent = await self._agent(request.name, context)
        await agent.stop()
        return agent_info(agent.snapshot())

    async def RestartAgent(self, request: daemon_pb2.AgentRef, context: grpc.aio.ServicerContext
    ) -> common_pb2.AgentInfo:
        agent = await self._agent(request.name, context)
        await agent.restart()
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
        return await self.updates.get(request.update_id, context)

    async def WatchUpdate(self, request: daemon_pb2.UpdateRef, context: grpc.aio.ServicerContext
                          ) -> AsyncIterator[daemon_pb2.UpdateStatus]:
        if self.updates is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "updates are not enabled on this supervisor")
        assert self.updates is not None
        async for status in self.updates.watch(request.update_id, context):
            yield status
