"""Command line: ``supervisor run|check-config|status|demo`` and ``--version``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from baton.config import Config, ConfigError, load_config
from baton.errors import BatonError
from supervisor.logs import setup_logging
from supervisor.version import supervisor_version

EXIT_CONFIG = 2


def _load(path: str) -> Config:
    try:
        return load_config(Path(path))
    except ConfigError as e:
        print(f"supervisor: config error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def cmd_run(ns: argparse.Namespace) -> int:
    cfg = _load(ns.config)
    setup_logging(cfg.log.level, json=ns.json or cfg.log.json, file=cfg.log_dir / "supervisor.log")
    from supervisor.daemon import run_supervisor

    try:
        return run_supervisor(cfg)
    except BatonError as e:
        print(f"supervisor: {e}", file=sys.stderr)
        return 1


def cmd_check_config(ns: argparse.Namespace) -> int:
    cfg = _load(ns.file)
    print(f"{ns.file}: ok (node {cfg.node.id}, {len(cfg.agents)} agents)")
    return 0


def _fmt_agents(agents: list[Any]) -> str:
    from baton.pb import common_pb2

    rows = [("NAME", "STATE", "PID", "VERSION", "UPTIME", "RESTARTS", "LAST EXIT", "NOTE")]
    now = time.time()
    for a in agents:
        state = common_pb2.AgentState.Name(a.state).removeprefix("AGENT_STATE_").lower()
        uptime = f"{now - a.start_time:.0f}s" if a.pid else "-"
        last = str(a.last_exit_status) if a.has_exit_status else "-"
        note = a.last_error + (" (adopted)" if a.adopted else "")
        rows.append((a.name, state, str(a.pid or "-"), a.version or "-", uptime, str(a.restarts), last, note))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def cmd_status(ns: argparse.Namespace) -> int:
    import grpc

    from baton.pb import daemon_pb2, daemon_pb2_grpc

    if ns.socket:
        target = f"unix:{ns.socket}"
    else:
        cfg = _load(ns.config)
        if cfg.grpc.unix_socket is None:
            print("supervisor: the config has no grpc.unix_socket; pass --socket", file=sys.stderr)
            return 1
        target = f"unix:{cfg.grpc.unix_socket}"
    with grpc.insecure_channel(target) as ch:
        stub = daemon_pb2_grpc.DaemonServiceStub(ch)
        try:
            st = stub.GetStatus(daemon_pb2.GetStatusRequest(), timeout=ns.timeout)
        except grpc.RpcError as e:
            print(f"supervisor: cannot reach the supervisor at {target}: {e.code().name} {e.details()}",
                  file=sys.stderr)
            return 1
    if ns.json:
        from google.protobuf.json_format import MessageToJson

        print(MessageToJson(st))
        return 0
    print(f"node {st.node_id}  supervisor {st.supervisor_version}  pid {st.pid}  up {st.uptime_seconds:.0f}s  "
          f"manager {'connected' if st.manager_connected else 'not connected'}")
    print(_fmt_agents(list(st.agents)))
    return 0


def cmd_install_self(ns: argparse.Namespace) -> int:
    from helper.release import release_root_of_running_code
    from supervisor.install_self import install_self

    cfg = _load(ns.config)
    root = release_root_of_running_code()
    if root is not None:
        return install_self_release(ns, cfg, root)
    dest = install_self(cfg, ns.version or supervisor_version())
    print(f"installed a development tree {dest.name} at {dest} (Baton's code only: run it with BATON_PYTHON set to "
          "an interpreter that has the dependencies; hosts install a release, docs/releases.md)")
    return 0


def install_self_release(ns: argparse.Namespace, cfg: Config, root: Path) -> int:
    """``install-self`` run from an unpacked release: install that release (docs/releases.md)."""
    from supervisor.install_self import install_release

    if ns.version and ns.version != supervisor_version():
        print(f"supervisor: this release is {supervisor_version()}, not {ns.version}", file=sys.stderr)
        return 1
    try:
        done = install_release(cfg, root, force=ns.force, unit_dir=None if ns.no_unit else Path(ns.unit_dir))
    except BatonError as e:
        print(f"supervisor install-self: {e}", file=sys.stderr)
        return 1
    print(f"installed supervisor {done.version} at {done.path}; current -> versions/{done.version}")
    if done.unit is not None:
        print(f"wrote {done.unit}; start it with: systemctl daemon-reload && systemctl enable --now {done.unit.name}")
    return 0


def cmd_demo(ns: argparse.Namespace) -> int:
    from supervisor.demo import run_demo

    return run_demo(seconds=ns.seconds, keep=ns.keep)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="supervisor", description="Baton supervisor: keeps Agents running.")
    p.add_argument("--version", action="version", version=f"baton supervisor {supervisor_version()}")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the supervisor daemon")
    r.add_argument("--config", "-c", required=True, help="TOML config file")
    r.add_argument("--json", action="store_true", help="log one JSON object per line")
    r.set_defaults(fn=cmd_run)
    c = sub.add_parser("check-config", help="validate a config file without starting anything")
    c.add_argument("file")
    c.set_defaults(fn=cmd_check_config)
    s = sub.add_parser("status", help="show the agents of the local supervisor")
    s.add_argument("--config", "-c", default="/etc/baton/supervisor.toml")
    s.add_argument("--socket", help="the supervisor's Unix socket (instead of reading the config)")
    s.add_argument("--json", action="store_true")
    s.add_argument("--timeout", type=float, default=5.0)
    s.set_defaults(fn=cmd_status)
    i = sub.add_parser("install-self", help="install this release as the current supervisor version under install_root")
    i.add_argument("--config", "-c", required=True)
    i.add_argument("--version", help="the version to install as (default: this code's version)")
    i.add_argument("--force", action="store_true", help="install below the highest committed version")
    i.add_argument("--unit-dir", default="/etc/systemd/system", help="where to write baton-supervisor.service")
    i.add_argument("--no-unit", action="store_true", help="do not write the systemd unit")
    i.set_defaults(fn=cmd_install_self)
    d = sub.add_parser("demo", help="run a self-contained demo in a temporary directory")
    d.add_argument("--seconds", type=float, default=5.0, help="how long to keep running at the end")
    d.add_argument("--keep", action="store_true", help="keep the temporary directory")
    d.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    return int(ns.fn(ns))


if __name__ == "__main__":
    sys.exit(main())
