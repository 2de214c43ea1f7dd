"""``baton-manager``: serve, push, rollout, and the history (nodes, updates, rollouts).

Every command opens the same SQLite database (``--db``, default
``$BATON_MANAGER_DB`` or ``./baton-manager.db``). ``serve`` records its package
directory, package URL and TLS files there, so ``push`` and ``rollout`` need
only the package, its component and version. Exit codes: 0 done, 1 an update
failed or a rollout did not complete, 2 bad input or an unusable database.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from loguru import logger

from baton.errors import BatonError
from manager.errors import ManagerError, PushRefused, UnknownNode
from manager.publish import PackageRef, publish
from manager.push import ClientTls, Pusher, PushOptions, Target, new_update_id, state_of
from manager.rollout import Rollout, RolloutEvent, RolloutReport, RolloutSpec, RolloutState
from manager.store import SqliteStore, Store

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DEFAULT_DB = "baton-manager.db"


class UsageError(ManagerError):
    pass


# ---- shared pieces ------------------------------------------------------------------------------------


def open_store(ns: argparse.Namespace) -> SqliteStore:
    return SqliteStore(Path(ns.db))


def client_tls(ns: argparse.Namespace, store: Store) -> ClientTls | None:
    """From the flags, else what ``serve`` recorded: the Manager's certificate is also its client certificate."""
    given = [ns.tls_cert, ns.tls_key, ns.tls_ca]
    if any(given) and not all(given):
        raise UsageError("--tls-cert, --tls-key and --tls-ca go together")
    if all(given):
        return ClientTls(ca=Path(ns.tls_ca), cert=Path(ns.tls_cert), key=Path(ns.tls_key))
    recorded = [store.setting(k) for k in ("tls_cert", "tls_key", "tls_ca")]
    if all(recorded) and not ns.no_tls:
        cert, key, ca = (Path(str(v)) for v in recorded)
        return ClientTls(ca=ca, cert=cert, key=key)
    return None


def addresses(store: Store, overrides: Sequence[str]) -> dict[str, str]:
    """Registered addresses, overridden by ``NODE=HOST:PORT``."""
    out = {n.id: n.address for n in store.nodes() if n.address}
    for item in overrides:
        node, sep, addr = item.partition("=")
        if not sep or not node or ":" not in addr:
            raise UsageError(f"--node-address {item!r}: expected NODE=HOST:PORT")
        out[node] = addr
    return out


def package_ref(ns: argparse.Namespace, store: Store) -> PackageRef:
    packages_dir = ns.packages or store.setting("packages_dir")
    base_url = ns.package_url or store.setting("packages_url") or ""
    return publish(Path(ns.package), ns.component, ns.version,
                   packages_dir=Path(packages_dir) if packages_dir else None, base_url=base_url, url=ns.url or "")


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def fmt_time(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def fmt_ago(t: float) -> str:
    s = max(0.0, time.time() - t)
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.0f}h ago"


def table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def short(text: str, n: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def say(out: TextIO, line: str) -> None:
    out.write(f"{time.strftime('%H:%M:%S')} {line}\n")
    out.flush()


# ---- serve --------------------------------------------------------------------------------------------


def cmd_serve(ns: argparse.Namespace) -> int:
    from manager.packages import PackageServer
    from manager.service import make_server, server_credentials

    tls = [ns.tls_cert, ns.tls_key, ns.tls_ca]
    if any(tls) and not all(tls):
        raise UsageError("--tls-cert, --tls-key and --tls-ca go together")
    if bool(ns.packages) != bool(ns.http):
        raise UsageError("--packages and --http go together")
    store = open_store(ns)
    creds = None
    if all(tls):
        try:
            creds = server_credentials(*(Path(p).read_bytes() for p in tls))
        except OSError as e:
            raise UsageError(f"cannot read a TLS file: {e}") from None
    try:
        server, port = make_server(store, ns.listen, creds, ns.heartbeat_interval)
    except RuntimeError as e:  # grpc raises it for an address it cannot bind
        raise UsageError(f"cannot listen on {ns.listen}: {e}") from None
    if port == 0:
        raise UsageError(f"cannot listen on {ns.listen}")
    packages: PackageServer | None = None
    if ns.packages:
        host, _, http_port = ns.http.rpartition(":")
        try:
            packages = PackageServer(Path(ns.packages), host.strip("[]"), int(http_port)).start()
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot serve packages on {ns.http}: {e}") from None
        store.set_setting("packages_dir", str(Path(ns.packages).resolve()))
        store.set_setting("packages_url", ns.http_url or packages.url)
    for key, value in zip(("tls_cert", "tls_key", "tls_ca"), tls, strict=True):
        store.set_setting(key, str(Path(value).resolve()) if value else "")
    store.set_setting("manager_address", ns.listen)
    metrics = None
    if ns.metrics:
        from baton.config import ConfigError, parse_metrics_listen

        try:
            host, metrics_port = parse_metrics_listen(ns.metrics, ns.metrics_allow_remote, "--metrics")
        except ConfigError as e:
            raise UsageError(str(e)) from None
        from manager.metrics import start_metrics  # prometheus_client: loaded only when asked for

        try:
            metrics = start_metrics(store, host, metrics_port, ns.heartbeat_interval)
        except OSError as e:
            raise UsageError(f"cannot serve metrics on {ns.metrics}: {e.strerror or e}") from None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    logger.info("baton-manager serving ManagerService on {} ({}), database {}{}", ns.listen,
                "mutual TLS" if creds else "insecure", ns.db,
                f", packages from {ns.packages} at {ns.http_url or packages.url}" if packages else "")
    stop.wait()
    logger.info("baton-manager stopping")
    server.stop(grace=2.0).wait()
    if metrics is not None:
        metrics.stop()
    if packages is not None:
        packages.stop()
    store.close()
    return EXIT_OK


# ---- push ---------------------------------------------------------------------------------------------


def cmd_push(ns: argparse.Namespace) -> int:
    store = open_store(ns)
    address = addresses(store, ns.node_address).get(ns.node)
    if not address:
        raise UnknownNode(f"no address for {ns.node}: it has not registered (use --node-address {ns.node}=HOST:PORT)")
    pkg = package_ref(ns, store)
    out = sys.stderr if ns.json else sys.stdout

    def progress(node: str, status: Any) -> None:
        state = state_of(status).value
        detail = f" {status.bytes_done}/{status.bytes_total} bytes" if state == "downloading" else ""
        say(out, f"{node}: {state}{detail}{': ' + status.error if status.error and status.finished else ''}")

    options = PushOptions(force=ns.force, allow_downgrade=ns.allow_downgrade, timeout_s=ns.timeout)
    with Pusher(store, Target(ns.node, address), client_tls(ns, store), options, on_progress=progress) as pusher:
        update_id = pusher.start(pkg, new_update_id())
        say(out, f"update {update_id} accepted by {ns.node}: {pkg.component} -> {pkg.version}")
        if ns.no_follow:
            if ns.json:
                print(json.dumps({"update_id": update_id, "node": ns.node}))
            return EXIT_OK
        outcome = pusher.follow(update_id)
    row = store.update(update_id)
    if ns.json:
        print(json.dumps(row.to_json() if row else {"update_id": update_id, "state": outcome.state.value}))
    else:
        print(updates_table([row] if row else []))
    return EXIT_OK if outcome.success else EXIT_FAILED


# ---- rollout ------------------------------------------------------------------------------------------


def cmd_rollout(ns: argparse.Namespace) -> int:
    store = open_store(ns)
    addr = addresses(store, ns.node_address)
    tls = client_tls(ns, store)

    def show(event: RolloutEvent) -> None:
        if event.kind == "batch":
            say(sys.stdout, event.message)
        elif event.kind == "end":
            say(sys.stdout, f"rollout {rollout.id} {event.message}")
        else:
            say(sys.stdout, f"  {event.node}: {event.message}")

    if ns.resume:
        rollout = Rollout.resume(store, ns.resume, addr, tls, show)
        say(sys.stdout, f"resuming rollout {rollout.id}: {rollout.spec.package.component} "
                        f"{rollout.spec.package.version} on {plural(len(rollout.spec.nodes), 'node')}")
    else:
        if not (ns.package and ns.component and ns.version):
            raise UsageError("rollout needs --package, --component and --version (or --resume ID)")
        nodes = [n for item in ns.nodes for n in item.split(",") if n] if ns.nodes else []
        if ns.all:
            nodes = [n.id for n in store.nodes()]
        if not nodes:
            raise UsageError("name the nodes with --nodes A,B,C or --all")
        spec = RolloutSpec(package_ref(ns, store), tuple(nodes), canary=ns.canary, batch_size=ns.batch_size,
                           max_failures=ns.max_failures, force=ns.force, allow_downgrade=ns.allow_downgrade,
                           timeout_s=ns.timeout)
        rollout = Rollout.create(store, spec, addr, tls, show)
        say(sys.stdout, f"rollout {rollout.id}: {spec.package.component} {spec.package.version} on "
                        f"{plural(len(nodes), 'node')} (canary {spec.canary}, batches of {spec.batch_size}, "
                        f"halt above {plural(spec.max_failures, 'failure')})")
    report = rollout.run()
    print(rollout_table(report, rollout.spec, store))
    ok = report.state == RolloutState.COMPLETED and report.failures == 0
    return EXIT_OK if ok else EXIT_FAILED


def rollout_table(report: RolloutReport, spec: RolloutSpec, store: Store) -> str:
    rows = [("NODE", "BATCH", "STEP", "UPDATE", "STATE", "ERROR")]
    for node, p in report.nodes.items():
        row = store.update(p.update_id) if p.update_id else None
        rows.append((node, "canary" if p.batch == 0 and spec.canary else str(p.batch), p.step.value,
                     p.update_id or "-", row.state.value if row else "-",
                     short(p.error or (row.error if row else ""))))
    return table(rows)


def cmd_rollouts(ns: argparse.Namespace) -> int:
    store = open_store(ns)
    items = store.rollouts()
    if ns.json:
        print(json.dumps([{"id": r.id, "state": r.state, "spec": r.spec, "progress": r.progress,
                           "created_at": r.created_at, "updated_at": r.updated_at} for r in items], indent=2))
        return EXIT_OK
    rows = [("ROLLOUT", "STATE", "COMPONENT", "VERSION", "NODES", "DONE", "CREATED", "REASON")]
    for r in items:
        nodes = r.progress.get("nodes", {})
        done = sum(1 for p in nodes.values() if p["step"] in ("succeeded", "failed"))
        rows.append((r.id, r.state, r.spec["package"]["component"], r.spec["package"]["version"], str(len(nodes)),
                     str(done), fmt_time(r.created_at), short(r.progress.get("reason", ""))))
    print(table(rows))
    return EXIT_OK


# ---- history ------------------------------------------------------------------------------------------


def cmd_nodes(ns: argparse.Namespace) -> int:
    store = open_store(ns)
    nodes = store.nodes()
    if ns.json:
        print(json.dumps([{"id": n.id, "version": n.version, "hostname": n.hostname, "address": n.address,
                           "identity": n.identity, "registered_at": n.registered_at, "last_seen": n.last_seen,
                           "agents": list(n.agents)} for n in nodes], indent=2))
        return EXIT_OK
    rows = [("NODE", "ADDRESS", "SUPERVISOR", "HOSTNAME", "LAST SEEN", "AGENTS", "IDENTITY")]
    for n in nodes:
        agents = ", ".join(f"{a['name']}={a['state']}" + (f"@{a['version']}" if a.get("version") else "")
                           for a in n.agents)
        rows.append((n.id, n.address or "-", n.version, n.hostname, fmt_ago(n.last_seen), agents or "-",
                     n.identity or "-"))
    print(table(rows))
    return EXIT_OK


def updates_table(items: Sequence[Any]) -> str:
    rows = [("UPDATE", "NODE", "COMPONENT", "FROM", "TO", "STATE", "RESULT", "CREATED", "TOOK", "ERROR")]
    for u in items:
        result = "ok" if u.success else "rolled back" if u.rolled_back else "failed" if u.state.final else "-"
        took = f"{u.finished_at - u.created_at:.1f}s" if u.finished_at else "-"
        rows.append((u.update_id, u.node, u.component, u.from_version or "-", u.to_version, u.state.value, result,
                     fmt_time(u.created_at), took, short(u.error)))
    return table(rows)


def cmd_updates(ns: argparse.Namespace) -> int:
    store = open_store(ns)
    items = store.updates(node=ns.node or "", component=ns.component or "", state=ns.state or "",
                          rollout_id=ns.rollout or "")
    if ns.json:
        print(json.dumps([u.to_json() for u in items], indent=2))
    else:
        print(updates_table(items))
    return EXIT_OK


# ---- argument parsing ---------------------------------------------------------------------------------


def _db(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default=os.environ.get("BATON_MANAGER_DB", DEFAULT_DB),
                   help="the SQLite database (default: $BATON_MANAGER_DB or ./baton-manager.db)")


def _tls(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--tls-cert", help=f"{what} certificate (PEM)")
    p.add_argument("--tls-key", help=f"{what} private key (PEM)")
    p.add_argument("--tls-ca", help="the CA that signed the other side's certificates (PEM)")


def _package(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--package", required=required, help="the package file (FILE.minisig beside it)")
    p.add_argument("--component", required=required)
    p.add_argument("--version", required=required)
    p.add_argument("--url", help="where nodes download it (default: the Manager's package server)")
    p.add_argument("--packages", help="package directory to copy it into (default: what serve recorded)")
    p.add_argument("--package-url", help="base URL of that directory (default: what serve recorded)")
    p.add_argument("--node-address", action="append", default=[], metavar="NODE=HOST:PORT",
                   help="reach NODE there instead of at its registered address (repeatable)")
    p.add_argument("--force", action="store_true", help="retry a version that failed on the node before")
    p.add_argument("--allow-downgrade", action="store_true")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to follow one update (default 600)")
    _tls(p, "the Manager's client")
    p.add_argument("--no-tls", action="store_true", help="do not use the TLS files serve recorded")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="baton-manager", description="The reference Baton Manager.")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="serve ManagerService (and the package directory over HTTP)")
    _db(s)
    s.add_argument("--listen", required=True, metavar="HOST:PORT", help="ManagerService address")
    s.add_argument("--packages", metavar="DIR", help="serve this directory over HTTP")
    s.add_argument("--http", metavar="HOST:PORT", help="the package server's address")
    s.add_argument("--http-url", help="the package server's URL as nodes reach it (default http://HOST:PORT)")
    s.add_argument("--heartbeat-interval", type=float, default=0.0,
                   help="seconds between supervisor heartbeats (0: the supervisors' own setting)")
    s.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus metrics here (loopback only unless --metrics-allow-remote)")
    s.add_argument("--metrics-allow-remote", action="store_true", help="allow a non-loopback --metrics address")
    _tls(s, "the Manager's server")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("push", help="push one update to one node and follow it")
    _db(s)
    s.add_argument("node")
    _package(s, required=True)
    s.add_argument("--no-follow", action="store_true", help="return once the node accepted it")
    s.add_argument("--json", action="store_true", help="the final record as JSON (progress goes to stderr)")
    s.set_defaults(func=cmd_push)

    s = sub.add_parser("rollout", help="a staged rollout: canary, then batches, halting on failures")
    _db(s)
    s.add_argument("--nodes", action="append", metavar="A,B,C", help="the nodes, in order (repeatable)")
    s.add_argument("--all", action="store_true", help="every registered node, by id")
    s.add_argument("--canary", type=int, default=1, help="nodes updated first, alone (default 1)")
    s.add_argument("--batch-size", type=int, default=1, help="nodes per batch after the canary (default 1)")
    s.add_argument("--max-failures", type=int, default=0, help="halt once more nodes than this failed (default 0)")
    s.add_argument("--resume", metavar="ID", help="continue an interrupted rollout")
    _package(s, required=False)
    s.set_defaults(func=cmd_rollout)

    s = sub.add_parser("rollouts", help="list rollouts")
    _db(s)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_rollouts)

    s = sub.add_parser("nodes", help="registered nodes and their agents")
    _db(s)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_nodes)

    s = sub.add_parser("updates", help="the update history")
    _db(s)
    s.add_argument("--node")
    s.add_argument("--component")
    s.add_argument("--state", help="a state name: committed, rolled_back, failed, downloading, ...")
    s.add_argument("--rollout", metavar="ID")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_updates)
    return p


def main(argv: list[str] | None = None) -> int:
    ns = parser().parse_args(argv)
    logger.remove()
    logger.add(sys.stderr, level=os.environ.get("BATON_MANAGER_LOG_LEVEL", "INFO"),
               format="{time:HH:mm:ss} {level: <7} {message}")
    try:
        return int(ns.func(ns))
    except PushRefused as e:
        print(f"baton-manager: {e}", file=sys.stderr)
        return EXIT_FAILED
    except BatonError as e:
        print(f"baton-manager: {e}", file=sys.stderr)
        return EXIT_USAGE
