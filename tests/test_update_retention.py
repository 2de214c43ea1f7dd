"""Update journals are pruned: final records past ``update.keep_updates``/``keep_updates_days`` are removed
durably at start and after each update settles, never one that is unfinished or not yet reported to the Manager."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from baton.journal import Journal
from tests.conftest import RecordingManager, UpdateHost, free_port, install_version, serve_manager, wait_for

pytestmark = pytest.mark.e2e  # every test here starts a process


def _host(make_supervisor, release, update: dict, manager_port: int = 0) -> UpdateHost:
    extra: dict = {"update": {"trusted_keys": [str(release.public_key)], "health_window_s": 0.2,
                              "free_space_reserve_bytes": 0, **update}}
    if manager_port:
        extra["manager"] = {"address": f"127.0.0.1:{manager_port}", "retry_initial_s": 0.1, "retry_max_s": 0.3,
                            "heartbeat_interval_s": 0.5}
    sup = make_supervisor([{"name": "app", "packaged": True, "command": "bin/agent", "notify": True}], extra=extra)
    install_version(sup.base / "install", "app", "1.0.0", release.tree("1.0.0"))
    sup.start()
    sup.wait_agent("app", "running")
    return UpdateHost(sup, release)


def _records(host: UpdateHost) -> list[str]:
    return [r.update_id for r in Journal(host.sup.state_dir).all()]


def _update_to(host: UpdateHost, version: str) -> str:
    uid = host.push(host.release.build(version))
    assert host.wait_final(uid).success
    return uid


def test_only_the_newest_keep_updates_records_are_kept(make_supervisor, release):
    host = _host(make_supervisor, release, {"keep_updates": 2})
    ids = [_update_to(host, v) for v in ("1.1.0", "1.2.0", "1.3.0", "1.4.0")]
    wait_for(lambda: _records(host) == ids[2:], 10, what="the journal to keep the newest two")
    wait_for(lambda: {p.name for p in (host.sup.state_dir / "updates").iterdir()} - {"locks"} == set(ids[2:]), 10,
             what="nothing else left in the journal directory")


def test_records_older_than_keep_updates_days_are_pruned_at_start(make_supervisor, release):
    host = _host(make_supervisor, release, {})
    ids = [_update_to(host, v) for v in ("1.1.0", "1.2.0")]
    assert _records(host) == ids
    host.sup.terminate()
    time.sleep(1.0)
    host.sup.cfg["update"]["keep_updates_days"] = 0.5 / 86400
    host.sup.start()
    assert _records(host) == []


def test_records_not_yet_reported_to_the_manager_are_kept_until_they_are(make_supervisor, release):
    port = free_port()
    host = _host(make_supervisor, release, {"keep_updates": 0}, manager_port=port)
    ids = [_update_to(host, v) for v in ("1.1.0", "1.2.0")]
    time.sleep(1.0)
    assert _records(host) == ids
    mgr = RecordingManager()
    server = serve_manager(port, mgr)
    try:
        wait_for(lambda: len(mgr.results) == 2, 30, what="both results")
        wait_for(lambda: _records(host) == [], 10, what="the reported records to be pruned")
    finally:
        server.stop(0)


def _ended(host: UpdateHost, update_id: str) -> bool:
    """With keep_updates = 0 and no Manager a record may be pruned the moment it settles, so gone counts as ended."""
    recs = {r.update_id: r for r in Journal(host.sup.state_dir).all()}
    return update_id not in recs or recs[update_id].final


def test_unfinished_update_is_never_pruned(make_supervisor, release, pkgserver):
    host = _host(make_supervisor, release, {"keep_updates": 0})
    done = host.push(release.build("1.1.0"))
    wait_for(lambda: _ended(host, done), 60, what="the first update to finish")
    wait_for(lambda: host.sup.agent("app").version == "1.1.0", 10, what="1.1.0 to be running")
    pkg = release.build("1.2.0")
    (pkgserver.root / pkg.path.name).write_bytes(pkg.path.read_bytes())
    pkgserver.on(pkg.path.name).stall_after(100, 5.0)
    running = host.push(pkg, download_url=pkgserver.url(pkg.path.name))
    wait_for(lambda: pkgserver.requests_for(pkg.path.name), 30, what="the download to start")
    host.sup.terminate()
    host.sup.start()
    assert running in _records(host) and done not in _records(host)
    wait_for(lambda: _ended(host, running), 60, what="the unfinished update to finish")


@pytest.mark.parametrize(("key", "value", "problem"), [
    ("keep_updates", -1, "update.keep_updates: must be 0 or more"),
    ("keep_updates_days", 0, "update.keep_updates_days: must be finite and greater than 0"),
    ("keep_updates_days", float("inf"), "update.keep_updates_days: must be a finite number"),
])
def test_bad_retention_is_refused_by_check_config(tmp_path, key, value, problem):
    from tests.conftest import dump_toml

    cfg = {"node": {"id": "n1", "state_dir": str(tmp_path / "state")}, "grpc": {"unix_socket": str(tmp_path / "s")},
           "update": {key: value}}
    path = tmp_path / "supervisor.toml"
    path.write_text(dump_toml(cfg))
    res = subprocess.run([sys.executable, "-m", "supervisor", "check-config", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert problem in res.stderr + res.stdout
    assert "Traceback" not in res.stderr
