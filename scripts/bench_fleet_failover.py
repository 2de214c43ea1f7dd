"""Benchmark 10: a rollout on two Manager replicas on PostgreSQL, the replica owning it SIGKILLed half way.

What is measured, from the database: the time from the kill until the other replica holds the rollout's lease
(its claim, ``lease_until - lease``) and until it pushes again (the next update row's ``created_at``), beside
the lease configured (``serve --rollout-lease``); then that no node was pushed twice (update rows per node for
the rollout, and the simulator's own count of ``PushUpdate`` calls per node) and that every result is recorded
once. The nodes are ``scripts/fleet_sim.py`` (the real protocols, a real download checked by
``helper.verify``); the package comes from a separate HTTP server (as a cache or CDN in front of the replicas
would serve it), so the replica killed is only the rollout's owner.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchlib import (
    PY,
    ROOT,
    Ctx,
    HttpServer,
    MiB,
    Section,
    SummaryRow,
    agent_tree,
    build_package,
    fmt_s,
    free_port,
    make_keys,
    table,
    wait_for,
)

NAME = "fleet_failover"
TITLE = "10. Rollout failover: the owning replica SIGKILLed half way (PostgreSQL, 2 replicas)"
CANARY, PARALLEL = 10, 100
POLL_S = 0.05


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _registered(sim: Any, log: Path) -> bool:
    text = log.read_text(errors="replace")
    if sim.poll() is not None:
        raise RuntimeError(f"the simulator exited {sim.returncode}: {text[-800:]}")
    return '"registered"' in text


def _last_json(log: Path) -> dict[str, Any]:
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            return dict(json.loads(line))
    raise RuntimeError(f"no summary in {log}")


def _settled(store: Any, rollout_id: str) -> int:
    """Nodes of the rollout whose step is final (succeeded, failed, skipped, cancelled)."""
    done = ("succeeded", "failed", "skipped", "cancelled")
    return sum(n for steps in store.rollout_batches(rollout_id).values() for s, n in steps.items() if s in done)


def run(ctx: Ctx) -> Section:
    sys.path.insert(0, str(ROOT))
    from manager.store import open_store
    from tests.pg_fixture import PgCluster

    nodes = 200 if ctx.quick else 1000
    batch = 50 if ctx.quick else 100
    lease = 5.0 if ctx.quick else 15.0  # 15 s is serve's default --rollout-lease
    keys = make_keys(ctx.work / "keys")
    tree = agent_tree(ctx.work / "trees" / "1.1.0", 256 * 1024)
    pkg = build_package(tree, ctx.work / "pkgs" / "app-1.1.0.tar.gz", "app", "1.1.0", keys)
    httpd = HttpServer(ctx, pkg.path.parent)
    pg = PgCluster(fsync=True).start()
    try:
        db = pg.new_database()
        serves: dict[int, subprocess.Popen[bytes]] = {}
        addresses = []
        for i in range(2):
            port = free_port()
            addresses.append(f"127.0.0.1:{port}")
            p = ctx.reaper.popen([PY, "-m", "manager", "serve", "--db", db, "--listen", f"127.0.0.1:{port}",
                                  "--insecure-loopback", "--heartbeat-interval", "10", "--rollout-lease", str(lease)],
                                 log=ctx.work / f"serve-{i}.log")
            serves[p.pid] = p
            wait_for(lambda port=port: _port_open(port), 60, interval=0.2, what=f"serve replica {i} to listen")
        sim_log = ctx.work / "sim.log"
        sim = ctx.reaper.popen([PY, ROOT / "scripts" / "fleet_sim.py", "--manager", ",".join(addresses), "--nodes",
                                str(nodes), "--trusted-key", keys.public, "--state-dir", ctx.work / "sim",
                                "--heartbeat-s", "10", "--latency-s", "0.5", "--spread"], log=sim_log)
        wait_for(lambda: _registered(sim, sim_log), 300, interval=0.5, what="the simulated nodes to register")

        res = subprocess.run(
            [PY, "-m", "manager", "rollout", "--all", "--canary", str(CANARY), "--batch-size", str(batch),
             "--max-parallel", str(PARALLEL), "--package", str(pkg.path), "--component", "app", "--version",
             pkg.version, "--url", httpd.url(pkg.path.name), "--timeout", "300", "--no-follow", "--json",
             "--db", db], capture_output=True, text=True, cwd=ROOT, env=ctx.reaper.env, timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"rollout exited {res.returncode}: {res.stdout[-400:]} {res.stderr[-600:]}")
        rollout_id = str(json.loads(res.stdout.strip().splitlines()[-1])["rollout_id"])
        t_submit = time.time()
        store = open_store(db)
        try:
            out = _kill_half_way(ctx, store, rollout_id, nodes, serves, lease)
            out["wall"] = out["t_final"] - t_submit
            rows = store.updates(rollout_id=rollout_id)
        finally:
            store.close()
        ctx.reaper.stop(sim)
        sim_summary = _last_json(sim_log)
    finally:
        pg.stop()
        httpd.stop()

    per_node = Counter(r.node for r in rows)
    reports = Counter(r.reports for r in rows)
    after = sorted(r.created_at for r in rows if r.created_at > out["t_kill"])
    next_push = after[0] - out["t_kill"] if after else float("nan")
    claim = out.get("new_lease_until", float("nan")) - lease - out["t_kill"]  # nan: never seen taken
    twice_db = sorted(n for n, k in per_node.items() if k > 1)
    twice_sim = list(sim_summary.get("nodes_pushed_twice", []))

    s = Section(NAME, TITLE)
    s.add(f"A rollout of a {pkg.size / MiB:.2f} MiB package to {nodes} simulated nodes (`scripts/fleet_sim.py "
          f"--spread`: the real protocols, a real download verified by `helper.verify`, 0.5 s simulated install, "
          f"results through its durable outbox; node i talks to replica i mod 2 first and to the other when a "
          f"call fails), "
          f"`rollout --all --canary {CANARY} --batch-size {batch} --max-parallel {PARALLEL}`, on two `serve` "
          f"replicas sharing one PostgreSQL database (`fsync=on`), each with `--rollout-lease {lease:g}` (the lease "
          f"is renewed every third of it). When half of the nodes had settled, the replica named as the owner in "
          f"the `rollouts` table was sent SIGKILL. Times are from the database's clock-stamped rows (the new "
          f"owner's claim is its first `lease_until` minus the lease; the next push is the first `updates` row "
          f"created after the kill). One run, on the same machine, everything sharing its CPUs.", "")
    s.add(*table(["", "figure"], [
        ("nodes settled at the kill / in flight (pushing or running)", f"{out['settled_at_kill']} / "
                                                                       f"{out['in_flight_at_kill']}"),
        ("lease configured (`--rollout-lease`) / left on it at the kill", f"{fmt_s(lease)} / "
                                                                          f"{fmt_s(out['lease_left'])}"),
        ("kill to the other replica's claim of the lease", fmt_s(claim)),
        ("kill to its next push (`created_at` of the next update row)", fmt_s(next_push)),
        ("rollout's end", f"{out['state']}: {out['reason']}"),
        ("rollout's total time (submit to its end)", fmt_s(out["wall"])),
        ("update rows for the rollout / nodes with more than one", f"{len(rows)} / {len(twice_db)}"),
        ("`PushUpdate` calls the nodes received / nodes that received more than one",
         f"{sim_summary.get('push_calls', '?')} / {len(twice_sim)}"),
        ("results recorded (rows with `reported_at`) / rows by deliveries (`reports`)",
         f"{sum(1 for r in rows if r.reported_at)} / "
         + ", ".join(f"{k}: {v}" for k, v in sorted(reports.items()))),
        ("nodes updated (simulator: committed, failed)",
         f"{sim_summary.get('committed', '?')}, {sim_summary.get('failed', '?')}"),
    ]), "")
    s.add(f"The takeover is bounded by the lease: the killed owner had renewed it {fmt_s(lease - out['lease_left'])} "
          f"before the kill, so it ran out {fmt_s(out['lease_left'])} after, and the other replica, which looks "
          f"for a rollout to claim every 0.5 s, took it {fmt_s(claim - out['lease_left'])} after that (so a "
          "takeover comes between two thirds of the lease and the whole lease after the kill, plus up to 0.5 s, "
          "depending on where in the renewal cycle the owner dies). Before "
          "pushing to a new node, the new owner first asks each node left `pushing` by the old one whether it has "
          "the update (`GetUpdate`), and follows those left `running`; nothing is pushed twice because the update "
          "id is in the database before the push.", "")
    s.summary = [
        SummaryRow("fleet_failover", f"rollout owner SIGKILLed half way ({nodes} nodes): kill to the next push",
                   fmt_s(next_push), f"lease {fmt_s(lease)}", f"{next_push / lease:.2f} of the lease"),
        SummaryRow("fleet_failover", "nodes pushed twice (update rows / PushUpdate calls)",
                   f"{len(twice_db)} / {len(twice_sim)}", "—", "—", "0", "yes" if not twice_db and not twice_sim
                   else "**no**"),
    ]
    return s


def _kill_half_way(ctx: Ctx, store: Any, rollout_id: str, nodes: int, serves: dict[int, Any], lease: float
                   ) -> dict[str, Any]:
    """Follow the rollout in the database; SIGKILL its owner when half the nodes settled; wait for its end."""
    out: dict[str, Any] = {}
    deadline = time.monotonic() + 900
    killed = ""
    while time.monotonic() < deadline:
        row = store.rollout(rollout_id, with_nodes=False)
        if not killed and row.owner and _settled(store, rollout_id) >= nodes // 2:
            pid = int(row.owner.split(":")[1])
            if pid not in serves:
                raise RuntimeError(f"the owner {row.owner} is not one of the replicas started here")
            os.kill(pid, signal.SIGKILL)
            out["t_kill"] = time.time()
            killed = row.owner
            out["lease_left"] = row.lease_until - out["t_kill"]
            steps = Counter(n.step for n in store.rollout_nodes(rollout_id))
            out["settled_at_kill"] = sum(steps[s] for s in ("succeeded", "failed", "skipped", "cancelled"))
            out["in_flight_at_kill"] = steps["pushing"] + steps["running"]
            serves[pid].wait(10)
            ctx.log(f"killed the owner {row.owner} with {out['settled_at_kill']} of {nodes} settled")
        elif killed and "new_lease_until" not in out and row.owner and row.owner != killed:
            out["new_lease_until"] = row.lease_until  # its claim's: renewed only a third of the lease later
            ctx.log(f"{row.owner} took the rollout over")
        if row.state in ("completed", "halted", "cancelled"):
            out.update(t_final=row.updated_at, state=row.state, reason=str(row.progress.get("reason", "")))
            if not killed:
                raise RuntimeError("the rollout ended before half of it settled")
            return out
        time.sleep(POLL_S)
    raise RuntimeError(f"rollout {rollout_id} did not end within 900 s")
