"""The real collaborators behind the helper's seams are the ones ``helper apply`` gets (helper/wiring.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from baton.config import SUPERVISOR_COMPONENT, AgentConfig, Config, NodeConfig
from baton.journal import Journal, UpdateRecord, UpdateRequestRecord
from helper.download import download
from helper.wiring import SystemClock, update_run


@pytest.fixture
def journal_of(tmp_path: Path):
    cfg = Config(node=NodeConfig(id="n1", state_dir=tmp_path / "state", install_root=tmp_path / "install"),
                 agents=(AgentConfig(name="app", command="bin/agent", packaged=True),))
    journal = Journal(cfg.node.state_dir)

    def make(component: str) -> tuple[Config, Journal]:
        journal.create(UpdateRecord(update_id=f"u-{component}", request=UpdateRequestRecord(
            node_id="n1", component=component, version="1.1.0", download_url="https://x/p", sha256="0" * 64,
            signature="s", size=1)))
        return cfg, journal

    return make


def test_an_agent_update_gets_the_real_fetcher_clock_and_a_supervisor_client_made_on_first_use(journal_of,
                                                                                                 tmp_path):
    from helper.machine import UpdateRun

    cfg, journal = journal_of("app")
    run = update_run(cfg, journal, "u-app", "app", tmp_path / "control.sock")
    assert type(run) is UpdateRun
    assert run.installer.fetch is download and isinstance(run.clock, SystemClock) and run.journal is journal
    assert run._control is None  # nothing connects before the new version is in place
    from helper.control import SupervisorControl

    client = run.control
    assert isinstance(client, SupervisorControl) and client.socket_path == tmp_path / "control.sock"


def test_a_self_update_gets_the_handover_session_and_the_control_socket_probe(journal_of, tmp_path):
    from helper.self_update import ControlSocketProbe, HandoverSession, SelfUpdateRun

    cfg, journal = journal_of(SUPERVISOR_COMPONENT)
    run = update_run(cfg, journal, f"u-{SUPERVISOR_COMPONENT}", SUPERVISOR_COMPONENT, tmp_path / "control.sock")
    assert type(run) is SelfUpdateRun
    assert run.handover is HandoverSession and isinstance(run.probe, ControlSocketProbe)
    assert run.installer.fetch is download and isinstance(run.clock, SystemClock)


def test_the_system_clock_is_time(monkeypatch):
    import time

    clock = SystemClock()
    assert abs(clock.time() - time.time()) < 5 and abs(clock.monotonic() - time.monotonic()) < 5
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    clock.sleep(0.25)
    assert slept == [0.25]
