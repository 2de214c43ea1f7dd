"""Start order (issue 25): ``priority`` (lower first) and ``after = [...]``, honoured at start; stop in reverse."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from baton.pb import common_pb2
from tests.conftest import PY, ROOT, agent


def lines_of(sup) -> list[str]:
    return sup.stdout_path.read_text(errors="replace").splitlines()


def first(lines: list[str], text: str) -> int:
    return next(i for i, line in enumerate(lines) if text in line)


@pytest.mark.e2e
def test_agent_after_another_starts_only_once_that_one_is_ready_and_priority_orders_the_rest(make_supervisor,
                                                                                             tmp_path):
    ready = tmp_path / "db-may-be-ready"
    sup = make_supervisor([agent("web", "ready_agent.py", after=["db"]),
                           agent("db", "ready_agent.py", notify=True, env={"READY_WHEN_FILE": str(ready)}),
                           agent("early", "ready_agent.py", priority=-5)]).start()
    sup.wait_agent("db", "starting")
    sup.wait_agent("early", "running")
    time.sleep(1.5)  # web's own start_seconds (1 s) would have passed had it started with the others
    web = sup.agent("web")
    assert web.pid == 0 and web.state == common_pb2.AGENT_STATE_STOPPED
    lines = lines_of(sup)
    assert first(lines, "agent early started pid") < first(lines, "agent db started pid")
    assert not any("agent web started pid" in line for line in lines)
    ready.touch()
    sup.wait_agent("web", "running")
    lines = lines_of(sup)
    assert first(lines, "agent db starting -> running") < first(lines, "agent web started pid")


@pytest.mark.e2e
def test_status_lists_agents_in_start_order_and_stop_all_stops_them_in_reverse(make_supervisor):
    sup = make_supervisor([agent("web", "ready_agent.py", after=["db"]), agent("db", "ready_agent.py"),
                           agent("early", "ready_agent.py", priority=-5)]).start()
    for name in ("early", "db", "web"):
        sup.wait_agent(name, "running")
    assert [a.name for a in sup.status().agents] == ["early", "db", "web"]
    res = subprocess.run([PY, "-m", "supervisor", "stop", "all", "--socket", str(sup.socket)], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    assert [line.split(":")[0] for line in res.stdout.splitlines()] == ["early", "db", "web"]  # as status lists
    lines = lines_of(sup)
    assert first(lines, "agent web: stopping") < first(lines, "agent db: stopping") < first(lines,
                                                                                         "agent early: stopping")


@pytest.mark.parametrize(("agents", "key", "problem"), [
    ('[[agents]]\nname = "a"\ncommand = "/bin/true"\nafter = ["b"]\n', "agents[0].after[0]", "no agent named 'b'"),
    ('[[agents]]\nname = "a"\ncommand = "/bin/true"\nafter = ["b"]\n'
     '[[agents]]\nname = "b"\ncommand = "/bin/true"\nafter = ["c"]\n'
     '[[agents]]\nname = "c"\ncommand = "/bin/true"\nafter = ["a"]\n', "agents[0].after", "a cycle: a -> b -> c -> a"),
    ('[[agents]]\nname = "a"\ncommand = "/bin/true"\nafter = ["a"]\n', "agents[0].after[0]", "after itself"),
])
@pytest.mark.e2e
def test_unknown_name_or_cycle_in_after_is_refused_at_check_config_naming_the_key(tmp_path: Path, agents, key,
                                                                                  problem):
    path = tmp_path / "c.toml"
    path.write_text(f'[node]\nid = "n1"\nstate_dir = "{tmp_path}/state"\ninstall_root = "{tmp_path}/install"\n'
                    f'[grpc]\nunix_socket = "{tmp_path}/s.sock"\n{agents}')
    res = subprocess.run([PY, "-m", "supervisor", "check-config", str(path)], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and key in lines[0] and problem in lines[0], res.stderr


def test_an_agent_after_one_set_apart_for_its_config_still_starts_in_a_degraded_config(tmp_path: Path) -> None:
    """Ordering only: an agent never run (config_error) orders nothing, so the one after it is not set apart too."""
    from baton.config import config_from_dict

    cfg = config_from_dict({"node": {"id": "n1", "state_dir": str(tmp_path / "state"),
                                     "install_root": str(tmp_path / "install")},
                            "grpc": {"unix_socket": str(tmp_path / "s.sock")},
                            "agents": [{"name": "db", "command": str(tmp_path / "no-such-binary")},
                                       {"name": "web", "command": "/bin/true", "after": ["db"]}]},
                           degrade=True)
    assert [(b.name, b.key) for b in cfg.broken_agents] == [("db", "agents[0].command")]
    assert [(a.name, a.after) for a in cfg.agents] == [("web", ())]
