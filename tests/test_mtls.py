"""Mutual TLS between the Manager and a supervisor, with certificates from the development CA (manager/devca.py).

The supervisor requires a client certificate from its CA on TCP and lets only the identities in
``grpc.allowed_clients`` change anything; its local Unix sockets need no certificate. The supervisor presents
its node certificate to the Manager, which records that identity and lets a node speak only for itself.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from baton.identity import AllowListError, PeerIdentity
from baton.pb import common_pb2, daemon_pb2, daemon_pb2_grpc, manager_pb2, manager_pb2_grpc
from manager.devca import DevPki, Issued, make_dev_pki
from supervisor.authz import Channel, Policy
from tests.conftest import Release, SupervisorProc, UpdateHost, wait_for
from tests.manager_fixtures import (
    ManagerProc,
    journal_ids,
    make_manager_fixture,  # noqa: F401  (the make_manager fixture)
    node_config,
    package_args,
    signed,
    start_node,
)

ALLOWED = "URI:spiffe://baton/manager/manager-1"


@pytest.fixture
def pki(tmp_path: Path) -> DevPki:
    return make_dev_pki(tmp_path / "pki", ["manager-1", "manager-2"], ["node-1", "node-2"], expired=["manager-1"],
                        other_ca=True)


def tls_node(make_manager: Callable[..., ManagerProc], make_supervisor: Callable[..., SupervisorProc],
             release: Release, pki: DevPki) -> tuple[ManagerProc, UpdateHost]:
    """A TLS Manager and node-1 with TLS on both of its channels, allowing manager-1 only."""
    manager = make_manager(tls={"cert": pki.manager.cert, "key": pki.manager.key, "ca": pki.ca.cert})
    node = pki.nodes["node-1"]
    extra = node_config(manager, release, manager_extra={
        "tls_ca": str(pki.ca.cert), "tls_cert": str(node.cert), "tls_key": str(node.key), "server_name": "manager-1"})
    host = start_node(make_supervisor, release, "node-1", extra, grpc={
        "tls_cert": str(node.cert), "tls_key": str(node.key), "tls_ca": str(pki.ca.cert),
        "allowed_clients": [ALLOWED]})
    host.sup.wait_agent("app", "running")
    return manager, host


def channel(address: str, ca: Path, client: Issued | None, server_name: str) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes(),
                                         private_key=client.key.read_bytes() if client else None,
                                         certificate_chain=client.cert.read_bytes() if client else None)
    return grpc.secure_channel(address, creds, options=[("grpc.ssl_target_name_override", server_name)])


@pytest.mark.e2e
def test_manager_pushes_over_mutual_tls_and_records_the_node_by_its_certificate(
        make_manager, make_supervisor, release, pki):
    manager, host = tls_node(make_manager, make_supervisor, release, pki)
    wait_for(lambda: manager.nodes().get("node-1", {}).get("identity"), 20, interval=0.2,
             what="node-1 to register over TLS")
    node = manager.nodes()["node-1"]
    assert node["identity"] == "URI:spiffe://baton/node/node-1", "the supervisor presented its node certificate"
    assert node["address"] == host.sup.cfg["grpc"]["listen"][0]

    pkg = signed(release.build("1.1.0"))
    res = manager.cli("push", "node-1", *package_args(pkg))  # TLS files as `serve` recorded them
    assert "committed" in res.stdout
    assert host.sup.agent("app").version == "1.1.0"
    wait_for(lambda: [u["reports"] for u in manager.updates()] == [1], 10, what="the result over TLS")

    with channel(manager.address, pki.ca.cert, pki.nodes["node-2"], "manager-1") as ch, \
            pytest.raises(grpc.RpcError) as e:
        manager_pb2_grpc.ManagerServiceStub(ch).ReportUpdateResult(
            common_pb2.UpdateResult(update_id="forged", node_id="node-1", success=False), timeout=5)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED, "node-2's certificate cannot speak for node-1"
    with channel(manager.address, pki.ca.cert, None, "manager-1") as ch, pytest.raises(grpc.RpcError) as e:
        manager_pb2_grpc.ManagerServiceStub(ch).Register(manager_pb2.RegisterRequest(node_id="node-1"), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE, "the Manager requires a client certificate too"
    assert [u["update_id"] for u in manager.updates()] != ["forged"]


@pytest.mark.e2e
def test_push_without_an_allowed_client_certificate_is_refused_and_starts_nothing(
        make_manager, make_supervisor, release, pki):
    manager, host = tls_node(make_manager, make_supervisor, release, pki)
    address = host.sup.cfg["grpc"]["listen"][0]
    before = host.sup.agent("app")
    pkg = release.build("1.1.0")
    clients = {
        "no client certificate": (None, grpc.StatusCode.UNAVAILABLE),
        "a certificate from another CA": (pki.other_managers["manager-1"], grpc.StatusCode.UNAVAILABLE),
        "an expired certificate": (pki.expired["manager-1"], grpc.StatusCode.UNAVAILABLE),
        "an identity not in the allow-list": (pki.managers["manager-2"], grpc.StatusCode.PERMISSION_DENIED),
    }
    with channel(address, pki.ca.cert, pki.manager, "node-1") as ch:  # the same channel, an allowed identity
        assert daemon_pb2_grpc.DaemonServiceStub(ch).GetStatus(daemon_pb2.GetStatusRequest(), timeout=5).node_id
    for what, (client, code) in clients.items():
        with channel(address, pki.ca.cert, client, "node-1") as ch:
            stub = daemon_pb2_grpc.DaemonServiceStub(ch)
            with pytest.raises(grpc.RpcError) as e:
                stub.PushUpdate(pkg.request(), timeout=5)
            assert e.value.code() == code, f"{what}: {e.value.code()} {e.value.details()}"
            if code == grpc.StatusCode.PERMISSION_DENIED:
                assert "manager-2" in e.value.details() and "allowed_clients" in e.value.details()
                for rpc in (stub.StopAgent, stub.RestartAgent, stub.StartAgent):
                    with pytest.raises(grpc.RpcError) as e:
                        rpc(daemon_pb2.AgentRef(name="app"), timeout=5)
                    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
                status = stub.GetStatus(daemon_pb2.GetStatusRequest(), timeout=5)  # read-only: allowed
                assert status.node_id == "node-1"

    other = pki.managers["manager-2"]
    refused = manager.cli("push", "node-1", *package_args(signed(pkg)), "--tls-cert", str(other.cert),
                          "--tls-key", str(other.key), "--tls-ca", str(pki.ca.cert), check=False)
    assert refused.returncode == 1 and "PERMISSION_DENIED" in refused.stderr
    assert [u["state"] for u in manager.updates()] == ["failed"], "the Manager records the refused push"

    assert journal_ids(host) == [], "no update was started"
    after = host.sup.agent("app")
    assert (after.pid, after.restarts, after.state, after.version) == \
        (before.pid, before.restarts, before.state, before.version)

    local = host.sup.stub.RestartAgent(daemon_pb2.AgentRef(name="app"), timeout=10)  # the Unix socket: no cert
    assert local.pid != before.pid


def test_allow_list_entries_match_by_kind_and_a_bare_name_matches_the_common_name_or_a_dns_name():
    peer = PeerIdentity(common_name="manager-1", dns=("manager-1", "m1.example"),
                        uris=("spiffe://baton/manager/manager-1",), tls=True)
    push = "/baton.v1.DaemonService/PushUpdate"
    for entry in ("CN=manager-1", "DNS:m1.example", "URI:spiffe://baton/manager/manager-1", "m1.example",
                  "manager-1"):
        assert Policy([entry]).denial(push, peer) is None, entry
    for entry in ("CN=m1.example", "DNS:spiffe://baton/manager/manager-1", "URI:manager-1", "manager-2"):
        assert Policy([entry]).denial(push, peer), entry
    assert Policy([]).denial("/baton.v1.DaemonService/GetStatus", peer) is None, "read-only"
    assert Policy([]).denial("/baton.v1.DaemonService/SomethingNew", peer), "unknown methods are denied"
    assert Policy([]).denial(push, PeerIdentity(), Channel.LOCAL) is None, "the local port: no TLS, no certificate"
    for bad in ("IP:127.0.0.1", "O=Baton", "CN=", "DNS:", "spiffe://baton/manager/manager-1"):
        with pytest.raises(AllowListError):
            Policy([bad])


@pytest.mark.e2e
def test_operator_methods_over_tls_are_for_allowed_clients_only_tail_included(
        make_manager, make_supervisor, release, pki):
    """Agent output may hold secrets: TailLog is not read-only, like SignalAgent, ClearLog and Reload."""
    _, host = tls_node(make_manager, make_supervisor, release, pki)
    address = host.sup.cfg["grpc"]["listen"][0]
    before = host.sup.agent("app")
    calls = {
        "TailLog": lambda s: list(s.TailLog(daemon_pb2.TailRequest(name="app", lines=5), timeout=5)),
        "ClearLog": lambda s: s.ClearLog(daemon_pb2.ClearLogRequest(name="app"), timeout=5),
        "SignalAgent": lambda s: s.SignalAgent(daemon_pb2.SignalRequest(name="app", signal="CONT"), timeout=5),
        "Reload": lambda s: s.Reload(daemon_pb2.ReloadRequest(), timeout=30),
    }
    with channel(address, pki.ca.cert, pki.managers["manager-2"], "node-1") as ch:
        stub = daemon_pb2_grpc.DaemonServiceStub(ch)
        for name, call in calls.items():
            with pytest.raises(grpc.RpcError) as e:
                call(stub)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED, name
            assert "allowed_clients" in (e.value.details() or ""), name
    assert host.sup.log_of("app").stat().st_size > 0, "the refused ClearLog cleared nothing"
    with channel(address, pki.ca.cert, pki.manager, "node-1") as ch:
        chunks = calls["TailLog"](daemon_pb2_grpc.DaemonServiceStub(ch))
    assert b"versioned_agent" in b"".join(c.data for c in chunks)
    assert host.sup.agent("app").pid == before.pid


@pytest.mark.e2e
def test_downgrade_over_tls_needs_an_identity_in_allow_downgrade_clients(make_manager, make_supervisor, release,
                                                                         pki):
    manager = make_manager(tls={"cert": pki.manager.cert, "key": pki.manager.key, "ca": pki.ca.cert})
    node = pki.nodes["node-1"]
    operator = "URI:spiffe://baton/manager/manager-2"
    host = start_node(make_supervisor, release, "node-1", node_config(manager, release), grpc={
        "tls_cert": str(node.cert), "tls_key": str(node.key), "tls_ca": str(pki.ca.cert),
        "allowed_clients": [ALLOWED], "allow_downgrade_clients": [operator]})
    host.sup.wait_agent("app", "running")
    address = host.sup.cfg["grpc"]["listen"][0]
    old = release.build("0.9.0")
    with channel(address, pki.ca.cert, pki.manager, "node-1") as ch:  # allowed to push, not an operator
        for flags in ({"allow_downgrade": True}, {"force": True}):
            with pytest.raises(grpc.RpcError) as e:
                daemon_pb2_grpc.DaemonServiceStub(ch).PushUpdate(old.request(**flags), timeout=5)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "allow_downgrade_clients" in (e.value.details() or "")
    assert journal_ids(host) == []
    with channel(address, pki.ca.cert, pki.managers["manager-2"], "node-1") as ch:  # the operator
        accepted = daemon_pb2_grpc.DaemonServiceStub(ch).PushUpdate(old.request(allow_downgrade=True), timeout=5)
    assert journal_ids(host) == [accepted.update_id]
