"""`supervisor status` tells the truth: signals by name, agents kept across a self-update, fatal agents' logs."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from baton.pb import common_pb2
from tests.conftest import PY, ROOT, SELF_AGENTS, agent, wait_for

pytestmark = pytest.mark.e2e  # every test here starts a process


def status(sup, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "supervisor", "status", "--socket", str(sup.socket), *extra],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def row(text: str, name: str) -> str:
    return next(line for line in text.splitlines() if line.split()[:1] == [name])


def test_exit_by_signal_is_shown_by_its_name(make_supervisor):
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True, backoff_initial_s=0.2)]).start()
    first = sup.wait_agent("web", "running")
    os.kill(first.pid, signal.SIGKILL)
    a = sup.wait_agent("web", "running", pred=lambda a: a.pid != first.pid)
    assert a.last_exit_signal == "SIGKILL" and a.last_exit_status == -9
    res = status(sup)
    assert res.returncode == 0, res.stderr
    assert "SIGKILL" in row(res.stdout, "web").split()


def test_json_keeps_every_field_zeros_included(make_supervisor):
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True)]).start()
    sup.wait_agent("web", "running")
    res = status(sup, "--json")
    (a,) = json.loads(res.stdout)["agents"]
    assert a["restarts"] == 0 and a["hasExitStatus"] is False and a["lastError"] == "" and a["kept"] is False
    assert json.loads(res.stdout)["managerConnected"] is False


def test_manager_connection_is_mentioned_only_when_a_manager_is_configured(make_supervisor):
    sup = make_supervisor([]).start()
    head = status(sup).stdout.splitlines()[0]
    assert "manager" not in head


def test_a_fatal_agent_points_at_its_log_and_quotes_its_last_lines(make_supervisor):
    sup = make_supervisor([agent("worker", "crash_agent.py", start_seconds=1.0, start_retries=1,
                                 backoff_initial_s=0.1, env={"CRASH_AFTER": "0.1"})]).start()
    sup.wait_agent("worker", "fatal")
    res = status(sup)
    assert res.returncode == 0, res.stderr
    assert f"worker is fatal (`supervisor start worker` retries); its log {sup.log_of('worker')} ends:" in res.stdout
    assert "  crash_agent: exiting with 3 after 0.1s" in res.stdout.splitlines()


def test_agents_kept_across_a_self_update_are_shown_as_kept_with_their_own_start_time(make_self_host):
    host = make_self_host(tcp=False)
    before = {a.name: a for a in host.sup.status().agents}
    mark = len(host.sup.stdout_path.read_text(errors="replace"))
    st = host.wait_final(host.push(host.supervisor_package("1.1.0")), timeout=90)
    assert st.state == common_pb2.UPDATE_STATE_COMMITTED, st.error
    after = {a.name: a for a in host.sup.status().agents}
    for name, a in after.items():
        assert a.kept and a.pid == before[name].pid and a.start_time == before[name].start_time
    assert "kept across a supervisor update" in row(status(host.sup).stdout, "web")
    handover_log = host.sup.stdout_path.read_text(errors="replace")[mark:]
    assert "handover" in handover_log
    assert "agent web stopped -> starting" not in handover_log
    assert "agent web starting -> running" not in handover_log


ERR_TICKER = ("import sys, time\nn = 0\nwhile True:\n    n += 1\n    print(f'out {n}', flush=True)\n"
              "    print(f'err {n}', file=sys.stderr, flush=True)\n    time.sleep(0.1)\n")


def test_separate_stderr_survives_a_self_update(make_self_host):
    split = {"name": "split", "command": PY, "args": ["-u", "-c", ERR_TICKER], "stderr": "separate",
             "start_seconds": 0.2}
    host = make_self_host(tcp=False, agents=[SELF_AGENTS[0], split])
    err_log = host.sup.log_of("split").with_name("split.stderr.log")
    pid = host.sup.agent("split").pid
    st = host.wait_final(host.push(host.supervisor_package("1.1.0")), timeout=90)
    assert st.state == common_pb2.UPDATE_STATE_COMMITTED, st.error
    assert host.sup.agent("split").pid == pid
    last = int(err_log.read_text().splitlines()[-1].split()[1])
    wait_for(lambda: f"err {last + 10}\n" in err_log.read_text(), what="stderr still drained after the update")
    assert "err " not in host.sup.log_of("split").read_text()
    nums = [int(line.split()[1]) for line in err_log.read_text().splitlines()]
    assert nums == list(range(1, len(nums) + 1)), "no stderr line lost or duplicated across the handover"


ESCAPING = ("import sys\nprint('\\x1b]0;owned\\x07\\x1b[2K\\x1b[1Aworker: all good\\r\\x9b2J', flush=True)\n"
            "sys.exit(3)\n")


def test_a_fatal_agents_escape_sequences_are_printed_escaped_by_supervisor_status(make_supervisor):
    sup = make_supervisor([{"name": "worker", "command": PY, "args": ["-c", ESCAPING], "start_seconds": 1.0,
                            "start_retries": 1, "backoff_initial_s": 0.1}]).start()
    sup.wait_agent("worker", "fatal")
    res = subprocess.run([PY, "-m", "supervisor", "status", "--socket", str(sup.socket)], capture_output=True,
                         cwd=ROOT, timeout=60)
    assert res.returncode == 0, res.stderr
    assert b"  \\x1b]0;owned\\x07\\x1b[2K\\x1b[1Aworker: all good\\r\\x9b2J\n" in res.stdout
    assert not set(res.stdout) & ((set(range(0x20)) - {0x0a}) | {0x7f}), "no control byte but the newlines"
    assert "\x9b".encode() not in res.stdout, "nor the one-byte CSI (C1)"


def test_status_name_shows_every_field_of_one_agent_and_the_end_of_its_log(make_supervisor):
    # A heartbeat a minute: the end of the log is still its start when status runs, however long that takes
    # (with 5 a second, a status on a loaded machine showed ten ticks and no start).
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True, backoff_initial_s=0.2, env={"TICK_S": "60"}),
                           agent("other", "ready_agent.py")]).start()
    first = sup.wait_agent("web", "running")
    os.kill(first.pid, signal.SIGKILL)
    a = sup.wait_agent("web", "running", pred=lambda a: a.pid != first.pid)
    res = status(sup, "web")
    assert res.returncode == 0, res.stderr
    fields = dict(line.split(":", 1) for line in res.stdout.splitlines() if line[:1].isalpha() and ":" in line)
    assert fields["name"].strip() == "web" and fields["state"].strip() == "running"
    assert fields["pid"].strip() == str(a.pid) and fields["restarts"].strip() == "1"
    assert fields["last exit"].strip() == "killed by SIGKILL" and fields["log"].strip() == str(sup.log_of("web"))
    assert "other" not in res.stdout
    assert f"  ready_agent web pid {a.pid} starting" in res.stdout.splitlines()


def test_status_name_json_is_that_agent_alone(make_supervisor):
    sup = make_supervisor([agent("web", "ready_agent.py"), agent("other", "ready_agent.py")]).start()
    pid = sup.wait_agent("web", "running").pid
    a = json.loads(status(sup, "web", "--json").stdout)
    assert a["name"] == "web" and a["pid"] == pid and a["restarts"] == 0 and a["lastError"] == ""


def test_status_of_an_unknown_agent_is_one_line_and_exit_1(make_supervisor):
    sup = make_supervisor([agent("web", "ready_agent.py")]).start()
    res = status(sup, "nope")
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr == "supervisor status: no agent named 'nope' (`supervisor status` lists them)\n"
