"""A pushed agent update is carried out end to end by a real helper process.

Every refusal is checked twice: the update ends FAILED with the reason, and
nothing changed on disk outside the download and journal areas, and the running
agent was not touched (same pid, no restart).
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from baton.pb import common_pb2, daemon_pb2
from tests.conftest import install_version, wait_for
from tests.hostile_archives import write_hostile_archive

pytestmark = pytest.mark.e2e  # every test here starts a process

COMMITTED = common_pb2.UPDATE_STATE_COMMITTED
FAILED = common_pb2.UPDATE_STATE_FAILED
ROLLED_BACK = common_pb2.UPDATE_STATE_ROLLED_BACK


def refused(update_host, pkg, error_part: str, reason: str, **overrides) -> daemon_pb2.UpdateStatus:
    """Push, expect FAILED naming ``error_part`` with the stable failure ``reason`` code, and prove nothing
    changed."""
    before_disk = update_host.disk()
    before = update_host.sup.agent("app")
    st = update_host.wait_final(update_host.push(pkg, **overrides))
    assert st.state == FAILED, (st.state, st.error)
    assert not st.success and not st.rolled_back
    assert error_part in st.error, st.error
    assert common_pb2.FailureReason.Name(st.reason) == reason, (st.reason, st.error)
    after = update_host.sup.agent("app")
    assert (after.pid, after.restarts, after.version) == (before.pid, before.restarts, before.version)
    assert update_host.disk() == before_disk
    assert not any(update_host.sup.state_dir.joinpath("downloads").iterdir())
    return st


def rejected_at_push(update_host, request, code, error_part: str) -> None:
    before_disk = update_host.disk()
    before = update_host.sup.agent("app")
    with pytest.raises(grpc.RpcError) as e:
        update_host.sup.stub.PushUpdate(request, timeout=10)
    assert e.value.code() == code
    assert error_part in e.value.details()
    assert update_host.disk() == before_disk
    assert update_host.sup.agent("app").pid == before.pid


# ---- the happy path ----------------------------------------------------------------------------------------


@pytest.mark.standby_helper  # the production default: its supervisor keeps a standby helper
def test_push_installs_the_new_version_and_runs_it(update_host):
    old = update_host.sup.agent("app")
    pkg = update_host.release.build("1.1.0")
    uid = update_host.push(pkg)
    st = update_host.wait_final(uid)
    assert st.success, st.error
    assert st.state == COMMITTED
    assert (st.from_version, st.to_version) == ("1.0.0", "1.1.0")
    assert {t.step for t in st.timings} >= {"download", "verify", "stage", "switch", "restart", "health"}
    app = update_host.sup.agent("app")
    assert app.version == "1.1.0"
    assert app.state == common_pb2.AGENT_STATE_RUNNING
    assert app.pid != old.pid
    assert update_host.layout.current_version() == "1.1.0"
    assert update_host.layout.installed_versions() == ["1.1.0", "1.0.0"]
    assert not any(update_host.sup.state_dir.joinpath("downloads").iterdir())


def test_push_over_http_reports_progress_through_watch_update(update_host, pkgserver):
    pkg = update_host.release.build("1.1.0")
    served = pkgserver.root / pkg.path.name
    served.write_bytes(pkg.path.read_bytes())
    pkgserver.on(pkg.path.name).rate_limit(max(pkg.size // 2, 2048))
    uid = update_host.push(pkg, download_url=pkgserver.url(pkg.path.name))
    seen = list(update_host.sup.stub.WatchUpdate(daemon_pb2.UpdateRef(update_id=uid), timeout=60))
    steps = [s.step for s in seen]
    assert steps[0] in ("requested", "downloading")
    assert "downloading" in steps and seen[-1].step == "committed"
    assert seen[-1].finished and seen[-1].success
    assert any(s.bytes_done > 0 for s in seen if s.step == "downloading")
    assert seen[-1].bytes_total == pkg.size


def test_max_backups_keeps_only_the_newest_versions(update_host):
    for v in ("1.1.0", "1.2.0", "1.3.0", "1.4.0"):
        st = update_host.wait_final(update_host.push(update_host.release.build(v)))
        assert st.success, st.error
    assert update_host.layout.current_version() == "1.4.0"
    assert update_host.layout.installed_versions() == ["1.4.0", "1.3.0", "1.2.0"]
    assert not (update_host.layout.versions_dir / "1.0.0").exists()


def test_different_components_update_in_parallel(make_supervisor, release):
    agents = [{"name": n, "packaged": True, "command": "bin/agent", "notify": True} for n in ("a", "b")]
    sup = make_supervisor(agents, extra={"update": {"trusted_keys": [str(release.public_key)],
                                                    "health_window_s": 1.0, "free_space_reserve_bytes": 0}})
    for n in ("a", "b"):
        install_version(sup.base / "install", n, "1.0.0", release.tree("1.0.0"))
    sup.start()
    ids = [sup.stub.PushUpdate(release.build("2.0.0", component=n).request(), timeout=10).update_id for n in "ab"]
    for uid in ids:
        wait_for(lambda uid=uid: sup.stub.GetUpdate(daemon_pb2.UpdateRef(update_id=uid)).state == COMMITTED, 60,
                 what=f"update {uid}")
    assert {a.name: a.version for a in sup.status().agents} == {"a": "2.0.0", "b": "2.0.0"}


# ---- refused at push ---------------------------------------------------------------------------------------


def test_concurrent_push_for_the_same_component_names_the_running_update(update_host, pkgserver):
    pkg = update_host.release.build("1.1.0")
    (pkgserver.root / pkg.path.name).write_bytes(pkg.path.read_bytes())
    pkgserver.on(pkg.path.name).stall_after(10, 3.0)
    first = update_host.push(pkg, download_url=pkgserver.url(pkg.path.name))
    with pytest.raises(grpc.RpcError) as e:
        update_host.push(update_host.release.build("1.2.0"))
    assert e.value.code() == grpc.StatusCode.ABORTED
    assert first in e.value.details()
    update_host.wait_final(first)


def test_downgrade_is_refused(update_host):
    pkg = update_host.release.build("0.9.0")
    rejected_at_push(update_host, pkg.request(), grpc.StatusCode.FAILED_PRECONDITION, "not newer than 1.0.0")


def test_replay_of_an_older_signed_package_is_refused_after_an_upgrade(update_host):
    old_pkg = update_host.release.build("1.1.0")
    assert update_host.wait_final(update_host.push(old_pkg)).success
    assert update_host.wait_final(update_host.push(update_host.release.build("1.2.0"))).success
    rejected_at_push(update_host, old_pkg.request(), grpc.StatusCode.FAILED_PRECONDITION, "not newer than 1.2.0")


def test_downgrade_is_allowed_when_the_request_says_so(update_host):
    st = update_host.wait_final(update_host.push(update_host.release.build("0.9.0"), allow_downgrade=True))
    assert st.success, st.error
    assert update_host.sup.agent("app").version == "0.9.0"


# ---- refused by the helper: signature, hash, manifest -------------------------------------------------------


def test_package_signed_by_an_untrusted_key_is_refused(update_host, tmp_path):
    from baton.signing import generate_keypair

    other, _ = generate_keypair()
    pkg = update_host.release.build("1.1.0")
    bad = update_host.release.sign(pkg.path, "app", "1.1.0", secret=other)
    refused(update_host, bad, "UntrustedKey", "SIGNATURE_UNTRUSTED_KEY")


def test_no_trusted_key_means_every_update_is_refused(update_host):
    update_host.release.public_key.unlink()
    # refused at push time (issue 25: the agents run on, test_degrade), before a helper is spawned
    rejected_at_push(update_host, update_host.release.build("1.1.0").request(), grpc.StatusCode.FAILED_PRECONDITION,
                     "update.trusted_keys[0]: file ")


def test_hash_mismatch_is_refused(update_host):
    pkg = update_host.release.build("1.1.0")
    refused(update_host, pkg, "HashMismatch", "HASH_MISMATCH", sha256="0" * 64)


def test_package_naming_this_node_is_accepted(update_host):
    pkg = update_host.release.build("1.1.0", nodes=["node-7", "node-1"])
    assert update_host.wait_final(update_host.push(pkg)).success


# ---- refused by the helper: the download ----------------------------------------------------------------------


def test_404_is_refused(update_host, pkgserver):
    pkg = update_host.release.build("1.1.0")
    refused(update_host, pkg, "404", "DOWNLOAD_UNREACHABLE", download_url=pkgserver.url("missing.tar.gz"))


def test_connection_refused_is_refused(update_host):
    from tests.conftest import free_port

    pkg = update_host.release.build("1.1.0")
    refused(update_host, pkg, "ConnectionFailed", "DOWNLOAD_UNREACHABLE", download_url=f"http://127.0.0.1:{free_port()}/p.tar.gz")


# ---- refused by the helper: hostile archives ----------------------------------------------------------------------


def _evil(update_host, name: str) -> object:
    path = update_host.release.base / "pkgs" / f"evil-{name}.tar"
    write_hostile_archive(path, name)
    return update_host.release.sign(path, "app", "1.1.0")


# One kind with real processes; every kind in-process: tests/test_update_matrix.py.
@pytest.mark.parametrize("kind", ["dotdot"])
def test_hostile_archive_is_refused(make_supervisor, release, kind):
    sup = make_supervisor(
        [{"name": "app", "packaged": True, "command": "bin/agent", "notify": True}],
        extra={"update": {"trusted_keys": [str(release.public_key)], "max_files": 50,
                          "max_unpacked_bytes": 200_000, "free_space_reserve_bytes": 0}},
    )
    install_version(sup.base / "install", "app", "1.0.0", release.tree("1.0.0"))
    sup.start()
    sup.wait_agent("app", "running")
    from tests.conftest import UpdateHost

    host = UpdateHost(sup, release)
    st = refused(host, _evil(host, kind), "Archive" if kind.startswith("too_many") else "Unsafe",
                 "UNSAFE_ARCHIVE")
    assert not Path("/tmp/baton-evil-abs").exists()
    assert not any(p.name.startswith(".staging") for p in host.layout.versions_dir.iterdir())
    assert st.error


# ---- the new version is unhealthy: roll back ----------------------------------------------------------------------


# One failure family with real processes here (never_ready: test_failure_reasons.py, die_after_ready: the chaos
# test); every health failure in-process: tests/test_update_matrix.py.
@pytest.mark.parametrize("behaviour", ["exit_at_once"])
def test_unhealthy_new_version_is_rolled_back(update_host, behaviour):
    before = update_host.sup.agent("app")
    st = update_host.wait_final(update_host.push(update_host.release.build("1.1.0", behaviour)), timeout=90)
    assert st.state == ROLLED_BACK, st.error
    assert st.rolled_back and not st.success
    assert st.error
    app = update_host.sup.wait_agent("app", "running")
    assert app.version == "1.0.0"
    assert app.pid != before.pid
    assert update_host.layout.current_version() == "1.0.0"
    assert update_host.layout.installed_versions() == ["1.0.0"]
    journal = update_host.journal(st.update_id)
    assert "versioned_agent 1.1.0" in journal.last_log or behaviour == "never_ready"


def test_rolled_back_version_is_not_retried_unless_forced(update_host):
    st = update_host.wait_final(update_host.push(update_host.release.build("1.1.0", "exit_at_once")), timeout=60)
    assert st.rolled_back
    good = update_host.release.build("1.1.0")
    rejected_at_push(update_host, good.request(), grpc.StatusCode.FAILED_PRECONDITION, "failed before")
    assert update_host.wait_final(update_host.push(good, force=True)).success


def test_rolled_back_update_does_not_move_the_high_water_mark(update_host):
    from baton.marks import Marks

    update_host.wait_final(update_host.push(update_host.release.build("1.1.0", "exit_at_once")), timeout=60)
    assert Marks(update_host.sup.state_dir).highest("app") is None
    assert update_host.wait_final(update_host.push(update_host.release.build("1.0.5"))).success
    assert Marks(update_host.sup.state_dir).highest("app") == "1.0.5"


# ---- manual recovery --------------------------------------------------------------------------------------------


def test_helper_rollback_switches_back_and_restarts_through_the_supervisor(update_host):
    import subprocess
    import sys

    assert update_host.wait_final(update_host.push(update_host.release.build("1.1.0"))).success
    res = subprocess.run([sys.executable, "-m", "helper", "--config", str(update_host.sup.config_path),
                          "--rollback", "app"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "1.1.0 -> 1.0.0" in res.stdout
    assert update_host.sup.wait_agent("app", "running").version == "1.0.0"
    assert update_host.layout.current_version() == "1.0.0"


def test_helper_rollback_without_a_component_names_the_choices_and_changes_nothing(update_host):
    import subprocess
    import sys

    assert update_host.wait_final(update_host.push(update_host.release.build("1.1.0"))).success
    pid = update_host.sup.agent("app").pid
    res = subprocess.run([sys.executable, "-m", "helper", "--config", str(update_host.sup.config_path),
                          "--rollback"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert res.stderr.strip() == ("helper --rollback: name the component to roll back: one of app, supervisor "
                                  "(helper --rollback COMPONENT)")
    assert update_host.layout.current_version() == "1.1.0" and update_host.sup.agent("app").pid == pid


def test_helper_rollback_with_the_supervisor_down_only_switches_the_link(update_host):
    import subprocess
    import sys

    assert update_host.wait_final(update_host.push(update_host.release.build("1.1.0"))).success
    update_host.sup.terminate()
    res = subprocess.run([sys.executable, "-m", "helper", "--config", str(update_host.sup.config_path),
                          "--rollback", "app"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "not running" in res.stdout
    assert update_host.layout.current_version() == "1.0.0"
    update_host.sup.start()
    assert update_host.sup.wait_agent("app", "running").version == "1.0.0"


def test_helper_status_lists_versions_and_unfinished_updates(update_host):
    import subprocess
    import sys

    assert update_host.wait_final(update_host.push(update_host.release.build("1.1.0"))).success
    res = subprocess.run([sys.executable, "-m", "helper", "--config", str(update_host.sup.config_path), "--status"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("app"))
    assert "1.1.0" in line and "1.0.0" in line
    assert "no unfinished update" in res.stdout


# ---- crash safety: SIGKILL of the helper after each step -----------------------------------------------------------


# A representative step before the switch and one after it; a kill after every durable write, of a good, a
# failing and a refused update, is in-process: tests/test_update_matrix.py.
PRE = ["downloading"]
POST = ["watching"]


@pytest.mark.parametrize("step", PRE + POST)
def test_helper_killed_after_a_step_ends_committed_or_rolled_back(make_supervisor, release, step, tmp_path):
    crash = tmp_path / "crash-at"
    crash.write_text(step)
    sup = make_supervisor(
        [{"name": "app", "packaged": True, "command": "bin/agent", "notify": True}],
        extra={"update": {"trusted_keys": [str(release.public_key)], "health_window_s": 0.5,
                          "free_space_reserve_bytes": 0}},
    )
    install_version(sup.base / "install", "app", "1.0.0", release.tree("1.0.0"))
    sup.start(env={"BATON_HELPER_CRASH_FILE": str(crash)})
    sup.wait_agent("app", "running")
    from tests.conftest import UpdateHost

    host = UpdateHost(sup, release)
    uid = host.push(release.build("1.1.0"))
    st = host.wait_final(uid, timeout=90)
    wait_for(lambda: host.journal(uid).settled, 30, what="the update to settle")
    assert not crash.exists(), "the crash point was never reached"
    rec = host.journal(uid)
    assert rec.attempts == 2
    if step in POST:
        assert st.state == ROLLED_BACK, st.error
        assert common_pb2.FailureReason.Name(st.reason) == "HELPER_CRASHED", st.error
        assert sup.wait_agent("app", "running").version == "1.0.0"
        assert host.layout.installed_versions() == ["1.0.0"]
    else:
        assert st.state == COMMITTED, st.error
        assert sup.wait_agent("app", "running").version == "1.1.0"
        assert host.layout.installed_versions() == ["1.1.0", "1.0.0"]
        from baton.marks import Marks

        assert Marks(sup.state_dir).highest("app") == "1.1.0"
    assert not any((sup.state_dir / "downloads").iterdir())
    assert not any(p.name.startswith(".") for p in host.layout.versions_dir.iterdir())


def test_unfinished_update_is_finished_by_the_next_supervisor_start(make_supervisor, release, tmp_path):
    crash = tmp_path / "crash-at"
    crash.write_text("watching")
    sup = make_supervisor(
        [{"name": "app", "packaged": True, "command": "bin/agent", "notify": True}],
        extra={"update": {"trusted_keys": [str(release.public_key)], "health_window_s": 3.0,
                          "free_space_reserve_bytes": 0}},
    )
    install_version(sup.base / "install", "app", "1.0.0", release.tree("1.0.0"))
    sup.start(env={"BATON_HELPER_CRASH_FILE": str(crash)})
    from tests.conftest import UpdateHost

    host = UpdateHost(sup, release)
    uid = host.push(release.build("1.1.0"))
    wait_for(lambda: not crash.exists(), 30, what="the helper to die at 'watching'")
    sup.kill()
    assert host.journal(uid).state.value == "watching"
    sup.start()
    st = host.wait_final(uid, timeout=60)
    assert st.state == ROLLED_BACK
    assert sup.wait_agent("app", "running").version == "1.0.0"


def test_helper_killed_mid_download_resumes_with_a_range_request(make_supervisor, release, pkgserver, tmp_path):
    crash = tmp_path / "crash-at"
    crash.write_text("downloading-bytes")
    sup = make_supervisor(
        [{"name": "app", "packaged": True, "command": "bin/agent", "notify": True}],
        extra={"update": {"trusted_keys": [str(release.public_key)], "health_window_s": 0.2,
                          "free_space_reserve_bytes": 0}},
    )
    install_version(sup.base / "install", "app", "1.0.0", release.tree("1.0.0"))
    sup.start(env={"BATON_HELPER_CRASH_FILE": str(crash)})
    from tests.conftest import UpdateHost

    host = UpdateHost(sup, release)
    tree = release.tree("1.1.0")
    (tree / "blob.bin").write_bytes(os.urandom(3 * 1024 * 1024))
    pkg = release.build("1.1.0", tree=tree)
    (pkgserver.root / pkg.path.name).write_bytes(pkg.path.read_bytes())
    pkgserver.on(pkg.path.name).rate_limit(2 * 1024 * 1024)
    st = host.wait_final(host.push(pkg, download_url=pkgserver.url(pkg.path.name)), timeout=90)
    assert st.state == COMMITTED, st.error
    assert not crash.exists()
    ranges = [r.range for r in pkgserver.requests_for(pkg.path.name)]
    assert ranges[0] is None
    assert any(r and r.startswith("bytes=") and not r.startswith("bytes=0-") for r in ranges[1:]), ranges
    assert sup.agent("app").version == "1.1.0"
