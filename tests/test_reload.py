"""Reload (`supervisor reload`, SIGHUP) and agents that leave the config: stopped to completion, always."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import psutil
import pytest

from tests.conftest import PY, ROOT, agent, wait_for

pytestmark = pytest.mark.e2e  # every test here starts a process


def reload(sup, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "supervisor", "reload", "--socket", str(sup.socket), *extra],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def pids(sup) -> dict[str, int]:
    return {a.name: a.pid for a in sup.status().agents}


def four_agents(sup):
    for name in ("keep", "change", "remove"):
        sup.wait_agent(name, "running")
    return pids(sup)


def test_reload_starts_new_stops_removed_restarts_changed_and_leaves_unchanged_alone(make_supervisor):
    sup = make_supervisor([agent("keep", "ready_agent.py", notify=True), agent("change", "ready_agent.py", notify=True),
                           agent("remove", "ready_agent.py", notify=True)]).start()
    before = four_agents(sup)
    sup.cfg["agents"] = [agent("keep", "ready_agent.py", notify=True),
                         agent("change", "ready_agent.py", notify=True, env={"CHANGED": "1"}),
                         agent("new", "ready_agent.py", notify=True)]
    sup.write_config()
    res = reload(sup)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["started: new", "stopped: remove", "restarted: change", "unchanged: keep"]
    after = pids(sup)
    assert set(after) == {"keep", "change", "new"}
    assert after["keep"] == before["keep"]
    assert after["change"] not in (0, before["change"])
    assert gone(before["remove"]) and gone(before["change"])
    sup.wait_agent("new", "running")
    assert "CHANGED=1" in Path(f"/proc/{after['change']}/environ").read_text().replace("\0", " ")
    assert sup.proc.poll() is None


def test_sighup_reloads_the_config_and_logs_it(make_supervisor):
    sup = make_supervisor([agent("keep", "ready_agent.py", notify=True)]).start()
    keep = sup.wait_agent("keep", "running")
    sup.cfg["agents"] = [agent("keep", "ready_agent.py", notify=True), agent("new", "ready_agent.py", notify=True)]
    sup.write_config()
    os.kill(sup.proc.pid, signal.SIGHUP)
    sup.wait_agent("new", "running")
    assert sup.agent("keep").pid == keep.pid
    assert sup.proc.poll() is None
    assert "SIGHUP: reloading" in sup.output()


def test_a_bad_config_is_refused_with_one_line_and_the_running_config_stays(make_supervisor):
    sup = make_supervisor([agent("keep", "ready_agent.py", notify=True)]).start()
    keep = sup.wait_agent("keep", "running")
    sup.cfg["update"]["max_backup"] = 3  # outside [[agents]]: the whole file is refused (an agent's own: test_degrade)
    sup.write_config()
    res = reload(sup)
    assert res.returncode == 1
    assert res.stderr.splitlines() == ["supervisor: config error: update.max_backup: unknown key "
                                       "(did you mean max_backups?); the running config stays"]
    os.kill(sup.proc.pid, signal.SIGHUP)
    wait_for(lambda: "reload refused, the running config stays" in sup.output(), what="the refusal in the log")
    assert sup.agent("keep").pid == keep.pid
    assert sup.proc.poll() is None


def test_removed_agent_ignoring_sigterm_is_killed_after_its_stop_timeout_on_reload(make_supervisor):
    sup = make_supervisor([agent("keep", "ready_agent.py", notify=True),
                           agent("stubborn", "stubborn_agent.py", stop_timeout_s=1.0, start_seconds=0.2)]).start()
    sup.wait_agent("keep", "running")
    stubborn = sup.wait_agent("stubborn", "running")
    sup.cfg["agents"] = [agent("keep", "ready_agent.py", notify=True)]
    sup.write_config()
    res = reload(sup)
    assert res.returncode == 0, res.stderr
    assert "stopped: stubborn" in res.stdout
    assert gone(stubborn.pid)
    assert set(pids(sup)) == {"keep"}


def test_agent_removed_while_the_supervisor_was_down_is_stopped_to_completion_at_start(make_supervisor):
    """Regression: the next supervisor sent it one SIGTERM and forgot it; one that ignores SIGTERM ran on."""
    sup = make_supervisor([agent("keep", "ready_agent.py", notify=True),
                           agent("stubborn", "stubborn_agent.py", stop_timeout_s=1.0, start_seconds=0.2)]).start()
    sup.wait_agent("keep", "running")
    stubborn = sup.wait_agent("stubborn", "running")
    sup.kill()  # a crash: its agents run on (KillMode=process), the next supervisor adopts them
    assert not gone(stubborn.pid)
    sup.cfg["agents"] = [agent("keep", "ready_agent.py", notify=True)]
    sup.start()
    wait_for(lambda: gone(stubborn.pid), timeout=20, what="the removed stubborn agent to be killed")
    wait_for(lambda: set(pids(sup)) == {"keep"}, what="the removed agent to leave the status")
    assert "stubborn" not in (sup.state_dir / "agents.json").read_text()
    assert "ignored SIGTERM" in sup.output()
