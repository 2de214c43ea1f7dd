"""Who may tell the Manager what, with mutual TLS: a node speaks only for itself, in every ManagerService method,
reports results only for its own updates, and cannot replace a final result it reported before.

A real TLS Manager and a real supervisor (node-1) that registers and reports over mutual TLS; the attacks come from
test clients holding other certificates of the same development CA (manager/devca.py).
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from baton.pb import common_pb2, manager_pb2, manager_pb2_grpc
from manager.devca import DevPki, make_dev_pki
from tests.conftest import wait_for
from tests.manager_fixtures import ManagerProc, make_manager_fixture, package_args, signed  # noqa: F401
from tests.test_mtls import channel, tls_node

pytestmark = pytest.mark.e2e  # every test here starts a process


@pytest.fixture
def pki(tmp_path: Path) -> DevPki:
    return make_dev_pki(tmp_path / "pki", ["manager-1", "manager-2"], ["node-1", "node-2"])


@pytest.fixture
def committed(make_manager, make_supervisor, release, pki) -> tuple[ManagerProc, str]:
    """A TLS Manager and node-1's real update to 1.1.0, committed and reported over TLS: (manager, update id)."""
    manager, _host = tls_node(make_manager, make_supervisor, release, pki)
    wait_for(lambda: manager.nodes().get("node-1", {}).get("identity"), 20, interval=0.2, what="node-1 to register")
    manager.cli("push", "node-1", *package_args(signed(release.build("1.1.0"))))
    wait_for(lambda: [u["reports"] for u in manager.updates()] == [1], 20, what="node-1's result")
    [update] = manager.updates()
    assert update["state"] == "committed"
    return manager, update["update_id"]


def stub(manager: ManagerProc, pki: DevPki, cert: str) -> tuple[grpc.Channel, manager_pb2_grpc.ManagerServiceStub]:
    issued = pki.nodes.get(cert) or pki.managers[cert]
    ch = channel(manager.address, pki.ca.cert, issued, "manager-1")
    return ch, manager_pb2_grpc.ManagerServiceStub(ch)


def rolled_back(update_id: str, node_id: str) -> common_pb2.UpdateResult:
    return common_pb2.UpdateResult(update_id=update_id, node_id=node_id, component="app", from_version="1.0.0",
                                   to_version="1.1.0", state=common_pb2.UPDATE_STATE_ROLLED_BACK, success=False,
                                   rolled_back=True, error="forged")


def test_node_2_certificate_reporting_node_1_update_is_refused_and_the_result_is_unchanged(committed, pki):
    manager, update_id = committed
    before = manager.row(update_id)
    ch, node2 = stub(manager, pki, "node-2")
    with ch:
        with pytest.raises(grpc.RpcError) as e:
            node2.ReportUpdateResult(rolled_back(update_id, "node-2"), timeout=5)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert e.value.details() == f"update {update_id} belongs to node 'node-1', not 'node-2'"
        with pytest.raises(grpc.RpcError) as e:
            node2.ReportUpdateResult(rolled_back(update_id, "node-1"), timeout=5)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED, "nor may it claim to be node-1"
    assert manager.row(update_id) == before
    assert manager.row(update_id).state.value == "committed"


def test_a_final_result_reported_again_with_another_state_is_acknowledged_and_changes_nothing(committed, pki):
    manager, update_id = committed
    before = manager.row(update_id)
    ch, node1 = stub(manager, pki, "node-1")
    with ch:
        ack = node1.ReportUpdateResult(rolled_back(update_id, "node-1"), timeout=5)
    assert (ack.update_id, ack.duplicate) == (update_id, True), "acknowledged, so the node's outbox moves on"
    assert manager.row(update_id) == before
    wait_for(lambda: "was reported committed; a later rolled_back does not replace it" in manager.output(), 10,
             what="the warning in the Manager's log")


def test_another_certificate_speaks_for_no_other_node_in_any_method_and_changes_nothing(committed, pki):
    manager, _ = committed
    node1 = {k: v for k, v in manager.nodes()["node-1"].items() if k not in ("last_seen", "registered_at")}
    calls = {
        "Register": lambda s, n: s.Register(manager_pb2.RegisterRequest(node_id=n, grpc_address="192.0.2.1:7000"),
                                            timeout=5),
        "Heartbeat": lambda s, n: s.Heartbeat(manager_pb2.HeartbeatRequest(node_id=n), timeout=5),
        "SyncAgentStates": lambda s, n: s.SyncAgentStates(manager_pb2.SyncAgentStatesRequest(node_id=n), timeout=5),
        "ReportUpdateResult": lambda s, n: s.ReportUpdateResult(rolled_back("forged", n), timeout=5),
    }
    # node-2's certificate for node-1; a Manager's certificate (DNS:manager-2, CN=manager-2) for a node named so.
    for cert, node_id in (("node-2", "node-1"), ("manager-2", "manager-2")):
        ch, s = stub(manager, pki, cert)
        with ch:
            for name, call in calls.items():
                with pytest.raises(grpc.RpcError) as e:
                    call(s, node_id)
                assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED, (cert, name)
                assert f"does not name node {node_id!r}" in e.value.details()
    assert set(manager.nodes()) == {"node-1"}
    assert {k: v for k, v in manager.nodes()["node-1"].items() if k not in ("last_seen", "registered_at")} == node1
    assert manager.row("forged") is None
