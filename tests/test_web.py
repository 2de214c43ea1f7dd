"""The fleet web page (``baton-manager serve --web``): a real serve, real supervisors, and a real headless
Chromium (Debian's ``chromium`` and ``chromium-driver``, driven by Selenium) watching a rollout move."""

from __future__ import annotations

import http.client
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from baton.pb import common_pb2, manager_pb2, manager_pb2_grpc
from manager.devca import issue, issue_manager, issue_node, issue_operator, make_ca
from tests.conftest import PY, ROOT, Release, free_port, wait_for
from tests.manager_fixtures import (
    ManagerProc,
    journal_ids,
    make_manager_fixture,  # noqa: F401  (the make_manager fixture)
    package_args,
    port_open,
    signed,
)
from tests.test_fleet import CANARY_WINDOW_S, fleet, steps, submit

pytestmark = pytest.mark.e2e  # every test here starts a process

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
HOSTILE = '<img src=x onerror="document.title=1">'


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    """Headless Chromium with a fresh profile and nothing that reaches outside this machine."""
    profile = tempfile.mkdtemp(prefix="baton-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def web_manager(make_manager: Callable[..., ManagerProc], **kw: object) -> tuple[ManagerProc, str]:
    port = free_port()
    args = (*kw.pop("args", ()), "--web", f"127.0.0.1:{port}")  # type: ignore[misc]
    manager = make_manager(args=args, **kw)
    # make_manager waits for the gRPC and package ports, which the Manager opens before the page's
    wait_for(lambda: port_open(port), 20, interval=0.02, what="the web page to listen")
    return manager, f"127.0.0.1:{port}"


def get(url: str) -> tuple[int, dict[str, str], str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


def texts(driver: webdriver.Chrome, selector: str) -> list[str]:
    """The text of each match, read in one script: the live part of the page is replaced every 2 s."""
    return list(driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0])).map(e => e.innerText)", selector))


def node_step(driver: webdriver.Chrome, rollout_id: str, node: str) -> str:
    return str(driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.dataset.step : ''",
        f'li[data-rollout="{rollout_id}"][data-node="{node}"]'))


def follow_link(driver: webdriver.Chrome, text: str) -> None:
    """Go where the first link whose text starts with ``text`` points."""
    href = driver.execute_script(
        "const a = Array.from(document.querySelectorAll('a')).find(a => a.innerText.startsWith(arguments[0]));"
        "return a ? a.href : ''", text)
    assert href, f"no link {text!r}"
    driver.get(href)


def test_the_page_shows_a_paused_rollout_move_from_pending_to_succeeded_after_resume_without_a_reload(
        make_manager, make_supervisor, release: Release, browser: webdriver.Chrome):
    manager, web = web_manager(make_manager)
    hosts = fleet(make_supervisor, release, [manager], {"node-1": {"role": "web"}, "node-2": {"role": "web"}},
                  update={"health_window_s": CANARY_WINDOW_S})
    pkg = signed(release.build("1.1.0"))
    rollout_id = submit(manager, "--all", "--canary", "1", "--batch-size", "1", "--as", "alice", *package_args(pkg))
    wait_for(lambda: steps(manager, rollout_id)["node-1"] == "running", 30, interval=0.1, what="the canary")
    manager.cli("rollout", "pause", rollout_id)
    wait_for(lambda: steps(manager, rollout_id)["node-1"] == "succeeded", 30, interval=0.2,
             what="the canary to finish while paused")

    browser.get(f"http://{web}/")
    browser.execute_script("window.batonNoReload = 'same page'")
    assert node_step(browser, rollout_id, "node-1") == "succeeded"
    assert node_step(browser, rollout_id, "node-2") == "pending"
    [node_row] = texts(browser, 'tr[data-node="node-2"]')
    assert "online" in node_row and "role=web" in node_row

    manager.cli("rollout", "resume", rollout_id)
    WebDriverWait(browser, 60, poll_frequency=0.2).until(
        lambda d: node_step(d, rollout_id, "node-2") == "succeeded")
    assert browser.execute_script("return window.batonNoReload") == "same page", "the page was not reloaded"
    assert [len(journal_ids(h)) for h in hosts] == [1, 1]
    batches = texts(browser, f'h3[data-rollout="{rollout_id}"] + p + table tr[data-batch]')
    assert [b.split("\t")[:2] for b in batches] == [["canary", "1/1"], ["batch 1", "1/1"]], batches

    follow_link(browser, "node-2")  # its update history
    WebDriverWait(browser, 10).until(lambda d: texts(d, "tr[data-update]"))
    [row] = texts(browser, "tr[data-update]")
    assert "1.0.0 → 1.1.0" in row and "committed" in row and "alice@" in row, row


def report(stub: manager_pb2_grpc.ManagerServiceStub, node: str, update_id: str, reason: int, error: str) -> None:
    """A finished update's result as a supervisor reports it (state and flags follow the reason's kind)."""
    rolled_back = reason in (common_pb2.NEW_VERSION_EXITED, common_pb2.NEW_VERSION_NOT_READY)
    state = common_pb2.UPDATE_STATE_ROLLED_BACK if rolled_back else common_pb2.UPDATE_STATE_FAILED
    if reason == common_pb2.FAILURE_REASON_UNSPECIFIED:
        state = common_pb2.UPDATE_STATE_COMMITTED
    now = time.time()
    stub.ReportUpdateResult(common_pb2.UpdateResult(
        update_id=update_id, node_id=node, component="app", from_version="1.0.0", to_version="1.1.0",
        success=state == common_pb2.UPDATE_STATE_COMMITTED, rolled_back=rolled_back, error=error, state=state,
        reason=reason, started_at=now - 1, finished_at=now), timeout=10)


def test_the_page_groups_the_updates_that_did_not_commit_by_failure_reason(
        make_manager, browser: webdriver.Chrome):
    manager, web = web_manager(make_manager)
    with grpc.insecure_channel(manager.address) as ch:
        stub = manager_pb2_grpc.ManagerServiceStub(ch)
        for node in ("n1", "n2", "n3"):
            stub.Register(manager_pb2.RegisterRequest(node_id=node, supervisor_version="1.0.0"), timeout=10)
        report(stub, "n1", "u-1", common_pb2.HASH_MISMATCH, "sha256 differs")
        report(stub, "n2", "u-2", common_pb2.HASH_MISMATCH, "sha256 differs again")
        report(stub, "n3", "u-3", common_pb2.NEW_VERSION_EXITED, "exited with status 3")
        report(stub, "n3", "u-4", common_pb2.FAILURE_REASON_UNSPECIFIED, "")

    browser.get(f"http://{web}/")
    rows = texts(browser, "table.reasons tr[data-reason]")
    assert [r.split("\t")[:3] for r in rows] == [["HASH_MISMATCH", "2", "n1, n2"],
                                                 ["NEW_VERSION_EXITED", "1", "n3"]], rows
    follow_link(browser, "n3")  # the node's history names each update's reason
    WebDriverWait(browser, 10).until(lambda d: texts(d, 'tr[data-update="u-3"]'))
    [row] = texts(browser, 'tr[data-update="u-3"]')
    assert "NEW_VERSION_EXITED" in row and "exited with status 3" in row


def test_text_from_the_store_is_escaped_on_the_page_and_in_a_node_history(
        make_manager, browser: webdriver.Chrome):
    manager, web = web_manager(make_manager)
    node_id = 'evil"><b>node'
    with grpc.insecure_channel(manager.address) as ch:
        stub = manager_pb2_grpc.ManagerServiceStub(ch)
        stub.Register(manager_pb2.RegisterRequest(node_id=node_id, supervisor_version=HOSTILE, hostname=HOSTILE,
                                                  labels={"role": HOSTILE}), timeout=10)
        stub.ReportUpdateResult(common_pb2.UpdateResult(
            update_id="u-1", node_id=node_id, component="app", from_version="1.0.0", to_version="1.1.0",
            success=False, rolled_back=True, error=f"health check failed: {HOSTILE}",
            state=common_pb2.UPDATE_STATE_ROLLED_BACK, started_at=time.time() - 1, finished_at=time.time()),
            timeout=10)

    status, headers, body = get(f"http://{web}/")
    assert status == 200 and HOSTILE not in body and "<b>node" not in body
    assert "&lt;img src=x onerror=&quot;document.title=1&quot;&gt;" in body
    assert "default-src 'none'" in headers["Content-Security-Policy"]

    browser.get(f"http://{web}/")
    assert browser.find_elements(By.TAG_NAME, "img") == [] and browser.find_elements(By.TAG_NAME, "b") == []
    follow_link(browser, "evil")
    WebDriverWait(browser, 10).until(lambda d: texts(d, 'tr[data-update="u-1"]'))
    [error] = texts(browser, 'tr[data-update="u-1"] td.error')
    assert error == f"health check failed: {HOSTILE}", "the error is shown as text, not markup"
    assert browser.title == f"Node {node_id}" and browser.find_elements(By.TAG_NAME, "img") == []


def test_the_page_without_tls_on_a_non_loopback_address_is_refused_with_one_line(tmp_path):
    port = free_port()
    res = subprocess.run([PY, "-m", "manager", "serve", "--db", str(tmp_path / "m.db"), "--listen",
                          f"127.0.0.1:{free_port()}", "--insecure-loopback", "--web", f"0.0.0.0:{port}"],
                         capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"baton-manager: --web 0.0.0.0:{port}: without --tls-* the page listens on loopback only (127.0.0.1, ::1): "
        "no unauthenticated TCP"]


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    d = tmp_path / "pki"
    ca = make_ca(d)
    manager = issue_manager(ca, d, "manager-1")
    node = issue_node(ca, d, "node-1")
    other = issue_manager(make_ca(d / "other", "Some other CA"), d / "other", "manager-1")
    alice, bob = issue_operator(ca, d, "alice"), issue_operator(ca, d, "bob")
    dns_node = issue(ca, d, "dns-node", "web-1", [x509.DNSName("web-1")])  # a host named by DNS alone
    return {"ca": ca.files.cert, "cert": manager.cert, "key": manager.key, "node_cert": node.cert,
            "node_key": node.key, "other_cert": other.cert, "other_key": other.key, "alice_cert": alice.cert,
            "alice_key": alice.key, "bob_cert": bob.cert, "bob_key": bob.key, "dns_node_cert": dns_node.cert,
            "dns_node_key": dns_node.key}


def tls_get(web: str, pki: dict[str, Path], who: str | None) -> int:
    ctx = ssl.create_default_context(cafile=str(pki["ca"]))
    ctx.check_hostname = False  # the server certificate names manager-1, we dial 127.0.0.1
    if who is not None:
        ctx.load_cert_chain(pki[f"{who}cert"], pki[f"{who}key"])
    host, port = web.split(":")
    conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=10)
    try:
        conn.request("GET", "/")
        return conn.getresponse().status
    finally:
        conn.close()


def test_with_tls_the_page_requires_an_operator_certificate_from_the_managers_ca(make_manager, pki):
    manager, web = web_manager(make_manager, tls={"ca": pki["ca"], "cert": pki["cert"], "key": pki["key"]})
    assert tls_get(web, pki, "") == 200, "the Manager's own certificate (as the CLI uses) may read it"
    assert tls_get(web, pki, "node_") == 403, "a node's certificate may not"
    for who in (None, "other_"):  # no certificate, or one from another CA: no handshake
        with pytest.raises((ssl.SSLError, ConnectionError)):
            tls_get(web, pki, who)
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://{web}/", timeout=10)  # plain HTTP gets nothing
    assert manager.proc is not None and manager.proc.poll() is None


def test_with_tls_only_an_operator_certificate_reads_the_page_not_any_other_the_ca_signed(make_manager, pki):
    manager, web = web_manager(make_manager, tls={"ca": pki["ca"], "cert": pki["cert"], "key": pki["key"]})
    assert tls_get(web, pki, "alice_") == 200, "an operator's certificate (dev_ca.py --operator)"
    assert tls_get(web, pki, "dns_node_") == 403, "a host's certificate that names it by DNS alone"
    assert tls_get(web, pki, "node_") == 403
    assert manager.proc is not None and manager.proc.poll() is None


def test_web_allow_names_exactly_who_reads_the_page_and_never_a_node(make_manager, pki):
    _, web = web_manager(make_manager, tls={"ca": pki["ca"], "cert": pki["cert"], "key": pki["key"]},
                         args=("--web-allow", "URI:spiffe://baton/operator/bob", "--web-allow", "web-1",
                               "--web-allow", "node-1"))
    assert tls_get(web, pki, "bob_") == 200
    assert tls_get(web, pki, "dns_node_") == 200, "named by the list"
    assert tls_get(web, pki, "alice_") == 403, "an operator the list does not name"
    assert tls_get(web, pki, "") == 403, "the Manager's own certificate, once a list is given"
    assert tls_get(web, pki, "node_") == 403, "a node's certificate, even when the list names it"


def test_web_allow_without_tls_is_refused_with_one_line(tmp_path):
    res = subprocess.run([PY, "-m", "manager", "serve", "--db", str(tmp_path / "m.db"), "--listen",
                          f"127.0.0.1:{free_port()}", "--insecure-loopback", "--web", f"127.0.0.1:{free_port()}",
                          "--web-allow", "alice"],
                         capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert (res.returncode, res.stderr.strip().splitlines()) == (2, [
        "baton-manager: --web-allow names client certificates: it needs --tls-cert, --tls-key and --tls-ca"])


def raw_get(web: str, host: str | None) -> tuple[int, str]:
    """GET / with exactly this Host header (none when None), as a page a browser loaded elsewhere would send."""
    addr, port = web.rsplit(":", 1)
    with socket.create_connection((addr, int(port)), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\n" + (f"Host: {host}\r\n".encode() if host is not None else b"")
                  + b"Connection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


def test_a_request_whose_host_names_another_site_gets_421_and_no_page_content(make_manager):
    manager, web = web_manager(make_manager, args=("--web-host", "fleet.example.org"))
    with grpc.insecure_channel(manager.address) as ch:
        manager_pb2_grpc.ManagerServiceStub(ch).Register(
            manager_pb2.RegisterRequest(node_id="secret-node", supervisor_version="1.0.0"), timeout=10)
    port = web.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1.evil.example:{port}", "", None):
        status, body = raw_get(web, host)
        assert status == 421 and "secret-node" not in body and "<html" not in body, (host, status, body)
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "fleet.example.org", f"FLEET.example.org.:{port}"):
        status, body = raw_get(web, host)
        assert status == 200 and "secret-node" in body, (host, status)
