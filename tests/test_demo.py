"""The README's demo command runs end to end: Manager, agents, an agent update, a self-update."""

import subprocess

import pytest

from tests.conftest import PY, ROOT

pytestmark = pytest.mark.e2e  # every test here starts a process


DEMO_TIMEOUT_S = 240  # it builds two releases: 95 s on a loaded 2-core machine, over pytest's default 120 s at load 14


@pytest.mark.timeout(DEMO_TIMEOUT_S + 30)
def test_demo_runs_and_no_agent_is_disturbed_by_the_self_update():
    res = subprocess.run([PY, "-m", "supervisor", "demo", "--seconds", "0"], capture_output=True, text=True,
                         cwd=ROOT, timeout=DEMO_TIMEOUT_S)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    assert "registered with the Manager" in out
    assert out.count("committed  ok") >= 2
    assert "unchanged: no agent was disturbed" in out
    assert "supervisor exited with 0" in out
