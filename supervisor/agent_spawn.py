"""What an agent is started with: its command and version, user and group, environment and limits, resolved
into a :class:`supervisor.ports.SpawnSpec` that the process driver starts (``supervisor/processes.py``)."""

from __future__ import annotations

import functools
import grp
import os
import pwd
from pathlib import Path

from baton.config import AgentConfig
from baton.env_file import read_env_file
from baton.layout import ComponentLayout, version_of_dir
from baton.strict_modes import UnsafePath
from supervisor.agent_errors import AgentError
from supervisor.cgroups import AgentCgroup, CgroupHost
from supervisor.ports import Identity, SpawnSpec

# What an agent run as another user finds in its environment besides its `env` (systemd's defaults).
AGENT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_LANG = "C.UTF-8"
INHERITED_ENV_DROPPED = ("NOTIFY_SOCKET", "WATCHDOG_", "LISTEN_", "INVOCATION_ID")  # systemd's, meant for us


@functools.cache
def cgroup_host() -> CgroupHost:
    """The controllers this supervisor process can use (found once: they change only with a restart)."""
    return CgroupHost.detect()


def waiting_for_install(cfg: AgentConfig, layout: ComponentLayout) -> bool:
    """A packaged agent with no version installed: nothing to start until an update installs one."""
    return cfg.packaged and layout.current_dir() is None


def resolve(cfg: AgentConfig, layout: ComponentLayout) -> tuple[Path, Path, str]:
    """The command, working directory and version to start now."""
    if not cfg.packaged:
        return Path(cfg.command), cfg.working_dir or Path("/"), ""
    vdir = layout.current_dir()
    if vdir is None:
        raise AgentError(f"agent {cfg.name}: no version installed at {layout.current_link}")
    cmd = Path(cfg.command)
    if not cmd.is_absolute():
        cmd = vdir / cmd
    return cmd, cfg.working_dir or vdir, version_of_dir(vdir.name)


def identity(cfg: AgentConfig) -> Identity:
    """Popen arguments that drop to ``user``/``group`` and set ``umask`` in the child before the exec.

    The output FIFOs are opened by us and inherited, so they need no permission; the notify socket is
    reached by path, so it is given to the agent's uid in a directory of its own (``supervisor/agent_notify.py``).
    """
    umask = cfg.umask_value
    out = Identity(umask=-1 if umask is None else umask)
    if not cfg.user and not cfg.group:
        return out
    uid, gid = -1, -1
    try:
        pwd.getpwnam(cfg.user or "root")
        grp.getgrnam(cfg.group or "root")
    except KeyError as e:
        raise AgentError(f"no such user or group: {e}") from None
    if cfg.user:
        pw = pwd.getpwnam(cfg.user)
        uid, gid = pw.pw_uid, pw.pw_gid
        out.user = uid
        out.extra_groups = [g for g in os.getgrouplist(pw.pw_name, pw.pw_gid) if g != pw.pw_gid]
        out.account = pw
    if cfg.group:
        gid = grp.getgrnam(cfg.group).gr_gid
    out.group = gid
    return out


def environment(cfg: AgentConfig, key: str, ident: Identity, version: str, notify_path: Path) -> dict[str, str]:
    """The agent's environment: ours (less systemd's own variables) for an agent of our user, only a minimal
    login-like set for one run as another user (a secret in root's environment is not theirs to read), then
    its configured ``env``, then Baton's variables."""
    pw = ident.account
    if pw is not None and ident.other_user:
        env = {"PATH": AGENT_PATH, "HOME": pw.pw_dir, "USER": pw.pw_name, "LOGNAME": pw.pw_name,
               "SHELL": pw.pw_shell or "/bin/sh", "LANG": os.environ.get("LANG") or DEFAULT_LANG}
    else:
        env = {k: v for k, v in os.environ.items() if not k.startswith(INHERITED_ENV_DROPPED)}
        if pw is not None:
            env.update(USER=pw.pw_name, LOGNAME=pw.pw_name, HOME=pw.pw_dir)
    env.update(cfg.env)
    if cfg.env_file is not None:
        _check_env_file(cfg.env_file, key)
        env.update(read_env_file(cfg.env_file, f"{key}.env_file"))
    env["BATON_AGENT_NAME"] = cfg.name
    env["BATON_AGENT_VERSION"] = version
    if cfg.notify:
        env["NOTIFY_SOCKET"] = str(notify_path)
    return env


def _check_env_file(path: Path, key: str) -> None:
    """The round-3 rule at every start, not only at check-config: the file may have been swapped since."""
    from baton.strict_modes import Kind, Trusted, check_trusted

    try:
        check_trusted(Trusted(f"{key}.env_file", path, Kind.FILE))
    except UnsafePath as e:
        raise AgentError(str(e)) from None


def spawn_spec(cfg: AgentConfig, key: str, cmd: Path, cwd: Path, version: str, stdout: Path,
               stderr: Path | None, notify_path: Path) -> tuple[SpawnSpec, AgentCgroup | None]:
    """Everything the driver needs to start the agent, and the cgroup it is put in (prepared here, with its
    limits, when it asks for any). Raises AgentError, CgroupError, EnvFileError."""
    ident = identity(cfg)
    env = environment(cfg, key, ident, version, notify_path)
    limits = cfg.limits(key)
    cgroup = None
    if limits.any:
        if not os.access(cmd, os.X_OK):  # before the gate shell, which would only say so as it exits
            raise AgentError(f"{cmd} is not an executable file")
        cgroup = cgroup_host().prepare(cfg.name, limits, key) if limits.asked() else None
    return SpawnSpec(argv=(str(cmd), *cfg.args), cwd=cwd, env=env, stdout=stdout, stderr=stderr, identity=ident,
                     limits=limits, cgroup=cgroup), cgroup
