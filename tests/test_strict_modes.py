"""Directories root writes to, and the log files in them, cannot be steered by another user (sshd's StrictModes).

A state, download, log or install directory (or a parent) that someone else owns or may write to is refused
by ``check-config`` and by ``run`` in one line naming the key; Baton never changes the mode of a directory it
did not create; log files are opened without following links and only if root alone owns them.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from baton.strict_modes import UnsafePath, check_dir, open_log
from tests.conftest import PY, ROOT, agent, dump_toml

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


def config(base: Path, **sections: dict[str, object]) -> Path:
    cfg: dict[str, dict[str, object]] = {
        "node": {"id": "n1", "state_dir": str(base / "state"), "install_root": str(base / "install")},
        "grpc": {"unix_socket": str(base / "s.sock")},
    }
    for name, body in sections.items():
        cfg.setdefault(name, {}).update(body)
    path = base / "supervisor.toml"
    path.write_text(dump_toml(cfg))
    return path


def supervisor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "supervisor", *args], capture_output=True, text=True, cwd=ROOT, timeout=60)


def one_line(res: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    return lines[0]


@pytest.mark.e2e
@needs_root
def test_state_dir_owned_by_nobody_is_refused_by_check_config_and_by_run(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, NOBODY, NOBODY)
    cfg = config(tmp_path)
    for res in (supervisor("check-config", str(cfg)), supervisor("run", "--config", str(cfg))):
        assert res.returncode == 2
        line = one_line(res)
        assert "node.state_dir" in line and f"owned by uid {NOBODY}" in line
    assert list(state.iterdir()) == [], "run created nothing in it"


@pytest.mark.e2e
@needs_root
@pytest.mark.parametrize("mode", [0o777, 0o770, 0o1777])
def test_world_or_group_writable_state_dir_is_refused(tmp_path, mode):
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, -1, NOBODY)  # group-writable is refused for any group but root's (gid 0)
    state.chmod(mode)
    res = supervisor("check-config", str(config(tmp_path)))
    assert res.returncode == 2
    assert "node.state_dir" in one_line(res) and "writable by group or others" in one_line(res)


@pytest.mark.e2e
@needs_root
def test_download_dir_owned_by_nobody_is_refused(tmp_path):
    downloads = tmp_path / "downloads"
    downloads.mkdir(mode=0o700)
    os.chown(downloads, NOBODY, NOBODY)
    res = supervisor("check-config", str(config(tmp_path, update={"download_dir": str(downloads)})))
    assert res.returncode == 2
    assert "update.download_dir" in one_line(res)


@pytest.mark.e2e
@needs_root
def test_group_writable_parent_of_install_root_is_refused(tmp_path):
    parent = tmp_path / "opt"
    parent.mkdir()
    os.chown(parent, -1, NOBODY)
    parent.chmod(0o775)
    res = supervisor("check-config", str(config(tmp_path, node={"install_root": str(parent / "baton")})))
    assert res.returncode == 2
    assert "node.install_root" in one_line(res) and str(parent) in one_line(res)


def test_a_sticky_root_owned_parent_like_tmp_is_accepted(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    check_dir(shared / "state")  # a directory Baton will create inside /tmp-like space: fine
    with pytest.raises(UnsafePath):
        check_dir(shared)  # but not as the directory itself


@pytest.mark.e2e
@needs_root
def test_a_symbolic_link_owned_by_another_user_on_the_way_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "state"
    link.symlink_to(real)
    os.lchown(link, NOBODY, NOBODY)
    res = supervisor("check-config", str(config(tmp_path)))
    assert res.returncode == 2
    assert "node.state_dir" in one_line(res) and "symbolic link" in one_line(res)


@pytest.mark.e2e
def test_a_sticky_world_writable_log_dir_is_refused_and_keeps_its_mode(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    logs.chmod(0o1777)
    res = supervisor("run", "--config", str(config(tmp_path, log={"dir": str(logs)})))
    assert res.returncode == 2
    assert "log.dir" in one_line(res)
    assert logs.stat().st_mode & 0o7777 == 0o1777


@pytest.mark.e2e
def test_an_existing_log_dir_keeps_its_mode_and_created_dirs_get_ours(make_supervisor, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    logs.chmod(0o755)
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True)], extra={"log": {"dir": str(logs)}})
    sup.start()
    sup.wait_agent("web", "running")
    assert logs.stat().st_mode & 0o7777 == 0o755, "Baton did not create it, so it does not chmod it"
    assert sup.state_dir.stat().st_mode & 0o777 == 0o700
    assert (sup.state_dir / "downloads").stat().st_mode & 0o777 == 0o700


def secret_file(tmp_path: Path) -> Path:
    target = tmp_path / "root-only.txt"
    target.write_text("root's own data\n")
    target.chmod(0o600)
    return target


@pytest.mark.e2e
@pytest.mark.parametrize("log_name", ["web.log", "supervisor.log"])
def test_a_symlink_planted_in_the_log_dir_is_not_followed(make_supervisor, tmp_path, log_name):
    target = secret_file(tmp_path)
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o750)
    (logs / log_name).symlink_to(target)
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True)], extra={"log": {"dir": str(logs)}})
    sup.start(wait=False)
    assert sup.proc is not None
    assert sup.proc.wait(30) == 1
    assert "symbolic link" in sup.output() and log_name in sup.output()
    assert target.read_text() == "root's own data\n"
    assert (logs / log_name).is_symlink()


@needs_root
def test_a_log_file_owned_by_another_user_or_hard_linked_is_refused(tmp_path):
    theirs = tmp_path / "theirs.log"
    theirs.write_text("")
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(UnsafePath, match=f"owned by uid {NOBODY}"):
        open_log(theirs)
    target = secret_file(tmp_path)
    linked = tmp_path / "linked.log"
    os.link(target, linked)
    with pytest.raises(UnsafePath, match="hard links"):
        open_log(linked)
    assert target.read_text() == "root's own data\n"
