"""The Manager client's registration, in-process with a stand-in stub (supervisor/manager_client.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from baton.config import ManagerConfig
from baton.pb import manager_pb2
from supervisor.manager_client import ManagerClient


class ChangeDuringRegister:
    """A Manager stub whose Register lets an agent change while the call is under way."""

    def __init__(self, client: ManagerClient) -> None:
        self.client = client

    async def Register(self, request: Any, timeout: float) -> manager_pb2.RegisterResponse:
        self.client.agents_changed()  # e.g. the agent became ready between the snapshot and the answer
        return manager_pb2.RegisterResponse(heartbeat_interval_seconds=60)


def test_an_agent_change_while_register_is_under_way_is_left_for_a_sync():
    async def run() -> bool:
        client = ManagerClient(ManagerConfig(address="127.0.0.1:1"), "node-1", "1.0.0", 0.0, agents=list)
        client._stub = ChangeDuringRegister(client)  # type: ignore[assignment]
        await client._register()
        return client._dirty.is_set()

    assert asyncio.run(run()), "the change made after the snapshot is still to be synced"
