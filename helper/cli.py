"""Command line of the helper.

``helper apply --update-id ID``      carry out (or resume) one update from its journal
``helper verify PACKAGE ...``        check a package offline exactly as an update would
``helper --rollback [COMPONENT]``    switch back to the previous good version by hand (``--to VERSION``)
``helper --status``                  components, current and backup versions, holds, unfinished updates
``helper hold|unhold COMPONENT``     refuse pushes for a component, or accept them again (helper/holds.py)
``helper clear-failed COMPONENT [VERSION]``  forget versions marked failed (helper/failed_marks.py)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from baton import layout
from baton.config import SUPERVISOR_COMPONENT, Config, ConfigError, load_config
from baton.errors import BatonError
from baton.standby import FLAG as STANDBY_FLAG
from baton.startup import loading

DEFAULT_CONFIG = str(layout.DEFAULT_CONFIG)
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_BUSY = 75


def _setup_logging(json: bool = False) -> None:
    from baton.log import configure

    configure(json=json, tag="helper")


def _load(path: str) -> Config:
    try:
        return load_config(Path(path), host_checks=False)
    except ConfigError as e:
        print(f"helper: config error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


def cmd_apply(ns: argparse.Namespace) -> int:
    stamp = _standby_stamp() if ns.standby else ""  # before the imports: code changed under them shows as changed
    with loading():
        from baton.journal import Journal
        from helper.locks import ComponentBusy, ComponentLock
        from helper.wiring import update_run

        if ns.standby:  # loaded while nobody waits: the supervisor client wiring makes when an update needs it
            import helper.control  # noqa: F401
    if ns.standby:
        from helper.standby import take_output, wait_for_job

        started_with = _load(ns.config)  # where to connect and log; the update reads the file afresh below
        ns.update_id = wait_for_job(started_with.run_dir, stamp)
        if ns.update_id is None:
            return 0
        take_output(Journal(started_with.node.state_dir).dir(ns.update_id) / "helper.log")
    _setup_logging(ns.json)
    cfg = _load(ns.config)
    journal = Journal(cfg.node.state_dir)
    try:
        rec = journal.load(ns.update_id)
    except BatonError as e:
        print(f"helper: {e}", file=sys.stderr)
        return EXIT_FAILED
    socket = Path(ns.socket) if ns.socket else cfg.control_socket
    try:
        with ComponentLock(cfg.node.state_dir, rec.component):
            final = update_run(cfg, journal, ns.update_id, rec.component, socket).run()
    except ComponentBusy as e:
        print(f"helper: {e}", file=sys.stderr)
        return EXIT_BUSY
    print(f"update {final.update_id}: {final.state.value}" + (f": {final.error}" if final.error else ""))
    return 0 if final.success else EXIT_FAILED


def _standby_stamp() -> str:
    from baton.standby import code_stamp

    return code_stamp()


def cmd_verify(ns: argparse.Namespace) -> int:
    from baton.signing import load_trusted_keys
    from helper.verify import format_verified, verify_file

    cfg = _load(ns.config) if not ns.key and ns.config else None
    try:
        if cfg is not None:
            from helper.installer import configured_trusted_keys

            keys = configured_trusted_keys(cfg)  # what an update would trust, judged as an update judges it
        else:
            keys = load_trusted_keys(ns.key or [])
        vp = verify_file(ns.package, ns.signature, keys, ns.component, ns.version, node_id=ns.node, now=time.time())
    except BatonError as e:
        print(f"helper verify: REFUSED: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(format_verified(vp))
    print("OK: the package would be accepted")
    return 0


def cmd_status(ns: argparse.Namespace) -> int:
    from helper.holds import status_lines
    from helper.recovery import status_report

    cfg = _load(ns.config)
    print(status_report(cfg))
    print("\n".join(status_lines(cfg)))
    return 0


def cmd_rollback(ns: argparse.Namespace) -> int:
    from helper.recovery import RollbackError, manual_rollback, rollback_component

    _setup_logging()
    cfg = _load(ns.config)
    started = time.time()
    component = ns.rollback or ""
    try:
        component = rollback_component(cfg, ns.rollback or None)
        if component == SUPERVISOR_COMPONENT:
            from helper.self_update import rollback_supervisor  # the handover's machinery: only for the supervisor

            done = rollback_supervisor(cfg, ns.to)
        else:
            done = manual_rollback(cfg, component, ns.to)
    except (RollbackError, BatonError) as e:
        _audit(cfg, "helper --rollback", {"component": component}, started, "failed", str(e))
        print(f"helper --rollback: {e}", file=sys.stderr)
        return EXIT_FAILED
    _audit(cfg, "helper --rollback", {"component": component}, started, "ok", done)
    print(done)
    return 0


def _audit(cfg: Config, call: str, args: dict[str, str], started: float, outcome: str, message: str) -> None:
    """A manual command's own audit record (baton/audit.py); not being able to write it is said, not fatal."""
    from baton.audit import AuditError, AuditLog, AuditRecord, Caller, operator_name

    rec = AuditRecord(time=started, caller=Caller(kind="helper", identity=operator_name(), uid=os.getuid(),
                                                  pid=os.getpid()),
                      call=call, outcome=outcome, code="OK" if outcome == "ok" else "FAILED", message=message,
                      args=args, duration_ms=int((time.time() - started) * 1000))
    try:
        AuditLog(cfg.node.state_dir).append(rec)
    except AuditError as e:
        print(f"helper: warning: {e}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="helper", description="Baton update helper")
    p.add_argument("--config", "-c", default=DEFAULT_CONFIG, help="the supervisor's config file")
    p.add_argument("--rollback", nargs="?", const="", metavar="COMPONENT",
                   help="switch COMPONENT back to its previous version (may be left out when the supervisor is "
                        "the only component)")
    p.add_argument("--to", metavar="VERSION", help="with --rollback: the installed version to go to "
                   "(default: the highest one below the current that is not marked failed)")
    p.add_argument("--status", action="store_true", help="list components, versions and unfinished updates")
    sub = p.add_subparsers(dest="cmd")
    a = sub.add_parser("apply", help="carry out or resume one update (started by the supervisor)")
    a.add_argument("--config", "-c", dest="config", default=argparse.SUPPRESS)
    job = a.add_mutually_exclusive_group(required=True)
    job.add_argument("--update-id")
    job.add_argument(STANDBY_FLAG, dest="standby", action="store_true",
                     help="load first, then wait for the supervisor to hand over an update id (baton/standby.py)")
    a.add_argument("--socket", help="the supervisor's control socket (default: <state_dir>/run/control.sock)")
    a.add_argument("--json", action="store_true", help="log JSON lines")
    a.set_defaults(fn=cmd_apply)
    v = sub.add_parser("verify", help="check a package offline exactly as an update would")
    v.add_argument("package")
    v.add_argument("--signature", required=True)
    v.add_argument("--component", required=True)
    v.add_argument("--version", required=True)
    v.add_argument("--key", action="append", help="trusted public key file (repeatable); default: the config's")
    v.add_argument("--node", help="this node's id, checked against the manifest's nodes=")
    v.add_argument("--config", "-c", dest="config", default=None)
    v.set_defaults(fn=cmd_verify)
    from helper import failed_marks, holds

    holds.add_parsers(sub)
    failed_marks.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    # gRPC logs each GOAWAY at INFO, and the supervisor sends one to a connection when it is old
    # (baton/front.py): a helper watching an agent through its health window would log it into helper.log.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    p = build_parser()
    ns = p.parse_args(argv)
    if ns.cmd == "apply":  # run by the supervisor, into helper.log: a traceback there is what debugging needs
        return _run(p, ns)
    try:
        return _run(p, ns)
    except (BatonError, OSError) as e:  # a file or path that is not what it should be: one line, no traceback
        from baton.text import printable

        print(printable(f"helper: {e}"), file=sys.stderr)
        return EXIT_FAILED


def _run(p: argparse.ArgumentParser, ns: argparse.Namespace) -> int:
    if ns.rollback is not None:
        return cmd_rollback(ns)
    if ns.status:
        return cmd_status(ns)
    if ns.cmd is None:
        p.print_usage(sys.stderr)
        return EXIT_USAGE
    if hasattr(ns, "fn_cfg"):
        cfg = _load(ns.config)
        started = time.time()
        rc = int(ns.fn_cfg(cfg, ns))
        if getattr(ns, "audit_call", ""):  # hold, unhold, clear-failed: a change made by hand, recorded
            args = {k: str(v) for k, v in vars(ns).items() if k in ("component", "version", "reason") and v}
            _audit(cfg, f"helper {ns.audit_call}", args, started, "ok" if rc == 0 else "failed", f"exit status {rc}")
        return rc
    return int(ns.fn(ns))


if __name__ == "__main__":
    sys.exit(main())
