"""Self-contained supervisor releases (docs/releases.md): build, install, self-update, rollback.

Every test here runs real releases: built by ``baton-package release`` from this
checkout and the lock file, unpacked, installed with ``install-self`` and run by
the system ``python3`` with an empty environment. Building takes seconds per
release, so one session fixture builds them all once (``slow``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from baton.pb import common_pb2
from tests.conftest import (
    ROOT,
    SELF_AGENTS,
    Package,
    ProcessReaper,
    Release,
    SupervisorProc,
    free_port,
    stop_everything_of,
    wait_for,
)
from tests.release_fixtures import ALT_DEP, LOCK, Releases, envi, install_self, package_cli, unpack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- building ------------------------------------------------------------------------------------------


def test_two_builds_of_the_same_commit_and_lock_are_byte_identical(releases: Releases, tmp_path: Path) -> None:
    """Built as the README writes it, `-o dist/`: a missing directory named with a slash is created."""
    r = package_cli("release", "--version", "1.0.0", "-o", f"{tmp_path / 'dist'}/")
    assert r.returncode == 0, r.stderr
    again = tmp_path / "dist" / releases.v100.name
    assert _sha256(again) == _sha256(releases.v100)


def test_a_release_never_overwrites_an_existing_tarball_without_force(releases: Releases, tmp_path: Path) -> None:
    existing = tmp_path / releases.v100.name
    existing.write_bytes(b"kept")
    r = package_cli("release", "--version", "1.0.0", "-o", tmp_path)
    assert r.returncode == 1 and f"{existing} already exists; use --force to overwrite it" in r.stderr
    assert existing.read_bytes() == b"kept"


def test_a_launcher_interpreter_of_another_python_minor_version_is_refused_before_building(tmp_path: Path) -> None:
    fake = tmp_path / "python3.12"
    fake.write_text("#!/bin/sh\necho cpython 3 12 linux-x86_64\n")  # answers the probe as a 3.12 would
    fake.chmod(0o755)
    r = package_cli("release", "--version", "1.0.0", "-o", tmp_path / "out.tar.gz", "--python", fake)
    assert r.returncode == 1
    assert f"the launchers' interpreter {fake} is cp312-linux_x86_64" in r.stderr
    assert not (tmp_path / "out.tar.gz").exists()


def test_a_missing_lock_file_is_refused_with_its_path(tmp_path: Path) -> None:
    r = package_cli("release", "--version", "1.0.0", "-o", tmp_path, "--lock", tmp_path / "nope.lock")
    assert r.returncode == 1 and f"lock file {tmp_path / 'nope.lock'} not found" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_release_members_have_fixed_owner_and_mtime_and_no_bytecode(releases: Releases) -> None:
    with tarfile.open(releases.v100) as tar:
        members = tar.getmembers()
    assert {(m.uid, m.gid, m.uname, m.gname, m.mtime) for m in members} == {(0, 0, "", "", 0)}
    names = [m.name for m in members]
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert {"baton-1.0.0/bin/supervisor", "baton-1.0.0/bin/helper", "baton-1.0.0/bin/baton-package",
            "baton-1.0.0/RELEASE.json", "baton-1.0.0/lib/grpc/__init__.py"} <= set(names)


def test_release_manifest_records_python_abi_platform_and_locked_dependencies(releases: Releases,
                                                                              tmp_path: Path) -> None:
    from baton.release import read_manifest, running_target

    root = unpack(releases.v100, tmp_path)
    manifest = read_manifest(root)
    assert manifest is not None
    assert manifest.target == running_target()
    assert manifest.target.python_tag == "cp311" and manifest.target.platform == "linux_x86_64"
    locked = dict(re.findall(r"^([a-z0-9-]+)==(\S+) ", LOCK.read_text(), flags=re.M))
    assert dict(manifest.dependencies) == locked


def test_release_launchers_run_from_any_directory_with_an_empty_environment(releases: Releases,
                                                                            tmp_path: Path) -> None:
    root = unpack(releases.v100, tmp_path)
    assert envi(root / "bin" / "supervisor", "--version").stdout.strip() == "baton supervisor 1.0.0"
    assert "usage: helper" in envi(root / "bin" / "helper", "--help").stdout
    assert "release" in envi(root / "bin" / "baton-package", "--help").stdout


# ---- installing ----------------------------------------------------------------------------------------


@pytest.fixture
def host(make_supervisor: Callable[..., SupervisorProc], release: Release) -> SupervisorProc:
    """A host with a config and nothing installed yet."""
    sup = make_supervisor(list(SELF_AGENTS), tcp=False, extra={"update": {
        "trusted_keys": [str(release.public_key)], "handshake_timeout_s": 30.0, "free_space_reserve_bytes": 0,
        "max_backups": 3}})
    sup.write_config()
    return sup


def _install(host: SupervisorProc, tarball: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    root = unpack(tarball, host.base / "unpacked" / tarball.name)
    return install_self(root, host.config_path, host.base, *extra)


def _launcher(host: SupervisorProc) -> Path:
    return host.base / "install" / "supervisor" / "current" / "bin" / "supervisor"


def _start_installed(host: SupervisorProc) -> SupervisorProc:
    host.start(launcher=_launcher(host))
    for a in ("web", "worker", "chatty"):
        host.wait_agent(a, "running")
    return host


def test_install_self_from_a_release_lays_out_the_version_and_writes_the_unit(host: SupervisorProc,
                                                                              releases: Releases) -> None:
    r = _install(host, releases.v100)
    assert r.returncode == 0, r.stderr
    sup_root = host.base / "install" / "supervisor"
    assert os.readlink(sup_root / "current") == "versions/1.0.0"
    assert (sup_root / "versions" / "1.0.0" / "lib" / "grpc").is_dir()
    unit = (host.base / "units" / "baton-supervisor.service").read_text()
    assert f"ExecStart={sup_root}/current/bin/supervisor run --config {host.config_path}\n" in unit
    assert "BATON_PYTHON" not in unit and "Documentation=" not in unit and "@" not in unit


def test_installed_release_serves_and_reports_its_bundled_dependency_versions(host: SupervisorProc,
                                                                              releases: Releases) -> None:
    assert _install(host, releases.v100).returncode == 0
    st = _start_installed(host).status()
    assert st.supervisor_version == "1.0.0"
    assert st.dependencies["prometheus-client"] == "0.26.0" and st.dependencies["grpcio"] == "1.85.3"
    assert "pytest" not in st.dependencies  # nothing from the test's interpreter


def test_an_installed_release_serves_metrics_when_they_are_turned_on(host: SupervisorProc,
                                                                    releases: Releases) -> None:
    """[metrics] needs prometheus-client: the release bundles it, so turning the documented key on works."""
    port = free_port()
    host.cfg["metrics"] = {"listen": f"127.0.0.1:{port}"}
    assert _install(host, releases.v100).returncode == 0
    _start_installed(host)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    assert 'baton_supervisor_info{node="node-1",version="1.0.0"} 1.0' in text
    assert 'baton_agents{state="running"} 3.0' in text


def test_doctor_of_an_installed_release_compares_the_unit_with_the_one_the_release_ships(host: SupervisorProc,
                                                                                         releases: Releases) -> None:
    assert _install(host, releases.v100).returncode == 0
    _start_installed(host)
    unit = host.base / "units" / "baton-supervisor.service"
    r = envi(_launcher(host), "doctor", "--config", host.config_path, "--json", "--systemd-unit", unit)
    found = [c for c in json.loads(r.stdout)["checks"] if c["check"] == "systemd-unit"]
    assert [c["status"] for c in found] == ["ok"], found
    assert found[0]["message"].endswith("versions/1.0.0/share/systemd/baton-supervisor.service")


def test_install_self_links_the_operator_commands_through_current(host: SupervisorProc, releases: Releases) -> None:
    assert _install(host, releases.v100).returncode == 0
    current_bin = host.base / "install" / "supervisor" / "current" / "bin"
    for name in ("supervisor", "helper"):
        assert os.readlink(host.base / "bin" / name) == str(current_bin / name)
    assert envi(host.base / "bin" / "supervisor", "--version").stdout.split()[-1] == "1.0.0"


def test_install_self_refuses_a_foreign_command_in_the_bin_dir_before_installing(host: SupervisorProc,
                                                                                 releases: Releases) -> None:
    (host.base / "bin").mkdir()
    (host.base / "bin" / "helper").write_text("#!/bin/sh\necho someone else's helper\n")
    r = _install(host, releases.v100)
    assert r.returncode == 1 and f"{host.base / 'bin' / 'helper'} exists and is not a link" in r.stderr
    assert not (host.base / "install" / "supervisor").exists()
    assert (host.base / "bin" / "helper").read_text().endswith("someone else's helper\n")


def test_uninstall_removes_what_install_self_added_and_keeps_state_and_logs(host: SupervisorProc,
                                                                           releases: Releases) -> None:
    assert _install(host, releases.v100).returncode == 0
    _start_installed(host)
    linked = host.base / "bin" / "supervisor"
    uninstall = ("install-self", "--config", host.config_path, "--uninstall", "--unit-dir", host.base / "units",
                 "--bin-dir", host.base / "bin")
    r = envi(linked, *uninstall)
    assert r.returncode == 1 and "is running" in r.stderr and "nothing was removed" in r.stderr
    assert (host.base / "units" / "baton-supervisor.service").is_file() and os.path.lexists(linked)
    stop_everything_of(host)
    r = envi(linked, *uninstall)
    assert r.returncode == 0, r.stderr
    assert not (host.base / "units" / "baton-supervisor.service").exists()
    assert not os.path.lexists(linked) and not os.path.lexists(host.base / "bin" / "helper")
    assert not (host.base / "install" / "supervisor").exists()
    assert host.state_dir.is_dir() and f"kept {host.state_dir}" in r.stdout


def test_an_installed_release_carries_the_guides_and_its_errors_name_them_on_the_host(host: SupervisorProc,
                                                                                      releases: Releases) -> None:
    assert _install(host, releases.v100).returncode == 0
    docs = host.base / "install" / "supervisor" / "current" / "share" / "doc" / "baton"
    assert {p.name for p in docs.glob("*.md")} == {p.name for p in (ROOT / "docs").glob("*.md")}
    r = envi(_launcher(host), "doctor", "--config", host.config_path)
    version_dir = host.base / "install" / "supervisor" / "versions" / "1.0.0"
    guide = version_dir / "share" / "doc" / "baton" / "troubleshooting.md"
    assert r.stdout.splitlines()[-1].endswith(f"each check is explained in {guide}#doctor-checks")


def test_the_managers_postgresql_store_web_page_and_metrics_work_from_an_installed_release(
        host: SupervisorProc, releases: Releases, pg_url: str, reaper: ProcessReaper) -> None:
    """The release is the fleet's one artifact: its bin/baton-manager runs with what the release bundles (psycopg
    for a PostgreSQL store, prometheus-client), nothing from the test's interpreter."""
    from tests.manager_fixtures import port_open

    assert _install(host, releases.v100).returncode == 0
    manager = host.base / "install" / "supervisor" / "current" / "bin" / "baton-manager"
    grpc_port, web, metrics = free_port(), free_port(), free_port()
    proc = subprocess.Popen(["env", "-i", manager, "serve", "--db", pg_url, "--listen", f"127.0.0.1:{grpc_port}",
                             "--insecure-loopback", "--web", f"127.0.0.1:{web}", "--metrics", f"127.0.0.1:{metrics}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd="/")
    reaper.track(proc.pid)
    try:
        wait_for(lambda: (port_open(web) and port_open(metrics)) or proc.poll() is not None, 30, what="the Manager")
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        with urllib.request.urlopen(f"http://127.0.0.1:{web}/", timeout=10) as r:
            assert r.status == 200 and "<html" in r.read().decode().lower()
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as r:
            assert "baton_manager_nodes" in r.read().decode()
        nodes = envi(manager, "nodes", "--db", pg_url)
        assert nodes.returncode == 0, nodes.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_install_self_refuses_to_overwrite_an_installed_version(host: SupervisorProc, releases: Releases) -> None:
    assert _install(host, releases.v100).returncode == 0
    marker = host.base / "install" / "supervisor" / "versions" / "1.0.0" / "extra"
    marker.write_text("kept")
    r = _install(host, releases.v100)
    assert r.returncode == 1 and "already installed" in r.stderr
    assert marker.read_text() == "kept"


def test_install_self_refuses_a_version_below_the_highest_committed_without_force(host: SupervisorProc,
                                                                                  releases: Releases) -> None:
    assert _install(host, releases.v110).returncode == 0
    sup_root = host.base / "install" / "supervisor"
    r = _install(host, releases.v100)
    assert r.returncode == 1 and "below the highest committed version 1.1.0" in r.stderr
    assert os.readlink(sup_root / "current") == "versions/1.1.0"
    assert not (sup_root / "versions" / "1.0.0").exists()
    r = _install(host, releases.v100, "--force")
    assert r.returncode == 0, r.stderr
    assert os.readlink(sup_root / "current") == "versions/1.0.0"


def test_install_self_refuses_to_switch_current_under_a_running_supervisor(host: SupervisorProc,
                                                                           releases: Releases) -> None:
    assert _install(host, releases.v100).returncode == 0
    _start_installed(host)
    r = _install(host, releases.v110)
    assert r.returncode == 1 and "is running" in r.stderr
    sup_root = host.base / "install" / "supervisor"
    assert os.readlink(sup_root / "current") == "versions/1.0.0"
    assert not (sup_root / "versions" / "1.1.0").exists()


# ---- self-updates between releases ---------------------------------------------------------------------


@pytest.fixture
def running_release(host: SupervisorProc, releases: Releases) -> Iterator[SupervisorProc]:
    assert _install(host, releases.v100).returncode == 0
    yield _start_installed(host)
    stop_everything_of(host)


def test_a_supervisor_started_by_a_release_launcher_maps_no_openssl(running_release: SupervisorProc) -> None:
    """The release's bin/supervisor goes through supervisor/entry.py like `python -m supervisor` (issue 13, memory)."""
    assert running_release.proc is not None
    maps = Path(f"/proc/{running_release.proc.pid}/maps").read_text()
    assert "libssl.so" not in maps and "/_ssl." not in maps


def _push(host: SupervisorProc, release: Release, tarball: Path, version: str) -> Any:
    """Push a signed release as a self-update; returns its final UpdateStatus."""
    from baton.pb import daemon_pb2

    pkg: Package = release.sign(tarball, "supervisor", version)
    update_id = host.stub.PushUpdate(pkg.request(), timeout=10).update_id

    def final() -> daemon_pb2.UpdateStatus | None:
        try:
            st = host.stub.GetUpdate(daemon_pb2.UpdateRef(update_id=update_id), timeout=5)
        except Exception:
            return None  # the control plane is between two processes
        return st if st.finished else None

    return wait_for(final, 120, interval=0.2, what=f"update to {version} to finish")


def _agent_pids(host: SupervisorProc) -> dict[str, int]:
    return {a.name: a.pid for a in host.status().agents}


def test_self_update_to_a_release_with_another_dependency_version_commits_with_agents_untouched(
        running_release: SupervisorProc, release: Release, releases: Releases) -> None:
    host = running_release
    before = _agent_pids(host)
    st = _push(host, release, releases.v110, "1.1.0")
    assert st.success, st.error
    status = host.status()
    assert status.supervisor_version == "1.1.0"
    assert status.dependencies[ALT_DEP[0]] == ALT_DEP[1]
    assert _agent_pids(host) == before


def _break_protobuf(root: Path) -> None:
    shutil.rmtree(root / "lib" / "google" / "protobuf")


def _break_helper_and_grpc(root: Path) -> None:
    """A release whose helper cannot start at all (its supervisor neither: no gRPC)."""
    (root / "lib" / "helper" / "cli.py").unlink()
    shutil.rmtree(root / "lib" / "grpc")


def test_self_update_to_a_release_with_a_broken_dependency_rolls_back_quoting_its_import_error(
        running_release: SupervisorProc, release: Release, releases: Releases) -> None:
    host = running_release
    before = _agent_pids(host)
    st = _push(host, release, releases.derived("1.2.0", _break_protobuf), "1.2.0")
    assert not st.success and st.rolled_back
    assert "ModuleNotFoundError: No module named 'google.protobuf'" in st.last_log
    assert host.status().supervisor_version == "1.0.0"
    assert _agent_pids(host) == before
    assert os.readlink(host.base / "install" / "supervisor" / "current") == "versions/1.0.0"


def _python_3_12(root: Path) -> None:
    data = json.loads((root / "RELEASE.json").read_text())
    data["python_tag"] = "cp312"
    (root / "RELEASE.json").write_text(json.dumps(data))


def _aarch64(root: Path) -> None:
    data = json.loads((root / "RELEASE.json").read_text())
    data["platform"] = "linux_aarch64"
    (root / "RELEASE.json").write_text(json.dumps(data))


@pytest.mark.parametrize(("edit", "expect"), [(_python_3_12, "built for cp312-linux_x86_64"),
                                              (_aarch64, "built for cp311-linux_aarch64")])
def test_a_release_for_another_python_or_architecture_is_refused_before_anything_is_switched(
        running_release: SupervisorProc, release: Release, releases: Releases, edit: Callable[[Path], None],
        expect: str) -> None:
    host = running_release
    st = _push(host, release, releases.derived("1.3.0", edit), "1.3.0")
    assert not st.success and not st.rolled_back
    assert expect in st.error and "this host runs cp311-linux_x86_64" in st.error
    assert common_pb2.FailureReason.Name(st.reason) == "INCOMPATIBLE_RELEASE"
    sup_root = host.base / "install" / "supervisor"
    assert os.readlink(sup_root / "current") == "versions/1.0.0"
    assert sorted(p.name for p in (sup_root / "versions").iterdir()) == ["1.0.0"]


def test_a_host_running_a_release_refuses_a_code_only_development_tree(running_release: SupervisorProc,
                                                                       release: Release) -> None:
    from supervisor.cli.install_self import write_tree

    host = running_release
    tree = write_tree(host.base / "dev-tree", "1.4.0")
    st = _push(host, release, release.build("1.4.0", component="supervisor", tree=tree).path, "1.4.0")
    assert not st.success and not st.rolled_back
    assert "not a release (no RELEASE.json)" in st.error
    assert common_pb2.FailureReason.Name(st.reason) == "INCOMPATIBLE_RELEASE"
    assert os.readlink(host.base / "install" / "supervisor" / "current") == "versions/1.0.0"


# ---- rollback from nothing -----------------------------------------------------------------------------


def _kill_supervisor(host: SupervisorProc) -> None:
    """SIGKILL whatever supervisor process serves this host now (the agents stay)."""
    pid = host.status().pid
    host.close_channel()
    os.kill(pid, 9)
    wait_for(lambda: not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2],
             10, what="the supervisor to die")


def test_rollback_with_an_empty_environment_and_no_supervisor_runs_the_previous_version_and_never_goes_forward(
        running_release: SupervisorProc, release: Release, releases: Releases) -> None:
    host = running_release
    assert _push(host, release, releases.v110, "1.1.0").success
    _kill_supervisor(host)
    helper = host.base / "install" / "supervisor" / "current" / "bin" / "helper"
    r = envi(helper, "--rollback", "--config", host.config_path)
    assert r.returncode == 0, r.stderr
    assert "rolled back 1.1.0 -> 1.0.0" in r.stdout
    st = host.status()
    assert st.supervisor_version == "1.0.0" and st.dependencies["prometheus-client"] == "0.26.0"
    again = envi(helper, "--rollback", "--config", host.config_path)
    assert again.returncode == 1
    assert "no earlier good version" in again.stderr and "1.1.0" in again.stderr
    assert host.status().supervisor_version == "1.0.0"
    assert os.readlink(host.base / "install" / "supervisor" / "current") == "versions/1.0.0"


def test_rollback_to_an_explicit_version_goes_there(running_release: SupervisorProc, release: Release,
                                                    releases: Releases) -> None:
    from baton.marks import Marks

    host = running_release
    assert _push(host, release, releases.v110, "1.1.0").success
    helper = host.base / "install" / "supervisor" / "current" / "bin" / "helper"
    assert envi(helper, "--rollback", "--config", host.config_path).returncode == 0
    assert Marks(host.state_dir).failed("supervisor") == ["1.1.0"]  # the automatic rollback condemned it
    r = envi(helper, "--rollback", "--to", "1.1.0", "--config", host.config_path)
    assert r.returncode == 0, r.stderr
    assert "moved forward 1.0.0 -> 1.1.0 (a newer version)" in r.stdout
    assert host.status().supervisor_version == "1.1.0"
    assert Marks(host.state_dir).failed("supervisor") == []  # named by hand: 1.1.0 is good again, 1.0.0 never bad


def test_rollback_from_a_broken_current_release_works_with_the_other_release_helper(
        running_release: SupervisorProc, release: Release, releases: Releases) -> None:
    from baton.layout import ComponentLayout

    host = running_release
    broken = unpack(releases.derived("1.2.0", _break_helper_and_grpc), host.base / "unpacked" / "broken")
    layout = ComponentLayout(host.base / "install", "supervisor")
    staged = layout.versions_dir / ".staging-test"
    shutil.copytree(broken, staged, symlinks=True)
    layout.install(staged, "1.2.0")
    _kill_supervisor(host)
    layout.switch("1.2.0")  # as if a broken release had been made current by hand
    assert envi(layout.current_link / "bin" / "helper", "--status", "--config", host.config_path).returncode != 0
    r = envi(layout.version_dir("1.0.0") / "bin" / "helper", "--rollback", "--config", host.config_path)
    assert r.returncode == 0, r.stderr
    assert host.status().supervisor_version == "1.0.0"
