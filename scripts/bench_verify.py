"""Benchmark 1: signature and SHA-256 check of a large package, against sha256sum + minisign and OpenSSL."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import time
from collections.abc import Callable

from benchlib import (
    PY,
    SCRIPTS,
    Ctx,
    GiB,
    MiB,
    Section,
    SummaryRow,
    drop_dirty_pages,
    fmt_rate,
    fmt_s,
    fmt_size,
    fmt_spread,
    fmt_x,
    make_keys,
    median,
    random_file,
    table,
    timed,
    warm,
    yes_no,
)

NAME = "verify"
TITLE = "1. Verification"
COMPONENT, VERSION = "app", "2.0.0"


def openssl_speed(alg: str, seconds: int) -> float:
    """Single-stream bytes per second of ``openssl speed -evp ALG -bytes 1048576``."""
    r = subprocess.run(["openssl", "speed", "-evp", alg, "-bytes", str(MiB), "-seconds", str(seconds)],
                       capture_output=True, text=True, timeout=120, check=True)
    for line in reversed(r.stdout.splitlines()):
        m = re.match(rf"^{re.escape(alg)}\s+([0-9.]+)k\s*$", line.strip())
        if m:
            return float(m.group(1)) * 1000
    raise RuntimeError(f"cannot parse openssl speed output for {alg}: {r.stdout[-300:]}")


def fmt_rate_spread(rates: list[float]) -> str:
    return f"{median(rates) / 1e6:.0f} MB/s [{min(rates) / 1e6:.0f}, {max(rates) / 1e6:.0f}]"


def run(ctx: Ctx) -> Section:
    size = 256 * MiB if ctx.quick else GiB
    runs = ctx.runs(5, 2)
    d = ctx.work / "verify"
    pkg = random_file(d / "pkg.bin", size)
    keys = make_keys(d / "keys")
    sig = d / "pkg.bin.minisig"
    ctx.log(f"signing {fmt_size(size)} with minisign -S")
    subprocess.run(["minisign", "-S", "-s", str(keys.secret_path), "-m", str(pkg), "-x", str(sig),
                    "-t", f"component={COMPONENT} version={VERSION}"], check=True, capture_output=True, timeout=120)
    with open(pkg, "rb") as f:
        sha = hashlib.file_digest(f, "sha256").hexdigest()
    warm(pkg)

    times: dict[str, list[float]] = {k: [] for k in (
        "ours", "ours_inproc", "ours_serial", "sha256sum", "minisign", "by_hand",
        "ossl_sha256", "ossl_b2", "ossl_both", "sha256", "blake2b512")}
    speed_s = 1 if ctx.quick else 2
    hwm: list[int] = []

    def ours(serial: bool = False) -> None:
        argv = [PY, SCRIPTS / "bench_worker.py", "verify", pkg, "--signature", sig, "--key", keys.public,
                "--component", COMPONENT, "--version", VERSION, "--sha256", sha, "--size", str(size)]
        t0 = time.perf_counter()
        r = subprocess.run([str(a) for a in argv] + (["--serial"] if serial else []), check=True,
                           capture_output=True, text=True, timeout=600)
        wall = time.perf_counter() - t0
        res = json.loads(r.stdout)
        if serial:
            times["ours_serial"].append(res["total_s"])
        else:
            times["ours"].append(wall)
            times["ours_inproc"].append(res["total_s"])
            hwm.append(res["hwm_kib"])

    def by_hand() -> None:
        a = timed(["sha256sum", pkg])
        b = timed(["minisign", "-Vm", pkg, "-x", sig, "-p", keys.public])
        times["sha256sum"].append(a)
        times["minisign"].append(b)
        times["by_hand"].append(a + b)

    def ossl_both() -> None:
        t0 = time.perf_counter()
        procs = [subprocess.Popen(["openssl", "dgst", f"-{alg}", str(pkg)], stdout=subprocess.DEVNULL)
                 for alg in ("sha256", "blake2b512")]
        for p in procs:
            if p.wait(600) != 0:
                raise RuntimeError("openssl dgst failed")
        times["ossl_both"].append(time.perf_counter() - t0)

    def limit() -> None:
        """The machine's single-stream digest speeds, taken in the rotation: its speed drifts over a minute."""
        for alg in ("sha256", "blake2b512"):
            times[alg].append(openssl_speed(alg, speed_s))

    readers: list[tuple[str, Callable[[], None]]] = [
        ("ours", ours),
        ("by hand", by_hand),
        ("openssl sha256", lambda: times["ossl_sha256"].append(timed(["openssl", "dgst", "-sha256", pkg]))),
        ("openssl blake2b512", lambda: times["ossl_b2"].append(timed(["openssl", "dgst", "-blake2b512", pkg]))),
        ("openssl both", ossl_both),
        ("ours serial", lambda: ours(serial=True)),
        ("openssl speed", limit),
    ]
    for i in range(runs):
        k = i % len(readers)
        order = readers[k:] + readers[:k]
        ctx.log(f"run {i + 1}/{runs}: " + ", ".join(n for n, _ in order))
        for _, fn in order:
            drop_dirty_pages()
            fn()
    m = {k: median(v) for k, v in times.items()}
    speed_sha, speed_b2 = m["sha256"], m["blake2b512"]
    ours_rate = size / m["ours_inproc"]
    slower = min(speed_sha, speed_b2)
    slower_name = "SHA-256" if speed_sha < speed_b2 else "BLAKE2b-512"
    speedup = m["by_hand"] / m["ours"]
    # each run of ours against the limit measured in the same turn of the rotation
    vs_limits = [size / o / min(a, b) for o, a, b in zip(times["ours_inproc"], times["sha256"], times["blake2b512"],
                                                         strict=True)]
    vs_limit, worst_vs_limit = median(vs_limits), min(vs_limits)
    dgst_slower = max(m["ossl_sha256"], m["ossl_b2"])

    s = Section(NAME, TITLE)
    s.add(f"A {fmt_size(size)} file of random bytes, signed with `minisign -S` (prehashed, trusted comment "
          f"`component={COMPONENT} version={VERSION}`, key from `minisign -G -W`). Every reader runs on a warm page "
          f"cache (the file is read once before timing and fits in memory; dirty pages are synced before each "
          f"reader); the order of the readers rotates from run to run. {runs} runs, median [min, max].", "")
    def rel(key: str, ref: str = "ours") -> str:
        return fmt_x(m[key] / m[ref])

    rows = [
        ("**ours**: `digest_stream` + `verify_package`, whole process (interpreter start, imports, one read)",
         fmt_spread(times["ours"]), fmt_rate(size, m["ours"]), "1.00x"),
        ("ours, inside the process (read + both digests + signature/manifest check)",
         fmt_spread(times["ours_inproc"]), fmt_rate(size, m["ours_inproc"]), "(1.00x)"),
        ("ours with both digests on one thread (`parallel=False`), inside the process",
         fmt_spread(times["ours_serial"]), fmt_rate(size, m["ours_serial"]), f"({rel('ours_serial', 'ours_inproc')})"),
        ("**by hand**: `sha256sum FILE` then `minisign -Vm FILE -p PUB`", fmt_spread(times["by_hand"]),
         fmt_rate(size, m["by_hand"]), rel("by_hand")),
        ("`sha256sum` alone", fmt_spread(times["sha256sum"]), fmt_rate(size, m["sha256sum"]), rel("sha256sum")),
        ("`minisign -V` alone (BLAKE2b-512 + Ed25519)", fmt_spread(times["minisign"]), fmt_rate(size, m["minisign"]),
         rel("minisign")),
        ("`openssl dgst -sha256`", fmt_spread(times["ossl_sha256"]), fmt_rate(size, m["ossl_sha256"]),
         rel("ossl_sha256")),
        ("`openssl dgst -blake2b512`", fmt_spread(times["ossl_b2"]), fmt_rate(size, m["ossl_b2"]), rel("ossl_b2")),
        ("both `openssl dgst` at once (two processes, two cores)", fmt_spread(times["ossl_both"]),
         fmt_rate(size, m["ossl_both"]), rel("ossl_both")),
    ]
    s.add(*table(["reader", "wall time", "throughput", "its time / ours"], rows), "",
          "`its time / ours` above 1 means ours is faster; rows in brackets compare in-process times.", "")
    s.add(f"The machine's limit, single stream (`openssl speed -evp ALG -bytes 1048576 -seconds {speed_s}`, taken "
          f"once per turn of the rotation above, so each run of ours has one from the same minute; {runs} runs, "
          f"median [min, max]): SHA-256 {fmt_rate_spread(times['sha256'])}, BLAKE2b-512 "
          f"{fmt_rate_spread(times['blake2b512'])}; the slower is {slower_name}. The ratio below is the median of "
          "each run's own ratio (ours against the limit of its turn), and the worst of them.", "")
    s.add(*table(["target", "figure", "met"], [
        ("≥ 2x faster than by hand (whole processes)",
         f"{fmt_x(speedup)} ({fmt_s(m['by_hand'])} / {fmt_s(m['ours'])})", yes_no(speedup >= 2)),
        (f"≥ 0.85x of the slower OpenSSL digest ({slower_name}, `openssl speed`)",
         f"{fmt_x(vs_limit)} (medians {ours_rate / 1e6:.0f} / {slower / 1e6:.0f} MB/s, ours inside the process); "
         f"worst run {fmt_x(worst_vs_limit)}", yes_no(vs_limit >= 0.85)),
        ("(for reference) against the slower `openssl dgst` on the same file",
         f"{fmt_x(dgst_slower / m['ours'])} (whole processes, {fmt_s(dgst_slower)} / {fmt_s(m['ours'])})", "—"),
    ]), "")
    s.add(f"Peak resident memory of our verifying process: {median(hwm) / 1024:.1f} MiB.", "")
    notes = [
        "- Reading once and hashing SHA-256 and BLAKE2b-512 on two threads is what beats the by-hand pair, which "
        "reads the file twice and runs the two digests one after the other; most of the by-hand time is "
        f"`sha256sum` itself ({size / m['sha256sum'] / 1e6:.0f} MB/s here, against OpenSSL's "
        f"{size / m['ossl_sha256'] / 1e6:.0f} MB/s for the same digest on the same CPU: this coreutils does not "
        "use the CPU's SHA extensions). With a faster `sha256sum` the by-hand baseline would shrink toward "
        f"`openssl dgst -sha256` + `minisign -V` ≈ {fmt_s(m['ossl_sha256'] + m['minisign'])}.",
        f"- Against the machine's limit we {'lose' if vs_limit < 0.85 else 'hold'}: "
        f"{ours_rate / 1e6:.0f} MB/s is {fmt_x(vs_limit)} of single-stream {slower_name}. The file is read once "
        "into eight reused 1 MiB buffers (`readinto`: one copy out of the page cache, no allocation per chunk), and "
        "SHA-256 and BLAKE2b-512 each take every buffer on a thread of their own, in order, never waiting for "
        "each other (hashlib releases the GIL), so the reading and SHA-256 share one core while BLAKE2b-512, the "
        "slower digest, has the other; the pass cannot be faster than that digest alone, and it is slower when "
        f"the machine's other load takes a share of either core. Both digests on one thread take "
        f"{fmt_x(m['ours_serial'] / m['ours_inproc'])} the time of the pipelined pass.",
        f"- Two digests at once on this VM: both `openssl dgst` processes together take {fmt_s(m['ossl_both'])}, "
        f"the slower alone {fmt_s(dgst_slower)}"
        + (": two busy vCPUs here are slower than one busy vCPU, so a pass as fast as the slower digest alone is "
           "out of reach even for OpenSSL." if m["ossl_both"] > 1.05 * dgst_slower else "."),
    ]
    s.add(*notes)
    s.summary = [
        SummaryRow("verification", f"{fmt_size(size)}: read, SHA-256, signature", fmt_s(m["ours"]),
                   f"by hand {fmt_s(m['by_hand'])}", f"{fmt_x(speedup)} faster", "≥ 2x", yes_no(speedup >= 2)),
        SummaryRow("verification", "throughput vs machine limit", f"{ours_rate / 1e6:.0f} MB/s",
                   f"OpenSSL {slower_name} {slower / 1e6:.0f} MB/s", fmt_x(vs_limit), "≥ 0.85x",
                   yes_no(vs_limit >= 0.85)),
    ]
    pkg.unlink(missing_ok=True)
    return s

