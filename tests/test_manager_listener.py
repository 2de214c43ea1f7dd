"""``baton-manager serve`` applies the supervisor's rule to ManagerService: TCP needs mutual TLS, except on a
loopback address with the explicit ``--insecure-loopback`` opt-in. Anything else exits 2 with one line naming
``--listen`` before it opens the database or binds a port.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from manager.devca import make_dev_pki
from tests.conftest import PY, ROOT, free_port, wait_for
from tests.manager_fixtures import make_manager_fixture, port_open  # noqa: F401  (the make_manager fixture)

pytestmark = pytest.mark.e2e  # every test here starts a process


def serve(db: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "manager", "serve", "--db", str(db), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


@pytest.mark.parametrize("host", ["0.0.0.0", "[::]", "192.0.2.1"])
def test_serve_without_tls_on_a_non_loopback_address_exits_with_one_line_and_listens_nowhere(tmp_path, host):
    port = free_port()
    res = serve(tmp_path / "m.db", "--listen", f"{host}:{port}", "--insecure-loopback")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"baton-manager: --listen {host}:{port}: without --tls-cert/--tls-key/--tls-ca ManagerService listens on "
        "loopback only (127.0.0.0/8, ::1, localhost), and only with --insecure-loopback"]
    assert not (tmp_path / "m.db").exists(), "refused before the database was opened"
    assert not port_open(port)


@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]", "localhost"])
def test_serve_without_tls_on_loopback_without_the_opt_in_exits_with_one_line(tmp_path, host):
    port = free_port()
    res = serve(tmp_path / "m.db", "--listen", f"{host}:{port}")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"baton-manager: --listen {host}:{port} would serve ManagerService without TLS: give --tls-cert, "
        "--tls-key and --tls-ca, or --insecure-loopback to trust every caller on this host"]
    assert not (tmp_path / "m.db").exists()
    assert not port_open(port)


def test_insecure_loopback_together_with_tls_is_refused_with_one_line(tmp_path):
    pki = make_dev_pki(tmp_path / "pki", ["manager-1"], [])
    res = serve(tmp_path / "m.db", "--listen", f"127.0.0.1:{free_port()}", "--insecure-loopback",
                "--tls-cert", str(pki.manager.cert), "--tls-key", str(pki.manager.key), "--tls-ca", str(pki.ca.cert))
    assert (res.returncode, res.stderr.strip().splitlines()) == (2, [
        "baton-manager: --insecure-loopback is for a listener without TLS; it must not be given with --tls-*"])
    assert not (tmp_path / "m.db").exists()


def test_serve_with_the_opt_in_on_loopback_listens_and_warns(make_manager):
    manager = make_manager()  # tests/manager_fixtures.py passes --insecure-loopback without TLS
    assert port_open(manager.port)
    wait_for(lambda: "has no TLS (--insecure-loopback)" in manager.output(), 10, what="the warning")
