"""`supervisor reload` re-reads grpc.tls_*: a renewed certificate is served without a restart, a broken one never
replaces the one that works (certificates from the development CA, manager/devca.py)."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from baton.pb import daemon_pb2, daemon_pb2_grpc
from manager.devca import Authority, Issued, issue_manager, issue_node, make_ca
from tests.conftest import PY, ROOT, SupervisorProc, agent

pytestmark = pytest.mark.e2e  # every test here starts a process

ALLOWED = "URI:spiffe://baton/manager/manager-1"


@dataclass(frozen=True)
class Pki:
    """A development CA kept in memory (to issue a renewal later), a Manager's client certificate, node-1's."""

    ca: Authority
    manager: Issued
    node: Issued


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = make_ca(tmp_path / "pki")
    return Pki(ca, issue_manager(ca, tmp_path / "pki", "manager-1", stem="manager"),
               issue_node(ca, tmp_path / "pki", "node-1"))


@pytest.fixture
def tls_sup(make_supervisor, pki: Pki) -> SupervisorProc:
    """node-1 on TCP with mutual TLS, its certificate and key in files of their own (what a renewal overwrites)."""
    served = pki.ca.files.cert.parent / "served"
    served.mkdir()
    shutil.copy(pki.node.cert, served / "node.pem")
    shutil.copy(pki.node.key, served / "node.key")
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True)], tcp=True, extra={"grpc": {
        "tls_cert": str(served / "node.pem"), "tls_key": str(served / "node.key"), "tls_ca": str(pki.ca.files.cert),
        "allowed_clients": [ALLOWED]}})
    sup.start()
    sup.wait_agent("web", "running")
    return sup


def served_serial(sup: SupervisorProc, pki: Pki) -> int:
    """The serial of the certificate a fresh TLS client is shown on the supervisor's TCP address."""
    host, port = sup.cfg["grpc"]["listen"][0].rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=str(pki.ca.files.cert))
    ctx.check_hostname = False
    ctx.load_cert_chain(pki.manager.cert, pki.manager.key)
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection((host, int(port)), timeout=5) as raw, ctx.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


def status_over_tls(sup: SupervisorProc, pki: Pki) -> daemon_pb2.Status:
    creds = grpc.ssl_channel_credentials(root_certificates=pki.ca.files.cert.read_bytes(),
                                         private_key=pki.manager.key.read_bytes(),
                                         certificate_chain=pki.manager.cert.read_bytes())
    with grpc.secure_channel(sup.cfg["grpc"]["listen"][0], creds,
                             options=[("grpc.ssl_target_name_override", "node-1")]) as ch:
        return daemon_pb2_grpc.DaemonServiceStub(ch).GetStatus(daemon_pb2.GetStatusRequest(), timeout=5)


def reload_cli(sup: SupervisorProc) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "supervisor", "reload", "--config", str(sup.config_path)], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)


def serial_of(issued: Issued) -> int:
    return int(x509.load_pem_x509_certificate(issued.cert.read_bytes()).serial_number)


def renew(pki: Pki) -> Issued:
    """A new certificate and key for node-1 from the same CA."""
    out = pki.ca.files.cert.parent / "renewed"
    out.mkdir()
    return issue_node(pki.ca, out, "node-1")


def test_renewed_certificate_is_served_after_reload_without_a_restart(tls_sup, pki):
    served = Path(tls_sup.cfg["grpc"]["tls_cert"]).parent
    before = tls_sup.status()
    old_serial = served_serial(tls_sup, pki)
    assert old_serial == serial_of(pki.node)
    renewed = renew(pki)
    shutil.copy(renewed.cert, served / "node.pem")
    shutil.copy(renewed.key, served / "node.key")
    res = reload_cli(tls_sup)
    assert res.returncode == 0, res.stdout + res.stderr
    new_serial = serial_of(renewed)
    assert f"TLS: serving the new certificate (serial {new_serial:x})" in res.stdout
    assert served_serial(tls_sup, pki) == new_serial
    after = status_over_tls(tls_sup, pki)  # a real gRPC call validates the new chain
    assert (after.pid, after.started_at) == (before.pid, before.started_at), "no restart"
    assert [a.pid for a in after.agents] == [a.pid for a in before.agents]


def test_broken_new_certificate_keeps_the_old_one_served_and_says_so(tls_sup, pki):
    """A renewed certificate whose key was not copied: the reload is refused with one line naming the key, the old
    certificate stays served, and nothing else of the reload happens (a bad file changes nothing)."""
    served = Path(tls_sup.cfg["grpc"]["tls_cert"]).parent
    old_serial = served_serial(tls_sup, pki)
    before = tls_sup.status()
    renewed = renew(pki)
    shutil.copy(renewed.cert, served / "node.pem")  # the renewed certificate, but the key left as it was
    tls_sup.cfg["agents"] = []  # would stop web, were the file accepted
    tls_sup.write_config()
    res = subprocess.run([PY, "-m", "supervisor", "reload", "--socket", str(tls_sup.socket)], capture_output=True,
                         text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 1
    problem = (f"grpc.tls_key: {served / 'node.key'} is not the key of the certificate {served / 'node.pem'}")
    assert res.stderr == f"supervisor: config error: {problem}; the running config stays\n"
    assert served_serial(tls_sup, pki) == old_serial
    after = status_over_tls(tls_sup, pki)
    assert [(a.name, a.pid) for a in after.agents] == [(a.name, a.pid) for a in before.agents]
    assert f"reload refused, the running config stays: {problem}" in tls_sup.output()


@pytest.mark.parametrize("section", ["grpc", "manager"])
def test_check_config_refuses_a_key_that_is_not_the_certificates_naming_the_key(make_supervisor, pki, section):
    """What the reload keeps out of the server is kept out of a start too: one line, exit 2, nothing started."""
    other = renew(pki)
    tls = {"tls_cert": str(pki.node.cert), "tls_key": str(other.key), "tls_ca": str(pki.ca.files.cert)}
    extra = {"grpc": {**tls, "allowed_clients": [ALLOWED]}} if section == "grpc" else {
        "manager": {**tls, "address": "127.0.0.1:7444", "server_name": "manager-1"}}
    sup = make_supervisor([], tcp=section == "grpc", extra=extra)
    sup.write_config()
    for argv in (["check-config", str(sup.config_path)], ["run", "--config", str(sup.config_path)]):
        res = subprocess.run([PY, "-m", "supervisor", *argv], capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert res.returncode == 2
        assert res.stderr == (f"supervisor: config error: {section}.tls_key: {other.key} is not the key of the "
                              f"certificate {pki.node.cert}\n")
    assert not sup.state_dir.exists(), "nothing was started"
