"""Update results the Manager has not acknowledged yet, delivered until it does.

The outbox is the journal itself: a final update without a ``reported`` marker
is unacknowledged. The marker is written durably only after the Manager's ack,
so a supervisor killed in between sends the result again on its next start, and
the Manager deduplicates by update id: the result arrives exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc

from baton.log import logger
from baton.pb import manager_pb2_grpc
from supervisor.manager_client import ManagerClient
from supervisor.updates import UpdateManager, update_result

RETRY_S = 0.5  # between attempts while a result is undelivered
IDLE_SCAN_S = 30.0  # between looks at the journal when everything was delivered


class ResultOutbox:
    def __init__(self, updates: UpdateManager, manager: ManagerClient, node_id: str) -> None:
        self.updates = updates
        self.manager = manager
        self.node_id = node_id
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="result-outbox")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        """Deliver at start, whenever a helper exits, and every RETRY_S while a delivery fails; else sleep.

        The journal is read only then: scanning it every RETRY_S cost an idle supervisor CPU for nothing.
        IDLE_SCAN_S is the bounded fallback should a settled result ever come without a helper's exit.
        """
        with self.updates.helper_exits() as woken:
            while True:
                woken.clear()  # before the scan: a helper exiting during it wakes the next one
                stub = self.manager.stub
                done = stub is not None and await self._deliver(stub)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), IDLE_SCAN_S if done else RETRY_S)

    async def _deliver(self, stub: manager_pb2_grpc.ManagerServiceStub) -> bool:
        """Send every unacknowledged result; False if one could not be delivered (the rest wait for the retry)."""
        for rec in self.updates.unreported():
            try:
                ack = await stub.ReportUpdateResult(update_result(rec, self.node_id),
                                                    timeout=self.manager.cfg.rpc_timeout_s)
            except grpc.aio.AioRpcError as e:
                logger.debug("result of update {} not delivered: {}", rec.update_id, e.code().name)
                if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    self.manager.call_failed()  # this replica is gone or stuck: try the next one
                return False
            self.updates.mark_reported(rec.update_id)
            logger.info("result of update {} delivered to the Manager{}", rec.update_id,
                        " (it had it already)" if ack.duplicate else "")
        return True
