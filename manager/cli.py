"""``baton-manager``: serve, push, rollout, and the history (nodes, updates, rollouts).

Every command opens the same database (``--db``, default ``$BATON_MANAGER_DB``
or ``./baton-manager.db``): a SQLite file (a path or ``sqlite:///PATH``) or a
PostgreSQL database (``postgresql://...``) shared by several ``serve`` replicas.
``serve`` records its package directory, package URL and TLS files there, so
``push`` and ``rollout`` need only the package, its component and version.
``rollout`` records the rollout and follows it; the ``serve`` replicas carry it
out. Exit codes: 0 done, 1 an update failed or a rollout did not complete, 2
bad input or an unusable database.
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

from baton.bounded_http import HttpLimits
from baton.config import is_loopback
from baton.errors import BatonError
from baton.log import configure as configure_log
from baton.log import logger
from baton.reasons import reason_name
from baton.text import printable
from manager.errors import ManagerError, PushRefused, UnknownNode
from manager.packages import DEFAULT_MAX_DOWNLOADS
from manager.publish import PackageRef, publish
from manager.push import ClientTls, Operator, Pusher, PushOptions, Target, new_update_id, state_of
from manager.rollout import (
    DEFAULT_LEASE_S,
    MAX_PARALLEL,
    OFFLINE_WAIT_S,
    NodeProgress,
    RolloutRunner,
    RolloutSpec,
    RolloutState,
    download_bytes,
    follow,
    new_rollout,
)
from manager.store import ACTIVE_ROLLOUT_STATES, RolloutRow, Store, failures_by_reason, password_from_file
from manager.store import open_store as store_at

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DEFAULT_DB = "baton-manager.db"


class UsageError(ManagerError):
    pass


# ---- shared pieces ------------------------------------------------------------------------------------


def open_store(ns: argparse.Namespace) -> Store:
    password = password_from_file(Path(ns.db_password_file)) if ns.db_password_file else ""
    return store_at(ns.db, password)


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


def node_overrides(items: Sequence[str]) -> dict[str, str]:
    """``--node-address NODE=HOST:PORT`` flags."""
    out: dict[str, str] = {}
    for item in items:
        node, sep, addr = item.partition("=")
        if not sep or not node or ":" not in addr:
            raise UsageError(f"--node-address {item!r}: expected NODE=HOST:PORT")
        out[node] = addr
    return out


def addresses(store: Store, overrides: Sequence[str]) -> dict[str, str]:
    """Registered addresses, overridden by ``NODE=HOST:PORT``."""
    return {**{n.id: n.address for n in store.nodes() if n.address}, **node_overrides(overrides)}


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
    """Columns, every cell printable (baton/text.py): nodes report their hostnames, agents and errors."""
    rows = [[printable(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def short(text: str, n: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def say(out: TextIO, line: str) -> None:
    """A progress line of a push or rollout, printable: it may quote a node's status."""
    out.write(f"{time.strftime('%H:%M:%S')} {printable(line)}\n")
    out.flush()


# ---- serve --------------------------------------------------------------------------------------------


def check_listen(listen: str, tls: bool, insecure_loopback: bool) -> None:
    """The supervisor's rule for ManagerService: TCP needs mutual TLS, except on loopback with the opt-in.

    Without TLS the Manager cannot tell one caller from another, so whoever reaches the port may register
    any node id at an address of their choosing and report any node's results.
    """
    if listen.startswith("unix:"):
        return  # a Unix socket: its file's owner and mode decide who connects
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise UsageError(f"--listen {listen!r}: expected HOST:PORT")
    if tls:
        if insecure_loopback:
            raise UsageError("--insecure-loopback is for a listener without TLS; it must not be given with --tls-*")
        return
    if not is_loopback(host.strip("[]")):
        raise UsageError(f"--listen {listen}: without --tls-cert/--tls-key/--tls-ca ManagerService listens on "
                         "loopback only (127.0.0.0/8, ::1, localhost), and only with --insecure-loopback")
    if not insecure_loopback:
        raise UsageError(f"--listen {listen} would serve ManagerService without TLS: give --tls-cert, --tls-key "
                         "and --tls-ca, or --insecure-loopback to trust every caller on this host")


# serve's flags for its HTTP endpoints' bounds (baton.bounded_http.HttpLimits), each defaulting to the field's own
HTTP_LIMIT_FLAGS = {"--http-head-timeout": "head_timeout_s", "--http-idle-timeout": "idle_timeout_s",
                    "--http-min-rate": "min_rate_bytes_per_s", "--http-rate-window": "rate_window_s"}


def http_limits(ns: argparse.Namespace) -> HttpLimits:
    """The bounds serve's package server, fleet page and /metrics apply; a bad value is a one-line error naming
    its flag."""
    given = {field: getattr(ns, field) for field in HTTP_LIMIT_FLAGS.values() if getattr(ns, field) is not None}
    for flag, field in HTTP_LIMIT_FLAGS.items():
        if field in given:
            try:
                HttpLimits(**{field: given[field]})
            except ValueError as e:
                raise UsageError(f"{flag}: {e}") from None
    return HttpLimits(**given)


def cmd_serve(ns: argparse.Namespace) -> int:
    from baton.identity import parse_allow_list
    from manager.packages import PackageServer
    from manager.service import make_server, server_credentials
    from manager.web import WebServer

    tls = [ns.tls_cert, ns.tls_key, ns.tls_ca]
    if any(tls) and not all(tls):
        raise UsageError("--tls-cert, --tls-key and --tls-ca go together")
    check_listen(ns.listen, all(tls), ns.insecure_loopback)
    if bool(ns.packages) != bool(ns.http):
        raise UsageError("--packages and --http go together")
    if ns.max_downloads < 1:
        raise UsageError("--max-downloads must be at least 1")
    limits = http_limits(ns)
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
            packages = PackageServer(Path(ns.packages), host.strip("[]"), int(http_port),
                                     max_downloads=ns.max_downloads, on_served=store.add_served_bytes,
                                     limits=limits).start()
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot serve packages on {ns.http}: {e}") from None
        store.set_setting("packages_dir", str(Path(ns.packages).resolve()))
        store.set_setting("packages_url", ns.http_url or packages.url)
    for key, value in zip(("tls_cert", "tls_key", "tls_ca"), tls, strict=True):
        store.set_setting(key, str(Path(value).resolve()) if value else "")
    store.set_setting("manager_address", ns.listen)
    if not ns.rollout_lease > 0:
        raise UsageError("--rollout-lease must be greater than 0")
    push_tls = ClientTls(ca=Path(ns.tls_ca), cert=Path(ns.tls_cert), key=Path(ns.tls_key)) if all(tls) else None
    runner = RolloutRunner(store, push_tls, lease_s=ns.rollout_lease)
    metrics = None
    if ns.metrics:
        from baton.config import ConfigError, parse_metrics_listen

        try:
            host, metrics_port = parse_metrics_listen(ns.metrics, ns.metrics_allow_remote, "--metrics")
        except ConfigError as e:
            raise UsageError(str(e)) from None
        from manager.metrics import start_metrics  # prometheus_client: loaded only when asked for

        try:
            metrics = start_metrics(store, host, metrics_port, ns.heartbeat_interval, limits)
        except OSError as e:
            raise UsageError(f"cannot serve metrics on {ns.metrics}: {e.strerror or e}") from None
    web: WebServer | None = None
    if ns.web:
        web = WebServer(store, ns.web, tls=(Path(ns.tls_cert), Path(ns.tls_key), Path(ns.tls_ca)) if all(tls)
                        else None, heartbeat_interval_s=ns.heartbeat_interval,
                        allow=parse_allow_list(ns.web_allow, "--web-allow"), hosts=tuple(ns.web_host),
                        limits=limits)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    runner.start()
    if web is not None:
        web.start()
        logger.info("baton-manager web page at {}", web.url)
    logger.info("baton-manager serving ManagerService on {} ({}), database {}{}", ns.listen,
                "mutual TLS" if creds else "insecure", getattr(store, "url", ns.db),
                f", packages from {ns.packages} at {ns.http_url or packages.url}" if packages else "")
    if creds is None:
        logger.warning("ManagerService on {} has no TLS (--insecure-loopback): any process on this host may "
                       "register as any node and report its results", ns.listen)
    stop.wait()
    logger.info("baton-manager stopping")
    runner.stop()
    if web is not None:
        web.stop()
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
        why = reason_name(status.reason) if status.finished else ""
        say(out, f"{node}: {state}{detail}{f' [{why}]' if why else ''}"
                 f"{': ' + status.error if status.error and status.finished else ''}")

    options = PushOptions(force=ns.force, allow_downgrade=ns.allow_downgrade, timeout_s=ns.timeout,
                          operator=Operator.current(ns.as_operator))
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


def parse_selector(text: str) -> dict[str, str]:
    """``role=web,zone=a`` -> {"role": "web", "zone": "a"}."""
    out: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep or not key:
            raise UsageError(f"--selector {text!r}: expected KEY=VALUE[,KEY=VALUE...]")
        out[key] = value
    return out


def cmd_rollout(ns: argparse.Namespace) -> int:
    store = open_store(ns)
    if ns.action in ("pause", "resume", "cancel"):
        return control_rollout(store, ns)
    if ns.action == "follow" or ns.resume:
        rollout_id = ns.id or ns.resume
        if not rollout_id:
            raise UsageError("rollout follow needs the rollout ID")
        if ns.resume:
            say(sys.stdout, "rollouts continue by themselves in `baton-manager serve`; --resume only follows one")
        return follow_rollout(store, rollout_id, ns)
    if ns.id:
        raise UsageError(f"unexpected {ns.id!r}: a new rollout takes options only")
    if not (ns.package and ns.component and ns.version):
        raise UsageError("rollout needs --package, --component and --version")
    if any([ns.tls_cert, ns.tls_key, ns.tls_ca, ns.no_tls]):
        raise UsageError("--tls-* are for push: the serve replicas carry out a rollout with their own certificate")
    chosen = [bool(ns.nodes), ns.all, bool(ns.selector)]
    if sum(chosen) != 1:
        raise UsageError("name the nodes with one of --nodes A,B,C, --all or --selector KEY=VALUE,...")
    selector = parse_selector(ns.selector) if ns.selector else {}
    if ns.nodes:
        nodes = [n for item in ns.nodes for n in item.split(",") if n]
    else:
        nodes = [n.id for n in store.nodes() if n.matches(selector)]
    if not nodes:
        raise UsageError(f"no registered node has the labels {ns.selector}" if selector else "no nodes to update")
    overrides = node_overrides(ns.node_address)
    spec = RolloutSpec(package_ref(ns, store), tuple(nodes), canary=ns.canary, batch_size=ns.batch_size,
                       max_failures=ns.max_failures, force=ns.force, allow_downgrade=ns.allow_downgrade,
                       timeout_s=ns.timeout, max_parallel=ns.max_parallel, offline_wait_s=ns.offline_wait,
                       addresses={n: a for n, a in overrides.items() if n in nodes}, selector=selector)
    rollout_id = new_rollout(store, spec, Operator.current(ns.as_operator))
    say(sys.stdout, f"rollout {rollout_id}: {spec.package.component} {spec.package.version} on "
                    f"{plural(len(nodes), 'node')} (canary {spec.canary}, batches of {spec.batch_size}, "
                    f"at most {spec.max_parallel} at once, halt above {plural(spec.max_failures, 'failure')})")
    if ns.no_follow:
        if ns.json:
            print(json.dumps({"rollout_id": rollout_id}))
        return EXIT_OK
    return follow_rollout(store, rollout_id, ns)


def follow_rollout(store: Store, rollout_id: str, ns: argparse.Namespace) -> int:
    """Follow until it ends; Ctrl-C stops following only: the serve replicas carry the rollout on."""
    row = store.rollout(rollout_id)
    if row is None:
        raise UsageError(f"no rollout {rollout_id!r}")
    if row.state in ACTIVE_ROLLOUT_STATES and not row.owner:
        say(sys.stdout, f"rollout {rollout_id} waits for a `baton-manager serve` on this database to carry it out")
    try:
        row = follow(store, rollout_id, lambda line: say(sys.stdout, line))
    except KeyboardInterrupt:
        say(sys.stdout, f"stopped following; rollout {rollout_id} goes on (baton-manager rollout follow {rollout_id})")
        return EXIT_OK
    print(rollout_table(row, store))
    return EXIT_OK if row.state == RolloutState.COMPLETED.value and not any(
        p["step"] in ("failed", "skipped") for p in row.progress["nodes"].values()) else EXIT_FAILED


def control_rollout(store: Store, ns: argparse.Namespace) -> int:
    if not ns.id:
        raise UsageError(f"rollout {ns.action} needs the rollout ID")
    row = store.rollout(ns.id)
    if row is None:
        raise UsageError(f"no rollout {ns.id!r}")
    control = {"pause": "pause", "resume": "", "cancel": "cancel"}[ns.action]
    if not store.control_rollout(ns.id, control):
        row = store.rollout(ns.id)
        state = row.state if row else "gone"
        why = "it is being cancelled" if row and row.control == "cancel" else f"it is {state}"
        raise UsageError(f"cannot {ns.action} rollout {ns.id}: {why}")
    say(sys.stdout, {"pause": f"rollout {ns.id}: pausing (running updates finish, no new pushes)",
                     "resume": f"rollout {ns.id}: resuming",
                     "cancel": f"rollout {ns.id}: cancelling (no new pushes; running updates are asked to cancel)",
                     }[ns.action])
    return EXIT_OK


def rollout_table(row: RolloutRow, store: Store) -> str:
    spec = RolloutSpec.from_json(row.spec)
    rows = [("NODE", "BATCH", "STEP", "UPDATE", "STATE", "ERROR")]
    for node, raw in row.progress["nodes"].items():
        p = NodeProgress.from_json(raw)
        u = store.update(p.update_id) if p.update_id else None
        rows.append((node, spec.batch_label(p.batch), p.step.value, p.update_id or "-", u.state.value if u else "-",
                     short(p.error or (u.error if u else "") or p.cancel)))
    return table(rows)


def cmd_rollouts(ns: argparse.Namespace) -> int:
    store = open_store(ns)
    items = store.rollouts()
    if ns.json:
        print(json.dumps([{"id": r.id, "state": r.state, "spec": r.spec, "progress": r.progress,
                           "created_at": r.created_at, "updated_at": r.updated_at, "owner": r.owner,
                           "control": r.control, "started_by": r.started_by, "started_on": r.started_on,
                           "download_bytes": download_bytes(store, r)}
                          for r in items], indent=2))
        return EXIT_OK
    rows = [("ROLLOUT", "STATE", "COMPONENT", "VERSION", "NODES", "DONE", "CREATED", "BY", "REASON")]
    for r in items:
        nodes = r.progress.get("nodes", {})
        done = sum(1 for p in nodes.values() if p["step"] in ("succeeded", "failed", "skipped", "cancelled"))
        rows.append((r.id, r.state, r.spec["package"]["component"], r.spec["package"]["version"], str(len(nodes)),
                     str(done), fmt_time(r.created_at), Operator(r.started_by, r.started_on).describe(),
                     short(r.progress.get("reason", ""))))
    print(table(rows))
    return EXIT_OK


# ---- history ------------------------------------------------------------------------------------------


def cmd_nodes(ns: argparse.Namespace) -> int:
    store = open_store(ns)
    nodes = store.nodes()
    if ns.json:
        print(json.dumps([{"id": n.id, "version": n.version, "hostname": n.hostname, "address": n.address,
                           "identity": n.identity, "registered_at": n.registered_at, "last_seen": n.last_seen,
                           "agents": list(n.agents), "labels": dict(n.labels), "updates_refused": n.updates_refused}
                          for n in nodes], indent=2))
        return EXIT_OK
    rows = [("NODE", "ADDRESS", "SUPERVISOR", "HOSTNAME", "LAST SEEN", "AGENTS", "IDENTITY")]
    for n in nodes:
        agents = ", ".join(f"{a['name']}={a['state']}" + (f"@{a['version']}" if a.get("version") else "")
                           for a in n.agents)
        rows.append((n.id, n.address or "-", n.version, n.hostname, fmt_ago(n.last_seen), agents or "-",
                     n.identity or "-"))
    print(table(rows))
    for n in nodes:  # loud: such a node takes no update until someone fixes it
        if n.updates_refused:
            print(printable(f"{n.id} refuses every update: {n.updates_refused}"))
    return EXIT_OK


def updates_table(items: Sequence[Any]) -> str:
    rows = [("UPDATE", "NODE", "COMPONENT", "FROM", "TO", "STATE", "RESULT", "REASON", "CREATED", "TOOK", "BY",
             "ERROR")]
    for u in items:
        result = "ok" if u.success else "rolled back" if u.rolled_back else "failed" if u.state.final else "-"
        took = f"{u.finished_at - u.created_at:.1f}s" if u.finished_at else "-"
        rows.append((u.update_id, u.node, u.component, u.from_version or "-", u.to_version, u.state.value, result,
                     u.reason or "-", fmt_time(u.created_at), took, Operator(u.started_by, u.started_on).describe(),
                     short(u.error)))
    return table(rows)


def by_reason_table(items: Sequence[Any]) -> str:
    rows = [("REASON", "COUNT", "NODES", "LAST ERROR")]
    for reason, group in failures_by_reason(items).items():
        nodes = sorted({u.node for u in group})
        rows.append((reason, str(len(group)), ", ".join(nodes[:5]) + (" ..." if len(nodes) > 5 else ""),
                     short(group[-1].error)))
    return table(rows)


def cmd_updates(ns: argparse.Namespace) -> int:
    store = open_store(ns)
    items = store.updates(node=ns.node or "", component=ns.component or "", state=ns.state or "",
                          rollout_id=ns.rollout or "")
    if ns.by_reason and ns.json:
        print(json.dumps({r: [u.update_id for u in g] for r, g in failures_by_reason(items).items()}, indent=2))
    elif ns.by_reason:
        print(by_reason_table(items))
    elif ns.json:
        print(json.dumps([u.to_json() for u in items], indent=2))
    else:
        print(updates_table(items))
    return EXIT_OK


# ---- argument parsing ---------------------------------------------------------------------------------


def _db(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default=os.environ.get("BATON_MANAGER_DB", DEFAULT_DB),
                   help="the database: a SQLite file (PATH or sqlite:///PATH) or postgresql://... "
                        "(default: $BATON_MANAGER_DB or ./baton-manager.db); its password is best not in it: "
                        "PGPASSWORD, ~/.pgpass (PGPASSFILE) or --db-password-file keep it off the command line")
    p.add_argument("--db-password-file", metavar="FILE", default=os.environ.get("BATON_MANAGER_DB_PASSWORD_FILE"),
                   help="PostgreSQL: the password is this file's first line; mode 0600 or stricter "
                        "(default: $BATON_MANAGER_DB_PASSWORD_FILE)")


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
    p.add_argument("--as", dest="as_operator", default="", metavar="NAME",
                   help="who starts this, for the record (default: $SUDO_USER, else $USER)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="baton-manager", description="The reference Baton Manager.")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="serve ManagerService (and the package directory over HTTP)")
    _db(s)
    s.add_argument("--listen", required=True, metavar="HOST:PORT",
                   help="ManagerService address (needs --tls-*, or loopback with --insecure-loopback)")
    s.add_argument("--insecure-loopback", action="store_true",
                   help="serve ManagerService without TLS on a loopback --listen: every caller on this host is "
                        "trusted to speak for any node (development, tests, a Manager beside its nodes)")
    s.add_argument("--packages", metavar="DIR", help="serve this directory over HTTP")
    s.add_argument("--http", metavar="HOST:PORT", help="the package server's address")
    s.add_argument("--http-url", help="the package server's URL as nodes reach it (default http://HOST:PORT)")
    s.add_argument("--max-downloads", type=int, default=DEFAULT_MAX_DOWNLOADS, metavar="N",
                   help="package bodies sent at once; beyond that 503 with Retry-After "
                        f"(default {DEFAULT_MAX_DOWNLOADS})")
    s.add_argument("--http-head-timeout", dest="head_timeout_s", type=float, metavar="S",
                   help=f"seconds an HTTP client has to send a request head (default {HttpLimits.head_timeout_s:g})")
    s.add_argument("--http-idle-timeout", dest="idle_timeout_s", type=float, metavar="S",
                   help="seconds a response write may make no progress before its connection ends "
                        f"(default {HttpLimits.idle_timeout_s:g})")
    s.add_argument("--http-min-rate", dest="min_rate_bytes_per_s", type=int, metavar="BYTES",
                   help="bytes per second a package download must average over each --http-rate-window "
                        f"(default {HttpLimits.min_rate_bytes_per_s})")
    s.add_argument("--http-rate-window", dest="rate_window_s", type=float, metavar="S",
                   help=f"seconds over which --http-min-rate is judged (default {HttpLimits.rate_window_s:g})")
    s.add_argument("--heartbeat-interval", type=float, default=0.0,
                   help="seconds between supervisor heartbeats (0: the supervisors' own setting)")
    s.add_argument("--rollout-lease", type=float, default=DEFAULT_LEASE_S,
                   help="seconds a replica holds a rollout without renewing before another takes it over "
                        f"(default {DEFAULT_LEASE_S:.0f})")
    s.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus metrics here (loopback only unless --metrics-allow-remote)")
    s.add_argument("--metrics-allow-remote", action="store_true", help="allow a non-loopback --metrics address")
    s.add_argument("--web", metavar="HOST:PORT",
                   help="serve the read-only fleet page there (loopback only unless --tls-* is given, which "
                        "then requires a client certificate from the same CA)")
    s.add_argument("--web-allow", action="append", default=[], metavar="IDENTITY",
                   help="a client certificate that may read the page: CN=name, DNS:name, URI:uri or a bare name "
                        "(repeatable; default: operator certificates, URI:spiffe://baton/operator/NAME, and the "
                        "Manager's own; a node's certificate never)")
    s.add_argument("--web-host", action="append", default=[], metavar="NAME",
                   help="a name the page answers to in the Host header besides its listen address (repeatable)")
    _tls(s, "the Manager's server")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("push", help="push one update to one node and follow it")
    _db(s)
    s.add_argument("node")
    _package(s, required=True)
    s.add_argument("--no-follow", action="store_true", help="return once the node accepted it")
    s.add_argument("--json", action="store_true", help="the final record as JSON (progress goes to stderr)")
    s.set_defaults(func=cmd_push)

    s = sub.add_parser("rollout", help="a staged rollout (canary, batches, halting on failures), carried out by "
                                       "serve; or pause|resume|cancel|follow ID")
    _db(s)
    s.add_argument("action", nargs="?", choices=("pause", "resume", "cancel", "follow"),
                   help="control a rollout (pause: no new pushes; cancel: also cancel running updates)")
    s.add_argument("id", nargs="?", help="the rollout ID for pause|resume|cancel|follow")
    s.add_argument("--nodes", action="append", metavar="A,B,C", help="the nodes, in order (repeatable)")
    s.add_argument("--all", action="store_true", help="every registered node, by id")
    s.add_argument("--selector", metavar="KEY=VALUE,...", help="every registered node with these labels, by id")
    s.add_argument("--max-parallel", type=int, default=MAX_PARALLEL,
                   help=f"nodes updating at once (default {MAX_PARALLEL})")
    s.add_argument("--offline-wait", type=float, default=OFFLINE_WAIT_S,
                   help="seconds after the last batch to wait for offline nodes before skipping them "
                        f"(default {OFFLINE_WAIT_S:.0f})")
    s.add_argument("--no-follow", action="store_true", help="submit it and return")
    s.add_argument("--json", action="store_true", help="with --no-follow: the rollout id as JSON")
    s.add_argument("--canary", type=int, default=1, help="nodes updated first, alone (default 1)")
    s.add_argument("--batch-size", type=int, default=1, help="nodes per batch after the canary (default 1)")
    s.add_argument("--max-failures", type=int, default=0, help="halt once more nodes than this failed (default 0)")
    s.add_argument("--resume", metavar="ID", help="(no longer needed: serve continues rollouts) follow ID")
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
    s.add_argument("--by-reason", action="store_true",
                   help="count the updates that did not commit by failure reason (docs/troubleshooting.md)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_updates)
    return p


def main(argv: list[str] | None = None) -> int:
    ns = parser().parse_args(argv)
    # gRPC logs each GOAWAY a client receives at INFO; supervisors send one to a connection when it is idle or
    # old (baton/front.py), so a push or a rollout following its nodes would print one per poll.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    configure_log(level=os.environ.get("BATON_MANAGER_LOG_LEVEL", "INFO"))
    try:
        return int(ns.func(ns))
    except PushRefused as e:
        print(printable(f"baton-manager: {e}"), file=sys.stderr)  # it quotes the node's words
        return EXIT_FAILED
    except BatonError as e:
        print(printable(f"baton-manager: {e}"), file=sys.stderr)
        return EXIT_USAGE
