"""The supervisor's processes during a self-update: the running one, the one it execs or the helper starts,
the handshake each must pass, and a kill at any handover crash point (docs/handover.md)."""

from __future__ import annotations

from pathlib import Path

from baton import handover as wire
from baton.config import SUPERVISOR_COMPONENT, Config
from baton.layout import ComponentLayout
from baton.states import CUSTODY_TRANSITIONS, Custody, check_move
from helper.self_update import SupervisorDied, Unhealthy
from tests.fakes.clock import FakeClock
from tests.fakes.crash import Crash

GOOD = "good"
EXITS = "exits"  # exits at start: SupervisorDied
HANGS = "hangs"  # never says HELLO: HandshakeTimeout
OLD_PROTOCOL = "old_protocol"  # says HELLO in a protocol this helper does not speak: HandoverRefused
UNHEALTHY = "unhealthy"  # takes the state, then reports UNHEALTHY


class SupervisorHost:
    """At most one supervisor process (``pid``, 0 for none), its version and whether it serves.

    ``behaviour[version]``: how a process of that version passes the handshake. ``refuse_prepare``: the running
    supervisor refuses to hand over (and goes on serving). ``crash_at``: the helper is killed when it reaches
    that handover step (one shot). The probe's answers (:meth:`running`, :meth:`pid`, :meth:`alive`) make it a
    ``SupervisorProbe`` too.
    """

    def __init__(self, install_root: Path, clock: FakeClock) -> None:
        self.layout = ComponentLayout(install_root, SUPERVISOR_COMPONENT)
        self.clock = clock
        self.behaviour: dict[str, str] = {}
        self.refuse_prepare = False
        self.crash_at = ""
        self.pid = 0
        self.version = ""
        self.serving = False
        self._next_pid = 500
        self.sessions: list[FakeHandover] = []
        self.starts = 0

    def boot(self, version: str) -> None:
        """A supervisor of ``version`` runs and serves (the host before the update)."""
        self._run(version)
        self.serving = True

    def _run(self, version: str) -> None:
        self._next_pid += 1
        self.pid, self.version, self.serving = self._next_pid, version, False

    def point(self, step: str) -> None:
        if self.crash_at == step:
            self.crash_at = ""
            raise Crash(f"killed at {step}")

    def session(self, cfg: Config, update_id: str, expect_version: str) -> FakeHandover:
        s = FakeHandover(self, update_id)
        self.sessions.append(s)
        return s

    # ---- SupervisorProbe ----------------------------------------------------------------------------------

    def running(self) -> tuple[str, bool]:
        return (self.version, True) if self.pid and self.serving else ("", False)

    def pid_of_serving(self) -> int:
        return self.pid if self.serving else 0

    def alive(self, pid: int) -> bool:
        return bool(pid) and pid == self.pid


class _Probe:
    def __init__(self, host: SupervisorHost) -> None:
        self.host = host

    def running(self) -> tuple[str, bool]:
        return self.host.running()

    def pid(self) -> int:
        return self.host.pid_of_serving()

    def alive(self, pid: int) -> bool:
        return self.host.alive(pid)


def probe(host: SupervisorHost) -> _Probe:
    return _Probe(host)


class FakeHandover:
    """A ``SupervisorProcess``: custody moves through ``CUSTODY_TRANSITIONS`` as ``HandoverSession``'s do."""

    def __init__(self, host: SupervisorHost, update_id: str) -> None:
        self.host = host
        self.update_id = update_id
        self.pid = 0
        self._custody = Custody.UNTOUCHED
        self.from_disk = False

    @property
    def custody(self) -> Custody:
        return self._custody

    def _to(self, new: Custody) -> None:
        check_move(CUSTODY_TRANSITIONS, self._custody, new, f"handover {self.update_id}")
        self._custody = new

    def take_state(self) -> None:
        h = self.host
        if not h.serving:  # nobody to ask: the persisted table, and a supervisor we start
            self.state_from_disk()
            self.start_supervisor()
            return
        self.pid = h.pid
        self._to(Custody.ASKED)
        if h.refuse_prepare:
            self._to(Custody.UNTOUCHED)
            raise wire.HandoverRefused("the running supervisor refused to hand over: an update of app runs")
        self._to(Custody.HOLDING)
        h.point("handover-state-received")
        self._to(Custody.EXEC_SENT)
        h.version, h.serving = h.layout.current_version() or "", False  # the same pid execs ``current``
        h.point("handover-exec-sent")

    def state_from_disk(self) -> None:
        self.from_disk = True

    def start_supervisor(self) -> None:
        self._to(Custody.SPAWNED)
        self.host.starts += 1
        self.host._run(self.host.layout.current_version() or "")
        self.pid = self.host.pid

    def await_supervisor(self, expect_version: str, timeout_s: float) -> object:
        h = self.host
        how = h.behaviour.get(h.version, GOOD)
        if not h.pid or how == HANGS:
            h.clock.sleep(timeout_s)
            raise wire.HandshakeTimeout(f"a handshake from supervisor {expect_version}", timeout_s)
        if how == EXITS:
            pid, h.pid, h.version = h.pid, 0, ""
            raise SupervisorDied(f"supervisor pid {pid} exited before its handshake")
        if how == OLD_PROTOCOL:
            raise wire.HandoverRefused(f"peer speaks handover protocol 0; this side needs "
                                       f"{wire.MIN_PROTOCOL_VERSION}..{wire.PROTOCOL_VERSION}")
        if h.version != expect_version:
            raise wire.HandoverRefused(f"supervisor {h.version} answered; expected {expect_version}")
        h.point("handover-hello")
        self.pid = h.pid
        self._to(Custody.HANDED)
        if how == UNHEALTHY:
            raise Unhealthy(f"supervisor {expect_version} reported unhealthy: cannot bind its listener")
        h.point("handover-healthy")
        self._to(Custody.COMMITTED)
        h.serving = True
        return None

    def kill_supervisor(self) -> None:
        self._to(Custody.KILLED)
        h = self.host
        h.pid, h.version, h.serving = 0, "", False
        self.pid = 0

    def close(self) -> None:
        if self._custody is not Custody.CLOSED:
            self._to(Custody.CLOSED)
