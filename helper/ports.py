"""The seams of the helper's drivers: what the update machine and the self-update are given, not build.

``machine.UpdateRun`` and ``self_update.SelfUpdateRun`` take each collaborator below as an argument; the real
ones are put together in one place, ``helper/wiring.py``, and the fast tier's fakes (``tests/fakes/``) stand in
for them so that every step x failure x crash point runs in-process (``tests/test_update_matrix.py``).
Nothing here is imported at run time beyond ``typing``: the helper's start pays for no seam.

==================  ===========================================  ====================================
seam                real (helper/wiring.py)                      fake (tests/fakes/)
==================  ===========================================  ====================================
Clock               SystemClock                                  FakeClock
JournalStore        baton.journal.Journal                        MemoryJournal (crashes at a write)
Fetcher             helper.download.download                     FakeFetcher (each download failure)
SupervisorClient    helper.control.SupervisorControl             FakeSupervisor (agents' health)
SupervisorProcess   helper.self_update.HandoverSession           FakeHandover (start, handshake, kill)
SupervisorProbe     helper.self_update.ControlSocketProbe        FakeHandover's probe
==================  ===========================================  ====================================
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from baton.agent_channel import AgentView
    from baton.config import Config
    from baton.journal import UpdateRecord
    from baton.states import Custody
    from helper.download import DownloadedFile, DownloadLimits, DownloadProgress, FileIdentity


class Clock(Protocol):
    """Time for timings, deadlines and polls (``time``'s functions)."""

    def monotonic(self) -> float: ...

    def time(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class JournalStore(Protocol):
    """The update's record, durable across a kill (``baton.journal.Journal``); ``save`` is the only write of a
    state, and the record it is given was moved through the transition table."""

    def load(self, update_id: str) -> UpdateRecord: ...

    def save(self, rec: UpdateRecord) -> None: ...

    def write_progress(self, update_id: str, progress: dict[str, Any]) -> None: ...

    def cancel_requested(self, update_id: str) -> bool: ...


class Fetcher(Protocol):
    """Bring a package's bytes into ``dest`` (``helper.download.download``: its arguments and its errors, every
    one a ``helper.download.DownloadError``)."""

    def __call__(self, url: str, dest: Path, *, expected_size: int, limits: DownloadLimits,
                 progress: Callable[[DownloadProgress], None] | None = None, resume: bool = True,
                 owned: FileIdentity | None = None,
                 created: Callable[[FileIdentity], None] | None = None) -> DownloadedFile: ...


class SupervisorClient(Protocol):
    """What the helper asks the running supervisor about an agent (``helper.control.SupervisorControl``).

    Raises ``helper.control_errors.SupervisorUnavailable`` when the supervisor does not answer and
    ``HealthCheckFailed`` when the agent does not become or stay healthy.
    """

    def restart(self, name: str) -> AgentView: ...

    def stop(self, name: str) -> AgentView: ...

    def wait_healthy(self, name: str, version: str, ready_timeout_s: float, window_s: float,
                     check: Callable[[], None] | None = None) -> AgentView: ...

    def close(self) -> None: ...


class SupervisorProcess(Protocol):
    """The helper's hold on the supervisor process during a self-update (``helper.self_update.HandoverSession``):
    take the running one's state, start one, wait for its handshake, kill it. Failures are
    ``baton.handover.HandoverError`` subclasses or ``OSError``."""

    pid: int

    @property
    def custody(self) -> Custody: ...

    def take_state(self) -> None: ...

    def state_from_disk(self) -> None: ...

    def start_supervisor(self) -> None: ...

    def await_supervisor(self, expect_version: str, timeout_s: float) -> object: ...

    def kill_supervisor(self) -> None: ...

    def close(self) -> None: ...


class SupervisorProbe(Protocol):
    """Looking at what runs, without custody (a helper resuming after a crash)."""

    def running(self) -> tuple[str, bool]:
        """(version, serving) of the supervisor answering on the control socket; ("", False) if none."""
        ...

    def pid(self) -> int:
        """The pid of the supervisor answering on the control socket; 0 if none."""
        ...

    def alive(self, pid: int) -> bool: ...


ClientFactory = Callable[[], SupervisorClient]
"""The supervisor client is made when an update first needs it: its imports are off the download's path."""
HandoverFactory = Callable[["Config", str, str], SupervisorProcess]
"""(config, update or session id, the version expected to answer) -> a new custody of the supervisor."""
