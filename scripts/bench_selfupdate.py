"""Benchmark 4: the control plane's unavailable window and Agent restarts during a self-update, vs stop + start."""

from __future__ import annotations

import bisect
import collections
import itertools
import shutil
import socket
import threading
import time
from typing import Any

from benchlib import (
    FAST_RECONNECT,
    PY,
    READY_AGENT,
    BatonSupervisor,
    Ctx,
    Package,
    Section,
    SummaryRow,
    build_package,
    fmt_s,
    fmt_spread,
    fmt_x,
    follow_update,
    free_port,
    make_keys,
    median,
    table,
    wait_for,
    yes_no,
)

NAME = "selfupdate"
TITLE = "4. Supervisor self-update"
AGENT_NAMES = ("web", "worker", "chatty")
POLL_PERIOD_S = 0.005
CONNECT_PERIOD_S = 0.01
SETTLE_S = 0.5
QUARTER = 0.25  # issue 13's goal: the window at most a quarter of a stop + start's


class Probes:
    """Two threads against the public TCP port: GetStatus every ~5 ms, a bare TCP connect every ~10 ms."""

    def __init__(self, port: int, limit_s: float = 600) -> None:
        self.target = f"127.0.0.1:{port}"
        self.port = port
        self.ok: list[float] = []  # completion times (time.time(), to compare with the journal) of answers
        self.who: dict[float, str] = {}  # answer time -> "bridge" (the helper, started_at 0) or the version
        self.rpc_errors: collections.Counter[str] = collections.Counter()
        self.connects: collections.Counter[str] = collections.Counter()
        self.refused_at: list[float] = []
        self._stop = threading.Event()
        self._deadline = time.monotonic() + limit_s
        self._threads = [threading.Thread(target=self._poll, daemon=True),
                         threading.Thread(target=self._connect, daemon=True)]

    def __enter__(self) -> Probes:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(40)

    def _running(self) -> bool:
        return not self._stop.is_set() and time.monotonic() < self._deadline

    def _poll(self) -> None:
        import grpc

        from baton.pb import daemon_pb2, daemon_pb2_grpc

        req = daemon_pb2.GetStatusRequest()
        while self._running():
            t0 = time.perf_counter()
            channel = grpc.insecure_channel(self.target, options=FAST_RECONNECT)
            try:
                st = daemon_pb2_grpc.DaemonServiceStub(channel).GetStatus(req, timeout=30, wait_for_ready=True)
                at = time.time()
                self.ok.append(at)
                self.who[at] = "bridge" if st.started_at == 0 else st.supervisor_version
            except grpc.RpcError as e:
                self.rpc_errors[e.code().name] += 1
            finally:
                channel.close()
            self._stop.wait(max(0.0, POLL_PERIOD_S - (time.perf_counter() - t0)))

    def _connect(self) -> None:
        while self._running():
            t0 = time.perf_counter()
            at = time.time()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2):
                    pass
                self.connects["accepted"] += 1
            except ConnectionRefusedError:
                self.connects["refused"] += 1
                self.refused_at.append(at)
            except TimeoutError:
                self.connects["timed out"] += 1
            except OSError as e:
                self.connects[type(e).__name__] += 1
            self._stop.wait(max(0.0, CONNECT_PERIOD_S - (time.perf_counter() - t0)))

    def window(self, t_from: float, t_to: float) -> tuple[float, float, float]:
        """The longest time between two successful answers over gaps that overlap [t_from, t_to]: (length, from, to).
        """
        ok = sorted(self.ok)
        i = max(0, bisect.bisect_left(ok, t_from) - 1)
        j = min(len(ok), bisect.bisect_right(ok, t_to) + 1)
        gaps = [(b - a, a, b) for a, b in itertools.pairwise(ok[i:j])]
        return max(gaps, default=(float("nan"), t_from, t_to))

    def sides(self, t_from: float, t_to: float, new_version: str) -> tuple[float, float, float, int]:
        """(old process's last answer -> the helper's first, the helper's first -> last, the helper's last ->
        the new process's first, answers from the helper) in [t_from, t_to]; nan where there is no such answer."""
        ok = [t for t in sorted(self.ok) if t_from <= t <= t_to]
        bridge = [t for t in ok if self.who.get(t) == "bridge"]
        if not bridge:
            return float("nan"), float("nan"), float("nan"), 0
        before = [t for t in ok if t < bridge[0]]
        after = [t for t in ok if t > bridge[-1] and self.who.get(t) == new_version]
        old_side = bridge[0] - before[-1] if before else float("nan")
        new_side = after[0] - bridge[-1] if after else float("nan")
        return old_side, bridge[-1] - bridge[0], new_side, len(bridge)

    def refused_between(self, t_from: float, t_to: float) -> int:
        return sum(t_from <= t <= t_to for t in self.refused_at)

    def typical_gap(self) -> float:
        ok = sorted(self.ok)
        return median(b - a for a, b in itertools.pairwise(ok))


def _agents(sup: BatonSupervisor) -> dict[str, tuple[int, int]]:
    return {n: (a.pid, a.restarts) for n, a in sup.agents().items()}


def _all_running(sup: BatonSupervisor) -> bool:
    return sup.count_running() == len(AGENT_NAMES)


def _supervisor_package(ctx: Ctx, version: str, keys: Any) -> Package:
    from supervisor.cli.install_self import write_tree

    tree = ctx.work / "trees" / f"supervisor-{version}"
    write_tree(tree, version)
    pkg = build_package(tree, ctx.work / "pkgs" / f"supervisor-{version}.tar.gz", "supervisor", version, keys)
    shutil.rmtree(tree)
    return pkg


def run(ctx: Ctx) -> Section:
    runs = ctx.runs(3, 2)
    keys = make_keys(ctx.work / "keys")
    agent_py = ctx.work / "ready_agent.py"
    agent_py.write_text(READY_AGENT)
    port = free_port()
    sup = BatonSupervisor(
        ctx, ctx.work / "sup",
        [{"name": n, "command": PY, "args": ["-u", str(agent_py)], "notify": True, "restart": "always"}
         for n in AGENT_NAMES],
        tcp_port=port, update={"trusted_keys": [str(keys.public)], "handshake_timeout_s": 30.0, "max_backups": 2,
                               "file_url_root": str(ctx.work / "pkgs")})
    sup.install_self("1.0.0")
    ctx.log(f"building {runs} supervisor packages")
    pkgs = [_supervisor_package(ctx, f"1.0.{i + 1}", keys) for i in range(runs)]
    sup.start(from_layout=True)
    wait_for(lambda: _all_running(sup), 30, what="the agents to run")

    upd: dict[str, list[Any]] = {k: [] for k in ("window", "refused", "agent_restarts", "total", "same_pid",
                                                 "handover", "handshake", "errors", "old_side", "new_side",
                                                 "rpc_failed", "bridge_span", "bridge_answers")}
    ss: dict[str, list[Any]] = {k: [] for k in ("window", "refused", "agent_restarts", "serving", "all_running",
                                                "errors", "rpc_failed")}
    typical: list[float] = []

    def self_update(pkg: Package) -> None:
        before = _agents(sup)
        pid = sup.pid
        with Probes(port) as probes:
            time.sleep(SETTLE_S)
            t0 = time.time()
            uid = sup.stub.PushUpdate(pkg.request(), timeout=10).update_id
            final = follow_update(sup, uid, timeout=120)
            t1 = time.time()
            time.sleep(SETTLE_S)
        if not final.success:
            raise RuntimeError(f"self-update {uid} failed: {final.error}")
        wait_for(lambda: _all_running(sup), 30, what="the agents to run")
        after = _agents(sup)
        status = sup.status()
        if status.supervisor_version != pkg.version:
            raise RuntimeError(f"supervisor reports {status.supervisor_version}, not {pkg.version}")
        steps = {t.step: t.seconds for t in final.timings}
        gap = probes.window(t0, t1)[0]
        old_side, span, new_side, answers = probes.sides(t0, t1, pkg.version)
        upd["window"].append(gap)
        upd["old_side"].append(old_side)
        upd["bridge_span"].append(span)
        upd["new_side"].append(new_side)
        upd["bridge_answers"].append(answers)
        upd["rpc_failed"].append(sum(probes.rpc_errors.values()))
        upd["refused"].append(probes.refused_between(t0, t1))
        upd["agent_restarts"].append(sum(before[n] != after.get(n) for n in before))
        upd["total"].append(t1 - t0)
        upd["same_pid"].append(status.pid == pid)
        upd["handover"].append(steps.get("handover", float("nan")))
        upd["handshake"].append(steps.get("handshake", float("nan")))
        upd["errors"].append(dict(probes.rpc_errors) | {f"connect {k}": v for k, v in probes.connects.items()
                                                         if k != "accepted"})
        typical.append(probes.typical_gap())

    def stop_start() -> None:
        before = _agents(sup)
        with Probes(port) as probes:
            time.sleep(SETTLE_S)
            t0 = time.time()
            sup.stop()
            sup.start(from_layout=True, wait=False)
            sup.wait_serving()
            t_serving = time.time()
            wait_for(lambda: _all_running(sup), 30, interval=0.01, what="the agents to run")
            t_all = time.time()
            time.sleep(SETTLE_S)
        after = _agents(sup)
        ss["window"].append(probes.window(t0, t_all)[0])
        ss["rpc_failed"].append(sum(probes.rpc_errors.values()))
        ss["refused"].append(probes.refused_between(t0, t_all))
        ss["agent_restarts"].append(sum(before[n] != after.get(n) for n in before))
        ss["serving"].append(t_serving - t0)
        ss["all_running"].append(t_all - t0)
        ss["errors"].append(dict(probes.rpc_errors) | {f"connect {k}": v for k, v in probes.connects.items()
                                                        if k != "accepted"})

    try:
        for i, pkg in enumerate(pkgs):
            ctx.log(f"run {i + 1}/{runs}: self-update to {pkg.version}, and a stop + start")
            if i % 2 == 0:
                self_update(pkg)
                stop_start()
            else:
                stop_start()
                self_update(pkg)
    finally:
        sup.stop()

    w_upd, w_ss = median(upd["window"]), median(ss["window"])
    restarts = sum(upd["agent_restarts"])
    refused = sum(upd["refused"])
    s = Section(NAME, TITLE)
    s.add(f"A supervisor installed in its versioned layout and started through `current/bin/supervisor` (as "
          f"systemd would), listening on 127.0.0.1:{port} and a Unix socket, with {len(AGENT_NAMES)} Python agents "
          "(`READY=1`). During each event two probes run against the TCP port: a client calling `GetStatus` every "
          f"{POLL_PERIOD_S * 1000:.0f} ms (a fresh channel per call, `wait_for_ready`, reconnect backoff 10-100 ms so "
          "the figure is the server's, not the client library's), and a bare TCP `connect()` every "
          f"{CONNECT_PERIOD_S * 1000:.0f} ms counting refusals. The **window** is the longest time between two "
          "successful `GetStatus` answers. **Self-update**: `PushUpdate` of a new supervisor version (tar.gz of the "
          "code) until `WatchUpdate` shows it final. **Stop + start**: SIGTERM to the supervisor (it stops its "
          "agents), wait for it to exit, start it again the same way, until it serves and all agents run. The two "
          f"alternate; {runs} of each, median [min, max]. Outside events, answers come every "
          f"{fmt_s(median(typical))} (median).", "")
    s.add(*table(["", "self-update", "stop + start", "ratio"], [
        ("**window** without an answer", fmt_spread(upd["window"]), fmt_spread(ss["window"]),
         f"{fmt_x(w_ss / w_upd)} (stop+start / self-update)"),
        ("refused TCP connections (all events)", str(refused), str(sum(ss["refused"])), ""),
        ("`GetStatus` calls that failed (all events)", str(sum(upd["rpc_failed"])), str(sum(ss["rpc_failed"])),
         ""),
        ("Agent restarts (pid changed, all events)", f"{restarts} of {len(AGENT_NAMES) * runs}",
         f"{sum(ss['agent_restarts'])} of {len(AGENT_NAMES) * runs}", ""),
        ("supervisor pid unchanged", f"{sum(upd['same_pid'])} of {runs}", "no (a new process)", ""),
        ("time until serving again", "—", fmt_spread(ss["serving"]), ""),
        ("time until all agents run again", "— (they never stopped)", fmt_spread(ss["all_running"]), ""),
        ("self-update push to final status", fmt_spread(upd["total"]), "—", ""),
        ("of which `handover` (PREPARE to exec) / `handshake` (exec to HEALTHY)",
         f"{fmt_s(median(upd['handover']))} / {fmt_s(median(upd['handshake']))}", "—", ""),
        ("gaps: old process's last answer to the helper's first / the helper's last to the new process's first",
         f"{fmt_s(median(upd['old_side']))} / {fmt_s(median(upd['new_side']))}", "—", ""),
        ("the helper answering in between (first to last answer; answers per event)",
         f"{fmt_s(median(upd['bridge_span']))}; {median(upd['bridge_answers']):.0f}", "—", ""),
    ]), "")
    errs = [f"self-update: {e}" for e in upd["errors"] if e] + [f"stop + start: {e}" for e in ss["errors"] if e]
    if errs:
        s.add("Probe errors per event (gRPC status codes; connect failures): " + "; ".join(errs) + ".", "")
    ok_window = w_upd <= QUARTER * w_ss
    worst = max(upd["window"])
    failed = sum(upd["rpc_failed"])
    s.add(*table(["target", "figure", "met"], [
        ("zero Agent restarts", f"{restarts}", yes_no(restarts == 0)),
        ("no refused connections", f"{refused}", yes_no(refused == 0)),
        ("window at most a quarter of a stop + start's (medians)",
         f"{fmt_s(w_upd)} against {fmt_s(w_ss)} ({w_upd / w_ss:.2f}x)", yes_no(ok_window)),
        ("... in every run (the longest self-update window)", f"{fmt_s(worst)} ({worst / w_ss:.2f}x)",
         yes_no(worst <= QUARTER * w_ss)),
        ("no failed `GetStatus` calls", f"{failed}", yes_no(failed == 0)),
    ]), "")
    s.add("- During a self-update the old supervisor stops accepting and hands its listening sockets and agent "
          "table to the helper, which answers the read-only calls (`GetStatus`, `ListAgents`) on those same sockets "
          "from that table (`helper/bridge.py`) while the old process answers on the connections it had accepted "
          "until they close and execs the new version in the same pid, and the new version starts its "
          "interpreter and imports; at the new version's HELLO the helper stops accepting, hands the sockets on, "
          "and answers on its own accepted connections until they close. "
          "Connections are never refused and no agent is touched. A stop + start closes the port (connections "
          "are refused) and stops and starts every agent.",
          f"- What is left of the window is two hand-overs of the sockets: {fmt_s(median(upd['old_side']))} from "
          "the old process's last answer to the helper's first (PREPARE: stop accepting, stop the Manager client, "
          "release the agents, persist the table, send STATE with the descriptors; the helper's gRPC ports are "
          f"bound before PREPARE) and {fmt_s(median(upd['new_side']))} from the helper's last answer to the new "
          "process's first (the helper stops accepting, STATE to the new process, its gRPC "
          "server start and its front on the inherited sockets). The interpreter start and imports "
          f"({fmt_s(median(upd['bridge_span']))} of helper answers in between) no longer count.",
          f"- {'Where we lose: ' if not ok_window else ''}a stop + start here costs "
          f"{fmt_s(median(ss['serving']))} until it serves again, because these agents exit within 50 ms of "
          "SIGTERM and it pays the same interpreter start as the self-update's new process; the self-update "
          + (f"window is {w_upd / w_ss:.2f}x of it" if w_ss else "window")
          + f" ({fmt_s(w_upd)} against {fmt_s(w_ss)}). The stop + start time "
          "grows with the agents' stop and start times (up to each agent's `stop_timeout_s`); the self-update "
          "window does not depend on the agents.",
          "- The self-update's own duration includes the old process's drain after STATE: it answers on the "
          "connections it accepted until their clients close them (`DRAIN_S` in `baton/front.py` at most; "
          "the `WatchUpdate` that follows this very update is ended at the handover, UNAVAILABLE, and "
          "re-attached), so that no call meets a stopping server; the helper answers meanwhile, so it is not in "
          "the window.")
    s.summary = [
        SummaryRow("self-update", "control-plane window", fmt_s(w_upd), f"stop + start {fmt_s(w_ss)}",
                   f"{fmt_x(w_ss / w_upd)} " + ("shorter" if w_ss > w_upd else "(longer)"), "≤ 0.25x of stop + start",
                   yes_no(ok_window)),
        SummaryRow("self-update", "Agent restarts / refused connections", f"{restarts} / {refused}",
                   f"{sum(ss['agent_restarts'])} / {sum(ss['refused'])}", "—", "0 / 0",
                   yes_no(restarts == 0 and refused == 0)),
    ]
    return s

