"""A packaged agent with no version waits in NOT_INSTALLED, counting nothing, until an update installs one."""

from __future__ import annotations

import subprocess
import time

import pytest

from baton.pb import common_pb2
from tests.conftest import PY, ROOT, UpdateHost

pytestmark = pytest.mark.e2e  # every test here starts a process

PACKAGED_APP = {"name": "app", "packaged": True, "command": "bin/agent", "notify": True, "restart": "always",
                "backoff_initial_s": 0.1, "start_retries": 2, "stop_timeout_s": 5.0}


def fresh_host(make_supervisor, release) -> UpdateHost:  # type: ignore[no-untyped-def]
    sup = make_supervisor(
        [dict(PACKAGED_APP)],
        extra={"update": {"trusted_keys": [str(release.public_key)], "health_timeout_s": 10.0,
                          "health_window_s": 0.5, "free_space_reserve_bytes": 0}},
    )
    sup.start()
    return UpdateHost(sup, release)


def test_packaged_agent_without_a_version_waits_without_counting_restarts(make_supervisor, release):
    host = fresh_host(make_supervisor, release)
    app = host.sup.wait_agent("app", "not_installed")
    time.sleep(1.0)  # several backoff periods (0.1 s) and more than start_retries would allow
    app = host.sup.agent("app")
    assert app.state == common_pb2.AGENT_STATE_NOT_INSTALLED
    assert app.restarts == 0 and app.pid == 0
    assert "supervisor update app" in app.last_error
    status = subprocess.run([PY, "-m", "supervisor", "status", "--socket", str(host.sup.socket)],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert "not_installed" in status.stdout


def test_not_installed_survives_a_supervisor_restart_without_counting(make_supervisor, release):
    host = fresh_host(make_supervisor, release)
    host.sup.wait_agent("app", "not_installed")
    host.sup.terminate()
    host.sup.start()
    app = host.sup.wait_agent("app", "not_installed")
    assert app.restarts == 0


def test_first_update_installs_the_first_version_and_starts_the_agent(make_supervisor, release):
    host = fresh_host(make_supervisor, release)
    host.sup.wait_agent("app", "not_installed")
    pkg = release.build("1.0.0")
    pkg.path.with_name(pkg.path.name + ".minisig").write_text(pkg.signature)
    r = subprocess.run([PY, "-m", "supervisor", "update", "app", "--package", str(pkg.path), "--socket",
                        str(host.sup.socket)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    app = host.sup.wait_agent("app", "running")
    assert (app.version, app.restarts) == ("1.0.0", 0)
    assert host.layout.current_version() == "1.0.0"
