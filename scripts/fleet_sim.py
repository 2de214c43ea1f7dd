#!/usr/bin/env python3
"""N simulated nodes in one process, speaking Baton's real protocols to a real Manager: for load only.

Each node does what a supervisor does on the wire, and no more:

- ManagerService: ``Register`` (with its labels and one agent), a ``Heartbeat`` every ``--heartbeat-s``
  (registering again when the Manager answers ``known=False``), ``SyncAgentStates`` after each update and
  every ``--sync-s``, and ``ReportUpdateResult`` for each final update through a durable outbox: the result
  is written (temp, fsync, rename, fsync dir) under ``--state-dir`` before it is sent and removed only after
  the Manager's ack, so a killed simulator re-sends it on its next start (the Manager deduplicates by id).
- DaemonService on one shared loopback port (``--listen``): every node registers that address, and a
  ``PushUpdate`` is routed by its ``node_id``; ``GetUpdate``, ``WatchUpdate`` and ``CancelUpdate`` by update id.
  The other DaemonService calls answer UNIMPLEMENTED.
- An update: a real HTTP download of ``download_url`` (a ``503`` waits its ``Retry-After`` within the
  deadline), hashed on the fly, then the project's own ``helper.verify.verify_package`` (size, sha256,
  signature by ``--trusted-key``, manifest); then a simulated install taking ``--latency-s`` (uniform
  between half and one and a half of it), failing (rolled back) with probability ``--failure-rate``.

Several Manager addresses (``--manager A,B``) are tried in turn when one fails; with ``--spread``, node i
tries replica i mod n first (as an operator spreads a fleet by listing the replicas in another order on
each host), so the load is shared instead of all on the first. No TLS: the Manager must serve insecure on
loopback (a simulated node has no certificate of its own).

``--heartbeat-only``: Register and Heartbeat, nothing else (no DaemonService port, no outbox, no syncs), for
measuring a large fleet at rest. The nodes start at random within the first heartbeat interval, so the
fleet's heartbeats are spread evenly. When every node has registered the simulator prints
``{"registered": N}`` on stderr; SIGUSR1 clears the RPC figures gathered so far (a measuring window starts
there). Prints one JSON summary on stdout when it stops (SIGTERM/SIGINT, or after ``--duration-s``): RPC
latencies (since the start or the last SIGUSR1), outcomes, and the PushUpdate calls per node.

    python scripts/fleet_sim.py --manager 127.0.0.1:7444 --nodes 1000 --trusted-key release.pub \\
        --state-dir /tmp/sim --labels sim=yes
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
from google.protobuf import json_format

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from baton.digest import PackageDigest  # noqa: E402
from baton.durable import read_json, remove_file, write_json  # noqa: E402
from baton.errors import BatonError  # noqa: E402
from baton.pb import common_pb2, daemon_pb2, daemon_pb2_grpc, manager_pb2, manager_pb2_grpc  # noqa: E402
from baton.signing import PublicKey, load_trusted_keys  # noqa: E402
from helper.verify import verify_package  # noqa: E402

SUPERVISOR_VERSION = "sim"
RPC_TIMEOUT_S = 10.0
DOWNLOAD_DEADLINE_S = 120.0
OUTBOX_RETRY_S = 0.5
S = common_pb2  # the UpdateState values


def percentile(values: Sequence[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


@dataclass
class Stats:
    rpc_latency_s: dict[str, list[float]] = field(default_factory=dict)
    rpc_errors: int = 0
    committed: int = 0
    rolled_back: int = 0
    failed: int = 0
    downloaded_bytes: int = 0
    busy_retries: int = 0
    window_started: float = field(default_factory=time.monotonic)  # the start, or the last SIGUSR1
    pushes: dict[str, int] = field(default_factory=dict)  # node -> PushUpdate calls it received

    def new_window(self) -> None:
        """SIGUSR1: the RPC figures start again from here."""
        self.rpc_latency_s = {}
        self.rpc_errors = 0
        self.window_started = time.monotonic()

    def summary(self, nodes: int, started: float) -> dict[str, Any]:
        return {"nodes": nodes, "seconds": round(time.monotonic() - started, 3),
                "window_s": round(time.monotonic() - self.window_started, 3), "committed": self.committed,
                "rolled_back": self.rolled_back, "failed": self.failed, "rpc_errors": self.rpc_errors,
                "downloaded_bytes": self.downloaded_bytes, "busy_retries": self.busy_retries,
                "push_calls": sum(self.pushes.values()),
                "nodes_pushed_twice": sorted(n for n, k in self.pushes.items() if k > 1),
                "rpc": {name: {"calls": len(v), "p50_ms": round(percentile(v, 50) * 1000, 2),
                               "p99_ms": round(percentile(v, 99) * 1000, 2)}
                        for name, v in sorted(self.rpc_latency_s.items())}}


@dataclass
class Cursor:
    """The replica a caller talks to now: the simulator's own, or one per node with ``--spread``."""

    index: int = 0


class Managers:
    """The Manager replicas, one channel each; a failed call moves its caller on to the next address."""

    def __init__(self, addresses: Sequence[str], stats: Stats) -> None:
        self.addresses = list(addresses)
        self.channels = [grpc.aio.insecure_channel(a) for a in self.addresses]
        self.stubs = [manager_pb2_grpc.ManagerServiceStub(c) for c in self.channels]
        self.shared = Cursor()
        self.stats = stats

    async def call(self, name: str, request: Any, cursor: Cursor | None = None) -> Any:
        at = cursor or self.shared
        for _ in range(len(self.stubs)):
            i = at.index % len(self.stubs)
            started = time.monotonic()
            try:
                reply = await getattr(self.stubs[i], name)(request, timeout=RPC_TIMEOUT_S)
            except grpc.aio.AioRpcError as e:
                self.stats.rpc_errors += 1
                if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
                at.index = (i + 1) % len(self.stubs)
                continue
            self.stats.rpc_latency_s.setdefault(name, []).append(time.monotonic() - started)
            return reply
        raise ConnectionError(f"no Manager answered {name} ({', '.join(self.addresses)})")

    async def close(self) -> None:
        for c in self.channels:
            await c.close(None)


@dataclass
class Update:
    request: daemon_pb2.UpdateRequest
    status: daemon_pb2.UpdateStatus
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class Node:
    def __init__(self, sim: Simulator, node_id: str, index: int) -> None:
        self.sim = sim
        self.id = node_id
        self.version = sim.args.version
        self.outbox = sim.args.state_dir / node_id / "outbox"
        if not sim.args.heartbeat_only:
            self.outbox.mkdir(parents=True, exist_ok=True)
        self.seq = 0
        self.cursor = Cursor(index) if sim.args.spread else None

    def agents(self) -> list[common_pb2.AgentInfo]:
        return [common_pb2.AgentInfo(name=self.sim.args.component, state=common_pb2.AGENT_STATE_RUNNING,
                                     version=self.version, pid=1)]

    async def register(self) -> None:
        await self.sim.managers.call("Register", manager_pb2.RegisterRequest(
            node_id=self.id, supervisor_version=SUPERVISOR_VERSION, hostname=socket.gethostname(),
            grpc_address=self.sim.address, agents=self.agents(), labels=self.sim.labels), self.cursor)

    async def sync(self) -> None:
        await self.sim.managers.call("SyncAgentStates",
                                     manager_pb2.SyncAgentStatesRequest(node_id=self.id, agents=self.agents()),
                                     self.cursor)

    async def run(self) -> None:
        """Register, then heartbeat (and sync now and then) until cancelled."""
        args = self.sim.args
        await asyncio.sleep(random.uniform(0, args.heartbeat_s))  # spread the fleet's heartbeats
        while True:
            try:
                await self.register()
                break
            except (ConnectionError, grpc.aio.AioRpcError):
                await asyncio.sleep(1.0)
        self.sim.registered_one()
        next_sync = time.monotonic() + args.sync_s
        while True:
            await asyncio.sleep(args.heartbeat_s)
            self.seq += 1
            try:
                reply = await self.sim.managers.call("Heartbeat", manager_pb2.HeartbeatRequest(
                    node_id=self.id, seq=self.seq, supervisor_version=SUPERVISOR_VERSION), self.cursor)
                if not reply.known:
                    await self.register()
                if not args.heartbeat_only and time.monotonic() >= next_sync:
                    next_sync = time.monotonic() + args.sync_s
                    await self.sync()
            except (ConnectionError, grpc.aio.AioRpcError):
                continue

    # ---- an update ------------------------------------------------------------------------------------

    async def carry_out(self, u: Update) -> None:
        req = u.request
        try:
            self.sim.set(u, S.UPDATE_STATE_DOWNLOADING, "downloading")
            digests = await self.sim.download(req.download_url, req.size, u)
            self.sim.set(u, S.UPDATE_STATE_VERIFYING, "verifying")
            verify_package(digests, expected_sha256=req.sha256, expected_size=req.size,
                           signature_text=req.signature, trusted_keys=self.sim.keys, component=req.component,
                           version=req.version, node_id=self.id, now=time.time())
            self.sim.set(u, S.UPDATE_STATE_WATCHING, "watching")
            await asyncio.sleep(self.sim.args.latency_s * random.uniform(0.5, 1.5))
            if random.random() < self.sim.args.failure_rate:
                self.sim.finish(u, S.UPDATE_STATE_ROLLED_BACK, error="simulated failure: health check failed",
                                rolled_back=True)
                self.sim.stats.rolled_back += 1
            else:
                self.version = req.version
                self.sim.finish(u, S.UPDATE_STATE_COMMITTED, success=True)
                self.sim.stats.committed += 1
        except asyncio.CancelledError:
            self.sim.finish(u, S.UPDATE_STATE_FAILED, error="cancelled")
            self.sim.stats.failed += 1
        except Exception as e:  # a refused package, a failed download: the node's own failure
            self.sim.finish(u, S.UPDATE_STATE_FAILED, error=f"{type(e).__name__}: {e}")
            self.sim.stats.failed += 1
        await self.put_in_outbox(u)
        with contextlib.suppress(ConnectionError, grpc.aio.AioRpcError):
            await self.sync()

    async def put_in_outbox(self, u: Update) -> None:
        """Durably, before it is sent: the outbox is what a restart re-sends."""
        s, r = u.status, u.request
        result = common_pb2.UpdateResult(
            update_id=s.update_id, node_id=self.id, component=r.component, from_version=s.from_version,
            to_version=r.version, success=s.success, rolled_back=s.rolled_back, error=s.error, state=s.state,
            started_at=s.timings[0].seconds if s.timings else 0.0, finished_at=s.updated_at)
        path = self.outbox / f"{s.update_id}.json"
        await asyncio.to_thread(write_json, path, json_format.MessageToDict(result), 0o600)
        self.sim.outbox_wake.set()


class Daemon(daemon_pb2_grpc.DaemonServiceServicer):
    """The shared DaemonService: PushUpdate by node id, the rest by update id."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim

    async def PushUpdate(self, request: daemon_pb2.UpdateRequest, context: grpc.aio.ServicerContext
                         ) -> daemon_pb2.UpdateAccepted:
        node = self.sim.nodes.get(request.node_id)
        if node is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no simulated node {request.node_id!r}")
        assert node is not None
        self.sim.stats.pushes[node.id] = self.sim.stats.pushes.get(node.id, 0) + 1
        update_id = request.update_id or uuid.uuid4().hex
        if update_id in self.sim.updates:  # the Manager re-pushing an id it was unsure of: the same update
            return daemon_pb2.UpdateAccepted(update_id=update_id)
        status = daemon_pb2.UpdateStatus(update_id=update_id, component=request.component,
                                         from_version=node.version, to_version=request.version,
                                         state=S.UPDATE_STATE_REQUESTED, step="requested",
                                         bytes_total=request.size, updated_at=time.time())
        status.timings.add(step="requested", seconds=time.time())
        u = Update(request, status)
        self.sim.updates[update_id] = u
        u.task = asyncio.get_running_loop().create_task(node.carry_out(u))
        return daemon_pb2.UpdateAccepted(update_id=update_id)

    async def _update(self, ref: daemon_pb2.UpdateRef, context: grpc.aio.ServicerContext) -> Update:
        u = self.sim.updates.get(ref.update_id)
        if u is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no update {ref.update_id!r}")
        assert u is not None
        return u

    async def GetUpdate(self, request: daemon_pb2.UpdateRef, context: grpc.aio.ServicerContext
                        ) -> daemon_pb2.UpdateStatus:
        return (await self._update(request, context)).status

    async def WatchUpdate(self, request: daemon_pb2.UpdateRef, context: grpc.aio.ServicerContext
                          ) -> AsyncIterator[daemon_pb2.UpdateStatus]:
        u = await self._update(request, context)
        while True:
            u.changed.clear()
            yield u.status
            if u.status.finished:
                return
            await u.changed.wait()

    async def CancelUpdate(self, request: daemon_pb2.UpdateRef, context: grpc.aio.ServicerContext
                           ) -> daemon_pb2.UpdateStatus:
        u = await self._update(request, context)
        if u.task is not None and not u.status.finished and u.status.state < S.UPDATE_STATE_WATCHING:
            u.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await u.task
        return u.status


class Simulator:
    def __init__(self, args: argparse.Namespace, keys: tuple[PublicKey, ...]) -> None:
        self.args = args
        self.keys = keys
        self.stats = Stats()
        self.managers: Managers  # made in run(): grpc.aio channels belong to the running loop
        self.labels = dict(args.labels)
        self.nodes = {f"{args.prefix}{i}": Node(self, f"{args.prefix}{i}", i - 1) for i in range(1, args.nodes + 1)}
        self.updates: dict[str, Update] = {}
        self.address = ""
        self.registered = 0
        self.outbox_wake = asyncio.Event()
        self.http: httpx.AsyncClient

    def registered_one(self) -> None:
        self.registered += 1
        if self.registered == len(self.nodes):
            print(json.dumps({"registered": self.registered}), file=sys.stderr, flush=True)

    def set(self, u: Update, state: int, step: str) -> None:
        u.status.state = state  # type: ignore[assignment]
        u.status.step = step
        u.status.updated_at = time.time()
        u.status.timings.add(step=step, seconds=u.status.updated_at)
        u.changed.set()

    def finish(self, u: Update, state: int, *, success: bool = False, rolled_back: bool = False,
               error: str = "") -> None:
        u.status.success, u.status.rolled_back, u.status.error = success, rolled_back, error
        u.status.finished = True
        self.set(u, state, "done")

    async def download(self, url: str, size: int, u: Update) -> Any:
        """GET the whole package, hashed as it arrives; a 503 waits its Retry-After within the deadline."""
        deadline = time.monotonic() + DOWNLOAD_DEADLINE_S
        while True:
            digest = PackageDigest(parallel=False)
            async with self.http.stream("GET", url) as response:
                if response.status_code == 503 and time.monotonic() < deadline:
                    self.stats.busy_retries += 1
                    wait = response.headers.get("Retry-After", "1")
                    await asyncio.sleep(min(float(wait) if wait.isdigit() else 1.0, deadline - time.monotonic()))
                    continue
                response.raise_for_status()
                async for chunk in response.aiter_raw():
                    if digest.size + len(chunk) > size:
                        raise ValueError(f"{url} sent more than the {size} bytes asked for")
                    digest.update(chunk)
                    u.status.bytes_done = digest.size
                self.stats.downloaded_bytes += digest.size
                return digest.finish()

    async def deliver_outbox(self) -> None:
        """Send every result in the outbox until the Manager acks it; then remove it, durably."""
        while True:
            pending = sorted(self.args.state_dir.glob("*/outbox/*.json"))
            for path in pending:
                result = json_format.ParseDict(await asyncio.to_thread(read_json, path), common_pb2.UpdateResult())
                try:
                    await self.managers.call("ReportUpdateResult", result)
                except (ConnectionError, grpc.aio.AioRpcError):
                    await asyncio.sleep(OUTBOX_RETRY_S)
                    break
                await asyncio.to_thread(remove_file, path)
            else:
                self.outbox_wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.outbox_wake.wait(), OUTBOX_RETRY_S * 4)

    async def run(self) -> dict[str, Any]:
        started = time.monotonic()
        self.managers = Managers(self.args.manager, self.stats)
        full = not self.args.heartbeat_only  # else: no DaemonService, no downloads, no outbox
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(30.0), trust_env=False,
                                      limits=httpx.Limits(max_connections=self.args.max_downloads))
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        if full:
            daemon_pb2_grpc.add_DaemonServiceServicer_to_server(Daemon(self), server)
            host, _, port = self.args.listen.rpartition(":")
            bound = server.add_insecure_port(self.args.listen)
            self.address = f"{host}:{bound or port}"
            await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGUSR1, self.stats.new_window)
        tasks = [loop.create_task(n.run()) for n in self.nodes.values()]
        if full:
            tasks.append(loop.create_task(self.deliver_outbox()))
        print(json.dumps({"listening": self.address, "nodes": len(self.nodes)}), file=sys.stderr, flush=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), self.args.duration_s or None)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if full:
            await server.stop(1.0)
        await self.http.aclose()
        await self.managers.close()
        if self.args.latencies_out:  # every call's latency of the window, for percentiles over several simulators
            write_json(self.args.latencies_out, {k: [round(x, 6) for x in v]
                                                 for k, v in self.stats.rpc_latency_s.items()}, 0o644)
        return self.stats.summary(len(self.nodes), started)


def labels(text: str) -> list[tuple[str, str]]:
    out = []
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"--labels {text!r}: expected KEY=VALUE[,KEY=VALUE...]")
        out.append((key, value))
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--manager", required=True, type=lambda s: [a for a in s.split(",") if a],
                   help="ManagerService address(es), HOST:PORT[,HOST:PORT...]")
    p.add_argument("--nodes", type=int, default=20, help="simulated nodes (default 20)")
    p.add_argument("--prefix", default="sim-", help="node ids are PREFIX1..PREFIXN (default sim-)")
    p.add_argument("--listen", default="127.0.0.1:0", help="the shared DaemonService address (loopback)")
    p.add_argument("--trusted-key", action="append", required=True, type=Path, help="minisign public key")
    p.add_argument("--state-dir", required=True, type=Path, help="the durable outbox lives here")
    p.add_argument("--labels", type=labels, default=[], help="KEY=VALUE,... sent at registration")
    p.add_argument("--component", default="app")
    p.add_argument("--version", default="1.0.0", help="the component's version at start")
    p.add_argument("--heartbeat-s", type=float, default=10.0)
    p.add_argument("--sync-s", type=float, default=60.0)
    p.add_argument("--latency-s", type=float, default=0.5, help="mean simulated install time")
    p.add_argument("--failure-rate", type=float, default=0.0, help="probability an update rolls back")
    p.add_argument("--max-downloads", type=int, default=100, help="HTTP connections open at once")
    p.add_argument("--duration-s", type=float, default=0.0, help="stop after this long (0: at SIGTERM)")
    p.add_argument("--heartbeat-only", action="store_true",
                   help="Register and Heartbeat only: no DaemonService, no outbox, no syncs (a fleet at rest)")
    p.add_argument("--latencies-out", type=Path, help="write each RPC's latencies (seconds) here as JSON at the end")
    p.add_argument("--spread", action="store_true",
                   help="node i tries Manager replica i mod n first (default: every node the first one)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.nodes < 1 or not 0 <= args.failure_rate <= 1 or args.heartbeat_s <= 0 or args.latency_s < 0:
        print("fleet_sim: --nodes >= 1, 0 <= --failure-rate <= 1, --heartbeat-s > 0, --latency-s >= 0",
              file=sys.stderr)
        return 2
    try:
        keys = load_trusted_keys(args.trusted_key)
    except BatonError as e:
        print(f"fleet_sim: {e}", file=sys.stderr)
        return 2
    summary = asyncio.run(Simulator(args, keys).run())
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
