"""`supervisor restart-daemon`: the supervisor starts again through the self-update's handover, same version, the
config file re-read; agents keep their pids, output pipes and notify sockets (docs/handover.md)."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request

import grpc
import psutil
import pytest

from tests.conftest import PY, ROOT, agent_processes, free_port, snapshot_tree, wait_for

pytestmark = pytest.mark.e2e  # every test here starts a process

AGENTS = ("web", "worker", "chatty")
CHANGING = ("state/logs", "supervisor.out")  # agents write their output meanwhile


def restart_daemon(host, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "supervisor", "restart-daemon", "--config", str(host.sup.config_path), *extra],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "BATON_PYTHON": sys.executable})


def agent_pids(host) -> dict[str, int]:
    return {a.name: a.pid for a in host.sup.status().agents}


def metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def test_restart_daemon_keeps_every_agent_and_applies_a_changed_metrics_section(make_self_host):
    host = make_self_host(tcp=False)
    before = host.sup.status()
    pids = agent_pids(host)
    log = host.sup.log_of("web")
    wait_for(lambda: "tick 2" in log.read_text(), what="ticks before")
    port = free_port()
    host.sup.cfg["metrics"] = {"listen": f"127.0.0.1:{port}"}
    host.sup.write_config()
    with pytest.raises(OSError):
        metrics_text(port)
    res = restart_daemon(host)
    assert res.returncode == 0, res.stdout + res.stderr + host.sup.output()
    assert res.stdout == f"supervisor 1.0.0: restarted (pid {before.pid}); every agent kept\n"
    after = host.sup.status()
    assert after.pid == before.pid, "re-executed in its own pid"
    assert after.started_at > before.started_at, "a new process image: it really started again"
    assert agent_pids(host) == pids
    for a in after.agents:
        assert a.kept and psutil.Process(a.pid).ppid() == before.pid
        assert agent_processes(host.sup.state_dir, a.name) == [a.pid]
    assert 'baton_agents{state="running"} 3.0' in metrics_text(port), "the changed [metrics] section applies"
    last = int(log.read_text().strip().splitlines()[-1].split()[-1])
    wait_for(lambda: f"tick {last + 3}\n" in log.read_text(), what="ticks after, through the same pipe")
    ticks = [int(ln.split()[1]) for ln in log.read_text().splitlines() if ln.startswith("tick ")]
    assert ticks == list(range(1, len(ticks) + 1)), "a line was lost or duplicated"
    assert not (host.sup.base / "run" / "handover.json").exists()


def test_restart_daemon_with_a_bad_config_is_refused_and_changes_nothing(make_self_host):
    from tests.conftest import SELF_AGENTS

    steady = [a for a in SELF_AGENTS if a["name"] != "worker"]  # worker crashes by design: agents.json would change
    host = make_self_host(tcp=False, agents=steady)
    before = host.sup.status()
    pids = agent_pids(host)
    host.sup.cfg["metrics"] = {"listen": "127.0.0.1:99999"}
    host.sup.write_config()
    disk = snapshot_tree(host.sup.base, skip=CHANGING)
    res = restart_daemon(host)
    assert res.returncode == 2
    (line,) = res.stderr.splitlines()
    assert line.startswith("supervisor: config error: metrics.listen")
    now = host.sup.status()
    assert (now.pid, now.started_at) == (before.pid, before.started_at)
    assert agent_pids(host) == pids
    assert snapshot_tree(host.sup.base, skip=CHANGING) == disk


def test_restart_daemon_of_a_supervisor_not_run_from_its_layout_is_refused_and_changes_nothing(make_supervisor):
    from tests.conftest import SELF_AGENTS

    sup = make_supervisor(list(SELF_AGENTS), name="checkout")
    sup.start()
    for a in AGENTS:
        sup.wait_agent(a, "running")
    before = sup.status()
    res = subprocess.run([PY, "-m", "supervisor", "restart-daemon", "--config", str(sup.config_path)],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 1
    (line,) = res.stderr.splitlines()
    assert line == (f"supervisor restart-daemon: supervisor: not restarted: no supervisor version is installed in "
                    f"{sup.base / 'install' / 'supervisor'} (`supervisor install-self`); only a supervisor run from "
                    "there restarts in place")
    now = sup.status()
    assert (now.pid, now.started_at) == (before.pid, before.started_at)
    assert [(a.name, a.pid) for a in now.agents] == [(a.name, a.pid) for a in before.agents]
    assert not (sup.base / "run" / "handover.json").exists()


@pytest.mark.parametrize("step", ["handover-quiesced", "handover-state-sent"])
def test_supervisor_killed_during_restart_daemon_leaves_every_agent_adopted_by_the_next_start(
        make_self_host, tmp_path, step):
    crash = tmp_path / "crash-at"
    host = make_self_host(tcp=False, env={"BATON_SUPERVISOR_CRASH_FILE": str(crash)})
    old_pid = host.sup.status().pid
    pids = agent_pids(host)
    crash.write_text(step)
    res = restart_daemon(host)
    assert not crash.exists(), "the crash point was not reached"
    assert res.returncode == 0, res.stdout + res.stderr + host.sup.output()
    assert not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() == psutil.STATUS_ZOMBIE
    status = host.sup.status()
    assert status.pid != old_pid and status.supervisor_version == "1.0.0"
    assert {a.name: a.pid for a in status.agents} == pids
    for name in AGENTS:
        a = host.sup.wait_agent(name, "running", timeout=30)
        assert agent_processes(host.sup.state_dir, name) == [a.pid], f"agent {name} must run exactly once"
    assert not (host.sup.base / "run" / "handover.json").exists()


def test_restart_daemon_with_no_supervisor_running_starts_nothing(make_self_host):
    host = make_self_host(tcp=False)
    pids = agent_pids(host)
    host.sup.kill()  # dead, not stopped: the agents keep running
    res = restart_daemon(host)
    assert res.returncode == 1
    assert res.stderr == (f"supervisor restart-daemon: supervisor: not restarted: no supervisor answers on "
                          f"{host.sup.state_dir / 'run' / 'control.sock'}\n")
    with pytest.raises(grpc.RpcError):  # nobody serves: nothing was started
        host.sup.status(timeout=1)
    assert {n: agent_processes(host.sup.state_dir, n) for n in AGENTS} == {n: [p] for n, p in pids.items()}
    assert not (host.sup.base / "run" / "handover.json").exists()
