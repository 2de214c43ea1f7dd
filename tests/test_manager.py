"""The reference Manager with real supervisors: push, staged rollouts, the history, results exactly once."""

from __future__ import annotations

import http.client
import json
import re
import signal
import time

import pytest

from baton.pb import common_pb2
from manager.packages import PackageServer
from tests.conftest import wait_for
from tests.manager_fixtures import (
    journal_ids,
    make_fleet,
    make_manager_fixture,  # noqa: F401  (the make_manager fixture)
    node_update,
    package_args,
    signed,
)

ROLLOUT_ID = re.compile(r"rollout (r-[0-9a-f]+)")


@pytest.mark.e2e
def test_push_to_one_node_then_rollout_to_all_with_a_canary_and_the_history_shows_every_update(
        make_manager, make_supervisor, release):
    manager = make_manager()
    hosts = make_fleet(make_supervisor, release, manager, 3)

    pkg = signed(release.build("1.1.0"))
    res = manager.cli("push", "node-1", *package_args(pkg))
    assert "committed" in res.stdout
    assert hosts[0].sup.agent("app").version == "1.1.0"
    assert [h.sup.agent("app").version for h in hosts[1:]] == ["1.0.0", "1.0.0"]
    served = list((manager.packages).rglob("*.tar.gz"))
    assert [p.name for p in served] == [pkg.path.name], "the node downloaded it from the Manager's package server"

    pkg2 = signed(release.build("1.2.0"))
    res = manager.cli("rollout", "--all", "--canary", "1", "--batch-size", "2", *package_args(pkg2))
    out = res.stdout
    assert "canary: node-1" in out and "batch 1: node-2, node-3" in out
    assert out.index("node-1: succeeded") < out.index("batch 1: node-2, node-3"), "the canary goes first, alone"
    assert "completed: 3 of 3 nodes updated" in out
    assert [h.sup.agent("app").version for h in hosts] == ["1.2.0"] * 3
    rollout_id = ROLLOUT_ID.search(out).group(1)

    history = manager.updates()
    assert (history[0]["node"], history[0]["to_version"]) == ("node-1", "1.1.0"), "oldest first"
    assert {(u["node"], u["to_version"]) for u in history} == {
        ("node-1", "1.1.0"), ("node-1", "1.2.0"), ("node-2", "1.2.0"), ("node-3", "1.2.0")}
    assert all(u["state"] == "committed" and u["finished_at"] and u["timings"] for u in history)
    assert {u["node"]: u["from_version"] for u in history if u["to_version"] == "1.2.0"} == {
        "node-1": "1.1.0", "node-2": "1.0.0", "node-3": "1.0.0"}
    assert {u["rollout_id"] for u in history if u["to_version"] == "1.2.0"} == {rollout_id}
    wait_for(lambda: all(u["reports"] == 1 for u in manager.updates()), 10, what="every result reported once")

    table = manager.cli("updates").stdout.splitlines()
    assert table[0].split()[:6] == ["UPDATE", "NODE", "COMPONENT", "FROM", "TO", "STATE"]
    assert len(table) == 5 and all(" committed " in line and " ok " in line for line in table[1:])
    only = manager.updates("--node", "node-2", "--state", "committed")
    assert [(u["node"], u["to_version"]) for u in only] == [("node-2", "1.2.0")]
    assert manager.updates("--component", "other") == []
    assert "node-3" in manager.cli("nodes").stdout


@pytest.mark.e2e
def test_rollout_halts_when_the_canary_fails_and_leaves_the_other_nodes_untouched(
        make_manager, make_supervisor, release):
    manager = make_manager()
    hosts = make_fleet(make_supervisor, release, manager, 3, update={"health_timeout_s": 1.5})
    before = {h.sup.cfg["node"]["id"]: h.sup.agent("app").pid for h in hosts}

    bad = signed(release.build("2.0.0", "never_ready"))
    res = manager.cli("rollout", "--nodes", "node-1,node-2,node-3", "--canary", "1", "--batch-size", "2",
                      *package_args(bad), check=False)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "halted: the canary failed on node-1; node-2, node-3 left untouched" in res.stdout
    assert hosts[0].sup.agent("app").version == "1.0.0", "the canary was rolled back"
    for h in hosts[1:]:
        assert journal_ids(h) == [], "no push reached the other nodes"
        assert h.sup.agent("app").pid == before[h.sup.cfg["node"]["id"]]
        assert h.sup.agent("app").version == "1.0.0"

    [canary] = manager.updates()
    assert (canary["node"], canary["state"], canary["rolled_back"], canary["success"]) == \
        ("node-1", "rolled_back", True, False)
    assert canary["error"]
    rollout = json.loads(manager.cli("rollouts", "--json").stdout)[0]
    assert rollout["state"] == "halted"
    assert {n: p["step"] for n, p in rollout["progress"]["nodes"].items()} == {
        "node-1": "failed", "node-2": "pending", "node-3": "pending"}
    resumed = manager.cli("rollout", "resume", rollout["id"], check=False)
    assert resumed.returncode == 2 and "it is halted" in resumed.stderr, "a halted rollout stays halted"


@pytest.mark.e2e
def test_result_of_an_update_that_finishes_while_the_manager_is_down_arrives_once_after_it_restarts(
        make_manager, make_supervisor, release):
    manager = make_manager()
    [host] = make_fleet(make_supervisor, release, manager, 1, update={"health_window_s": 2.0})
    pkg = signed(release.build("1.1.0"))
    res = manager.cli("push", "node-1", *package_args(pkg), "--no-follow", "--json")
    update_id = json.loads(res.stdout)["update_id"]
    wait_for(lambda: node_update(host, update_id).state == common_pb2.UPDATE_STATE_WATCHING, 20,
             what="the update to be past its download")
    manager.stop()

    assert host.wait_final(update_id).success
    time.sleep(1.0)  # the outbox has tried and failed meanwhile
    marker = host.sup.state_dir / "updates" / update_id / "reported"
    assert not marker.exists()
    assert manager.row(update_id).state.value == "requested", "nobody told the stopped Manager"

    manager.start()
    wait_for(lambda: manager.row(update_id).reported_at, 20, what="the result after the restart")
    wait_for(marker.exists, 10, what="the supervisor to mark it reported")
    time.sleep(1.0)
    row = manager.row(update_id)
    assert (row.state.value, row.success, row.reports) == ("committed", True, 1)
    assert row.from_version == "1.0.0" and "health" in row.timings


@pytest.mark.e2e
def test_supervisor_killed_before_it_could_report_delivers_the_result_once_after_both_restart(
        make_manager, make_supervisor, release):
    manager = make_manager()
    [host] = make_fleet(make_supervisor, release, manager, 1)
    manager.stop()  # so the supervisor cannot deliver before it is killed
    update_id = host.push(signed(release.build("1.1.0")))
    assert host.wait_final(update_id).success
    host.sup.kill()
    manager.start()
    host.sup.start()
    wait_for(lambda: manager.row(update_id), 20, what="the result from the restarted supervisor")
    wait_for((host.sup.state_dir / "updates" / update_id / "reported").exists, 10, what="the reported marker")
    time.sleep(1.0)
    row = manager.row(update_id)
    assert (row.state.value, row.success, row.reports, row.node) == ("committed", True, 1, "node-1")


@pytest.mark.e2e
def test_rollout_goes_on_by_itself_after_a_serve_restart_without_pushing_any_node_twice(
        make_manager, make_supervisor, release):
    manager = make_manager()
    hosts = make_fleet(make_supervisor, release, manager, 3, update={"health_window_s": 2.0})
    pkg = signed(release.build("1.1.0"))
    log = manager.base / "rollout.out"
    follower = manager.popen("rollout", "--all", "--canary", "1", "--batch-size", "2", *package_args(pkg), log=log)

    def canary_update() -> str:
        rollout = json.loads(manager.cli("rollouts", "--json").stdout)[0]
        p = rollout["progress"]["nodes"]["node-1"]
        return str(p["update_id"]) if p["step"] == "running" else ""

    update_id = wait_for(canary_update, 20, interval=0.1, what="the canary's push")
    wait_for(lambda: node_update(hosts[0], update_id).state == common_pb2.UPDATE_STATE_WATCHING, 20,
             what="the canary to be past its download")
    follower.send_signal(signal.SIGINT)  # Ctrl-C stops following, not the rollout
    assert follower.wait(10) == 0
    assert "stopped following" in log.read_text()
    manager.stop()  # the serve carrying the rollout out goes away mid-canary
    assert hosts[0].wait_final(update_id).success
    manager.start()

    rollout_id = ROLLOUT_ID.search(log.read_text()).group(1)
    res = manager.cli("rollout", "follow", rollout_id)
    assert "completed: 3 of 3 nodes updated" in res.stdout
    assert [h.sup.agent("app").version for h in hosts] == ["1.1.0"] * 3
    assert [len(journal_ids(h)) for h in hosts] == [1, 1, 1], "each node got exactly one push"
    assert journal_ids(hosts[0]) == [update_id], "the canary's running update was picked up, not pushed again"
    history = manager.updates("--rollout", rollout_id)
    assert sorted(u["node"] for u in history) == ["node-1", "node-2", "node-3"]
    assert all(u["state"] == "committed" for u in history)
    wait_for(lambda: all(u["reports"] == 1 for u in manager.updates()), 10, what="every result recorded once")
    old = manager.cli("rollout", "--resume", rollout_id)
    assert "--resume only follows" in old.stdout and "completed" in old.stdout, "the old flag is a harmless alias"


# ---- the package server on its own (the store: tests/test_store_contract.py) ----------------------------


def test_package_server_serves_ranges_and_nothing_outside_its_directory(tmp_path):
    root = tmp_path / "served"
    (root / "abc").mkdir(parents=True)
    data = bytes(range(256)) * 40
    (root / "abc" / "pkg.tar.gz").write_bytes(data)
    (tmp_path / "secret").write_text("no")
    (root / "link").symlink_to(tmp_path / "secret")
    server = PackageServer(root, "127.0.0.1", 0).start()
    try:
        def get(path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
            conn = http.client.HTTPConnection("127.0.0.1", int(server.address.rsplit(":", 1)[1]), timeout=5)
            conn.request("GET", path, headers=headers or {})
            resp = conn.getresponse()
            body = resp.read()
            conn.close()
            return resp.status, dict(resp.getheaders()), body

        status, headers, body = get("/abc/pkg.tar.gz")
        assert (status, body, headers["Accept-Ranges"]) == (200, data, "bytes")
        status, headers, body = get("/abc/pkg.tar.gz", {"Range": "bytes=100-199"})
        assert (status, headers["Content-Range"], body) == (206, f"bytes 100-199/{len(data)}", data[100:200])
        status, headers, body = get("/abc/pkg.tar.gz", {"Range": "bytes=10000-"})
        assert (status, body) == (206, data[10000:])
        status, headers, body = get("/abc/pkg.tar.gz", {"Range": "bytes=-5"})
        assert (status, body) == (206, data[-5:])
        status, headers, _ = get("/abc/pkg.tar.gz", {"Range": f"bytes={len(data)}-"})
        assert (status, headers["Content-Range"]) == (416, f"bytes */{len(data)}")
        for bad in ("/../secret", "/abc/../../secret", "/%2e%2e/secret", "/link", "/abc", "/", "/nope"):
            assert get(bad)[0] == 404, bad
    finally:
        server.stop()
