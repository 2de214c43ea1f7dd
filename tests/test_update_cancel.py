"""DaemonService.CancelUpdate against a real supervisor, helper, agent and package server.

Before SWITCHING a cancel ends the update FAILED with the reason "cancelled",
removes the download and anything staged, and leaves the agent alone; from
SWITCHING on it rolls back to the old version. A final update is returned
unchanged, and a cancelled update is reported to the Manager once.
"""

from __future__ import annotations

import os
import time

import pytest

from baton.journal import CANCELLED
from baton.marks import Marks
from baton.pb import common_pb2, daemon_pb2
from tests.conftest import (
    RecordingManager,
    UpdateHost,
    free_port,
    install_version,
    serve_manager,
    wait_for,
)

pytestmark = pytest.mark.e2e  # every test here starts a process

FAILED = common_pb2.UPDATE_STATE_FAILED
ROLLED_BACK = common_pb2.UPDATE_STATE_ROLLED_BACK
COMMITTED = common_pb2.UPDATE_STATE_COMMITTED
WATCHING = common_pb2.UPDATE_STATE_WATCHING


def _host(make_supervisor, release, update: dict | None = None, manager_port: int = 0) -> UpdateHost:
    extra: dict = {"update": {"trusted_keys": [str(release.public_key)], "health_window_s": 0.5,
                              "free_space_reserve_bytes": 0, **(update or {})}}
    if manager_port:
        extra["manager"] = {"address": f"127.0.0.1:{manager_port}", "retry_initial_s": 0.1, "retry_max_s": 0.3,
                            "heartbeat_interval_s": 0.5}
    sup = make_supervisor([{"name": "app", "packaged": True, "command": "bin/agent", "notify": True}], extra=extra)
    install_version(sup.base / "install", "app", "1.0.0", release.tree("1.0.0"))
    sup.start()
    sup.wait_agent("app", "running")
    return UpdateHost(sup, release)


def _slow_package(host: UpdateHost, pkgserver, version: str = "1.1.0"):
    """A 2 MiB package served at 64 KiB/s: half a minute of DOWNLOADING."""
    tree = host.release.tree(version)
    (tree / "blob.bin").write_bytes(os.urandom(2 * 1024 * 1024))
    pkg = host.release.build(version, tree=tree)
    (pkgserver.root / pkg.path.name).write_bytes(pkg.path.read_bytes())
    pkgserver.on(pkg.path.name).rate_limit(64 * 1024)
    return pkg, pkgserver.url(pkg.path.name)


def _cancel(host: UpdateHost, update_id: str) -> daemon_pb2.UpdateStatus:
    return host.sup.stub.CancelUpdate(daemon_pb2.UpdateRef(update_id=update_id), timeout=30)


def _downloading(host: UpdateHost, update_id: str) -> bool:
    st = host.sup.stub.GetUpdate(daemon_pb2.UpdateRef(update_id=update_id), timeout=5)
    return st.step == "downloading" and st.bytes_done > 0


def test_cancel_during_a_slow_download_ends_failed_and_removes_the_download(make_supervisor, release, pkgserver):
    host = _host(make_supervisor, release)
    before, before_disk = host.sup.agent("app"), host.disk()
    pkg, url = _slow_package(host, pkgserver)
    uid = host.push(pkg, download_url=url)
    wait_for(lambda: _downloading(host, uid), 30, what="the download to be under way")
    st = _cancel(host, uid)
    if not st.finished:
        st = host.wait_final(uid, timeout=30)
    assert (st.state, st.error, st.success, st.rolled_back) == (FAILED, CANCELLED, False, False)
    assert st.bytes_done < pkg.size
    assert not any((host.sup.state_dir / "downloads").iterdir())
    assert host.disk() == before_disk
    after = host.sup.agent("app")
    assert (after.pid, after.restarts, after.version) == (before.pid, before.restarts, before.version)
    assert "1.1.0" not in Marks(host.sup.state_dir).failed("app")


def test_cancel_interrupts_a_download_stalled_on_a_silent_server(make_supervisor, release, pkgserver):
    """No byte arrives, so only the signal can end it: without it the helper would sit out the read timeout."""
    host = _host(make_supervisor, release, update={"read_timeout_s": 300.0, "min_rate_window_s": 300.0})
    pkg, url = _slow_package(host, pkgserver)
    pkgserver.on(pkg.path.name).reset().stall_after(1000, 300.0)
    uid = host.push(pkg, download_url=url)
    wait_for(lambda: pkgserver.requests_for(pkg.path.name), 30, what="the download to start")
    time.sleep(0.5)
    _cancel(host, uid)
    st = host.wait_final(uid, timeout=30)
    assert (st.state, st.error) == (FAILED, CANCELLED)
    assert not any((host.sup.state_dir / "downloads").iterdir())


def test_cancel_right_after_the_push_ends_failed_before_any_switch(make_supervisor, release, pkgserver):
    host = _host(make_supervisor, release)
    before, before_disk = host.sup.agent("app"), host.disk()
    pkg, url = _slow_package(host, pkgserver)
    uid = host.push(pkg, download_url=url)
    _cancel(host, uid)
    st = host.wait_final(uid, timeout=30)
    assert (st.state, st.error) == (FAILED, CANCELLED)
    assert host.disk() == before_disk
    assert host.sup.agent("app").pid == before.pid
    assert not any((host.sup.state_dir / "downloads").iterdir())


def test_cancel_during_watching_rolls_back_to_the_old_version(make_supervisor, release):
    host = _host(make_supervisor, release, update={"health_window_s": 60.0})
    uid = host.push(release.build("1.1.0"))
    wait_for(lambda: host.sup.stub.GetUpdate(daemon_pb2.UpdateRef(update_id=uid)).state == WATCHING, 30,
             what="the update to be watching")
    assert host.sup.agent("app").version == "1.1.0"
    _cancel(host, uid)
    st = host.wait_final(uid, timeout=60)
    assert (st.state, st.error, st.rolled_back, st.success) == (ROLLED_BACK, CANCELLED, True, False)
    assert host.sup.wait_agent("app", "running").version == "1.0.0"
    assert host.layout.current_version() == "1.0.0"
    assert host.layout.installed_versions() == ["1.0.0"]
    assert "1.1.0" not in Marks(host.sup.state_dir).failed("app")
    assert Marks(host.sup.state_dir).highest("app") is None


def test_cancelled_update_is_reported_to_the_manager_exactly_once(make_supervisor, release, pkgserver):
    port = free_port()
    mgr = RecordingManager()
    server = serve_manager(port, mgr)
    try:
        host = _host(make_supervisor, release, manager_port=port)
        pkg, url = _slow_package(host, pkgserver)
        uid = host.push(pkg, download_url=url)
        wait_for(lambda: _downloading(host, uid), 30, what="the download to be under way")
        _cancel(host, uid)
        wait_for(lambda: mgr.results, 30, what="the result")
        time.sleep(2.0)
        assert [(r.update_id, r.state, r.error) for r in mgr.results] == [(uid, FAILED, CANCELLED)]
        assert (host.sup.state_dir / "updates" / uid / "reported").exists()
    finally:
        server.stop(0)


def test_self_update_cancelled_during_its_download_leaves_the_supervisor_running(make_self_host, pkgserver):
    host = make_self_host()
    pid = host.sup.status().pid
    pkg = host.supervisor_package("1.1.0")
    (pkgserver.root / pkg.path.name).write_bytes(pkg.path.read_bytes())
    pkgserver.on(pkg.path.name).rate_limit(max(pkg.size // 20, 2048))
    uid = host.push(pkg, download_url=pkgserver.url(pkg.path.name))
    wait_for(lambda: _downloading(host, uid), 30, what="the download to be under way")
    _cancel(host, uid)
    st = host.wait_final(uid, timeout=30)
    assert (st.state, st.error) == (FAILED, CANCELLED)
    assert host.sup.status().pid == pid
    assert host.sup_layout.current_version() == "1.0.0"
    assert host.sup_layout.installed_versions() == ["1.0.0"]


def test_supervisor_cancel_command_cancels_a_running_update(make_supervisor, release, pkgserver):
    import subprocess
    import sys

    host = _host(make_supervisor, release)
    before = host.sup.agent("app")
    pkg, url = _slow_package(host, pkgserver)
    uid = host.push(pkg, download_url=url)
    wait_for(lambda: _downloading(host, uid), 30, what="the download to be under way")
    r = subprocess.run([sys.executable, "-m", "supervisor", "cancel", uid, "--config", str(host.sup.config_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"update {uid}: ")
    st = host.wait_final(uid, timeout=30)
    assert (st.state, st.error) == (FAILED, CANCELLED)
    after = host.sup.agent("app")
    assert (after.pid, after.version) == (before.pid, before.version)
