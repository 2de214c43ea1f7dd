"""Update ids never name Baton's own directories in ``<state_dir>/updates``.

The helpers' component locks live in ``updates/locks/``, beside the records. An update pushed with id ``locks``
used to make a record of that directory, and pruning the record then deleted the lock files under a running
helper, so two updates of one component could run at once. Ids equal to an internal name are refused at the
push, and a ``locks`` record left by an earlier version is neither read nor pruned.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from baton import durable
from baton.journal import JOURNAL_FILE, Journal, UpdateRecord, UpdateRequestRecord, lock_dir
from baton.pb import daemon_pb2
from baton.states import UpdateState
from tests.conftest import UpdateHost, install_version, snapshot_tree, wait_for

pytestmark = pytest.mark.e2e  # every test here starts a process


def _host(make_supervisor, release, update: dict) -> UpdateHost:
    extra = {"update": {"trusted_keys": [str(release.public_key)], "health_window_s": 0.2,
                        "free_space_reserve_bytes": 0, **update}}
    sup = make_supervisor([{"name": "app", "packaged": True, "command": "bin/agent", "notify": True}], extra=extra)
    install_version(sup.base / "install", "app", "1.0.0", release.tree("1.0.0"))
    return UpdateHost(sup, release)


def _started(host: UpdateHost) -> UpdateHost:
    host.sup.start()
    host.sup.wait_agent("app", "running")
    return host


def _records(host: UpdateHost) -> list[str]:
    return [r.update_id for r in Journal(host.sup.state_dir).all()]


def _old_record(update_id: str, finished_at: float) -> dict:
    """A final, settled record as every version so far wrote it (REQUESTED -> FAILED, the shortest legal path)."""
    req = UpdateRequestRecord(node_id="node-1", component="app", version="9.9.9", download_url="file:///nowhere",
                              sha256="0" * 64, signature="", size=1)
    rec = UpdateRecord(update_id=update_id, request=req, created_at=finished_at - 1).moved(UpdateState.REQUESTED)
    rec = rec.moved(UpdateState.FAILED, "old", error="old", finished_at=finished_at, settled=True)
    return rec.to_json()


@pytest.mark.parametrize("update_id", ["locks", ".pruned-x"])
def test_push_with_an_internal_name_as_update_id_is_refused_and_changes_nothing(make_supervisor, release,
                                                                                   update_id):
    host = _started(_host(make_supervisor, release, {}))
    pkg = release.build("1.1.0")
    state_before, disk_before = snapshot_tree(host.sup.state_dir, skip=("run", "audit")), host.disk()
    with pytest.raises(grpc.RpcError) as err:
        host.push(pkg, update_id=update_id)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert update_id in (err.value.details() or "")
    assert "\n" not in (err.value.details() or "")
    time.sleep(0.5)  # a helper it had started would have written its log by now
    assert snapshot_tree(host.sup.state_dir, skip=("run", "audit")) == state_before
    assert host.disk() == disk_before
    assert host.sup.agent("app").version == "1.0.0"


def test_pruning_keeps_the_helpers_lock_file_and_updates_still_serialize(make_supervisor, release):
    host = _started(_host(make_supervisor, release, {"keep_updates": 1}))
    with pytest.raises(grpc.RpcError):
        host.push(release.build("1.1.0"), update_id="locks")
    first = host.push(release.build("1.1.0"))
    assert host.wait_final(first).success
    lock = lock_dir(host.sup.state_dir) / "app.lock"
    inode = lock.stat().st_ino
    second = host.push(release.build("1.2.0"))
    assert host.wait_final(second).success
    wait_for(lambda: _records(host) == [second], 10, what="the first record to be pruned")
    assert lock.stat().st_ino == inode

    # A helper holding the lock file that pruning left in place keeps the next update of app out.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         "fd = os.open(sys.argv[1], os.O_RDWR)\nfcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\n"
         "time.sleep(120)\n", str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        disk_before = host.disk()
        third = host.push(release.build("1.3.0"))
        st = host.wait_final(third, timeout=60)
        assert not st.success
        assert "another helper is updating app right now" in st.error
        assert host.disk() == disk_before
        assert host.sup.agent("app").version == "1.2.0"
        assert lock.stat().st_ino == inode
    finally:
        holder.kill()
        holder.wait()


def test_state_dir_of_an_earlier_version_is_read_and_its_locks_record_is_left_alone(make_supervisor, release):
    host = _host(make_supervisor, release, {"keep_updates": 1})
    root = host.sup.state_dir / "updates"
    now = time.time()
    for update_id, finished in (("old-1", now - 30), ("old-2", now - 20)):
        (root / update_id).mkdir(parents=True, mode=0o700)
        durable.write_json(root / update_id / JOURNAL_FILE, _old_record(update_id, finished), 0o600)
    # What the attack left behind under an earlier version: a record made of the helpers' lock directory.
    lock_dir(host.sup.state_dir).mkdir(mode=0o700)
    durable.write_json(lock_dir(host.sup.state_dir) / JOURNAL_FILE, _old_record("locks", now - 10), 0o600)
    (lock_dir(host.sup.state_dir) / "app.lock").write_bytes(b"")
    locks_before = snapshot_tree(lock_dir(host.sup.state_dir))
    _started(host)

    wait_for(lambda: _records(host) == ["old-2"], 10, what="the older record pruned, the newer one kept")
    st = host.sup.stub.GetUpdate(daemon_pb2.UpdateRef(update_id="old-2"), timeout=5)
    assert (st.update_id, st.to_version, st.finished, st.success) == ("old-2", "9.9.9", True, False)
    assert snapshot_tree(lock_dir(host.sup.state_dir)) == locks_before
    with pytest.raises(grpc.RpcError) as err:
        host.sup.stub.GetUpdate(daemon_pb2.UpdateRef(update_id="locks"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    uid = host.push(release.build("1.1.0"))  # and the next update takes its lock in the same place
    assert host.wait_final(uid).success
    assert snapshot_tree(lock_dir(host.sup.state_dir)) == locks_before
    assert os.path.isfile(lock_dir(host.sup.state_dir) / "app.lock")
    # pruned when its helper exits, a moment after the final record GetUpdate reports
    wait_for(lambda: sorted(p.name for p in root.iterdir()) == sorted(["locks", uid]), 10,
             what="the older record pruned after the next update, and the helpers' lock directory kept")
    assert Path(lock_dir(host.sup.state_dir) / JOURNAL_FILE).is_file()
