"""Benchmark 6: the reference Manager rolling an update out to a fleet of supervisors on this machine.

Uses only the Manager's command line as docs/manager.md documents it (``python -m manager serve``,
``rollout``, ``push``, ``nodes --json``, ``updates --json``), each as its own process.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from typing import Any

from benchlib import (
    PY,
    ROOT,
    BatonSupervisor,
    Ctx,
    MiB,
    Package,
    Section,
    SummaryRow,
    agent_tree,
    build_package,
    fmt_mib,
    fmt_s,
    fmt_spread,
    fmt_x,
    free_port,
    install_version,
    make_keys,
    median,
    proc_cpu_s,
    proc_cpu_with_children_s,
    proc_status_kib,
    table,
    wait_for,
    yes_no,
)

NAME = "fleet"
TITLE = "6. Fleet rollout"
CANARY, BATCH = 1, 5


class Manager:
    """``python -m manager`` commands on one database; ``serve`` runs in the background."""

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.db = ctx.work / "manager.db"
        self.packages = ctx.work / "manager-packages"
        self.packages.mkdir()
        self.port = free_port()
        self.http_port = free_port()
        self.last_cpu_s = 0.0  # user + system seconds of the last command run
        self.proc = ctx.reaper.popen(
            [PY, "-m", "manager", "serve", "--db", self.db, "--listen", f"127.0.0.1:{self.port}", "--insecure-loopback",
             "--packages", self.packages, "--http", f"127.0.0.1:{self.http_port}", "--heartbeat-interval", "1"],
            log=ctx.work / "manager-serve.log")

    def run(self, *args: object, timeout: float = 900) -> tuple[str, float, int]:
        """One command: (stdout, wall seconds, peak RSS in KiB from wait4). Raises if it fails."""
        argv = [PY, "-m", "manager", *map(str, args), "--db", str(self.db)]
        err_path = self.ctx.work / "manager-cmd.err"
        with open(err_path, "wb") as err:
            t0 = time.perf_counter()
            p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, cwd=ROOT, env=self.ctx.reaper.env)
            assert p.stdout is not None
            out = p.stdout.read()
            _, status, usage = os.wait4(p.pid, 0)
            wall = time.perf_counter() - t0
        self.last_cpu_s = usage.ru_utime + usage.ru_stime
        p.stdout.close()
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0:
            raise RuntimeError(f"`manager {' '.join(map(str, args[:2]))}` exited {p.returncode}: "
                               f"{out.decode(errors='replace')[-400:]} {err_path.read_text(errors='replace')[-600:]}")
        return out.decode(), wall, usage.ru_maxrss

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "--json", timeout=60)[0])


def run(ctx: Ctx) -> Section:
    if not (ROOT / "manager" / "cli.py").exists():
        raise RuntimeError("manager/cli.py does not exist: the reference Manager is not there to benchmark")
    n = 5 if ctx.quick else 20
    runs = ctx.runs(2, 1)
    keys = make_keys(ctx.work / "keys")
    ncpu = os.cpu_count() or 1
    ctx.log(f"building {3 * runs} signed packages")
    pkgs: list[Package] = []
    for i in range(3 * runs):
        v = f"1.{i + 1}.0"
        tree = agent_tree(ctx.work / "trees" / v, 10 * MiB)
        pkgs.append(build_package(tree, ctx.work / "pkgs" / f"app-{v}.tar.gz", "app", v, keys))
        shutil.rmtree(tree)
    base_tree = agent_tree(ctx.work / "trees" / "1.0.0")

    mgr = Manager(ctx)
    wait_for(lambda: mgr.proc.poll() is None and _connectable(mgr.port), 30, what="the Manager to listen")
    ctx.log(f"starting {n} supervisors")
    sups: list[BatonSupervisor] = []
    for i in range(n):
        sup = BatonSupervisor(
            ctx, ctx.work / f"node-{i:02d}",
            [{"name": "app", "packaged": True, "command": "bin/agent", "notify": True, "restart": "always"}],
            node_id=f"node-{i:02d}", tcp_port=free_port(),
            update={"trusted_keys": [str(keys.public)], "health_window_s": 0.0, "max_backups": 2},
            extra={"manager": {"address": f"127.0.0.1:{mgr.port}", "heartbeat_interval_s": 2.0}})
        install_version(sup.install_root, "app", "1.0.0", base_tree)
        sup.start(wait=False)
        sups.append(sup)
    for sup in sups:
        sup.wait_serving(timeout=120)
    wait_for(lambda: len(mgr.json("nodes")) >= n, 120, interval=0.5, what=f"{n} nodes to register")
    nodes = [f"node-{i:02d}" for i in range(n)]

    roll: dict[str, list[float]] = {"total": [], "latency": [], "rss": [], "nodes_cpu": [], "serve_cpu": [],
                                    "cmd_cpu": []}
    loop: dict[str, list[float]] = {"total": [], "latency": [], "rss": [], "nodes_cpu": [], "serve_cpu": [],
                                    "cmd_cpu": []}
    per_cpu: dict[str, list[float]] = {"total": [], "latency": [], "rss": [], "nodes_cpu": [], "serve_cpu": [],
                                       "cmd_cpu": []}  # the control: batches of one node per CPU

    def cpu() -> tuple[float, float]:
        """CPU seconds so far of every node (supervisor, its helpers and agents) and of the Manager's serve."""
        return sum(proc_cpu_with_children_s(s.proc.pid) for s in sups if s.proc), proc_cpu_s(mgr.proc.pid)

    def account(into: dict[str, list[float]], before: tuple[float, float], cmd_cpu: float) -> None:
        after = cpu()
        into["nodes_cpu"].append((after[0] - before[0]) / n)
        into["serve_cpu"].append((after[1] - before[1]) / n)
        into["cmd_cpu"].append(cmd_cpu / n)
    reported: list[int] = []

    def latencies(version: str) -> list[float]:
        rows = [u for u in mgr.json("updates", "--component", "app") if u["to_version"] == version]
        bad = [u for u in rows if not u["success"]]
        if len(rows) != n or bad:
            raise RuntimeError(f"{version}: {len(rows)} updates recorded, {len(bad)} not successful")
        reported.append(sum(1 for u in rows if u.get("reported_at")))
        return [u["finished_at"] - u["created_at"] for u in rows]

    def rollout(pkg: Package, batch: int = BATCH, into: dict[str, list[float]] = roll) -> None:
        before = cpu()
        _, wall, rss = mgr.run("rollout", "--all", "--canary", str(CANARY), "--batch-size", str(batch),
                               "--package", pkg.path, "--component", "app", "--version", pkg.version,
                               "--timeout", "300")
        into["total"].append(wall)
        into["rss"].append(rss)
        account(into, before, mgr.last_cpu_s)
        into["latency"] += latencies(pkg.version)

    def push_loop(pkg: Package) -> None:
        t0 = time.perf_counter()
        before, cmd_cpu = cpu(), 0.0
        for node in nodes:
            _, _, rss = mgr.run("push", node, "--package", pkg.path, "--component", "app", "--version", pkg.version,
                                "--timeout", "300")
            loop["rss"].append(rss)
            cmd_cpu += mgr.last_cpu_s
        loop["total"].append(time.perf_counter() - t0)
        account(loop, before, cmd_cpu)
        loop["latency"] += latencies(pkg.version)

    for i in range(runs):
        a, b, c = pkgs[3 * i], pkgs[3 * i + 1], pkgs[3 * i + 2]
        ctx.log(f"run {i + 1}/{runs}: rollout of {a.version}, then one push per node of {b.version}"
                if i % 2 == 0 else f"run {i + 1}/{runs}: one push per node of {a.version}, then rollout of "
                f"{b.version}")
        if i % 2 == 0:
            rollout(a)
            push_loop(b)
        else:
            push_loop(a)
            rollout(b)
        ctx.log(f"run {i + 1}/{runs}: rollout of {c.version} in batches of {ncpu}, one node per CPU")
        rollout(c, batch=ncpu, into=per_cpu)
    # Results come back from each node's outbox on their own schedule: wait (bounded) until all have arrived.
    versions_pushed = {p.version for p in pkgs}
    t_wait = time.perf_counter()

    def rows() -> list[Any]:
        return [u for u in mgr.json("updates", "--component", "app") if u["to_version"] in versions_pushed]

    with contextlib.suppress(TimeoutError):
        wait_for(lambda: all(u.get("reported_at") for u in rows()), 60, interval=0.5, what="every result")
    final_rows = rows()
    arrived = sum(1 for u in final_rows if u.get("reported_at"))
    duplicates = sum(max(0, int(u.get("reports") or 0) - 1) for u in final_rows)
    waited = time.perf_counter() - t_wait
    last = pkgs[-1].version
    versions = {s.agents()["app"].version for s in sups}
    if versions != {last}:
        raise RuntimeError(f"after the rollouts the agents run {versions}, not {last}")
    serve_hwm = proc_status_kib(mgr.proc.pid, "VmHWM")
    serve_rss = proc_status_kib(mgr.proc.pid, "VmRSS")
    for sup in sups:
        sup.stop()
    mgr.ctx.reaper.stop(mgr.proc)

    size_mib = pkgs[0].size / MiB
    ratio = median(loop["total"]) / median(roll["total"])
    lat = sorted(roll["latency"])
    p90 = lat[int(0.9 * (len(lat) - 1))] if lat else float("nan")
    s = Section(NAME, TITLE)
    s.add(f"{n} supervisors on this machine, each its own state directory, install root, Unix socket and loopback "
          f"TCP port, registered with one reference Manager (`python -m manager serve`: SQLite store, package "
          f"server on 127.0.0.1). Each runs one packaged agent (the Python `READY=1` agent of benchmark 3, "
          f"`health_window_s = 0`). The update is a {size_mib:.1f} MiB package that every node downloads from "
          f"the Manager's package server. **Rollout**: `python -m manager rollout --all --canary {CANARY} "
          f"--batch-size {BATCH}` (the canary alone, then batches of {BATCH} in parallel). **Baseline**: the same "
          f"update pushed to the nodes one after the other with `python -m manager push NODE` in a loop. "
          f"**Control**: after each pair, a rollout in batches of {ncpu}, one node per CPU. Each uses a new "
          f"version; rollout and loop alternate; {runs} of each. Per-node latency is the Manager's own record "
          "(`updates --json`: `finished_at - created_at`, push to final).", "")
    s.add(*table(["", "rollout", "push loop", "ratio"], [
        (f"total time for {n} nodes", fmt_spread(roll["total"]), fmt_spread(loop["total"]),
         f"{fmt_x(ratio)} (loop / rollout)"),
        ("per-node latency, median [min, max]", fmt_spread(roll["latency"]), fmt_spread(loop["latency"]),
         fmt_x(median(loop["latency"]) / median(roll["latency"]))),
        ("per-node latency, 90th percentile", fmt_s(p90), "", ""),
        ("peak RSS of the command (`ru_maxrss`)", fmt_mib(max(roll["rss"])), fmt_mib(max(loop["rss"])) + " (each)",
         ""),
    ]), "")
    s.add(f"The Manager's `serve` process (ManagerService, SQLite, package server) after all of it: peak RSS "
          f"(VmHWM) {fmt_mib(serve_hwm)}, now {fmt_mib(serve_rss)}. Results the nodes reported back with "
          f"`ReportUpdateResult`: {sum(reported)} of {len(reported) * n} were recorded when the command that "
          f"pushed them returned, {arrived} of {len(final_rows)} after waiting {fmt_s(waited)} more; "
          f"{duplicates} duplicate reports (each acknowledged, recorded once).", "")
    node_cpu, serve_cpu = median(loop["nodes_cpu"]), median(loop["serve_cpu"])
    s.add("CPU per node update (user + system; a node's figure is its supervisor's own and that of the children it "
          "reaped: the helper, and the agent version it replaced):", "")
    s.add(*table(["", "rollout", "push loop"], [
        ("on the node (supervisor, helper, agent)", fmt_s(median(roll["nodes_cpu"])), fmt_s(node_cpu)),
        ("Manager `serve` (package server, reports, heartbeats)", fmt_s(median(roll["serve_cpu"])),
         fmt_s(serve_cpu)),
        ("the pushing command (`rollout` / one `push` process per node, its start included)",
         fmt_s(median(roll["cmd_cpu"])), fmt_s(median(loop["cmd_cpu"]))),
    ]), "")
    per_update = node_cpu + serve_cpu
    alone = median(loop["latency"])
    busy = per_update / alone  # CPUs a lone node's update keeps busy, on average over its latency
    floor = BATCH * busy / ncpu  # the least a batch can take, in lone-node latencies, if the CPUs are all it waits on
    in_batch = median(roll["latency"]) / alone
    s.add(f"Where a node's time goes in a batch: {BATCH} nodes at once on {ncpu} CPUs, and nothing else.", "")
    s.add(*table(["", "per-node latency", "x one node alone"], [
        ("one node at a time (push loop)", fmt_s(alone), "1.00x"),
        (f"rollout in batches of {ncpu}: one node per CPU (the control)", fmt_spread(per_cpu["latency"]),
         f"{median(per_cpu['latency']) / alone:.2f}x"),
        (f"rollout in batches of {BATCH}", fmt_spread(roll["latency"]), f"{in_batch:.2f}x"),
        (f"the floor for {BATCH} at once if CPU were all they wait for: {BATCH} x {fmt_s(per_update)} of CPU "
         f"/ {ncpu} CPUs", fmt_s(BATCH * per_update / ncpu), f"{floor:.2f}x"),
    ]), "")
    s.add(f"- A lone node's update keeps {busy:.1f} CPUs busy on average over its latency: {fmt_s(per_update)} of "
          f"CPU (its supervisor, helper and replaced agent, and the Manager's server) in {fmt_s(alone)}. It waits "
          "on almost nothing but CPU: the download is over loopback, the health window is 0, and during the "
          "download the package server sends while the helper receives, hashes and writes on three more threads. "
          "(Part of that CPU falls "
          "outside push-to-final: the replaced agent's own life, the helper's exit, heartbeats; so the floor is "
          f"somewhat high, and a measured batch can come in under it.) {BATCH} such updates sharing {ncpu} CPUs "
          f"take about {floor:.2f}x one alone; the rollout measures {in_batch:.2f}x, and with one node per CPU "
          f"{median(per_cpu['latency']) / alone:.2f}x: no lock, queue or serial step of the Manager or the nodes "
          "adds to what sharing the CPUs costs.")
    s.add(f"- Why the 1.5x goal is out of reach on this machine whatever is cut: CPU taken out of an update's "
          f"path shortens the lone node's latency about as much, so the ratio stays near {BATCH} x (CPUs busy) / "
          f"{ncpu}. It reaches 1.5x only if a lone update keeps at most {1.5 * ncpu / BATCH:.1f} CPUs busy, that is, "
          f"waits for something other than this machine's CPUs for most of its time; today {busy:.1f}. Real hosts do "
          f"not share their CPUs with the rest of the batch (here {n} nodes share {ncpu}); there a node's latency "
          "in a rollout is its latency alone plus the Manager's share, which the batches of one node per CPU "
          "approach.")
    s.summary = [
        SummaryRow("fleet", f"rollout to {n} nodes (canary {CANARY}, batches of {BATCH})",
                   fmt_s(median(roll["total"])), f"push loop {fmt_s(median(loop['total']))}",
                   f"{fmt_x(ratio)} faster" if ratio >= 1 else fmt_x(ratio), "", ""),
        SummaryRow("fleet", "per-node latency (rollout)", fmt_s(median(roll["latency"])),
                   f"push loop (one node at a time) {fmt_s(median(loop['latency']))}",
                   f"{median(roll['latency']) / median(loop['latency']):.2f}x", "≤ 1.5x one node alone",
                   yes_no(median(roll["latency"]) <= 1.5 * median(loop["latency"]))),
        SummaryRow("fleet", f"per-node latency (rollout in batches of {ncpu}, one node per CPU)",
                   fmt_s(median(per_cpu["latency"])), f"push loop {fmt_s(alone)}",
                   f"{median(per_cpu['latency']) / alone:.2f}x", "", ""),
        SummaryRow("fleet", "Manager peak RSS", f"serve {fmt_mib(serve_hwm)}, rollout {fmt_mib(max(roll['rss']))}",
                   "—", "—", "", ""),
    ]
    return s


def _connectable(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False

