"""Under a real systemd (tests/systemd_harness.py): the shipped unit, a self-update, a rollback, a stop."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import psutil
import pytest

from baton.pb import common_pb2
from tests.conftest import PY, ROOT, SELF_AGENTS, SelfUpdateHost, SupervisorProc, free_port, wait_for
from tests.systemd_harness import SystemdManager, unavailable_reason

UNIT = ROOT / "packaging" / "systemd" / "baton-supervisor.service"
ETC_UNITS = Path("/etc/systemd/system")  # inside the harness's namespace: a tmpfs of its own
REASON = unavailable_reason()
needs_systemd = pytest.mark.skipif(bool(REASON), reason=f"no real systemd here: {REASON}")


@pytest.mark.e2e
def test_shipped_units_pass_systemd_analyze_verify_silently(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing; scripts/bootstrap.sh installs systemd's tools")
    root = tmp_path / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copytree("/lib/systemd/system", root / "lib/systemd/system", symlinks=True)
    from supervisor.cli.install_self import render_unit

    text = render_unit(UNIT.read_text(), Path("/opt/baton"), Path("/etc/baton/supervisor.toml"))
    for path in re.findall(r"(?:ExecStart=)(/\S+)", text):
        p = root / path.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("#!/bin/sh\n")
        p.chmod(0o755)
    for unit in sorted((ROOT / "packaging" / "systemd").glob("*.service")):
        (root / "etc/systemd/system" / unit.name).write_text(
            render_unit(unit.read_text(), Path("/opt/baton"), Path("/etc/baton/supervisor.toml")))
        res = subprocess.run(["systemd-analyze", "verify", f"--root={root}", f"/etc/systemd/system/{unit.name}"],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and res.stdout == "" and res.stderr == "", res.stdout + res.stderr


@pytest.mark.e2e
def test_verify_would_catch_a_bad_setting(tmp_path):
    """The check above is not vacuous: systemd-analyze prints an unknown key (and still exits 0)."""
    bad = tmp_path / "bad.service"
    bad.write_text("[Service]\nExecStart=/bin/true\nKillMode=sometimes\n")
    res = subprocess.run(["systemd-analyze", "verify", str(bad)], capture_output=True, text=True, timeout=60)
    assert res.stdout + res.stderr != ""


@pytest.mark.parametrize("lines", [
    "0::/system.slice/baton-supervisor.service\n",
    "12:pids:/\n1:name=systemd:/system.slice/baton-supervisor.service\n0::/\n",
    "0::/system.slice/baton-supervisor.service/baton-supervisor\n",  # moved to its leaf by agents' cgroup limits
])
def test_the_supervisor_finds_its_own_unit_in_its_cgroup(tmp_path, lines):
    from supervisor.systemd import own_unit

    (tmp_path / "cgroup").write_text(lines)
    assert own_unit(str(tmp_path / "cgroup")) == "baton-supervisor.service"


def test_outside_a_service_there_is_no_unit_to_ask_about(tmp_path):
    from supervisor.systemd import own_unit

    (tmp_path / "cgroup").write_text("0::/user.slice/user-0.slice/session-1.scope\n")
    assert own_unit(str(tmp_path / "cgroup")) == ""
    assert own_unit(str(tmp_path / "missing")) == ""


def install_self_cli(*args: str | Path, release_root: Path | None = None,
                     without_systemd: bool = False) -> subprocess.CompletedProcess[str]:
    """``supervisor install-self ARGS`` from the checkout or an unpacked release, as root with an empty environment.

    ``without_systemd``: in a mount namespace of its own with an empty tmpfs on /run, so systemd is not running
    there even on a machine whose PID 1 is systemd.
    """
    exe = [str(release_root / "bin" / "supervisor")] if release_root else [PY, "-m", "supervisor"]
    argv = ["env", "-i", *exe, "install-self", "--bin-dir", "", *map(str, args)]  # no links in the machine's PATH
    if without_systemd:
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount -t tmpfs -o mode=755 tmpfs /run && exec "$@"', "sh", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=180, cwd=ROOT)


@pytest.mark.e2e
def test_install_self_enable_with_no_unit_is_a_usage_error_that_installs_nothing(make_supervisor):
    sup = make_supervisor([], name="nounit")
    sup.write_config()
    res = install_self_cli("--config", sup.config_path, "--enable", "--no-unit", "--unit-dir", sup.base / "units")
    assert res.returncode == 2
    assert res.stderr == ("supervisor install-self: --enable starts the unit that --no-unit does not write; "
                          "drop one of them\n")
    assert not (sup.base / "install").exists() and not (sup.base / "units").exists()


@pytest.mark.e2e
def test_install_self_enable_from_a_checkout_is_refused_before_installing(make_supervisor):
    """A development tree runs only with BATON_PYTHON and gets no unit: there is nothing to enable."""
    sup = make_supervisor([], name="devenable")
    sup.write_config()
    res = install_self_cli("--config", sup.config_path, "--enable", "--unit-dir", sup.base / "units")
    assert res.returncode == 2 and "--enable needs a release" in res.stderr
    assert not (sup.base / "install").exists() and not (sup.base / "units").exists()


@pytest.mark.e2e
@pytest.mark.slow
def test_install_self_enable_without_systemd_keeps_the_release_installed_and_says_what_to_run(
        make_supervisor, releases):
    from tests.release_fixtures import unpack

    sup = make_supervisor([], name="nosd")
    sup.write_config()
    root = unpack(releases.v100, sup.base / "unpacked")
    res = install_self_cli("--config", sup.config_path, "--enable", "--unit-dir", sup.base / "units",
                           release_root=root, without_systemd=True)
    assert res.returncode == 1
    (line,) = res.stderr.splitlines()
    assert "supervisor 1.0.0 IS installed" in line and "systemd is not running on this machine" in line
    assert "systemctl daemon-reload && systemctl enable --now baton-supervisor.service" in line
    launcher = sup.base / "install" / "supervisor" / "current" / "bin" / "supervisor"
    assert f"`{launcher} run --config {sup.config_path}`" in line
    assert os.readlink(launcher.parents[1]) == "versions/1.0.0"
    assert (sup.base / "units" / UNIT.name).is_file()


def unit_for_test(sup: SupervisorProc, env: dict[str, str] | None = None) -> str:
    """The shipped unit as install-self renders it, for a development tree (BATON_PYTHON), logging to a file."""
    from supervisor.cli.install_self import render_unit

    text = render_unit(UNIT.read_text(), sup.base / "install", sup.config_path)
    for k, v in {"BATON_PYTHON": PY, **(env or {})}.items():
        text = text.replace("[Service]\n", f"[Service]\nEnvironment={k}={v}\n", 1)
    text = text.replace("[Unit]\n", "[Unit]\nDefaultDependencies=no\n", 1)
    text = text.replace("WatchdogSec=30s", "WatchdogSec=3s")  # a switch that starved the watchdog would show
    text = re.sub(r"^(After|Wants)=network-online.target\n", "", text, flags=re.M)
    text = text.replace("[Service]\n", f"[Service]\nStandardOutput=append:{sup.stdout_path}\n"
                                       f"StandardError=append:{sup.stdout_path}\n", 1)
    return text


@pytest.fixture
def systemd(tmp_path):
    mgr = SystemdManager(tmp_path / "systemd")
    try:
        mgr.start()
        yield mgr
    finally:
        mgr.stop()


@pytest.fixture
def unit_host(systemd, make_supervisor, release):
    return start_unit_host(systemd, make_supervisor, release)


def start_unit_host(systemd, make_supervisor, release, env: dict[str, str] | None = None) -> SelfUpdateHost:
    from baton.config import load_config
    from supervisor.cli.install_self import install_self

    sup = make_supervisor(list(SELF_AGENTS), name="sd",
                          extra={"update": {"trusted_keys": [str(release.public_key)], "handshake_timeout_s": 30.0,
                                            "free_space_reserve_bytes": 0}})
    sup.write_config()
    install_self(load_config(sup.config_path), "1.0.0")
    systemd.add_unit("baton-supervisor.service", unit_for_test(sup, env))
    res = systemd.systemctl("start", "baton-supervisor.service", timeout=120)
    assert res.returncode == 0, res.stderr + sup.output()
    for a in ("web", "worker", "chatty"):
        sup.wait_agent(a, "running", timeout=30)
    return SelfUpdateHost(sup, release)


def agent_pids(host) -> dict[str, int]:
    return {a.name: a.pid for a in host.sup.status().agents}


@pytest.mark.e2e
@needs_systemd
def test_unit_starts_and_reports_ready(systemd, unit_host):
    props = systemd.show("baton-supervisor.service", "ActiveState", "SubState", "StatusText", "MainPID", "Type")
    assert props["ActiveState"] == "active" and props["Type"] == "notify"
    assert int(props["MainPID"]) == unit_host.sup.status().pid
    wait_for(lambda: systemd.show("baton-supervisor.service", "StatusText")["StatusText"]
             == "3 running, 0 starting, 0 failed of 3 agents", what="STATUS= counting the running agents")


@pytest.mark.e2e
@needs_systemd
def test_systemctl_reload_applies_the_config_and_refuses_a_bad_one(systemd, unit_host):
    from tests.conftest import agent

    sup = unit_host.sup
    before = agent_pids(unit_host)
    sup.cfg["agents"] = [*SELF_AGENTS[:2], agent("extra", "ready_agent.py", notify=True)]  # chatty out, extra in
    sup.write_config()
    res = systemd.systemctl("reload", "baton-supervisor.service", timeout=120)
    assert res.returncode == 0, res.stderr + sup.output()
    after = agent_pids(unit_host)
    assert set(after) == {"web", "worker", "extra"}
    assert after["web"] == before["web"] and after["worker"] == before["worker"]
    sup.cfg["agents"].append({"name": "bad", "command": "/nonexistent/agent"})
    sup.write_config()
    res = systemd.systemctl("reload", "baton-supervisor.service", timeout=120)
    assert res.returncode != 0
    assert systemd.show("baton-supervisor.service", "ActiveState", "MainPID") == {
        "ActiveState": "active", "MainPID": str(sup.status().pid)}
    assert agent_pids(unit_host) == after


@pytest.mark.e2e
@needs_systemd
def test_self_update_under_systemd_keeps_main_pid_agents_and_helper(systemd, unit_host):
    main_pid = systemd.show("baton-supervisor.service", "MainPID")["MainPID"]
    before = agent_pids(unit_host)
    uid = unit_host.push(unit_host.supervisor_package("1.1.0"))
    st = unit_host.wait_final(uid, timeout=120)
    assert st.state == common_pb2.UPDATE_STATE_COMMITTED, st.error + unit_host.sup.output()
    props = systemd.show("baton-supervisor.service", "MainPID", "ActiveState", "NRestarts")
    assert props == {"MainPID": main_pid, "ActiveState": "active", "NRestarts": "0"}
    assert unit_host.sup.status().supervisor_version == "1.1.0"
    assert agent_pids(unit_host) == before
    import time

    time.sleep(4)  # longer than WatchdogSec: the new process keeps feeding the watchdog
    assert systemd.show("baton-supervisor.service", "MainPID", "NRestarts") == {"MainPID": main_pid, "NRestarts": "0"}
    log = (unit_host.sup.state_dir / "updates" / uid / "helper.log").read_text()
    assert "committed" in log, "the helper (its own transient unit) ran through the switch"


@pytest.mark.e2e
@needs_systemd
def test_failed_self_update_under_systemd_rolls_back(systemd, unit_host):
    before = agent_pids(unit_host)
    uid = unit_host.push(unit_host.supervisor_package("1.1.0", "exit_at_start"))
    st = unit_host.wait_final(uid, timeout=120)
    assert st.state == common_pb2.UPDATE_STATE_ROLLED_BACK, st.error
    status = wait_for(lambda: unit_host.sup.status(timeout=2), 60, what="the old supervisor")
    assert status.supervisor_version == "1.0.0"
    assert systemd.show("baton-supervisor.service", "ActiveState")["ActiveState"] == "active"
    assert agent_pids(unit_host) == before


@pytest.mark.e2e
@needs_systemd
def test_systemctl_restart_keeps_every_agent_and_applies_a_changed_metrics_section(systemd, unit_host):
    """docs/handover.md, "Under systemd": the unit really restarts (a new MainPID), the agents do not."""
    import urllib.request

    from tests.conftest import agent_processes, free_port

    sup = unit_host.sup
    main_pid = int(systemd.show("baton-supervisor.service", "MainPID")["MainPID"])
    before = agent_pids(unit_host)
    port = free_port()
    sup.cfg["metrics"] = {"listen": f"127.0.0.1:{port}"}
    sup.write_config()
    res = systemd.systemctl("restart", "baton-supervisor.service", timeout=120)
    assert res.returncode == 0, res.stderr + sup.output()
    props = systemd.show("baton-supervisor.service", "MainPID", "ActiveState")
    assert props["ActiveState"] == "active" and int(props["MainPID"]) != main_pid
    status = sup.status()
    assert status.pid == int(props["MainPID"])  # pids of the manager's namespace
    assert agent_pids(unit_host) == before
    for a in status.agents:
        assert a.kept and len(agent_processes(sup.state_dir, a.name)) == 1  # host pids: one process each
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert 'baton_agents{state="running"} 3.0' in r.read().decode()
    assert not (sup.base / "run" / "handover.json").exists()


@pytest.mark.e2e
@needs_systemd
def test_supervisor_killed_while_systemctl_restart_hands_over_leaves_every_agent_adopted_by_the_next_start(
        systemd, make_supervisor, release, tmp_path):
    """SIGKILL right after the old process gave its state to the helper: systemd starts the next one, which takes
    the agents from the helper."""
    from tests.conftest import agent_processes

    crash = tmp_path / "crash-at"
    host = start_unit_host(systemd, make_supervisor, release, env={"BATON_SUPERVISOR_CRASH_FILE": str(crash)})
    main_pid = systemd.show("baton-supervisor.service", "MainPID")["MainPID"]
    before = agent_pids(host)
    crash.write_text("handover-state-sent")
    res = systemd.systemctl("restart", "baton-supervisor.service", timeout=120)
    assert not crash.exists(), "the crash point was not reached"
    assert res.returncode == 0, res.stderr + host.sup.output()
    status = wait_for(lambda: (s := host.sup.status(timeout=2)).agents and s, 60, what="the next supervisor")
    props = systemd.show("baton-supervisor.service", "MainPID", "ActiveState")
    assert props["ActiveState"] == "active" and props["MainPID"] != main_pid
    assert status.pid == int(props["MainPID"])
    assert agent_pids(host) == before
    for name in ("web", "worker", "chatty"):
        host.sup.wait_agent(name, "running", timeout=30)
        assert len(agent_processes(host.sup.state_dir, name)) == 1, f"agent {name} must run exactly once"
    wait_for(lambda: not (host.sup.base / "run" / "handover.json").exists(), 60, what="the handover to end")


@pytest.mark.e2e
@needs_systemd
def test_systemctl_stop_stops_every_agent(systemd, unit_host):
    fifos = {str(unit_host.sup.state_dir / "agents" / n / "output.fifo") for n in ("web", "worker", "chatty")}

    def agents_alive() -> list[int]:
        out = []
        for p in psutil.process_iter():
            try:
                if os.readlink(f"/proc/{p.pid}/fd/1") in fifos and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p.pid)
            except (OSError, psutil.Error):
                continue
        return out

    assert len(agents_alive()) == 3
    res = systemd.systemctl("stop", "baton-supervisor.service", timeout=120)
    assert res.returncode == 0, res.stderr
    assert systemd.show("baton-supervisor.service", "ActiveState")["ActiveState"] == "inactive"
    assert agents_alive() == []


@pytest.mark.e2e
@needs_systemd
@pytest.mark.slow
def test_one_command_installs_a_release_enables_and_starts_it_under_systemd_self_updates_and_uninstalls(
        systemd, make_supervisor, release, releases):
    """README "Installing from a release": tar -xzf, then `install-self --enable`; the unit is not edited.

    Run in the manager's mount namespace, where /etc/systemd/system is the harness's tmpfs: the
    machine's own /etc never sees the unit or the enable link.
    """
    from tests.release_fixtures import unpack

    metrics = free_port()  # the documented [metrics] works from an installed release (prometheus-client bundled)
    sup = make_supervisor(list(SELF_AGENTS), name="rel",
                          extra={"update": {"trusted_keys": [str(release.public_key)], "handshake_timeout_s": 30.0,
                                            "free_space_reserve_bytes": 0},
                                 "metrics": {"listen": f"127.0.0.1:{metrics}"}})
    sup.write_config()
    root = unpack(releases.v100, sup.base / "unpacked")
    unit = ETC_UNITS / UNIT.name
    wants = ETC_UNITS / "multi-user.target.wants" / UNIT.name
    assert not os.path.lexists(unit) and not os.path.lexists(wants)
    res = systemd.inside("env", "-i", root / "bin" / "supervisor", "install-self", "--config", sup.config_path,
                         "--enable", "--bin-dir", sup.base / "bin")
    assert res.returncode == 0, res.stdout + res.stderr
    props = systemd.show(UNIT.name, "ActiveState", "UnitFileState", "MainPID")
    assert (props["ActiveState"], props["UnitFileState"]) == ("active", "enabled")
    assert os.readlink(systemd.path_inside(wants)) == str(unit)
    main_pid = props["MainPID"]
    assert int(main_pid) == sup.status().pid
    assert f"{UNIT.name} is enabled and active: supervisor 1.0.0, MainPID {main_pid}, agents: " in res.stdout
    for a in ("web", "worker", "chatty"):
        sup.wait_agent(a, "running", timeout=30)
    doctor = systemd.inside("env", "-i", root / "bin" / "supervisor", "doctor", "--config", sup.config_path)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr  # a healthy release install under systemd: all ok
    assert f"systemd-unit  {unit} matches " in doctor.stdout
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as r:
        assert 'baton_supervisor_info{node="node-1",version="1.0.0"} 1.0' in r.read().decode()
    host = SelfUpdateHost(sup, release)
    before = agent_pids(host)
    uid = host.push(release.sign(releases.v110, "supervisor", "1.1.0"))
    st = host.wait_final(uid, timeout=120)
    assert st.state == common_pb2.UPDATE_STATE_COMMITTED, st.error
    status = sup.status()
    assert (status.supervisor_version, status.dependencies["prometheus-client"]) == ("1.1.0", "0.25.0")
    assert systemd.show(UNIT.name, "MainPID", "NRestarts") == {"MainPID": main_pid, "NRestarts": "0"}
    assert agent_pids(host) == before
    assert not os.path.lexists(unit) and not os.path.lexists(wants), "the machine's own /etc was touched"
    linked = sup.base / "bin" / "supervisor"  # the operator's PATH entry follows current
    assert subprocess.run([linked, "--version"], capture_output=True, text=True).stdout.split()[-1] == "1.1.0"

    res = systemd.inside("env", "-i", linked, "install-self", "--config", sup.config_path, "--uninstall",
                         "--bin-dir", sup.base / "bin")
    assert res.returncode == 0, res.stdout + res.stderr
    assert systemd.show(UNIT.name, "ActiveState", "UnitFileState") == {"ActiveState": "inactive",
                                                                       "UnitFileState": ""}
    assert not systemd.path_inside(unit).exists() and not systemd.path_inside(wants).exists()
    assert not os.path.lexists(linked) and not (sup.base / "install" / "supervisor").exists()
    assert sup.state_dir.is_dir() and "kept " in res.stdout  # state and logs stay without --purge
    for pid in before.values():
        wait_for(lambda pid=pid: not psutil.pid_exists(pid), 30, what=f"agent {pid} stopped by the uninstall")


def _daemon_fails_at_start(root: Path) -> None:
    """``install-self`` still runs (it never imports the daemon); ``supervisor run`` exits at once."""
    daemon = root / "lib" / "supervisor" / "daemon.py"
    daemon.write_text(daemon.read_text() + '\nraise ImportError("this release cannot run (a test)")\n')


@pytest.mark.e2e
@needs_systemd
@pytest.mark.slow
def test_install_self_enable_of_a_unit_that_fails_to_start_says_where_to_look_and_keeps_the_release(
        systemd, make_supervisor, releases):
    from tests.release_fixtures import unpack

    sup = make_supervisor([], name="fails")
    sup.write_config()
    root = unpack(releases.derived("1.0.1", _daemon_fails_at_start), sup.base / "unpacked")
    res = systemd.inside("env", "-i", root / "bin" / "supervisor", "install-self", "--config", sup.config_path,
                         "--enable", "--bin-dir", sup.base / "bin")
    assert res.returncode == 1
    (line,) = res.stderr.splitlines()
    assert "supervisor 1.0.1 IS installed" in line and f"{UNIT.name} failed to start" in line
    assert "see `systemctl status baton-supervisor`, `journalctl -u baton-supervisor`" in line
    assert os.readlink(sup.base / "install" / "supervisor" / "current") == "versions/1.0.1"
    assert systemd.show(UNIT.name, "UnitFileState")["UnitFileState"] == "enabled"
