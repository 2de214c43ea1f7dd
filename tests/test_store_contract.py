"""One contract for both stores: SQLite (the embedded default) and PostgreSQL (several replicas).

Every test runs against each, the PostgreSQL one on a fresh database of the session's real cluster.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from baton.states import UpdateState
from manager.errors import FinalResultKept, NotOwner, SchemaTooNew, StoreError
from manager.store import (
    SCHEMA_VERSION,
    Node,
    PostgresStore,
    ResultRow,
    RolloutNodeRow,
    RolloutRow,
    SqliteStore,
    Store,
    UpdateRow,
    open_store,
)

pytestmark = pytest.mark.e2e  # every test here starts a process


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'm.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    s = open_store(store_url)
    yield s
    s.close()


def result(update_id: str, state: str = "committed", **kw: object) -> ResultRow:
    fields: dict[str, object] = dict(update_id=update_id, node="node-1", component="app", from_version="1.0.0",
                                     to_version="1.1.0", state=UpdateState(state), success=state == "committed",
                                     rolled_back=state == "rolled_back", error="", timings={"download": 0.1},
                                     started_at=1.0, finished_at=2.0)
    fields.update(kw)
    return ResultRow(**fields)  # type: ignore[arg-type]


def rollout_row(rollout_id: str, created_at: float = 1.0, state: str = "running") -> RolloutRow:
    return RolloutRow(rollout_id, {"nodes": ["node-1"]}, state, {"nodes": {}}, created_at, created_at)


def test_store_url_chooses_the_database(tmp_path, pg_url):
    assert isinstance(open_store(str(tmp_path / "a.db")), SqliteStore), "a bare path is SQLite"
    assert isinstance(open_store(f"sqlite://{tmp_path / 'b.db'}"), SqliteStore)
    assert isinstance(open_store(pg_url), PostgresStore)
    for bad in ("mysql://x/y", "sqlite://relative.db"):
        with pytest.raises(StoreError):
            open_store(bad)
    with pytest.raises(StoreError) as e:
        open_store("postgresql://baton:secret@/nonexistent?host=/nonexistent-dir")
    assert "secret" not in str(e.value), "the password is never shown"


def test_nodes_are_registered_with_their_labels_touched_and_unknown_ones_say_so(store):
    store.register_node(Node("node-2", version="1.0", address="127.0.0.1:1", labels=(("role", "web"), ("zone", "a"))))
    store.register_node(Node("node-1", version="1.0", labels=(("role", "db"),)))
    assert [n.id for n in store.nodes()] == ["node-1", "node-2"]
    n2 = store.node("node-2")
    assert (n2.address, n2.labels) == ("127.0.0.1:1", (("role", "web"), ("zone", "a")))
    assert n2.matches({"role": "web", "zone": "a"}) and not n2.matches({"role": "web", "zone": "b"})
    seen = n2.last_seen
    time.sleep(0.01)
    assert store.touch_node("node-2", "1.1") is True
    assert (store.node("node-2").version, store.node("node-2").last_seen > seen) == ("1.1", True)
    assert store.touch_node("ghost") is False, "an unknown node must register again"
    assert store.set_agents("node-1", [{"name": "app", "state": "running"}]) is True
    assert store.node("node-1").agents == ({"name": "app", "state": "running"},)


def test_results_are_deduplicated_by_update_id_and_a_final_update_never_moves_back(store):
    assert store.create_update(UpdateRow(update_id="u1", node="node-1", component="app", to_version="1.1.0"))
    assert not store.create_update(UpdateRow(update_id="u1", node="node-1", component="app", to_version="1.1.0"))
    store.progress_update("u1", UpdateState.DOWNLOADING)
    assert store.update("u1").state == UpdateState.DOWNLOADING
    assert store.record_result(result("u1")) is False
    assert store.record_result(result("u1")) is True, "the second delivery is a duplicate"
    store.progress_update("u1", UpdateState.WATCHING)  # a late progress line from a pusher
    store.finish_update(UpdateRow(update_id="u1", node="node-1", component="app", to_version="1.1.0",
                                  state=UpdateState.FAILED, error="pusher's view"))
    row = store.update("u1")
    assert (row.state, row.success, row.reports, row.error) == (UpdateState.COMMITTED, True, 2, "")

    assert store.record_result(result("u2", "rolled_back", error="not ready")) is False, "unknown ids are recorded"
    assert [u.update_id for u in store.updates(state="rolled_back")] == ["u2"]
    assert [u.update_id for u in store.updates(node="node-1", component="app")] == ["u2", "u1"], \
        "oldest first: u2 started (started_at=1.0) before u1 was pushed"


def test_a_result_from_another_node_is_refused_and_changes_nothing(store):
    assert store.create_update(UpdateRow(update_id="u1", node="node-1", component="app", to_version="1.1.0"))
    pushed = store.update("u1")
    with pytest.raises(NotOwner) as e:
        store.record_result(result("u1", node="node-2"))
    assert (e.value.owner, e.value.node) == ("node-1", "node-2")
    assert store.update("u1") == pushed
    assert store.record_result(result("u2", "rolled_back")) is False
    reported = store.update("u2")
    with pytest.raises(NotOwner):
        store.record_result(result("u2", node="node-2"))
    assert store.update("u2") == reported


def test_a_reported_final_result_is_never_replaced_by_another(store):
    assert store.record_result(result("u1", "rolled_back", error="not ready")) is False
    reported = store.update("u1")
    with pytest.raises(FinalResultKept) as e:
        store.record_result(result("u1", "committed"))
    assert (e.value.kept, e.value.offered) == ("rolled_back", "committed")
    assert store.update("u1") == reported
    assert store.record_result(result("u1", "rolled_back", error="not ready")) is True, "the same one again"
    assert store.update("u1").reports == 2


def test_one_result_delivered_to_two_replicas_at_once_counts_one_first_delivery(store_url):
    stores = [open_store(store_url) for _ in range(2)]
    answers: list[bool] = []
    barrier = threading.Barrier(2)

    def deliver(s: Store) -> None:
        barrier.wait()
        answers.append(s.record_result(result("u1")))

    threads = [threading.Thread(target=deliver, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(answers) == [False, True]
    assert stores[0].update("u1").reports == 2
    for s in stores:
        s.close()


def test_one_store_shared_by_many_threads_records_every_result_once(store):
    barrier = threading.Barrier(8)
    firsts: list[bool] = []

    def deliver(i: int) -> None:
        barrier.wait()
        for j in range(10):
            store.touch_node(f"node-{i}")
            firsts.append(not store.record_result(result(f"u{i}-{j}", node=f"node-{i}")))

    threads = [threading.Thread(target=deliver, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert firsts.count(True) == 80
    assert len(store.updates()) == 80 and all(u.reports == 1 for u in store.updates())


def test_only_one_replica_claims_a_rollout_until_its_lease_runs_out(store_url):
    a, b = open_store(store_url), open_store(store_url)
    a.create_rollout(rollout_row("r-1"))
    a.create_rollout(rollout_row("r-done", 0.5, state="completed"))
    assert a.claim_rollout("replica-a", 0.5) == "r-1"
    assert b.claim_rollout("replica-b", 0.5) is None, "held by a, and a finished rollout is never claimed"
    assert a.claim_rollout("replica-a", 0.5) is None, "a replica is not handed what it drives already"
    assert a.save_rollout("r-1", "running", {"nodes": {}, "n": 1}, owner="replica-a")
    assert not b.save_rollout("r-1", "running", {"nodes": {}, "n": 2}, owner="replica-b"), "not the owner"
    time.sleep(0.6)
    assert b.claim_rollout("replica-b", 5) == "r-1", "a's lease ran out"
    assert not a.renew_lease("r-1", "replica-a", 5), "a learns it lost the rollout"
    assert not a.save_rollout("r-1", "running", {"nodes": {}, "n": 3}, owner="replica-a"), "a is fenced off"
    assert b.renew_lease("r-1", "replica-b", 5)
    row = a.rollout("r-1")
    assert (row.owner, row.progress["n"]) == ("replica-b", 1)
    b.release_rollout("r-1", "replica-b")
    assert a.rollout("r-1").owner == ""
    a.close()
    b.close()


def test_many_replicas_claiming_at_once_get_each_rollout_once(store_url):
    stores = [open_store(store_url) for _ in range(4)]
    for i in range(6):
        stores[0].create_rollout(rollout_row(f"r-{i}", float(i)))
    claimed: list[str] = []
    barrier = threading.Barrier(len(stores))

    def claim(i: int, s: Store) -> None:
        barrier.wait()
        while (rid := s.claim_rollout(f"replica-{i}-", 60)) is not None:
            claimed.append(rid)
            s.save_rollout(rid, "completed", {"nodes": {}}, owner=f"replica-{i}-")

    threads = [threading.Thread(target=claim, args=(i, s)) for i, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(claimed) == [f"r-{i}" for i in range(6)]
    for s in stores:
        s.close()


def test_pause_resume_and_cancel_are_recorded_for_the_owner_and_a_cancel_is_final(store):
    store.create_rollout(rollout_row("r-1"))
    assert store.control_rollout("r-1", "pause")
    assert store.rollout("r-1").control == "pause"
    assert store.control_rollout("r-1", "")
    assert store.control_rollout("r-1", "cancel")
    assert not store.control_rollout("r-1", ""), "a cancel is not taken back"
    assert store.rollout("r-1").control == "cancel"
    store.save_rollout("r-1", "cancelled", {"nodes": {}})
    assert not store.control_rollout("r-1", "pause"), "an ended rollout takes no control"
    assert not store.control_rollout("r-nope", "pause")
    with pytest.raises(ValueError):
        store.control_rollout("r-1", "explode")


def test_a_rollouts_nodes_keep_their_order_and_their_steps_are_fenced_and_counted_per_batch(store):
    nodes = [RolloutNodeRow("node-3", 0), RolloutNodeRow("node-1", 1), RolloutNodeRow("node-2", 1)]
    store.create_rollout(rollout_row("r-1"), nodes)
    assert [n.node for n in store.rollout_nodes("r-1")] == ["node-3", "node-1", "node-2"], "the rollout's order"
    assert store.claim_rollout("replica-a", 60) == "r-1"
    assert store.save_rollout_node("r-1", RolloutNodeRow("node-3", 0, step="succeeded", update_id="u3"),
                                   owner="replica-a")
    assert store.save_rollout_node("r-1", RolloutNodeRow("node-1", 1, step="running", update_id="u1"),
                                   owner="replica-a")
    assert not store.save_rollout_node("r-1", RolloutNodeRow("node-2", 1, step="pushing", update_id="u2"),
                                       owner="replica-b"), "only the owner writes a step"
    assert store.rollout_batches("r-1") == {0: {"succeeded": 1}, 1: {"pending": 1, "running": 1}}
    progress = store.rollout("r-1").progress
    assert progress["nodes"]["node-1"] == {"step": "running", "batch": 1, "update_id": "u1", "error": "",
                                           "offline_since": 0.0, "cancel": ""}
    assert progress["batches"] == {"0": {"succeeded": 1}, "1": {"pending": 1, "running": 1}}
    assert "nodes" not in store.rollout("r-1", with_nodes=False).progress
    assert [r.progress["nodes"]["node-3"]["step"] for r in store.rollouts()] == ["succeeded"]


def test_settings_are_shared_through_the_store(store):
    assert store.setting("packages_url") is None
    store.set_setting("packages_url", "http://a")
    store.set_setting("packages_url", "http://b")
    assert store.setting("packages_url") == "http://b"


def test_bytes_served_per_package_add_up_across_threads_and_replicas(store_url):
    stores = [open_store(store_url), open_store(store_url)]
    sha = "ab" * 32
    try:
        threads = [threading.Thread(target=lambda s=s: [s.add_served_bytes(sha, 1000) for _ in range(20)])
                   for s in stores for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [s.served_bytes(sha) for s in stores] == [120_000, 120_000]
        assert stores[0].served_bytes("cd" * 32) == 0
    finally:
        for s in stores:
            s.close()


def test_an_old_database_is_migrated_in_order_and_a_newer_one_is_refused(store_url):
    cls = PostgresStore if store_url.startswith("postgresql") else SqliteStore
    arg = store_url if cls is PostgresStore else Path(store_url.removeprefix("sqlite://"))
    old = cls(arg, migrate_to=1)  # type: ignore[arg-type]
    nodes = {"node-1": {"step": "succeeded", "batch": 0, "update_id": "u1", "error": ""},
             "node-2": {"step": "pending", "batch": 1, "update_id": "", "error": ""}}
    sql = "INSERT INTO rollouts (id, spec, state, progress, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)"
    conn = psycopg.connect(store_url, autocommit=True) if cls is PostgresStore else old._conn
    usql = ("INSERT INTO updates (update_id, node, component, to_version, state, created_at) "
            "VALUES ('u1', 'node-1', 'app', '1.1.0', 'requested', 1.0)")  # as version 1 code wrote it
    conn.execute(usql)
    conn.execute(sql.replace("?", "%s") if cls is PostgresStore else sql,  # a rollout as version 1 kept it
                 ("r-old", json.dumps({"nodes": ["node-1", "node-2"]}), "halted",
                       json.dumps({"nodes": nodes, "reason": "r"}), 1.0, 1.0))
    old.close()

    store = open_store(store_url)
    row = store.update("u1")
    assert (row.state, row.reports, row.reported_at, row.started_by) == (UpdateState.REQUESTED, 0, None, "")
    rollout = store.rollout("r-old")
    assert {n: p["step"] for n, p in rollout.progress["nodes"].items()} == {"node-1": "succeeded", "node-2": "pending"}
    assert (rollout.progress["batches"], rollout.owner, rollout.control) == (
        {"0": {"succeeded": 1}, "1": {"pending": 1}}, "", ""), "its nodes as it kept them, in the new columns' defaults"
    if isinstance(store, PostgresStore):
        assert store.schema_version() == SCHEMA_VERSION
        with psycopg.connect(store_url, autocommit=True) as conn:
            conn.execute("UPDATE schema_version SET version = 99")
    else:
        assert store._conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        store._conn.execute("PRAGMA user_version = 99")
    store.close()
    with pytest.raises(SchemaTooNew):
        open_store(store_url)


def test_postgres_store_replaces_a_connection_the_server_dropped(pg_url):
    store = PostgresStore(pg_url)
    store.set_setting("k", "v")
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE datname = current_database() AND pid <> pg_backend_pid()")
    with pytest.raises(psycopg.OperationalError):
        store.setting("k")  # the call that finds the connection gone fails ...
    assert store.setting("k") == "v", "... and the next one runs on a new connection"
    store.close()
