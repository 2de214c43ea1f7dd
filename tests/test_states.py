"""Every edge of every state table, and the guards that make a move off the table impossible.

The update journal record, the supervisor's Agent and the helper's handover custody each refuse a move their
table (``baton/states.py``) does not list; the handover messages have one encoder and one decoder each and
refuse malformed input. Millisecond tests beside the real-process ones (test_agent_update, test_self_update).
"""

from __future__ import annotations

import array
import asyncio
import itertools
import json
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from baton import handover as wire
from baton.agent_table import AgentRecord
from baton.config import AgentConfig, Config, NodeConfig
from baton.journal import Journal, Transition, UpdateRecord, UpdateRequestRecord
from baton.states import (
    AGENT_KEPT_STATES,
    AGENT_TRANSITIONS,
    CUSTODY_TRANSITIONS,
    PRE_SWITCH,
    UPDATE_TRANSITIONS,
    AgentState,
    Custody,
    IllegalTransition,
    UpdateState,
)

U = UpdateState
REQUEST = UpdateRequestRecord(node_id="n1", component="web", version="1.1.0", download_url="http://127.0.0.1:1/p",
                              sha256="0" * 64, signature="sig", size=10)


def record_in(state: UpdateState) -> UpdateRecord:
    """A record as loaded from a journal whose last guarded move reached ``state``."""
    return UpdateRecord(update_id="u1", request=REQUEST, state=state, history=(Transition(state.value, 1.0),))


def pairs(states: type[Any]) -> list[tuple[Any, Any]]:
    return list(itertools.product(states, states))


def edges(table: dict[Any, frozenset[Any]], legal: bool | None = None, states: type[Any] | None = None) -> Any:
    """``pytest.param(old, new)`` for every pair of states (or only the legal / illegal ones), named old->new."""
    states = states or type(next(iter(table)))
    return [pytest.param(a, b, id=f"{a.value}->{b.value}") for a, b in pairs(states)
            if legal is None or (b in table[a]) == legal]


# ---- the update table, guarded by the journal record ------------------------------------------------------------


@pytest.mark.parametrize("old,new", edges(UPDATE_TRANSITIONS, legal=True))
def test_journal_record_accepts_every_legal_update_move(old, new):
    rec = record_in(old).moved(new, "why", error="e")
    assert rec.state is new
    assert rec.history[-1].state == new.value and rec.history[-1].note == "why"
    assert rec.error == "e"


@pytest.mark.parametrize("old,new", edges(UPDATE_TRANSITIONS, legal=False))
def test_journal_record_refuses_every_illegal_update_move(old, new):
    rec = record_in(old)
    with pytest.raises(IllegalTransition, match=f"{old.value} -> {new.value}"):
        rec.moved(new)
    assert rec.state is old and len(rec.history) == 1


def test_update_table_covers_every_state_and_final_states_have_no_exit():
    assert set(UPDATE_TRANSITIONS) == set(UpdateState)
    for s in UpdateState:
        assert (not UPDATE_TRANSITIONS[s]) == s.final, s


def test_every_update_state_is_reachable_and_can_reach_a_final_state():
    reach = {U.REQUESTED}
    frontier = [U.REQUESTED]
    while frontier:
        for nxt in UPDATE_TRANSITIONS[frontier.pop()] - reach:
            reach.add(nxt)
            frontier.append(nxt)
    assert reach == set(UpdateState)
    for s in UpdateState:
        seen, todo = {s}, [s]
        while todo:
            for nxt in UPDATE_TRANSITIONS[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        assert any(x.final for x in seen), s


def test_pre_switch_is_exactly_the_states_that_may_fail_without_rollback():
    """A failure or a cancel is FAILED before the switch and a rollback from it on (H4's cancel relies on it)."""
    assert {s for s, nxt in UPDATE_TRANSITIONS.items() if U.FAILED in nxt} == PRE_SWITCH
    assert {s for s, nxt in UPDATE_TRANSITIONS.items() if U.ROLLING_BACK in nxt} == {
        U.SWITCHING, U.RESTARTING, U.WATCHING, U.ROLLING_BACK}


@pytest.mark.parametrize("path", [
    [U.DOWNLOADING, U.DOWNLOADING],                     # killed while downloading: resume
    [U.VERIFYING, U.DOWNLOADING],                       # killed while verifying: re-hash from DOWNLOADING
    [U.STAGING, U.DOWNLOADING],                         # killed while staging: discard, re-verify, stage again
    [U.REQUESTED, U.DOWNLOADING],                       # killed before the first move
    [U.SWITCHING, U.ROLLING_BACK],                      # killed around the switch: roll back
    [U.RESTARTING, U.ROLLING_BACK],
    [U.WATCHING, U.ROLLING_BACK],
    [U.ROLLING_BACK, U.ROLLING_BACK],                   # killed while rolling back: again
    [U.SWITCHING, U.RESTARTING, U.WATCHING, U.COMMITTED],  # self-update recovery finds the new version serving
], ids=lambda p: "->".join(s.value for s in p))
def test_recovery_moves_of_a_restarted_helper_are_in_the_table(path):
    rec = record_in(path[0])
    for s in path[1:]:
        rec = rec.moved(s, "recovery")
    assert rec.state is path[-1]


def test_a_new_record_is_created_requested_once(tmp_path):
    journal = Journal(tmp_path)
    fresh = UpdateRecord(update_id="u1", request=REQUEST)
    with pytest.raises(IllegalTransition):
        fresh.moved(U.DOWNLOADING)
    journal.create(fresh)
    rec = journal.load("u1")
    assert rec.state is U.REQUESTED and [t.state for t in rec.history] == ["requested"]
    with pytest.raises(IllegalTransition):
        rec.moved(U.REQUESTED)


def test_journal_refuses_to_save_a_state_written_around_the_guard(tmp_path):
    journal = Journal(tmp_path)
    journal.create(UpdateRecord(update_id="u1", request=REQUEST))
    before = journal.path("u1").read_bytes()
    forged = replace(journal.load("u1"), state=U.COMMITTED, success=True)
    with pytest.raises(IllegalTransition, match="not reached by a guarded move"):
        journal.save(forged)
    assert journal.path("u1").read_bytes() == before


def test_journal_saves_changes_that_keep_the_state(tmp_path):
    journal = Journal(tmp_path)
    journal.create(UpdateRecord(update_id="u1", request=REQUEST))
    journal.save(replace(journal.load("u1"), attempts=3))
    assert journal.load("u1").attempts == 3


def ended_record(journal: Journal, update_id: str, finished_at: float) -> None:
    journal.create(UpdateRecord(update_id=update_id, request=REQUEST))
    rec = journal.load(update_id).moved(U.DOWNLOADING).moved(U.FAILED, "gone", error="gone")
    journal.save(replace(rec, finished_at=finished_at, settled=True))


def test_journal_lists_ended_records_oldest_first_and_not_unfinished_or_pruned_ones(tmp_path):
    journal = Journal(tmp_path)
    ended_record(journal, "old", 1.0)
    ended_record(journal, "new", 2.0)
    journal.create(UpdateRecord(update_id="running", request=REQUEST))
    assert [e.update_id for e in journal.ended()] == ["old", "new"]

    running = journal.load("running").moved(U.DOWNLOADING).moved(U.FAILED, "x", error="x")
    journal.save(replace(running, settled=True))  # ended since the last look: read again, now listed
    assert [e.update_id for e in journal.ended()] == ["old", "new", "running"]

    assert journal.prune(keep=1, max_age_s=1e12, delivered=lambda e: True) == ["new", "old"]  # newest kept
    assert [e.update_id for e in journal.ended()] == ["running"]
    assert [e.update_id for e in Journal(tmp_path).ended()] == ["running"]  # as a fresh reader sees it


def test_supervisor_abandoning_a_switched_update_cannot_write_failed():
    """supervisor/updates.py writes FAILED through the record: from SWITCHING on the record refuses."""
    for s in set(UpdateState) - PRE_SWITCH:
        with pytest.raises(IllegalTransition):
            record_in(s).moved(U.FAILED, "abandoned")


# ---- the agent table, guarded by Agent._set_state --------------------------------------------------------------


def run_with_agent(tmp_path: Path, fn: Callable[[Any, list[AgentState]], None]) -> None:
    from supervisor.agents import Agent
    from tests.fakes.processes import FakeProcesses
    from tests.fakes.supervisor_clock import FakeClock

    cfg = Config(node=NodeConfig(id="n1", state_dir=tmp_path / "state", install_root=tmp_path / "install"),
                 agents=(AgentConfig(name="a", command="/bin/true"),))

    async def body() -> None:
        changes: list[AgentState] = []
        clock = FakeClock()
        agent = Agent(cfg.agents[0], cfg, lambda a: changes.append(a.state), FakeProcesses(clock), clock)
        try:
            fn(agent, changes)
        finally:
            agent.log.close()

    asyncio.run(body())


@pytest.mark.parametrize("old,new", [p for p in edges(AGENT_TRANSITIONS) if p.values[0] is not p.values[1]])
def test_agent_guard_accepts_legal_and_refuses_illegal_moves(tmp_path, old, new):
    def check(agent: Any, changes: list[AgentState]) -> None:
        agent._state = old  # the test puts it there; nothing in the code base may
        if new in AGENT_TRANSITIONS[old]:
            agent._set_state(new)
            assert agent.state is new and changes == [new]
        else:
            with pytest.raises(IllegalTransition, match=f"{old.value} -> {new.value}"):
                agent._set_state(new)
            assert agent.state is old and changes == []

    run_with_agent(tmp_path, check)


def test_agent_table_covers_every_state():
    assert set(AGENT_TRANSITIONS) == set(AgentState)


def test_agent_state_cannot_be_assigned_around_the_guard(tmp_path):
    def check(agent: Any, changes: list[AgentState]) -> None:
        with pytest.raises(AttributeError):
            agent.state = AgentState.RUNNING
        assert agent.state is AgentState.STOPPED

    run_with_agent(tmp_path, check)


@pytest.mark.parametrize("kept", sorted(AGENT_KEPT_STATES, key=lambda s: s.value), ids=lambda s: s.value)
def test_fresh_agent_restores_a_kept_state_from_the_table(tmp_path, kept):
    def check(agent: Any, changes: list[AgentState]) -> None:
        agent.restore_state(kept)
        assert agent.state is kept

    run_with_agent(tmp_path, check)


@pytest.mark.parametrize("state", sorted(set(AgentState) - AGENT_KEPT_STATES, key=lambda s: s.value),
                         ids=lambda s: s.value)
def test_agent_restore_refuses_a_state_with_a_process(tmp_path, state):
    def check(agent: Any, changes: list[AgentState]) -> None:
        with pytest.raises(IllegalTransition):
            agent.restore_state(state)
        assert agent.state is AgentState.STOPPED

    run_with_agent(tmp_path, check)


def test_agent_restore_refuses_an_agent_that_already_moved(tmp_path):
    def check(agent: Any, changes: list[AgentState]) -> None:
        agent._set_state(AgentState.FATAL)
        with pytest.raises(IllegalTransition):
            agent.restore_state(AgentState.EXITED)
        assert agent.state is AgentState.FATAL

    run_with_agent(tmp_path, check)


# ---- the helper's custody of a supervisor's descriptors --------------------------------------------------------


def handover_config(tmp_path: Path) -> Config:
    state = tmp_path / "state"
    (state / "run").mkdir(parents=True)
    return Config(node=NodeConfig(id="n1", state_dir=state, install_root=tmp_path / "install"))


@pytest.fixture
def session(tmp_path):
    from helper.self_update import HandoverSession

    s = HandoverSession(handover_config(tmp_path), "u1", "1.1.0")
    yield s
    s._custody = Custody.UNTOUCHED  # whatever a test left, close for real
    s.close()


@pytest.mark.parametrize("old,new", edges(CUSTODY_TRANSITIONS))
def test_custody_guard_accepts_legal_and_refuses_illegal_moves(session, old, new):
    session._custody = old
    if new in CUSTODY_TRANSITIONS[old]:
        session._to(new)
        assert session.custody is new
    else:
        with pytest.raises(IllegalTransition, match=f"{old.value} -> {new.value}"):
            session._to(new)
        assert session.custody is old


def test_custody_can_always_be_closed_and_closed_is_final():
    assert set(CUSTODY_TRANSITIONS) == set(Custody)
    for c in Custody:
        assert c is Custody.CLOSED or Custody.CLOSED in CUSTODY_TRANSITIONS[c], c
    assert CUSTODY_TRANSITIONS[Custody.CLOSED] == frozenset()


def test_closing_a_session_twice_is_harmless(tmp_path):
    from helper.self_update import HandoverSession

    cfg = handover_config(tmp_path)
    s = HandoverSession(cfg, "u1", "1.1.0")
    s.close()
    s.close()
    assert s.custody is Custody.CLOSED
    assert not s.path.exists() and not wire.ActiveHandover.path(cfg.run_dir).exists()


class FakeOldSupervisor(threading.Thread):
    """Serves ``<run_dir>/handover.sock`` like a running supervisor: answers PREPARE with ``reply``."""

    def __init__(self, run_dir: Path, reply: Callable[[socket.socket], None]) -> None:
        super().__init__(daemon=True)
        self.listener = wire.seqpacket_listener(run_dir / "handover.sock")
        self.reply = reply
        self.got: list[wire.Message] = []
        self.start()

    def run(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            frame, _ = wire.recv(conn, 10, "prepare")
            self.got.append(frame.message)
            self.reply(conn)
            try:
                frame, _ = wire.recv(conn, 10, "exec")
                self.got.append(frame.message)
            except wire.PeerGone:
                pass
        self.listener.close()


def test_a_refused_prepare_leaves_custody_untouched(session):
    peer = FakeOldSupervisor(session.cfg.run_dir, lambda c: wire.send(c, wire.Refused("not from the layout")))
    with pytest.raises(wire.HandoverRefused, match="not from the layout"):
        session.take_state()
    peer.join(10)
    assert peer.got == [wire.Prepare("u1")]
    assert session.custody is Custody.UNTOUCHED  # the rollback only switches the link back


def test_state_taken_from_the_old_supervisor_is_held_until_close(session):
    r, w = os.pipe()
    rec = AgentRecord("web", 4242, 1.5, "1.0.0", 1, 0, "running")

    def give_state(conn: socket.socket) -> None:
        wire.send(conn, wire.State(agents=(rec,), fds=(wire.FdDescriptor("fifo", "web"),),
                                   supervisor_version="1.0.0", pid=os.getpid()), [r])

    peer = FakeOldSupervisor(session.cfg.run_dir, give_state)
    session.take_state()
    peer.join(10)
    assert peer.got == [wire.Prepare("u1"), wire.Exec()]
    assert session.custody is Custody.EXEC_SENT
    assert session.state is not None and session.state.agents == (rec,)
    held = session.fds[0]
    os.write(w, b"x")
    assert os.read(held, 1) == b"x"  # the very pipe the supervisor passed
    session.close()
    assert session.custody is Custody.CLOSED
    with pytest.raises(OSError):
        os.fstat(held)
    os.close(r)
    os.close(w)


# ---- the handover messages -----------------------------------------------------------------------------------

SAMPLES: list[wire.Message] = [
    wire.Prepare("u1"),
    wire.State(agents=(AgentRecord("web", 10, 1.25, "1.0.0", 2, 1, "running"),),
               fds=(wire.FdDescriptor("listen", "127.0.0.1:7000"), wire.FdDescriptor("fifo", "web"),
                    wire.FdDescriptor("notify", "web"), wire.FdDescriptor("stdio", "stdout")),
               supervisor_version="1.0.0", pid=77),
    wire.State(agents=(), fds=(wire.FdDescriptor("listen", "unix:/run/x.sock"),), supervisor_version="1.0.0",
               negotiated=1),
    wire.Exec(),
    wire.Hello(version="1.1.0", pid=77, update_id="u1"),
    wire.Healthy(version="1.1.0", pid=77, agents={"web": 10}),
    wire.Unhealthy(reason="agent web not adopted", version="1.1.0", pid=77),
    wire.Commit(),
    wire.Refused(reason="protocol"),
]

# The version 1 wire format (docs/handover.md): these keys, exactly, for each message.
V1_KEYS = {
    "prepare": {"update_id"},
    "state": {"supervisor_version", "agents", "fds"},  # plus pid (old -> helper) or negotiated (helper -> new)
    "exec": set(),
    "hello": {"version", "pid", "update_id"},
    "healthy": {"version", "pid", "agents"},
    "unhealthy": {"reason", "version", "pid"},
    "commit": set(),
    "refused": {"reason"},
}


def sample_id(m: wire.Message) -> str:
    return m.TYPE


@pytest.mark.parametrize("msg", SAMPLES, ids=sample_id)
def test_every_message_round_trips(msg):
    frame = wire.decode(wire.encode(msg))
    assert frame.message == msg
    assert frame.protocol == wire.PROTOCOL_VERSION


@pytest.mark.parametrize("msg", SAMPLES, ids=sample_id)
def test_every_message_keeps_the_version_1_keys(msg):
    d = json.loads(wire.encode(msg))
    assert d["type"] == msg.TYPE and d["protocol"] == 1
    extra = {"pid"} if getattr(msg, "pid", 0) and msg.TYPE == "state" else set()
    extra |= {"negotiated"} if getattr(msg, "negotiated", 0) else set()
    assert set(d) - {"type", "protocol"} == V1_KEYS[msg.TYPE] | extra


def test_every_message_type_has_a_sample():
    assert {m.TYPE for m in SAMPLES} == set(wire.MESSAGES)


def test_descriptor_kinds_keep_their_version_1_keys():
    got = [json.loads(wire.encode(SAMPLES[1]))["fds"]]
    assert got == [[{"kind": "listen", "address": "127.0.0.1:7000"}, {"kind": "fifo", "agent": "web"},
                    {"kind": "notify", "agent": "web"}, {"kind": "stdio", "name": "stdout"}]]


def test_unknown_fields_are_ignored_for_forward_compatibility():
    d = json.loads(wire.encode(wire.Hello("1.1.0", 5, "u1")))
    d["added_in_version_2"] = {"x": 1}
    assert wire.decode(json.dumps(d).encode()).message == wire.Hello("1.1.0", 5, "u1")


def test_an_unknown_descriptor_kind_decodes_as_unknown_so_its_fd_is_closed():
    d = json.loads(wire.encode(SAMPLES[2]))
    d["fds"].append({"kind": "added_later", "whatever": 1})
    msg = wire.decode(json.dumps(d).encode()).message
    assert isinstance(msg, wire.State)
    assert [f.known for f in msg.fds] == [True, False]


def test_a_peer_speaking_an_old_protocol_decodes_and_is_refused_at_negotiation():
    """The "old protocol" self-update case: HELLO with protocol 0 is well-formed; negotiate refuses it."""
    d = json.loads(wire.encode(wire.Hello("1.1.0", 5, "u1")))
    d["protocol"] = 0
    frame = wire.decode(json.dumps(d).encode())
    assert frame.protocol == 0
    with pytest.raises(wire.HandoverRefused, match="protocol 0"):
        wire.negotiate(frame.protocol)


MALFORMED: list[tuple[str, bytes, str]] = [
    ("not json", b"{nope", "not JSON"),
    ("not an object", b"[1, 2]", "JSON object"),
    ("no type", b'{"protocol": 1}', "unknown handover message type"),
    ("unknown type", b'{"protocol": 1, "type": "reboot"}', "unknown handover message type 'reboot'"),
    ("type not a string", b'{"protocol": 1, "type": 7}', "unknown handover message type"),
    ("no protocol", b'{"type": "exec"}', "lacks 'protocol'"),
    ("protocol a string", b'{"protocol": "1", "type": "exec"}', "'protocol' must be int"),
    ("protocol a bool", b'{"protocol": true, "type": "exec"}', "'protocol' must be int"),
    ("agents not a list", b'{"protocol": 1, "type": "state", "agents": {}, "fds": []}', "'agents' must be list"),
    ("agent not an object", b'{"protocol": 1, "type": "state", "agents": [1], "fds": []}', "agent record"),
    ("agent without pid", b'{"protocol": 1, "type": "state", "agents": [{"name": "a", "start_time": 1}], "fds": []}',
     "malformed agent record"),
    ("fd not an object", b'{"protocol": 1, "type": "state", "agents": [], "fds": ["x"]}', "descriptor"),
    ("listen fd without address", b'{"protocol": 1, "type": "state", "agents": [], "fds": [{"kind": "listen"}]}',
     "lacks 'address'"),
    ("healthy agents not pids", b'{"protocol": 1, "type": "healthy", "version": "1", "pid": 1, "agents": {"a": "x"}}',
     "map names to pids"),
]


@pytest.mark.parametrize("data,match", [(d, m) for _, d, m in MALFORMED], ids=[n for n, _, _ in MALFORMED])
def test_malformed_messages_raise_a_protocol_error(data, match):
    with pytest.raises(wire.ProtocolError, match=match):
        wire.decode(data)


def _required_fields(msg: wire.Message) -> list[str]:
    return sorted(V1_KEYS[msg.TYPE] & {"update_id", "agents", "fds", "version", "pid", "reason"}
                  - ({"pid", "version"} if msg.TYPE == "unhealthy" else set())
                  - ({"agents"} if msg.TYPE == "healthy" else set()))


@pytest.mark.parametrize("msg,key", [pytest.param(m, k, id=f"{m.TYPE}-{k}") for m in SAMPLES
                                     for k in _required_fields(m)])
def test_every_required_field_is_checked(msg, key):
    d = json.loads(wire.encode(msg))
    del d[key]
    with pytest.raises(wire.ProtocolError, match=f"lacks '{key}'"):
        wire.decode(json.dumps(d).encode())
    d[key] = None
    with pytest.raises(wire.ProtocolError, match=f"'{key}' must be"):
        wire.decode(json.dumps(d).encode())


def test_expecting_one_message_and_getting_another_is_a_protocol_error():
    frame = wire.decode(wire.encode(wire.Commit()))
    assert frame.expect(wire.Commit) == wire.Commit()
    with pytest.raises(wire.ProtocolError, match="expected hello, got commit"):
        frame.expect(wire.Hello)


def test_messages_and_descriptors_cross_a_real_socket():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    try:
        wire.send(a, SAMPLES[2], [r])
        frame, fds = wire.recv(b, 5, "state")
        assert frame.message == SAMPLES[2] and len(fds) == 1
        os.write(w, b"y")
        assert os.read(fds[0], 1) == b"y"
        os.close(fds[0])
    finally:
        for s in (a, b):
            s.close()
        os.close(r)
        os.close(w)


def test_a_malformed_message_on_the_socket_closes_the_fds_that_came_with_it():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    try:
        a.sendmsg([b'{"protocol": 1, "type": "reboot"}'], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                              array.array("i", [r]))])
        before = set(os.listdir("/proc/self/fd"))
        with pytest.raises(wire.ProtocolError, match="reboot"):
            wire.recv(b, 5, "state")
        assert set(os.listdir("/proc/self/fd")) <= before
    finally:
        for s in (a, b):
            s.close()
        os.close(r)
        os.close(w)
