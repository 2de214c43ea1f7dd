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
from supervisor.manager_client import ManagerClient
from supervisor.updates import UpdateManager, update_result

RETRY_S = 0.5


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
        while True:
            stub = self.manager.stub
            if stub is not None:
                for rec in self.updates.unreported():
                    try:
                        ack = await stub.ReportUpdateResult(update_result(rec, self.node_id),
                                                            timeout=self.manager.cfg.rpc_timeout_s)
                    except grpc.aio.AioRpcError as e:
                        logger.debug("result of update {} not delivered: {}", rec.update_id, e.code().name)
                        if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                            self.manager.call_failed()  # this replica is gone or stuck: try the next one
                        break
                    self.updates.mark_reported(rec.update_id)
                    logger.info("result of update {} delivered to the Manager{}", rec.update_id,
                                " (it had it already)" if ack.duplicate else "")
            await asyncio.sleep(RETRY_S)
