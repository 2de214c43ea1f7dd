"""``supervisor doctor``: check a host the way an experienced operator would.

Each check yields one or more :class:`Finding` lines (one per key, directory,
component or certificate), each ``ok``, ``warning`` or ``problem`` and, unless
ok, with the command or edit that fixes it. The exit status is the worst
finding: 0 ok, 1 warnings, 2 problems. Every check name has a section in
docs/troubleshooting.md (``#doctor-<check>``). The doctor only reads: it
changes nothing, and its one gRPC call (GetStatus) is read-only, so it leaves
no audit record.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import socket
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from baton.config import SUPERVISOR_COMPONENT, Config, ConfigError, load_config, where_it_runs
from baton.docs import guide
from baton.layout import DEFAULT_CONFIG, SERVICE, SERVICE_UNIT, SYSTEMD_UNIT_DIR, UNIT_IN_CHECKOUT, UNIT_IN_VERSION
from supervisor.own_layout import source_root

OK = "ok"
WARNING = "warning"
PROBLEM = "problem"
_RANK = {OK: 0, WARNING: 1, PROBLEM: 2}

CERT_WARN_DAYS = 14  # a certificate that expires sooner is a warning (--cert-days)
RECENT_UPDATES = 20  # journal records consulted for "the largest recent package"
PROBE_TIMEOUT_S = 3.0
UNIT_PATHS = (SYSTEMD_UNIT_DIR / SERVICE_UNIT, Path("/usr/lib/systemd/system") / SERVICE_UNIT,
              Path("/lib/systemd/system") / SERVICE_UNIT)
# Unit settings the handover depends on (docs/handover.md#under-systemd): a difference is a problem.
UNIT_CRITICAL = ("Type", "NotifyAccess", "KillMode")
# Settings each site sets for itself: never compared.
UNIT_SITE_SPECIFIC = ("Description", "Documentation", "Environment", "ExecStart", "ExecReload")


@dataclass(frozen=True)
class Finding:
    check: str
    status: str  # OK, WARNING, PROBLEM
    message: str
    fix: str = ""

    def line(self) -> str:
        """One printable line: a message may quote a file, an agent's note or a server's words."""
        from baton.text import printable

        return printable(f"{self.status:<8} {self.check:<13} {self.message}"
                         + (f" -> fix: {self.fix}" if self.fix else ""))


@dataclass(frozen=True)
class Context:
    cfg: Config
    now: float
    cert_days: float
    unit_paths: tuple[Path, ...]


# ---- checks ------------------------------------------------------------------------------------------


def check_trusted_keys(ctx: Context) -> list[Finding]:
    from baton.signing import SignatureError, load_public_key

    keys = ctx.cfg.update.trusted_keys
    if not keys:
        return [Finding("trusted-keys", WARNING, "update.trusted_keys is empty: every update will be refused",
                        "add the release public key file (baton-package keygen -p FILE, or minisign -G) to "
                        "update.trusted_keys")]
    out = []
    for path in keys:
        try:
            key = load_public_key(path)
        except (SignatureError, OSError) as e:
            out.append(Finding("trusted-keys", PROBLEM, f"{path}: {e}",
                               f"restore {path} (the release public key: minisign's .pub file) or remove it "
                               "from update.trusted_keys"))
            continue
        out.append(Finding("trusted-keys", OK, f"{path}: key id {key.key_id_hex}"))
    return out


def directory_problem(path: Path, euid: int | None = None) -> tuple[str, str, str] | None:
    """(status, what is wrong, fix) for a directory Baton keeps state or code in, or None when it is safe.

    Safe: a real directory (not a symlink), owned by the user the supervisor runs as, not writable by
    group or others. (Kept as one function so the config's shared ownership rule can replace it.)
    """
    euid = os.geteuid() if euid is None else euid
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return WARNING, f"{path} does not exist", f"`supervisor run` creates it; or: install -d -m 700 {path}"
    if stat.S_ISLNK(st.st_mode):
        return PROBLEM, f"{path} is a symlink", f"replace the link with a real directory: rm {path} && " \
                                                 f"install -d -m 700 {path}"
    if not stat.S_ISDIR(st.st_mode):
        return PROBLEM, f"{path} is not a directory", f"move it away and create the directory: install -d {path}"
    if st.st_uid != euid:
        owner = _user_name(euid)
        return (PROBLEM, f"{path} is owned by {_user_name(st.st_uid)} (uid {st.st_uid}), not {owner}",
                f"chown {owner}: {path}")
    if st.st_mode & 0o022:
        return PROBLEM, f"{path} is writable by group or others (mode {st.st_mode & 0o777:o})", f"chmod go-w {path}"
    return None


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def check_trusted_paths(ctx: Context) -> list[Finding]:
    """The rule check-config, run and reload apply to every path root trusts (baton/strict_modes.py)."""
    from baton.strict_modes import UnsafePath, check_trusted, trusted_paths

    items = trusted_paths(ctx.cfg)
    out = []
    for item in items:
        try:
            check_trusted(item)
        except UnsafePath as e:
            at = e.at or item.path
            out.append(Finding("trusted-paths", PROBLEM, str(e), f"chown -h root: {at} && chmod go-w {at}"))
    return out or [Finding("trusted-paths", OK, f"{len(items)} files and directories root trusts: owned by root "
                                                "or our user, writable by nobody else")]


def check_directories(ctx: Context) -> list[Finding]:
    c = ctx.cfg
    dirs = {"state_dir": c.node.state_dir, "run dir": c.run_dir, "log dir": c.log_dir,
            "install_root": c.node.install_root, "download dir": c.download_dir}
    out = []
    seen: set[Path] = set()
    for name, path in dirs.items():
        if path in seen:
            continue
        seen.add(path)
        bad = directory_problem(path)
        if bad is None:
            mode = os.stat(path).st_mode & 0o777
            out.append(Finding("directories", OK, f"{name} {path}: owner {_user_name(os.geteuid())}, mode {mode:o}"))
        else:
            out.append(Finding("directories", bad[0], f"{name}: {bad[1]}", bad[2]))
    return out


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _gib(n: float) -> str:
    """A size for people: 77.8 GiB, 12.0 MiB, 3.2 KiB, 0 bytes."""
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} bytes"


def check_disk_space(ctx: Context) -> list[Finding]:
    from baton.journal import Journal

    c = ctx.cfg
    recent = Journal(c.node.state_dir).all()[-RECENT_UPDATES:]
    largest = max((r.request.size for r in recent), default=0)
    reserve = c.update.free_space_reserve_bytes
    out = []
    by_dev: dict[int, list[tuple[str, Path]]] = {}
    for name, path in (("download dir", c.download_dir), ("install_root", c.node.install_root)):
        p = _existing(path)
        by_dev.setdefault(os.stat(p).st_dev, []).append((name, p))
    for places in by_dev.values():
        what = " and ".join(f"{n} {p}" for n, p in places)
        vfs = os.statvfs(places[0][1])
        free = vfs.f_bavail * vfs.f_frsize
        if not largest:
            out.append(Finding("disk-space", OK, f"{what}: {_gib(free)} free (no recent package to compare with)"))
            continue
        need = largest * len(places) + reserve  # the download, then its unpacked copy (at least as large)
        msg = (f"{what}: {_gib(free)} free; the largest recent package ({_gib(largest)}) needs about {_gib(need)}"
               f" (update.free_space_reserve_bytes {_gib(reserve)} included)")
        fix = (f"free space on the filesystem of {places[0][1]}: remove old backups (helper --status lists them; "
               "lower update.max_backups) and leftovers in the download dir")
        if free < need:
            out.append(Finding("disk-space", PROBLEM, msg, fix))
        elif free < 2 * need:
            out.append(Finding("disk-space", WARNING, msg + ": less than twice that", fix))
        else:
            out.append(Finding("disk-space", OK, msg))
    return out


def check_layout(ctx: Context) -> list[Finding]:
    from baton.journal import Journal
    from baton.layout import MARKER, ComponentLayout

    c = ctx.cfg
    busy = {r.component for r in Journal(c.node.state_dir).unfinished()}
    comps = [a.name for a in c.agents if a.packaged] + [SUPERVISOR_COMPONENT]
    out = []
    for comp in comps:
        lay = ComponentLayout(c.node.install_root, comp)
        if not lay.versions_dir.is_dir():
            if comp == SUPERVISOR_COMPONENT:
                out.append(Finding("layout", OK, "supervisor: not installed in the versioned layout (self-updates "
                                                 "need `supervisor install-self`)"))
            else:
                out.append(Finding("layout", WARNING, f"{comp}: nothing installed under {lay.versions_dir}",
                                   f"push a first version of {comp}, or install one by hand "
                                   f"({guide('troubleshooting.md', 'doctor-layout')})"))
            continue
        cur = lay.current_version()
        installed = lay.installed_versions()
        if cur is None:
            out.append(Finding("layout", PROBLEM, f"{comp}: {lay.current_link} is missing",
                               f"point it at an installed version: ln -sfn versions/{installed[0]} "
                               f"{lay.current_link}" if installed else f"install a version of {comp}"))
        elif cur not in installed:
            out.append(Finding("layout", PROBLEM,
                               f"{comp}: current points at {cur}, which is not an installed version (no {MARKER})",
                               f"helper --rollback {comp} --config {c.source}" if installed
                               else f"push a version of {comp} again"))
        else:
            n = len(installed) - 1
            out.append(Finding("layout", OK, f"{comp}: current {cur}, {n} backup{'' if n == 1 else 's'}"))
        for d in sorted(lay.versions_dir.iterdir()):
            if d.name == cur or (not d.name.startswith(".") and (d / MARKER).is_file()):
                continue
            if comp in busy:
                out.append(Finding("layout", OK, f"{comp}: {d} belongs to the update in progress"))
                continue
            out.append(Finding("layout", WARNING, f"{comp}: stray {d} (a crashed update's staging or trash)",
                               f"rm -rf {d}"))
        backups = [v for v in installed if v != cur]
        if len(backups) > c.update.max_backups:
            extra = backups[c.update.max_backups:]
            out.append(Finding("layout", WARNING,
                               f"{comp}: {len(backups)} backups, more than update.max_backups "
                               f"({c.update.max_backups})",
                               " && ".join(f"rm -rf {lay.version_dir(v)}" for v in extra)))
    return out


def supervisor_socket(cfg: Config) -> Path:
    return cfg.grpc.unix_socket or cfg.control_socket


def _status(ctx: Context) -> Any:
    """The running supervisor's GetStatus (read-only, so not audited).

    Raises:
        CtlError: the socket's directory is one another user could change: whoever answers there may not be
            the supervisor, so it is not asked (see trusted-paths).
        grpc.RpcError: it does not answer.
    """
    from baton.serving import get_status
    from supervisor.cli.ctl import checked_socket

    path = checked_socket(supervisor_socket(ctx.cfg), "grpc.unix_socket" if ctx.cfg.grpc.unix_socket
                          else "node.state_dir")
    return get_status(path, PROBE_TIMEOUT_S)


def check_supervisor(ctx: Context) -> list[Finding]:
    import grpc

    path = supervisor_socket(ctx.cfg)
    fix = (f"start it: systemctl start {SERVICE} (or supervisor run --config {ctx.cfg.source}); "
           f"why it stopped: {ctx.cfg.log_dir / 'supervisor.log'}, journalctl -u {SERVICE}")
    if not path.is_socket():
        return [Finding("supervisor", PROBLEM, f"not running: no socket at {path}", fix)]
    from supervisor.cli.ctl import CtlError

    try:
        st = _status(ctx)
    except CtlError as e:
        return [Finding("supervisor", PROBLEM, str(e), f"move grpc.unix_socket to a directory only root can write "
                                                        f"(e.g. /run/baton), or: chmod go-w {path.parent}")]
    except grpc.RpcError as e:
        why = "nothing accepts connections (a stale socket)" if e.code() == grpc.StatusCode.UNAVAILABLE else \
            f"{e.code().name} {str(e.details())[:200]}"
        return [Finding("supervisor", PROBLEM, f"no answer on {path}: {why}", fix)]
    out = [Finding("supervisor", OK, f"pid {st.pid}, version {st.supervisor_version}, up {st.uptime_seconds:.0f}s,"
                                     f" {len(st.agents)} agents, answering on {path}")]
    if st.updates_refused:  # the agents run; only updates wait for the trust material
        out.append(Finding("supervisor", PROBLEM, f"every update is refused: {st.updates_refused}",
                           "fix the file it names (see trusted-keys and trusted-paths); no restart is needed"))
    return out


def check_agents(ctx: Context) -> list[Finding]:
    """FATAL agents and those not run for an invalid config section are problems, agents in BACKOFF
    (crash-looping) warnings; each with where to look."""
    import grpc

    from baton.pb import common_pb2
    from supervisor.cli.ctl import CtlError

    if not supervisor_socket(ctx.cfg).is_socket():
        return [Finding("agents", OK, "the supervisor is not running (see the supervisor check)")]
    try:
        st = _status(ctx)
    except (CtlError, grpc.RpcError):
        return [Finding("agents", OK, "not asked: the supervisor did not answer (see the supervisor check)")]
    out = []
    for a in st.agents:
        where = f"its log: supervisor tail {a.name} ({a.log_path})" if a.log_path else f"supervisor tail {a.name}"
        why = f": {a.last_error}" if a.last_error else ""
        if a.state == common_pb2.AGENT_STATE_CONFIG_ERROR:
            out.append(Finding("agents", PROBLEM, f"{a.name} is not run: its config section is invalid: {a.last_error}",
                               f"fix that key, then: supervisor check-config {ctx.cfg.source} && supervisor reload"))
        elif a.state == common_pb2.AGENT_STATE_FATAL:
            out.append(Finding("agents", PROBLEM, f"{a.name} is FATAL after {a.restarts} restarts{why}",
                               f"find the cause in {where}; fix it, then: supervisor start {a.name}"))
        elif a.state == common_pb2.AGENT_STATE_BACKOFF:
            out.append(Finding("agents", WARNING, f"{a.name} is crash-looping (BACKOFF, {a.restarts} restarts){why}",
                               f"find the cause in {where}"))
    running = sum(a.state == common_pb2.AGENT_STATE_RUNNING for a in st.agents)
    return out or [Finding("agents", OK, f"{running} of {len(st.agents)} agents running, none FATAL or "
                                         "crash-looping")]


def check_manager(ctx: Context) -> list[Finding]:
    m = ctx.cfg.manager
    if not m.address:
        return [Finding("manager", OK, "no Manager configured (manager.address is empty)")]
    host, _, port = m.address.rpartition(":")
    host = host.strip("[]")
    fix_net = (f"check manager.address ({m.address}), that `baton-manager serve` runs and listens there, "
               "and any firewall between; the Manager's log says why it stopped")
    try:
        sock = socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S)
    except (OSError, ValueError) as e:
        return [Finding("manager", PROBLEM, f"{m.address} is unreachable: {getattr(e, 'strerror', None) or e}",
                        fix_net)]
    with sock:
        if m.tls_ca is None:
            return [Finding("manager", WARNING, f"{m.address} reachable, without TLS: the node cannot tell the "
                                                "real Manager from an impostor",
                            f"set manager.tls_ca (and tls_cert, tls_key, server_name): {guide('manager.md')}")]
        name = m.server_name or host
        import ssl  # here: `supervisor run` imports this module for its parser, and loads no ssl (__main__.py)

        try:
            tls = ssl.create_default_context(cafile=str(m.tls_ca))
            tls.set_alpn_protocols(["h2"])
            if m.tls_cert is not None and m.tls_key is not None:
                tls.load_cert_chain(str(m.tls_cert), str(m.tls_key))
            sock.settimeout(PROBE_TIMEOUT_S)
            with tls.wrap_socket(sock, server_hostname=name) as s:
                peer = s.getpeercert() or {}
        except ssl.SSLCertVerificationError as e:
            return [Finding("manager", PROBLEM, f"{m.address}: the Manager's certificate does not validate for "
                                                f"{name!r} against {m.tls_ca}: {e.verify_message}",
                            "manager.tls_ca must be the CA that signed the Manager's certificate, and "
                            "manager.server_name a name in it")]
        except (ssl.SSLError, OSError) as e:
            return [Finding("manager", PROBLEM, f"{m.address}: TLS handshake failed: {e}",
                            "check that the Manager serves TLS (--tls-cert) and accepts this node's certificate "
                            "(same CA)")]
    names = [str(rdn[0][1]) for rdn in peer.get("subject", ()) if rdn and rdn[0][0] == "commonName"]
    return [Finding("manager", OK, f"{m.address} reachable; its certificate ({names[0] if names else '?'}) "
                                   f"validates for {name!r}")]


def check_certificates(ctx: Context) -> list[Finding]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from baton.tls_files import key_belongs_to

    c = ctx.cfg
    pairs = [("grpc.tls_cert", c.grpc.tls_cert, c.grpc.tls_key), ("grpc.tls_ca", c.grpc.tls_ca, None),
             ("manager.tls_cert", c.manager.tls_cert, c.manager.tls_key), ("manager.tls_ca", c.manager.tls_ca, None)]
    out = []
    for key_name, path, key_path in pairs:
        if path is None:
            continue
        renew = (f"issue a new certificate (your CA, or scripts/dev_ca.py for a development fleet), write it to "
                 f"{path} and run " + ("`supervisor reload`" if key_name.startswith("grpc.") else
                                       "`supervisor restart-daemon` (agents keep running)"))
        try:
            cert = x509.load_pem_x509_certificates(path.read_bytes())[0]
        except (OSError, ValueError) as e:
            out.append(Finding("certificates", PROBLEM, f"{key_name} {path}: not a PEM certificate: {e}", renew))
            continue
        left_days = (cert.not_valid_after_utc.timestamp() - ctx.now) / 86400
        what = f"{key_name} {path} ({cert.subject.rfc4514_string()})"
        if cert.not_valid_before_utc.timestamp() > ctx.now:
            out.append(Finding("certificates", PROBLEM, f"{what} is not valid before "
                                                        f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC",
                               "check the clock (see the clock check); else " + renew))
        elif left_days < 0:
            out.append(Finding("certificates", PROBLEM,
                               f"{what} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC", renew))
        elif left_days < ctx.cert_days:
            out.append(Finding("certificates", WARNING, f"{what} expires in {left_days:.1f} days "
                                                        f"({cert.not_valid_after_utc:%Y-%m-%d} UTC)", renew))
        else:
            out.append(Finding("certificates", OK, f"{what} valid for {left_days:.0f} more days"))
            if key_path is not None:
                try:
                    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
                    if not key_belongs_to(key, cert):
                        out.append(Finding("certificates", PROBLEM, f"{key_path} is not the key of {path}",
                                           f"install the key that belongs to {path}, or a new pair"))
                except (OSError, ValueError, TypeError) as e:
                    out.append(Finding("certificates", PROBLEM, f"{key_path}: unreadable private key: {e}",
                                       f"restore the key of {path} (PEM, unencrypted, mode 600)"))
    if not out:
        out.append(Finding("certificates", OK, "no TLS certificates configured"))
    return out


def build_time() -> float:
    """When this release was built: the newest modification time of its code (kept by install-self's copy)."""
    newest = 0.0
    for pkg in ("baton", "supervisor", "helper"):
        root = source_root() / pkg
        for p in root.rglob("*.py"):  # sub-packages too: the CLI is in supervisor/cli/
            newest = max(newest, p.stat().st_mtime)
    return newest


def last_recorded_time(cfg: Config) -> tuple[float, str]:
    """The latest time this host wrote down (update journals, the audit log), and where."""
    from baton.audit import AuditLog
    from baton.journal import Journal

    best = (0.0, "")
    for rec in Journal(cfg.node.state_dir).all()[-RECENT_UPDATES:]:
        if rec.updated_at > best[0]:
            best = (rec.updated_at, f"update {rec.update_id}'s journal")
    audit = AuditLog(cfg.node.state_dir)
    if audit.path.is_file():
        records = audit.read()
        if records and records[-1].time > best[0]:
            best = (records[-1].time, f"the audit log {audit.path}")
    return best


def check_clock(ctx: Context) -> list[Finding]:
    """Off in either direction: before this release's build or a time this host recorded (back), or moved away
    from the time since boot since the supervisor's record, or from the Manager's time (ahead or back)."""
    from baton.audit import format_time
    from supervisor.clock import CLOCK_TOLERANCE_S, clock_path, describe_jump, load_record, read_clock

    fix = "set the clock: timedatectl set-ntp true (or chronyc makestep); then run doctor again"
    built = build_time()
    if ctx.now < built - CLOCK_TOLERANCE_S:
        return [Finding("clock", PROBLEM, f"the clock reads {format_time(ctx.now)}, before this release was built "
                                          f"({format_time(built)}): TLS and signature expiry checks will fail", fix)]
    last, where = last_recorded_time(ctx.cfg)
    if last > ctx.now + CLOCK_TOLERANCE_S:
        return [Finding("clock", PROBLEM, f"the clock reads {format_time(ctx.now)}, {(last - ctx.now) / 60:.0f} "
                                          f"minutes before a time this host recorded in {where} "
                                          f"({format_time(last)}): it jumped back", fix)]
    out = []
    record = load_record(ctx.cfg.node.state_dir)
    jump = read_clock(ctx.now).jumped(record) if record is not None else None
    if record is not None and jump is not None:
        out.append(Finding("clock", PROBLEM, f"the clock reads {format_time(ctx.now)}: it jumped "
                                             f"{describe_jump(jump)} against the time since boot since the "
                                             f"supervisor recorded {format_time(record.wall)} in "
                                             f"{clock_path(ctx.cfg.node.state_dir)}", fix))
    offset, measured_at = _manager_clock(ctx)
    if measured_at and abs(offset) > CLOCK_TOLERANCE_S:
        out.append(Finding("clock", PROBLEM, f"the clock is {describe_jump(-offset)} of the Manager's (the "
                                             f"supervisor measured it at {format_time(measured_at)})",
                           fix + " (if the Manager's clock is the wrong one, set that one)"))
    against = ", the time since boot" if record is not None else ""
    against += ", the Manager's" if measured_at else ""
    return out or [Finding("clock", OK, f"{format_time(ctx.now)}, after this release's build and every recorded "
                                        f"time{against and ', and in step with' + against[1:]}")]


def _manager_clock(ctx: Context) -> tuple[float, float]:
    """The Manager's clock minus this host's and when the supervisor measured it; (0, 0) when it has not or
    does not answer (the supervisor check says why)."""
    import grpc

    from supervisor.cli.ctl import CtlError

    if not ctx.cfg.manager.address or not supervisor_socket(ctx.cfg).is_socket():
        return 0.0, 0.0
    try:
        st = _status(ctx)
    except (CtlError, grpc.RpcError):
        return 0.0, 0.0
    return st.manager_clock_offset_s, st.manager_clock_measured_at


def shipped_unit() -> Path | None:
    """The unit shipped with this code: in a checkout, or inside an installed version (``share/systemd/``)."""
    here = source_root()  # the checkout, or a version's lib/
    for p in (here / UNIT_IN_CHECKOUT, here.parent / UNIT_IN_VERSION):
        if p.is_file():
            return p
    return None


def parse_unit(text: str) -> dict[tuple[str, str], str]:
    """(section, key) -> value; a repeated key keeps its last value, as systemd does for most settings."""
    out: dict[tuple[str, str], str] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif "=" in line:
            k, v = line.split("=", 1)
            out[(section, k.strip())] = v.strip()
    return out


def check_systemd_unit(ctx: Context) -> list[Finding]:
    installed = next((p for p in ctx.unit_paths if p.is_file()), None)
    if installed is None:
        return [Finding("systemd-unit", OK, f"no {SERVICE_UNIT} installed (not run by systemd)")]
    ship = shipped_unit()
    if ship is None:
        return [Finding("systemd-unit", WARNING, f"{installed} is installed but this release has no shipped unit "
                                                 "to compare it with", "")]
    have, want = parse_unit(installed.read_text()), parse_unit(ship.read_text())
    fix = (f"copy {ship} to {installed} (keep your ExecStart=, ExecReload= and Environment= lines), then systemctl "
           f"daemon-reload && systemctl restart {SERVICE}")
    out = []
    for (section, key), value in want.items():
        if key in UNIT_SITE_SPECIFIC or section == "Install":
            continue
        got = have.get((section, key))
        if got != value:
            status = PROBLEM if key in UNIT_CRITICAL else WARNING
            out.append(Finding("systemd-unit", status, f"{installed}: [{section}] {key}={got or '(unset)'}, "
                                                        f"shipped {key}={value}", fix))
    exec_start = have.get(("Service", "ExecStart"), "")
    launcher = str(ctx.cfg.node.install_root / SUPERVISOR_COMPONENT / "current" / "bin" / "supervisor")
    if launcher not in exec_start.split():
        out.append(Finding("systemd-unit", WARNING, f"{installed}: ExecStart does not run {launcher}, so a "
                                                    "self-update cannot replace the running version",
                           f"ExecStart={launcher} run --config {ctx.cfg.source}"))
    return out or [Finding("systemd-unit", OK, f"{installed} matches {ship}")]


CHECKS: tuple[tuple[str, Callable[[Context], list[Finding]]], ...] = (
    ("trusted-keys", check_trusted_keys),
    ("trusted-paths", check_trusted_paths),
    ("directories", check_directories),
    ("disk-space", check_disk_space),
    ("layout", check_layout),
    ("supervisor", check_supervisor),
    ("agents", check_agents),
    ("manager", check_manager),
    ("certificates", check_certificates),
    ("clock", check_clock),
    ("systemd-unit", check_systemd_unit),
)


WITHOUT_CONFIG = ("supervisor", "agents")  # the checks that need only where the supervisor is (where_it_runs)


def run_checks(config: Path, *, now: float | None = None, cert_days: float = CERT_WARN_DAYS,
               unit_paths: Iterable[Path] = UNIT_PATHS) -> list[Finding]:
    """Every finding, config first; with a config that does not load, the running supervisor's only."""
    checks = CHECKS
    try:
        cfg = load_config(config, host_checks=False)  # each host check below is one finding with its fix
        out = [Finding("config", OK, f"{config} validates (node {cfg.node.id}, {len(cfg.agents)} agents)")]
    except ConfigError as e:
        # The running supervisor is still asked, where the file says it is (its agents keep running meanwhile).
        cfg = where_it_runs(config)
        checks = tuple((name, check) for name, check in CHECKS if name in WITHOUT_CONFIG)
        out = [Finding("config", PROBLEM, str(e), f"correct it, then: supervisor check-config {config}")]
    ctx = Context(cfg, time.time() if now is None else now, cert_days, tuple(unit_paths))
    for name, check in checks:
        try:
            out += check(ctx)
        except Exception as e:  # a check that breaks must not hide the others
            out.append(Finding(name, PROBLEM, f"the check itself failed: {type(e).__name__}: {e}",
                               "report this with the output of supervisor doctor --json"))
    return out


def exit_status(findings: list[Finding]) -> int:
    return max((_RANK[f.status] for f in findings), default=0)


def cmd_doctor(ns: argparse.Namespace) -> int:
    unit_paths = [Path(ns.systemd_unit)] if ns.systemd_unit else UNIT_PATHS
    findings = run_checks(Path(ns.config), cert_days=ns.cert_days, unit_paths=unit_paths)
    status = exit_status(findings)
    if ns.json:
        print(json.dumps({"exit": status, "checks": [asdict(f) for f in findings]}, indent=1))
    else:
        for f in findings:
            print(f.line())
        summary = {0: "all ok", 1: "warnings", 2: "problems"}[status]
        print(f"{summary}; each check is explained in {guide('troubleshooting.md', 'doctor-checks')}")
    return status


def add_parser(sub: Any) -> None:
    d = sub.add_parser("doctor", help="check this host: config, keys, directories, disk, layout, supervisor, "
                                      "agents, Manager, certificates, clock, systemd unit")
    d.add_argument("--config", "-c", default=str(DEFAULT_CONFIG))
    d.add_argument("--json", action="store_true", help="one JSON document: every finding and the exit status")
    d.add_argument("--cert-days", type=float, default=CERT_WARN_DAYS,
                   help=f"warn about certificates expiring within this many days (default {CERT_WARN_DAYS})")
    d.add_argument("--systemd-unit", help=f"the installed unit file to compare (default: {UNIT_PATHS[0]} and the "
                                          "other systemd unit directories)")
    d.set_defaults(fn=cmd_doctor)

