"""Degrade, never stop the workload (issue 25): what a broken config refuses is the risky action, not the agents.

Broken trust material (``update.trusted_keys`` missing, unreadable or replaceable by another user) refuses every
update, at push time and with the reason, and is shown by status, doctor and metrics, while a real supervisor
started again on it (as after a reboot) runs every agent. ``check-config`` still refuses it, one line naming the
key, so an operator sees it before a restart.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from baton.admission import REFUSAL_METADATA_KEY
from tests.conftest import PY, ROOT, Release, SupervisorProc, UpdateHost, agent, install_version
from tests.test_doctor import doctor
from tests.test_strict_modes import one_line

NOBODY = 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="an unsafe key is one another user owns: needs root")


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
