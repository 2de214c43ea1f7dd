"""The one place where the helper's drivers get their real collaborators (the seams: ``helper/ports.py``).

Imports stay where they were paid before the seams: the download and the journal with the machine, the
supervisor client when the new version is in place (:func:`supervisor_client`), and the handover's
machinery (gRPC) only for an update of the supervisor.
"""

from __future__ import annotations

import time
from pathlib import Path

from baton.config import SUPERVISOR_COMPONENT, Config
from baton.journal import Journal
from helper.machine import UpdateRun
from helper.ports import ClientFactory, SupervisorClient


class SystemClock:
    """The real ``Clock``: ``time``'s monotonic and wall clocks, and a real sleep."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


def supervisor_client(socket: Path) -> ClientFactory:
    """The supervisor's client on ``socket``, made when an update first needs it (once the new version is in
    place).

    It speaks the agent channel (baton/agent_channel.py), not gRPC, whose imports would be a third of the
    helper's (tests/test_startup_rules.py; the figures: docs/benchmarks.md, "Start-up rules and their history").
    """
    def make() -> SupervisorClient:
        from helper.control import SupervisorControl

        return SupervisorControl(socket)

    return make


def update_run(cfg: Config, journal: Journal, update_id: str, component: str, socket: Path) -> UpdateRun:
    """The driver of update ``update_id`` of ``component``, with the real world behind every seam."""
    from helper.download import download

    control, clock = supervisor_client(socket), SystemClock()
    if component != SUPERVISOR_COMPONENT:
        return UpdateRun(cfg, journal, update_id, control, fetcher=download, clock=clock)
    from baton.startup import loading

    with loading():  # the handover's machinery: loaded only for a self-update
        from helper.self_update import ControlSocketProbe, HandoverSession, SelfUpdateRun

    return SelfUpdateRun(cfg, journal, update_id, control, fetcher=download, clock=clock, handover=HandoverSession,
                         probe=ControlSocketProbe(cfg))
