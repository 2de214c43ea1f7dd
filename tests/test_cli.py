"""The supervisor's command line: status table, version, JSON logs."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import PY, ROOT, agent

pytestmark = pytest.mark.e2e  # every test here starts a process


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "supervisor", *args], capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_version_prints_the_supervisor_version():
    res = run("--version")
    assert res.returncode == 0
    assert res.stdout.startswith("baton supervisor ")


def test_status_prints_a_table_of_agents(make_supervisor):
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True)]).start()
    a = sup.wait_agent("web", "running")
    res = run("status", "--socket", str(sup.socket))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert "node node-1" in lines[0]
    assert lines[1].split()[:3] == ["NAME", "STATE", "PID"]
    assert lines[2].split()[:3] == ["web", "running", str(a.pid)]


def test_status_reads_the_socket_from_the_config(make_supervisor):
    sup = make_supervisor([]).start()
    res = run("status", "--config", str(sup.config_path), "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["nodeId"] == "node-1"


def test_status_without_a_running_supervisor_says_so(tmp_path):
    res = run("status", "--socket", str(tmp_path / "none.sock"), "--timeout", "1")
    assert res.returncode == 1
    assert "cannot reach the supervisor" in res.stderr


def test_json_flag_logs_one_json_object_per_line(make_supervisor):
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True)])
    sup.write_config()
    import os
    import signal
    import time

    proc = subprocess.Popen([PY, "-m", "supervisor", "run", "--config", str(sup.config_path), "--json"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    sup.reaper.track(proc.pid)
    sup.proc = proc
    sup.wait_agent("web", "running")
    time.sleep(0.2)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    bad = [line for line in err.splitlines() if line.strip() and not line.startswith("{")]
    assert not bad, bad
    records = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert records and all("record" in r and "text" in r for r in records)
    assert any("agent web" in r["record"]["message"] for r in records)


def _one_line_error(res: subprocess.CompletedProcess[str]) -> str:
    """The error line of a refused command line: no traceback, the last line names what was wrong."""
    assert "Traceback" not in res.stderr, res.stderr
    return res.stderr.strip().splitlines()[-1]


def test_out_of_range_counts_and_durations_are_usage_errors_that_call_nobody(make_supervisor):
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True)]).start()
    pid = sup.wait_agent("web", "running").pid
    for args, named in ((("tail", "-n", "-1", "web"), "argument -n/--lines: -1 is out of range"),
                        (("tail", "-n", str(2**32), "web"), "argument -n/--lines: 4294967296 is out of range"),
                        (("updates", "--limit", "-1"), "argument --limit: -1 is out of range"),
                        (("updates", "--watch", "--interval", "-1"), "argument --interval: -1 seconds"),
                        (("status", "--timeout", "nan"), "argument --timeout: nan seconds"),
                        (("restart", "web", "--wait", "inf"), "argument --wait: inf seconds")):
        res = run(*args, "--socket", str(sup.socket))
        assert res.returncode == 2 and named in _one_line_error(res), (args, res.stderr)
    assert sup.agent("web").pid == pid, "the refused restart did nothing"


def test_a_file_that_is_not_what_a_command_reads_is_one_line_not_a_traceback(tmp_path):
    res = run("update", "app", "--package", str(tmp_path), "--signature", str(tmp_path), "--socket",
              str(tmp_path / "none.sock"))
    assert res.returncode == 1 and _one_line_error(res).startswith("supervisor update: signature ")
    helper = subprocess.run([PY, "-m", "helper", "verify", str(tmp_path), "--signature", str(tmp_path),
                             "--component", "a", "--version", "1", "--key", str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert helper.returncode == 1 and "Is a directory" in _one_line_error(helper)
