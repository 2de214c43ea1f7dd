"""Benchmark 7: one rollout to a large simulated fleet plus real supervisors, PostgreSQL with 2 replicas
against SQLite with one.

The simulated nodes are ``scripts/fleet_sim.py`` (one process, the real protocols, a real download checked by
``helper.verify``); the real supervisors are Baton's own. PostgreSQL is a private cluster started for the run
(the tests' ``tests/pg_fixture.PgCluster``), removed after it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchlib import (
    PY,
    ROOT,
    BatonSupervisor,
    Ctx,
    MiB,
    Section,
    SummaryRow,
    agent_tree,
    build_package,
    fmt_mib,
    fmt_s,
    free_port,
    install_version,
    make_keys,
    proc_cpu_s,
    proc_status_kib,
    table,
    wait_for,
)

NAME = "fleet_scale"
TITLE = "8. Fleet scale: a rollout to simulated nodes, PostgreSQL (2 replicas) against SQLite (1)"
CANARY, BATCH, PARALLEL = 10, 100, 100


def _pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p / 100 * len(s)))] if s else float("nan")


def _one(ctx: Ctx, kind: str, db: str, replicas: int, sims: int, reals: int, keys: Any, pkg: Any,
         base_tree: Path) -> dict[str, Any]:
    work = ctx.work / kind
    work.mkdir()
    packages = work / "packages"
    serves, addresses = [], []
    for i in range(replicas):
        port, http_port = free_port(), free_port()
        addresses.append(f"127.0.0.1:{port}")
        serves.append(ctx.reaper.popen(
            [PY, "-m", "manager", "serve", "--db", db, "--listen", f"127.0.0.1:{port}", "--insecure-loopback",
             "--packages", packages,
             "--http", f"127.0.0.1:{http_port}", "--heartbeat-interval", "10", "--max-downloads", "200"],
            log=work / f"serve-{i}.log"))
        time.sleep(1.0)  # the first replica migrates the database before the next opens it

    def cli(*args: str, timeout: float = 600) -> str:
        res = subprocess.run([PY, "-m", "manager", *args, "--db", db], capture_output=True, text=True, cwd=ROOT,
                             env=ctx.reaper.env, timeout=timeout)
        if res.returncode != 0:
            raise RuntimeError(f"manager {' '.join(args[:2])} exited {res.returncode}: {res.stdout[-400:]} "
                               f"{res.stderr[-600:]}")
        return res.stdout

    sim = ctx.reaper.popen([PY, ROOT / "scripts" / "fleet_sim.py", "--manager", ",".join(addresses), "--nodes",
                            str(sims), "--trusted-key", keys.public, "--state-dir", work / "sim", "--heartbeat-s",
                            "10", "--latency-s", "0.5"], log=work / "sim.log")
    sups = []
    for i in range(reals):
        sup = BatonSupervisor(
            ctx, work / f"node-{i}",
            [{"name": "app", "packaged": True, "command": "bin/agent", "notify": True, "restart": "always"}],
            node_id=f"real-{i}", tcp_port=free_port(),
            update={"trusted_keys": [str(keys.public)], "health_window_s": 0.0, "max_backups": 2},
            extra={"manager": {"address": addresses, "heartbeat_interval_s": 10.0},
                   "grpc": {"insecure_tcp": True}})  # read-only TCP; the Manager pushes over it as in the tests
        install_version(sup.install_root, "app", "1.0.0", base_tree)
        sup.start(wait=False)
        sups.append(sup)
    total = sims + reals
    wait_for(lambda: len(json.loads(cli("nodes", "--json"))) >= total, 300, interval=2.0,
             what=f"{total} nodes to register")
    cpu0 = [proc_cpu_s(p.pid) for p in serves]
    t0 = time.perf_counter()
    cli("rollout", "--all", "--canary", str(CANARY), "--batch-size", str(BATCH), "--max-parallel", str(PARALLEL),
        "--package", str(pkg.path), "--component", "app", "--version", pkg.version, "--timeout", "300",
        timeout=1800)
    wall = time.perf_counter() - t0
    cpu = sum(proc_cpu_s(p.pid) for p in serves) - sum(cpu0)
    rows = [u for u in json.loads(cli("updates", "--json")) if u["to_version"] == pkg.version]
    ok = sum(1 for u in rows if u["success"])
    lat = [u["finished_at"] - u["created_at"] for u in rows if u["finished_at"]]
    rss = [proc_status_kib(p.pid, "VmHWM") for p in serves]
    rollout = json.loads(cli("rollouts", "--json"))[-1]
    for sup in sups:
        sup.stop()
    ctx.reaper.stop(sim)
    for p in serves:
        ctx.reaper.stop(p)
    return {"nodes": total, "updated": ok, "wall": wall, "rate": ok / wall if wall else 0.0,
            "p50": _pct(lat, 50), "p99": _pct(lat, 99), "cpu": cpu, "rss": rss,
            "bytes": rollout.get("download_bytes", 0)}


def run(ctx: Ctx) -> Section:
    sys.path.insert(0, str(ROOT))
    from tests.pg_fixture import PgCluster

    sims = 100 if ctx.quick else 1000
    reals = 2 if ctx.quick else 5
    keys = make_keys(ctx.work / "keys")
    tree = agent_tree(ctx.work / "trees" / "1.1.0", 1 * MiB)
    pkg = build_package(tree, ctx.work / "pkgs" / "app-1.1.0.tar.gz", "app", "1.1.0", keys)
    base_tree = agent_tree(ctx.work / "trees" / "1.0.0")
    results: dict[str, dict[str, Any]] = {}
    pg = PgCluster().start()
    try:
        ctx.log(f"PostgreSQL, 2 replicas: {sims} simulated nodes + {reals} supervisors")
        results["PostgreSQL, 2 replicas"] = _one(ctx, "pg", pg.new_database(), 2, sims, reals, keys, pkg, base_tree)
    finally:
        pg.stop()
    ctx.log(f"SQLite, 1 replica: {sims} simulated nodes + {reals} supervisors")
    results["SQLite, 1 replica"] = _one(ctx, "sqlite", str(ctx.work / "manager.db"), 1, sims, reals, keys, pkg,
                                        base_tree)

    s = Section(NAME, TITLE)
    s.add(f"One rollout of a {pkg.size / MiB:.1f} MiB package to {sims} simulated nodes (`scripts/fleet_sim.py`, "
          f"one process: real Register/Heartbeat every 10 s, a real HTTP download verified by `helper.verify`, "
          f"0.5 s simulated install, results through its durable outbox) plus {reals} real supervisors, "
          f"`rollout --all --canary {CANARY} --batch-size {BATCH} --max-parallel {PARALLEL}`. Total time is the "
          "`rollout` command's wall time (submit to completion); latency is the Manager's record per node "
          "(`finished_at - created_at`); CPU is the serve replicas' user+system seconds during the rollout; RSS "
          "their peak (VmHWM). One run each, on the same machine, everything sharing its CPUs.", "")
    names = list(results)
    s.add(*table(["", *names], [
        ("nodes updated", *(f"{r['updated']} of {r['nodes']}" for r in results.values())),
        ("total time", *(fmt_s(r["wall"]) for r in results.values())),
        ("nodes per second", *(f"{r['rate']:.1f}" for r in results.values())),
        ("per-node latency p50 / p99", *(f"{fmt_s(r['p50'])} / {fmt_s(r['p99'])}" for r in results.values())),
        ("replica CPU during the rollout", *(f"{r['cpu']:.1f} s" for r in results.values())),
        ("replica peak RSS", *(", ".join(fmt_mib(k) for k in r["rss"]) for r in results.values())),
        ("package bytes served (`download_bytes`)", *(f"{r['bytes'] / MiB:.1f} MiB" for r in results.values())),
    ]), "")
    pgr, sq = results[names[0]], results[names[1]]
    s.summary = [SummaryRow("fleet_scale", f"rollout to {sims}+{reals} nodes, PostgreSQL x2",
                            fmt_s(pgr["wall"]), f"SQLite x1 {fmt_s(sq['wall'])}",
                            f"{sq['wall'] / pgr['wall']:.2f}x" if pgr["wall"] else "—", "", "")]
    return s
