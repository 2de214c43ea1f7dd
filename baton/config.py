"""The supervisor's configuration: a TOML file merged over defaults.

The file is validated into frozen dataclasses. Every problem is reported as one
:class:`ConfigError` naming the key (``agents[1].name``) and what is wrong, so
``supervisor check-config`` and ``supervisor run`` print one clear line and
exit 2 without starting anything. Limits carry their unit in their names.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import tomllib
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from baton.errors import BatonError

ENV_OVERRIDES = {
    "BATON_NODE_ID": ("node", "id"),
    "BATON_GRPC_LISTEN": ("grpc", "listen"),
    "BATON_GRPC_UNIX_SOCKET": ("grpc", "unix_socket"),
}
RESTART_POLICIES = ("always", "on-failure", "never")
SUPERVISOR_COMPONENT = "supervisor"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ConfigError(BatonError):
    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}" if key else problem)
        self.key = key
        self.problem = problem


@dataclass(frozen=True)
class NodeConfig:
    id: str = ""
    state_dir: Path = Path("/var/lib/baton")
    install_root: Path = Path("/opt/baton")


@dataclass(frozen=True)
class GrpcConfig:
    listen: tuple[str, ...] = ()
    unix_socket: Path | None = None
    unix_socket_group: str = ""
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    allowed_clients: tuple[str, ...] = ()

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


@dataclass(frozen=True)
class ManagerConfig:
    address: str = ""
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    server_name: str = ""
    heartbeat_interval_s: float = 10.0
    sync_interval_s: float = 30.0
    retry_initial_s: float = 0.5
    retry_max_s: float = 30.0
    rpc_timeout_s: float = 5.0


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
    autostart: bool = True
    log_max_bytes: int = 10 * 1024 * 1024
    log_backups: int = 3

    @property
    def stop_signum(self) -> int:
        return int(signal.Signals["SIG" + self.stop_signal])


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

    @property
    def download_dir(self) -> Path:
        return self.update.download_dir or self.node.state_dir / "downloads"

    @property
    def log_dir(self) -> Path:
        return self.log.dir or self.node.state_dir / "logs"

    @property
    def run_dir(self) -> Path:
        return self.node.state_dir / "run"

    def agent(self, name: str) -> AgentConfig | None:
        return next((a for a in self.agents if a.name == name), None)


def load_config(path: Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read, merge over defaults, apply environment overrides, validate."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError("", f"config file {path} not found") from None
    except OSError as e:
        raise ConfigError("", f"cannot read config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("", f"{path} is not valid TOML: {e}") from None
    return config_from_dict(raw, environ=os.environ if environ is None else environ, source=path.resolve())


def config_from_dict(
    raw: Mapping[str, Any], environ: Mapping[str, str] | None = None, source: Path | None = None
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
    known = {"node", "grpc", "manager", "update", "log", "agents", "metrics"}
    for k in raw:
        if k not in known:
            raise ConfigError(k, f"unknown section (known: {', '.join(sorted(known))})")
    agents_raw = raw.get("agents", [])
    if not isinstance(agents_raw, list):
        raise ConfigError("agents", "must be an array of tables ([[agents]])")
    cfg = Config(
        node=_build(NodeConfig, raw.get("node", {}), "node"),
        grpc=_build(GrpcConfig, raw.get("grpc", {}), "grpc"),
        manager=_build(ManagerConfig, raw.get("manager", {}), "manager"),
        update=_build(UpdateConfig, raw.get("update", {}), "update"),
        log=_build(LogConfig, raw.get("log", {}), "log"),
        agents=tuple(_build(AgentConfig, a, f"agents[{i}]") for i, a in enumerate(agents_raw)),
        source=source,
        metrics=_build(MetricsConfig, raw.get("metrics", {}), "metrics"),
    )
    _validate(cfg)
    return cfg


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(prefix, "must be a table")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            raise ConfigError(f"{prefix}.{k}", f"unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}"
        if f.name in data:
            kwargs[f.name] = _convert(hints[f.name], data[f.name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(key, "is required")
    return cls(**kwargs)


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
        return {str(k): _convert(str, v, f"{key}.{k}") for k, v in value.items()}
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(key, "must be a non-empty path string")
        p = Path(value)
        if not p.is_absolute():
            raise ConfigError(key, f"must be an absolute path, got {value!r}")
        return p
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, f"must be a number, got {type(value).__name__} {value!r}")
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
        return value
    raise RuntimeError(f"unsupported config type {tp} for {key}")


def _require_file(path: Path | None, key: str) -> None:
    if path is not None and not path.is_file():
        raise ConfigError(key, f"file {path} not found")


def _validate(cfg: Config) -> None:
    if not cfg.node.id:
        raise ConfigError("node.id", "is required (or set BATON_NODE_ID)")
    if not _NAME_RE.match(cfg.node.id):
        raise ConfigError("node.id", f"{cfg.node.id!r} is not a valid node id (letters, digits, . _ -)")
    if not cfg.grpc.listen and cfg.grpc.unix_socket is None:
        raise ConfigError("grpc", "set listen and/or unix_socket: the supervisor must be reachable")
    for i, addr in enumerate(cfg.grpc.listen):
        if ":" not in addr or not addr.rsplit(":", 1)[1].isdigit():
            raise ConfigError(f"grpc.listen[{i}]", f"{addr!r} is not HOST:PORT")
    tls_parts = (cfg.grpc.tls_cert, cfg.grpc.tls_key, cfg.grpc.tls_ca)
    if any(tls_parts) and not all(tls_parts):
        raise ConfigError("grpc.tls_cert", "tls_cert, tls_key and tls_ca must be set together")
    for name in ("tls_cert", "tls_key", "tls_ca"):
        _require_file(getattr(cfg.grpc, name), f"grpc.{name}")
        _require_file(getattr(cfg.manager, name), f"manager.{name}")
    m = cfg.manager
    from baton.identity import AllowListError, parse_allow_list

    try:
        parse_allow_list(cfg.grpc.allowed_clients)
    except AllowListError as e:
        raise ConfigError("grpc.allowed_clients", str(e).removeprefix("grpc.allowed_clients: ")) from None
    if (m.tls_cert is None) != (m.tls_key is None):
        raise ConfigError("manager.tls_cert", "tls_cert and tls_key must be set together")
    for name in ("heartbeat_interval_s", "sync_interval_s", "retry_initial_s", "retry_max_s", "rpc_timeout_s"):
        if getattr(m, name) <= 0:
            raise ConfigError(f"manager.{name}", "must be greater than 0")
    u = cfg.update
    if u.max_backups < 0:
        raise ConfigError("update.max_backups", "must be 0 or more")
    for name in ("verify_timeout_s", "download_timeout_s", "connect_timeout_s", "read_timeout_s",
                 "health_timeout_s", "handshake_timeout_s"):
        if getattr(u, name) <= 0:
            raise ConfigError(f"update.{name}", "must be greater than 0")
    if u.health_window_s < 0:
        raise ConfigError("update.health_window_s", "must be 0 or more")
    _ = cfg.metrics.address  # raises the ConfigError naming metrics.listen
    if cfg.log.level.upper() not in ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL"):
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
        if "SIG" + a.stop_signal not in signal.Signals.__members__:
            raise ConfigError(f"{key}.stop_signal", f"unknown signal {a.stop_signal!r} (e.g. TERM, INT, QUIT)")
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
