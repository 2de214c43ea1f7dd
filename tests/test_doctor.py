"""`supervisor doctor`: each check seen failing on a real host, then passing after the fix it prints."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from baton.journal import Journal, UpdateRecord, UpdateRequestRecord
from baton.layout import UNIT_IN_VERSION
from baton.signing import load_public_key
from manager.devca import issue_manager, issue_node, make_ca
from supervisor.cli.install_self import render_unit
from tests.conftest import PY, ROOT, agent, free_port, wait_for
from tests.manager_fixtures import make_manager_fixture  # noqa: F401  (the make_manager fixture)

NOBODY = 65534


def doctor(config: Path, *args: str, unit: Path | None = None) -> tuple[int, list[dict[str, Any]]]:
    res = subprocess.run([PY, "-m", "supervisor", "doctor", "--config", str(config), "--json",
                          "--systemd-unit", str(unit or config.parent / "no-such.service"), *args],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.returncode in (0, 1, 2), res.stderr
    report = json.loads(res.stdout)
    assert report["exit"] == res.returncode
    return res.returncode, report["checks"]


def worst(checks: list[dict[str, Any]], name: str) -> dict[str, Any]:
    rank = {"ok": 0, "warning": 1, "problem": 2}
    return max((c for c in checks if c["check"] == name), key=lambda c: rank[c["status"]])


def run_fix(fix: str) -> None:
    """Carry out a printed fix that is a plain shell command."""
    subprocess.run(fix, shell=True, check=True, timeout=30)


@pytest.mark.e2e
def test_a_healthy_host_is_all_ok_and_the_text_output_has_one_line_per_finding(update_host):
    code, checks = doctor(update_host.sup.config_path)
    assert code == 0, [c for c in checks if c["status"] != "ok"]
    names = {c["check"] for c in checks}
    assert names == {"config", "trusted-keys", "trusted-paths", "directories", "disk-space", "layout", "supervisor",
                     "agents", "manager", "certificates", "clock", "systemd-unit"}
    key = worst(checks, "trusted-keys")
    assert load_public_key(update_host.release.public_key).key_id_hex in key["message"]
    text = subprocess.run([PY, "-m", "supervisor", "doctor", "--config", str(update_host.sup.config_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert text.returncode == 0
    assert len(text.stdout.splitlines()) == len(checks) + 1 and text.stdout.startswith("ok ")


@pytest.mark.e2e
def test_a_config_that_does_not_validate_is_a_problem_and_only_where_the_supervisor_runs_is_still_checked(tmp_path):
    cfg = tmp_path / "bad.toml"
    sock = tmp_path / "x.sock"
    cfg.write_text(f'[node]\nid = "n1"\n[grpc]\nunix_socket = "{sock}"\n[update]\ndownload_timeout_s = -1\n')
    code, checks = doctor(cfg)
    assert code == 2 and [c["check"] for c in checks] == ["config", "supervisor", "agents"]
    assert "update.download_timeout_s" in checks[0]["message"] and "check-config" in checks[0]["fix"]
    assert checks[1]["status"] == "problem" and f"no socket at {sock}" in checks[1]["message"]


@pytest.mark.e2e
def test_a_state_dir_owned_by_nobody_is_a_problem_until_chowned(update_host):
    state = update_host.sup.state_dir
    os.chown(state, NOBODY, -1)
    code, checks = doctor(update_host.sup.config_path)
    bad = worst(checks, "directories")
    assert code == 2 and bad["status"] == "problem" and str(state) in bad["message"]
    assert "uid 65534" in bad["message"]
    run_fix(bad["fix"])
    code, checks = doctor(update_host.sup.config_path)
    assert worst(checks, "directories")["status"] == "ok" and code == 0


@pytest.mark.e2e
def test_a_trusted_key_owned_by_nobody_is_a_problem_until_chowned(update_host):
    key = update_host.release.public_key
    os.chown(key, NOBODY, -1)
    code, checks = doctor(update_host.sup.config_path)
    bad = worst(checks, "trusted-paths")
    assert code == 2 and bad["message"].startswith("update.trusted_keys[0]:") and "uid 65534" in bad["message"]
    run_fix(bad["fix"])
    code, checks = doctor(update_host.sup.config_path)
    assert worst(checks, "trusted-paths")["status"] == "ok" and code == 0


@pytest.mark.e2e
def test_a_missing_trusted_key_is_a_problem_until_restored(update_host):
    key = update_host.release.public_key
    saved = key.read_text()
    key.unlink()
    code, checks = doctor(update_host.sup.config_path)
    bad = worst(checks, "trusted-keys")
    assert code == 2 and bad["status"] == "problem" and str(key) in bad["message"]
    assert f"restore {key}" in bad["fix"]
    key.write_text(saved)
    code, checks = doctor(update_host.sup.config_path)
    assert code == 0 and "key id" in worst(checks, "trusted-keys")["message"]


@pytest.mark.e2e
def test_a_stray_staging_directory_is_a_warning_until_removed(update_host):
    stray = update_host.layout.versions_dir / ".staging-9.9.9-4242"
    (stray / "bin").mkdir(parents=True)
    code, checks = doctor(update_host.sup.config_path)
    bad = worst(checks, "layout")
    assert code == 1 and bad["status"] == "warning" and str(stray) in bad["message"]
    assert bad["fix"] == f"rm -rf {stray}"
    run_fix(bad["fix"])
    code, _ = doctor(update_host.sup.config_path)
    assert code == 0


@pytest.mark.e2e
def test_a_current_link_to_a_version_not_installed_is_a_problem(update_host):
    (update_host.layout.versions_dir / "2.0.0").mkdir()  # no marker: not installed
    os.replace(update_host.layout.current_link, update_host.install_root / "saved-link")
    os.symlink("versions/2.0.0", update_host.layout.current_link)
    code, checks = doctor(update_host.sup.config_path)
    bad = worst(checks, "layout")
    assert code == 2 and "not an installed version" in bad["message"] and "helper --rollback app" in bad["fix"]
    os.replace(update_host.install_root / "saved-link", update_host.layout.current_link)
    shutil.rmtree(update_host.layout.versions_dir / "2.0.0")
    assert doctor(update_host.sup.config_path)[0] == 0


@pytest.mark.e2e
def test_a_dead_supervisor_is_a_problem_until_started_again(update_host):
    update_host.sup.kill()
    code, checks = doctor(update_host.sup.config_path)
    bad = worst(checks, "supervisor")
    assert code == 2 and bad["status"] == "problem" and str(update_host.sup.socket) in bad["message"]
    assert f"supervisor run --config {update_host.sup.config_path}" in bad["fix"]
    update_host.sup.start()
    code, checks = doctor(update_host.sup.config_path)
    assert code == 0 and "answering" in worst(checks, "supervisor")["message"]


@pytest.mark.e2e
def test_a_fatal_agent_is_a_problem_naming_its_log_and_a_crash_looping_one_a_warning(make_supervisor):
    sup = make_supervisor([
        agent("steady", "crash_agent.py"),
        agent("broken", "crash_agent.py", env={"CRASH_AFTER": "0"}, start_retries=1, backoff_initial_s=0.05),
        agent("looping", "crash_agent.py", env={"CRASH_AFTER": "0"}, start_retries=1000, backoff_initial_s=30.0)])
    sup.start()
    sup.wait_agent("broken", "fatal")
    sup.wait_agent("looping", "backoff")
    code, checks = doctor(sup.config_path)
    found = {c["message"].split()[0]: c for c in checks if c["check"] == "agents"}
    assert code == 2 and set(found) == {"broken", "looping"}
    assert found["broken"]["status"] == "problem" and "FATAL" in found["broken"]["message"]
    assert str(sup.base) in found["broken"]["fix"] and "supervisor start broken" in found["broken"]["fix"]
    assert found["looping"]["status"] == "warning" and "crash-looping" in found["looping"]["message"]


@pytest.mark.e2e
def test_too_little_space_for_the_largest_recent_package_is_a_problem(update_host):
    journal = Journal(update_host.sup.state_dir)
    huge = 1 << 60
    journal.create(UpdateRecord(update_id="big-one", request=UpdateRequestRecord(
        node_id="node-1", component="app", version="9.0.0", download_url="http://x/", sha256="0" * 64,
        signature="", size=huge)))
    code, checks = doctor(update_host.sup.config_path)
    bad = worst(checks, "disk-space")
    assert code == 2 and bad["status"] == "problem" and "largest recent package" in bad["message"]
    shutil.rmtree(journal.dir("big-one"))
    assert worst(doctor(update_host.sup.config_path)[1], "disk-space")["status"] == "ok"


@pytest.mark.e2e
def test_a_clock_behind_a_recorded_time_is_a_problem(update_host):
    import time

    journal = Journal(update_host.sup.state_dir)
    rec = UpdateRecord(update_id="from-the-future", request=UpdateRequestRecord(
        node_id="node-1", component="app", version="9.0.0", download_url="http://x/", sha256="0" * 64,
        signature="", size=1))
    journal.create(rec)
    journal.save(dataclasses.replace(journal.load("from-the-future"), updated_at=time.time() + 86400))
    code, checks = doctor(update_host.sup.config_path)
    bad = worst(checks, "clock")
    assert code == 2 and "jumped back" in bad["message"] and "timedatectl" in bad["fix"]
    shutil.rmtree(journal.dir("from-the-future"))
    assert worst(doctor(update_host.sup.config_path)[1], "clock")["status"] == "ok"


LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")  # Debian's faketime (bootstrap.sh)


def faked_clock(offset: str) -> dict[str, str]:
    """The environment of a process whose wall clock is ``offset`` (libfaketime: "+3y", "-2h") off the host's;
    the time since boot (/proc/uptime) is not faked."""
    assert LIBFAKETIME.exists(), "scripts/bootstrap.sh installs Debian's faketime"
    return {"LD_PRELOAD": str(LIBFAKETIME), "FAKETIME": offset}


@pytest.mark.e2e
def test_a_clock_three_years_ahead_is_a_problem_naming_the_clock(update_host):
    record = update_host.sup.state_dir / "clock.json"
    wait_for(record.exists, 10, what="the supervisor's record of the clock")
    before = record.read_bytes()
    res = subprocess.run([PY, "-m", "supervisor", "doctor", "--config", str(update_host.sup.config_path), "--json",
                          "--systemd-unit", str(update_host.sup.base / "no-such.service")],
                         capture_output=True, text=True, cwd=ROOT, timeout=60,
                         env={**os.environ, **faked_clock("+3y")})
    report = json.loads(res.stdout)
    bad = worst(report["checks"], "clock")
    assert res.returncode == 2 and bad["status"] == "problem", report
    assert "jumped 3.0 years ahead against the time since boot" in bad["message"] and "timedatectl" in bad["fix"]
    assert [c["check"] for c in report["checks"] if c["status"] == "problem"] == ["clock"]
    assert record.read_bytes() == before, "doctor changes nothing"
    assert worst(doctor(update_host.sup.config_path)[1], "clock")["status"] == "ok"


@pytest.mark.e2e
def test_a_supervisor_clock_hours_ahead_of_the_managers_is_a_problem(make_supervisor, make_manager, release):
    from tests.manager_fixtures import node_config

    manager = make_manager()
    sup = make_supervisor([], extra=node_config(manager, release))
    sup.start(env=faked_clock("+2h"))
    st = wait_for(lambda: (s := sup.status()).manager_clock_measured_at and s, 20,
                  what="the supervisor to measure the Manager's clock")
    assert st.manager_clock_offset_s == pytest.approx(-7200, abs=60)
    code, checks = doctor(sup.config_path)
    found = [c for c in checks if c["check"] == "clock" and "Manager" in c["message"]]
    assert code == 2 and len(found) == 1 and found[0]["status"] == "problem"
    assert "the clock is 2 hours ahead of the Manager's" in found[0]["message"]


@pytest.mark.e2e
def test_a_clock_in_step_with_the_manager_is_ok(make_supervisor, make_manager, release):
    from tests.manager_fixtures import node_config

    manager = make_manager()
    sup = make_supervisor([], extra=node_config(manager, release))
    sup.start()
    wait_for(lambda: sup.status().manager_clock_measured_at, 20, what="the supervisor to measure the Manager's clock")
    clock = worst(doctor(sup.config_path)[1], "clock")
    assert clock["status"] == "ok" and "in step with the time since boot, the Manager's" in clock["message"]


def _tls_host(make_supervisor, release, tmp_path, manager_address: str, node_days: float):  # type: ignore[no-untyped-def]
    pki = tmp_path / "pki"
    ca = make_ca(pki)
    node = issue_node(ca, pki, "node-1", valid_days=node_days)
    sup = make_supervisor([], extra={
        "update": {"trusted_keys": [str(release.public_key)]},
        "manager": {"address": manager_address, "tls_ca": str(ca.files.cert), "tls_cert": str(node.cert),
                    "tls_key": str(node.key), "server_name": "manager-1", "retry_initial_s": 0.1,
                    "retry_max_s": 0.3}})
    return sup, ca, node


@pytest.mark.e2e
def test_a_certificate_near_expiry_is_a_warning_until_renewed(make_supervisor, release, tmp_path):
    sup, ca, node = _tls_host(make_supervisor, release, tmp_path, "", node_days=3)
    sup.cfg["manager"]["address"] = ""
    sup.start()
    code, checks = doctor(sup.config_path)
    bad = worst(checks, "certificates")
    assert code == 1 and bad["status"] == "warning" and "expires in 3.0 days" in bad["message"]
    assert "scripts/dev_ca.py" in bad["fix"] and str(node.cert) in bad["fix"]
    issue_node(ca, tmp_path / "pki", "node-1")  # the fix: a new certificate in the same place
    code, checks = doctor(sup.config_path)
    assert code == 0 and worst(checks, "certificates")["status"] == "ok"
    code, checks = doctor(sup.config_path, "--cert-days", "100000")
    assert code == 1, "--cert-days sets the horizon"


@pytest.mark.e2e
def test_an_unreachable_manager_is_a_problem_until_it_serves_with_a_chain_that_validates(
        make_supervisor, make_manager, release, tmp_path):
    port = free_port()
    sup, ca, _ = _tls_host(make_supervisor, release, tmp_path, f"127.0.0.1:{port}", node_days=365)
    sup.start()
    code, checks = doctor(sup.config_path)
    bad = worst(checks, "manager")
    assert code == 2 and "unreachable" in bad["message"] and "baton-manager serve" in bad["fix"]

    other = make_ca(tmp_path / "other", "Some other CA")
    impostor = issue_manager(other, tmp_path / "other", "manager-1")
    manager = make_manager("impostor", tls={"cert": impostor.cert, "key": impostor.key, "ca": other.files.cert})
    sup.cfg["manager"]["address"] = manager.address
    sup.write_config()
    code, checks = doctor(sup.config_path)
    bad = worst(checks, "manager")
    assert code == 2 and "does not validate" in bad["message"] and "manager.tls_ca" in bad["fix"]
    manager.stop()

    real = issue_manager(ca, tmp_path / "pki", "manager-1")
    manager = make_manager("real", tls={"cert": real.cert, "key": real.key, "ca": ca.files.cert})
    sup.cfg["manager"]["address"] = manager.address
    sup.write_config()
    code, checks = doctor(sup.config_path)
    assert code == 0, [c for c in checks if c["status"] != "ok"]
    assert "validates for 'manager-1'" in worst(checks, "manager")["message"]


@pytest.mark.e2e
def test_an_installed_unit_that_differs_from_the_shipped_one_is_reported(update_host, tmp_path):
    shipped = ROOT / "packaging" / "systemd" / "baton-supervisor.service"
    unit = tmp_path / "baton-supervisor.service"
    launcher = update_host.install_root / "supervisor" / "current" / "bin" / "supervisor"
    text = render_unit(shipped.read_text(), launcher.parents[3], update_host.sup.config_path)
    unit.write_text(text.replace("KillMode=process", "KillMode=control-group"))
    code, checks = doctor(update_host.sup.config_path, unit=unit)
    bad = worst(checks, "systemd-unit")
    assert code == 2 and "KillMode=control-group" in bad["message"] and str(shipped) in bad["fix"]
    unit.write_text(text)
    code, checks = doctor(update_host.sup.config_path, unit=unit)
    assert code == 0 and "matches" in worst(checks, "systemd-unit")["message"]


@pytest.mark.e2e
def test_the_fix_for_a_world_writable_download_dir_is_a_command_that_works(update_host):
    d = update_host.sup.state_dir / "downloads"
    wait_for(d.is_dir, 10, what="the download dir")
    d.chmod(0o777)
    code, checks = doctor(update_host.sup.config_path)
    bad = worst(checks, "directories")
    assert code == 2 and "writable by group or others" in bad["message"]
    assert shlex.split(bad["fix"])[0] == "chmod"
    run_fix(bad["fix"])
    assert doctor(update_host.sup.config_path)[0] == 0


def test_the_troubleshooting_guide_has_a_section_for_every_check():
    from supervisor.cli.doctor import CHECKS

    guide = (ROOT / "docs" / "troubleshooting.md").read_text()
    for name in ["config", *(n for n, _ in CHECKS)]:
        assert f'<a id="doctor-{name}"></a>' in guide, name


@pytest.mark.e2e
def test_an_installed_supervisor_version_carries_the_unit_its_doctor_compares_with(make_self_host, tmp_path):
    host = make_self_host(tcp=False)
    version_dir = host.sup_layout.version_dir("1.0.0")
    shipped = version_dir / UNIT_IN_VERSION
    assert shipped.read_text() == (ROOT / "packaging" / "systemd" / "baton-supervisor.service").read_text()
    unit = tmp_path / "baton-supervisor.service"
    unit.write_text(render_unit(shipped.read_text(), host.launcher.parents[3], host.sup.config_path))
    res = subprocess.run([str(host.launcher), "doctor", "--config", str(host.sup.config_path), "--json",
                          "--systemd-unit", str(unit)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "BATON_PYTHON": PY})
    checks = json.loads(res.stdout)["checks"]
    assert res.returncode == 0, [c for c in checks if c["status"] != "ok"]
    assert worst(checks, "systemd-unit")["message"] == f"{unit} matches {shipped}"
    assert "supervisor: current 1.0.0" in " ".join(c["message"] for c in checks if c["check"] == "layout")
