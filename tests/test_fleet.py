"""Fleet scale with real processes: Manager replicas on a real PostgreSQL, supervisors failing over between
them, rollouts carried out by serve under a lease (taken over when its owner is SIGKILLed), and the rollout
controls: pause, resume, cancel, label selectors, --max-parallel, offline nodes."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from baton.config import ConfigError, load_config
from tests.conftest import PY, ROOT, Release, SupervisorProc, UpdateHost, wait_for
from tests.manager_fixtures import (
    ManagerProc,
    journal_ids,
    make_manager_fixture,  # noqa: F401  (the make_manager fixture)
    node_config,
    package_args,
    signed,
    start_node,
)

LEASE = ("--rollout-lease", "2")
# A canary's health window when a CLI call (pause, cancel) must land while it runs: longer than such a call takes
# on a loaded machine (with 1.5 to 2 s the canary finished first and the next batch was pushed).
CANARY_WINDOW_S = 6.0


def fleet(make_supervisor: Callable[..., SupervisorProc], release: Release, managers: list[ManagerProc],
          labels: dict[str, dict[str, str]], update: dict[str, Any] | None = None) -> list[UpdateHost]:
    """Nodes named by ``labels`` (node id -> its [node] labels), each given every replica's address."""
    extra = node_config(managers[0], release, update,
                        manager_extra={"address": [m.address for m in managers]})
    hosts = []
    for node_id, node_labels in labels.items():
        cfg = {**extra, "node": {"labels": node_labels}}
        hosts.append(start_node(make_supervisor, release, node_id, cfg, wait=False))
    for h in hosts:
        h.sup.wait_ready()
        h.sup.wait_agent("app", "running")
    wait_for(lambda: set(labels) <= {k for k, v in managers[0].nodes().items() if v["address"]}, 20,
             interval=0.2, what="every node to register")
    return hosts


def rollout(manager: ManagerProc, rollout_id: str) -> dict[str, Any]:
    """The fields of ``rollouts --json`` these tests read, polled in-process (``ManagerProc.rollout``)."""
    r = manager.rollout(rollout_id)
    return {"state": r.state, "progress": r.progress, "owner": r.owner}


def steps(manager: ManagerProc, rollout_id: str) -> dict[str, str]:
    return {n: p["step"] for n, p in rollout(manager, rollout_id)["progress"]["nodes"].items()}


def submit(manager: ManagerProc, *args: str) -> str:
    res = manager.cli("rollout", *args, "--no-follow", "--json")
    return str(json.loads(res.stdout.splitlines()[-1])["rollout_id"])


@pytest.mark.e2e
def test_supervisor_fails_over_to_another_replica_and_a_result_after_the_kill_is_recorded_once(
        make_manager, make_supervisor, release, pg_url):
    first = make_manager("m1", db=pg_url)
    second = make_manager("m2", db=pg_url)
    [host] = fleet(make_supervisor, release, [first, second], {"node-1": {}})
    assert "node node-1 registered" in first.output(), "the supervisor talks to the first address"
    seen = second.nodes()["node-1"]["last_seen"]

    first.proc.kill()  # SIGKILL: no goodbye
    first.proc.wait(10)
    wait_for(lambda: "node node-1 registered" in second.output(), 20, what="registration with the other replica")
    wait_for(lambda: second.nodes()["node-1"]["last_seen"] > seen + 1, 20, what="heartbeats to the other replica")
    wait_for(lambda: host.sup.status().manager_connected, 10, what="the supervisor to be connected")

    update_id = host.push(signed(release.build("1.1.0")))  # a result produced after the kill
    assert host.wait_final(update_id).success
    wait_for(lambda: second.row(update_id) and second.row(update_id).reported_at, 20,
             what="the result through the other replica")
    wait_for((host.sup.state_dir / "updates" / update_id / "reported").exists, 10, what="the reported marker")
    time.sleep(1.0)
    row = second.row(update_id)
    assert (row.state.value, row.success, row.reports, row.node) == ("committed", True, 1, "node-1")


@pytest.mark.e2e
def test_rollout_owner_killed_midway_is_taken_over_by_another_replica_and_no_node_is_pushed_twice(
        make_manager, make_supervisor, release, pg_url):
    replicas = [make_manager("m1", db=pg_url, args=LEASE), make_manager("m2", db=pg_url, args=LEASE)]
    hosts = fleet(make_supervisor, release, replicas, {f"node-{i}": {} for i in (1, 2, 3, 4)},
                  update={"health_window_s": 1.5})
    pkg = signed(release.build("1.1.0"))
    rollout_id = submit(replicas[0], "--all", "--canary", "1", "--batch-size", "3", *package_args(pkg),
                        "--url", pkg.url)

    wait_for(lambda: steps(replicas[0], rollout_id)["node-1"] == "running", 30, interval=0.1,
             what="the canary to run")
    owner = rollout(replicas[0], rollout_id)["owner"]
    [victim] = [m for m in replicas if f":{m.proc.pid}:" in owner]
    [survivor] = [m for m in replicas if m is not victim]
    victim.proc.kill()  # SIGKILL of the rollout's owner, half way through its canary
    victim.proc.wait(10)

    wait_for(lambda: rollout(survivor, rollout_id)["owner"] not in ("", owner), 20, interval=0.1,
             what="another replica to take the rollout over once the 2 s lease ran out")
    res = survivor.cli("rollout", "follow", rollout_id, timeout=120)
    assert "completed: 4 of 4 nodes updated" in res.stdout, res.stdout
    assert [h.sup.agent("app").version for h in hosts] == ["1.1.0"] * 4

    final = rollout(survivor, rollout_id)
    assigned = {n: p["update_id"] for n, p in final["progress"]["nodes"].items()}
    for h in hosts:
        node = h.sup.cfg["node"]["id"]
        assert journal_ids(h) == [assigned[node]], f"{node} was pushed exactly once, with the id fixed before"
    wait_for(lambda: len(survivor.updates()) == 4 and all(u["reports"] == 1 for u in survivor.updates()), 20,
             what="every result recorded once")
    assert {u["rollout_id"] for u in survivor.updates()} == {rollout_id}


@pytest.mark.e2e
def test_pause_lets_the_running_update_finish_and_pushes_nothing_new_until_resume(
        make_manager, make_supervisor, release):
    manager = make_manager()
    hosts = fleet(make_supervisor, release, [manager], {f"node-{i}": {} for i in (1, 2, 3)},
                  update={"health_window_s": CANARY_WINDOW_S})
    pkg = signed(release.build("1.1.0"))
    rollout_id = submit(manager, "--all", "--canary", "1", "--batch-size", "2", *package_args(pkg))
    wait_for(lambda: steps(manager, rollout_id)["node-1"] == "running", 30, interval=0.1, what="the canary")

    assert "pausing" in manager.cli("rollout", "pause", rollout_id).stdout
    wait_for(lambda: rollout(manager, rollout_id)["state"] == "paused", 10, interval=0.1, what="paused")
    wait_for(lambda: steps(manager, rollout_id)["node-1"] == "succeeded", 30, interval=0.2,
             what="the running canary to finish while paused")
    time.sleep(2.0)  # several ticks of the owner: nothing new may start
    assert steps(manager, rollout_id) == {"node-1": "succeeded", "node-2": "pending", "node-3": "pending"}
    assert [journal_ids(h) != [] for h in hosts] == [True, False, False]

    assert "resuming" in manager.cli("rollout", "resume", rollout_id).stdout
    res = manager.cli("rollout", "follow", rollout_id)
    assert "completed: 3 of 3 nodes updated" in res.stdout
    assert [len(journal_ids(h)) for h in hosts] == [1, 1, 1]


@pytest.mark.e2e
def test_cancel_stops_new_pushes_asks_the_running_node_to_cancel_and_records_each_node(
        make_manager, make_supervisor, release):
    manager = make_manager()
    hosts = fleet(make_supervisor, release, [manager], {f"node-{i}": {} for i in (1, 2, 3)},
                  update={"health_window_s": CANARY_WINDOW_S})
    pkg = signed(release.build("1.1.0"))
    rollout_id = submit(manager, "--all", "--canary", "1", "--batch-size", "2", *package_args(pkg))
    wait_for(lambda: steps(manager, rollout_id)["node-1"] == "running", 30, interval=0.1, what="the canary")

    assert "cancelling" in manager.cli("rollout", "cancel", rollout_id).stdout
    res = manager.cli("rollout", "follow", rollout_id, check=False)
    assert res.returncode == 1 and "cancelled: " in res.stdout
    final = rollout(manager, rollout_id)
    assert final["state"] == "cancelled"
    nodes = final["progress"]["nodes"]
    assert [nodes[n]["step"] for n in ("node-2", "node-3")] == ["cancelled", "cancelled"]
    assert [nodes[n]["cancel"] for n in ("node-2", "node-3")] == ["not pushed", "not pushed"]
    assert [journal_ids(h) for h in hosts[1:]] == [[], []], "nothing was pushed after the cancel"
    canary = nodes["node-1"]
    assert canary["step"] in ("succeeded", "failed"), "the running update was followed to its end"
    # A supervisor before contract 2 cannot cancel: that is recorded, and the update runs on to its end.
    assert canary["cancel"].startswith(("could not cancel: UNIMPLEMENTED", "cancel")), canary["cancel"]
    again = manager.cli("rollout", "resume", rollout_id, check=False)
    assert again.returncode == 2 and "cancelled" in again.stderr


@pytest.mark.e2e
def test_selector_chooses_nodes_by_their_labels_and_max_parallel_updates_one_at_a_time(
        make_manager, make_supervisor, release):
    manager = make_manager()
    hosts = fleet(make_supervisor, release, [manager], {
        "node-1": {"role": "web", "zone": "a"}, "node-2": {"role": "web", "zone": "b"}, "node-3": {"role": "db"}})
    assert manager.nodes()["node-1"]["labels"] == {"role": "web", "zone": "a"}, "labels sent at registration"
    pkg = signed(release.build("1.1.0"))

    res = manager.cli("rollout", "--selector", "role=web", "--canary", "0", "--batch-size", "2", "--max-parallel",
                      "1", *package_args(pkg))
    assert "completed: 2 of 2 nodes updated" in res.stdout
    assert [h.sup.agent("app").version for h in hosts] == ["1.1.0", "1.1.0", "1.0.0"]
    assert journal_ids(hosts[2]) == [], "node-3 is not a web node"
    ups = sorted(manager.updates(), key=lambda u: u["created_at"])
    assert ups[0]["finished_at"] <= ups[1]["created_at"], "one node at a time, though both are in one batch"

    res = manager.cli("rollout", "--selector", "role=web,zone=b", "--canary", "0", *package_args(
        signed(release.build("1.2.0"))))
    assert "completed: 1 of 1 nodes updated" in res.stdout
    assert [h.sup.agent("app").version for h in hosts] == ["1.1.0", "1.2.0", "1.0.0"]
    none = manager.cli("rollout", "--selector", "role=cache", *package_args(pkg), check=False)
    assert none.returncode == 2 and "no registered node has the labels role=cache" in none.stderr


@pytest.mark.e2e
def test_a_node_offline_when_its_batch_came_is_pushed_when_it_comes_back_or_else_skipped(
        make_manager, make_supervisor, release):
    manager = make_manager()
    hosts = fleet(make_supervisor, release, [manager], {f"node-{i}": {} for i in (1, 2, 3)})
    hosts[1].sup.terminate()
    hosts[2].sup.terminate()
    pkg = signed(release.build("1.1.0"))
    rollout_id = submit(manager, "--all", "--canary", "1", "--batch-size", "2", "--offline-wait", "60",
                        *package_args(pkg))
    wait_for(lambda: steps(manager, rollout_id) == {"node-1": "succeeded", "node-2": "offline",
                                                     "node-3": "offline"}, 40, interval=0.2,
             what="both nodes of the batch found offline")
    assert rollout(manager, rollout_id)["state"] == "running", "it waits for them"
    hosts[1].sup.start()
    wait_for(lambda: steps(manager, rollout_id)["node-2"] == "succeeded", 40, interval=0.2,
             what="node-2 pushed once it reconnected")
    manager.cli("rollout", "cancel", rollout_id)  # node-3 stays away: end it instead of waiting 60 s
    res = manager.cli("rollout", "follow", rollout_id, check=False)
    assert "cancelled: 2 updated, 0 failed, 1 not pushed" in res.stdout, res.stdout
    assert hosts[1].sup.agent("app").version == "1.1.0"
    [u2] = manager.updates("--node", "node-2")
    assert journal_ids(hosts[1]) == [u2["update_id"]], "the retry kept the update id chosen before"
    [u3] = manager.updates("--node", "node-3")
    assert (u3["state"], u3["error"]) == ("failed", "not pushed: the rollout was cancelled")

    short = submit(manager, "--nodes", "node-3", "--canary", "0", "--offline-wait", "0.5",
                   *package_args(signed(release.build("1.2.0"))))
    res = manager.cli("rollout", "follow", short, check=False)
    assert res.returncode == 1 and "completed: 0 of 1 nodes updated, 1 skipped (offline)" in res.stdout


@pytest.mark.e2e
def test_a_database_url_of_an_unknown_kind_is_refused_with_one_line():
    res = subprocess.run([PY, "-m", "manager", "nodes", "--db", "mysql://x/y"], capture_output=True, text=True,
                         cwd=ROOT, timeout=30)
    assert (res.returncode, res.stderr.strip()) == (
        2, "baton-manager: mysql://x/y: unknown database URL (postgresql://... or sqlite:///PATH)")


# ---- the supervisor's side of the fleet config -------------------------------------------------------------

NODE = """
[node]
id = "n1"
state_dir = "/tmp/baton-fleet-cfg/state"
install_root = "/tmp/baton-fleet-cfg/install"
{labels}
[grpc]
unix_socket = "/tmp/baton-fleet-cfg/s.sock"
[manager]
address = {address}
"""


def fleet_config(tmp_path: Path, address: str, labels: str = "") -> Path:
    p = tmp_path / "c.toml"
    p.write_text(NODE.format(address=address, labels=labels))
    return p


def test_manager_address_takes_a_list_or_a_comma_separated_string_and_node_labels_a_table(tmp_path):
    listed = load_config(fleet_config(tmp_path, '["127.0.0.1:1", "[::1]:2"]', 'labels = {role = "web", zone = "a"}'))
    assert listed.manager.addresses == ("127.0.0.1:1", "[::1]:2")
    assert dict(listed.node.labels) == {"role": "web", "zone": "a"}
    joined = load_config(fleet_config(tmp_path, '"127.0.0.1:1, 127.0.0.1:2"'))
    assert joined.manager.addresses == ("127.0.0.1:1", "127.0.0.1:2")
    assert load_config(fleet_config(tmp_path, '"127.0.0.1:1"')).manager.addresses == ("127.0.0.1:1",)


@pytest.mark.parametrize(("address", "labels", "line"), [
    ('["127.0.0.1:1", 7]', "", "manager.address[1]: must be one HOST:PORT string, got 7"),
    ('"127.0.0.1:1,nowhere"', "", "manager.address: 'nowhere' is not HOST:PORT"),
    ('" , "', "", "manager.address: ' , ' names no HOST:PORT"),
    ('"127.0.0.1:1"', 'labels = {"bad key" = "x"}', "node.labels.bad key: bad key='x': keys and values are "
                                                    "letters, digits, . _ - (up to 64)"),
    ('"127.0.0.1:1"', 'labels = {role = 3}', "node.labels.role: must be a string, got int 3"),
])
@pytest.mark.e2e
def test_a_bad_manager_address_or_label_is_refused_at_check_config_with_one_line(tmp_path, address, labels, line):
    path = fleet_config(tmp_path, address, labels)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == line
    res = subprocess.run([PY, "-m", "supervisor", "check-config", str(path)], capture_output=True,
                         text=True, cwd=ROOT, timeout=30)
    assert res.returncode == 2 and res.stderr.strip().endswith(line) and "\n" not in res.stderr.strip()
