"""Per-node call rates at the Manager (manager/ratelimit.py): one node's flood is answered RESOURCE_EXHAUSTED at
once, with a retry hint, and the other nodes' calls go on being answered promptly; a supervisor told to slow
down waits what it was asked before it calls again (supervisor/manager_client.py).

The first two run a real TLS Manager and clients holding the nodes' certificates; the last runs a real
supervisor against a ManagerService that always answers RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import itertools
import statistics
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from baton.pb import manager_pb2, manager_pb2_grpc
from baton.throttle import RETRY_AFTER_KEY, retry_after_s
from manager.devca import DevPki, make_dev_pki
from manager.ratelimit import CallLimits
from tests.conftest import free_port, wait_for
from tests.manager_fixtures import ManagerProc, make_manager_fixture  # noqa: F401  (the make_manager fixture)
from tests.test_mtls import channel

pytestmark = pytest.mark.e2e  # every test here starts a process

FLOOD_S = 3.0
LIMITS = CallLimits()


@pytest.fixture
def pki(tmp_path: Path) -> DevPki:
    return make_dev_pki(tmp_path / "pki", ["manager-1"], ["node-1", "node-2"])


@pytest.fixture
def tls_manager(make_manager, pki) -> ManagerProc:
    return make_manager(tls={"cert": pki.manager.cert, "key": pki.manager.key, "ca": pki.ca.cert})


def node_stub(manager: ManagerProc, pki: DevPki, node: str) -> tuple[grpc.Channel, manager_pb2_grpc.ManagerServiceStub]:
    ch = channel(manager.address, pki.ca.cert, pki.nodes[node], "manager-1")
    return ch, manager_pb2_grpc.ManagerServiceStub(ch)


def test_a_register_flood_from_one_node_is_refused_fast_and_another_nodes_heartbeats_are_answered(
        tls_manager, pki):
    ch1, node1 = node_stub(tls_manager, pki, "node-1")
    ch2, node2 = node_stub(tls_manager, pki, "node-2")
    with ch1, ch2:
        node1.Register(manager_pb2.RegisterRequest(node_id="node-1", grpc_address="127.0.0.1:7001"), timeout=5)
        outcomes: list[tuple[grpc.StatusCode, float, float]] = []  # (code, seconds, retry hint)
        stop = threading.Event()

        def flood() -> None:
            while not stop.is_set():
                t = time.monotonic()
                try:
                    node2.Register(manager_pb2.RegisterRequest(node_id="node-2", grpc_address="127.0.0.1:7002"),
                                   timeout=10)
                    outcomes.append((grpc.StatusCode.OK, time.monotonic() - t, 0.0))
                except grpc.RpcError as e:
                    outcomes.append((e.code(), time.monotonic() - t, retry_after_s(e)))

        flooders = [threading.Thread(target=flood) for _ in range(6)]
        for f in flooders:
            f.start()
        beats: list[float] = []
        started = time.monotonic()
        try:
            while time.monotonic() - started < FLOOD_S:
                t = time.monotonic()
                assert node1.Heartbeat(manager_pb2.HeartbeatRequest(node_id="node-1"), timeout=10).known
                beats.append(time.monotonic() - t)
                time.sleep(0.1)
        finally:
            stop.set()
            for f in flooders:
                f.join(15)
        took = time.monotonic() - started
    codes = [c for c, _, _ in outcomes]
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert codes.count(grpc.StatusCode.OK) <= LIMITS.register.burst + LIMITS.register.rate_per_s * took + 1
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) > 10 * codes.count(grpc.StatusCode.OK)
    refused = [(s, hint) for c, s, hint in outcomes if c == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert all(0 < hint <= 1 / LIMITS.register.rate_per_s for _, hint in refused), "each says when to come back"
    assert statistics.median(s for s, _ in refused) < 0.1, "refused at once"
    assert len(beats) >= FLOOD_S / 0.1 / 2
    assert statistics.median(beats) < 0.2 and max(beats) < 2.0, f"node-1's heartbeats took {sorted(beats)}"
    assert set(tls_manager.nodes()) == {"node-1", "node-2"}


def test_a_heartbeat_flood_is_limited_per_node_and_names_the_node(tls_manager, pki):
    ch, node2 = node_stub(tls_manager, pki, "node-2")
    with ch:
        node2.Register(manager_pb2.RegisterRequest(node_id="node-2"), timeout=5)
        answered, refused = 0, []
        started = time.monotonic()
        for _ in range(3 * LIMITS.report.burst):
            try:
                node2.Heartbeat(manager_pb2.HeartbeatRequest(node_id="node-2"), timeout=5)
                answered += 1
            except grpc.RpcError as e:
                refused.append(e)
        took = time.monotonic() - started
    assert answered <= LIMITS.report.burst + LIMITS.report.rate_per_s * took + 1
    assert refused and all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in refused)
    assert refused[0].details().startswith("node 'node-2' calls Heartbeat, SyncAgentStates and ReportUpdateResult "
                                           f"more often than {LIMITS.report.rate_per_s:g}/s")
    assert any(k == RETRY_AFTER_KEY for k, _ in refused[0].trailing_metadata())


class AlwaysBusy(manager_pb2_grpc.ManagerServiceServicer):
    """A ManagerService whose every Register is over the node's rate, asking it to come back in HINT_S."""

    HINT_S = 1.0
    WINDOW_S = 3.5  # counted from the first Register: room for 2 to 4 calls a hint apart

    def __init__(self) -> None:
        self.registers: list[float] = []

    def Register(self, request, context):  # type: ignore[no-untyped-def]
        self.registers.append(time.monotonic())
        context.set_trailing_metadata(((RETRY_AFTER_KEY, f"{self.HINT_S}"),))
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too often")


def test_a_supervisor_told_to_slow_down_waits_the_retry_hint_before_it_registers_again(make_supervisor):
    busy = AlwaysBusy()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    manager_pb2_grpc.add_ManagerServiceServicer_to_server(busy, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        # Its own backoff is far shorter than the hint: without the hint it would call about 20 times a second.
        sup = make_supervisor([], extra={"manager": {"address": f"127.0.0.1:{port}", "retry_initial_s": 0.05,
                                                     "retry_max_s": 0.05, "rpc_timeout_s": 2.0}}).start()
        wait_for(lambda: len(busy.registers) >= 1, 20, what="the supervisor's first Register")
        # The window starts at the first Register, which may come before the supervisor serves (and so before
        # this test sees it): on a loaded machine a window counted from here held 6.
        window_end = busy.registers[0] + AlwaysBusy.WINDOW_S
        time.sleep(max(0.0, window_end - time.monotonic()))
        seen = list(busy.registers)
        gaps = [b - a for a, b in itertools.pairwise(seen)]
        assert 2 <= len([t for t in seen if t <= window_end]) <= 5, seen
        assert all(g >= AlwaysBusy.HINT_S * 0.9 for g in gaps), gaps
        assert sup.proc.poll() is None
    finally:
        server.stop(0)
