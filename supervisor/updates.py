"""The supervisor's side of updates: admit a push, spawn the helper, watch it, show progress.

``PushUpdate`` checks the request (component, version, downgrade, one update
per component), writes the journal record (REQUESTED) and spawns a helper
process in its own session; it returns the update id at once. The supervisor
watches each helper through a pidfd: a helper that dies before its update
reaches a final state is started again, and the new one finishes or rolls back
what the journal says. A supervisor that starts and finds unfinished updates
does the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc

from baton import durable, reasons
from baton.config import SUPERVISOR_COMPONENT, Config, trusted_keys_problem
from baton.errors import clip
from baton.journal import (
    CANCEL_SIGNAL,
    JOURNAL_FILE,
    Ended,
    Journal,
    JournalError,
    UpdateRecord,
    UpdateRequestRecord,
    check_update_id,
    valid_update_id,
)
from baton.layout import ComponentLayout
from baton.log import logger
from baton.pb import common_pb2, daemon_pb2
from baton.states import PRE_SWITCH, UpdateState
from supervisor.dirwatch import watch_dir
from supervisor.own_layout import helper_argv, running_from_layout
from supervisor.ports import Clock, HelperLauncher, ProcessDriver, ProcessWatch, RecordReader, StandbyHelpers
from supervisor.update_totals import UpdateTotals

MAX_HELPER_STARTS = 5
RESPAWN_DELAY_S = 0.5
WATCH_POLL_S = 0.1
HELPER_EXIT_WAIT_S = 5.0
HELPER_ANNOUNCE_S = 15.0
CANCEL_WAIT_S = 5.0
STANDBY_START_DELAY_S = 1.0  # after start: the supervisor's own start-up is not slowed by the standby's

_STATE_PB = {s: getattr(common_pb2, f"UPDATE_STATE_{s.name}") for s in UpdateState}


async def _woken_or_poll(woken: asyncio.Event) -> None:
    """Until ``woken`` is set, at most WATCH_POLL_S: the bounded fallback if an event is missed."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(woken.wait(), WATCH_POLL_S)
    woken.clear()


def update_status(rec: UpdateRecord, progress: dict[str, object]) -> daemon_pb2.UpdateStatus:
    return daemon_pb2.UpdateStatus(
        update_id=rec.update_id,
        component=rec.component,
        from_version=rec.from_version,
        to_version=rec.to_version,
        state=_STATE_PB[rec.state],
        step=rec.state.value,
        bytes_done=int(progress.get("bytes_done", 0)),  # type: ignore[call-overload]
        bytes_total=int(progress.get("bytes_total", rec.request.size)),  # type: ignore[call-overload]
        rate_bytes_per_second=float(progress.get("rate_bytes_per_second", 0.0)),  # type: ignore[arg-type]
        finished=rec.final and rec.settled,
        success=rec.success,
        rolled_back=rec.rolled_back,
        error=rec.error,
        timings=[common_pb2.StepTiming(step=k, seconds=v) for k, v in rec.timings.items()],
        updated_at=rec.updated_at,
        last_log=rec.last_log,
        reason=reasons.to_pb(rec.reason),  # type: ignore[arg-type]
    )


def update_result(rec: UpdateRecord, node_id: str) -> common_pb2.UpdateResult:
    return common_pb2.UpdateResult(
        update_id=rec.update_id,
        node_id=node_id,
        component=rec.component,
        from_version=rec.from_version,
        to_version=rec.to_version,
        success=rec.success,
        rolled_back=rec.rolled_back,
        error=rec.error,
        timings=[common_pb2.StepTiming(step=k, seconds=v) for k, v in rec.timings.items()],
        state=_STATE_PB[rec.state],
        started_at=rec.created_at,
        finished_at=rec.finished_at,
        last_log=rec.last_log,
        reason=reasons.to_pb(rec.reason),  # type: ignore[arg-type]
    )


class HelperProcess:
    """A helper we started or found running after an exec (maybe still our child), and its watch."""

    def __init__(self, update_id: str, pid: int, transient_unit: bool = False) -> None:
        self.update_id = update_id
        self.pid = pid
        self.transient_unit = transient_unit  # pid is systemd-run's client; the helper runs in its own unit
        self.watch: ProcessWatch | None = None


class UpdateManager:
    """Its collaborators (``supervisor/ports.py``) are given: ``processes`` watches helpers, ``helpers`` starts
    and recognises them, ``clock`` times respawns and waits, ``reader`` reads records and progress, ``standby``
    (if any) keeps a helper loaded ahead of the next update; ``journal`` is the state directory's unless one is
    given."""

    def __init__(self, cfg: Config, *, processes: ProcessDriver, clock: Clock, helpers: HelperLauncher,
                 reader: RecordReader, standby: StandbyHelpers | None = None,
                 journal: Journal | None = None) -> None:
        self.cfg = cfg
        self.processes = processes
        self.clock = clock
        self.launcher = helpers
        self.reader = reader
        self.standby = standby
        self.journal = journal or Journal(cfg.node.state_dir)
        self.totals = UpdateTotals(cfg.node.state_dir)
        self.active: dict[str, str] = {}
        self.helpers: dict[str, HelperProcess] = {}
        self.starts: dict[str, int] = {}
        self._loop = asyncio.get_running_loop()
        self._waiters: set[asyncio.Event] = set()  # one per WatchUpdate stream or CancelUpdate call

    # ---- start-up ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Resume every update a killed helper or supervisor left unfinished; prune old settled records."""
        self.prune_journal()
        if self.standby is not None:
            self.standby.start()
        for rec in self.journal.unfinished():
            self.active[rec.component] = rec.update_id
            if self._watch_running_helper(rec):
                continue
            logger.warning("update {} of {} is unfinished ({}); starting a helper to finish it",
                           rec.update_id, rec.component, rec.state.value)
            self._spawn(rec.update_id)
        if self.standby is not None:
            self.clock.call_later(STANDBY_START_DELAY_S, self._refill_standby)

    def _refill_standby(self) -> None:
        """A standby for the next update, once no helper runs (its start would take an update's CPU)."""
        if self.standby is not None and not self.helpers:
            self.standby.refill()

    def _watch_running_helper(self, rec: UpdateRecord) -> bool:
        """A helper that outlived the previous supervisor process (a self-update's) is watched, not doubled."""
        if not rec.helper_pid or not self.launcher.is_running(rec.helper_pid, rec.update_id,
                                                                  journaled_at=rec.updated_at):
            return False
        helper = HelperProcess(rec.update_id, rec.helper_pid)
        if not self._watch(helper):
            return False
        logger.info("update {}: watching its running helper pid {}", rec.update_id, rec.helper_pid)
        return True

    def refused_because(self) -> str:
        """Why every update is refused now ("" when none is): broken trust material, named by its key.

        Judged afresh each time, so a key restored on disk takes effect at the next push without a restart.
        """
        problem = trusted_keys_problem(self.cfg)
        return f"{problem} ({reasons.FailureReason.TRUSTED_KEYS_BROKEN.value})" if problem is not None else ""

    # ---- RPCs ----------------------------------------------------------------------------------------

    async def push(self, req: daemon_pb2.UpdateRequest, context: grpc.aio.ServicerContext
                   ) -> daemon_pb2.UpdateAccepted:
        # Imported when an update comes, not at start: admission brings the signature code and hashlib (about
        # 1 MiB resident), which a supervisor that is never updated would carry for nothing.
        import uuid

        from baton.admission import REFUSAL_METADATA_KEY, Held, UnknownComponent, UpdateRefused, check_request

        running = self.active.get(req.component)
        if running is not None:
            running = await self._still_running(running)
        if running is not None:
            await context.abort(grpc.StatusCode.ABORTED,
                                f"update {running} of {req.component} is still running; try again when it ends")
        if refused := self.refused_because():  # refused here, not by a helper spawned to fail
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"updates are refused: {refused}",
                                trailing_metadata=((REFUSAL_METADATA_KEY,
                                                    reasons.FailureReason.TRUSTED_KEYS_BROKEN.value),))
        if req.update_id:
            try:
                check_update_id(req.update_id)
            except JournalError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        try:
            check_request(self.cfg, component=req.component, version=req.version, download_url=req.download_url,
                          sha256=req.sha256, size=req.size, signature=req.signature, node_id=req.node_id,
                          allow_downgrade=req.allow_downgrade, force=req.force, reinstall=req.reinstall)
            if req.component == SUPERVISOR_COMPONENT and not running_from_layout(self.cfg):
                raise UpdateRefused(f"this supervisor does not run from {self.cfg.node.install_root}/supervisor, "
                                    "so it cannot replace itself; install it with `supervisor install-self`")
        except UnknownComponent as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except Held as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e),
                                trailing_metadata=((REFUSAL_METADATA_KEY, "held"),))
        except UpdateRefused as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        update_id = req.update_id or uuid.uuid4().hex[:16]
        layout = ComponentLayout(self.cfg.node.install_root, req.component)
        rec = UpdateRecord(
            update_id=update_id,
            request=UpdateRequestRecord(
                node_id=req.node_id or self.cfg.node.id, component=req.component, version=req.version,
                download_url=req.download_url, sha256=req.sha256.lower(), signature=req.signature, size=req.size,
                allow_downgrade=req.allow_downgrade, force=req.force, reinstall=req.reinstall,
            ),
            from_version=layout.current_version() or "",
            from_dir=layout.current_dir_name() or "",
        )
        try:
            self.journal.create(rec)
        except JournalError as e:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(e))
        self.active[req.component] = update_id
        logger.info("update {} accepted: {} {} -> {}", update_id, req.component, rec.from_version or "-",
                    req.version)
        self._spawn(update_id)
        return daemon_pb2.UpdateAccepted(update_id=update_id)

    async def _still_running(self, update_id: str) -> str | None:
        """A settled update's helper is about to exit: wait for it briefly rather than refuse."""
        rec = await self._load(update_id)
        if rec is None or not (rec.final and rec.settled):
            return update_id
        deadline = self.clock.monotonic() + HELPER_EXIT_WAIT_S
        while update_id in self.helpers and self.clock.monotonic() < deadline:
            await self.clock.sleep(0.02)
        return update_id if update_id in self.helpers else None

    async def _load(self, update_id: str) -> UpdateRecord | None:
        try:
            data = await self.reader.read(self.journal.path(update_id))
            return UpdateRecord.from_json(json.loads(data))
        except (JournalError, OSError, ValueError, KeyError, TypeError):
            return None

    async def _progress(self, update_id: str) -> dict[str, object]:
        try:
            return dict(json.loads(await self.reader.read(self.journal.progress_path(update_id))))
        except (OSError, ValueError):
            return {}

    async def get(self, update_id: str, context: grpc.aio.ServicerContext) -> daemon_pb2.UpdateStatus:
        rec = await self._load(update_id)
        if rec is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no update {update_id!r}")
        assert rec is not None
        return update_status(rec, await self._progress(update_id))

    async def cancel(self, update_id: str, context: grpc.aio.ServicerContext) -> daemon_pb2.UpdateStatus:
        """Ask the update's helper to stop (docs/protocols.md, "Cancel"); a final update is returned unchanged.

        Before SWITCHING the helper ends it FAILED ("cancelled"), from SWITCHING on it rolls back. A self-update
        past STAGING is refused: the handover cannot be interrupted safely, and it commits or rolls back on its
        own. Returns once the update is final, or after ``CANCEL_WAIT_S`` with the state it is in.
        """
        rec = await self._load(update_id)
        if rec is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no update {clip(update_id)!r}")
        assert rec is not None
        if rec.final:
            return update_status(rec, await self._progress(update_id))
        if rec.component == SUPERVISOR_COMPONENT and rec.state not in PRE_SWITCH:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"update {update_id} replaces the supervisor and is {rec.state.value}: the handover "
                                "cannot be interrupted safely; it commits or rolls back on its own")
        self.journal.request_cancel(update_id)
        rec = await self._load(update_id) or rec  # read after the request: a pid journaled since has its handler
        self._signal_helper(rec)
        logger.warning("update {} of {}: cancel requested in state {}", update_id, rec.component, rec.state.value)
        deadline = self.clock.monotonic() + CANCEL_WAIT_S
        with self._wakeups(update_id) as woken:
            while not (rec.final and rec.settled) and self.clock.monotonic() < deadline:
                await _woken_or_poll(woken)
                rec = await self._load(update_id) or rec
        return update_status(rec, await self._progress(update_id))

    def _signal_helper(self, rec: UpdateRecord) -> None:
        """Wake the helper the journal names (it installs its handler before it journals its pid)."""
        if not rec.helper_pid:
            return  # not started yet: it reads the cancel file before its first step
        self.launcher.signal(rec.helper_pid, rec.update_id, CANCEL_SIGNAL, journaled_at=rec.updated_at)

    async def recent(self, limit: int, component: str) -> daemon_pb2.ListUpdatesResponse:
        """Newest first, with each one's progress; reads the journal off the event loop."""
        import aiofiles.os

        try:
            names = [n for n in await aiofiles.os.listdir(self.journal.root) if valid_update_id(n)]
        except OSError:  # no update yet
            names = []
        loaded = await asyncio.gather(*(self._load(n) for n in names))
        records = sorted((r for r in loaded if r is not None), key=lambda r: r.created_at)
        chosen = [r for r in reversed(records) if not component or r.component == component][:limit]
        return daemon_pb2.ListUpdatesResponse(
            updates=[update_status(r, await self._progress(r.update_id)) for r in chosen])

    async def watch(self, update_id: str, context: grpc.aio.ServicerContext
                    ) -> AsyncIterator[daemon_pb2.UpdateStatus]:
        """Each change of the record, as it is renamed into place (``_wakeups``); progress at the fallback poll.

        A state is shown only once its rename is durable: the stream fsyncs the journal directory first (the
        helper's own directory fsync may still be under way), so no client sees a state a power loss undoes.
        """
        last: tuple[object, ...] | None = None
        last_state: object = None
        with self._wakeups(update_id) as woken:
            while True:
                woken.clear()  # before the read: a change after it wakes the next wait
                rec = await self._load(update_id)
                if rec is None:
                    await context.abort(grpc.StatusCode.NOT_FOUND, f"no update {update_id!r}")
                assert rec is not None
                status = update_status(rec, await self._progress(update_id))
                key = (status.state, status.bytes_done, status.error, status.finished)
                if key != last:
                    if (status.state, status.finished) != last_state:
                        with contextlib.suppress(OSError):
                            await asyncio.to_thread(durable.fsync_dir, self.journal.dir(update_id))
                        last_state = (status.state, status.finished)
                    last = key
                    yield status
                if rec.final and rec.settled:
                    return
                await _woken_or_poll(woken)

    @contextlib.contextmanager
    def helper_exits(self) -> Iterator[asyncio.Event]:
        """An event set whenever a helper of ours exits or an update is abandoned: a result may have settled."""
        woken = asyncio.Event()
        self._waiters.add(woken)
        try:
            yield woken
        finally:
            self._waiters.discard(woken)

    @contextlib.contextmanager
    def _wakeups(self, update_id: str) -> Iterator[asyncio.Event]:
        """An event set when this update's ``journal.json`` is renamed into place (inotify) or a helper exits."""
        with self.helper_exits() as woken, self._renames(update_id, woken):
            yield woken

    @contextlib.contextmanager
    def _renames(self, update_id: str, woken: asyncio.Event) -> Iterator[None]:
        """Set ``woken`` whenever this update's ``journal.json`` is renamed into place."""
        watch = watch_dir(self.journal.dir(update_id)) if valid_update_id(update_id) else None
        journal_name = JOURNAL_FILE

        def readable() -> None:
            assert watch is not None
            try:
                names = watch.renamed_in()
            except OSError:  # never expected; stop listening rather than spin on it: the fallback poll remains
                self._loop.remove_reader(watch.fd)
                names = {journal_name}
            if journal_name in names:
                woken.set()

        if watch is not None:
            self._loop.add_reader(watch.fd, readable)
        try:
            yield
        finally:
            if watch is not None:
                self._loop.remove_reader(watch.fd)
                watch.close()

    def _notify(self) -> None:
        """A helper of ours exited or an update was abandoned: every waiter looks again."""
        for woken in self._waiters:
            woken.set()

    # ---- helper processes ------------------------------------------------------------------------------

    def _spawn(self, update_id: str) -> None:
        n = self.starts.get(update_id, 0) + 1
        self.starts[update_id] = n
        if n > MAX_HELPER_STARTS:
            self._abandon(update_id, n - 1)
            return
        if self.cfg.source is None:
            logger.error("update {}: cannot start a helper without a config file", update_id)
            return
        taken = self.standby.take(update_id) if self.standby is not None else None
        if taken is not None:  # started and loaded before the push: its start is not in the update's time
            helper = HelperProcess(update_id, taken)
            if not self._watch(helper):
                self._loop.call_soon(self._helper_exited, helper, None)
            logger.info("update {}: standby helper pid {} took it (start {})", update_id, taken, n)
            return
        log_path = self.journal.dir(update_id) / "helper.log"
        argv = helper_argv(self.cfg, ["--update-id", update_id])
        launched = self.launcher.launch(argv, f"baton-helper-{update_id}-{n}", log_path)
        helper = HelperProcess(update_id, launched.pid, launched.transient_unit)
        if not self._watch(helper):  # gone before it could be watched: as if it died at once
            self._loop.call_soon(self._helper_exited, helper, None)
        logger.info("update {}: helper pid {} started (start {})", update_id, launched.pid, n)

    def _watch(self, helper: HelperProcess) -> bool:
        helper.watch = self.processes.watch(helper.pid, lambda status: self._helper_exited(helper, status))
        if helper.watch is None:
            return False
        self.helpers[helper.update_id] = helper
        return True

    def _helper_exited(self, helper: HelperProcess, status: int | None) -> None:
        helper.watch = None
        self.helpers.pop(helper.update_id, None)
        self._refill_standby()
        if helper.transient_unit and status == 0:
            self._loop.create_task(self._find_unit_helper(helper.update_id))
            return
        self._notify()
        try:
            rec = self.journal.load(helper.update_id)
        except JournalError as e:
            logger.error("update {}: {}", helper.update_id, e)
            return
        if rec.final and rec.settled:
            logger.info("update {} of {} ended {}{}", rec.update_id, rec.component, rec.state.value,
                        f": {rec.error}" if rec.error else "")
            if self.active.get(rec.component) == rec.update_id:
                del self.active[rec.component]
            self.prune_journal()
            return
        logger.warning("update {}: helper pid {} died (status {}) in state {}; starting another",
                       rec.update_id, helper.pid, status, rec.state.value)
        self.clock.call_later(RESPAWN_DELAY_S, self._spawn, rec.update_id)

    def _abandon(self, update_id: str, starts: int) -> None:
        """No helper could run it: before the switch nothing changed, so it is FAILED; after, an operator decides."""
        rec = self.journal.load(update_id)
        tail = ""
        with contextlib.suppress(OSError):
            tail = (self.journal.dir(update_id) / "helper.log").read_text(errors="replace").strip().splitlines()[-1]
        reason = f"the helper failed {starts} times without finishing: {tail}"
        if rec.state in PRE_SWITCH:
            # through the record's guard, like every state write (UPDATE_TRANSITIONS: pre-switch -> FAILED)
            rec = rec.moved(UpdateState.FAILED, reason, error=reason, finished_at=self.clock.time(), settled=True,
                            reason=reasons.FailureReason.HELPER_CRASHED.value)
            self.journal.save(rec)
            if self.active.get(rec.component) == update_id:
                del self.active[rec.component]
            self._notify()
            logger.error("update {} FAILED: {}", update_id, reason)
        else:
            logger.error("update {} stuck in {}: {}; run `helper --status` and `helper --rollback {}`",
                         update_id, rec.state.value, reason, rec.component)

    async def _find_unit_helper(self, update_id: str) -> None:
        """systemd-run returned once the unit started; the helper announces its pid in the journal."""
        deadline = self.clock.monotonic() + HELPER_ANNOUNCE_S
        while self.clock.monotonic() < deadline:
            rec = await self._load(update_id)
            if rec is not None and (rec.final and rec.settled):
                break
            if rec is not None and rec.attempts >= self.starts.get(update_id, 0) and self._watch_running_helper(rec):
                return
            await self.clock.sleep(0.05)
        rec = await self._load(update_id)
        if rec is None:
            return
        if rec.final and rec.settled:
            if self.active.get(rec.component) == update_id:
                del self.active[rec.component]
            self._notify()
            return
        logger.warning("update {}: its helper unit did not come up; starting another", update_id)
        self._spawn(update_id)

    def helper_pids(self) -> list[int]:
        """Our helpers' pids and the standby's children: processes reaped through their watch, not as strays."""
        return [h.pid for h in self.helpers.values()] + (self.standby.child_pids() if self.standby else [])

    async def stop(self) -> None:
        """Stop watching; running helpers carry on in their own sessions, a waiting standby exits."""
        if self.standby is not None:
            self.standby.close()
        for h in list(self.helpers.values()):
            if h.watch is not None:
                h.watch.release()
        self.helpers.clear()

    # ---- results -------------------------------------------------------------------------------------

    def unreported(self) -> list[UpdateRecord]:
        out: list[UpdateRecord] = []
        for e in self.journal.ended():
            if not self._reported_marker(e.update_id).exists():
                with contextlib.suppress(JournalError):
                    out.append(self.journal.load(e.update_id))
        return out

    def _reported_marker(self, update_id: str) -> Path:
        return self.journal.dir(update_id) / "reported"

    def mark_reported(self, update_id: str) -> None:
        from baton import durable

        durable.write_bytes(self._reported_marker(update_id), f"{self.clock.time()}\n".encode(), 0o600)
        self.prune_journal()

    def prune_journal(self) -> None:
        """Drop final records past ``update.keep_updates``/``keep_updates_days``; never an undelivered one."""
        u = self.cfg.update

        def delivered(rec: Ended) -> bool:
            if rec.update_id in self.helpers or self.active.get(rec.component) == rec.update_id:
                return False
            return not self.cfg.manager.address or self._reported_marker(rec.update_id).exists()

        try:
            removed = self.journal.prune(u.keep_updates, u.keep_updates_days * 86400.0, delivered,
                                         before_remove=lambda going: self.totals.fold(
                                             going, [e.update_id for e in self.journal.ended()]))
        except OSError as e:
            logger.warning("pruning the update journal failed: {}", e)
            return
        if removed:
            logger.info("pruned {} settled update record(s) from the journal: {}", len(removed), ", ".join(removed))
