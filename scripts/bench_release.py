"""Benchmark 7: self-contained releases: size, build time, install from a release, self-update with a release."""

from __future__ import annotations

import shutil
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

from bench_selfupdate import AGENT_NAMES, SETTLE_S, Probes
from benchlib import (
    PY,
    READY_AGENT,
    ROOT,
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

NAME = "release"
TITLE = "7. Self-contained supervisor releases"
LOCK = ROOT / "requirements" / "runtime.lock"
MB = 1e6


def _build(ctx: Ctx, version: str) -> tuple[Path, float]:
    from manager.build.release import build_release

    out = ctx.work / "dist"
    out.mkdir(exist_ok=True)
    t0 = time.monotonic()
    path, _, _ = build_release(version, out, lock=LOCK, source=ROOT, force=True)  # each run builds it again
    return path, time.monotonic() - t0


def _sign(path: Path, version: str, keys: Any) -> Package:
    from baton.digest import digest_stream
    from baton.signing import format_manifest, sign_prehash

    with open(path, "rb") as f:
        d = digest_stream(f)
    sig = sign_prehash(keys.secret, d.blake2b512, format_manifest("supervisor", version))
    return Package(path, "supervisor", version, d.sha256_hex, d.size, sig)


def _unpacked(path: Path) -> tuple[int, int]:
    with tarfile.open(path) as tar:
        files = [m for m in tar.getmembers() if m.isfile()]
    return len(files), sum(m.size for m in files)


def _supervisor(ctx: Ctx, name: str, port: int, keys: Any, agent_py: Path) -> BatonSupervisor:
    return BatonSupervisor(
        ctx, ctx.work / name,
        [{"name": n, "command": PY, "args": ["-u", str(agent_py)], "notify": True, "restart": "always"}
         for n in AGENT_NAMES],
        tcp_port=port, update={"trusted_keys": [str(keys.public)], "handshake_timeout_s": 30.0, "max_backups": 2,
                                   "file_url_root": str(ctx.work)})  # the packages are built beneath it


def _install_from_release(ctx: Ctx, sup: BatonSupervisor, tarball: Path) -> float:
    """``tar -xzf`` + ``install-self`` with an empty environment, as the README says; seconds."""
    dest = sup.base / "unpacked"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    t0 = time.monotonic()
    subprocess.run(["tar", "-xzf", str(tarball), "-C", str(dest)], check=True)
    (root,) = dest.iterdir()
    r = subprocess.run(["env", "-i", str(root / "bin" / "supervisor"), "install-self", "--config",
                        str(sup.config_path), "--unit-dir", str(sup.base / "units"), "--bin-dir", ""],
                       capture_output=True, text=True, cwd="/", timeout=300)
    elapsed = time.monotonic() - t0
    if r.returncode != 0:
        raise RuntimeError(f"install-self failed: {r.stderr.strip()}")
    return elapsed


def _venv_baseline(ctx: Ctx) -> float:
    """What a host would do without releases: a venv and ``pip install`` of the same lock file; seconds."""
    venv = ctx.work / "venv-baseline"
    shutil.rmtree(venv, ignore_errors=True)
    t0 = time.monotonic()
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    subprocess.run([PY, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet",
                    "--require-hashes", "--no-deps", "--only-binary=:all:", "-r", str(LOCK)], check=True,
                   capture_output=True, timeout=600)
    return time.monotonic() - t0


def _self_updates(ctx: Ctx, sup: BatonSupervisor, pkgs: list[Package], port: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"total": [], "window": [], "restarts": [], "refused": []}
    for pkg in pkgs:
        before = {n: a.pid for n, a in sup.agents().items()}
        with Probes(port) as probes:
            time.sleep(SETTLE_S)
            t0 = time.time()
            uid = sup.stub.PushUpdate(pkg.request(), timeout=10).update_id
            final = follow_update(sup, uid, timeout=180)
            t1 = time.time()
            time.sleep(SETTLE_S)
        if not final.success:
            raise RuntimeError(f"self-update to {pkg.version} failed: {final.error}")
        wait_for(lambda: sup.count_running() == len(AGENT_NAMES), 30, what="the agents to run")
        after = {n: a.pid for n, a in sup.agents().items()}
        out["total"].append(t1 - t0)
        out["window"].append(probes.window(t0, t1)[0])
        out["restarts"].append(sum(before[n] != after.get(n) for n in before))
        out["refused"].append(probes.refused_between(t0, t1))
    return out


def run(ctx: Ctx) -> Section:
    from supervisor.cli.install_self import write_tree

    runs = ctx.runs(3, 2)
    updates = ctx.runs(3, 2)
    keys = make_keys(ctx.work / "keys")
    agent_py = ctx.work / "ready_agent.py"
    agent_py.write_text(READY_AGENT)

    ctx.log(f"building {runs} releases of 1.0.0 (build time, reproducibility)")
    builds = [_build(ctx, "1.0.0") for _ in range(runs)]
    tarball = builds[0][0]
    sha = {_sign(p, "1.0.0", keys).sha256 for p, _ in builds}
    n_files, unpacked = _unpacked(tarball)
    code_tree = write_tree(ctx.work / "code-tree", "1.0.0")
    code_pkg = build_package(code_tree, ctx.work / "code" / "supervisor-code.tar.gz", "supervisor", "1.0.0", keys)

    ctx.log(f"{runs} installs from the release, and {runs} venv + pip install of the same lock")
    installs, venvs = [], []
    for i in range(runs):
        sup = _supervisor(ctx, f"install-{i}", free_port(), keys, agent_py)
        installs.append(_install_from_release(ctx, sup, tarball))
        venvs.append(_venv_baseline(ctx))

    ctx.log(f"{updates} self-updates between releases, and {updates} with code-only trees")
    port = free_port()
    rel_sup = _supervisor(ctx, "rel", port, keys, agent_py)
    _install_from_release(ctx, rel_sup, tarball)
    rel_pkgs = [_sign(_build(ctx, f"1.0.{i + 1}")[0], f"1.0.{i + 1}", keys) for i in range(updates)]
    rel_sup.start(from_layout=True)
    try:
        wait_for(lambda: rel_sup.count_running() == len(AGENT_NAMES), 30, what="the agents to run")
        rel = _self_updates(ctx, rel_sup, rel_pkgs, port)
    finally:
        rel_sup.stop()
    port = free_port()
    code_sup = _supervisor(ctx, "code", port, keys, agent_py)
    code_sup.install_self("1.0.0")
    code_pkgs = []
    for i in range(updates):
        tree = write_tree(ctx.work / "trees" / f"1.0.{i + 1}", f"1.0.{i + 1}")
        code_pkgs.append(build_package(tree, ctx.work / "code" / f"supervisor-1.0.{i + 1}.tar.gz", "supervisor",
                                       f"1.0.{i + 1}", keys))
    code_sup.start(from_layout=True)
    try:
        wait_for(lambda: code_sup.count_running() == len(AGENT_NAMES), 30, what="the agents to run")
        code = _self_updates(ctx, code_sup, code_pkgs, port)
    finally:
        code_sup.stop()

    build_s = [s for _, s in builds]
    size = tarball.stat().st_size
    w_rel, w_code = median(rel["window"]), median(code["window"])
    s = Section(NAME, TITLE)
    s.add(f"`baton-package release` builds Baton plus the {len(LOCK.read_text().split('==')) - 1} locked "
          "dependencies of `requirements/runtime.lock` into one tarball (pip from its configured index and cache). "
          f"Build: {runs} builds of 1.0.0 from the same commit and lock, median [min, max]. "
          "Install: `tar -xzf` + `env -i .../bin/supervisor "
          f"install-self` into a fresh install root, {runs} times, beside a venv made by `/usr/bin/python3 -m venv` "
          "and `pip install --require-hashes` of the same lock (what a host needs without releases). Self-update: "
          f"{updates} pushes each between releases and between code-only trees (Baton's code, dependencies from "
          "`BATON_PYTHON`), same supervisor, agents and TCP probes as section 4.", "")
    s.add(*table(["", "release", "baseline", "ratio"], [
        ("tarball size", f"{size / MB:.1f} MB", f"{code_pkg.size / MB:.2f} MB (code-only tree)",
         fmt_x(size / code_pkg.size)),
        ("unpacked", f"{unpacked / MB:.1f} MB in {n_files} files", "—", ""),
        ("build time", fmt_spread(build_s), "—", ""),
        ("builds byte-identical", f"{'yes' if len(sha) == 1 else 'NO'} ({runs} builds)", "—", ""),
        ("install on a host (unpack + install-self)", fmt_spread(installs), f"{fmt_spread(venvs)} (venv + pip)",
         fmt_x(median(venvs) / median(installs))),
        ("self-update push to final status", fmt_spread(rel["total"]), f"{fmt_spread(code['total'])} (code-only)",
         fmt_x(median(rel["total"]) / median(code["total"]))),
        ("self-update control-plane **window**", fmt_spread(rel["window"]),
         f"{fmt_spread(code['window'])} (code-only)", fmt_x(w_rel / w_code)),
        ("Agent restarts / refused connections", f"{sum(rel['restarts']):.0f} / {sum(rel['refused']):.0f}",
         f"{sum(code['restarts']):.0f} / {sum(code['refused']):.0f}", ""),
    ]), "")
    ok = w_rel <= 1.5 * w_code
    s.add("- The window does not grow with the release: the new process's interpreter start and imports are the "
          "same code from another directory (`/usr/bin/python3 -IS` instead of the venv's interpreter); the "
          "download, verification, unpacking and bytecode compilation (`compileall`: a release ships no "
          "`__pycache__`, and compiling on first import cost about a second of window) of the larger tarball "
          "happen before the switch, outside the window, and show in the push-to-final time.",
          f"- Where we lose: the release is {fmt_x(size / code_pkg.size)} the size of the code-only package (almost "
          "all of it grpcio's and cryptography's compiled libraries), so a self-update downloads, verifies and "
          "unpacks more before its switch"
          + ("; and the window is longer than the code-only one." if not ok else "."))
    s.summary = [
        SummaryRow("release", "self-update window with a release", fmt_s(w_rel), f"code-only {fmt_s(w_code)}",
                   fmt_x(w_rel / w_code), "not longer than code-only (taken as: within 1.5x)", yes_no(ok)),
        SummaryRow("release", "install a host from a release", fmt_s(median(installs)),
                   f"venv + pip {fmt_s(median(venvs))}", fmt_x(median(venvs) / median(installs)), "—", "—"),
    ]
    return s
