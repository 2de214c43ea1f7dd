"""Round 3 hardening of agents' notify sockets: only the agent's own process is heard (SCM_CREDENTIALS).

Every attack is made by a real process of the agent's user against a real supervisor, and the tests check that
the agent's state, its record in the agent table and the update's outcome are what they would be without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from baton.pb import daemon_pb2
from tests.conftest import SYSTEM_PYTHON, Release, SupervisorProc, agent, install_version, supervisors_in, wait_for

pytestmark = pytest.mark.e2e  # every test here starts a process

# Sends its argument on $NOTIFY_SOCKET COUNT times, prints its pid: the attacker, run as the agent's user.
SENDER = r"""
import os, socket, sys, time
count, gap = int(sys.argv[2]), float(sys.argv[3])
print(os.getpid(), flush=True)
for _ in range(count):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(os.environ["NOTIFY_SOCKET"])
        s.sendall(sys.argv[1].encode())
    time.sleep(gap)
"""


def notify_socket_of(pid: int) -> str:
    """The NOTIFY_SOCKET a running agent was given."""
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next(v.split(b"=", 1)[1].decode() for v in env if v.startswith(b"NOTIFY_SOCKET="))


def send(path: str, message: str, count: int = 1, gap_s: float = 0.0, user: str | None = "nobody"
         ) -> subprocess.Popen[str]:
    """Another process (of ``user``, with its groups, as a login would have it) sending ``message`` on ``path``."""
    import pwd

    ids: dict[str, Any] = {}
    if user is not None:
        pw = pwd.getpwnam(user)
        ids = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": os.getgrouplist(user, pw.pw_gid)}
    return subprocess.Popen([SYSTEM_PYTHON, "-c", SENDER, message, str(count), str(gap_s)], **ids,
                            env={"NOTIFY_SOCKET": path}, stdout=subprocess.PIPE, text=True, cwd="/")


def sent(proc: subprocess.Popen[str]) -> int:
    """The sender's pid, once it has sent everything (it fails if the socket could not be reached)."""
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, "the sender could not reach the socket"
    return int(out.split()[0])


def tree_for_nobody(release: Release, version: str, behaviour: str = "good") -> Path:
    """The sample packaged agent, started by the system interpreter (the test's may be unreadable to nobody)."""
    from tests.conftest import PY

    tree = release.tree(version, behaviour)
    launcher = tree / "bin" / "agent"
    launcher.write_text(launcher.read_text().replace(PY, SYSTEM_PYTHON))
    return tree


def table_record(sup: SupervisorProc, name: str) -> dict[str, Any]:
    data = json.loads((sup.state_dir / "agents.json").read_text())
    return next(a for a in data["agents"] if a["name"] == name)


def refusals(sup: SupervisorProc, pid: int) -> int:
    """Lines in the supervisor's log saying it ignored ``pid`` (after a self-update, in its log file)."""
    logs = [sup.stdout_path, sup.state_dir / "logs" / "supervisor.log"]
    return max(p.read_text(errors="replace").count(f"ignored notify messages from pid {pid} ") for p in logs
               if p.exists())


@pytest.fixture
def nobody_sup(traversable_base: Path, reaper: Any) -> Any:
    """Supervisors in a directory nobody can traverse to (its agents run as nobody)."""
    with supervisors_in(traversable_base, reaper) as make:
        yield make


def test_ready_from_another_process_of_the_agents_user_leaves_it_starting(nobody_sup):
    sup = nobody_sup([{"name": "low", "command": "/bin/sleep", "args": ["600"], "user": "nobody",
                       "notify": True}]).start()
    a = sup.wait_agent("low", "starting")
    attacker = sent(send(notify_socket_of(a.pid), "READY=1\nSTATUS=forged", count=3))
    wait_for(lambda: refusals(sup, attacker), what="the refusal in the supervisor's log")
    time.sleep(1.0)
    now = sup.agent("low")
    assert now.state == a.state and now.pid == a.pid
    assert table_record(sup, "low")["state"] == "starting"
    assert refusals(sup, attacker) == 1  # three datagrams, one line


@pytest.mark.parametrize(("access", "state"), [("main", "starting"), ("group", "running")])
def test_ready_from_a_child_of_the_agent_counts_only_with_notify_access_group(make_supervisor, access, state):
    # The shell is the agent's main process; the interpreter it starts sends READY=1 from the same process group,
    # and stays a while: a sender already gone when the supervisor reads its datagram has no group to check (on a
    # loaded machine the supervisor may come to it seconds later).
    script = f"{SYSTEM_PYTHON} -c '{SENDER}' READY=1 1 30 && exec sleep 600"
    sup = make_supervisor([{"name": "sh", "command": "/bin/sh", "args": ["-c", script], "notify": True,
                            "notify_access": access}]).start()
    a = sup.wait_agent("sh", state)
    if state == "starting":
        wait_for(lambda: "ignored notify messages from pid" in sup.stdout_path.read_text(), what="the refusal")
        time.sleep(0.5)
        assert sup.agent("sh").state == a.state
    assert table_record(sup, "sh")["state"] == state


def test_update_to_a_version_that_never_becomes_ready_rolls_back_despite_forged_ready(nobody_sup, traversable_base):
    from baton.layout import ComponentLayout
    from tests.test_agent_update import ROLLED_BACK

    release = Release(traversable_base / "release")
    sup = nobody_sup([{"name": "app", "packaged": True, "command": "bin/agent", "notify": True, "user": "nobody",
                       "restart": "always", "backoff_initial_s": 0.2, "stop_timeout_s": 5.0}],
                     extra={"update": {"trusted_keys": [str(release.public_key)], "health_timeout_s": 3.0,
                                       "health_window_s": 0.5, "free_space_reserve_bytes": 0,
                                       "file_url_root": str(traversable_base)}})
    install_version(sup.base / "install", "app", "1.0.0", tree_for_nobody(release, "1.0.0"))
    sup.start()
    before = sup.wait_agent("app", "running")
    path = notify_socket_of(before.pid)
    pkg = release.build("1.1.0", tree=tree_for_nobody(release, "1.1.0", "never_ready"))
    forger = send(path, "READY=1", count=400, gap_s=0.02)  # READY every 20 ms, for the whole health check
    update_id = sup.stub.PushUpdate(pkg.request(), timeout=10).update_id

    st = wait_for(lambda: (s := sup.stub.GetUpdate(daemon_pb2.UpdateRef(update_id=update_id), timeout=5)).finished
                  and s, timeout=90, what="the update to finish")
    forger_pid = sent(forger)
    assert st.state == ROLLED_BACK and st.rolled_back and not st.success, st.error
    assert ComponentLayout(sup.base / "install", "app").current_version() == "1.0.0"
    assert sup.wait_agent("app", "running").version == "1.0.0"
    assert refusals(sup, forger_pid) >= 1


def test_the_agents_own_ready_is_still_heard(make_supervisor):
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True)]).start()
    a = sup.wait_agent("web", "running")
    assert table_record(sup, "web")["state"] == "running"
    assert "ignored notify messages" not in sup.output() and a.pid


# ---- the environment of an agent run as another user --------------------------------------------------------------

# Prints whether it can read its parent's (the supervisor's) environment, then sleeps.
PEEK = r"""
import os, time
try:
    open(f"/proc/{os.getppid()}/environ", "rb").read()
    print("parent environ readable", flush=True)
except OSError as e:
    print("parent environ", type(e).__name__, flush=True)
time.sleep(600)
"""


def environ_of(pid: int) -> dict[str, str]:
    """What the kernel holds as a process's environment (what it was started with)."""
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(v.decode().split("=", 1) for v in raw if v)


def test_agent_run_as_nobody_gets_only_its_env_and_a_login_set_not_the_supervisors(nobody_sup):
    import pwd

    nobody = pwd.getpwnam("nobody")
    sup = nobody_sup([{"name": "low", "command": SYSTEM_PYTHON, "args": ["-u", "-c", PEEK], "user": "nobody",
                       "env": {"GREETING": "hi"}}])
    sup.start(env={"BATON_TEST_SECRET": "s3cret", "LANG": "C.UTF-8"})
    a = sup.wait_agent("low", "running")
    assert environ_of(a.pid) == {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": nobody.pw_dir,
        "USER": "nobody", "LOGNAME": "nobody", "SHELL": nobody.pw_shell, "LANG": "C.UTF-8", "GREETING": "hi",
        "BATON_AGENT_NAME": "low", "BATON_AGENT_VERSION": ""}
    text = wait_for(lambda: (t := sup.log_of("low").read_text()) and "parent environ" in t and t,
                    what="the agent's output")
    assert "parent environ PermissionError" in text


def test_an_agents_env_overrides_the_login_set(nobody_sup):
    sup = nobody_sup([{"name": "low", "command": "/bin/sleep", "args": ["600"], "user": "nobody",
                       "env": {"PATH": "/opt/tools/bin", "HOME": "/var/empty"}}]).start()
    env = environ_of(sup.wait_agent("low", "running").pid)
    assert (env["PATH"], env["HOME"], env["USER"]) == ("/opt/tools/bin", "/var/empty", "nobody")


def test_a_root_agent_keeps_the_supervisors_environment_as_before(make_supervisor):
    sup = make_supervisor([{"name": "web", "command": "/bin/sleep", "args": ["600"], "env": {"GREETING": "hi"}}])
    sup.start(env={"BATON_TEST_SECRET": "s3cret", "NOTIFY_SOCKET": str(sup.base / "no-systemd.sock")})
    env = environ_of(sup.wait_agent("web", "running").pid)
    assert env["BATON_TEST_SECRET"] == "s3cret" and env["GREETING"] == "hi"
    assert "NOTIFY_SOCKET" not in env  # systemd's, meant for the supervisor


# ---- where the notify socket lives -------------------------------------------------------------------------------

# Sends READY=1 on $NOTIFY_SOCKET once, then sleeps: a notify agent run as nobody.
READY_THEN_SLEEP = r"""
import os, socket, time
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
    s.connect(os.environ["NOTIFY_SOCKET"])
    s.sendall(b"READY=1")
time.sleep(600)
"""


def mode_owner(path: Path) -> tuple[int, int, int]:
    st = path.lstat()
    return st.st_mode & 0o7777, st.st_uid, st.st_gid


def test_state_dir_stays_0700_while_an_agent_run_as_nobody_notifies(nobody_sup):
    import pwd

    nobody = pwd.getpwnam("nobody")
    sup = nobody_sup([{"name": "low", "command": SYSTEM_PYTHON, "args": ["-u", "-c", READY_THEN_SLEEP],
                       "user": "nobody", "notify": True}]).start()
    a = sup.wait_agent("low", "running")  # its READY=1 reached us
    notify_dir = sup.base / "install" / ".notify"
    assert notify_socket_of(a.pid) == str(notify_dir / "low" / "notify.sock")
    for d in (sup.state_dir, sup.state_dir / "agents", sup.state_dir / "agents" / "low"):
        assert mode_owner(d) == (0o700, 0, 0), d
    assert mode_owner(notify_dir) == (0o711, 0, 0)
    assert mode_owner(notify_dir / "low") == (0o710, 0, nobody.pw_gid)
    assert mode_owner(notify_dir / "low" / "notify.sock")[:2] == (0o600, nobody.pw_uid)


def test_another_user_cannot_reach_an_agents_notify_socket(nobody_sup):
    import pwd

    other = next(u for u in ("daemon", "bin", "sys") if _exists(u))
    sup = nobody_sup([{"name": "low", "command": "/bin/sleep", "args": ["600"], "user": "nobody",
                       "notify": True}]).start()
    a = sup.wait_agent("low", "starting")
    proc = send(notify_socket_of(a.pid), "READY=1", user=other)
    proc.communicate(timeout=60)
    assert proc.returncode != 0 and pwd.getpwnam(other).pw_gid != pwd.getpwnam("nobody").pw_gid
    time.sleep(0.5)
    assert sup.agent("low").state == a.state and table_record(sup, "low")["state"] == "starting"


def _exists(user: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(user)
        return True
    except KeyError:
        return False


def test_agent_started_by_an_earlier_version_keeps_notifying_at_its_old_path(make_supervisor, tmp_path):
    """An agent an earlier version started (its NOTIFY_SOCKET in the state directory) and left running when that
    supervisor died is adopted; its READY still arrives; restarted, it is given the new path."""
    import socket as socketlib

    from baton.agent_table import AgentRecord, AgentTable
    from supervisor.adoption import process_start_time
    from tests.conftest import AGENTS, PY

    go = tmp_path / "go"
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True, env={"READY_WHEN_FILE": str(go)})])
    adir = sup.state_dir / "agents" / "web"
    adir.mkdir(parents=True, mode=0o700)
    sup.state_dir.chmod(0o700)
    legacy = adir / "notify.sock"
    with socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_DGRAM) as s:  # what the dead supervisor left
        s.bind(str(legacy))
    os.mkfifo(adir / "output.fifo", 0o600)
    out = os.open(adir / "output.fifo", os.O_RDWR)
    old = subprocess.Popen([PY, "-u", str(AGENTS / "ready_agent.py")], start_new_session=True,
                           env={"NOTIFY_SOCKET": str(legacy), "READY_WHEN_FILE": str(go)},
                           stdout=out, stderr=subprocess.STDOUT)
    os.close(out)
    sup.reaper.track(old.pid)
    start = wait_for(lambda: process_start_time(old.pid), what="the old agent's start time")
    AgentTable(sup.state_dir / "agents.json").save([AgentRecord(
        name="web", pid=old.pid, start_time=start, version="", restarts=0, consecutive_failures=0,
        state="starting", stop_signal="TERM", stop_timeout_s=10.0)])
    sup.start()
    a = sup.wait_agent("web", "starting")
    assert a.pid == old.pid
    go.touch()
    sup.wait_agent("web", "running")
    go.unlink()
    sup.stub.RestartAgent(daemon_pb2.AgentRef(name="web"), timeout=30)
    new = sup.wait_agent("web", "starting", pred=lambda x: x.pid != old.pid)
    assert notify_socket_of(new.pid) == str(sup.base / "install" / ".notify" / "web" / "notify.sock")
    assert not legacy.exists()
    go.touch()
    sup.wait_agent("web", "running", pred=lambda x: x.pid == new.pid)
    assert mode_owner(sup.state_dir)[0] == 0o700


def test_a_ready_forged_after_a_self_update_is_refused_on_the_handed_over_socket(make_self_host, tmp_path):
    go = tmp_path / "go"
    go.touch()
    host = make_self_host(agents=[agent("web", "ready_agent.py", notify=True, env={"READY_WHEN_FILE": str(go)})])
    assert host.wait_final(host.push(host.supervisor_package("1.1.0")), timeout=90).success
    kept = host.sup.wait_agent("web", "running")
    go.unlink()
    host.sup.stub.RestartAgent(daemon_pb2.AgentRef(name="web"), timeout=30)
    a = host.sup.wait_agent("web", "starting", pred=lambda x: x.pid != kept.pid)
    forger = sent(send(notify_socket_of(a.pid), "READY=1", count=3, user=None))  # root, but not the agent
    wait_for(lambda: refusals(host.sup, forger), what="the refusal")
    time.sleep(0.5)
    assert host.sup.agent("web").state == a.state
    go.touch()
    host.sup.wait_agent("web", "running", pred=lambda x: x.pid == a.pid)
