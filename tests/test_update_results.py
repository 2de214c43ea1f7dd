"""Every update result reaches the Manager, and survives a supervisor killed before it was delivered."""

from __future__ import annotations

import pytest

from baton.pb import common_pb2
from tests.conftest import RecordingManager, UpdateHost, free_port, install_version, serve_manager, wait_for

pytestmark = pytest.mark.e2e  # every test here starts a process


def host_with_manager(make_supervisor, release, port: int) -> UpdateHost:
    sup = make_supervisor(
        [{"name": "app", "packaged": True, "command": "bin/agent", "notify": True}],
        extra={"update": {"trusted_keys": [str(release.public_key)], "health_window_s": 0.2,
                          "free_space_reserve_bytes": 0},
               "manager": {"address": f"127.0.0.1:{port}", "retry_initial_s": 0.1, "retry_max_s": 0.3,
                           "heartbeat_interval_s": 0.5}},
    )
    install_version(sup.base / "install", "app", "1.0.0", release.tree("1.0.0"))
    sup.start()
    sup.wait_agent("app", "running")
    return UpdateHost(sup, release)


def test_result_is_reported_to_the_manager_with_versions_and_timings(make_supervisor, release):
    port = free_port()
    mgr = RecordingManager()
    server = serve_manager(port, mgr)
    try:
        host = host_with_manager(make_supervisor, release, port)
        uid = host.push(release.build("1.1.0"))
        wait_for(lambda: mgr.results, 30, what="the result")
        r = mgr.results[0]
        assert (r.update_id, r.node_id, r.component, r.from_version, r.to_version) == \
            (uid, "node-1", "app", "1.0.0", "1.1.0")
        assert r.success and not r.rolled_back
        assert r.state == common_pb2.UPDATE_STATE_COMMITTED
        assert {t.step for t in r.timings} >= {"download", "verify", "health"}
        assert r.finished_at >= r.started_at > 0
    finally:
        server.stop(0)


def test_rolled_back_result_is_reported_with_its_reason(make_supervisor, release):
    port = free_port()
    mgr = RecordingManager()
    server = serve_manager(port, mgr)
    try:
        host = host_with_manager(make_supervisor, release, port)
        host.push(release.build("1.1.0", "exit_at_once"))
        wait_for(lambda: mgr.results, 60, what="the result")
        r = mgr.results[0]
        assert r.rolled_back and not r.success
        assert r.error
    finally:
        server.stop(0)


def test_supervisor_killed_before_delivering_reports_the_result_once_after_restart(make_supervisor, release):
    port = free_port()
    host = host_with_manager(make_supervisor, release, port)
    uid = host.push(release.build("1.1.0"))
    assert host.wait_final(uid).success
    host.sup.kill()
    mgr = RecordingManager()
    server = serve_manager(port, mgr)
    try:
        host.sup.start()
        wait_for(lambda: mgr.results, 30, what="the result after the restart")
        import time

        time.sleep(2.0)
        assert [r.update_id for r in mgr.results] == [uid]
        assert (host.sup.state_dir / "updates" / uid / "reported").exists()
    finally:
        server.stop(0)
