"""Command line: ``supervisor run|check-config|status|reload|restart-daemon|demo|update|updates|cancel`` and
``--version``, among others (``supervisor --help``)."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from baton.config import Config, ConfigError, load_config
from baton.errors import BatonError
from baton.layout import DEFAULT_CONFIG, OPERATOR_BIN_DIR, SERVICE_UNIT, SYSTEMD_UNIT_DIR
from supervisor.logs import setup_logging
from supervisor.version import supervisor_version

EXIT_CONFIG = 2
SUPERVISOR_LOG = "supervisor.log"  # in log.dir: what `supervisor run` logs, and `supervisor log` reads
EXIT_USAGE = 2


def _load(path: str, degrade: bool = False) -> Config:
    try:
        return load_config(Path(path), degrade=degrade)
    except ConfigError as e:
        print(f"supervisor: config error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def cmd_run(ns: argparse.Namespace) -> int:
    cfg = _load(ns.config, degrade=True)  # a broken key refuses updates, a broken agent itself: the log says so
    from supervisor.daemon import prepare_dirs, run_supervisor

    try:
        prepare_dirs(cfg)
        setup_logging(cfg.log.level, json=ns.json or cfg.log.json, file=cfg.log_dir / SUPERVISOR_LOG)
    except (BatonError, OSError) as e:
        print(f"supervisor: {e}", file=sys.stderr)
        return 1
    try:
        return run_supervisor(cfg)
    except BatonError as e:
        print(f"supervisor: {e}", file=sys.stderr)
        return 1


def cmd_check_config(ns: argparse.Namespace) -> int:
    """One line per problem, exit 2 if any: also those a start would only report (a broken trusted key refuses
    updates, a broken agent section that agent, a limit this host has no controller for), so an operator sees
    them before a restart."""
    from baton.config import trusted_keys_problem
    from supervisor.cgroups import check_config

    cfg = _load(ns.file, degrade=True)  # a problem that would stop a start: its one line, exit 2
    keys = trusted_keys_problem(cfg)
    problems = ([str(keys)] if keys is not None else []) + [b.error for b in cfg.broken_agents]
    try:
        check_config(cfg)  # a limit this host has no controller for: refused here, not at the agent's start
    except ConfigError as e:
        problems.append(str(e))
    for problem in problems:
        print(f"supervisor: config error: {problem}", file=sys.stderr)
    if problems:
        return EXIT_CONFIG
    print(f"{ns.file}: ok (node {cfg.node.id}, {len(cfg.agents)} agents)")
    return 0


def _fmt_agents(agents: list[Any]) -> str:
    from baton.text import printable
    from supervisor.cli.ctl import state_name

    rows: list[tuple[str, ...]] = [("NAME", "STATE", "PID", "VERSION", "UPTIME", "RESTARTS", "LAST EXIT", "NOTE")]
    now = time.time()
    for a in agents:
        uptime = f"{now - a.start_time:.0f}s" if a.pid else "-"
        last = (a.last_exit_signal or str(a.last_exit_status)) if a.has_exit_status else "-"
        if a.kept:
            how = "kept across a supervisor update"
        elif a.adopted:
            how = "adopted after a supervisor restart"
        else:
            how = ""
        note = "; ".join(x for x in (a.last_error, how) if x)
        rows.append(tuple(printable(c) for c in (a.name, state_name(a.state), str(a.pid or "-"), a.version or "-",
                                                  uptime, str(a.restarts), last, note)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


FATAL_TAIL_LINES = 3
STATUS_TAIL_LINES = 10  # `supervisor status NAME`
MAX_COUNT = 2**32 - 1  # line counts and limits travel as uint32


def count_arg(text: str) -> int:
    """An argparse type: a whole number from 0 to :data:`MAX_COUNT` (a usage error, not a traceback, else)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= n <= MAX_COUNT:
        raise argparse.ArgumentTypeError(f"{n} is out of range (0 to {MAX_COUNT})")
    return n


def seconds_arg(text: str) -> float:
    """An argparse type: a finite number of seconds greater than 0."""
    try:
        s = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (math.isfinite(s) and s > 0):
        raise argparse.ArgumentTypeError(f"{text} seconds: expected a finite number greater than 0")
    return s


def readable_config(path: str, command: str) -> Config:
    """The config for a read-only command: the file, or while it does not load (one line on stderr saying so)
    where the running supervisor is (``where_it_runs``), so ``status``, ``tail``, ``audit`` and ``doctor`` still
    work while it is being fixed."""
    from baton.config import where_it_runs

    try:
        return load_config(Path(path))
    except ConfigError as e:
        print(f"supervisor {command}: config error: {e} (the running supervisor is asked all the same)",
              file=sys.stderr)
        return where_it_runs(Path(path))


def _socket_path(ns: argparse.Namespace, read_only: str = "") -> Path:
    """``--socket``, else ``grpc.unix_socket`` of ``--config``, else its private ``<state_dir>/run/control.sock``.

    ``read_only`` names a command that only reads: a config that does not load is then no reason to refuse.
    """
    from supervisor.cli.ctl import checked_socket

    if ns.socket:
        return checked_socket(Path(ns.socket), "--socket")
    cfg = readable_config(ns.config, read_only) if read_only else _load(ns.config)
    if cfg.grpc.unix_socket is not None:
        return checked_socket(cfg.grpc.unix_socket, "grpc.unix_socket")
    return checked_socket(cfg.control_socket, "node.state_dir")


def _ctl(fn: Any) -> Any:
    """Run an operator command: a CtlError is one line on stderr and exit 1."""

    def run(ns: argparse.Namespace) -> int:
        from baton.text import printable
        from supervisor.cli.ctl import CtlError  # here, not when the parser is built: `run` would keep it resident

        try:
            return int(fn(ns))
        except CtlError as e:
            print(printable(f"supervisor: {e}"), file=sys.stderr)  # it may quote the supervisor's words
            return 1
        except KeyboardInterrupt:
            return 130

    return run


def _last_lines(c: Any, name: str, lines: int = 0) -> list[str]:
    """The last lines of a fatal agent's log, for the note under the status table ([] if not allowed), printable:
    the agent wrote them, escape sequences and all."""
    import grpc

    from baton.pb import daemon_pb2
    from baton.text import printable_lines

    try:
        chunks = c.stub.TailLog(daemon_pb2.TailRequest(name=name, lines=lines or FATAL_TAIL_LINES),
                                timeout=c.timeout)
        return printable_lines(b"".join(ch.data for ch in chunks).decode(errors="replace"))
    except grpc.RpcError:
        return []


def cmd_status(ns: argparse.Namespace) -> int:
    from baton.pb import common_pb2, daemon_pb2
    from supervisor.cli.ctl import client, to_json

    if ns.name:
        return _status_of_one(ns)
    with client(_socket_path(ns, read_only="status"), ns.timeout) as c:
        st = c.call("GetStatus", daemon_pb2.GetStatusRequest())
        fatal = {a.name: _last_lines(c, a.name) for a in st.agents if a.state == common_pb2.AGENT_STATE_FATAL}
    if ns.json:
        import json

        print(json.dumps(to_json(st), indent=2))
        return 0
    from baton.text import printable

    head = f"node {st.node_id}  supervisor {st.supervisor_version}  pid {st.pid}  up {st.uptime_seconds:.0f}s"
    if st.manager_configured:
        head += f"  manager {'connected' if st.manager_connected else 'not connected'}"
    print(printable(head))
    if st.updates_refused:
        print(printable(f"updates refused: {st.updates_refused}"))
    print(_fmt_agents(list(st.agents)))
    for a in st.agents:
        if a.name in fatal:
            print()
            print(printable(f"{a.name} is fatal (`supervisor start {a.name}` retries); its log {a.log_path} ends:"))
            for line in fatal[a.name] or ["(empty)"]:
                print(f"  {line}")
    from supervisor.cli.update import holds_lines

    print("\n".join(holds_lines(list(st.holds))), end="\n" if st.holds else "")
    return 0


def _status_of_one(ns: argparse.Namespace) -> int:
    """``supervisor status NAME``: every field of one agent, one per line, and the end of its log."""
    from baton.pb import daemon_pb2
    from baton.text import printable
    from supervisor.cli.ctl import client, state_name, to_json

    with client(_socket_path(ns, read_only="status"), ns.timeout) as c:
        st = c.call("GetStatus", daemon_pb2.GetStatusRequest())
        a = next((x for x in st.agents if x.name == ns.name), None)
        tail = _last_lines(c, ns.name, STATUS_TAIL_LINES) if a is not None and not ns.json else []
    if a is None:
        print(printable(f"supervisor status: no agent named {ns.name!r} (`supervisor status` lists them)"),
              file=sys.stderr)
        return 1
    if ns.json:
        import json

        print(json.dumps(to_json(a), indent=2))
        return 0
    started = time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(a.start_time)) if a.pid else "-"
    uptime = f"{time.time() - a.start_time:.0f}s" if a.pid else "-"
    if a.has_exit_status:
        last_exit = f"killed by {a.last_exit_signal}" if a.last_exit_signal else f"status {a.last_exit_status}"
    else:
        last_exit = "-"
    how = "kept across a supervisor update" if a.kept else "adopted after a supervisor restart" if a.adopted else "-"
    for label, value in (("name", a.name), ("state", state_name(a.state)), ("pid", str(a.pid or "-")),
                         ("version", a.version or "-"), ("started", started), ("uptime", uptime),
                         ("restarts", str(a.restarts)), ("last exit", last_exit),
                         ("last error", a.last_error or "-"), ("taken over", how), ("log", a.log_path or "-")):
        print(printable(f"{label + ':':<12}{value}"))
    print(f"last {STATUS_TAIL_LINES} lines of its log:")
    for line in tail or ["(empty)"]:
        print(f"  {line}")
    return 0


def cmd_log(ns: argparse.Namespace) -> int:
    """``supervisor log [-f] [-n N]``: the supervisor's own log file (``<log_dir>/supervisor.log``), root only."""
    if os.geteuid() != 0:
        print("supervisor log: the supervisor's log is root's (it names every agent, update and caller): "
              "run it as root", file=sys.stderr)
        return 1
    from baton.rotating_log import follow_file, last_lines_of
    from baton.text import PrintableStream

    path = _load(ns.config).log_dir / SUPERVISOR_LOG
    if not path.exists():
        print(f"supervisor log: {path} does not exist (has the supervisor run with this config?)", file=sys.stderr)
        return 1
    stream = PrintableStream() if sys.stdout.isatty() else None
    out = sys.stdout.buffer

    def emit(data: bytes) -> None:
        out.write(data if stream is None else stream.feed(data).encode())
        out.flush()

    emit(last_lines_of(path, ns.lines))
    if ns.follow:
        try:
            for data in follow_file(path):
                emit(data)
        except KeyboardInterrupt:
            pass
    return 0


def cmd_control(ns: argparse.Namespace) -> int:
    from supervisor.cli.ctl import client, control, emit

    with client(_socket_path(ns), ns.timeout) as c:
        results, ok = control(c, ns.action, ns.names, ns.wait, getattr(ns, "signal", ""))
    emit(results, ns.json)
    return 0 if ok else 1


def cmd_tail(ns: argparse.Namespace) -> int:
    import grpc

    from baton.pb import daemon_pb2
    from baton.text import PrintableStream
    from supervisor.cli.ctl import client

    # On a terminal the agent's escape sequences are shown escaped; into a pipe or a file its bytes go as written.
    stream = PrintableStream() if sys.stdout.isatty() else None
    since = None
    if ns.since:
        from baton.log_stamps import SinceFilter, parse_since

        try:
            since = SinceFilter(parse_since(ns.since))
        except ValueError as e:
            print(f"supervisor tail: --since: {e}", file=sys.stderr)
            return EXIT_USAGE
    lines = MAX_COUNT if since is not None else ns.lines  # the server reads at most its last MiB
    with client(_socket_path(ns, read_only="tail"), ns.timeout) as c:
        req = daemon_pb2.TailRequest(name=ns.name, lines=lines, follow=ns.follow, stderr=ns.stderr)
        out = sys.stdout.buffer

        def emit(data: bytes) -> None:
            out.write(data if stream is None else stream.feed(data).encode())
            out.flush()

        try:
            for chunk in c.stub.TailLog(req, timeout=None if ns.follow else ns.timeout):
                emit(chunk.data if since is None else since.feed(chunk.data))
        except grpc.RpcError as e:
            raise c.error(e) from None
    if since is not None:
        emit(since.finish())
        if not since.stamped:
            print(f"supervisor tail: agent {ns.name}'s log has no timestamps to filter by "
                  "(set log_timestamps = true in its section)", file=sys.stderr)
            return 1
    return 0


def cmd_clear(ns: argparse.Namespace) -> int:
    from baton.pb import daemon_pb2
    from supervisor.cli.ctl import client

    with client(_socket_path(ns), ns.timeout) as c:
        resp = c.call("ClearLog", daemon_pb2.ClearLogRequest(name=ns.name, stderr=ns.stderr))
    print(f"{ns.name}: cleared {'stderr log' if ns.stderr else 'log'} ({resp.bytes_removed} bytes)")
    return 0


def cmd_reload(ns: argparse.Namespace) -> int:
    from baton.pb import daemon_pb2
    from supervisor.cli.ctl import client, to_json

    with client(_socket_path(ns), ns.timeout) as c:
        r = c.call("Reload", daemon_pb2.ReloadRequest(), timeout=ns.wait)
    if ns.json:
        import json

        print(json.dumps(to_json(r), indent=2))
        return 0
    for label, names in (("started", r.started), ("stopped", r.stopped), ("restarted", r.restarted),
                         ("unchanged", r.unchanged)):
        print(f"{label}: {', '.join(names) or '-'}")
    if r.not_applied:
        print(f"not applied until `supervisor restart-daemon` (agents keep running) or the next start: "
              f"[{'], ['.join(r.not_applied)}]")
    if r.tls:
        print(r.tls, file=sys.stderr if r.tls_kept_old else sys.stdout)
    return 1 if r.tls_kept_old else 0


def cmd_restart_daemon(ns: argparse.Namespace) -> int:
    """Start the supervisor again through the handover (docs/handover.md): agents kept, the config re-read."""
    from baton.log import configure
    from helper.self_update import SelfUpdateError, restart_supervisor

    # A config the next process could not start with is refused here (nothing is stopped); a broken key or agent
    # section is not such a config: the next process starts as `run` does, with what is safe.
    cfg = _load(ns.config, degrade=True)
    configure(level="INFO" if ns.after_exit else "WARNING", tag="restart-daemon")
    try:
        print(restart_supervisor(cfg, after_exit=ns.after_exit))
    except SelfUpdateError as e:
        print(f"supervisor restart-daemon: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_install_self(ns: argparse.Namespace) -> int:
    from baton.release import release_root_of_running_code
    from supervisor.cli.install_self import install_self

    if ns.enable and ns.no_unit:
        print("supervisor install-self: --enable starts the unit that --no-unit does not write; drop one of them",
              file=sys.stderr)
        return EXIT_USAGE
    if ns.purge and not ns.uninstall:
        print("supervisor install-self: --purge goes with --uninstall", file=sys.stderr)
        return EXIT_USAGE
    cfg = _load(ns.config)
    if ns.uninstall:
        return uninstall_self(ns, cfg)
    root = release_root_of_running_code()
    if root is not None:
        return install_self_release(ns, cfg, root)
    if ns.enable:
        print("supervisor install-self: --enable needs a release (this is a development checkout, which writes no "
              "unit); build one with `baton-package release` (docs/releases.md)", file=sys.stderr)
        return EXIT_USAGE
    dest = install_self(cfg, ns.version or supervisor_version())
    print(f"installed a development tree {dest.name} at {dest} (Baton's code only: run it with BATON_PYTHON set to "
          "an interpreter that has the dependencies; hosts install a release, docs/releases.md)")
    return 0


def install_self_release(ns: argparse.Namespace, cfg: Config, root: Path) -> int:
    """``install-self`` run from an unpacked release: install that release (docs/releases.md)."""
    from supervisor.cli.install_self import check_command_links, install_release, write_command_links

    if ns.version and ns.version != supervisor_version():
        print(f"supervisor: this release is {supervisor_version()}, not {ns.version}", file=sys.stderr)
        return 1
    bin_dir = Path(ns.bin_dir) if ns.bin_dir else None
    try:
        if bin_dir is not None:
            check_command_links(cfg, bin_dir)  # before anything is installed
        done = install_release(cfg, root, force=ns.force, unit_dir=None if ns.no_unit else Path(ns.unit_dir))
        links = write_command_links(cfg, bin_dir) if bin_dir is not None else []
    except BatonError as e:
        print(f"supervisor install-self: {e}", file=sys.stderr)
        return 1
    print(f"installed supervisor {done.version} at {done.path}; current -> versions/{done.version}")
    if links:
        print(f"linked {', '.join(p.name for p in links)} into {bin_dir}")
    if done.unit is None:
        return 0
    if not ns.enable:
        print(f"wrote {done.unit}; start it with: systemctl daemon-reload && systemctl enable --now {done.unit.name}")
        return 0
    print(f"wrote {done.unit}")
    return enable_installed(cfg, done.version, done.unit)


def uninstall_self(ns: argparse.Namespace, cfg: Config) -> int:
    """``install-self --uninstall``: undo install-self; state and logs stay unless ``--purge``."""
    from supervisor.cli.install_self import uninstall

    try:
        done = uninstall(cfg, unit_dir=Path(ns.unit_dir), bin_dir=Path(ns.bin_dir) if ns.bin_dir else None,
                         purge=ns.purge)
    except BatonError as e:
        print(f"supervisor install-self --uninstall: {e}", file=sys.stderr)
        return 1
    for path in done.removed:
        print(f"removed {path}")
    if done.kept:
        print(f"kept {', '.join(map(str, done.kept))} (state and logs; --purge removes them)")
    return 0


def enable_installed(cfg: Config, version: str, unit: Path) -> int:
    """``install-self --enable``: start the unit just written; a failure leaves the release installed and says so."""
    from supervisor.cli.install_self import ENABLE_TIMEOUT_S, EnableFailed, SystemdUnavailable, enable_unit
    from supervisor.own_layout import launcher

    print(f"systemctl daemon-reload && systemctl enable --now {unit.name} (waiting up to {ENABLE_TIMEOUT_S:.0f} s "
          "for the supervisor to answer)", flush=True)
    installed = f"supervisor {version} IS installed (current -> versions/{version}) and {unit} is written, but"
    try:
        up = enable_unit(cfg, unit.name, progress=lambda line: print(line, flush=True))
    except SystemdUnavailable as e:
        print(f"supervisor install-self: {installed} nothing was enabled: {e}; on a systemd host run `systemctl "
              f"daemon-reload && systemctl enable --now {unit.name}`, without systemd start it with "
              f"`{launcher(cfg)} run --config {cfg.source}`", file=sys.stderr)
        return 1
    except EnableFailed as e:
        print(f"supervisor install-self: {installed} {e}; see `systemctl status {unit.stem}`, `journalctl -u "
              f"{unit.stem}` and {cfg.log_dir / 'supervisor.log'}, fix the cause, then `systemctl restart "
              f"{unit.stem}`", file=sys.stderr)
        return 1
    states = ", ".join(f"{n} {s}" for s, n in sorted(Counter(up.agent_states).items())) or "none configured"
    print(f"{up.unit} is enabled and active: supervisor {up.version}, MainPID {up.main_pid}, agents: {states}")
    return 0


def cmd_demo(ns: argparse.Namespace) -> int:
    from supervisor.cli.demo import run_demo

    return run_demo(seconds=ns.seconds, keep=ns.keep)


class _Parser(argparse.ArgumentParser):
    """argparse's, with the help width found here: its formatter asks shutil (with bz2 and lzma, about 0.3 MiB)
    on every add_argument, which would keep shutil loaded in the daemon."""

    def _get_formatter(self) -> argparse.HelpFormatter:
        return self.formatter_class(prog=self.prog, width=_columns() - 2)  # type: ignore[call-arg]  # all take it


def _columns() -> int:
    """The terminal's width as shutil.get_terminal_size() finds it: $COLUMNS, then stdout's terminal, then 80."""
    try:
        return int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        pass
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns if sys.__stdout__ else 80
    except (AttributeError, ValueError, OSError):
        return 80


def build_parser(run_only: bool = False) -> argparse.ArgumentParser:
    """The whole command line, or with ``run_only`` just ``run``'s (the daemon keeps no other parser, nor the
    modules that build them, loaded)."""
    p = _Parser(prog="supervisor", description="Baton supervisor: keeps Agents running.",
                                epilog="examples:\n  supervisor status\n  supervisor restart web\n"
                                       "  supervisor tail -f web\n  supervisor reload\n"
                                       "(README.md, section \"Operating Baton\")",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"baton supervisor {supervisor_version()}")
    sub = p.add_subparsers(dest="cmd", required=True)
    def client_args(sp: argparse.ArgumentParser, json_flag: bool = True) -> None:
        sp.add_argument("--config", "-c", default=str(DEFAULT_CONFIG),
                        help="config file whose grpc.unix_socket to use (default: %(default)s)")
        sp.add_argument("--socket", help="the supervisor's Unix socket (instead of reading the config)")
        sp.add_argument("--timeout", type=seconds_arg, default=5.0, help="seconds per call (default: %(default)s)")
        if json_flag:
            sp.add_argument("--json", action="store_true", help="print JSON (every field, zeros included)")

    def command(name: str, help: str, example: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, epilog=f"example:\n  {example}",
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    r = command("run", "run the supervisor daemon", "supervisor run --config /etc/baton/supervisor.toml")
    r.add_argument("--config", "-c", required=True, help="TOML config file")
    r.add_argument("--json", action="store_true", help="log one JSON object per line")
    r.set_defaults(fn=cmd_run)
    if run_only:
        return p
    c = command("check-config", "validate a config file without starting anything",
                "supervisor check-config /etc/baton/supervisor.toml")
    c.add_argument("file")
    c.set_defaults(fn=cmd_check_config)
    s = command("status", "show the agents of the local supervisor, or one in full detail",
                "supervisor status --json\n  supervisor status web")
    s.add_argument("name", nargs="?", metavar="NAME", help="one agent: every field and the end of its log")
    client_args(s)
    s.set_defaults(fn=_ctl(cmd_status))
    lg = command("log", "show the supervisor's own log (root only), and follow it with -f",
                 "supervisor log -f -n 100")
    lg.add_argument("--config", "-c", default=str(DEFAULT_CONFIG),
                    help="config file whose log.dir to read (default: %(default)s)")
    lg.add_argument("-n", "--lines", type=count_arg, default=20, help="last lines to show (default: %(default)s)")
    lg.add_argument("-f", "--follow", action="store_true", help="then print what is appended, until Ctrl-C")
    lg.set_defaults(fn=cmd_log)
    for action, help, example in (
        ("start", "start agents (a fatal agent is reset and started) and wait until they run",
         "supervisor start web worker"),
        ("stop", "stop agents (stop signal, SIGKILL after stop_timeout_s) and wait until they stopped",
         "supervisor stop all"),
        ("restart", "stop and start agents and wait until they run again", "supervisor restart web"),
    ):
        a = command(action, help, example)
        a.add_argument("names", nargs="+", metavar="NAME", help="agent names, or `all`")
        a.add_argument("--wait", type=seconds_arg, default=60.0, help="seconds to wait for the new state")
        client_args(a)
        a.set_defaults(fn=_ctl(cmd_control), action=action)
    g = command("signal", "send a signal to agents' process groups", "supervisor signal HUP web")
    g.add_argument("signal", help="HUP, SIGHUP, USR1, ... or a number")
    g.add_argument("names", nargs="+", metavar="NAME", help="agent names, or `all`")
    g.add_argument("--wait", type=seconds_arg, default=5.0, help="seconds to wait for the state to settle")
    client_args(g)
    g.set_defaults(fn=_ctl(cmd_control), action="signal")
    t = command("tail", "print an agent's output, through the supervisor (no access to the log dir needed)",
                "supervisor tail -f -n 50 web")
    t.add_argument("name", metavar="NAME")
    t.add_argument("-n", "--lines", type=count_arg, default=10, help="last lines to print first (default: %(default)s)")
    t.add_argument("-f", "--follow", action="store_true", help="keep printing new output until interrupted")
    t.add_argument("--since", metavar="WHEN", help="only lines from WHEN on: 30s, 10m, 2h, 1d ago or a UTC time "
                   "like 2026-12-07T22:00:00 (agents with log_timestamps = true; the current log file)")
    t.add_argument("--stderr", action="store_true", help='the separate stderr log (agents with stderr = "separate")')
    client_args(t, json_flag=False)
    t.set_defaults(fn=_ctl(cmd_tail))
    cl = command("clear", "empty an agent's log and remove its rotated files", "supervisor clear web")
    cl.add_argument("name", metavar="NAME")
    cl.add_argument("--stderr", action="store_true", help="clear the separate stderr log instead")
    client_args(cl, json_flag=False)
    cl.set_defaults(fn=_ctl(cmd_clear))
    rl = command("reload", "re-read the config: start new agents, stop removed ones, restart changed ones",
                 "supervisor reload --config /etc/baton/supervisor.toml")
    rl.add_argument("--wait", type=seconds_arg, default=300.0, help="seconds to wait for the reload to finish")
    client_args(rl)
    rl.set_defaults(fn=_ctl(cmd_reload))
    rd = command("restart-daemon", "start the supervisor again with the config file as it is now, keeping every agent "
                 "(same pids, output and notify sockets): applies what `reload` cannot",
                 "supervisor restart-daemon --config /etc/baton/supervisor.toml")
    rd.add_argument("--config", "-c", default=str(DEFAULT_CONFIG), help="config file (default: %(default)s)")
    # what the supervisor itself runs when systemd restarts its unit: it exits, systemd starts the next process
    rd.add_argument("--after-exit", action="store_true", help=argparse.SUPPRESS)
    rd.set_defaults(fn=cmd_restart_daemon)
    i = command("install-self", "install this release as the current supervisor version under install_root",
                "supervisor install-self --config /etc/baton/supervisor.toml --enable")
    i.add_argument("--config", "-c", required=True)
    i.add_argument("--version", help="the version to install as (default: this code's version)")
    i.add_argument("--force", action="store_true", help="install below the highest committed version")
    i.add_argument("--unit-dir", default=str(SYSTEMD_UNIT_DIR), help=f"where to write {SERVICE_UNIT}")
    i.add_argument("--no-unit", action="store_true", help="do not write the systemd unit")
    i.add_argument("--enable", action="store_true",
                   help="then systemctl daemon-reload, enable --now the unit, and wait until the supervisor answers")
    i.add_argument("--bin-dir", default=str(OPERATOR_BIN_DIR),
                   help="where to link the supervisor and helper commands ('' for no links)")
    i.add_argument("--uninstall", action="store_true",
                   help="stop and disable the unit, remove it, the command links and the supervisor's versions; "
                        "state and logs stay")
    i.add_argument("--purge", action="store_true",
                   help="with --uninstall: also remove the state directory, the logs and the agents' versions")
    i.set_defaults(fn=cmd_install_self)
    d = command("demo", "run a self-contained demo in a temporary directory", "supervisor demo --seconds 10")
    d.add_argument("--seconds", type=float, default=5.0, help="how long to keep running at the end")
    d.add_argument("--keep", action="store_true", help="keep the temporary directory")
    d.set_defaults(fn=cmd_demo)
    from supervisor.cli import audit, doctor

    audit.add_parser(sub)
    doctor.add_parser(sub)

    from supervisor.cli.update import add_parsers as add_update_parsers

    add_update_parsers(sub)  # update, updates, cancel
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ns = build_parser(run_only=argv[:1] == ["run"]).parse_args(argv)
    if ns.fn is cmd_run:
        return int(ns.fn(ns))
    # A client command: gRPC logs each GOAWAY it receives at INFO, and the supervisor sends one to a kept
    # connection when it is idle or old (baton/front.py), which a `--watch` would print every poll.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    try:
        return int(ns.fn(ns))
    except (BatonError, OSError) as e:  # a file or path that is not what it should be: one line, no traceback
        from baton.text import printable

        print(printable(f"supervisor {ns.cmd}: {e}"), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130

if __name__ == "__main__":
    sys.exit(main())
