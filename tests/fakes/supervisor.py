"""The running supervisor as the helper sees it during an agent update: restart, stop, judge health."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from baton.agent_channel import AgentView
from baton.layout import ComponentLayout
from baton.reasons import FailureReason
from baton.states import AgentState
from helper.control_errors import HealthCheckFailed, SupervisorUnavailable
from tests.fakes.clock import FakeClock

GOOD = "good"
EXITS = "exits"  # exits at once: NEW_VERSION_EXITED
NEVER_READY = "never_ready"  # runs but never says READY: NEW_VERSION_NOT_READY after the ready timeout
DIES_IN_WINDOW = "dies_in_window"  # ready, then exits inside the health window: NEW_VERSION_EXITED


class FakeSupervisor:
    """A ``SupervisorClient`` (and its factory: ``client``) over a model of the agents.

    A restart runs whatever version ``current`` names then, as the real supervisor does, and that version
    writes a line to the agent's log; how it behaves is ``behaviour[version]``. ``unavailable_calls``: the
    numbers (from 1) of the calls the supervisor does not answer; ``down``: it answers none.
    """

    def __init__(self, install_root: Path, log_dir: Path, clock: FakeClock) -> None:
        self.install_root = install_root
        self.log_dir = log_dir
        self.clock = clock
        self.behaviour: dict[str, str] = {}
        self.running: dict[str, str] = {}  # agent -> the version its process runs
        self.pid = 1000
        self.calls: list[str] = []
        self.unavailable_calls: set[int] = set()
        self.down = False
        self.closed = 0

    def client(self) -> FakeSupervisor:
        return self

    def close(self) -> None:
        self.closed += 1

    def _answer(self, call: str) -> None:
        self.calls.append(call)
        if self.down or len(self.calls) in self.unavailable_calls:
            raise SupervisorUnavailable(f"supervisor at fake: {call} failed: no answer")

    def _view(self, name: str) -> AgentView:
        version = self.running.get(name, "")
        return AgentView(name=name, state=AgentState.RUNNING if version else AgentState.STOPPED, pid=self.pid,
                         version=version)

    def restart(self, name: str) -> AgentView:
        self._answer(f"restart {name}")
        version = ComponentLayout(self.install_root, name).current_version() or ""
        self.running[name] = version
        self.pid += 1
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.log", "a") as f:  # what the helper quotes of a failed version
            f.write(f"{name} {version} starting\n")
        return self._view(name)

    def stop(self, name: str) -> AgentView:
        self._answer(f"stop {name}")
        self.running.pop(name, None)
        return self._view(name)

    def wait_healthy(self, name: str, version: str, ready_timeout_s: float, window_s: float,
                     check: Callable[[], None] | None = None) -> AgentView:
        self._answer(f"wait_healthy {name} {version}")
        if check is not None:
            check()
        running = self.running.get(name, "")
        how = self.behaviour.get(running, GOOD)
        if running != version:
            raise HealthCheckFailed(f"agent {name} runs {running or 'nothing'}, expected {version}")
        if how == EXITS:
            self.running.pop(name)
            raise HealthCheckFailed(f"agent {name} {version} exited at start: last exit status 3",
                                    FailureReason.NEW_VERSION_EXITED)
        if how == NEVER_READY:
            self.clock.sleep(ready_timeout_s)
            raise HealthCheckFailed(f"agent {name} {version} not ready within {ready_timeout_s:g}s (still starting)")
        if how == DIES_IN_WINDOW:
            self.clock.sleep(window_s / 2)
            self.running.pop(name)
            raise HealthCheckFailed(f"agent {name} {version} died within the {window_s:g}s health window",
                                    FailureReason.NEW_VERSION_EXITED)
        self.clock.sleep(window_s)
        return self._view(name)
