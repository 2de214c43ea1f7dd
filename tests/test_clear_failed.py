"""``helper clear-failed``: a version that failed is pushable again without ``force`` once its mark is cleared."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest

from baton.marks import Marks
from helper.locks import ComponentLock
from tests.conftest import UpdateHost
from tests.test_agent_update import rejected_at_push

pytestmark = pytest.mark.e2e  # every test here starts a process


def helper(host: UpdateHost, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "helper", "--config", str(host.sup.config_path), *args],
                          capture_output=True, text=True, timeout=60)


def _fail_1_1_0(host: UpdateHost) -> None:
    st = host.wait_final(host.push(host.release.build("1.1.0", "exit_at_once")), timeout=60)
    assert st.rolled_back


def test_cleared_failed_version_is_accepted_again_without_force(update_host):
    _fail_1_1_0(update_host)
    good = update_host.release.build("1.1.0")
    rejected_at_push(update_host, good.request(), grpc.StatusCode.FAILED_PRECONDITION, "failed before")
    assert "1.1.0" in helper(update_host, "--status").stdout.split("FAILED", 1)[1]

    r = helper(update_host, "clear-failed", "app", "1.1.0")
    assert r.returncode == 0, r.stderr
    assert "forgot failed 1.1.0" in r.stdout
    assert Marks(update_host.sup.state_dir).failed("app") == []
    assert update_host.wait_final(update_host.push(good)).success
    from baton.audit import AuditLog

    [rec] = [r for r in AuditLog(update_host.sup.state_dir).read() if r.call == "helper clear-failed"]
    assert (rec.caller.kind, rec.outcome, rec.args) == ("helper", "ok", {"component": "app", "version": "1.1.0"})


def test_clear_failed_keeps_the_high_water_mark_and_says_when_nothing_is_marked(update_host):
    _fail_1_1_0(update_host)
    marks = Marks(update_host.sup.state_dir)
    highest = marks.highest("app")
    r = helper(update_host, "clear-failed", "app", "9.9.9")
    assert (r.returncode, marks.failed("app")) == (0, ["1.1.0"])
    assert "not marked failed" in r.stdout
    assert helper(update_host, "clear-failed", "app").returncode == 0
    assert (marks.failed("app"), marks.highest("app")) == ([], highest)


def test_clear_failed_is_refused_while_an_update_of_the_component_runs(update_host):
    _fail_1_1_0(update_host)
    with ComponentLock(update_host.sup.state_dir, "app"):  # what a running helper holds
        r = helper(update_host, "clear-failed", "app")
    assert r.returncode == 1 and "another helper is updating app" in r.stderr
    assert Marks(update_host.sup.state_dir).failed("app") == ["1.1.0"]


def test_clear_failed_of_an_unknown_component_changes_nothing(update_host):
    r = helper(update_host, "clear-failed", "nope")
    assert r.returncode == 2 and "unknown component 'nope'" in r.stderr
