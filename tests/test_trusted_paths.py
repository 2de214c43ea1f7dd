"""Files and directories root trusts cannot be swapped by another user (docs/security.md, round 3).

Each attack is made by a real process running as ``nobody``, in a directory under /tmp it can reach (the
tests' own directories are root's alone), against a real supervisor, CLI or helper; each test asserts the
refusal and that nothing changed.
"""

from __future__ import annotations

import contextlib
import grp
import os
import shutil
import stat
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from baton.config import config_from_dict
from baton.signing import format_public_key, generate_keypair
from baton.strict_modes import trusted_paths
from tests.conftest import (
    PY,
    ROOT,
    ProcessReaper,
    Release,
    SupervisorProc,
    UpdateHost,
    agent,
    dump_toml,
    install_version,
    supervisors_in,
    wait_for,
)
from tests.test_agent_update import rejected_at_push
from tests.test_strict_modes import config, one_line, supervisor

NOBODY = 65534
SYSTEM_PY = "/usr/bin/python3"  # the tests' interpreter lives under /root, which nobody cannot enter

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the attacker is another user: needs root")


@pytest.fixture
def shared() -> Iterator[Path]:
    """A root-owned 0755 directory in /tmp: the attacker can reach what a test puts in it."""
    d = Path(tempfile.mkdtemp(prefix="baton-trust-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def shared_supervisor(shared: Path, reaper: ProcessReaper) -> Iterator[Any]:
    """Make a supervisor whose files are in ``shared`` (so the attacker can reach the ones it is given)."""
    with supervisors_in(shared, reaper) as make_in:

        def make(agents: list[dict[str, Any]], **extra: dict[str, Any]) -> SupervisorProc:
            extra.setdefault("update", {})["file_url_root"] = str(shared)
            return make_in(agents, extra=extra)

        yield make


def as_nobody(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a Python snippet as the attacker."""
    return subprocess.run([SYSTEM_PY, "-c", code, *args], user=NOBODY, group=NOBODY, extra_groups=[],
                          capture_output=True, text=True, timeout=30, check=True, cwd="/")


def identity(path: Path) -> tuple[int, int, int, bytes]:
    st = os.lstat(path)
    return st.st_mode, st.st_uid, st.st_gid, path.read_bytes()


def root_only_file(tmp_path: Path) -> Path:
    secret = tmp_path / "root-only.txt"
    secret.write_text("root's own data\n")
    secret.chmod(0o600)
    return secret


def world_writable_dir(shared: Path, name: str = "sockets") -> Path:
    d = shared / name
    d.mkdir()
    d.chmod(0o777)
    return d


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "supervisor", *args], capture_output=True, text=True, cwd=ROOT, timeout=60)


# ---- the list --------------------------------------------------------------------------------------------


def test_the_trusted_list_names_every_file_and_directory_root_trusts(tmp_path):
    for name in ("c.pem", "k.pem", "ca.pem", "m-c.pem", "m-k.pem", "m-ca.pem", "a.pub", "b.pub"):
        (tmp_path / name).write_text("")
    t = str(tmp_path)
    cfg = config_from_dict({
        "node": {"id": "n1", "state_dir": "/s", "install_root": "/i"},
        "grpc": {"unix_socket": "/run/baton/s.sock", "listen": ["127.0.0.1:7443"], "tls_cert": f"{t}/c.pem",
                 "tls_key": f"{t}/k.pem", "tls_ca": f"{t}/ca.pem"},
        "manager": {"address": "127.0.0.1:1", "tls_ca": f"{t}/m-ca.pem", "tls_cert": f"{t}/m-c.pem",
                    "tls_key": f"{t}/m-k.pem"},
        "update": {"trusted_keys": [f"{t}/a.pub", f"{t}/b.pub"], "file_url_root": "/pkgs"},
        "agents": [{"name": "rootly", "command": "/bin/true"},
                   {"name": "nobodys", "command": "/bin/false", "user": "nobody"},
                   {"name": "packaged", "command": "bin/app", "packaged": True},
                   {"name": "secrets", "command": "/bin/false", "user": "nobody", "env_file": f"{t}/s.env"}],
    }, source=tmp_path / "supervisor.toml", host_checks=False)
    listed = {item.key: str(item.path) for item in trusted_paths(cfg)}
    assert listed == {
        "config file": f"{t}/supervisor.toml",
        "update.trusted_keys[0]": f"{t}/a.pub", "update.trusted_keys[1]": f"{t}/b.pub",
        "grpc.tls_cert": f"{t}/c.pem", "grpc.tls_key": f"{t}/k.pem", "grpc.tls_ca": f"{t}/ca.pem",
        "manager.tls_cert": f"{t}/m-c.pem", "manager.tls_key": f"{t}/m-k.pem", "manager.tls_ca": f"{t}/m-ca.pem",
        "agents[0].command": "/bin/true",  # runs as root; nobody's, and the packaged one under install_root, do not
        "agents[3].env_file": f"{t}/s.env",  # root reads it whoever the agent runs as
        "update.file_url_root": "/pkgs",
        "grpc.unix_socket": "/run/baton",
        "node.state_dir": "/s", "update.download_dir": "/s/downloads", "log.dir": "/s/logs", "node.install_root": "/i",
    }


# ---- item 1: the control socket's directory ---------------------------------------------------------------

RACER = """
import os, sys, time
target, link = sys.argv[1], sys.argv[2]
end = time.monotonic() + 60
while time.monotonic() < end:
    try:
        os.symlink(target, link)
    except FileExistsError:
        time.sleep(0.001)
"""


@pytest.mark.e2e
def test_symlink_raced_onto_the_socket_path_is_refused_and_changes_no_file(tmp_path, shared):
    secret = root_only_file(tmp_path)
    before = identity(secret)
    sockets = world_writable_dir(shared)
    sock_path = sockets / "supervisor.sock"
    racer = subprocess.Popen([SYSTEM_PY, "-c", RACER, str(secret), str(sock_path)], user=NOBODY, group=NOBODY,
                             extra_groups=[], cwd="/")
    try:
        wait_for(lambda: sock_path.is_symlink(), what="the attacker's link")
        cfg = config(tmp_path, grpc={"unix_socket": str(sock_path), "unix_socket_group": "nogroup"})
        for res in (supervisor("check-config", str(cfg)), supervisor("run", "--config", str(cfg))):
            assert res.returncode == 2, res.stderr
            line = one_line(res)
            assert "grpc.unix_socket" in line and "writable by group or others" in line and str(sockets) in line
    finally:
        racer.kill()
        racer.wait()
    assert identity(secret) == before, "root gave the file nobody's socket group and mode"
    assert [p.name for p in sockets.iterdir()] == ["supervisor.sock"] and sock_path.is_symlink()
    assert not (tmp_path / "state").exists(), "run created nothing"


IMPOSTOR = """
import os, socket, sys
path, met = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX)
s.bind(path)
s.listen(8)
print("listening", flush=True)
conn, _ = s.accept()
open(met, "w").write("root talked to me\\n")
"""


@contextlib.contextmanager
def impostor_in(shared: Path) -> Iterator[tuple[Path, Path]]:
    """(socket path, file it writes when asked): another user listening on a socket in a world-writable directory."""
    sockets = world_writable_dir(shared)
    sock_path, met = sockets / "supervisor.sock", sockets / "met"
    impostor = subprocess.Popen([SYSTEM_PY, "-c", IMPOSTOR, str(sock_path), str(met)], user=NOBODY, group=NOBODY,
                                extra_groups=[], cwd="/", stdout=subprocess.PIPE, text=True)
    try:
        assert impostor.stdout is not None and impostor.stdout.readline() == "listening\n"
        yield sock_path, met
    finally:
        impostor.kill()
        impostor.wait()


@pytest.mark.e2e
@pytest.mark.parametrize("command", [["status"], ["stop", "web"], ["reload"], ["updates"]])
def test_cli_as_root_refuses_a_socket_in_a_directory_others_may_change(shared, command):
    with impostor_in(shared) as (sock_path, met):
        res = cli(*command, "--socket", str(sock_path))
        assert res.returncode == 1, res
        line = one_line(res)
        assert f"refusing to talk to {sock_path}" in line and "--socket" in line and "writable" in line
        time.sleep(0.2)
        assert not met.exists(), "the impostor was answered"


@pytest.mark.e2e
def test_a_link_left_at_a_group_socket_path_is_replaced_not_followed(make_supervisor, tmp_path):
    secret = root_only_file(tmp_path)
    before = identity(secret)
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True)],
                          extra={"grpc": {"unix_socket_group": "nogroup"}})
    sup.socket.parent.mkdir(parents=True)
    sup.socket.symlink_to(secret)
    sup.start()
    st = os.lstat(sup.socket)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_gid == grp.getgrnam("nogroup").gr_gid
    assert identity(secret) == before
    assert [p.name for p in sup.socket.parent.iterdir()] == ["supervisor.sock"], "no private bind directory left"


# ---- item 2: files root trusts -----------------------------------------------------------------------------


@pytest.mark.e2e
def test_config_file_owned_by_another_user_is_refused_by_check_config_and_run(tmp_path):
    cfg = config(tmp_path)
    os.chown(cfg, NOBODY, NOBODY)
    for res in (supervisor("check-config", str(cfg)), supervisor("run", "--config", str(cfg))):
        assert res.returncode == 2
        line = one_line(res)
        assert line.startswith("supervisor: config error: config file:") and f"owned by uid {NOBODY}" in line
    assert not (tmp_path / "state").exists()


@pytest.mark.e2e
def test_reload_of_a_config_another_user_edited_is_refused_and_keeps_the_running_agents(shared_supervisor, shared):
    sup = shared_supervisor([agent("web", "ready_agent.py", notify=True)]).start()
    web = sup.wait_agent("web", "running")
    os.chown(sup.config_path, NOBODY, NOBODY)  # the file given away: its new owner edits it
    pwned = shared / "pwned"
    evil = {**sup.cfg, "agents": [*sup.cfg["agents"],
                                  {"name": "evil", "command": "/bin/sh", "args": ["-c", f"id > {pwned}"]}]}
    as_nobody("import sys; open(sys.argv[1], 'w').write(sys.argv[2])", str(sup.config_path), dump_toml(evil))
    res = cli("reload", "--socket", str(sup.socket))
    assert res.returncode == 1
    line = one_line(res)
    assert "config file" in line and f"owned by uid {NOBODY}" in line
    time.sleep(0.5)
    assert not pwned.exists(), "the attacker's command ran as root"
    after = sup.status().agents
    assert [(a.name, a.pid) for a in after] == [("web", web.pid)]


@pytest.mark.e2e
def test_trusted_key_another_user_replaced_never_installs_a_push_signed_with_its_key(shared_supervisor, shared):
    release = Release(shared / "release")
    sup = shared_supervisor(
        [{"name": "app", "packaged": True, "command": "bin/agent", "notify": True, "restart": "always"}],
        update={"trusted_keys": [str(release.public_key)], "health_timeout_s": 10.0, "health_window_s": 1.0,
                "free_space_reserve_bytes": 0})
    install_version(sup.base / "install", "app", "1.0.0", release.tree("1.0.0"))
    sup.start()
    sup.wait_agent("app", "running")
    host = UpdateHost(sup, release)
    attacker, attacker_public = generate_keypair()
    pkg = release.build("1.1.0")
    signed_by_attacker = release.sign(pkg.path, "app", "1.1.0", secret=attacker)
    os.chown(release.public_key, NOBODY, NOBODY)
    as_nobody("import sys; open(sys.argv[1], 'w').write(sys.argv[2])", str(release.public_key),
              format_public_key(attacker_public))
    # refused at push time (issue 25), before a helper is spawned; the helper's own check is the next test's
    rejected_at_push(host, signed_by_attacker.request(), grpc.StatusCode.FAILED_PRECONDITION,
                     f"update.trusted_keys[0]: {release.public_key} is owned by uid {NOBODY}")
    assert not host.layout.version_dir("1.1.0").exists()


@pytest.mark.e2e
@pytest.mark.parametrize("how", ["owned by nobody", "in a directory others may write"])
def test_trusted_key_another_user_could_replace_is_refused_by_check_config(tmp_path, shared, how):
    keys = world_writable_dir(shared, "keys") if how != "owned by nobody" else tmp_path
    release = Release(keys / "release")
    key = release.public_key
    if how == "owned by nobody":
        os.chown(key, NOBODY, NOBODY)
    res = supervisor("check-config", str(config(tmp_path, update={"trusted_keys": [str(key)]})))
    assert res.returncode == 2
    assert "update.trusted_keys[0]" in one_line(res)


@pytest.mark.e2e
@pytest.mark.parametrize("key", ["manager.tls_ca", "update.file_url_root"])
def test_other_trusted_files_owned_by_another_user_are_refused(tmp_path, key):
    path = tmp_path / "trusted"
    if key == "update.file_url_root":
        path.mkdir()
        sections: dict[str, dict[str, object]] = {"update": {"file_url_root": str(path)}}
    else:
        path.write_text("-----BEGIN CERTIFICATE-----\n")
        sections = {"manager": {"address": "127.0.0.1:1", "tls_ca": str(path)}}
    os.chown(path, NOBODY, NOBODY)
    res = supervisor("check-config", str(config(tmp_path, **sections)))
    assert res.returncode == 2
    assert one_line(res).startswith(f"supervisor: config error: {key}:") and f"owned by uid {NOBODY}" in one_line(res)


def config_with_agent(base: Path, body: dict[str, object]) -> Path:
    path = config(base)
    path.write_text(dump_toml({**tomllib.loads(path.read_text()), "agents": [body]}))
    return path


def command_script(shared: Path, mode: int) -> Path:
    bin_dir = shared / "bin"
    bin_dir.mkdir()
    cmd = bin_dir / "agent"
    cmd.write_text("#!/bin/sh\nexec sleep 60\n")
    cmd.chmod(mode)
    return cmd


@pytest.mark.e2e
def test_agent_command_others_may_write_is_refused_when_the_agent_runs_as_root(tmp_path, shared):
    cmd = command_script(shared, 0o777)
    pwned = shared / "pwned"
    as_nobody("import sys; open(sys.argv[1], 'w').write(sys.argv[2])", str(cmd), f"#!/bin/sh\nid > {pwned}\n")
    cfg = config_with_agent(tmp_path, {"name": "web", "command": str(cmd)})
    res = supervisor("check-config", str(cfg))  # `run` starts without it (issue 25): test_degrade
    assert res.returncode == 2
    line = one_line(res)
    assert "agents[0].command" in line and "writable by group or others" in line
    assert not pwned.exists()


@pytest.mark.e2e
@pytest.mark.parametrize("how", ["group-writable by root's group", "run as nobody"])
def test_agent_command_is_accepted_when_only_root_or_its_own_user_can_change_what_runs(tmp_path, shared, how):
    cmd = command_script(shared, 0o775 if how.startswith("group") else 0o777)
    body: dict[str, object] = {"name": "web", "command": str(cmd)}
    if how == "run as nobody":
        body["user"] = "nobody"
    res = supervisor("check-config", str(config_with_agent(tmp_path, body)))
    assert res.returncode == 0, res.stderr


@pytest.mark.e2e
def test_helper_verify_with_the_config_refuses_a_key_another_user_owns_as_an_update_would(tmp_path, release):
    from tests.test_helper_cli import helper, sig_file

    pkg = release.build("1.1.0")
    cfg = config(tmp_path, update={"trusted_keys": [str(release.public_key)]})
    os.chown(release.public_key, NOBODY, NOBODY)
    res = helper("verify", str(pkg.path), "--signature", sig_file(pkg), "--component", "app", "--version", "1.1.0",
                 "--config", str(cfg))
    assert res.returncode == 1
    line = one_line(res)
    assert "REFUSED" in line and f"owned by uid {NOBODY}" in line and "update.trusted_keys[0]" in line


@pytest.mark.e2e
def test_doctor_reports_a_socket_in_a_directory_others_may_change_and_does_not_ask_it(tmp_path, shared):
    from tests.test_doctor import doctor, worst

    with impostor_in(shared) as (sock_path, met):
        code, checks = doctor(config(tmp_path, grpc={"unix_socket": str(sock_path)}))
        assert code == 2
        assert worst(checks, "trusted-paths")["message"].startswith("grpc.unix_socket:")
        assert f"refusing to talk to {sock_path}" in worst(checks, "supervisor")["message"]
        time.sleep(0.2)
        assert not met.exists(), "the impostor was asked"
