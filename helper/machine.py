"""The driver of one Agent update: from whatever state its journal holds to a final state.

The states and every legal move are ``baton.states.UPDATE_TRANSITIONS`` (with
the diagram); the journal record refuses any other move, so this module only
decides which legal move to make and does the work of each state.

Before SWITCHING (``PRE_SWITCH``) nothing outside the download and journal
areas has changed, so a failure there is FAILED: the staging directory and the
download are removed and the running agent was never touched. From SWITCHING
on, the ``current`` link may point at the new version, so any failure rolls
back: switch the link back, restart the old version through the supervisor,
check it is healthy. Only COMMITTED moves the component's high-water mark.

A helper that starts on a journal left unfinished by a killed helper does what
:data:`RECOVERY` says for the state it finds. The journal write of a state
happens before that state's work, so the work of the last recorded state may
or may not have been done; every step is idempotent.
"""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import replace

from baton import faults
from baton.admission import check_request
from baton.config import Config
from baton.errors import BatonError
from baton.journal import CANCEL_SIGNAL, CANCELLED, UpdateRecord
from baton.log import logger
from baton.marks import Marks
from baton.reasons import FailureReason, classify, facts, message, with_output
from baton.states import PRE_SWITCH
from baton.states import UpdateState as S
from helper.control_errors import HealthCheckFailed, SupervisorUnavailable
from helper.download import DownloadedFile, DownloadProgress, FileIdentity
from helper.installer import Installer
from helper.ports import ClientFactory, Clock, Fetcher, JournalStore, SupervisorClient

RECOVERY: dict[S, str] = {
    S.REQUESTED: "start from the beginning",
    S.DOWNLOADING: "resume the download (HTTP Range), then go on",
    S.VERIFYING: "re-hash the downloaded file and verify again",
    S.STAGING: "discard the staging directory, re-verify and stage again",
    S.SWITCHING: "roll back: the new version was never judged healthy",
    S.RESTARTING: "roll back",
    S.WATCHING: "roll back",
    S.ROLLING_BACK: "roll back again (idempotent)",
}
"""What a helper started on an unfinished journal does, by the state it finds (a supervisor self-update
instead commits from SWITCHING, RESTARTING or WATCHING when the new version already serves, through
RESTARTING and WATCHING: ``helper/self_update.py``)."""

MAX_ATTEMPTS = 5


class UpdateCancelled(BaseException):
    """The operator cancelled the update (``DaemonService.CancelUpdate``).

    A ``BaseException``, like ``asyncio.CancelledError``, so that no ``except
    Exception`` on its way out of the download (which wraps every ``Exception``
    in a ``DownloadError``) turns a cancel into an ordinary failure.
    """


class UpdateRun:
    """Drives one update from whatever state its journal holds to a final state.

    Its collaborators are given (``helper/ports.py``; the real ones: ``helper/wiring.py``): the journal's
    storage, the supervisor client (made on first use), the fetcher of the package and the clock.
    """

    def __init__(self, cfg: Config, journal: JournalStore, update_id: str, control: ClientFactory, *,
                 fetcher: Fetcher, clock: Clock) -> None:
        self.cfg = cfg
        self.journal = journal
        self.update_id = update_id
        self.clock = clock
        self._control_factory = control
        self._control: SupervisorClient | None = None
        self.rec = journal.load(update_id)
        self.installer = Installer(cfg, self.rec.component, fetcher)
        self.marks = Marks(cfg.node.state_dir)
        self._last_progress = 0.0
        self._cancel_seen = False
        self._staged_dir = ""  # the directory this run installed (versions/<v>, or <v>..r1 for a reinstall)
        self._interruptible = False  # inside the download: the cancel signal raises at once

    # ---- journal -------------------------------------------------------------------------------------

    def _move(self, state: S, note: str = "", **changes: object) -> None:
        """Record ``state`` durably before its work (the record raises IllegalTransition off the table)."""
        self.rec = self.rec.moved(state, note, **changes)
        self.journal.save(self.rec)
        logger.info("update {} {} {}: {}{}", self.update_id, self.rec.component, self.rec.to_version, state.value,
                    f" ({note})" if note else "")
        faults.crash_point(state.value)

    def _timed(self, step: str, started: float) -> dict[str, float]:
        t = dict(self.rec.timings)
        t[step] = round(t.get(step, 0.0) + self.clock.monotonic() - started, 6)
        return t

    def _progress(self, p: DownloadProgress) -> None:
        self.journal.write_progress(self.update_id, {
            "step": self.rec.state.value, "bytes_done": p.bytes_done, "bytes_total": p.bytes_total,
            "rate_bytes_per_second": p.rate_bytes_per_s, "resumed_from": p.resumed_from,
        })
        if p.bytes_done > 0 and p.bytes_done < p.bytes_total:
            faults.crash_point("downloading-bytes")

    def _record_download_file(self, ident: FileIdentity) -> None:
        """Durably, before a byte is written: a later attempt resumes only this file."""
        self.rec = replace(self.rec, download_file=(ident.dev, ident.ino))
        self.journal.save(self.rec)

    # ---- cancel: <journal dir>/cancel, then CANCEL_SIGNAL (docs/protocols.md) ----------------------------------

    def _listen_for_cancel(self) -> None:
        """Installed before the helper's pid is journaled, so the supervisor never signals a helper without it."""
        with contextlib.suppress(ValueError):  # not the main thread: the file is still checked between steps
            signal.signal(CANCEL_SIGNAL, self._on_cancel_signal)

    def _on_cancel_signal(self, signum: int, frame: object) -> None:
        self._cancel_seen = True
        if self._interruptible:
            raise UpdateCancelled()

    def _cancel_pending(self) -> bool:
        if not self._cancel_seen and self.journal.cancel_requested(self.update_id):
            self._cancel_seen = True
        return self._cancel_seen

    def _check_cancel(self) -> None:
        if self._cancel_pending():
            raise UpdateCancelled()

    def _was_cancelled(self) -> bool:
        return any(t.note == CANCELLED for t in self.rec.history)

    @property
    def control(self) -> SupervisorClient:
        if self._control is None:
            self._control = self._control_factory()
        return self._control

    # ---- driver --------------------------------------------------------------------------------------

    def run(self) -> UpdateRecord:
        if self.rec.final and self.rec.settled:
            return self.rec
        self._listen_for_cancel()
        self.rec = replace(self.rec, attempts=self.rec.attempts + 1, helper_pid=os.getpid())
        self.journal.save(self.rec)
        if self.rec.final:
            self._settle()
            return self.rec
        faults.crash_point("started")
        if self.rec.attempts > 1:
            logger.warning("update {}: resuming in state {} (attempt {}): {}", self.update_id, self.rec.state.value,
                           self.rec.attempts, RECOVERY.get(self.rec.state, "nothing to do"))
        try:
            if self.rec.attempts > MAX_ATTEMPTS:
                self._give_up()
            elif self.rec.state in PRE_SWITCH:
                if self._prepare():
                    self._switch_and_check()
            else:
                why = FailureReason.parse(self.rec.reason) if self.rec.reason else FailureReason.HELPER_CRASHED
                self._rollback(self.rec.error or f"the helper was interrupted in state {self.rec.state.value}", why)
        finally:
            if self._control is not None:
                self._control.close()
        return self.rec

    def _give_up(self) -> None:
        detail = f"gave up after {MAX_ATTEMPTS} helper attempts"
        if self.rec.state in PRE_SWITCH:
            self._fail(message(FailureReason.HELPER_CRASHED, detail), FailureReason.HELPER_CRASHED)
        else:
            self._rollback(detail, FailureReason.HELPER_CRASHED)

    # ---- before the switch: any failure is FAILED and changes nothing ----------------------------------------

    def _prepare(self) -> bool:
        req = self.rec.request
        dl: DownloadedFile | None = None
        try:
            self._check_cancel()
            if self.rec.state is S.REQUESTED:
                check_request(self.cfg, component=req.component, version=req.version, download_url=req.download_url,
                              sha256=req.sha256, size=req.size, signature=req.signature, node_id=req.node_id,
                              allow_downgrade=req.allow_downgrade, force=req.force, reinstall=req.reinstall)
            keys = self.installer.trusted_keys()
            self.installer.remove_staging_leftovers()
            self._move(S.DOWNLOADING, "" if self.rec.attempts == 1 else "recovery")
            t0 = self.clock.monotonic()
            self._interruptible = True
            try:
                self._check_cancel()
                dl = self.installer.download(self.rec, self._progress, self._record_download_file)
            finally:
                self._interruptible = False
            self._check_cancel()
            self._move(S.VERIFYING, timings=self._timed("download", t0))
            t0 = self.clock.monotonic()
            verified = self.installer.verify(dl, self.rec, keys)
            logger.info("update {}: signature by key {} over manifest {!r}", self.update_id, verified.key_id_hex,
                        verified.manifest)
            self._check_cancel()
            self._move(S.STAGING, timings=self._timed("verify", t0))
            t0 = self.clock.monotonic()
            self._staged_dir = self.installer.stage(dl, req.version).name
            self.rec = replace(self.rec, timings=self._timed("stage", t0))
            self._check_cancel()
            return True
        except UpdateCancelled:
            self._fail(CANCELLED, FailureReason.CANCELLED)
            return False
        except (BatonError, OSError, ValueError) as e:
            # Anything before the switch, a disk error included, is a clean FAILED: never a helper crash loop.
            why = classify(e)
            self._fail(message(why, str(e), facts(e)), why, error_class=type(e).__name__)
            return False
        finally:
            if dl is not None:
                dl.close()

    def _fail(self, detail: str, why: FailureReason, error_class: str = "") -> None:
        self.installer.remove_staging_leftovers()
        if self.rec.state is S.STAGING:
            self.installer.discard_version(self.rec.to_version)
        error = f"{error_class}: {detail}" if error_class else detail
        self._move(S.FAILED, error, error=error, reason=why.value, success=False, finished_at=self.clock.time())
        self._settle()

    # ---- the switch and after: any failure rolls back ---------------------------------------------------------

    def _switch(self) -> bool:
        """SWITCHING (journaled first), ``current`` -> the new version, RESTARTING; False if a cancel rolled back.

        The one switch sequence of every update; :meth:`_link_new` is what differs for the supervisor.
        """
        t0 = self.clock.monotonic()
        self._move(S.SWITCHING)
        if self._cancel_pending():  # asked for while we moved: from here on a cancel rolls back
            self._rollback(CANCELLED, FailureReason.CANCELLED)
            return False
        self._link_new()
        self._move(S.RESTARTING, timings=self._timed("switch", t0))
        return True

    def _link_new(self) -> None:
        """``current`` -> the directory this run staged (durably: baton/layout.py)."""
        self.installer.layout.switch_dir(self._staged_dir)

    def _switch_and_check(self) -> None:
        req = self.rec.request
        if not self._switch():
            return
        try:
            t0 = self.clock.monotonic()
            self._check_cancel()
            self.control.restart(req.component)
            self._move(S.WATCHING, timings=self._timed("restart", t0))
            t0 = self.clock.monotonic()
            u = self.cfg.update
            self.control.wait_healthy(req.component, req.version, u.health_timeout_s, u.health_window_s,
                                      check=self._check_cancel)
            self.rec = replace(self.rec, timings=self._timed("health", t0))
        except (HealthCheckFailed, SupervisorUnavailable) as e:
            self._rollback(str(e), classify(e))
            return
        except UpdateCancelled:
            self._rollback(CANCELLED, FailureReason.CANCELLED)
            return
        self._commit()

    def _commit(self) -> None:
        self._move(S.COMMITTED, success=True, finished_at=self.clock.time())
        self._settle()

    def _rollback(self, detail: str, why: FailureReason) -> None:
        """Back to the old version; ``detail`` and ``why`` say what went wrong with the new one."""
        req = self.rec.request
        t0 = self.clock.monotonic()
        self._move(S.ROLLING_BACK, detail, error=detail, reason=why.value)
        layout = self.installer.layout
        old = self.rec.from_version
        last_log = self._agent_log_tail(req.component)
        notes = []
        back = self.rec.from_dir if layout.is_installed_dir(self.rec.from_dir) else ""
        if not back and old and layout.is_installed(old):
            back = layout.version_dir(old).name
        if back:
            layout.switch_dir(back)
            try:
                self.control.restart(req.component)
                u = self.cfg.update
                self.control.wait_healthy(req.component, old, u.health_timeout_s, 0.0)
            except (HealthCheckFailed, SupervisorUnavailable) as e:
                notes.append(f"the old version {old} is not healthy either: {e}")
        else:
            from baton import durable

            durable.remove_file(layout.current_link)
            try:
                self.control.stop(req.component)
            except SupervisorUnavailable as e:
                notes.append(str(e))
        if notes:
            why = FailureReason.ROLLBACK_FAILED
        text = "; ".join([detail, *notes])
        if why is not FailureReason.CANCELLED:
            if why in (FailureReason.NEW_VERSION_EXITED, FailureReason.NEW_VERSION_NOT_READY):
                text = with_output(text, last_log)
            text = message(why, text)
        self._move(S.ROLLED_BACK, error=text, reason=why.value, rolled_back=True, success=False,
                   finished_at=self.clock.time(), last_log=last_log, timings=self._timed("rollback", t0))
        self._settle()

    # ---- after a final state: idempotent effects, redone by a helper that finds them unsettled ----------------

    def _settle(self) -> None:
        """Move the mark (only on COMMITTED), prune backups, drop the download and staging leftovers."""
        req = self.rec.request
        t0 = self.clock.monotonic()
        if self.rec.state is S.COMMITTED:
            self.marks.committed(req.component, req.version)
            removed = self.installer.prune(self.cfg.update.max_backups)
            logger.info("update {} committed {} {}; pruned {}", self.update_id, req.component, req.version,
                        removed or "nothing")
        elif self.rec.state is S.ROLLED_BACK:
            if not self._was_cancelled():  # a cancelled version is not known bad
                self.marks.record_failure(req.component, req.version)
            self.installer.discard_version(req.version)
        try:
            self.installer.remove_staging_leftovers()
            self.installer.discard_download(self.update_id)
        except OSError as e:  # best effort: the next update sweeps again; a final update must settle
            logger.warning("update {}: cleanup incomplete: {}", self.update_id, e)
        faults.crash_point("settling")
        self.rec = replace(self.rec, settled=True, timings=self._timed("settle", t0))
        self.journal.save(self.rec)

    def _agent_log_tail(self, component: str, max_bytes: int = 2048) -> str:
        path = self.cfg.log_dir / f"{component}.log"
        try:
            with open(path, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - max_bytes))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

