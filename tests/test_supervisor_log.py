"""`supervisor log [-f] [-n N]` (issue 25): the supervisor's own log, as supervisorctl's `maintail`, root only."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import PY, ROOT, agent, wait_for

pytestmark = pytest.mark.e2e  # every test here starts a process

SITE = next(p for p in sys.path if p.endswith("site-packages"))  # the venv's, readable by nobody (not its python)


def log_cmd(sup, *extra: str, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "supervisor", "log", "--config", str(sup.config_path), *extra],
                          capture_output=True, text=True, cwd=ROOT, timeout=60, **kw)


def test_log_shows_the_last_lines_of_the_running_supervisors_log(make_supervisor):
    sup = make_supervisor([agent("web", "ready_agent.py")]).start()
    sup.wait_agent("web", "running")
    res = log_cmd(sup, "-n", "3")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 3
    whole = (sup.state_dir / "logs" / "supervisor.log").read_text().splitlines()
    assert lines == whole[-3:]


def reads_at_end(pid: int, path: Path) -> bool:
    """Whether process ``pid`` has ``path`` open with its offset at the file's end (/proc/PID/fdinfo)."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != str(path):
                continue
            info = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines())
            return int(info["pos"]) == path.stat().st_size
        except OSError:
            continue
    return False


def test_log_follow_prints_what_the_supervisor_logs_after_it_started(make_supervisor):
    sup = make_supervisor([agent("web", "ready_agent.py")]).start()
    pid = sup.wait_agent("web", "running").pid
    follower = subprocess.Popen([PY, "-m", "supervisor", "log", "-f", "-n", "0", "--config", str(sup.config_path)],
                                stdout=subprocess.PIPE, cwd=ROOT)
    try:
        wait_for(lambda: reads_at_end(follower.pid, sup.state_dir / "logs" / "supervisor.log"), 30,
                 what="the follower to reach the end of the log")
        os.kill(pid, signal.SIGKILL)
        seen = b""
        deadline = time.monotonic() + 20
        assert follower.stdout is not None
        while f"agent web pid {pid} exited".encode() not in seen and time.monotonic() < deadline:
            if select.select([follower.stdout], [], [], 0.5)[0]:
                seen += os.read(follower.stdout.fileno(), 65536)
        assert f"agent web pid {pid} exited with -9".encode() in seen, seen
        assert b"agent web stopped -> starting" not in seen  # -n 0: nothing from before it started
    finally:
        follower.send_signal(signal.SIGINT)
        assert follower.wait(10) == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="the caller is another user: needs root")
def test_log_as_another_user_is_refused_in_one_line_and_shows_nothing(make_supervisor):
    sup = make_supervisor([agent("web", "ready_agent.py")]).start()
    sup.wait_agent("web", "running")
    # CAP_DAC_READ_SEARCH only lets nobody reach the code and the venv wherever the checkout lies (a 0700 temporary
    # directory, say); the refusal under test is the command's own, by its effective uid.
    res = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                          "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search", "/usr/bin/python3",
                          "-m", "supervisor", "log", "--config", str(sup.config_path)], capture_output=True,
                         text=True, cwd="/", timeout=60, env={"PYTHONPATH": f"{ROOT}:{SITE}"})
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr == ("supervisor log: the supervisor's log is root's (it names every agent, update and caller): "
                          "run it as root\n")


def test_log_follow_goes_on_into_the_new_file_after_a_rotation(make_supervisor):
    sup = make_supervisor([]).start()
    path = sup.state_dir / "logs" / "supervisor.log"
    follower = subprocess.Popen([PY, "-m", "supervisor", "log", "-f", "-n", "0", "--config", str(sup.config_path)],
                                stdout=subprocess.PIPE, cwd=ROOT)
    try:
        # from its end, which it must have reached before the line is written (with -n 0 a line before is not
        # shown): a fixed second was too short for a follower starting on a loaded machine
        wait_for(lambda: reads_at_end(follower.pid, path), 30, what="the follower to reach the end of the log")
        with open(path, "ab") as f:
            f.write(b"last line of the old file\n")
        os.replace(path, path.with_name("supervisor.log.1"))  # what the rotation does, then a new file
        path.write_bytes(b"first line of the new file\n")
        seen = b""
        deadline = time.monotonic() + 20
        assert follower.stdout is not None
        while b"first line of the new file" not in seen and time.monotonic() < deadline:
            if select.select([follower.stdout], [], [], 0.5)[0]:
                seen += os.read(follower.stdout.fileno(), 65536)
        assert seen.index(b"last line of the old file") < seen.index(b"first line of the new file"), seen
    finally:
        follower.send_signal(signal.SIGINT)
        assert follower.wait(10) == 0
