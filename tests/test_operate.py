"""The operator's commands (`supervisor start|stop|restart|signal|tail|clear`) against a real supervisor."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import PY, ROOT, SYSTEM_PYTHON, SupervisorProc, agent, agent_processes, stop_everything_of, wait_for

pytestmark = pytest.mark.e2e  # every test here starts a process


def ctl(sup, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "supervisor", *args, "--socket", str(sup.socket)], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout)


def test_stop_start_restart_wait_for_the_new_state_and_print_it(make_supervisor):
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True)]).start()
    first = sup.wait_agent("web", "running")
    res = ctl(sup, "stop", "web")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "web: stopped"
    assert not psutil.pid_exists(first.pid)
    res = ctl(sup, "start", "web")
    assert res.returncode == 0, res.stderr
    second = sup.agent("web")
    assert res.stdout.strip() == f"web: running (pid {second.pid})"
    res = ctl(sup, "restart", "web")
    assert res.returncode == 0, res.stderr
    third = sup.agent("web")
    assert third.pid != second.pid
    assert res.stdout.strip() == f"web: running (pid {third.pid})"


def test_all_applies_to_every_agent(make_supervisor):
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True), agent("worker", "crash_agent.py")]).start()
    sup.wait_agent("web", "running")
    sup.wait_agent("worker", "running")
    res = ctl(sup, "stop", "all")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["web: stopped", "worker: stopped"]


def test_start_of_a_fatal_agent_clears_fatal_and_runs_it(make_supervisor, tmp_path):
    crash_file = tmp_path / "crash-now"
    crash_file.touch()
    sup = make_supervisor([agent("worker", "crash_agent.py", start_seconds=0.5, start_retries=0,
                                 env={"CRASH_FILE": str(crash_file)})]).start()
    sup.wait_agent("worker", "fatal")
    crash_file.unlink()
    res = ctl(sup, "start", "worker")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("worker: running (pid ")
    assert sup.agent("worker").state == sup.wait_agent("worker", "running").state


def test_start_that_fails_again_exits_1_and_says_why(make_supervisor, tmp_path):
    crash_file = tmp_path / "crash-now"
    crash_file.touch()
    sup = make_supervisor([agent("worker", "crash_agent.py", start_seconds=0.5, start_retries=0,
                                 env={"CRASH_FILE": str(crash_file)})]).start()
    sup.wait_agent("worker", "fatal")
    res = ctl(sup, "start", "worker")
    assert res.returncode == 1
    assert res.stdout.startswith("worker: fatal: exited with status 3")


def test_signal_accepts_hup_and_sighup_and_the_agent_keeps_running(make_supervisor):
    sup = make_supervisor([agent("web", "hup_agent.py")]).start()
    before = sup.wait_agent("web", "running")
    for name in ("HUP", "SIGHUP"):
        res = ctl(sup, "signal", name, "web")
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == f"web: running (pid {before.pid})"
    wait_for(lambda: "got SIGHUP 2" in sup.log_of("web").read_text(), what="two SIGHUPs in the log")


def test_signal_with_an_unknown_name_is_refused_in_one_line(make_supervisor):
    sup = make_supervisor([agent("web", "hup_agent.py")]).start()
    sup.wait_agent("web", "running")
    res = ctl(sup, "signal", "BOGUS", "web")
    assert res.returncode == 1
    assert res.stderr.strip() == "supervisor: unknown signal 'BOGUS' (e.g. HUP, SIGUSR1, TERM)"


def test_unknown_agent_is_refused_before_anything_is_done(make_supervisor):
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True)]).start()
    first = sup.wait_agent("web", "running")
    res = ctl(sup, "stop", "web", "nope")
    assert res.returncode == 1
    assert "unknown agent 'nope'" in res.stderr
    assert sup.agent("web").pid == first.pid


def test_json_output_keeps_every_field_zeros_included(make_supervisor):
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True)]).start()
    sup.wait_agent("web", "running")
    res = ctl(sup, "stop", "web", "--json")
    assert res.returncode == 0, res.stderr
    (info,) = json.loads(res.stdout)
    assert info["name"] == "web"
    assert info["state"] == "AGENT_STATE_STOPPED"
    assert info["pid"] == 0
    assert info["restarts"] == 0
    assert info["kept"] is False
    assert info["lastExitSignal"] == ""


def test_an_unreachable_supervisor_is_one_clear_line_and_exit_1(tmp_path):
    res = subprocess.run([PY, "-m", "supervisor", "restart", "web", "--socket", str(tmp_path / "none.sock"),
                          "--timeout", "1"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 1
    assert res.stderr.splitlines() == [
        f"supervisor: cannot reach the supervisor at {tmp_path / 'none.sock'}: no socket there: "
        "is the supervisor running?"]


def test_tail_prints_the_last_lines(make_supervisor):
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True)]).start()
    sup.wait_agent("web", "running")
    wait_for(lambda: "tick 5" in sup.log_of("web").read_text(), what="five ticks")
    res = ctl(sup, "tail", "-n", "2", "web")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 2
    assert all(line.startswith("tick ") for line in lines)


def test_tail_follow_sees_new_lines(make_supervisor):
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True)]).start()
    sup.wait_agent("web", "running")
    proc = subprocess.Popen([PY, "-m", "supervisor", "tail", "-f", "-n", "1", "web", "--socket", str(sup.socket)],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    sup.reaper.track(proc.pid)
    try:
        assert proc.stdout is not None
        first = int(proc.stdout.readline().split()[1])
        seen = [int(proc.stdout.readline().split()[1]) for _ in range(3)]
        assert seen == [first + 1, first + 2, first + 3]
    finally:
        proc.kill()
        proc.wait(10)


def test_tail_follow_shows_each_line_once_while_the_agent_writes_fast(make_supervisor):
    """Output still in the pipe when tail starts goes into the log it reads first, not also into what it follows."""
    code = ("import itertools, time\n"
            "for i in itertools.count():\n"
            "    print(f'line {i}', flush=True)\n"
            "    time.sleep(0.0005)\n")
    sup = make_supervisor([{"name": "chatty", "command": PY, "args": ["-u", "-c", code], "start_seconds": 0.2}]).start()
    sup.wait_agent("chatty", "running")
    for _ in range(8):
        proc = subprocess.Popen([PY, "-m", "supervisor", "tail", "-f", "-n", "3", "chatty", "--socket",
                                 str(sup.socket)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
        sup.reaper.track(proc.pid)
        try:
            assert proc.stdout is not None
            numbers = [int(proc.stdout.readline().split()[1]) for _ in range(40)]
        finally:
            proc.kill()
            proc.wait(10)
        assert numbers == list(range(numbers[0], numbers[0] + 40))


def test_tail_does_not_follow_a_link_planted_in_place_of_the_log(make_supervisor, tmp_path):
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True)]).start()
    sup.wait_agent("web", "running")
    secret = tmp_path / "secret"
    secret.write_text("not for the agent's readers\n")
    log = sup.log_of("web")
    log.unlink()
    log.symlink_to(secret)
    res = ctl(sup, "tail", "-n", "5", "web")
    assert res.returncode == 0, res.stderr
    assert "not for the agent's readers" not in res.stdout


def test_tail_follow_ends_when_the_agent_is_removed_and_clear_empties_the_log(make_supervisor):
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True)]).start()
    sup.wait_agent("web", "running")
    wait_for(lambda: "tick 3" in sup.log_of("web").read_text(), what="ticks")
    (sup.log_of("web").parent / "web.log.1").write_text("an old rotated file\n")
    res = ctl(sup, "clear", "web")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("web: cleared log (")
    assert not (sup.log_of("web").parent / "web.log.1").exists()
    text = sup.log_of("web").read_text()
    assert "tick 1\n" not in text and "starting" not in text
    wait_for(lambda: "tick" in sup.log_of("web").read_text(), what="new output after the clear")


def test_stderr_kept_separate_when_asked(make_supervisor):
    code = "import sys, time\nprint('to stdout', flush=True)\nprint('to stderr', file=sys.stderr, flush=True)\n" \
           "time.sleep(600)\n"
    sup = make_supervisor([{"name": "split", "command": PY, "args": ["-u", "-c", code], "stderr": "separate",
                            "start_seconds": 0.2}]).start()
    sup.wait_agent("split", "running")
    err_log = sup.log_of("split").with_name("split.stderr.log")
    wait_for(lambda: "to stderr" in err_log.read_text(), what="stderr in its own log")
    assert "to stdout" in sup.log_of("split").read_text()
    assert "to stderr" not in sup.log_of("split").read_text()
    res = ctl(sup, "tail", "--stderr", "split")
    assert res.returncode == 0, res.stderr
    assert res.stdout == "to stderr\n"


def test_tail_stderr_of_a_merged_agent_says_it_is_merged(make_supervisor):
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True)]).start()
    sup.wait_agent("web", "running")
    res = ctl(sup, "tail", "--stderr", "web")
    assert res.returncode == 1
    assert "writes stderr into its output log" in res.stderr


# Run as nobody by the system interpreter (the test's virtualenv may be unreadable to nobody): reports who it
# is and its umask, writes a file, sends READY=1 on $NOTIFY_SOCKET.
AS_NOBODY = r"""
import os, socket, time
print("uid", os.getuid(), "gid", os.getgid(), "groups", os.getgroups(), "cwd", os.getcwd(), flush=True)
old = os.umask(0); os.umask(old)
print("umask", oct(old), flush=True)
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
    s.connect(os.environ["NOTIFY_SOCKET"])
    s.sendall(b"READY=1")
time.sleep(600)
"""


def test_user_and_umask_apply_and_the_log_and_notify_socket_still_work(traversable_base, reaper):
    import pwd

    nobody = pwd.getpwnam("nobody")
    sup = SupervisorProc(traversable_base / "sup", reaper, [
        {"name": "low", "command": SYSTEM_PYTHON, "args": ["-u", "-c", AS_NOBODY], "user": "nobody",
         "umask": "027", "notify": True}],
        extra={"update": {"file_url_root": str(traversable_base)}})  # the default, two levels up, is /tmp itself
    try:
        _check_nobody_agent(sup.start(), nobody)
    finally:
        sup.close_channel()
        stop_everything_of(sup)


def _check_nobody_agent(sup: SupervisorProc, nobody: Any) -> None:
    a = sup.wait_agent("low", "running")
    p = psutil.Process(a.pid)
    assert p.uids().real == p.uids().effective == nobody.pw_uid
    assert p.gids().real == nobody.pw_gid
    text = wait_for(lambda: (t := sup.log_of("low").read_text()) and "umask" in t and t, what="the agent's output")
    assert f"uid {nobody.pw_uid} gid {nobody.pw_gid} groups [" in text
    assert "umask 0o27" in text
    assert "cwd /\n" in text
    assert (sup.base / "install" / ".notify" / "low" / "notify.sock").stat().st_uid == nobody.pw_uid
    assert Path(sup.state_dir / "agents" / "low" / "output.fifo").stat().st_mode & 0o777 == 0o600


def test_group_without_user_is_never_run_and_shown_as_a_config_error(make_supervisor):
    import grp

    nogroup = grp.getgrgid(pwd_nobody_gid())
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True, group=nogroup.gr_name)])
    sup.start()  # the other agents would run (issue 25); this one never does
    web = sup.wait_agent("web", "config_error")
    assert web.last_error.startswith("agents[0].group: ")
    assert "without user would run the agent as root" in web.last_error
    assert "agents[0].group: " in sup.output()
    assert agent_processes(sup.state_dir, "web") == []


def pwd_nobody_gid() -> int:
    import pwd

    return pwd.getpwnam("nobody").pw_gid
