"""Our side of the verification and download benchmarks, run as its own process.

``bench_worker.py verify FILE SIG PUB --component C --version V --sha256 H --size N``
    reads FILE once (``baton.digest.digest_stream``: SHA-256 and BLAKE2b-512 on two threads) and
    checks it with ``helper.verify.verify_package``, as the helper does.
``bench_worker.py download URL DEST SIG PUB --component C --version V --sha256 H --size N [--helper-imports]``
    ``helper.download.download`` (streamed, hashed on the fly, fsynced) then ``verify_package`` on
    the digests of that one pass. ``--helper-imports`` first imports what a real ``helper apply``
    process holds (its state machine, gRPC control client, self-update), to show its footprint.

Prints one JSON object: the timings measured inside the process and its VmHWM before and after.
It imports nothing from the benchmark so that its memory is only ours.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def vm_hwm_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("verify", "download"))
    p.add_argument("source")
    p.add_argument("dest", nargs="?")
    p.add_argument("--signature", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--component", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--sha256", required=True)
    p.add_argument("--size", required=True, type=int)
    p.add_argument("--helper-imports", action="store_true")
    p.add_argument("--serial", action="store_true", help="verify: both digests on one thread")
    ns = p.parse_args()

    t_start = time.perf_counter()
    from baton.startup import loading

    with loading():  # as `helper apply` loads its modules
        if ns.helper_imports:
            import helper.cli
            import helper.control
            import helper.machine
            import helper.self_update  # noqa: F401
        from baton.config import UpdateConfig
        from baton.digest import digest_stream
        from baton.signing import load_trusted_keys
        from helper.verify import read_signature_text, verify_package

        if ns.mode == "download":
            from helper.download import DownloadLimits, download

    keys = load_trusted_keys([ns.key])
    signature = read_signature_text(ns.signature)
    out: dict[str, float | int | str] = {"import_s": time.perf_counter() - t_start,
                                         "hwm_after_imports_kib": vm_hwm_kib()}

    t0 = time.perf_counter()
    if ns.mode == "verify":
        with open(ns.source, "rb") as f:
            digests = digest_stream(f, parallel=not ns.serial)
    else:
        dest = Path(ns.dest)
        dest.unlink(missing_ok=True)
        limits = DownloadLimits.from_config(UpdateConfig(free_space_reserve_bytes=0))
        dl = download(ns.source, dest, expected_size=ns.size, limits=limits)
        dl.close()
        digests = dl.digests
        out["download_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    vp = verify_package(digests, expected_sha256=ns.sha256, expected_size=ns.size, signature_text=signature,
                        trusted_keys=keys, component=ns.component, version=ns.version, node_id=None, now=time.time())
    t2 = time.perf_counter()
    if ns.mode == "verify":
        out["read_and_hash_s"] = t1 - t0
    out.update({"check_s": t2 - t1, "total_s": t2 - t0, "hwm_kib": vm_hwm_kib(), "key": vp.key_id_hex})
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
