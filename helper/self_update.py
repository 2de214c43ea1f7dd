"""Replacing the supervisor itself: the helper's side of the handover (docs/handover.md).

Up to STAGING this is an ordinary update (``machine.UpdateRun``). Then:

SWITCHING   ``supervisor/current`` -> the new version.
RESTARTING  the helper listens on ``<run_dir>/handover-<id>.sock``, announces it in
            ``<run_dir>/handover.json``, and asks the running supervisor (PREPARE on
            ``<run_dir>/handover.sock``) for its state. The supervisor sends the agent
            table and its descriptors (STATE) and execs ``current`` in its own pid;
            the helper now holds the listening sockets, so clients queue, never refused.
WATCHING    the new supervisor says HELLO, gets the STATE and descriptors, adopts the
            agents and serves, and reports HEALTHY. The helper checks gRPC health and
            the version over the control socket itself, then sends COMMIT.

Any failure from SWITCHING on (no HELLO within ``handshake_timeout_s``, an exit, a
wrong protocol or version, UNHEALTHY, a failed check) rolls back: the link goes
back, the new process is killed, the old version is started (by systemd's restart
policy under systemd, by the helper otherwise) and must pass the same handshake.

What the helper holds and has asked of which process is one ``Custody`` value
(``baton.states.CUSTODY_TRANSITIONS``), not a set of flags: the rollback reads it
to decide between "the old supervisor never stopped, the link back is enough"
(UNTOUCHED) and "kill whatever runs and start the old version" (anything else).
A helper killed mid-handover leaves no custody; its successor
(:meth:`SelfUpdateRun._resume_after_crash`) looks at what runs instead.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import grpc

from baton import faults
from baton import handover as wire
from baton.agent_table import AgentTable
from baton.config import SUPERVISOR_COMPONENT, Config
from baton.errors import BatonError
from baton.journal import UpdateRecord
from baton.layout import START_LOG_ENV, START_LOG_NAME, ComponentLayout
from baton.log import logger
from baton.reasons import FailureReason, classify, message
from baton.serving import running_supervisor, serving_status, status_or_none
from baton.states import CUSTODY_TRANSITIONS, Custody, check_move
from baton.states import UpdateState as S
from baton.strict_modes import log_opener
from helper.bridge import Bridge
from helper.locks import ComponentBusy, ComponentLock
from helper.machine import UpdateRun
from helper.ports import (
    ClientFactory,
    Clock,
    Fetcher,
    HandoverFactory,
    JournalStore,
    SupervisorProbe,
    SupervisorProcess,
)
from helper.recovery import moved, switched_back

PREPARE_TIMEOUT_S = 30.0
KILL_WAIT_S = 10.0


class SupervisorDied(wire.HandoverError):
    pass


class Unhealthy(wire.HandoverError):
    pass


def _under_systemd() -> bool:
    return bool(os.environ.get("INVOCATION_ID"))


def process_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class HandoverSession:
    """The helper's custody of a supervisor's state and descriptors between two supervisor processes.

    Where the custody stands is one :class:`~baton.states.Custody` value, changed only by :meth:`_to`, which
    refuses a move that ``CUSTODY_TRANSITIONS`` does not list.
    """

    def __init__(self, cfg: Config, update_id: str, expect_version: str) -> None:
        self.cfg = cfg
        self.update_id = update_id
        self.path = cfg.run_dir / f"handover-{update_id}.sock"
        self.listener = wire.seqpacket_listener(self.path)
        self.state: wire.State | None = None
        self.fds: list[int] = []
        self.stdio: dict[str, int] = {}
        self.pid = 0
        self._custody = Custody.UNTOUCHED
        self.bridge: Bridge | None = None  # read-only answers on the held sockets (helper/bridge.py)
        self.announce(expect_version)

    @property
    def custody(self) -> Custody:
        return self._custody

    def _to(self, new: Custody) -> None:
        check_move(CUSTODY_TRANSITIONS, self._custody, new, f"handover {self.update_id}")
        logger.debug("handover {}: custody {} -> {}", self.update_id, self._custody.value, new.value)
        self._custody = new

    def announce(self, expect_version: str) -> None:
        wire.ActiveHandover(self.update_id, str(self.path), os.getpid(), expect_version, time.time()).write(
            self.cfg.run_dir)

    # ---- from the running supervisor -----------------------------------------------------------------------

    def take_state(self) -> None:
        """PREPARE -> STATE(+fds) -> EXEC. A supervisor that is not running leaves us the persisted table."""
        try:
            conn = wire.connect(self.cfg.run_dir / wire.SOCKET_NAME, timeout_s=5.0)
        except wire.PeerGone as e:
            logger.warning("handover: no running supervisor ({}); starting the current version myself", e)
            self.state_from_disk()
            self.start_supervisor()
            return
        self.pid = _control_pid(self.cfg)
        self._prepare_bridge()
        with conn:
            wire.send(conn, wire.Prepare(self.update_id))
            self._to(Custody.ASKED)  # unless it refuses, the supervisor now quiesces and execs whatever happens
            frame, fds = wire.recv(conn, PREPARE_TIMEOUT_S, "state")
            try:
                if isinstance(frame.message, wire.Refused):
                    self._to(Custody.UNTOUCHED)
                    raise wire.HandoverRefused(
                        f"the running supervisor refused to hand over: {frame.message.reason}")
                state = frame.expect(wire.State)
                wire.negotiate(frame.protocol)
                if state.pid <= 0:
                    raise wire.ProtocolError("handover message 'state' from the supervisor lacks its pid")
            except wire.HandoverError:
                wire.close_fds(fds)
                raise
            self._to(Custody.HOLDING)
            self.state, self.fds, self.pid = state, fds, state.pid
            self._dup_stdio()
            self._open_bridge()
            faults.crash_point("handover-state-received")
            wire.send(conn, wire.Exec())
            self._to(Custody.EXEC_SENT)
        logger.info("handover: got {} agents and {} descriptors from supervisor pid {}; it execs (or exits) now",
                    len(state.agents), len(fds), self.pid)
        faults.crash_point("handover-exec-sent")

    def expect_exit(self) -> None:
        """The process we took the state from exits instead of exec'ing (systemd restarts the unit): its end is
        no failure, and the next supervisor is systemd's to start; we wait for its HELLO."""
        self.pid = 0

    # ---- answering while no supervisor does (helper/bridge.py) -----------------------------------------------

    def _prepare_bridge(self) -> None:
        bridge = Bridge(self.cfg, self.update_id)
        try:
            bridge.prepare()
        except Exception as e:  # never a reason to stop the update: clients wait in the backlog instead
            logger.warning("handover: no read-only answers during the switch: {}", e)
            bridge.stop()
            return
        self.bridge = bridge

    def _open_bridge(self) -> None:
        if self.bridge is None or self.state is None:
            return
        # Not the control socket: helpers' restarts and watches there wait for the next process, as before.
        listening = [(d.name, fd) for d, fd in zip(self.state.fds, self.fds, strict=False)
                     if d.kind == "listen" and d.name != wire.CONTROL_LISTENER]
        try:
            self.bridge.serve(self.state, listening)
        except Exception as e:
            logger.warning("handover: no read-only answers during the switch: {}", e)
            self._close_bridge()

    def _close_bridge(self) -> None:
        """Before the sockets go to a supervisor process, or when the session ends."""
        if self.bridge is not None:
            self.bridge.stop()
            self.bridge = None

    def state_from_disk(self) -> None:
        """No state from a running supervisor: the persisted agent table, without descriptors."""
        wire.close_fds(self.fds)
        records = AgentTable(self.cfg.node.state_dir / "agents.json").load()
        self.state = wire.State(agents=tuple(records), fds=())
        self.fds = []
        self.stdio = {}

    def _dup_stdio(self) -> None:
        assert self.state is not None
        for desc, fd in zip(self.state.fds, self.fds, strict=False):
            if desc.kind == "stdio":
                self.stdio[desc.name] = fd

    # ---- starting a supervisor ourselves ---------------------------------------------------------------------

    def start_supervisor(self) -> None:
        """Without systemd nobody else will: start ``current`` detached, on the old supervisor's stdio."""
        if _under_systemd():
            logger.info("handover: leaving the start to systemd's restart policy")
            return
        launcher = ComponentLayout(self.cfg.node.install_root, "supervisor").current_link / "bin" / "supervisor"
        out = self.stdio.get("stdout")
        err = self.stdio.get("stderr")
        log = None
        if out is None:
            self.cfg.log_dir.mkdir(parents=True, exist_ok=True)
            log = open(self.cfg.log_dir / "supervisor.out", "ab", opener=log_opener)  # noqa: SIM115
        proc = subprocess.Popen([str(launcher), "run", "--config", str(self.cfg.source)], stdin=subprocess.DEVNULL,
                                stdout=out if out is not None else log, stderr=err if err is not None else log,
                                start_new_session=True, close_fds=True,
                                env={**os.environ, START_LOG_ENV: str(start_log_path(self.cfg))})
        if log is not None:
            log.close()
        self._to(Custody.SPAWNED)
        self.pid = proc.pid
        proc.returncode = 0
        logger.info("handover: started {} as pid {}", launcher, proc.pid)

    # ---- the handshake -------------------------------------------------------------------------------------

    def await_supervisor(self, expect_version: str, timeout_s: float) -> wire.Healthy:
        """HELLO -> STATE(+fds) -> HEALTHY, checked, -> COMMIT. Raises a HandoverError on any failure."""
        self.announce(expect_version)
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise wire.HandshakeTimeout(f"a handshake from supervisor {expect_version}", timeout_s)
            ready, _, _ = select.select([self.listener], [], [], min(left, 0.1))
            if ready:
                conn, _ = self.listener.accept()
                with conn:
                    if wire.peer_uid(conn) not in (0, os.getuid()):
                        continue
                    return self._handshake(conn, expect_version, deadline)
            if self.pid and not process_alive(self.pid):
                if self._custody in (Custody.UNTOUCHED, Custody.KILLED):
                    # nobody was asked to exec and we started nothing since: it died on its own
                    if _under_systemd():
                        self.pid = 0  # systemd's restart policy starts the next one
                    else:
                        self.start_supervisor()
                    continue
                raise SupervisorDied(f"supervisor pid {self.pid} exited before its handshake")

    def _refuse(self, conn: socket.socket, reason: str) -> None:
        with contextlib.suppress(OSError):
            wire.send(conn, wire.Refused(reason))

    def _handshake(self, conn: socket.socket, expect_version: str, deadline: float) -> wire.Healthy:
        try:
            frame, extra = wire.recv(conn, max(0.01, deadline - time.monotonic()), "hello")
            wire.close_fds(extra)
            hello = frame.expect(wire.Hello)
            self.pid = hello.pid
            protocol = wire.negotiate(frame.protocol)
        except (wire.HandoverRefused, wire.ProtocolError) as e:
            self._refuse(conn, str(e))
            raise
        if hello.version != expect_version:
            reason = f"supervisor {hello.version} answered; expected {expect_version}"
            self._refuse(conn, reason)
            raise wire.HandoverRefused(reason)
        faults.crash_point("handover-hello")
        if self.bridge is not None:
            self.bridge.stop_accepting()  # the sockets go on; the bridge answers what it accepted (below)
        if self.state is None:
            self.state_from_disk()
        assert self.state is not None
        kept = [(d, fd) for d, fd in zip(self.state.fds, self.fds, strict=False) if d.kind != "stdio"]
        self._to(Custody.HANDED)  # from here this process has (or may have) our state: a rollback kills it
        wire.send(conn, wire.State(agents=self.state.agents, fds=tuple(d for d, _ in kept),
                                   supervisor_version=self.state.supervisor_version, negotiated=protocol),
                  [fd for _, fd in kept])
        self._close_bridge()  # while the new process accepts: not in the clients' window
        frame, extra = wire.recv(conn, max(0.01, deadline - time.monotonic()), "health report")
        wire.close_fds(extra)
        if isinstance(frame.message, wire.Unhealthy):
            raise Unhealthy(f"supervisor {expect_version} reported unhealthy: {frame.message.reason}")
        report = frame.expect(wire.Healthy, "healthy")
        faults.crash_point("handover-healthy")
        self.check_serving(expect_version)
        wire.send(conn, wire.Commit())
        self._to(Custody.COMMITTED)
        logger.info("handover: supervisor {} pid {} is healthy and committed", expect_version, self.pid)
        return report

    def check_serving(self, expect_version: str) -> None:
        """Our own check over the control socket: SERVING, and the version we expect."""
        try:
            st, serving = serving_status(self.cfg.control_socket, timeout=10)
        except grpc.RpcError as e:
            raise Unhealthy(f"gRPC check of the new supervisor failed: {e.code().name}") from None
        if not serving:
            raise Unhealthy("gRPC health is not SERVING")
        if st.supervisor_version != expect_version:
            raise Unhealthy(f"GetStatus reports version {st.supervisor_version}, expected {expect_version}")

    # ---- rollback support ----------------------------------------------------------------------------------

    def kill_supervisor(self) -> None:
        """SIGKILL whatever supervisor we know of; the state and our copies of the descriptors stay with us."""
        self._to(Custody.KILLED)
        if self.pid and process_alive(self.pid):
            logger.warning("handover: killing supervisor pid {}", self.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            deadline = time.monotonic() + KILL_WAIT_S
            while process_alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.02)
        self.pid = 0  # under systemd, its restart policy starts the next one; we wait for its HELLO

    def close(self) -> None:
        self._close_bridge()
        if self._custody is Custody.CLOSED:
            return
        self._to(Custody.CLOSED)
        wire.ActiveHandover.clear(self.cfg.run_dir)
        self.listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        wire.close_fds(self.fds)
        self.fds = []
        self.stdio = {}


class ControlSocketProbe:
    """What answers on the control socket, and whether a pid lives: the real ``SupervisorProbe``."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def running(self) -> tuple[str, bool]:
        return running_supervisor(self.cfg)

    def pid(self) -> int:
        return _control_pid(self.cfg)

    def alive(self, pid: int) -> bool:
        return process_alive(pid)


class SelfUpdateRun(UpdateRun):
    """An update of the supervisor component: the handover replaces the agent restart.

    Beside an agent update's collaborators it is given the supervisor's process side (``handover``: a
    ``HandoverSession`` per custody) and a ``probe`` of what runs (``helper/ports.py``, wired in
    helper/wiring.py).
    """

    def __init__(self, cfg: Config, journal: JournalStore, update_id: str, control: ClientFactory, *,
                 fetcher: Fetcher, clock: Clock, handover: HandoverFactory, probe: SupervisorProbe) -> None:
        super().__init__(cfg, journal, update_id, control, fetcher=fetcher, clock=clock)
        self.handover = handover
        self.probe = probe
        self.session: SupervisorProcess | None = None

    def _supervisor_log_tail(self, max_bytes: int = 2048) -> str:
        """The failed version's own start-up output if it left any (a broken release), else its log."""
        return start_log_tail(self.cfg, max_bytes) or self._agent_log_tail("supervisor", max_bytes)

    def _link_new(self) -> None:
        """``current`` -> the new version, with no start log left from an earlier failure to mislead."""
        clear_start_log(self.cfg)
        self.installer.layout.switch(self.rec.request.version)

    def _switch_and_check(self) -> None:
        req = self.rec.request
        if not self._switch():  # after it the supervisor refuses a cancel
            return
        t0 = self.clock.monotonic()
        try:
            self.session = self.handover(self.cfg, self.update_id, req.version)
            self.session.take_state()
            self._move(S.WATCHING, timings=self._timed("handover", t0))
            t0 = self.clock.monotonic()
            self.session.await_supervisor(req.version, self.cfg.update.handshake_timeout_s)
            self.rec = replace(self.rec, timings=self._timed("handshake", t0))
        except (wire.HandoverError, OSError) as e:
            self._rollback(f"{type(e).__name__}: {e}", classify(e))
            return
        self.session.close()
        self._commit()

    def _rollback(self, detail: str, why: FailureReason) -> None:
        req = self.rec.request
        t0 = self.clock.monotonic()
        if self.rec.state is not S.ROLLING_BACK:
            self._move(S.ROLLING_BACK, detail, error=detail, reason=why.value)
        old = self.rec.from_version
        layout = self.installer.layout
        last_log = self._supervisor_log_tail()
        notes: list[str] = []
        if old and layout.is_installed(old):
            layout.switch(old)
        session = self.session
        if session is None:
            self._recover_without_session(old, notes)
        elif session.custody is Custody.UNTOUCHED and session.pid and self.probe.alive(session.pid):
            logger.info("handover: the old supervisor never stopped; switching the link back is enough")
        else:
            session.kill_supervisor()
            session.start_supervisor()
            try:
                session.await_supervisor(old, self.cfg.update.handshake_timeout_s)
            except (wire.HandoverError, OSError) as e:
                notes.append(f"the old version {old} did not come back cleanly either: {e}")
        if session is not None:
            session.close()
        self.installer.discard_version(req.version)
        if notes:
            why = FailureReason.ROLLBACK_FAILED
        error = "; ".join([detail, *notes])
        if why is not FailureReason.CANCELLED:
            error = message(why, error)
        self._move(S.ROLLED_BACK, error=error, reason=why.value, rolled_back=True, success=False,
                   finished_at=self.clock.time(), last_log=last_log, timings=self._timed("rollback", t0))
        self._settle()

    def _recover_without_session(self, old: str, notes: list[str]) -> None:
        """A helper that died mid-handover left no custody: look at what runs now and make it whole."""
        wire.ActiveHandover.clear(self.cfg.run_dir)
        version, serving = self.probe.running()
        if version == old and serving:
            return
        session = self.handover(self.cfg, self.update_id, old)
        self.session = session
        if version:
            session.pid = self.probe.pid()
            session.kill_supervisor()
        session.state_from_disk()
        session.start_supervisor()
        try:
            session.await_supervisor(old, self.cfg.update.handshake_timeout_s)
        except (wire.HandoverError, OSError) as e:
            notes.append(f"the old version {old} did not come back cleanly: {e}")

    def run(self) -> UpdateRecord:
        if not self.rec.final and self.rec.state in (S.RESTARTING, S.WATCHING, S.SWITCHING):
            return self._resume_after_crash()
        return super().run()

    def _resume_after_crash(self) -> UpdateRecord:
        """Killed mid-handover: commit if the new version is up and healthy, else roll back."""
        self.rec = replace(self.rec, attempts=self.rec.attempts + 1, helper_pid=os.getpid())
        self.journal.save(self.rec)
        req = self.rec.request
        deadline = self.clock.monotonic() + self.cfg.update.handshake_timeout_s
        version, serving = "", False
        while self.clock.monotonic() < deadline:
            version, serving = self.probe.running()
            if serving:
                break
            self.clock.sleep(0.2)
        wire.ActiveHandover.clear(self.cfg.run_dir)
        if version == req.version and serving and self.installer.layout.current_version() == req.version:
            logger.info("update {}: supervisor {} runs and serves; committing", self.update_id, version)
            # through the table, never around it: the restart and the watch happened, as observed now
            if self.rec.state is S.SWITCHING:
                self._move(S.RESTARTING, "recovery")
            if self.rec.state is S.RESTARTING:
                self._move(S.WATCHING, "recovery")
            self._commit()
        else:
            self._rollback(f"the helper was interrupted during the handover (running: {version or 'nothing'})",
                           FailureReason.HELPER_CRASHED)
        return self.rec


def start_log_path(cfg: Config) -> Path:
    return cfg.log_dir / START_LOG_NAME


def clear_start_log(cfg: Config) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(start_log_path(cfg))


def start_log_tail(cfg: Config, max_bytes: int = 2048) -> str:
    """What a supervisor that could not start wrote to the start log (manager/build/release.py's launcher)."""
    try:
        with open(start_log_path(cfg), "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - max_bytes))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _control_pid(cfg: Config) -> int:
    st = status_or_none(cfg.control_socket)
    return int(st.pid) if st is not None else 0


class SelfUpdateError(BatonError):
    pass


def rollback_supervisor(cfg: Config, to: str | None = None) -> str:
    """``helper --rollback``: the previous good supervisor version, started, whether the current one runs or not.

    Runs from whichever release's ``bin/helper`` the operator calls (docs/releases.md): it
    needs nothing from the release it switches to or from.
    """
    with switched_back(cfg, "supervisor", to, before_switch=lambda: clear_start_log(cfg)) as (cur, target):
        session = HandoverSession(cfg, f"rollback-{os.getpid()}", target)
        try:
            session.take_state()
            session.await_supervisor(target, cfg.update.handshake_timeout_s)
        except (wire.HandoverError, OSError) as e:
            tail = start_log_tail(cfg)
            raise SelfUpdateError(f"supervisor: switched {cur} -> {target}, but it did not come up: {e}"
                                  + (f"; its output ends:\n{tail}" if tail else "")) from None
        finally:
            session.close()
    return f"supervisor: {moved(cur, target)}; running (pid {session.pid})"


def restart_supervisor(cfg: Config, *, after_exit: bool = False) -> str:
    """``supervisor restart-daemon``: the running supervisor starts again through the handover, agents kept.

    The same version (``current``) with the config file as it is now: the running process gives its agent table
    and descriptors to us and execs ``current`` in its own pid (``after_exit``: it exits, and systemd, which is
    restarting the unit, starts the next process); the next one takes them, adopts every agent (same pids, the
    same output pipes and notify sockets) and must pass the self-update's handshake. If it does not, we kill
    it and start ``current`` again (systemd does under systemd) with what we hold, as a rollback does.

    Raises:
        SelfUpdateError: no supervisor runs, another update of the supervisor holds its lock, the running one
            refused (nothing was stopped), or no supervisor came up healthy (its start log is quoted).
    """
    layout = ComponentLayout(cfg.node.install_root, SUPERVISOR_COMPONENT)
    try:
        lock = ComponentLock(cfg.node.state_dir, SUPERVISOR_COMPONENT).acquire()
    except ComponentBusy as e:
        raise SelfUpdateError(f"supervisor: not restarted: {e}") from None
    try:
        version = layout.current_version()
        if not after_exit and not running_supervisor(cfg)[0]:
            raise SelfUpdateError(f"supervisor: not restarted: no supervisor answers on {cfg.control_socket}")
        if version is None:
            raise SelfUpdateError(f"supervisor: not restarted: no supervisor version is installed in {layout.root} "
                                  "(`supervisor install-self`); only a supervisor run from there restarts in place")
        clear_start_log(cfg)
        session = HandoverSession(cfg, f"restart-{os.getpid()}", version)
        try:
            _restart_through(session, version, after_exit)
        finally:
            session.close()
    finally:
        lock.release()
    return f"supervisor {version}: restarted (pid {session.pid}); every agent kept"


def _restart_through(session: HandoverSession, version: str, after_exit: bool) -> None:
    timeout_s = session.cfg.update.handshake_timeout_s
    try:
        session.take_state()
        if after_exit:
            session.expect_exit()
        session.await_supervisor(version, timeout_s)
        return
    except (wire.HandoverError, OSError) as e:
        if session.custody is Custody.UNTOUCHED and session.pid and process_alive(session.pid):
            raise SelfUpdateError(f"supervisor: not restarted: {e}") from None
        first = e
    logger.warning("restart: {}; starting supervisor {} again with the agents we hold", first, version)
    session.kill_supervisor()
    session.start_supervisor()
    try:
        session.await_supervisor(version, timeout_s)
    except (wire.HandoverError, OSError) as e:
        tail = start_log_tail(session.cfg)
        raise SelfUpdateError(f"supervisor: the restart failed ({first}) and so did a second start: {e}"
                              + (f"; its output ends:\n{tail}" if tail else "")) from None
