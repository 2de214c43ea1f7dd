"""``env_file`` per agent (issue 25): KEY=VALUE lines over its ``env``, read by root at every start, never logged."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import PY, ROOT, agent, supervisors_in, wait_for

pytestmark = pytest.mark.e2e  # every test here starts a process

NOBODY = 65534
SECRET = "hunter2-never-in-a-log"


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(x.decode().split("=", 1) for x in raw if b"=" in x)


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "supervisor", "check-config", str(path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


def minimal_config(tmp_path: Path, env_file: Path) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(f'[node]\nid = "n1"\nstate_dir = "{tmp_path}/state"\ninstall_root = "{tmp_path}/install"\n'
                    f'[grpc]\nunix_socket = "{tmp_path}/s.sock"\n[[agents]]\nname = "a"\ncommand = "/bin/true"\n'
                    f'env_file = "{env_file}"\n')
    return path


@pytest.fixture
def shared() -> Iterator[Path]:
    """A root-owned 0755 directory in /tmp: the attacker can reach what a test puts in it."""
    d = Path(tempfile.mkdtemp(prefix="baton-envfile-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_env_file_values_reach_the_agent_over_its_env_table(make_supervisor, tmp_path):
    env_file = tmp_path / "web.env"
    env_file.write_text(f'# the database\nDB_PASSWORD={SECRET}\n\nGREETING="two words"\nOVERRIDDEN=from-file\n')
    env_file.chmod(0o600)
    sup = make_supervisor([agent("web", "ready_agent.py", env={"OVERRIDDEN": "from-env", "KEPT": "yes"},
                                 env_file=str(env_file))]).start()
    env = environ_of(sup.wait_agent("web", "running").pid)
    assert env["DB_PASSWORD"] == SECRET and env["GREETING"] == "two words"
    assert env["OVERRIDDEN"] == "from-file" and env["KEPT"] == "yes"
    assert SECRET not in sup.stdout_path.read_text()


def test_env_file_with_a_bad_line_is_refused_at_check_config_naming_the_line_never_its_text(tmp_path):
    env_file = tmp_path / "bad.env"
    env_file.write_text(f"GOOD=1\nthis line holds {SECRET}\n")
    res = check_config(minimal_config(tmp_path, env_file))
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "agents[0].env_file" in lines[0] and "line 2: not KEY=VALUE" in lines[0], res.stderr
    assert SECRET not in res.stderr


def test_env_file_writable_by_others_is_refused_at_check_config(tmp_path, shared):
    env_file = shared / "open.env"
    env_file.write_text("A=1\n")
    env_file.chmod(0o666)
    res = check_config(minimal_config(tmp_path, env_file))
    assert res.returncode == 2
    assert "agents[0].env_file" in res.stderr and "writable" in res.stderr, res.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="the attacker is another user: needs root")
def test_env_file_made_writable_and_filled_by_another_user_is_refused_at_the_next_start(shared, reaper):
    env_file = shared / "agent.env"
    env_file.write_text(f"TOKEN={SECRET}\n")
    env_file.chmod(0o644)
    with supervisors_in(shared, reaper) as make:
        sup = make([agent("web", "ready_agent.py", env_file=str(env_file), backoff_initial_s=30.0)],
                   extra={"update": {"file_url_root": str(shared)}}).start()
        first = sup.wait_agent("web", "running").pid
        env_file.chmod(0o666)  # an operator's mistake, which the attacker finds
        subprocess.run(["/bin/sh", "-c", f"echo LD_PRELOAD={shared}/evil.so >> {env_file}"], user=NOBODY,
                       group=NOBODY, extra_groups=[], check=True, timeout=30, cwd="/")
        res = subprocess.run([PY, "-m", "supervisor", "restart", "web", "--socket", str(sup.socket)],
                             capture_output=True, text=True, cwd=ROOT, timeout=90)
        assert res.returncode != 0
        a = sup.wait_agent("web", "backoff", pred=lambda a: "env_file" in a.last_error)
        assert a.pid == 0 and "agents[0].env_file" in a.last_error and "writable" in a.last_error
        assert not os.path.exists(f"/proc/{first}")
        wait_for(lambda: "cannot start: agents[0].env_file" in sup.stdout_path.read_text(), what="the refusal")
        assert SECRET not in sup.stdout_path.read_text()
