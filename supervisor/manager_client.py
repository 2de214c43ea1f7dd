"""The supervisor's side of ManagerService: register, heartbeat, sync agent states.

It runs as one background task with its own timeouts and exponential backoff,
so a Manager that is down or slow never stalls supervision. When the Manager
comes back the client registers again and sends the current agent states.

``manager.address`` may name several replicas of the Manager (one database
behind them). The client talks to one at a time; when a call fails (or the
result outbox reports a failed delivery) it moves at once to the next address
and registers there. Only after every address failed in a row does it back off. A replica that answers
RESOURCE_EXHAUSTED (this node calls it too often) is not failed over from: the client waits what it asked
(``baton/throttle.py``), at least its own backoff, and calls it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable, Mapping

import grpc

from baton.config import ManagerConfig
from baton.log import logger
from baton.pb import common_pb2, manager_pb2, manager_pb2_grpc
from baton.throttle import retry_after_s

SYNC_COALESCE_S = 0.2  # agent changes this close together go to the Manager in one SyncAgentStates


def manager_channel(cfg: ManagerConfig, address: str) -> grpc.aio.Channel:
    if cfg.tls_ca is None:
        return grpc.aio.insecure_channel(address)
    creds = grpc.ssl_channel_credentials(
        root_certificates=cfg.tls_ca.read_bytes(),
        private_key=cfg.tls_key.read_bytes() if cfg.tls_key else None,
        certificate_chain=cfg.tls_cert.read_bytes() if cfg.tls_cert else None,
    )
    options = [("grpc.ssl_target_name_override", cfg.server_name)] if cfg.server_name else []
    return grpc.aio.secure_channel(address, creds, options=options)


class _Failover(Exception):
    """Raised inside the client's loop to move to the next replica."""


class ManagerClient:
    def __init__(
        self,
        cfg: ManagerConfig,
        node_id: str,
        version: str,
        started_at: float,
        agents: Callable[[], list[common_pb2.AgentInfo]],
        grpc_address: str = "",
        labels: Mapping[str, str] | None = None,
        updates_refused: Callable[[], str] = lambda: "",
    ) -> None:
        self.cfg = cfg
        self.node_id = node_id
        self.version = version
        self.started_at = started_at
        self._agents = agents
        self._updates_refused = updates_refused  # broken trust material, reported by every register and heartbeat
        self._grpc_address = grpc_address
        self.labels = dict(labels or {})
        self.connected = False
        self.registrations = 0
        self.clock_offset_s = 0.0  # the Manager's clock minus ours, at clock_measured_at (0: never measured)
        self.clock_measured_at = 0.0
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._channel: grpc.aio.Channel | None = None
        self._stub: manager_pb2_grpc.ManagerServiceStub | None = None
        self._seq = 0
        self._addresses = cfg.addresses
        self._index = 0  # the replica in use
        self._broken = asyncio.Event()

    @property
    def address(self) -> str:
        """The Manager replica the client talks to now."""
        return self._addresses[self._index]

    def call_failed(self) -> None:
        """Another task's call to the Manager failed: move to the next replica without waiting for a heartbeat."""
        self._broken.set()

    def _clock_measured(self, sent: float, manager_time: float) -> None:
        """Keep the Manager's clock minus ours, taken at the middle of the call (supervisor/clock.py)."""
        if manager_time:  # 0: a Manager that does not say
            received = time.time()
            self.clock_offset_s = manager_time - (sent + received) / 2
            self.clock_measured_at = received

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="manager-client")

    def agents_changed(self) -> None:
        self._dirty.set()

    @property
    def stub(self) -> manager_pb2_grpc.ManagerServiceStub | None:
        return self._stub if self.connected else None

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._channel is not None:
            await self._channel.close(None)

    async def _run(self) -> None:
        delay = self.cfg.retry_initial_s
        failed_in_a_row = 0
        while True:
            try:
                if self._channel is None:
                    self._channel = manager_channel(self.cfg, self.address)
                    self._stub = manager_pb2_grpc.ManagerServiceStub(self._channel)
                await self._register()
                delay = self.cfg.retry_initial_s
                failed_in_a_row = 0
                await self._connected_loop()
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    # The replica is up and answering, but this node calls it too often (manager/ratelimit.py):
                    # wait what it asked, at least our own backoff, then the same replica again.
                    wait_s = max(delay, retry_after_s(e))
                    logger.warning("the Manager at {} asks this node to slow down: {}; calling again in {:.1f}s",
                                   self.address, e.details(), wait_s)
                    self.connected = False
                    await asyncio.sleep(wait_s)
                    delay = min(delay * 2, self.cfg.retry_max_s)
                    continue
                if self.connected:
                    logger.warning("lost the Manager at {}: {}", self.address, e.code().name)
                else:
                    logger.debug("Manager at {} unavailable: {}", self.address, e.code().name)
            except _Failover:
                logger.warning("a call to the Manager at {} failed; moving to the next replica", self.address)
            except Exception as e:
                logger.warning("Manager client error: {!r}", e)
            self.connected = False
            failed_in_a_row += 1
            if len(self._addresses) > 1:
                await self._next_replica()
            if failed_in_a_row % len(self._addresses) == 0:  # every replica failed once more: back off
                logger.debug("no Manager replica answered; retrying in {:.1f}s", delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.cfg.retry_max_s)

    async def _next_replica(self) -> None:
        if self._channel is not None:
            await self._channel.close(None)
        self._channel = None
        self._stub = None
        self._index = (self._index + 1) % len(self._addresses)

    async def _register(self) -> None:
        assert self._stub is not None
        sent = time.time()
        # cleared before the snapshot is taken: a change while the call is under way is sent in a sync after it
        self._dirty.clear()
        resp = await self._stub.Register(
            manager_pb2.RegisterRequest(
                node_id=self.node_id,
                supervisor_version=self.version,
                hostname=socket.gethostname(),
                grpc_address=self._grpc_address,
                agents=self._agents(),
                labels=dict(self.labels),
                updates_refused=self._updates_refused(),
            ),
            timeout=self.cfg.rpc_timeout_s,
        )
        self._clock_measured(sent, resp.manager_time)
        self.interval = resp.heartbeat_interval_seconds or self.cfg.heartbeat_interval_s
        self.connected = True
        self.registrations += 1
        self._broken.clear()
        logger.info("registered with the Manager at {}", self.address)

    async def _connected_loop(self) -> None:
        assert self._stub is not None
        next_beat = time.monotonic() + self.interval
        next_sync = time.monotonic() + self.cfg.sync_interval_s
        while True:
            timeout = max(0.0, min(next_beat, next_sync) - time.monotonic())
            waiters = [asyncio.ensure_future(self._dirty.wait()), asyncio.ensure_future(self._broken.wait())]
            try:
                await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()
            if self._broken.is_set():
                raise _Failover
            now = time.monotonic()
            if self._dirty.is_set() or now >= next_sync:
                if self._dirty.is_set():
                    # An update's restart changes an agent three or four times within tens of milliseconds
                    # (stopping, exited, starting, running): one report of where it ended, not one call each.
                    await asyncio.sleep(SYNC_COALESCE_S)
                    now = time.monotonic()
                self._dirty.clear()
                await self._stub.SyncAgentStates(
                    manager_pb2.SyncAgentStatesRequest(node_id=self.node_id, agents=self._agents()),
                    timeout=self.cfg.rpc_timeout_s,
                )
                next_sync = now + self.cfg.sync_interval_s
            if now >= next_beat:
                self._seq += 1
                sent = time.time()
                resp = await self._stub.Heartbeat(
                    manager_pb2.HeartbeatRequest(
                        node_id=self.node_id,
                        seq=self._seq,
                        uptime_seconds=time.time() - self.started_at,
                        supervisor_version=self.version,
                        updates_refused=self._updates_refused(),
                    ),
                    timeout=self.cfg.rpc_timeout_s,
                )
                self._clock_measured(sent, resp.manager_time)
                if not resp.known:
                    await self._register()
                next_beat = now + self.interval
