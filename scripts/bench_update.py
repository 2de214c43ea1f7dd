"""Benchmark 3: an Agent update end to end (push to final status), against a shell script doing it by hand."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from benchlib import (
    PY,
    ROOT,
    BatonSupervisor,
    Ctx,
    HttpServer,
    MiB,
    Package,
    Section,
    SummaryRow,
    agent_tree,
    build_package,
    children,
    compile_checkout,
    drop_dirty_pages,
    fmt_s,
    fmt_spread,
    fmt_x,
    follow_update,
    install_version,
    make_keys,
    median,
    proc_cpu_split_s,
    proc_state,
    proc_status_kib,
    table,
    wait_for,
    yes_no,
)

from baton.standby import FLAG as STANDBY_FLAG

NAME = "update"
TITLE = "3. Agent update, end to end"

# The by-hand baseline. Each step prints "<step> <time>" ($EPOCHREALTIME is a bash builtin: no fork).
BY_HAND = r"""#!/bin/bash
# An Agent update by hand: download, hash, signature, extract, switch the link, stop and start the agent.
set -euo pipefail
mode=$1 root=$2
mark() { echo "$1 $EPOCHREALTIME"; }

start_agent() {
    rm -f "$root/ready"
    BENCH_READY_FILE="$root/ready" setsid "$root/current/bin/agent" >>"$root/agent.log" 2>&1 </dev/null &
    echo $! >"$root/agent.pid"
    for _ in $(seq 1 3000); do  # up to 30 s
        [ -s "$root/ready" ] && return 0
        sleep 0.01
    done
    echo "agent did not come up" >&2
    exit 1
}

if [ "$mode" = start ]; then
    start_agent
    exit 0
fi

url=$3 sha=$4 sig=$5 pub=$6 version=$7
pkg="$root/downloads/$version.pkg"
mkdir -p "$root/downloads" "$root/versions"
mark begin
curl -sf -o "$pkg" "$url"
mark download
echo "$sha  $pkg" | sha256sum -c --quiet -
mark hash
minisign -Vqm "$pkg" -x "$sig" -p "$pub"
mark signature
stage="$root/versions/.staging-$version"
rm -rf "$stage"
mkdir "$stage"
tar -xzf "$pkg" -C "$stage"
mv -T "$stage" "$root/versions/$version"
mark extract
ln -sfn "versions/$version" "$root/current.new"
mv -T "$root/current.new" "$root/current"
mark switch
pid=$(cat "$root/agent.pid")
kill -TERM "$pid" 2>/dev/null || true
for _ in $(seq 1 1000); do  # up to 10 s; an orphan nobody reaps shows as a zombie (Z)
    [ -e "/proc/$pid" ] || break
    read -r _ _ st _ <"/proc/$pid/stat" || break
    [ "$st" = Z ] && break
    sleep 0.01
done
mark stop
start_agent
mark start
rm -f "$pkg"
mark cleanup
"""
BY_HAND_STEPS = ("download", "hash", "signature", "extract", "switch", "stop", "start", "cleanup")
OUR_STEPS = ("download", "verify", "stage", "switch", "restart", "health", "settle")
PARTS = ("push", "helper start", *OUR_STEPS, "seen by client", "other")


def _journal(sup: BatonSupervisor, update_id: str) -> dict[str, Any]:
    path = sup.state_dir / "updates" / update_id / "journal.json"
    return json.loads(path.read_text())


def _stop_hand_agent(pid_file: Path) -> None:
    """SIGTERM the by-hand agent by its recorded pid and wait (bounded) until it has exited."""
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text().strip())
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    with contextlib.suppress(TimeoutError):
        wait_for(lambda: proc_state(pid) in ("", "Z", "X"), 10, what="the by-hand agent to exit")


def run(ctx: Ctx) -> Section:
    runs = ctx.runs(7, 3)
    payload = 10 * MiB
    keys = make_keys(ctx.work / "keys")
    served = ctx.work / "served"
    ctx.log(f"building {runs + 1} signed packages of about 10 MiB")
    pkgs: list[Package] = []
    for i in range(runs):
        v = f"1.0.{i + 1}"
        tree = agent_tree(ctx.work / "trees" / v, payload)
        pkgs.append(build_package(tree, served / f"app-{v}.tar.gz", "app", v, keys))
        shutil.rmtree(tree)
    server = HttpServer(ctx, served)
    for p in pkgs:
        p.url = server.url(p.path.name)

    compile_checkout()  # the helper starts from this checkout: with its bytecode, as an installed release has it
    base_tree = agent_tree(ctx.work / "trees" / "1.0.0")

    def supervisor(name: str, standby: bool) -> BatonSupervisor:
        one = BatonSupervisor(
            ctx, ctx.work / name,
            [{"name": "app", "packaged": True, "command": "bin/agent", "notify": True, "restart": "always",
              "stop_timeout_s": 5.0}],
            update={"trusted_keys": [str(keys.public)], "health_window_s": 0.0, "health_timeout_s": 30.0,
                    "max_backups": 2, "standby_helper": standby})
        install_version(one.install_root, "app", "1.0.0", base_tree)
        one.start()
        wait_for(lambda: one.count_running() == 1, 30, what="the agent to run")
        return one

    # The same supervisor twice: with its standby helper (the default) and with every helper spawned for its
    # update (`standby_helper = false`, how every update ran before the standby).
    sup = supervisor("baton", standby=True)
    cold = supervisor("baton-cold", standby=False)
    used: set[int] = set()  # standbys that took an update
    standby_rss: dict[str, list[float]] = {"VmRSS": [], "Pss": []}

    hand_root = ctx.work / "byhand"
    (hand_root / "versions").mkdir(parents=True)
    shutil.copytree(base_tree, hand_root / "versions" / "1.0.0")
    (hand_root / "current").symlink_to("versions/1.0.0")
    script = ctx.work / "update-by-hand.sh"
    script.write_text(BY_HAND)
    script.chmod(0o755)
    subprocess.run([str(script), "start", str(hand_root)], check=True, env=ctx.reaper.env, timeout=60,
                   capture_output=True)

    ours: list[float] = []
    ours_parts: dict[str, list[float]] = {k: [] for k in PARTS}
    spawned: list[float] = []
    spawned_parts: dict[str, list[float]] = {k: [] for k in PARTS}
    hand: list[float] = []
    hand_parts: dict[str, list[float]] = {k: [] for k in BY_HAND_STEPS}

    cpu: dict[str, list[float]] = {"supervisor": [], "helper and replaced agent": [], "script": [],
                                   "spawned helper and replaced agent": []}

    def standby_ready() -> None:
        """Wait until the standby supervisor has a new standby loaded, and note its memory."""
        pid = wait_for(lambda: _ready_standby(sup, used), 60, what="a standby helper to be ready")
        standby_rss["VmRSS"].append(proc_status_kib(pid, "VmRSS") / 1024)
        standby_rss["Pss"].append(_pss_kib(pid) / 1024)

    def run_spawned(pkg: Package) -> None:
        run_ours(pkg, cold, spawned, spawned_parts, "spawned helper and replaced agent")

    def run_standby(pkg: Package) -> None:
        run_ours(pkg, sup, ours, ours_parts, "helper and replaced agent")

    def run_ours(pkg: Package, target: BatonSupervisor, totals: list[float], parts_of: dict[str, list[float]],
                 helper_cpu: str) -> None:
        assert target.proc is not None
        own0, children0 = proc_cpu_split_s(target.proc.pid)
        t_wall = time.time()
        t0 = time.perf_counter()
        uid = target.stub.PushUpdate(pkg.request(), timeout=10).update_id
        final = follow_update(target, uid, timeout=120)
        total = time.perf_counter() - t0
        t_seen = time.time()
        rec = _journal(target, uid)
        used.add(rec["helper_pid"])
        wait_for(lambda: not _helpers(target.proc.pid, rec["helper_pid"]), 10, what="the helper to be reaped")
        own1, children1 = proc_cpu_split_s(target.proc.pid)
        if target is sup:
            cpu["supervisor"].append(own1 - own0)
        cpu[helper_cpu].append(children1 - children0)
        ctx.log(f"{pkg.version} ({'standby' if target is sup else 'spawned'}): CPU supervisor {own1 - own0:.2f} s, "
                f"helper and replaced agent {children1 - children0:.2f} s")
        if not final.success:
            raise RuntimeError(f"update {uid} failed: {final.error}")
        totals.append(total)
        steps = {t.step: t.seconds for t in final.timings}
        first = next(h["at"] for h in rec["history"] if h["state"] == "downloading")
        parts = {"push": rec["created_at"] - t_wall, "helper start": first - rec["created_at"],
                 # updated_at is the last state's (COMMITTED); the settled record is written at the end of settle
                 "seen by client": t_seen - rec["updated_at"] - steps.get("settle", 0.0)}
        parts.update({k: steps.get(k, 0.0) for k in OUR_STEPS})
        parts["other"] = total - sum(parts.values())
        for k, v in parts.items():
            parts_of[k].append(v)

    def run_hand(pkg: Package) -> None:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        r = subprocess.run([str(script), "update", str(hand_root), pkg.url or "", pkg.sha256, str(pkg.sig_path),
                            str(keys.public), pkg.version], check=True, capture_output=True, text=True,
                           env=ctx.reaper.env, timeout=120)
        hand.append(time.perf_counter() - t0)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu["script"].append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        marks = [(ln.split()[0], float(ln.split()[1])) for ln in r.stdout.splitlines() if len(ln.split()) == 2]
        for (_, a), (step, b) in itertools.pairwise(marks):
            hand_parts[step].append(b - a)

    try:
        for i, pkg in enumerate(pkgs):
            ctx.log(f"run {i + 1}/{runs}: {pkg.version}")
            order = [run_standby, run_spawned, run_hand]
            for fn in order[i % 3:] + order[:i % 3]:
                standby_ready()  # nothing else runs during a measurement: not a standby's start either
                drop_dirty_pages()
                fn(pkg)
        for one in (sup, cold):
            agent = one.agents()["app"]
            if agent.version != pkgs[-1].version:
                raise RuntimeError(f"the agent runs {agent.version}, not {pkgs[-1].version}")
    finally:
        sup.stop()
        cold.stop()
        server.stop()
        _stop_hand_agent(hand_root / "agent.pid")

    m_ours, m_hand, m_spawned = median(ours), median(hand), median(spawned)
    ratio, ratio_spawned = m_hand / m_ours, m_hand / m_spawned
    size_mib = pkgs[0].size / MiB
    s = Section(NAME, TITLE)
    s.add(f"A packaged Agent (a small Python program that sends `READY=1`, stops at once on SIGTERM) updated {runs} "
          f"times, each time to a new version: a {size_mib:.1f} MiB `.tar.gz` (a 10 MiB incompressible payload), "
          "served over HTTP on 127.0.0.1. **Ours**: `PushUpdate` over gRPC (Unix socket) until `WatchUpdate` shows "
          "the update final and settled; `health_window_s = 0`, so the agent counts as healthy once it is ready. "
          "**By hand**: `update-by-hand.sh` (below) does the same steps on the same packages: `curl -o`, "
          "`sha256sum -c`, `minisign -V`, `tar -xzf` into a staging directory then `mv` into `versions/`, "
          "`ln -sfn` + `mv -T` for the link, `kill -TERM` and wait for the exit, start the new version with "
          "`setsid` and wait until it has written its ready file (polled every 10 ms). Ours runs two ways, each "
          "on a supervisor of its own: with the **standby helper** (the default: a helper started and loaded "
          "before the push takes the update, `baton/standby.py`) and with **every helper spawned** for its update "
          "(`update.standby_helper = false`, how every update ran before). The three take turns, each run "
          "starting once the standby supervisor has its next standby loaded (so no start-up runs during a "
          f"measurement); {runs} runs each, median [min, max]. The helper starts from the checkout with its "
          "bytecode compiled first, as an installed release's is (`baton/release.py`).", "")
    s.add(*table(["", "push to result", "ratio"], [
        ("**ours**: PushUpdate -> WatchUpdate final, standby helper", fmt_spread(ours), "1.00x"),
        ("**ours**, every helper spawned for its update", fmt_spread(spawned),
         f"{fmt_x(m_spawned / m_ours)} of the standby's time"),
        ("**by hand**: the shell script", fmt_spread(hand),
         f"{fmt_x(ratio)} (its time / ours); {fmt_x(ratio_spawned)} against the spawned helper"),
    ]), "")
    s.add("Where our time goes (median of each part; journal timings from `UpdateStatus.timings`, the rest from "
          "the journal's timestamps):", "")
    notes = {
        "push": "PushUpdate: admission, journal record written (fsync), answer",
        "helper start": "journal record written to the helper's first state. Standby: the id handed over "
                        "`standby.sock`, the config read, the request re-checked, keys loaded. Spawned: the same "
                        "after `python -m helper apply`'s interpreter start and imports",
        "download": "HTTP download, hashed on the fly, fsync",
        "verify": "size, SHA-256, both signatures, manifest",
        "stage": "extract into staging (every member checked), rename, marker",
        "switch": "`current` link renamed",
        "restart": "restart over the agent channel (`agents.sock`): SIGTERM, exit, spawn",
        "health": "until the agent is RUNNING after READY=1 (window 0); pushed to the helper by the channel's watch",
        "settle": "mark moved, backups pruned, download removed",
        "seen by client": "final journal write to the client's WatchUpdate seeing it (woken by inotify on the "
                          "journal's rename; directory fsynced before it is shown)",
        "other": "journal writes between steps, helper exit, gRPC",
    }
    def part(v: list[float]) -> str:  # "other" is a difference of two clocks: a few ms either way is noise
        return "≈ 0" if abs(median(v)) < 0.005 else fmt_s(median(v))

    s.add(*table(["part", "standby", "spawned", "what"],
                 [(k, part(v), part(spawned_parts[k]), notes[k]) for k, v in ours_parts.items()]), "")
    s.add("Where the by-hand time goes:", "")
    s.add(*table(["step", "median"], [(k, fmt_s(median(v))) for k, v in hand_parts.items()]), "")
    slow = sorted(((median(v), k) for k, v in ours_parts.items()), reverse=True)[:3]
    s.add(f"- Our three largest parts: {', '.join(f'{k} ({fmt_s(v)})' for v, k in slow)}. "
          "The helper is a Python process of its own per update (so a crash of it never touches the supervisor): "
          "its start-up is a fixed cost the shell script does not pay: the interpreter, the update machine's "
          "imports (config, journal, download, archive, the agent channel's client; no gRPC: the helper asks the "
          "supervisor over the agent channel, `docs/protocols.md`), the config file read and the request "
          "checked again (their CPU is measured below). With a standby helper the interpreter and the imports "
          f"are paid before the push, off the update's path: its helper start is {part(ours_parts['helper start'])} "
          f"against {part(spawned_parts['helper start'])} spawned. Every state change is written durably "
          "(fsync) before its work starts, so a killed helper can resume; the script keeps no record.",
          f"- {'We are faster' if ratio > 1 else 'We are slower'} end to end: {fmt_s(m_ours)} against "
          f"{fmt_s(m_hand)} ({fmt_x(ratio)}). The script checks nothing a push must (downgrade, manifest binding "
          "of component and version, disk space, archive members), cannot roll back, and its agent is an orphan "
          "nobody supervises.", "")
    s.add("CPU per update (user + system, median; the supervisor's own, and that of the children it reaped during "
          "the update: the helper and the agent version it replaced, whose start-up is most of its CPU):", "")
    s.add(*table(["", "CPU"], [
        ("ours: supervisor", fmt_s(median(cpu["supervisor"]))),
        ("ours: helper (the standby's start included) and replaced agent",
         fmt_s(median(cpu["helper and replaced agent"]))),
        ("ours, every helper spawned: helper and replaced agent",
         fmt_s(median(cpu["spawned helper and replaced agent"]))),
        ("ours: total", fmt_s(median([a + b for a, b in zip(cpu["supervisor"], cpu["helper and replaced agent"],
                                                            strict=True)]))),
        ("by hand: the script and everything it ran (the old agent not included)", fmt_s(median(cpu["script"]))),
    ]), "")
    start = dict(zip((label for label, _ in HELPER_START_PARTS),
                     _start_cpu_s([code for _, code in HELPER_START_PARTS]), strict=True))
    s.add(f"Where the helper's CPU goes: its start-up, measured apart in the same run (a fresh `{Path(PY).name}` "
          f"process running just the import, {START_CPU_RUNS} runs each, median; the interpreter's own start "
          "included in each row but the first):", "")
    s.add(*table(["process", "CPU"], [(label, fmt_s(v)) for label, v in start.items()]), "")
    bare, everything, collected, with_grpc = (start[label] for label, _ in HELPER_START_PARTS)
    s.add(f"- Interpreter start-up and imports are {fmt_s(everything)} of the helper's CPU per update (imports "
          f"{fmt_s(everything - bare)}). With the cycle collector on while they load, they cost "
          f"{fmt_s(collected)} ({fmt_x(collected / everything)}): its full passes walk every module, class and "
          "function made so far, again and again, while the imports keep making more. The gRPC client that "
          f"helpers used to talk to the supervisor with would add {fmt_s(with_grpc - everything)} to every "
          "update (the last row); it is imported now only for a supervisor without the agent channel. (Imported "
          "on a thread beside the download, as it was before the channel, it held the GIL the helper's other "
          "imports and the download's threads needed: updates took about 20 ms longer than with it imported when "
          "needed.) The other "
          f"{fmt_s(median(cpu['helper and replaced agent']) - everything)} of the helper and replaced agent's "
          f"{fmt_s(median(cpu['helper and replaced agent']))} is the update's own work (download and both digests, "
          "extraction, fsyncs, control calls) and the replaced agent's own life (a Python program too).", "")
    slow_start = 1.5  # issue 26: the goal must hold where Python starts this much slower
    projected = m_spawned + (slow_start - 1) * everything
    s.add(f"- On a machine where the interpreter's start and these imports take {slow_start:g}x as long (the "
          f"{fmt_s(everything)} above), a spawned helper's update would take about {fmt_s(projected)}, "
          f"{fmt_x(projected / m_hand)} the script's time measured here (goal: at most 1.5x); the standby helper's "
          f"update has none of that start on its path: {fmt_s(m_ours)}, {fmt_x(m_ours / m_hand)} the script's "
          "time (its remaining start, the config read, the request re-checked and the keys loaded, would grow "
          f"by half of the {part(ours_parts['helper start'])} above). What the standby costs instead is its "
          f"memory while it waits: VmRSS {_mib_spread(standby_rss['VmRSS'])} (Pss "
          f"{_mib_spread(standby_rss['Pss'])}: its share of pages it has in common with the supervisor and "
          "other Python processes), measured at each run's start; and it is started again after each update, once "
          "no helper runs.", "")
    s.add("<details><summary>update-by-hand.sh</summary>", "", "```bash", BY_HAND.strip(), "```", "", "</details>")
    s.summary = [SummaryRow("agent update", f"{size_mib:.0f} MiB package, push to final status", fmt_s(m_ours),
                            f"shell script {fmt_s(m_hand)}", f"{fmt_x(ratio)}" + (" faster" if ratio >= 1 else ""),
                            "at most 1.5x the script's time", yes_no(m_ours <= 1.5 * m_hand)),
                 SummaryRow("agent update", "the same, every helper spawned (`standby_helper = false`)",
                            fmt_s(m_spawned), f"shell script {fmt_s(m_hand)}",
                            f"{fmt_x(ratio_spawned)}" + (" faster" if ratio_spawned >= 1 else ""),
                            "at most 1.5x the script's time", yes_no(m_spawned <= 1.5 * m_hand)),
                 SummaryRow("agent update", "idle standby helper's memory (VmRSS, Pss)",
                            f"{median(standby_rss['VmRSS']):.1f} MiB, {median(standby_rss['Pss']):.1f} MiB",
                            "—", "—", "beside the supervisor's RSS goal (section 5)", "—")]
    return s


START_CPU_RUNS = 11
_AS_APPLY = ("import helper.cli, baton.startup\n"
             "with baton.startup.loading():\n"
             "    import helper.machine, helper.control")
HELPER_START_PARTS = (  # (what, the Python code a fresh interpreter runs)
    ("an interpreter that does nothing (`-c pass`)", "pass"),
    ("the helper's update-path imports (`helper.cli`, `helper.machine`, `helper.control`), loaded as "
     "`helper apply` loads them: the cycle collector off, then the objects frozen", _AS_APPLY),
    ("the same imports with the cycle collector on throughout (how the helper loaded them before)",
     "import helper.cli, helper.machine, helper.control"),
    ("those and the gRPC client's, which the agent channel replaces (`grpc`, protobuf stubs)",
     _AS_APPLY + ", grpc, baton.pb.daemon_pb2_grpc"),
)


def _start_cpu_s(codes: list[str]) -> list[float]:
    """Median CPU (user + system) of a fresh interpreter running each of ``codes``, read from its own rusage.

    The codes take turns, so a change in the machine's speed during the runs shows in all of them alike.
    """
    samples: list[list[float]] = [[] for _ in codes]
    for _ in range(START_CPU_RUNS):
        for code, got in zip(codes, samples, strict=True):
            proc = subprocess.Popen([PY, "-c", code], cwd=ROOT)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode != 0:
                raise RuntimeError(f"{PY} -c {code!r} exited with {proc.returncode}")
            got.append(usage.ru_utime + usage.ru_stime)
    return [median(got) for got in samples]


def _helpers(pid: int, ran: int) -> list[int]:
    """The supervisor's helper children still there (``ran``, the one that carried out the update, and any
    spawned one; not a standby waiting for the next update), or any child exited and not yet reaped (a
    zombie), or one without a command line: a process that is exiting (its memory, command line included, is
    gone before it is a zombie) or has not exec'd yet. Counting the helper's CPU needs it reaped."""
    found = []
    for c in children(pid):
        with contextlib.suppress(OSError), open(f"/proc/{c}/cmdline", "rb") as f:
            cmdline = f.read().split(b"\0")
            waiting = STANDBY_FLAG.encode() in cmdline and c != ran
            if cmdline == [b""] or (b"apply" in cmdline and not waiting) or proc_state(c) == "Z":
                found.append(c)
    return found


def _ready_standby(sup: BatonSupervisor, used: set[int]) -> int | None:
    """The pid of the standby the supervisor says is loaded and waiting (not one that took an update)."""
    pids = [int(p) for p in re.findall(r"standby helper pid (\d+) is ready", sup.log_path.read_text())]
    pid = pids[-1] if pids else 0
    return pid if pid and pid not in used and proc_state(pid) not in ("", "Z", "X") else None


def _mib_spread(xs: list[float]) -> str:
    return f"{median(xs):.1f} MiB [{min(xs):.1f}, {max(xs):.1f}]"


def _pss_kib(pid: int) -> int:
    """Proportional set size: each shared page counted as a share of the processes that map it."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0
