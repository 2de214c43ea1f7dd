"""``supervisor update|updates|cancel``: updates on one host, through the local Unix socket, without a Manager.

``update --package FILE`` must make the file reachable by the helper, which
downloads over http(s) (file:// is confined to ``update.file_url_root``). The
command serves that one file from a short-lived HTTP server inside this
process: bound to 127.0.0.1 on a random port, answering only one path with a
random 128-bit token in it (GET/HEAD, ``Range: bytes=N-`` for resumes), and
stopped when the update is final. The package is still verified by the helper
against the signature and the node's trusted keys, so the server adds no trust.

Component and version come from the signed manifest (the trusted comment of
the ``.minisig``) unless given; sha256 and size are computed from the file (or,
with ``--url`` and no ``--sha256``/``--size``, from one streamed read of it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from baton import layout
from baton.errors import BatonError
from baton.text import printable

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
DEFAULT_CONFIG = str(layout.DEFAULT_CONFIG)
CHUNK = 256 * 1024

UPDATE_EPILOG = """examples:
  supervisor update app --package app-1.2.0.tar.gz            # signature: app-1.2.0.tar.gz.minisig
  supervisor update app --url https://pkgs.example/app-1.2.0.tar.gz --signature app-1.2.0.tar.gz.minisig
  supervisor update app --package app-1.2.0.tar.gz --json     # one JSON object: the final status

Exit status: 0 when the update committed, 1 when it failed or rolled back (the error is printed), 2 on bad usage.
Ctrl-C stops following; the update itself carries on (see `supervisor updates`).
"""
UPDATES_EPILOG = """examples:
  supervisor updates                 # the 50 most recent updates, newest first
  supervisor updates --watch         # redraw every second until Ctrl-C
  supervisor updates --json --component app
"""
CANCEL_EPILOG = """example:
  supervisor cancel 3f2a9c41d0e5b7a8   # before SWITCHING it ends FAILED; from SWITCHING on it rolls back
"""


class CliError(BatonError):
    """A one-line error for the operator; the command exits 1 (or ``code``)."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class PackageInfo:
    """What a push needs to know about the package, from the file and its signature."""

    component: str
    version: str
    sha256: str
    size: int
    signature: str


# ---- the socket ---------------------------------------------------------------------------------------


def target(ns: argparse.Namespace) -> str:
    """``unix:PATH`` of ``--socket`` or ``grpc.unix_socket``, refused (as root) in a directory others may change."""
    from supervisor.cli.ctl import CtlError, checked_socket

    if ns.socket:
        path, key = Path(ns.socket), "--socket"
    else:
        from baton.config import ConfigError, load_config

        try:
            cfg = load_config(Path(ns.config))
        except ConfigError as e:
            raise CliError(f"config error: {e}", EXIT_USAGE) from None
        if cfg.grpc.unix_socket is None:
            raise CliError("the config has no grpc.unix_socket; pass --socket", EXIT_USAGE)
        path, key = cfg.grpc.unix_socket, "grpc.unix_socket"
    try:
        return f"unix:{checked_socket(path, key)}"
    except CtlError as e:
        raise CliError(str(e)) from None


def rpc_error(e: Any, where: str) -> CliError:
    """A gRPC failure as one line, without the library's debug text."""
    import grpc

    code = e.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return CliError(f"cannot reach the supervisor at {where} (is it running?)")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return CliError(f"the supervisor at {where} did not answer in time")
    return CliError(f"{code.name}: {e.details()}")


# ---- the package --------------------------------------------------------------------------------------


def read_package(ns: argparse.Namespace, max_bytes: int = 2 * 1024**3) -> PackageInfo:
    """Signature, manifest, digest: everything checked here that the helper would refuse later anyway."""
    from baton.digest import PackageDigest
    from baton.signing import parse_manifest, parse_signature
    from helper.verify import read_signature_text

    sig_path = ns.signature or (f"{ns.package}.minisig" if ns.package else None)
    if sig_path is None:
        raise CliError("--url needs --signature FILE (the package's .minisig)", EXIT_USAGE)
    try:
        sig_text = read_signature_text(sig_path)
        manifest = parse_manifest(parse_signature(sig_text).trusted_comment)
    except BatonError as e:
        raise CliError(f"signature {sig_path}: {e}") from None
    if manifest.component != ns.component:
        raise CliError(f"the package is signed for component {manifest.component!r}, not {ns.component!r}")
    version = ns.version or manifest.version
    if version != manifest.version:
        raise CliError(f"the package is signed for version {manifest.version!r}, not {version!r}")
    if ns.package:
        try:
            with open(ns.package, "rb") as f:
                d = PackageDigest()
                while chunk := f.read(CHUNK):
                    d.update(chunk)
                digests = d.finish()
        except OSError as e:
            raise CliError(f"cannot read {ns.package}: {e.strerror or e}") from None
        return PackageInfo(ns.component, version, digests.sha256_hex, digests.size, sig_text)
    if ns.sha256 and ns.size:
        return PackageInfo(ns.component, version, ns.sha256.lower(), ns.size, sig_text)
    return PackageInfo(ns.component, version, *_digest_url(ns.url, max_bytes), sig_text)


def _digest_url(url: str, max_bytes: int) -> tuple[str, int]:
    import urllib.request

    from baton.digest import PackageDigest

    d = PackageDigest()
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            while chunk := resp.read(CHUNK):
                d.update(chunk)
                if d.size > max_bytes:
                    raise CliError(f"{url}: larger than {max_bytes} bytes")
    except OSError as e:
        raise CliError(f"cannot read {url} to compute its sha256: {e}; or pass --sha256 and --size") from None
    digests = d.finish()
    return digests.sha256_hex, digests.size


# ---- following an update ------------------------------------------------------------------------------


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def state_name(status: Any) -> str:
    from baton.pb import common_pb2

    return str(common_pb2.UpdateState.Name(status.state)).removeprefix("UPDATE_STATE_").lower()


def progress_line(status: Any) -> str:
    """``app 1.0.0 -> 1.1.0  downloading  1.2 MiB/3.4 MiB  512.0 KiB/s  ETA 4s``, printable (the error may quote
    a failed version's output)."""
    parts = [f"{status.component} {status.from_version or '-'} -> {status.to_version}", state_name(status)]
    if status.bytes_total and status.bytes_done and state_name(status) == "downloading":
        parts.append(f"{_bytes(status.bytes_done)}/{_bytes(status.bytes_total)}")
        rate = status.rate_bytes_per_second
        if rate > 0:
            parts.append(f"{_bytes(rate)}/s")
            left = max(status.bytes_total - status.bytes_done, 0)
            parts.append(f"ETA {left / rate:.0f}s")
    if status.error:
        parts.append(status.error)
    return printable("  ".join(parts))


def follow(stub: Any, update_id: str, timeout: float, show: Any) -> Any:
    """Watch until final; a broken stream (a supervisor restarting itself) falls back to polling."""
    import grpc

    from baton.pb import daemon_pb2

    deadline = time.monotonic() + timeout
    ref = daemon_pb2.UpdateRef(update_id=update_id)
    last = None
    watch = True
    while time.monotonic() < deadline:
        try:
            if watch:
                for status in stub.WatchUpdate(ref, timeout=max(0.1, deadline - time.monotonic())):
                    last = status
                    show(status)
                    if status.finished:
                        return status
                watch = False
            status = stub.GetUpdate(ref, timeout=10)
            if last is None or (status.state, status.bytes_done) != (last.state, last.bytes_done):
                show(status)
            last = status
            if status.finished:
                return status
        except grpc.RpcError as e:
            watch = False
            if e.code() == grpc.StatusCode.NOT_FOUND:
                raise CliError(f"the supervisor has no update {update_id}") from None
        time.sleep(0.25)
    raise CliError(f"update {update_id} not final after {timeout:.0f}s; it carries on: `supervisor updates --watch`")


class _Printer:
    """One redrawn line on a terminal; one line per state change otherwise."""

    def __init__(self, tty: bool, quiet: bool) -> None:
        self.tty = tty
        self.quiet = quiet
        self.last_state = ""
        self.width = 0

    def __call__(self, status: Any) -> None:
        if self.quiet:
            return
        line = progress_line(status)
        if self.tty:
            sys.stdout.write("\r" + line.ljust(self.width))
            self.width = len(line)
            if status.finished:
                sys.stdout.write("\n")
            sys.stdout.flush()
        elif state_name(status) != self.last_state:  # a final state, then the same state settled: one line
            print(line, flush=True)
        self.last_state = state_name(status)


def cmd_update(ns: argparse.Namespace) -> int:
    import grpc

    from baton.pb import daemon_pb2, daemon_pb2_grpc
    from supervisor.file_server import serve_file

    where = target(ns)
    pkg = read_package(ns)
    with contextlib.ExitStack() as stack:
        url = ns.url or stack.enter_context(serve_file(Path(ns.package)))
        request = daemon_pb2.UpdateRequest(component=pkg.component, version=pkg.version, download_url=url,
                                           sha256=pkg.sha256, size=pkg.size, signature=pkg.signature,
                                           allow_downgrade=ns.allow_downgrade, force=ns.force)
        with grpc.insecure_channel(where) as ch:
            stub = daemon_pb2_grpc.DaemonServiceStub(ch)
            try:
                update_id = stub.PushUpdate(request, timeout=ns.timeout_rpc).update_id
            except grpc.RpcError as e:
                err = rpc_error(e, where)
                raise CliError(f"push refused: {err}") from None
            printer = _Printer(sys.stdout.isatty(), ns.json)
            if not ns.json:
                print(printable(f"update {update_id}: {pkg.component} {pkg.version} ({_bytes(pkg.size)}) accepted"),
                      flush=True)
            try:
                final = follow(stub, update_id, ns.timeout, printer)
            except KeyboardInterrupt:
                print(f"\nstopped following; update {update_id} carries on "
                      f"(`supervisor updates --watch`, `supervisor cancel {update_id}`)", file=sys.stderr)
                return EXIT_FAILED
    if ns.json:
        from google.protobuf.json_format import MessageToDict

        print(json.dumps(MessageToDict(final, always_print_fields_with_no_presence=True), indent=2))
    if final.success:
        if not ns.json:
            print(printable(f"update {update_id}: committed {pkg.component} {pkg.version}"))
        return EXIT_OK
    what = "rolled back" if final.rolled_back else state_name(final)
    print(printable(f"supervisor update: update {update_id} {what}: {final.error or 'no reason given'}"),
          file=sys.stderr)
    return EXIT_FAILED


# ---- listing and cancelling ---------------------------------------------------------------------------


def updates_table(updates: list[Any], now: float) -> str:
    rows: list[tuple[str, ...]] = [("ID", "COMPONENT", "FROM", "TO", "STATE", "PROGRESS", "AGE", "ERROR")]
    for u in updates:
        prog = (f"{100 * u.bytes_done // u.bytes_total}%" if u.bytes_total and not u.finished and u.bytes_done
                else "-")
        age = f"{max(now - u.updated_at, 0):.0f}s" if u.updated_at else "-"
        error = u.error.splitlines()[0] if u.error else ""
        rows.append(tuple(printable(c) for c in (u.update_id, u.component, u.from_version or "-", u.to_version,
                                                  state_name(u), prog, age, error)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def cmd_updates(ns: argparse.Namespace) -> int:
    import grpc

    from baton.pb import daemon_pb2, daemon_pb2_grpc

    where = target(ns)
    request = daemon_pb2.ListUpdatesRequest(limit=ns.limit, component=ns.component or "")
    with grpc.insecure_channel(where) as ch:
        stub = daemon_pb2_grpc.DaemonServiceStub(ch)
        last = ""
        while True:
            try:
                updates = list(stub.ListUpdates(request, timeout=ns.timeout_rpc).updates)
            except grpc.RpcError as e:
                raise rpc_error(e, where) from None
            if ns.json:
                from google.protobuf.json_format import MessageToDict

                out = json.dumps([MessageToDict(u, always_print_fields_with_no_presence=True) for u in updates])
            else:
                out = updates_table(updates, time.time()) if updates else "no update recorded"
            if not ns.watch:
                print(out)
                return EXIT_OK
            if sys.stdout.isatty():
                print("\x1b[H\x1b[2J" + out, flush=True)
            elif out != last:
                print(out, flush=True)
            last = out
            try:
                time.sleep(ns.interval)
            except KeyboardInterrupt:
                return EXIT_OK


def cmd_cancel(ns: argparse.Namespace) -> int:
    import grpc

    from baton.pb import daemon_pb2, daemon_pb2_grpc

    where = target(ns)
    with grpc.insecure_channel(where) as ch:
        stub = daemon_pb2_grpc.DaemonServiceStub(ch)
        try:
            status = stub.CancelUpdate(daemon_pb2.UpdateRef(update_id=ns.update_id), timeout=ns.timeout_rpc)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise CliError("this supervisor cannot cancel updates (its DaemonService has no CancelUpdate)") \
                    from None
            if e.code() == grpc.StatusCode.NOT_FOUND:
                raise CliError(f"no update {ns.update_id!r} on this node (see `supervisor updates`)") from None
            raise rpc_error(e, where) from None
    print(printable(f"update {status.update_id}: {state_name(status)}" + (f": {status.error}" if status.error else "")))
    return EXIT_OK


# ---- registration -------------------------------------------------------------------------------------


def _socket_args(p: argparse.ArgumentParser) -> None:
    from supervisor.cli.main import seconds_arg

    p.add_argument("--config", "-c", default=DEFAULT_CONFIG, help="the supervisor's config (for grpc.unix_socket)")
    p.add_argument("--socket", help="the supervisor's Unix socket (instead of reading the config)")
    p.add_argument("--timeout-rpc", type=seconds_arg, default=10.0, help=argparse.SUPPRESS)


def _guarded(fn: Any) -> Any:
    prog = {"cmd_update": "update", "cmd_updates": "updates", "cmd_cancel": "cancel"}[fn.__name__]

    def run(ns: argparse.Namespace) -> int:
        try:
            return int(fn(ns))
        except CliError as e:
            print(printable(f"supervisor {prog}: {e}"), file=sys.stderr)  # it may quote a server's words
            return e.code

    return run


def add_parsers(sub: argparse._SubParsersAction[Any]) -> None:
    from supervisor.cli.main import count_arg, seconds_arg  # where the parser is built: loaded already
    fmt = argparse.RawDescriptionHelpFormatter
    u = sub.add_parser("update", help="push an update to this host's supervisor and follow it",
                       description="Push a signed package to the local supervisor and follow it to its end.",
                       epilog=UPDATE_EPILOG, formatter_class=fmt)
    u.add_argument("component", help="an agent's name, or supervisor")
    src = u.add_mutually_exclusive_group(required=True)
    src.add_argument("--package", help="a local package file (served to the helper on 127.0.0.1 while it runs)")
    src.add_argument("--url", help="an http(s) URL the helper downloads from")
    u.add_argument("--signature", help="the .minisig file (default with --package: FILE.minisig)")
    u.add_argument("--version", help="the version (default: the one in the signed manifest)")
    u.add_argument("--sha256", help="with --url: the package's sha256 (default: computed by reading the URL)")
    u.add_argument("--size", type=int, help="with --url: the package's size in bytes")
    u.add_argument("--allow-downgrade", action="store_true", help="install a version not newer than the highest")
    u.add_argument("--force", action="store_true", help="retry a version that failed before")
    u.add_argument("--timeout", type=seconds_arg, default=900.0, help="seconds to follow the update (default 900)")
    u.add_argument("--json", action="store_true", help="print only the final status, as JSON")
    _socket_args(u)
    u.set_defaults(fn=_guarded(cmd_update))
    ls = sub.add_parser("updates", help="list this host's recent updates", epilog=UPDATES_EPILOG,
                        formatter_class=fmt)
    ls.add_argument("--watch", action="store_true", help="redraw until Ctrl-C")
    ls.add_argument("--interval", type=seconds_arg, default=1.0, help="seconds between redraws with --watch")
    ls.add_argument("--component", help="only this component's updates")
    ls.add_argument("--limit", type=count_arg, default=50, help="at most this many (0: the default, 50)")
    ls.add_argument("--json", action="store_true")
    _socket_args(ls)
    ls.set_defaults(fn=_guarded(cmd_updates))
    c = sub.add_parser("cancel", help="cancel a running update", epilog=CANCEL_EPILOG, formatter_class=fmt)
    c.add_argument("update_id", metavar="ID")
    _socket_args(c)
    c.set_defaults(fn=_guarded(cmd_cancel))


def holds_lines(holds: list[Any]) -> list[str]:
    """The holds part of ``supervisor status``."""
    if not holds:
        return []
    return ["", "held (pushes refused):",
            *(printable(f"  {h.component}" + (f": {h.reason}" if h.reason else "")) for h in holds)]

