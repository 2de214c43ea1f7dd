"""The update manager's side of an update, driven in-process: a push refused (each failure and the code and
reason a client gets), a helper launched, dying, respawned, given up on, or never reporting, and a cancel.

Fakes stand in for the helper processes and the clock (tests/fakes/); the journal is a real one in tmp_path. The
same behaviours keep one test each with real processes (test_update_failures.py, test_update_cancel.py, ...).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from baton.admission import REFUSAL_METADATA_KEY
from baton.config import SUPERVISOR_COMPONENT, AgentConfig, Config, NodeConfig, UpdateConfig
from baton.holds import Holds
from baton.journal import CANCEL_SIGNAL, UpdateRecord, UpdateRequestRecord
from baton.pb import daemon_pb2
from baton.reasons import FailureReason
from baton.states import UpdateState
from supervisor.updates import MAX_HELPER_STARTS, RESPAWN_DELAY_S, STANDBY_START_DELAY_S, UpdateManager
from tests.fakes.grpc_context import Aborted, FakeContext
from tests.fakes.processes import FakeHelpers, FakeProcesses, FakeStandby, FileReader
from tests.fakes.supervisor_clock import FakeClock

U = UpdateState
SHA = "ab" * 32


@dataclass
class World:
    um: UpdateManager
    procs: FakeProcesses
    helpers: FakeHelpers
    clock: FakeClock
    standby: FakeStandby | None

    def load(self, update_id: str) -> UpdateRecord:
        return self.um.journal.load(update_id)

    def helper_pid(self) -> int:
        """The pid of the helper launched last."""
        return self.procs.last().pid

    def move(self, update_id: str, *states: U, **changes: Any) -> None:
        """What a helper journals as it goes."""
        rec = self.load(update_id)
        for s in states:
            rec = rec.moved(s, **changes)
        self.um.journal.save(rec)


def signature() -> str:
    from baton.signing import generate_keypair, sign_prehash

    secret, _ = generate_keypair()
    return sign_prehash(secret, b"\0" * 64, "trusted comment")


SIGNATURE = signature()


def request(**kw: Any) -> daemon_pb2.UpdateRequest:
    fields: dict[str, Any] = {"component": "app", "version": "1.1.0", "download_url": "https://pkgs.example/app.tgz",
                              "sha256": SHA, "size": 1000, "signature": SIGNATURE}
    return daemon_pb2.UpdateRequest(**{**fields, **kw})


def run(tmp_path: Path, body: Callable[[World], Awaitable[None]], update: UpdateConfig | None = None,
        standby: bool = False) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    cfg = Config(node=NodeConfig(id="n1", state_dir=state, install_root=tmp_path / "install"),
                 agents=(AgentConfig(name="app", command="bin/app", packaged=True),),
                 update=update or UpdateConfig(), source=tmp_path / "baton.toml")

    async def main() -> None:
        clock = FakeClock()
        procs = FakeProcesses(clock)
        helpers = FakeHelpers(procs)
        fake_standby = FakeStandby(helpers) if standby else None
        um = UpdateManager(cfg, processes=procs, clock=clock, helpers=helpers, reader=FileReader(),
                           standby=fake_standby)
        await um.start()
        try:
            await body(World(um, procs, helpers, clock, fake_standby))
        finally:
            await um.stop()

    asyncio.run(main())


def on_disk(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


async def refused(w: World, req: daemon_pb2.UpdateRequest) -> Aborted:
    """The push is refused, and nothing changed on disk (the journal included) and no helper was launched."""
    root = w.um.cfg.node.state_dir.parent
    before, launched = on_disk(root), len(w.helpers.launched)
    with pytest.raises(Aborted) as e:
        await w.um.push(req, FakeContext())  # type: ignore[arg-type]
    assert (on_disk(root), len(w.helpers.launched)) == (before, launched)
    return e.value


# ---- a push: accepted, or refused with its code and reason -------------------------------------------------------


def test_a_push_journals_the_request_and_launches_a_helper_for_it(tmp_path):
    async def body(w: World) -> None:
        accepted = await w.um.push(request(update_id="u1"), FakeContext())  # type: ignore[arg-type]
        assert accepted.update_id == "u1"
        rec = w.load("u1")
        assert (rec.state, rec.component, rec.to_version, rec.request.sha256) == (U.REQUESTED, "app", "1.1.0", SHA)
        [(argv, unit, log)] = w.helpers.launched
        assert argv[-6:] == ["--config", str(tmp_path / "baton.toml"), "--update-id", "u1", "--socket",
                             str(w.um.cfg.control_socket)]
        assert unit == "baton-helper-u1-1" and log == w.um.journal.dir("u1") / "helper.log"
        assert w.um.helper_pids() == [w.helper_pid()]

    run(tmp_path, body)


def test_a_second_push_while_an_update_of_the_component_runs_is_aborted(tmp_path):
    async def body(w: World) -> None:
        await w.um.push(request(update_id="u1"), FakeContext())  # type: ignore[arg-type]
        e = await refused(w, request(update_id="u2"))
        assert e.code is grpc.StatusCode.ABORTED
        assert e.details == "update u1 of app is still running; try again when it ends"

    run(tmp_path, body)


def test_a_push_while_the_trusted_keys_are_broken_is_refused_with_that_reason(tmp_path):
    async def body(w: World) -> None:
        e = await refused(w, request())
        assert e.code is grpc.StatusCode.FAILED_PRECONDITION
        assert e.details.startswith("updates are refused: ") and "not found" in e.details
        assert e.trailing_metadata == {REFUSAL_METADATA_KEY: FailureReason.TRUSTED_KEYS_BROKEN.value}

    run(tmp_path, body, UpdateConfig(trusted_keys=(tmp_path / "gone.pub",)))


def test_a_push_with_a_malformed_update_id_is_an_invalid_argument(tmp_path):
    async def body(w: World) -> None:
        e = await refused(w, request(update_id="../etc"))
        assert e.code is grpc.StatusCode.INVALID_ARGUMENT

    run(tmp_path, body)


def test_a_push_for_an_unknown_component_is_not_found_naming_the_known_ones(tmp_path):
    async def body(w: World) -> None:
        e = await refused(w, request(component="nope"))
        assert e.code is grpc.StatusCode.NOT_FOUND
        assert "unknown component 'nope'" in e.details and "app" in e.details

    run(tmp_path, body)


def test_a_push_for_a_held_component_is_refused_with_the_held_mark(tmp_path):
    async def body(w: World) -> None:
        Holds(w.um.cfg.node.state_dir).hold("app", "incident 42")
        e = await refused(w, request())
        assert e.code is grpc.StatusCode.FAILED_PRECONDITION and "incident 42" in e.details
        assert e.trailing_metadata == {REFUSAL_METADATA_KEY: "held"}

    run(tmp_path, body)


@pytest.mark.parametrize("field,value,says", [
    ("version", "1" * 100 * 1024, ("invalid version", "longer than 64 characters", "(102400 characters)")),
    ("download_url", "https://x/" + "a" * 100 * 1024, ("download_url is longer than",)),
    ("signature", "not\na\nsignature\n", ("signature: expected 4 lines",)),
    ("signature", SIGNATURE.replace("untrusted comment: ", "untrusted comment: " + "x" * 3 * 1024 * 1024, 1),
     ("signature is longer than 10240 bytes",)),
    ("sha256", "abc", ("sha256 must be 64 hex digits",)),
    ("signature", "", ("signature is empty: unsigned packages are never installed",)),
], ids=["long-version", "long-url", "unparsable-signature", "huge-signature", "bad-sha256", "unsigned"])
def test_a_bad_request_is_refused_at_push_with_a_short_clear_reason(tmp_path, field, value, says):
    async def body(w: World) -> None:
        e = await refused(w, request(**{field: value}))
        assert e.code is grpc.StatusCode.FAILED_PRECONDITION
        assert len(e.details) < 400, e.details[:500]
        assert all(part in e.details for part in says), e.details

    run(tmp_path, body)


def test_a_supervisor_update_of_one_not_run_from_its_install_is_refused(tmp_path):
    async def body(w: World) -> None:
        e = await refused(w, request(component=SUPERVISOR_COMPONENT))
        assert e.code is grpc.StatusCode.FAILED_PRECONDITION and "install-self" in e.details

    run(tmp_path, body)


def test_a_push_reusing_an_update_id_is_already_exists(tmp_path):
    async def body(w: World) -> None:
        await w.um.push(request(update_id="u1"), FakeContext())  # type: ignore[arg-type]
        w.move("u1", U.FAILED, settled=True)
        w.procs.exit(w.helper_pid(), 1)
        await w.clock.settle()
        with pytest.raises(Aborted) as e:
            await w.um.push(request(update_id="u1"), FakeContext())  # type: ignore[arg-type]
        assert e.value.code is grpc.StatusCode.ALREADY_EXISTS

    run(tmp_path, body)


# ---- the helper: dies, is respawned, given up on, never reports ---------------------------------------------------


async def pushed(w: World) -> str:
    return (await w.um.push(request(update_id="u1"), FakeContext())).update_id  # type: ignore[arg-type]


def test_a_helper_that_dies_before_the_update_ends_is_started_again_after_respawn_delay_s(tmp_path):
    async def body(w: World) -> None:
        uid = await pushed(w)
        w.move(uid, U.DOWNLOADING)
        w.procs.exit(w.helper_pid(), -signal.SIGKILL)
        await w.clock.advance(RESPAWN_DELAY_S - 0.01)
        assert len(w.helpers.launched) == 1 and w.um.helpers == {}
        await w.clock.advance(0.01)
        assert [unit for _, unit, _ in w.helpers.launched] == ["baton-helper-u1-1", "baton-helper-u1-2"]
        assert w.um.active == {"app": uid}

    run(tmp_path, body)


def test_a_helper_that_keeps_dying_before_the_switch_fails_the_update_as_helper_crashed(tmp_path):
    async def body(w: World) -> None:
        uid = await pushed(w)
        (w.um.journal.dir(uid) / "helper.log").write_text("starting\nTraceback: boom\n")
        for _ in range(MAX_HELPER_STARTS):
            w.procs.exit(w.helper_pid(), 1)
            await w.clock.advance(RESPAWN_DELAY_S)
        rec = w.load(uid)
        assert len(w.helpers.launched) == MAX_HELPER_STARTS
        assert rec.state is U.FAILED and rec.settled and rec.reason == FailureReason.HELPER_CRASHED.value
        assert rec.error == f"the helper failed {MAX_HELPER_STARTS} times without finishing: Traceback: boom"
        assert rec.finished_at == w.clock.time()
        assert w.um.active == {}

    run(tmp_path, body)


def test_a_helper_that_keeps_dying_after_the_switch_leaves_the_update_to_an_operator(tmp_path):
    async def body(w: World) -> None:
        uid = await pushed(w)
        w.move(uid, U.DOWNLOADING, U.VERIFYING, U.STAGING, U.SWITCHING)
        for _ in range(MAX_HELPER_STARTS):
            w.procs.exit(w.helper_pid(), 1)
            await w.clock.advance(RESPAWN_DELAY_S)
        assert len(w.helpers.launched) == MAX_HELPER_STARTS
        assert w.load(uid).state is U.SWITCHING and w.um.active == {"app": uid}  # not FAILED: nothing guesses

    run(tmp_path, body)


def test_a_helper_that_exits_once_its_update_is_settled_ends_it(tmp_path):
    async def body(w: World) -> None:
        uid = await pushed(w)
        w.move(uid, U.DOWNLOADING, U.VERIFYING, U.STAGING, U.SWITCHING, U.RESTARTING, U.WATCHING, U.COMMITTED,
               settled=True)
        with w.um.helper_exits() as woken:
            w.procs.exit(w.helper_pid(), 0)
            await w.clock.advance(60)
            assert woken.is_set()
        assert w.um.active == {} and len(w.helpers.launched) == 1

    run(tmp_path, body)


def test_a_helper_unit_that_never_announces_itself_is_replaced_after_helper_announce_s(tmp_path):
    from supervisor.updates import HELPER_ANNOUNCE_S

    async def body(w: World) -> None:
        w.helpers.transient_unit = True
        uid = await pushed(w)
        w.procs.exit(w.helper_pid(), 0)  # systemd-run's client: the unit has started
        await w.clock.advance(HELPER_ANNOUNCE_S - 0.1)
        assert len(w.helpers.launched) == 1
        await w.clock.advance(0.2)
        assert [unit for _, unit, _ in w.helpers.launched] == [f"baton-helper-{uid}-1", f"baton-helper-{uid}-2"]

    run(tmp_path, body)


def test_a_helper_unit_that_announces_its_pid_is_watched_not_replaced(tmp_path):
    async def body(w: World) -> None:
        w.helpers.transient_unit = True
        uid = await pushed(w)
        w.procs.exit(w.helper_pid(), 0)
        unit_helper = w.procs.add()
        w.helpers.running[unit_helper.pid] = uid
        w.move(uid, U.DOWNLOADING, attempts=1, helper_pid=unit_helper.pid)
        await w.clock.advance(1.0)
        assert w.um.helper_pids() == [unit_helper.pid] and len(w.helpers.launched) == 1

    run(tmp_path, body)


def test_an_unfinished_update_found_at_start_watches_its_running_helper_or_launches_one(tmp_path):
    async def body(w: World) -> None:
        uid = await pushed(w)
        alive = w.helper_pid()
        w.move(uid, U.DOWNLOADING, attempts=1, helper_pid=alive)
        await w.um.stop()  # the supervisor is replaced; its helper runs on
        again = UpdateManager(w.um.cfg, processes=w.procs, clock=w.clock, helpers=w.helpers, reader=FileReader())
        await again.start()
        assert again.helper_pids() == [alive] and len(w.helpers.launched) == 1
        await again.stop()
        w.procs.exit(alive, -signal.SIGKILL)  # while no supervisor watched
        third = UpdateManager(w.um.cfg, processes=w.procs, clock=w.clock, helpers=w.helpers, reader=FileReader())
        await third.start()
        assert len(w.helpers.launched) == 2 and third.active == {"app": uid}
        await third.stop()

    run(tmp_path, body)


# ---- the standby helper: takes the next update, or a helper is launched as before ----------------------------------


def test_a_standby_is_started_standby_start_delay_s_after_start(tmp_path):
    async def body(w: World) -> None:
        assert w.standby is not None and w.standby.started
        await w.clock.advance(STANDBY_START_DELAY_S - 0.01)
        assert w.standby.refills == 0
        await w.clock.advance(0.01)
        assert w.standby.refills == 1 and w.um.helper_pids() == [w.standby.waiting.pid]  # type: ignore[union-attr]
        assert w.helpers.launched == []  # the standby side starts it (supervisor/standby.py), not the manager

    run(tmp_path, body, standby=True)


def test_a_ready_standby_takes_the_push_and_no_helper_is_launched(tmp_path):
    async def body(w: World) -> None:
        assert w.standby is not None
        await w.clock.advance(STANDBY_START_DELAY_S)
        ready = w.standby.ready()
        uid = await pushed(w)
        assert w.standby.taken == [(uid, ready.pid)] and w.helpers.launched == []
        assert w.um.helper_pids() == [ready.pid]  # watched as the update's helper

    run(tmp_path, body, standby=True)


def test_a_cancel_signals_the_standby_that_took_the_update(tmp_path):
    async def body(w: World) -> None:
        assert w.standby is not None
        await w.clock.advance(STANDBY_START_DELAY_S)
        ready = w.standby.ready()
        uid = await pushed(w)
        w.move(uid, U.DOWNLOADING, attempts=1, helper_pid=ready.pid)
        cancel = asyncio.ensure_future(w.um.cancel(uid, FakeContext()))  # type: ignore[arg-type]
        await w.clock.settle()
        assert w.helpers.signalled == [(ready.pid, CANCEL_SIGNAL)]
        w.move(uid, U.FAILED, settled=True, reason=FailureReason.CANCELLED.value)
        assert (await asyncio.wait_for(cancel, 5)).finished

    run(tmp_path, body, standby=True)


def test_with_no_standby_ready_the_push_launches_a_helper(tmp_path):
    async def body(w: World) -> None:
        assert w.standby is not None
        await w.clock.advance(STANDBY_START_DELAY_S)  # started, but not yet said HELLO
        uid = await pushed(w)
        assert w.standby.taken == []
        [(argv, unit, _)] = w.helpers.launched
        assert argv[argv.index("--update-id") + 1] == uid and unit == f"baton-helper-{uid}-1"

    run(tmp_path, body, standby=True)


def test_a_standby_that_took_an_update_and_died_is_followed_by_a_launched_helper(tmp_path):
    async def body(w: World) -> None:
        assert w.standby is not None
        await w.clock.advance(STANDBY_START_DELAY_S)
        ready = w.standby.ready()
        uid = await pushed(w)
        w.move(uid, U.DOWNLOADING)
        w.procs.exit(ready.pid, -signal.SIGKILL)
        await w.clock.advance(RESPAWN_DELAY_S)
        [(argv, unit, _)] = w.helpers.launched
        assert argv[argv.index("--update-id") + 1] == uid and unit == f"baton-helper-{uid}-2"

    run(tmp_path, body, standby=True)


def test_the_next_standby_is_started_once_no_helper_runs(tmp_path):
    async def body(w: World) -> None:
        assert w.standby is not None
        await w.clock.advance(STANDBY_START_DELAY_S)
        ready = w.standby.ready()
        uid = await pushed(w)
        await w.clock.advance(60)
        assert w.standby.refills == 1  # not while the update's helper runs: it would take the update's CPU
        w.move(uid, U.DOWNLOADING, U.VERIFYING, U.STAGING, U.SWITCHING, U.RESTARTING, U.WATCHING, U.COMMITTED,
               settled=True)
        w.procs.exit(ready.pid, 0)
        await w.clock.settle()
        assert w.standby.refills == 2 and w.um.active == {}

    run(tmp_path, body, standby=True)


def test_stopping_the_update_manager_closes_the_standby(tmp_path):
    async def body(w: World) -> None:
        assert w.standby is not None
        await w.um.stop()
        assert w.standby.closed

    run(tmp_path, body, standby=True)


# ---- cancel ----------------------------------------------------------------------------------------------------


def test_a_cancel_signals_the_journaled_helper_and_returns_the_final_state(tmp_path):
    async def body(w: World) -> None:
        uid = await pushed(w)
        pid = w.helper_pid()
        w.move(uid, U.DOWNLOADING, helper_pid=pid)
        cancel = asyncio.ensure_future(w.um.cancel(uid, FakeContext()))  # type: ignore[arg-type]
        await w.clock.settle()
        assert w.helpers.signalled == [(pid, CANCEL_SIGNAL)] and w.um.journal.cancel_requested(uid)
        w.move(uid, U.FAILED, settled=True, reason=FailureReason.CANCELLED.value)
        status = await asyncio.wait_for(cancel, 5)
        assert status.finished and status.step == "failed"

    run(tmp_path, body)


def test_a_cancel_of_a_self_update_past_staging_is_refused(tmp_path):
    async def body(w: World) -> None:
        w.um.journal.create(UpdateRecord(update_id="s1", request=UpdateRequestRecord(
            node_id="n1", component=SUPERVISOR_COMPONENT, version="2.0.0", download_url="https://x/s.tgz",
            sha256=SHA, signature=SIGNATURE, size=1000)))
        w.move("s1", U.DOWNLOADING, U.VERIFYING, U.STAGING, U.SWITCHING)
        with pytest.raises(Aborted) as e:
            await w.um.cancel("s1", FakeContext())  # type: ignore[arg-type]
        assert e.value.code is grpc.StatusCode.FAILED_PRECONDITION and "cannot be interrupted" in e.value.details
        assert not w.um.journal.cancel_requested("s1")

    run(tmp_path, body)


def test_the_status_of_an_unknown_update_is_not_found(tmp_path):
    async def body(w: World) -> None:
        with pytest.raises(Aborted) as e:
            await w.um.get("nope", FakeContext())  # type: ignore[arg-type]
        assert e.value.code is grpc.StatusCode.NOT_FOUND and e.value.details == "no update 'nope'"

    run(tmp_path, body)


def test_the_status_of_an_unreadable_record_is_not_found(tmp_path):
    async def body(w: World) -> None:
        uid = await pushed(w)
        w.um.reader.failing.add(w.um.journal.path(uid))  # type: ignore[attr-defined]
        with pytest.raises(Aborted) as e:
            await w.um.get(uid, FakeContext())  # type: ignore[arg-type]
        assert e.value.code is grpc.StatusCode.NOT_FOUND

    run(tmp_path, body)


def test_a_cancel_of_an_unknown_update_is_not_found(tmp_path):
    async def body(w: World) -> None:
        with pytest.raises(Aborted) as e:
            await w.um.cancel("no-such-update", FakeContext())  # type: ignore[arg-type]
        assert e.value.code is grpc.StatusCode.NOT_FOUND

    run(tmp_path, body)


def test_a_cancel_of_a_finished_update_returns_it_unchanged(tmp_path):
    async def body(w: World) -> None:
        uid = await pushed(w)
        w.move(uid, U.DOWNLOADING, U.VERIFYING, U.STAGING, U.SWITCHING, U.RESTARTING, U.WATCHING, U.COMMITTED,
               settled=True, success=True, helper_pid=w.helper_pid())
        done = w.load(uid)
        status = await w.um.cancel(uid, FakeContext())  # type: ignore[arg-type]
        assert (status.step, status.success, status.error, status.finished, status.updated_at) == \
            ("committed", True, "", True, done.updated_at)
        assert not w.um.journal.cancel_requested(uid) and w.helpers.signalled == []
        assert w.load(uid) == done

    run(tmp_path, body)
