"""The load generator (``scripts/fleet_sim.py``) against a real ``baton-manager serve``: 20 simulated nodes
register, take a rollout over the real protocol (download from the package server, verify with the
project's own code, report through the durable outbox), and every result is recorded once."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PY, ROOT, ProcessReaper, Release, wait_for
from tests.manager_fixtures import (
    ManagerProc,
    make_manager_fixture,  # noqa: F401  (the make_manager fixture)
    package_args,
    signed,
)
from tests.test_fleet import submit

pytestmark = pytest.mark.e2e  # every test here starts a process

NODES = 20


def start_sim(manager: ManagerProc, release: Release, reaper: ProcessReaper, state: Path, *extra: str
              ) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [PY, str(ROOT / "scripts" / "fleet_sim.py"), "--manager", manager.address, "--nodes", str(NODES),
         "--trusted-key", str(release.public_key), "--state-dir", str(state), "--labels", "sim=yes",
         "--heartbeat-s", "0.5", "--latency-s", "0.1", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    reaper.track(proc.pid)
    return proc


def stop_sim(proc: subprocess.Popen[str]) -> dict[str, object]:
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return dict(json.loads(out.splitlines()[-1]))


def test_twenty_simulated_nodes_take_a_rollout_and_each_result_is_recorded_once(
        make_manager, release, reaper, tmp_path):
    manager = make_manager()
    sim = start_sim(manager, release, reaper, tmp_path / "sim")
    wait_for(lambda: len([n for n in manager.nodes().values() if n["labels"] == {"sim": "yes"}]) == NODES, 30,
             interval=0.3, what="every simulated node to register")

    pkg = signed(release.build("1.1.0"))
    rollout_id = submit(manager, "--selector", "sim=yes", "--canary", "1", "--batch-size", "10",
                        *package_args(pkg))
    res = manager.cli("rollout", "follow", rollout_id, timeout=180)
    assert f"completed: {NODES} of {NODES} nodes updated" in res.stdout, res.stdout

    wait_for(lambda: len(manager.updates("--rollout", rollout_id)) == NODES
             and all(u["reports"] == 1 for u in manager.updates("--rollout", rollout_id)), 30,
             what="every result reported once through the outbox")
    wait_for(lambda: all(a["version"] == "1.1.0" for n in manager.nodes().values() for a in n["agents"]), 30,
             what="the synced agent versions")
    summary = stop_sim(sim)
    assert (summary["committed"], summary["failed"], summary["downloaded_bytes"]) == (NODES, 0, NODES * pkg.size)
    assert list((tmp_path / "sim").glob("*/outbox/*.json")) == [], "the outbox is empty once acknowledged"


def test_simulated_failures_are_reported_as_rollbacks_and_halt_the_rollout_after_its_canary(
        make_manager, release, reaper, tmp_path):
    manager = make_manager()
    sim = start_sim(manager, release, reaper, tmp_path / "sim", "--failure-rate", "1")
    wait_for(lambda: len(manager.nodes()) == NODES, 30, interval=0.3, what="every simulated node to register")
    pkg = signed(release.build("1.1.0"))
    rollout_id = submit(manager, "--selector", "sim=yes", "--canary", "1", "--batch-size", "10",
                        *package_args(pkg))
    res = manager.cli("rollout", "follow", rollout_id, check=False, timeout=180)
    assert res.returncode == 1 and "halted" in res.stdout, res.stdout
    wait_for(lambda: [u["reports"] for u in manager.updates("--rollout", rollout_id)] == [1], 30,
             what="the canary's result")
    [canary] = manager.updates("--rollout", rollout_id)
    assert (canary["state"], canary["rolled_back"], canary["error"]) == (
        "rolled_back", True, "simulated failure: health check failed")
    assert stop_sim(sim)["rolled_back"] == 1


def heartbeating(manager: ManagerProc) -> set[str]:
    return {i for i, n in manager.nodes().items() if n["last_seen"] > n["registered_at"]}


def test_heartbeat_only_nodes_register_without_a_daemon_endpoint_and_heartbeat_across_replicas(
        make_manager, release, reaper, tmp_path):
    first, second = make_manager("first"), make_manager("second")
    proc = subprocess.Popen(
        [PY, str(ROOT / "scripts" / "fleet_sim.py"), "--manager", f"{first.address},{second.address}", "--nodes",
         str(NODES), "--trusted-key", str(release.public_key), "--state-dir", str(tmp_path / "sim"),
         "--heartbeat-s", "0.3", "--heartbeat-only", "--spread"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    reaper.track(proc.pid)
    assert proc.stderr is not None
    lines = iter(proc.stderr.readline, "")
    assert next(line for line in lines if '"registered"' in line).strip() == json.dumps({"registered": NODES})
    proc.send_signal(signal.SIGUSR1)  # the measuring window: heartbeats only from here
    # Each replica has its own database here, so each knows exactly the half of the fleet that --spread sent it.
    wait_for(lambda: [len(heartbeating(m)) for m in (first, second)] == [NODES // 2] * 2, 30, interval=0.3,
             what="each replica's half of the fleet to heartbeat")
    assert all(n["address"] == "" for m in (first, second) for n in m.nodes().values()), "no DaemonService address"
    summary = stop_sim(proc)
    assert set(summary["rpc"]) == {"Heartbeat"} and summary["rpc"]["Heartbeat"]["calls"] > 0, summary
    assert (summary["push_calls"], summary["rpc_errors"]) == (0, 0), summary
    assert not (tmp_path / "sim").exists() or list((tmp_path / "sim").iterdir()) == [], "no outbox in this mode"
