"""The supervisor's configuration: a TOML file merged over defaults.

The file is validated into frozen dataclasses. Every problem is reported as one
:class:`ConfigError` naming the key (``agents[1].name``) and what is wrong, so
``supervisor check-config`` and ``supervisor run`` print one clear line and
exit 2 without starting anything. Limits carry their unit in their names.
"""

from __future__ import annotations

import contextvars
import dataclasses
import grp
import ipaddress
import math
import os
import re
import signal
import tomllib
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from baton.errors import KeyedError
from baton.limits import BadLimit, Limits, limits_of
from baton.log import LEVELS
from baton.start_order import Ordered

ENV_OVERRIDES = {
    "BATON_NODE_ID": ("node", "id"),
    "BATON_GRPC_LISTEN": ("grpc", "listen"),
    "BATON_GRPC_UNIX_SOCKET": ("grpc", "unix_socket"),
}
RESTART_POLICIES = ("always", "on-failure", "never")
SUPERVISOR_COMPONENT = "supervisor"
MAX_DURATION_S = 366 * 24 * 3600.0  # every ``*_s`` value: finite, 0 or more and at most a year
# every Baton HTTP endpoint's bounds on a connection (baton.bounded_http.HttpLimits), here for [metrics] to name
HTTP_HEAD_TIMEOUT_S = 10.0
HTTP_IDLE_TIMEOUT_S = 10.0
LOOPBACK_NAMES = ("localhost",)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_LABEL_VALUE_RE = re.compile(r"^[A-Za-z0-9_.-]{0,64}$")


STDERR_MODES = ("merged", "separate")
# Who may send on a notify agent's socket: its main process only, or any process of its process group (as
# systemd's NotifyAccess=main and, for the processes an agent starts itself, exec/all).
NOTIFY_ACCESS = ("main", "group")
# The longest path a Unix socket binds to: sun_path holds 108 bytes with the NUL. A longer socket path fails only
# when bound, so check-config refuses it, naming the key whose path is too long.
UNIX_PATH_MAX = 107
# The longest name the supervisor binds in its run directory: local-<pid>.sock, a pid up to pid_max (2**22).
_LONGEST_RUN_SOCKET = "local-4194304.sock"
NOTIFY_DIR_NAME = ".notify"  # under install_root; no component can be named so (names start with a letter or digit)
# The directory that relative paths in the file being read resolve against (None: relative paths refused).
_BASE_DIR: contextvars.ContextVar[Path | None] = contextvars.ContextVar("baton_config_base_dir", default=None)


def signal_number(name: str) -> int:
    """``TERM``, ``SIGTERM`` or ``term`` -> 15; KeyError for an unknown name."""
    return int(signal.Signals["SIG" + name.strip().upper().removeprefix("SIG")])


class ConfigError(KeyedError):
    """A config value that is refused, naming its key."""


@dataclass(frozen=True)
class NodeConfig:
    id: str = ""
    state_dir: Path = Path("/var/lib/baton")
    install_root: Path = Path("/opt/baton")
    labels: Mapping[str, str] = field(default_factory=dict)  # sent at registration; rollouts select by them


@dataclass(frozen=True)
class GrpcConfig:
    listen: tuple[str, ...] = ()
    unix_socket: Path | None = None
    unix_socket_group: str = ""
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    allowed_clients: tuple[str, ...] = ()
    # Plain TCP (no tls_*) only with this opt-in, only on loopback, and read-only (supervisor/authz.py).
    insecure_tcp: bool = False
    # Operator powers (PushUpdate's allow_downgrade and force): TLS identities, and local Unix-socket peer uids.
    allow_downgrade_clients: tuple[str, ...] = ()
    allow_downgrade_uids: tuple[int, ...] = (0,)
    # Audit read-only calls (GetStatus, ListAgents, WatchAgent...) too: each is then an fsynced record.
    audit_read_calls: bool = False

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def push_address(self) -> str:
        """Where the Manager may push: a TLS listener, else the Unix socket (plain TCP is read-only)."""
        if self.listen and self.tls:
            return self.listen[0]
        if self.unix_socket is not None:
            return f"unix:{self.unix_socket}"
        return self.listen[0] if self.listen else ""


@dataclass(frozen=True)
class ManagerConfig:
    address: str = ""  # one HOST:PORT, or several replicas: a list or "A:1,B:2" (kept comma-joined)
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    server_name: str = ""
    heartbeat_interval_s: float = 10.0
    sync_interval_s: float = 30.0
    retry_initial_s: float = 0.5
    retry_max_s: float = 30.0
    rpc_timeout_s: float = 5.0

    @property
    def addresses(self) -> tuple[str, ...]:
        """The Manager replicas, in the order the supervisor tries them."""
        return tuple(a.strip() for a in self.address.split(",") if a.strip())


@dataclass(frozen=True)
class UpdateConfig:
    download_dir: Path | None = None
    max_backups: int = 2
    verify_timeout_s: float = 120.0
    download_timeout_s: float = 900.0
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0
    min_rate_bytes_per_s: int = 1024
    min_rate_window_s: float = 30.0
    free_space_reserve_bytes: int = 64 * 1024 * 1024
    max_package_bytes: int = 2 * 1024**3
    max_files: int = 100_000
    max_unpacked_bytes: int = 8 * 1024**3
    trusted_keys: tuple[Path, ...] = ()
    health_timeout_s: float = 30.0
    health_window_s: float = 5.0
    handshake_timeout_s: float = 60.0
    file_url_root: Path | None = None  # file:// download URLs are refused unless they name a file beneath it
    keep_updates: int = 100  # final update records kept in the journal (newest first), once reported
    keep_updates_days: float = 30.0  # and none older than this, once reported
    standby_helper: bool = True  # keep a helper started and loaded for the next update (baton/standby.py)


@dataclass(frozen=True)
class LogConfig:
    dir: Path | None = None
    json: bool = False
    level: str = "INFO"


@dataclass(frozen=True)
class MetricsConfig:
    """The optional Prometheus endpoint (off unless ``listen`` is set; loopback unless ``allow_remote``)."""

    listen: str = ""  # HOST:PORT, e.g. "127.0.0.1:9464"
    allow_remote: bool = False
    http_head_timeout_s: float = HTTP_HEAD_TIMEOUT_S  # a scraper's time to send its request head
    http_idle_timeout_s: float = HTTP_IDLE_TIMEOUT_S  # a response write that moves no byte this long ends it

    @property
    def address(self) -> tuple[str, int] | None:
        return parse_metrics_listen(self.listen, self.allow_remote, "metrics.listen") if self.listen else None


def parse_metrics_listen(listen: str, allow_remote: bool, key: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) as (host, port); a non-loopback host only with ``allow_remote``.

    The metrics endpoint has no authentication, so by default only this host may read it.
    """
    import ipaddress

    host, sep, port = listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(key, f"{listen!r} is not HOST:PORT (e.g. 127.0.0.1:9464)")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        raise ConfigError(key, f"{host!r} is not an IP address (use 127.0.0.1 or ::1)") from None
    if not loopback and not allow_remote:
        raise ConfigError(key, f"{host} is not a loopback address; the endpoint has no authentication, so set "
                               "metrics.allow_remote = true to expose it beyond this host")
    return host, int(port)


@dataclass(frozen=True)
class AgentConfig:
    name: str
    command: str
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    env_file: Path | None = None  # KEY=VALUE lines (baton/env_file.py), over `env`; read at every start
    working_dir: Path | None = None
    packaged: bool = False
    stop_signal: str = "TERM"
    stop_timeout_s: float = 10.0
    restart: str = "on-failure"
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 30.0
    start_seconds: float = 1.0
    start_retries: int = 5
    notify: bool = False
    notify_access: str = "main"   # "main": only the agent's own pid may notify; "group": its process group too
    autostart: bool = True
    log_max_bytes: int = 10 * 1024 * 1024
    log_backups: int = 3
    log_timestamps: bool = False  # each output line starts with the UTC time it was read (baton/log_stamps.py)
    user: str = ""                # run as this user (its primary group unless `group`); "" = as the supervisor
    group: str = ""               # only with `user`: alone it would leave the agent root
    umask: str = ""               # octal, e.g. "027"; "" = the supervisor's
    stderr: str = "merged"        # "merged" into the output log, or "separate" (<log_dir>/<name>.stderr.log)
    # Resource limits (baton/limits.py; 0 or "": none): a cgroup of the agent's own, and RLIMIT_NOFILE.
    memory_max: str = ""          # "512M", "1G": the kernel kills the agent past it (an OOM kill)
    tasks_max: int = 0            # processes and threads: a fork past it fails
    cpu_weight: int = 0           # 1..10000, relative to 100 (systemd's CPUWeight=)
    cpu_quota: str = ""           # "50%" of one CPU, "200%" for two (systemd's CPUQuota=)
    open_files: int = 0           # RLIMIT_NOFILE (systemd's LimitNOFILE=)
    priority: int = 0             # start order: lower first (baton/start_order.py); stop in reverse
    after: tuple[str, ...] = ()   # agents started before this one (each has left "starting" first)

    @property
    def stop_signum(self) -> int:
        return signal_number(self.stop_signal)

    @property
    def umask_value(self) -> int | None:
        return int(self.umask, 8) if self.umask else None

    def limits(self, prefix: str = "") -> Limits:
        """The parsed resource limits; BadLimit naming ``prefix.key`` (checked at load, so only a bug raises)."""
        return limits_of(self.memory_max, self.tasks_max, self.cpu_weight, self.cpu_quota, self.open_files,
                         prefix or f"agent {self.name}")


@dataclass(frozen=True)
class BrokenAgent:
    """An agent whose own section is invalid: not run (state ``config_error``), the other agents are."""

    name: str
    key: str      # the key at fault, as in the file: agents[2].command
    problem: str  # what is wrong with it

    @property
    def error(self) -> str:
        return f"{self.key}: {self.problem}"


@dataclass(frozen=True)
class Config:
    node: NodeConfig = field(default_factory=NodeConfig)
    grpc: GrpcConfig = field(default_factory=GrpcConfig)
    manager: ManagerConfig = field(default_factory=ManagerConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)
    log: LogConfig = field(default_factory=LogConfig)
    agents: tuple[AgentConfig, ...] = ()
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    source: Path | None = None
    broken_agents: tuple[BrokenAgent, ...] = ()  # only with load_config(..., degrade=True)

    @property
    def download_dir(self) -> Path:
        return self.update.download_dir or self.node.state_dir / "downloads"

    @property
    def log_dir(self) -> Path:
        return self.log.dir or self.node.state_dir / "logs"

    @property
    def run_dir(self) -> Path:
        return self.node.state_dir / "run"

    @property
    def notify_dir(self) -> Path:
        """Where notify agents' sockets live, one directory each: not in the 0700 state directory, which an agent
        run as another user would need the search bit on; the install root must be reachable by such agents
        anyway (their code is there)."""
        return self.node.install_root / NOTIFY_DIR_NAME

    def notify_socket(self, name: str) -> Path:
        """Where a process of agent ``name`` started now is told to notify: a directory of its own."""
        return self.notify_dir / name / "notify.sock"

    @property
    def control_socket(self) -> Path:
        """The private gRPC socket: helpers' fallback, the local CLI's default, the handover's own checks."""
        return self.run_dir / "control.sock"

    def ordered_agents(self) -> list[Ordered]:
        return [Ordered(a.name, a.priority, a.after) for a in self.agents]

    def agent(self, name: str) -> AgentConfig | None:
        return next((a for a in self.agents if a.name == name), None)


def load_config(path: Path, environ: Mapping[str, str] | None = None, *, host_checks: bool = True,
                degrade: bool = False) -> Config:
    """Read, merge over defaults, apply environment overrides, validate.

    ``host_checks=False`` checks the values only and skips what depends on the host: reading the trusted keys
    and TLS files, resolving the socket group and judging directory owners and modes. For the helper, which
    reads the keys itself when it verifies and guards its own download file (so a key removed or a directory
    changed since the supervisor started is a clean failure of that update rather than a helper that cannot
    start), and for ``supervisor doctor``, which judges each of those itself and prints the fix.

    ``degrade=True`` is for ``supervisor run`` and a reload, where a problem that refuses only a risky action
    does not refuse the file: ``update.trusted_keys`` is left unjudged (:func:`trusted_keys_problem`: it refuses
    updates), and an agent whose own section is invalid is set apart in ``broken_agents`` (it is not run, the
    others are). A problem anywhere else, or in an agent's ``name``, still raises.
    """
    path = Path(path).absolute()
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError("", f"config file {path} not found") from None
    except OSError as e:
        raise ConfigError("", f"cannot read config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("", f"{path} is not valid TOML: {e}") from None
    return config_from_dict(raw, environ=os.environ if environ is None else environ, source=path.resolve(),
                            host_checks=host_checks, degrade=degrade)


def where_it_runs(path: Path, environ: Mapping[str, str] | None = None) -> Config:
    """``node.state_dir`` and ``grpc.unix_socket`` of a config file that does not load, from what of it can be read.

    For the read-only commands (``status``, ``tail``, ``audit``, ``doctor``), which must still reach the running
    supervisor while the file is being fixed. Each ``[table]`` of the file is parsed on its own, so a TOML error
    or a bad value elsewhere leaves these two readable; what cannot be read takes its default (and the
    environment's ``BATON_GRPC_UNIX_SOCKET`` wins, as at a start). Nothing else of the result is validated: it
    only says where to look, and the socket's directory is still judged before it is asked
    (``supervisor/cli/ctl.py``, ``checked_socket``).
    """
    path = Path(path).absolute()
    environ = os.environ if environ is None else environ
    try:
        text = path.read_text(errors="replace")
    except OSError:
        text = ""
    tables: dict[str, Any] = {}
    for chunk in re.split(r"(?m)^(?=\s*\[)", text):
        try:
            for name, body in tomllib.loads(chunk).items():
                if isinstance(body, Mapping):
                    tables.setdefault(name, {}).update(body)
        except tomllib.TOMLDecodeError:
            continue  # the broken table; the others still say where things are

    def path_of(section: str, key: str, default: Path | None) -> Path | None:
        value = environ.get("BATON_GRPC_UNIX_SOCKET") if (section, key) == ("grpc", "unix_socket") else None
        value = value or tables.get(section, {}).get(key)
        token = _BASE_DIR.set(path.parent)
        try:
            return _convert(Path, value, f"{section}.{key}") if value else default
        except ConfigError:
            return default
        finally:
            _BASE_DIR.reset(token)

    return Config(node=NodeConfig(state_dir=path_of("node", "state_dir", NodeConfig.state_dir) or NodeConfig.state_dir),
                  grpc=GrpcConfig(unix_socket=path_of("grpc", "unix_socket", None)), source=path)


def config_from_dict(
    raw: Mapping[str, Any], environ: Mapping[str, str] | None = None, source: Path | None = None,
    host_checks: bool = True, degrade: bool = False,
) -> Config:
    raw = {k: dict(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
    for var, (section, key) in ENV_OVERRIDES.items():
        if environ and environ.get(var):
            value: Any = environ[var]
            if key == "listen":
                value = [a.strip() for a in value.split(",") if a.strip()]
            sect = raw.setdefault(section, {})
            if not isinstance(sect, dict):
                raise ConfigError(section, "must be a table")
            sect[key] = value
    manager_raw = raw.get("manager")
    if isinstance(manager_raw, dict) and isinstance(manager_raw.get("address"), list):
        for i, a in enumerate(manager_raw["address"]):
            if not isinstance(a, str) or not a or "," in a:
                raise ConfigError(f"manager.address[{i}]", f"must be one HOST:PORT string, got {a!r}")
        manager_raw["address"] = ",".join(manager_raw["address"])
    known = {"node", "grpc", "manager", "update", "log", "agents", "metrics"}
    for k in raw:
        if k not in known:
            raise ConfigError(k, _unknown(k, known, "section"))
    agents_raw = raw.get("agents", [])
    if not isinstance(agents_raw, list):
        raise ConfigError("agents", "must be an array of tables ([[agents]])")
    if degrade:
        return _without_broken_agents(raw, agents_raw, source, host_checks)
    return _checked(raw, agents_raw, source, host_checks, keys=True)


def _checked(raw: Mapping[str, Any], agents_raw: list[Any], source: Path | None, host_checks: bool, keys: bool
             ) -> Config:
    token = _BASE_DIR.set(source.parent if source is not None else None)
    try:
        cfg = _build_config(raw, agents_raw, source)
    finally:
        _BASE_DIR.reset(token)
    _validate(cfg, host_checks, keys)
    return cfg


_AGENT_KEY = re.compile(r"^agents\[(\d+)\](\.[^.]+)?")


def _without_broken_agents(raw: Mapping[str, Any], agents_raw: list[Any], source: Path | None, host_checks: bool
                           ) -> Config:
    """The config with each agent whose own section is invalid set apart in ``broken_agents``, keys as in the file.

    Validated again without each broken agent until it passes, so every problem is the one strict validation
    reports. An agent that cannot be named (a bad, missing or duplicate ``name``, or not a table) cannot be set
    apart: that, and any problem outside ``[[agents]]``, raises as strict validation does.
    """
    kept = list(enumerate(agents_raw))  # (index in the file, section)
    broken: list[BrokenAgent] = []
    while True:
        try:
            cfg = _checked(raw, [a for _, a in kept], source, host_checks, keys=False)
            return dataclasses.replace(cfg, broken_agents=tuple(broken))
        except ConfigError as e:
            m = _AGENT_KEY.match(e.key)
            if m is None:
                raise
            j = int(m.group(1))
            index, section = kept[j]
            key = f"agents[{index}]{e.key[m.end(1) + 1:]}"
            name = section.get("name") if isinstance(section, Mapping) else None
            others = [a.get("name") for i, a in kept if i != index and isinstance(a, Mapping)]
            if (m.group(2) == ".name" or not isinstance(name, str) or not _NAME_RE.match(name)
                    or name == SUPERVISOR_COMPONENT or name in others or name in {b.name for b in broken}):
                raise ConfigError(key, e.problem) from None
            broken.append(BrokenAgent(name, key, e.problem))
            del kept[j]
            kept = [(i, _not_after(a, name)) for i, a in kept]


def _not_after(section: Any, name: str) -> Any:
    """``section`` without ``name`` in its ``after``: an agent set apart never starts, so it orders nothing (the
    section that named it starts as if it had not, rather than being set apart for naming it)."""
    after = section.get("after") if isinstance(section, Mapping) else None
    if not isinstance(after, list) or name not in after:
        return section
    return {**section, "after": [n for n in after if n != name]}


def _build_config(raw: Mapping[str, Any], agents_raw: list[Any], source: Path | None) -> Config:
    base = _BASE_DIR.get()
    agents = tuple(_build(AgentConfig, a, f"agents[{i}]") for i, a in enumerate(agents_raw))
    if base is not None:  # an unpackaged command written relative (bin/web, ./web) is relative to the file too
        agents = tuple(dataclasses.replace(a, command=str(base / a.command))
                       if not a.packaged and "/" in a.command and not Path(a.command).is_absolute() else a
                       for a in agents)
    return Config(
        node=_build(NodeConfig, raw.get("node", {}), "node"),
        grpc=_build(GrpcConfig, raw.get("grpc", {}), "grpc"),
        manager=_build(ManagerConfig, raw.get("manager", {}), "manager"),
        update=_build(UpdateConfig, raw.get("update", {}), "update"),
        log=_build(LogConfig, raw.get("log", {}), "log"),
        agents=agents,
        source=source,
        metrics=_build(MetricsConfig, raw.get("metrics", {}), "metrics"),
    )


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(prefix, "must be a table")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            raise ConfigError(f"{prefix}.{k}", _unknown(k, names, "key"))
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}"
        if f.name in data:
            kwargs[f.name] = _convert(hints[f.name], data[f.name], key)
            if hints[f.name] is float and f.name.endswith("_s") and not 0 <= kwargs[f.name] <= MAX_DURATION_S:
                raise ConfigError(key, f"must be between 0 and {MAX_DURATION_S:.0f} seconds, got {data[f.name]!r}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(key, "is required")
    return cls(**kwargs)


def _unknown(name: str, known: set[str], what: str) -> str:
    """'unknown key (did you mean restart?)', or the known names when nothing is close."""
    import difflib

    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    if close:
        return f"unknown {what} (did you mean {close[0]}?)"
    return f"unknown {what} (known: {', '.join(sorted(known))})"


def _type_name(tp: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false", Path: "a path"}.get(
        tp, str(tp)
    )


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        inner = next(a for a in get_args(tp) if a is not type(None))
        if value == "":
            return None
        return _convert(inner, value, key)
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(key, f"must be a list, got {type(value).__name__}")
        inner = get_args(tp)[0]
        return tuple(_convert(inner, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is Mapping:
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"must be a table, got {type(value).__name__}")
        for k in value:
            if not k or "=" in k or "\0" in k:
                raise ConfigError(f"{key}.{k}".replace("\0", "\\0"),
                                  "is not a valid name (empty, or contains '=' or a NUL character)")
        return {str(k): _convert(str, v, f"{key}.{k}") for k, v in value.items()}
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(key, "must be a non-empty path string")
        if "\0" in value:
            raise ConfigError(key, "must not contain a NUL character")
        p = Path(value)
        if not p.is_absolute():
            base = _BASE_DIR.get()
            if base is None:
                raise ConfigError(key, f"must be an absolute path, got {value!r}")
            p = Path(os.path.normpath(base / p))
        return p
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, f"must be a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):
            raise ConfigError(key, f"must be a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string, got {type(value).__name__} {value!r}")
        if "\0" in value:
            raise ConfigError(key, "must not contain a NUL character")
        return value
    raise RuntimeError(f"unsupported config type {tp} for {key}")


def _require_file(path: Path | None, key: str, marker: bytes = b"", read: bool = True) -> None:
    """The file exists, is a regular file and (``read``) can be read and holds the PEM ``marker``."""
    if path is None:
        return
    if not path.is_file():
        raise ConfigError(key, f"file {path} not found" if not path.exists() else f"{path} is not a regular file")
    if not read:
        return
    try:
        with open(path, "rb") as f:
            head = f.read(1024 * 1024)
    except OSError as e:
        raise ConfigError(key, f"cannot read {path}: {e.strerror}") from None
    if marker and marker not in head:
        raise ConfigError(key, f"{path} holds no {marker.decode().strip('-')} (PEM)")


def _require_tls_pair(section: str, cert: Path | None, key: Path | None, ca: Path | None) -> None:
    """A certificate and key that load and belong together (a mismatch would only show at the first handshake)."""
    if cert is None or key is None:
        return
    from baton.tls_files import TlsFilesError, read_tls_files

    try:
        read_tls_files(section, cert, key, ca)
    except TlsFilesError as e:
        raise ConfigError(e.key, e.problem) from None


def _split_address(addr: str, key: str) -> tuple[str, int]:
    """HOST:PORT (``[v6]:PORT``) with a port from 1 to 65535."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(key, f"{addr!r} is not HOST:PORT")
    if not 1 <= int(port) <= 65535:
        raise ConfigError(key, f"port {port} is out of range (1-65535)")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _validate_grpc(g: GrpcConfig, host_checks: bool = True) -> None:
    """TCP needs mutual TLS, or the explicit loopback-only ``insecure_tcp`` opt-in (read-only RPCs)."""
    from baton.identity import AllowListError, parse_allow_list

    if not g.listen and g.unix_socket is None:
        raise ConfigError("grpc", "set listen and/or unix_socket: the supervisor must be reachable")
    tls_parts = (g.tls_cert, g.tls_key, g.tls_ca)
    if any(tls_parts) and not all(tls_parts):
        raise ConfigError("grpc.tls_cert", "tls_cert, tls_key and tls_ca must be set together")
    for i, addr in enumerate(g.listen):
        key = f"grpc.listen[{i}]"
        host, _ = _split_address(addr, key)
        if g.tls:
            continue
        if not g.insecure_tcp:
            raise ConfigError(key, f"{addr} would serve TCP without TLS: set grpc.tls_cert, tls_key and tls_ca "
                              "(or grpc.insecure_tcp = true for read-only access on a loopback address)")
        if not is_loopback(host):
            raise ConfigError(key, f"{addr} is not a loopback address (127.0.0.0/8, ::1, localhost): "
                              "grpc.insecure_tcp is only allowed on loopback")
    if g.insecure_tcp and g.tls:
        raise ConfigError("grpc.insecure_tcp", "must not be set with TLS (it is for listeners without TLS)")
    for name, marker in (("tls_cert", b"-----BEGIN CERTIFICATE-----"), ("tls_key", b"PRIVATE KEY-----"),
                         ("tls_ca", b"-----BEGIN CERTIFICATE-----")):
        _require_file(getattr(g, name), f"grpc.{name}", marker, host_checks)
    for name in ("allowed_clients", "allow_downgrade_clients"):
        entries = getattr(g, name)
        if entries and not g.tls:
            raise ConfigError(f"grpc.{name}", "names TLS client identities: it needs grpc.tls_cert, tls_key and "
                              "tls_ca")
        try:
            parse_allow_list(entries, key=f"grpc.{name}")
        except AllowListError as e:
            raise ConfigError(f"grpc.{name}", str(e).removeprefix(f"grpc.{name}: ")) from None
    for i, uid in enumerate(g.allow_downgrade_uids):
        if not 0 <= uid < 2**32 - 1:
            raise ConfigError(f"grpc.allow_downgrade_uids[{i}]", f"{uid} is not a uid")
    if g.unix_socket_group and host_checks:
        try:
            grp.getgrnam(g.unix_socket_group)
        except KeyError:
            raise ConfigError("grpc.unix_socket_group", f"no such group {g.unix_socket_group!r}") from None


def trusted_keys_problem(cfg: Config) -> ConfigError | None:
    """What makes ``update.trusted_keys`` unusable now, naming the entry (None: every key is safe and loads).

    A key another user could replace (``baton/strict_modes.py``, judged before a byte of it is read), a missing
    or unreadable file, or one that is not a minisign public key. Broken trust material refuses updates only:
    ``supervisor run`` and a reload keep supervising the agents with it (``load_config(..., degrade=True)``) and
    report it; the push and the helper refuse every update while it lasts; ``check-config`` refuses the file.
    An empty list is not a problem here: the helper refuses every update then (NoTrustedKeys) and doctor warns.
    """
    if not cfg.update.trusted_keys:
        return None  # baton.signing is not imported for nothing: it would stay resident in the supervisor
    from baton.signing import KeyFormatError, load_public_key
    from baton.strict_modes import UnsafePath, check_trusted, trusted_key_files

    for item in trusted_key_files(cfg):
        try:
            check_trusted(item)
        except UnsafePath as e:
            return ConfigError(item.key, e.problem)
        path = item.path
        if not path.is_file():
            return ConfigError(item.key, f"file {path} not found" if not path.exists() else
                               f"{path} is not a regular file")
        try:
            load_public_key(path)
        except OSError as e:
            return ConfigError(item.key, f"cannot read {path}: {e.strerror}")
        except KeyFormatError as e:
            return ConfigError(item.key, f"not a minisign public key: {e}")
    return None


def _validate(cfg: Config, host_checks: bool = True, keys: bool = True) -> None:
    if not cfg.node.id:
        raise ConfigError("node.id", "is required (or set BATON_NODE_ID)")
    if not _NAME_RE.match(cfg.node.id):
        raise ConfigError("node.id", f"{cfg.node.id!r} is not a valid node id (letters, digits, . _ -)")
    for k, v in cfg.node.labels.items():
        if not _NAME_RE.match(k) or not _LABEL_VALUE_RE.match(v):
            raise ConfigError(f"node.labels.{k}", f"{k}={v!r}: keys and values are letters, digits, . _ - "
                              "(up to 64)")
    _validate_grpc(cfg.grpc, host_checks)
    for name in ("tls_cert", "tls_key", "tls_ca"):
        marker = b"PRIVATE KEY-----" if name == "tls_key" else b"-----BEGIN CERTIFICATE-----"
        _require_file(getattr(cfg.manager, name), f"manager.{name}", marker, host_checks)
    m = cfg.manager
    if host_checks:
        _require_tls_pair("grpc", cfg.grpc.tls_cert, cfg.grpc.tls_key, cfg.grpc.tls_ca)
        _require_tls_pair("manager", m.tls_cert, m.tls_key, m.tls_ca)
    if m.address.strip() and not m.addresses:
        raise ConfigError("manager.address", f"{m.address!r} names no HOST:PORT")
    for addr in m.addresses:
        _split_address(addr, "manager.address")
    if (m.tls_cert is None) != (m.tls_key is None):
        raise ConfigError("manager.tls_cert", "tls_cert and tls_key must be set together")
    for name in ("heartbeat_interval_s", "sync_interval_s", "retry_initial_s", "retry_max_s", "rpc_timeout_s"):
        if getattr(m, name) <= 0:
            raise ConfigError(f"manager.{name}", "must be greater than 0")
    u = cfg.update
    for name in ("max_backups", "min_rate_bytes_per_s", "free_space_reserve_bytes"):
        if getattr(u, name) < 0:
            raise ConfigError(f"update.{name}", "must be 0 or more")
    for name in ("max_package_bytes", "max_files", "max_unpacked_bytes", "min_rate_window_s"):
        if getattr(u, name) <= 0:
            raise ConfigError(f"update.{name}", "must be greater than 0")
    if host_checks and keys:
        problem = trusted_keys_problem(cfg)
        if problem is not None:
            raise problem
    for name in ("verify_timeout_s", "download_timeout_s", "connect_timeout_s", "read_timeout_s",
                 "health_timeout_s", "handshake_timeout_s"):
        if getattr(u, name) <= 0:
            raise ConfigError(f"update.{name}", "must be greater than 0")
    if u.health_window_s < 0:
        raise ConfigError("update.health_window_s", "must be 0 or more")
    if u.file_url_root is not None and (".." in u.file_url_root.parts or u.file_url_root == Path("/")):
        raise ConfigError("update.file_url_root", "must be a directory of packages, without '..', not /")
    if u.keep_updates < 0:
        raise ConfigError("update.keep_updates", "must be 0 or more")
    if not (math.isfinite(u.keep_updates_days) and u.keep_updates_days > 0):
        raise ConfigError("update.keep_updates_days", "must be finite and greater than 0")
    _ = cfg.metrics.address  # raises the ConfigError naming metrics.listen
    for name in ("http_head_timeout_s", "http_idle_timeout_s"):
        if getattr(cfg.metrics, name) <= 0:
            raise ConfigError(f"metrics.{name}", "must be greater than 0")
    _validate_socket_paths(cfg)
    if cfg.log.level.upper() not in LEVELS:
        raise ConfigError("log.level", f"unknown level {cfg.log.level!r}")
    seen: dict[str, int] = {}
    for i, a in enumerate(cfg.agents):
        key = f"agents[{i}]"
        if not _NAME_RE.match(a.name):
            raise ConfigError(f"{key}.name", f"{a.name!r} is not a valid agent name (letters, digits, . _ -)")
        if a.name == SUPERVISOR_COMPONENT:
            raise ConfigError(f"{key}.name", f"{a.name!r} is reserved for the supervisor itself")
        if a.name in seen:
            raise ConfigError(f"{key}.name", f"duplicate agent name {a.name!r} (also agents[{seen[a.name]}])")
        seen[a.name] = i
        if not a.command:
            raise ConfigError(f"{key}.command", "must not be empty")
        if not a.packaged:
            if not Path(a.command).is_absolute():
                raise ConfigError(f"{key}.command", f"must be an absolute path, got {a.command!r} "
                                  "(only packaged agents may name a command inside their version directory)")
            if not os.access(a.command, os.X_OK):
                raise ConfigError(f"{key}.command", f"{a.command} is not an executable file")
        elif Path(a.command).is_absolute() is False and ".." in Path(a.command).parts:
            raise ConfigError(f"{key}.command", "must stay inside the version directory")
        if a.restart not in RESTART_POLICIES:
            raise ConfigError(f"{key}.restart", f"must be one of {', '.join(RESTART_POLICIES)}, got {a.restart!r}")
        try:
            signal_number(a.stop_signal)
        except KeyError:
            raise ConfigError(f"{key}.stop_signal", f"unknown signal {a.stop_signal!r} (e.g. TERM, SIGINT, QUIT)"
                              ) from None
        _validate_identity(a, key)
        try:
            a.limits(key)
        except BadLimit as e:
            raise ConfigError(e.key, e.problem) from None
        for name in ("stop_timeout_s", "backoff_initial_s", "backoff_max_s"):
            if getattr(a, name) <= 0:
                raise ConfigError(f"{key}.{name}", "must be greater than 0")
        if a.start_seconds < 0 or a.start_retries < 0 or a.log_max_bytes < 1024 or a.log_backups < 0:
            bad = next(n for n, ok in (("start_seconds", a.start_seconds >= 0), ("start_retries", a.start_retries >= 0),
                                       ("log_max_bytes", a.log_max_bytes >= 1024), ("log_backups", a.log_backups >= 0))
                       if not ok)
            raise ConfigError(f"{key}.{bad}", "is out of range")
        if a.working_dir is not None and not a.working_dir.is_dir():
            raise ConfigError(f"{key}.working_dir", f"directory {a.working_dir} not found")
        if a.notify:
            _check_socket_path(f"{key}.notify", cfg.notify_socket(a.name), "its notify socket",
                               "a shorter node.install_root or agent name")
    _validate_order(cfg)
    if host_checks:
        _validate_paths(cfg)
        _validate_env_files(cfg)


def _check_socket_path(key: str, path: Path, what: str, remedy: str) -> None:
    n = len(os.fsencode(path))
    if n > UNIX_PATH_MAX:
        raise ConfigError(key, f"{what} {path} would be {n} bytes, more than the {UNIX_PATH_MAX} a Unix socket path "
                          f"holds: use {remedy}")


def _validate_socket_paths(cfg: Config) -> None:
    """The supervisor's own sockets fit sun_path (each agent's notify socket is checked with its section)."""
    _check_socket_path("node.state_dir", cfg.run_dir / _LONGEST_RUN_SOCKET, "a socket of its run directory",
                       "a shorter node.state_dir")
    if cfg.grpc.unix_socket is not None:
        _check_socket_path("grpc.unix_socket", cfg.grpc.unix_socket, "the socket", "a shorter path")


def _validate_env_files(cfg: Config) -> None:
    """Each ``env_file`` reads as KEY=VALUE lines (the error names the line, never a value)."""
    from baton.env_file import EnvFileError, read_env_file

    for i, a in enumerate(cfg.agents):
        if a.env_file is not None:
            try:
                read_env_file(a.env_file, f"agents[{i}].env_file")
            except EnvFileError as e:
                raise ConfigError(e.key, e.problem) from None


def _validate_order(cfg: Config) -> None:
    """An ``after`` naming no agent, or a cycle of them, is refused naming the key."""
    from baton.start_order import OrderError, start_order

    try:
        start_order(cfg.ordered_agents())
    except OrderError as e:
        raise ConfigError(e.key, e.problem) from None


def _validate_identity(a: AgentConfig, key: str) -> None:
    """user/group name existing accounts (group only with user), umask is octal, stderr and notify_access one of
    their modes."""
    import grp
    import pwd

    if a.user:
        try:
            pwd.getpwnam(a.user)
        except KeyError:
            raise ConfigError(f"{key}.user", f"no such user {a.user!r}") from None
    if a.group and not a.user:
        raise ConfigError(f"{key}.group", f"{a.group!r} without user would run the agent as root with only its group "
                          "changed: set user too (user alone takes that user's groups)")
    if a.group:
        try:
            grp.getgrnam(a.group)
        except KeyError:
            raise ConfigError(f"{key}.group", f"no such group {a.group!r}") from None
    if a.umask and not re.fullmatch(r"0?[0-7]{3}", a.umask):
        raise ConfigError(f"{key}.umask", f"must be an octal mode like \"027\", got {a.umask!r}")
    if a.stderr not in STDERR_MODES:
        raise ConfigError(f"{key}.stderr", f"must be one of {', '.join(STDERR_MODES)}, got {a.stderr!r}")
    if a.notify_access not in NOTIFY_ACCESS:
        raise ConfigError(f"{key}.notify_access", f"must be one of {', '.join(NOTIFY_ACCESS)}, got "
                          f"{a.notify_access!r}")


def _validate_paths(cfg: Config) -> None:
    """Every file and directory root trusts: owned by root (or our user), not writable by others
    (``baton/strict_modes.py``, which holds the list)."""
    from baton.strict_modes import UnsafePath, check_config_paths

    try:
        check_config_paths(cfg)
    except UnsafePath as e:
        raise ConfigError(e.key, e.problem) from None
