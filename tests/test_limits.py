"""Resource limits per agent (issue 25): a cgroup of its own (memory, tasks, CPU) and RLIMIT_NOFILE.

Real supervisors, real agents, the kernel's own limits: each test makes an agent cross a limit, or reads from
inside the agent what it was given before its command ran.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from baton.config import ConfigError, config_from_dict
from baton.limits import Limits
from supervisor.cgroups import AGENTS_DIR, SUPERVISOR_LEAF, CgroupHost, check_config
from tests.conftest import AGENTS, PY, ROOT, wait_for

HOST = CgroupHost.detect()  # the supervisors these tests start live in this process's cgroups
needs = pytest.mark.skipif(not {"memory", "pids", "cpu"} <= set(HOST.hierarchies),
                           reason="this host gives no memory, pids and cpu controllers")


def limited(name: str, *argv: str, **kw: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"name": name, "command": PY, "args": ["-u", str(AGENTS / "limits_agent.py"), *argv],
                         "start_retries": 10}
    d.update(kw)
    return d


def cgroup_dirs(name: str) -> list[Path]:
    return [h.own_dir / AGENTS_DIR / name for h in HOST.hierarchies.values()]


def cgroup_dir(name: str, controller: str) -> Path:
    return HOST.hierarchies[controller].own_dir / AGENTS_DIR / name


def enforced(name: str) -> dict[str, int | None]:
    """What the kernel holds for agent ``name``'s cgroup, in the config's units (None: no limit, or no file for
    it: a controller never asked for), read from the files of whichever cgroup version the host has."""
    def read(controller: str, fname: str) -> str:
        path = cgroup_dir(name, controller) / fname
        return path.read_text().strip() if path.exists() else "max"

    def limit(text: str) -> int | None:  # v2 writes "max"; v1 -1 as the largest page-aligned value
        return None if text in ("max", "-1") or int(text) > 1 << 60 else int(text)

    if HOST.hierarchies["memory"].v2:
        memory = limit(read("memory", "memory.max"))
    else:
        memory = limit(read("memory", "memory.limit_in_bytes"))
    if HOST.hierarchies["cpu"].v2:
        quota, _, period = read("cpu", "cpu.max").partition(" ")
        weight = limit(read("cpu", "cpu.weight"))
    else:
        quota, period = read("cpu", "cpu.cfs_quota_us"), read("cpu", "cpu.cfs_period_us")
        shares = limit(read("cpu", "cpu.shares"))
        weight = shares * 100 // 1024 if shares is not None else None
    assert period in ("", "max", "100000"), period  # the period Baton writes, where a quota is
    return {"memory_max": memory, "tasks_max": limit(read("pids", "pids.max")), "cpu_weight": weight,
            "cpu_quota": limit(quota)}


def cgroup_paths(proc_cgroup: str) -> dict[str, str]:
    """Each controller's cgroup from a /proc/PID/cgroup text: its v1 line, or the v2 line where the host puts it
    in the unified hierarchy."""
    lines = [line.split(":", 2) for line in proc_cgroup.split()]
    unified = next((path for _, ctrls, path in lines if ctrls == ""), "")
    v1 = {c: path for _, ctrls, path in lines for c in ctrls.split(",") if c}
    return {c: unified if h.v2 else v1[c] for c, h in HOST.hierarchies.items()}


def first_lines(sup: Any, name: str) -> str:
    """The agent's output once it has printed where it runs."""
    def read() -> str:
        path = sup.log_of(name)
        text = path.read_text() if path.exists() else ""
        return text if "NOFILE" in text else ""

    return str(wait_for(read, what=f"the first lines of {name}"))


@needs
@pytest.mark.e2e
def test_agent_past_memory_max_is_oom_killed_recorded_and_restarted_while_its_neighbour_runs_on(make_supervisor):
    sup = make_supervisor([limited("hog", "hog", "200", memory_max="64M", backoff_initial_s=2.0,
                                   start_seconds=10.0),
                           limited("calm", "show")]).start()
    calm = sup.wait_agent("calm", "running").pid
    a = sup.wait_agent("hog", "backoff", pred=lambda a: "memory limit" in a.last_error)
    assert a.last_exit_signal == "SIGKILL"
    assert "killed by the kernel: memory limit (memory_max = 67108864 bytes) reached (oom_kill 1)" in a.last_error
    assert "ALLOCATED" not in sup.log_of("hog").read_text()
    wait_for(lambda: "exited with -9 (killed by the kernel: memory limit" in sup.output(), what="the log line")
    sup.wait_agent("hog", "backoff", timeout=30, pred=lambda a: a.restarts >= 1)  # restarted by policy, killed again
    assert sup.wait_agent("calm", "running").pid == calm


@needs
@pytest.mark.e2e
def test_agent_past_tasks_max_cannot_fork_and_its_exit_names_the_limit(make_supervisor):
    sup = make_supervisor([limited("forker", "fork", "10", tasks_max=4, backoff_initial_s=30.0,
                                   start_seconds=10.0)]).start()
    a = sup.wait_agent("forker", "backoff", pred=lambda a: "tasks limit" in a.last_error)
    assert a.last_exit_status == 3
    assert "tasks limit (tasks_max = 4) reached" in a.last_error
    assert "FORK REFUSED 3" in sup.log_of("forker").read_text()


@needs
@pytest.mark.e2e
def test_agent_command_runs_in_its_cgroup_with_its_open_files_limit_from_its_first_instruction(make_supervisor):
    sup = make_supervisor([limited("boxed", "show", memory_max="256M", tasks_max=50, cpu_weight=50,
                                   cpu_quota="50%", open_files=77)]).start()
    pid = sup.wait_agent("boxed", "running").pid
    text = first_lines(sup, "boxed")
    paths = cgroup_paths(text.split("NOFILE")[0].removeprefix("CGROUP"))
    for c in ("memory", "pids", "cpu"):
        assert paths[c].endswith(f"/{AGENTS_DIR}/boxed"), paths
    assert "NOFILE 77" in text
    for c in ("memory", "pids", "cpu"):
        assert str(pid) in (cgroup_dir("boxed", c) / "cgroup.procs").read_text().split()
    assert enforced("boxed") == {"memory_max": 256 << 20, "tasks_max": 50, "cpu_weight": 50, "cpu_quota": 50000}


@needs
@pytest.mark.e2e
def test_agent_adopted_by_the_next_supervisor_keeps_its_cgroup_and_its_oom_kill_is_recorded(make_supervisor):
    sup = make_supervisor([limited("later", "hog-on-usr1", "200", memory_max="64M", start_seconds=0.2,
                                   backoff_initial_s=30.0)]).start()
    pid = sup.wait_agent("later", "running").pid
    wait_for(lambda: "WAITING" in sup.log_of("later").read_text(), what="the agent to wait for its signal")
    sup.kill()
    sup.start()
    a = sup.wait_agent("later", "running")
    assert a.pid == pid and a.adopted
    memory = cgroup_dir("later", "memory")
    assert str(pid) in (memory / "cgroup.procs").read_text().split()
    assert enforced("later")["memory_max"] == 64 << 20
    os.kill(pid, signal.SIGUSR1)
    wait_for(lambda: f"agent later pid {pid} exited with unknown status (killed by the kernel: memory limit "
             f"(memory_max = {64 << 20} bytes) reached (oom_kill 1))" in sup.output(), what="the OOM kill's log line")
    a = sup.wait_agent("later", "running", pred=lambda a: a.pid not in (0, pid))  # restarted at once: it had run
    assert a.last_error == (f"restarted after: exited (status unknown: adopted process): killed by the kernel: "
                            f"memory limit (memory_max = {64 << 20} bytes) reached (oom_kill 1)")
    again = a.pid
    assert str(again) in (memory / "cgroup.procs").read_text().split()


@needs
@pytest.mark.e2e
def test_memory_limit_changed_while_the_supervisor_was_down_is_what_the_next_start_applies(make_supervisor):
    memory = cgroup_dir("grow", "memory")
    sup = make_supervisor([limited("grow", "show", memory_max="64M")]).start()
    sup.wait_agent("grow", "running")
    for change, want in (({"memory_max": "256M"}, {"memory_max": 256 << 20, "tasks_max": None}),
                         ({"tasks_max": 30}, {"memory_max": None, "tasks_max": 30})):  # None: lifted
        assert sup.terminate() == 0  # the agent stops; its cgroup stays, with its limit
        sup.cfg["agents"] = [limited("grow", "show", **change)]
        pid = sup.start().wait_agent("grow", "running").pid
        now = enforced("grow")
        assert {k: now[k] for k in want} == want, now
        assert str(pid) in (memory / "cgroup.procs").read_text().split()


@needs
@pytest.mark.e2e
def test_agent_removed_from_the_config_takes_its_cgroup_with_it(make_supervisor):
    sup = make_supervisor([limited("gone", "show", tasks_max=20), limited("stays", "show")]).start()
    sup.wait_agent("gone", "running")
    assert cgroup_dir("gone", "pids").is_dir()
    sup.cfg["agents"] = [limited("stays", "show")]
    sup.write_config()
    res = subprocess.run([PY, "-m", "supervisor", "reload", "--socket", str(sup.socket)], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    assert not any(d.exists() for d in cgroup_dirs("gone"))


ROOT_CGROUP = Path("/sys/fs/cgroup")


def v2_root_offers_the_controllers() -> bool:
    """A unified host (no v1 hierarchy holds them) whose root cgroup enables memory, pids and cpu below it."""
    try:
        return {"memory", "pids", "cpu"} <= set((ROOT_CGROUP / "cgroup.subtree_control").read_text().split())
    except OSError:
        return False


@pytest.mark.skipif(os.geteuid() != 0 or not v2_root_offers_the_controllers(),
                    reason="needs root on a cgroup v2 host with memory, pids and cpu enabled at its root")
@pytest.mark.e2e
def test_supervisor_started_in_the_root_cgroup_limits_its_agents_and_moves_no_process_of_the_host(
        make_supervisor, tmp_path):
    launcher = tmp_path / "root-cgroup-supervisor"  # as an init without service cgroups would start it
    launcher.write_text(f'#!/bin/sh\necho $$ > {ROOT_CGROUP}/cgroup.procs && exec "{PY}" -m supervisor "$@"\n')
    launcher.chmod(0o755)
    proc_root = tmp_path / "proc-cgroup"
    proc_root.write_text("0::/\n")
    rooted = CgroupHost.detect(proc_cgroup=proc_root).group("rooted")
    sup = make_supervisor([limited("rooted", "show", memory_max="64M", tasks_max=20)])
    try:
        pid = sup.start(launcher=launcher).wait_agent("rooted", "running").pid
        d = ROOT_CGROUP / AGENTS_DIR / "rooted"
        assert rooted.dirs["memory"] == d and str(pid) in (d / "cgroup.procs").read_text().split()
        assert (d / "memory.max").read_text().strip() == str(64 << 20)
        assert (d / "pids.max").read_text().strip() == "20"
        assert Path("/proc/1/cgroup").read_text() == "0::/\n"  # init stayed where it was
        assert not (ROOT_CGROUP / "baton-supervisor").exists()
    finally:
        sup.terminate()
        rooted.remove()


def no_cgroups_launcher(tmp_path: Path) -> Path:
    """Runs ``supervisor`` in a mount namespace where /sys/fs/cgroup is an empty tmpfs: a host without cgroups."""
    launcher = tmp_path / "no-cgroups-supervisor"
    launcher.write_text("#!/bin/sh\nexec unshare --mount --propagation private sh -c "
                        "'mount -t tmpfs none /sys/fs/cgroup && exec \"$0\" -m supervisor \"$@\"' "
                        f"{PY} \"$@\"\n")
    launcher.chmod(0o755)
    return launcher


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare(1)")
@pytest.mark.e2e
def test_limit_without_its_controller_keeps_that_agent_stopped_naming_the_key_and_the_others_run(make_supervisor,
                                                                                               tmp_path):
    sup = make_supervisor([limited("capped", "show", memory_max="64M", start_retries=0),
                           limited("free", "show", open_files=99)])
    sup.start(launcher=no_cgroups_launcher(tmp_path))
    assert "NOFILE 99" in first_lines(sup, "free")  # needs no cgroup
    a = sup.wait_agent("capped", "fatal")
    assert a.pid == 0 and "cannot start: agents[0].memory_max: needs the cgroup 'memory' controller" in a.last_error
    assert not sup.log_of("capped").exists() or "CGROUP" not in sup.log_of("capped").read_text()
    assert sup.wait_agent("free", "running").pid


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare(1)")
@pytest.mark.e2e
def test_check_config_on_a_host_without_the_controller_refuses_the_limit_in_one_line(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(f'[node]\nid = "n1"\nstate_dir = "{tmp_path}/state"\ninstall_root = "{tmp_path}/install"\n'
                    f'[grpc]\nunix_socket = "{tmp_path}/s.sock"\n[[agents]]\nname = "a"\ncommand = "/bin/true"\n'
                    'open_files = 10\n[[agents]]\nname = "b"\ncommand = "/bin/true"\ntasks_max = 5\n')
    res = subprocess.run([str(no_cgroups_launcher(tmp_path)), "check-config", str(path)], capture_output=True,
                         text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("supervisor: config error: agents[1].tasks_max: needs the cgroup "
                                                   "'pids' controller"), res.stderr


@pytest.mark.parametrize(("line", "key", "problem"), [
    ('memory_max = "lots"', "agents[0].memory_max", "must be a size"),
    ('memory_max = "10K"', "agents[0].memory_max", "at least 1M"),
    ('cpu_quota = "half"', "agents[0].cpu_quota", "percentage of one CPU"),
    ("cpu_weight = 20000", "agents[0].cpu_weight", "1 to 10000"),
    ("tasks_max = -1", "agents[0].tasks_max", "0 (no limit) or more"),
    ("open_files = -5", "agents[0].open_files", "0 (the supervisor's limit) or more"),
])
@pytest.mark.e2e
def test_bad_limit_value_is_refused_at_check_config_in_one_line_naming_the_key(tmp_path, line, key, problem):
    path = tmp_path / "c.toml"
    path.write_text(f'[node]\nid = "n1"\nstate_dir = "{tmp_path}/state"\ninstall_root = "{tmp_path}/install"\n'
                    f'[grpc]\nunix_socket = "{tmp_path}/s.sock"\n[[agents]]\nname = "a"\ncommand = "/bin/true"\n'
                    f"{line}\n")
    res = subprocess.run([PY, "-m", "supervisor", "check-config", str(path)], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and key in lines[0] and problem in lines[0], res.stderr


def fake_v2_host(tmp_path: Path, controllers: str) -> CgroupHost:
    """A cgroup v2 tree as a host without v1 controllers has it, our cgroup offering ``controllers``."""
    own = tmp_path / "fs" / "system.slice" / "baton.service"
    own.mkdir(parents=True)
    (tmp_path / "fs" / "cgroup.controllers").write_text("memory pids cpu\n")
    (own / "cgroup.controllers").write_text(controllers + "\n")
    proc = tmp_path / "proc-cgroup"
    proc.write_text("0::/system.slice/baton.service\n")
    return CgroupHost.detect(tmp_path / "fs", proc)


def test_limit_without_its_controller_is_refused_at_check_config_naming_the_key(tmp_path):
    host = fake_v2_host(tmp_path, "cpu")
    raw = {"node": {"id": "n"}, "grpc": {"unix_socket": str(tmp_path / "s.sock")},
           "agents": [{"name": "a", "command": "/bin/true", "cpu_weight": 10},
                      {"name": "b", "command": "/bin/true", "memory_max": "64M"}]}
    with pytest.raises(ConfigError) as e:
        check_config(config_from_dict(raw, host_checks=False), host)
    assert e.value.key == "agents[1].memory_max" and "'memory' controller" in e.value.problem


def test_cgroup_v2_is_preferred_and_found_again_from_the_supervisor_leaf(tmp_path):
    host = fake_v2_host(tmp_path, "memory pids cpu")
    assert all(h.v2 for h in host.hierarchies.values())
    own = tmp_path / "fs" / "system.slice" / "baton.service"
    proc = tmp_path / "proc-cgroup"
    (own / "baton-supervisor").mkdir()
    proc.write_text("0::/system.slice/baton.service/baton-supervisor\n")
    again = CgroupHost.detect(tmp_path / "fs", proc)
    assert again.group("x").dirs["memory"] == own / AGENTS_DIR / "x"
    assert again.missing(Limits(memory_max_bytes=1 << 30, tasks_max=5)) == ()


def fake_v2_tree(tmp_path: Path, own: str) -> tuple[CgroupHost, Path]:
    """A cgroup v2 tree whose root enables memory, pids and cpu below it, our processes (pids 1, 2, 3) in
    ``own``: the root cgroup ("") has no ``cgroup.type``, every other cgroup has one."""
    fs = tmp_path / "fs"
    d = fs / own
    d.mkdir(parents=True)
    for cg in {fs, d}:
        (cg / "cgroup.controllers").write_text("memory pids cpu\n")
        (cg / "cgroup.subtree_control").write_text("")
        if cg != fs:
            (cg / "cgroup.type").write_text("domain\n")
    (d / "cgroup.procs").write_text("1\n2\n3\n")
    proc = tmp_path / "proc-cgroup"
    proc.write_text(f"0::/{own}\n")
    return CgroupHost.detect(fs, proc), d


def test_supervisor_in_a_delegated_cgroup_moves_its_processes_to_its_leaf_before_enabling_a_controller(tmp_path):
    host, own = fake_v2_tree(tmp_path, "system.slice/baton.service")
    cg = host.prepare("a", Limits(memory_max_bytes=64 << 20), "agents[0]")
    assert (own / SUPERVISOR_LEAF / "cgroup.procs").read_text() == "3"  # the last of 1, 2, 3 written there
    assert (own / "cgroup.subtree_control").read_text() == "+memory"
    assert (cg.dirs["memory"] / "memory.max").read_text() == str(64 << 20)


def test_supervisor_in_the_root_cgroup_enables_a_controller_without_moving_any_process(tmp_path):
    host, root = fake_v2_tree(tmp_path, "")
    cg = host.prepare("a", Limits(memory_max_bytes=64 << 20), "agents[0]")
    assert not (root / SUPERVISOR_LEAF).exists()
    assert (root / "cgroup.procs").read_text() == "1\n2\n3\n"
    assert (root / "cgroup.subtree_control").read_text() == "+memory"
    assert cg.dirs["memory"] == root / AGENTS_DIR / "a"
    assert (cg.dirs["memory"] / "memory.max").read_text() == str(64 << 20)
