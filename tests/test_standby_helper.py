"""The standby helper (baton/standby.py, supervisor/standby.py): started and loaded before a push, it carries
the next update out; it never runs one with code that is no longer on disk, nobody but the supervisor can
hand it a job, and without one an update is carried out by a helper spawned as before."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from baton.standby import FLAG, socket_path
from tests.conftest import ROOT, wait_for
from tests.standby_wait import ready_standby

# every test here starts a process; the fixtures' supervisors keep no standby unless asked (tests/conftest.py)
pytestmark = [pytest.mark.e2e, pytest.mark.standby_helper]

SYSTEM_PY = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else "python3"
AS_NOBODY = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")
# Standard library only, run as nobody: connect to the standby channel, say HELLO as a standby would, and print
# what came back: a refused peer is hung up on, never handed an update id.
IMPOSTOR = r"""
import json, os, socket, sys

s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(sys.argv[1])
try:
    s.sendall(json.dumps({"v": 1, "op": "hello", "pid": os.getpid(), "code": "x"}).encode() + b"\n")
    got = s.recv(4096)
except OSError:  # EPIPE or ECONNRESET: hung up on even sooner
    got = b""
print(json.dumps({"got": got.decode(errors="replace")}))
"""


def gone(pid: int) -> bool:
    """No process with this pid, not even a zombie waiting to be reaped."""
    try:
        psutil.Process(pid)
    except psutil.NoSuchProcess:
        return True
    return False


def test_an_agent_update_is_carried_out_by_the_standby_started_before_the_push(update_host):
    standby = ready_standby(update_host.sup)
    uid = update_host.push(update_host.release.build("1.1.0"))
    st = update_host.wait_final(uid)
    assert st.success, st.error
    rec = update_host.journal(uid)
    assert rec.helper_pid == standby.pid
    assert standby.create_time() < rec.created_at  # it existed before the push
    assert f"standby helper pid {standby.pid} took it" in update_host.sup.stdout_path.read_text()
    wait_for(lambda: gone(standby.pid), 10, interval=0.05, what="the helper to exit")
    log = (update_host.sup.state_dir / "updates" / uid / "helper.log").read_text()
    assert f"update {uid}: committed" in log  # its output went to the update's log, as a fresh helper's does


def test_a_new_standby_is_started_after_one_took_an_update(update_host):
    first = ready_standby(update_host.sup)
    st = update_host.wait_final(update_host.push(update_host.release.build("1.1.0")))
    assert st.success, st.error
    second = ready_standby(update_host.sup, not_pid=first.pid)
    st = update_host.wait_final(uid := update_host.push(update_host.release.build("1.2.0")))
    assert st.success, st.error
    assert update_host.journal(uid).helper_pid == second.pid


def test_with_the_standby_killed_an_update_is_carried_out_by_a_spawned_helper(update_host):
    standby = ready_standby(update_host.sup)
    standby.kill()
    uid = update_host.push(update_host.release.build("1.1.0"))  # before a replacement can be ready (1 s + start)
    st = update_host.wait_final(uid)
    assert st.success, st.error
    rec = update_host.journal(uid)
    assert rec.helper_pid != standby.pid
    assert f"helper pid {rec.helper_pid} started (start 1)" in update_host.sup.stdout_path.read_text()


def test_a_standby_killed_while_waiting_leaves_nothing_behind_and_is_replaced(update_host):
    standby = ready_standby(update_host.sup)
    standby.kill()
    wait_for(lambda: gone(standby.pid), 10, interval=0.05, what="the killed standby to be reaped")
    replacement = ready_standby(update_host.sup, not_pid=standby.pid)
    assert replacement.is_running()
    assert [p for p in psutil.Process(update_host.sup.proc.pid).children()
            if FLAG in p.cmdline()] == [replacement]  # one standby, no leftover


def test_a_standby_exits_with_its_supervisor(update_host):
    standby = ready_standby(update_host.sup)
    update_host.sup.proc.send_signal(signal.SIGTERM)
    update_host.sup.proc.wait(timeout=30)
    psutil.wait_procs([standby], timeout=10)
    assert not standby.is_running()


def test_a_standby_from_old_code_never_runs_an_update_after_the_code_changes(update_host, tmp_path):
    # The supervisor runs from a copy of the code of its own: a changed file in the shared checkout would retire
    # the standbys of tests running beside this one on other workers.
    code = tmp_path / "code"
    for package in ("baton", "supervisor", "helper", "manager"):
        shutil.copytree(ROOT / package, code / package, ignore=shutil.ignore_patterns("__pycache__"))
    launcher = tmp_path / "supervisor-from-copy"
    launcher.write_text(f'#!/bin/sh\ncd {code} && exec {sys.executable} -m supervisor "$@"\n')
    launcher.chmod(0o755)
    sup = update_host.sup
    sup.terminate()
    sup.start(launcher=launcher)
    sup.wait_agent("app", "running")
    standby = ready_standby(sup)
    assert standby.cwd() == str(code)
    changed = code / "helper" / "standby.py"  # the supervisor runs from this copy; its helpers too
    st = changed.stat()
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # as a new install would
    uid = update_host.push(update_host.release.build("1.1.0"))
    final = update_host.wait_final(uid)
    assert final.success, final.error
    assert update_host.journal(uid).helper_pid != standby.pid
    psutil.wait_procs([standby], timeout=10)
    assert not standby.is_running()
    assert f"standby helper pid {standby.pid} runs code that has changed" in update_host.sup.stdout_path.read_text()


def test_after_a_self_update_the_old_standby_exits_and_one_of_the_new_code_is_started(make_self_host):
    host = make_self_host(tcp=False)
    old = ready_standby(host.sup)
    assert "/versions/1.0.0/" in old.environ()["PYTHONPATH"]  # the code of a version's launcher (bin/supervisor)
    st = host.wait_final(host.push(host.supervisor_package("1.1.0")), timeout=90)
    assert st.success, st.error
    wait_for(lambda: not old.is_running() or old.status() == psutil.STATUS_ZOMBIE, 20, interval=0.05,
             what="the old standby to exit")
    new = ready_standby(host.sup, not_pid=old.pid)
    assert "/versions/1.1.0/" in new.environ()["PYTHONPATH"]


@contextlib.contextmanager
def traversable(path: Path) -> Iterator[None]:
    """``path`` and its directories up to /tmp searchable by others for the test (tmp_path is 0700)."""
    dirs = [d for d in [path, *path.parents] if d != Path("/tmp") and Path("/tmp") in d.parents]
    modes = {d: d.stat().st_mode & 0o7777 for d in dirs}
    try:
        for d in dirs:
            d.chmod(modes[d] | 0o011)
        yield
    finally:
        for d, mode in modes.items():
            d.chmod(mode)


@pytest.mark.skipif(os.geteuid() != 0, reason="running a client as another user needs root")
def test_the_standby_channel_refuses_another_user_by_peer_credentials(update_host):
    sup = update_host.sup
    ready_standby(sup)
    sock = socket_path(sup.state_dir / "run")
    assert sock.stat().st_mode & 0o777 == 0o600
    with traversable(sock.parent):
        sock.chmod(0o666)  # past the file permissions: only SO_PEERCRED stands in the way now
        res = subprocess.run([*AS_NOBODY, SYSTEM_PY, "-I", "-c", IMPOSTOR, str(sock)], capture_output=True,
                             text=True, cwd="/", timeout=60)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"got": ""}  # hung up on, no job
    assert "standby channel: refused a connection: uid 65534" in sup.stdout_path.read_text()
