"""Degrade, never stop the workload (issue 25): what a broken config refuses is the risky action, not the agents.

Broken trust material (``update.trusted_keys`` missing, unreadable or replaceable by another user) refuses every
update, at push time and with the reason, and is shown by status, doctor and metrics, while a real supervisor
started again on it (as after a reboot) runs every agent. ``check-config`` still refuses it, one line naming the
key, so an operator sees it before a restart.

While the config file does not even parse, the read-only commands (status, tail, audit, doctor) still reach the
running supervisor, where what can be read of the file says it is.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from baton.admission import REFUSAL_METADATA_KEY
from baton.pb import common_pb2, daemon_pb2
from tests.conftest import (
    PY,
    ROOT,
    Release,
    SupervisorProc,
    UpdateHost,
    agent,
    agent_processes,
    install_version,
    wait_for,
)
from tests.manager_fixtures import make_manager_fixture  # noqa: F401  (the make_manager fixture)
from tests.test_doctor import doctor
from tests.test_metrics import metrics_host, scrape, value  # noqa: F401 (a fixture)
from tests.test_strict_modes import one_line
from tests.test_trusted_paths import as_nobody, command_script, shared, shared_supervisor  # noqa: F401 (fixtures)

NOBODY = 65534

pytestmark = [pytest.mark.e2e,  # every test here starts a process
              pytest.mark.skipif(os.geteuid() != 0, reason="an unsafe key is one another user owns: needs root")]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "supervisor", *args], capture_output=True, text=True, cwd=ROOT, timeout=60)


def host_with_two_agents(make_supervisor: Callable[..., SupervisorProc], release: Release) -> UpdateHost:
    """A packaged agent ``app`` (the one pushed to) and a plain agent ``web``, both running, the key trusted."""
    sup = make_supervisor(
        [{"name": "app", "packaged": True, "command": "bin/agent", "notify": True, "restart": "always"},
         agent("web", "ready_agent.py", notify=True)],
        extra={"update": {"trusted_keys": [str(release.public_key)], "free_space_reserve_bytes": 0}})
    install_version(sup.base / "install", "app", "1.0.0", release.tree("1.0.0"))
    sup.start()
    sup.wait_agent("app", "running")
    sup.wait_agent("web", "running")
    return UpdateHost(sup, release)


def journaled(sup: SupervisorProc) -> list[str]:
    updates = sup.state_dir / "updates"
    return sorted(os.listdir(updates)) if updates.exists() else []


BREAKS: dict[str, tuple[Callable[[Release], Any], str]] = {
    "missing": (lambda r: r.public_key.unlink(), "not found"),
    "owned by another user": (lambda r: os.chown(r.public_key, NOBODY, NOBODY), f"owned by uid {NOBODY}"),
}


@pytest.mark.parametrize("how", sorted(BREAKS))
def test_broken_trusted_key_refuses_updates_and_every_agent_runs_after_a_restart(make_supervisor, release, how):
    host = host_with_two_agents(make_supervisor, release)
    sup = host.sup
    pkg = release.build("1.1.0")
    breaks, problem = BREAKS[how]
    breaks(release)
    assert sup.terminate() == 0  # every agent stops with it, as at a reboot
    sup.start()  # it starts with what is safe: the agents, and no updates
    app = sup.wait_agent("app", "running")
    sup.wait_agent("web", "running")
    st = sup.status()
    assert st.updates_refused.startswith("update.trusted_keys[0]: ") and problem in st.updates_refused
    assert "TRUSTED_KEYS_BROKEN" in st.updates_refused

    before_disk, journal = host.disk(), journaled(sup)
    with pytest.raises(grpc.RpcError) as e:
        host.push(pkg)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "update.trusted_keys[0]" in e.value.details() and problem in e.value.details()
    assert (REFUSAL_METADATA_KEY, "TRUSTED_KEYS_BROKEN") in tuple(e.value.trailing_metadata())
    assert host.disk() == before_disk
    assert journaled(sup) == journal, "an update was journaled"
    assert sup.agent("app").pid == app.pid and sup.agent("app").version == "1.0.0"

    shown = cli("status", "--socket", str(sup.socket))
    assert shown.returncode == 0, shown.stderr
    assert "updates refused: update.trusted_keys[0]: " in shown.stdout and "app" in shown.stdout
    code, checks = doctor(sup.config_path)
    refused = [c for c in checks if c["check"] == "supervisor" and c["status"] == "problem"]
    assert code == 2 and len(refused) == 1 and "update.trusted_keys[0]" in refused[0]["message"]
    res = cli("check-config", str(sup.config_path))
    assert res.returncode == 2 and "update.trusted_keys[0]" in one_line(res) and problem in one_line(res)


def test_a_trusted_key_put_back_is_used_by_the_next_push_without_a_restart(make_supervisor, release):
    host = host_with_two_agents(make_supervisor, release)
    saved = release.public_key.read_bytes()
    release.public_key.unlink()
    assert host.sup.status().updates_refused
    release.public_key.write_bytes(saved)
    assert host.sup.status().updates_refused == ""
    st = host.wait_final(host.push(release.build("1.1.0")))
    assert st.success, st.error


BROKEN_FILES = {
    "not TOML": "\n[update]\nmax_backups = = 3\n",
    "a bad value": "\n[update]\ndownload_timeout_s = -1\n",
}


@pytest.mark.parametrize("how", sorted(BROKEN_FILES))
def test_read_only_commands_reach_the_running_supervisor_while_its_config_file_is_broken(make_supervisor, how):
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True), agent("db", "ready_agent.py", notify=True)])
    sup.start()
    web = sup.wait_agent("web", "running")
    sup.wait_agent("db", "running")
    cli("stop", "db", "--socket", str(sup.socket))  # something for the audit log to show
    with sup.config_path.open("a") as f:
        f.write(BROKEN_FILES[how])
    config = str(sup.config_path)

    status = cli("status", "--config", config)
    assert status.returncode == 0, status.stderr
    assert "config error" in one_line(status)
    assert sorted(ln.split()[:2] for ln in status.stdout.splitlines()[2:]) == [["db", "stopped"], ["web", "running"]]
    tail = cli("tail", "--config", config, "web")
    assert tail.returncode == 0 and "config error" in one_line(tail)
    audit = cli("audit", "--config", config)
    assert audit.returncode == 0 and "StopAgent" in audit.stdout
    code, checks = doctor(sup.config_path)
    assert code == 2 and [(c["check"], c["status"]) for c in checks] == [
        ("config", "problem"), ("supervisor", "ok"), ("agents", "ok")]
    assert sup.proc is not None and f"pid {sup.proc.pid}," in checks[1]["message"]
    assert cli("check-config", config).returncode == 2
    assert sup.agent("web").pid == web.pid, "a read-only command changed an agent"


# ---- an agent whose own section is invalid ------------------------------------------------------------------

BAD_SECTIONS: dict[str, tuple[dict[str, Any], str]] = {
    "a command that is not there": ({"command": "/nonexistent/baton-agent"}, "agents[1].command: "),
    "an unknown user": ({"user": "no-such-user-baton"}, "agents[1].user: no such user"),
    "an unknown key": ({"restrat": "always"}, "agents[1].restrat: unknown key"),
}


@pytest.mark.parametrize("how", sorted(BAD_SECTIONS))
def test_an_agent_with_an_invalid_section_is_not_run_and_the_others_run_after_a_restart(make_supervisor, how):
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True), agent("bad", "ready_agent.py", notify=True),
                           agent("db", "ready_agent.py", notify=True)])
    sup.start()
    for name in ("web", "bad", "db"):
        sup.wait_agent(name, "running")
    change, error = BAD_SECTIONS[how]
    sup.cfg["agents"][1].update(change)
    assert sup.terminate() == 0  # every agent stops with it, as at a reboot
    sup.start()
    sup.wait_agent("web", "running")
    sup.wait_agent("db", "running")
    bad = sup.agent("bad")
    assert bad.state == common_pb2.AGENT_STATE_CONFIG_ERROR and bad.pid == 0 and bad.last_error.startswith(error)
    assert agent_processes(sup.state_dir, "bad") == []
    assert f"agent bad is not run (config_error) until its section is fixed and reloaded: {error}" in sup.output()

    shown = cli("status", "--socket", str(sup.socket))
    assert shown.returncode == 0, shown.stderr
    assert ["bad", "config_error", "-"] in [ln.split()[:3] for ln in shown.stdout.splitlines()]
    code, checks = doctor(sup.config_path)
    found = [c for c in checks if c["check"] == "agents" and c["status"] == "problem"]
    assert code == 2 and len(found) == 1 and "bad is not run" in found[0]["message"] and error in found[0]["message"]
    res = cli("check-config", str(sup.config_path))
    assert res.returncode == 2 and one_line(res).startswith(f"supervisor: config error: {error}")
    with pytest.raises(grpc.RpcError) as e:  # it cannot be started by hand either
        sup.stub.StartAgent(daemon_pb2.AgentRef(name="bad"), timeout=5)
    assert "its config section is invalid" in str(e.value.details()) and error in str(e.value.details())
    assert agent_processes(sup.state_dir, "bad") == []


def test_reload_stops_an_agent_whose_section_became_invalid_and_applies_the_rest(make_supervisor):
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True), agent("bad", "ready_agent.py", notify=True)])
    sup.start()
    web = sup.wait_agent("web", "running")
    sup.wait_agent("bad", "running")
    sup.cfg["agents"][1]["command"] = "/nonexistent/baton-agent"
    sup.cfg["agents"].append(agent("new", "ready_agent.py", notify=True))
    sup.write_config()
    res = cli("reload", "--socket", str(sup.socket))
    assert res.returncode == 0, res.stderr
    sup.wait_agent("new", "running")
    bad = sup.wait_agent("bad", "config_error")
    assert bad.last_error.startswith("agents[1].command: ")
    assert agent_processes(sup.state_dir, "bad") == []
    assert sup.agent("web").pid == web.pid

    sup.cfg["agents"][1] = agent("bad", "ready_agent.py", notify=True)  # fixed: the next reload runs it again
    sup.write_config()
    assert cli("reload", "--socket", str(sup.socket)).returncode == 0
    sup.wait_agent("bad", "running")
    assert sup.agent("web").pid == web.pid


def test_a_root_agent_whose_command_another_user_rewrote_is_never_run_and_the_others_run_after_a_restart(
        shared_supervisor, shared):  # noqa: F811 (the fixtures imported above)
    cmd = command_script(shared, 0o755)
    sup = shared_supervisor([agent("web", "ready_agent.py", notify=True),
                             {"name": "root-agent", "command": str(cmd), "start_seconds": 0.2}])
    sup.start()
    sup.wait_agent("web", "running")
    sup.wait_agent("root-agent", "running")
    assert sup.terminate() == 0
    cmd.chmod(0o777)  # by mistake; then another user takes the chance
    pwned = shared / "pwned"
    as_nobody("import sys; open(sys.argv[1], 'w').write(sys.argv[2])", str(cmd), f"#!/bin/sh\nid > {pwned}\n")
    sup.start()
    sup.wait_agent("web", "running")
    bad = sup.agent("root-agent")
    assert bad.state == common_pb2.AGENT_STATE_CONFIG_ERROR
    assert bad.last_error.startswith("agents[1].command: ") and "writable by group or others" in bad.last_error
    assert not pwned.exists(), "the rewritten command ran as root"


def test_the_manager_records_a_push_refused_for_broken_trust_material_with_its_reason(update_host, tmp_path):
    from baton.states import UpdateState
    from manager.errors import PushRefused
    from manager.publish import PackageRef
    from manager.push import Pusher, Target
    from manager.store import SqliteStore

    pkg = update_host.release.build("1.1.0")
    update_host.release.public_key.unlink()
    store = SqliteStore(tmp_path / "manager.db")
    ref = PackageRef("app", "1.1.0", pkg.url, pkg.sha256, pkg.size, pkg.signature)
    with Pusher(store, Target("node-1", f"unix:{update_host.sup.socket}"), None) as pusher, \
            pytest.raises(PushRefused) as e:
        pusher.push(ref, update_id="feedfacefeedface")
    assert e.value.code == "FAILED_PRECONDITION"
    row = store.update("feedfacefeedface")
    assert row is not None and row.state == UpdateState.FAILED and row.reason == "TRUSTED_KEYS_BROKEN"
    assert "update.trusted_keys[0]" in row.error and "not found" in row.error
    assert journaled(update_host.sup) == [], "the node journaled the refused push"


def test_restart_daemon_with_a_broken_key_and_a_broken_agent_keeps_the_other_agents_and_refuses_updates(
        make_self_host, release):
    from tests.test_restart_daemon import restart_daemon

    host = make_self_host(tcp=False)
    sup = host.sup
    before = {a.name: a.pid for a in sup.status().agents}
    broken, others = "worker", ("chatty", "web")  # worker crashes by design: its pid is not one to compare
    sup.cfg["agents"] = [{**a, "command": "/nonexistent/baton-agent"} if a["name"] == broken else a
                         for a in sup.cfg["agents"]]  # new dicts: SELF_AGENTS' own are shared by every test
    sup.write_config()
    release.public_key.unlink()
    res = restart_daemon(host)
    assert res.returncode == 0, res.stdout + res.stderr + sup.output()
    after = sup.status()
    assert {a.name: a.pid for a in after.agents if a.name != broken} == {n: before[n] for n in others}
    bad = sup.wait_agent(broken, "config_error")
    assert bad.last_error.endswith("/nonexistent/baton-agent is not an executable file")
    wait_for(lambda: agent_processes(sup.state_dir, broken) == [], what=f"{broken}'s process to be stopped")
    assert after.updates_refused.startswith("update.trusted_keys[0]: ")


def test_metrics_show_refused_updates_and_an_agent_not_run_for_its_config(metrics_host):  # noqa: F811 (fixture)
    host, port = metrics_host
    assert value(scrape(port), "baton_updates_refused") == 0
    saved = host.release.public_key.read_bytes()
    host.release.public_key.unlink()
    assert value(scrape(port), "baton_updates_refused") == 1
    host.release.public_key.write_bytes(saved)
    assert value(scrape(port), "baton_updates_refused") == 0

    host.sup.cfg["agents"].append(agent("bad", "ready_agent.py", user="no-such-user-baton"))
    host.sup.write_config()
    assert cli("reload", "--socket", str(host.sup.socket)).returncode == 0
    samples = scrape(port)
    assert value(samples, "baton_agents", state="config_error") == 1
    assert value(samples, "baton_agents", state="running") == 1


def test_a_node_with_broken_trust_material_says_so_to_the_manager_until_it_is_fixed(make_supervisor, release,
                                                                                    make_manager):
    from tests.manager_fixtures import make_fleet

    manager = make_manager()
    (host,) = make_fleet(make_supervisor, release, manager, 1)
    saved = release.public_key.read_bytes()
    release.public_key.unlink()
    wait_for(lambda: "update.trusted_keys[0]" in manager.nodes()["node-1"]["updates_refused"], 20, interval=0.2,
             what="the next heartbeat to tell the Manager")
    listed = manager.cli("nodes").stdout
    assert "node-1 refuses every update: update.trusted_keys[0]" in listed and "TRUSTED_KEYS_BROKEN" in listed
    release.public_key.write_bytes(saved)
    wait_for(lambda: manager.nodes()["node-1"]["updates_refused"] == "", 20, interval=0.2,
             what="the heartbeat after the fix to clear it")
    assert host.sup.agent("app").state == common_pb2.AGENT_STATE_RUNNING
