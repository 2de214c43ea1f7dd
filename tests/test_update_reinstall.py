"""Pushing a version that is already installed never touches its directory; ``reinstall`` puts a fresh copy
beside it, and a failed reinstall rolls back to the copy that was running."""

from __future__ import annotations

import os

import grpc
import pytest

from baton.pb import common_pb2
from tests.conftest import UpdateHost

pytestmark = pytest.mark.e2e  # every test here starts a process

COMMITTED = common_pb2.UPDATE_STATE_COMMITTED
ROLLED_BACK = common_pb2.UPDATE_STATE_ROLLED_BACK


def _current_target(host: UpdateHost) -> str:
    return os.readlink(host.layout.current_link)


def test_repush_of_the_current_version_with_downgrade_and_force_is_refused_and_keeps_the_good_copy(update_host):
    broken = update_host.release.build("1.0.0", "exit_at_once")
    before, before_disk = update_host.sup.agent("app"), update_host.disk()
    with pytest.raises(grpc.RpcError) as e:
        update_host.push(broken, allow_downgrade=True, force=True)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "app 1.0.0 is already installed and current" in e.value.details()
    assert "reinstall" in e.value.details()
    assert update_host.disk() == before_disk
    after = update_host.sup.agent("app")
    assert (after.pid, after.restarts, after.version) == (before.pid, before.restarts, before.version)


def test_push_of_an_installed_backup_version_is_refused_without_reinstall(update_host):
    assert update_host.wait_final(update_host.push(update_host.release.build("1.1.0"))).success
    before_disk = update_host.disk()
    with pytest.raises(grpc.RpcError) as e:
        update_host.push(update_host.release.build("1.0.0"), allow_downgrade=True, force=True)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "app 1.0.0 is already installed;" in e.value.details()
    assert update_host.disk() == before_disk


def test_failed_reinstall_of_the_current_version_rolls_back_to_the_good_copy(update_host):
    good_dir = update_host.layout.versions_dir / "1.0.0"
    before = update_host.sup.agent("app")
    st = update_host.wait_final(update_host.push(update_host.release.build("1.0.0", "exit_at_once"), reinstall=True),
                                timeout=90)
    assert st.state == ROLLED_BACK, st.error
    assert _current_target(update_host) == "versions/1.0.0"
    assert (good_dir / "behaviour.txt").read_text() == "good\n"
    assert sorted(p.name for p in update_host.layout.versions_dir.iterdir()) == ["1.0.0"]
    app = update_host.sup.wait_agent("app", "running")
    assert app.version == "1.0.0" and app.pid != before.pid


def test_reinstall_of_the_current_version_installs_a_fresh_directory_and_switches_to_it(update_host):
    tree = update_host.release.tree("1.0.0")
    (tree / "reinstalled.txt").write_text("yes\n")
    pkg = update_host.release.build("1.0.0", tree=tree)
    st = update_host.wait_final(update_host.push(pkg, reinstall=True))
    assert st.state == COMMITTED, st.error
    assert (st.from_version, st.to_version) == ("1.0.0", "1.0.0")
    assert _current_target(update_host) == "versions/1.0.0..r1"
    assert (update_host.layout.current_dir() / "reinstalled.txt").is_file()
    assert update_host.layout.installed_versions() == ["1.0.0"]
    assert update_host.sup.wait_agent("app", "running").version == "1.0.0"
    again = update_host.wait_final(update_host.push(update_host.release.build("1.0.0"), reinstall=True))
    assert again.state == COMMITTED, again.error
    assert _current_target(update_host) == "versions/1.0.0"
    assert sorted(p.name for p in update_host.layout.versions_dir.iterdir()) == ["1.0.0"]
