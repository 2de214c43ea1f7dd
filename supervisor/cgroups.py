"""Resource limits through cgroups: one cgroup per agent, under the supervisor's own (delegated) cgroup.

Contract:

- The primary target is cgroup v2 (``cgroup.controllers`` of the supervisor's cgroup lists memory, pids, cpu,
  which ``Delegate=yes`` in the unit gives it). The supervisor then lives in the leaf ``baton-supervisor`` of
  that cgroup (cgroup v2 lets only leaves hold processes once controllers are enabled below) and each agent
  with limits in ``baton-agents/<name>``. On a host with the controllers only in cgroup v1 hierarchies
  (hybrid mode), each controller's ``<mount><own cgroup>/baton-agents/<name>`` is used instead.
- A limit whose controller neither offers is refused: :func:`check_config` names the key at check-config,
  and :meth:`CgroupHost.prepare` the same at start (that agent does not start; the others do).
- The agent is in its cgroup before its command runs (``supervisor/agents.py`` holds the child at a gate
  until :meth:`AgentCgroup.enter` returns), so nothing it allocates is charged elsewhere.
- The directories are named after the agent, so a supervisor that adopts an agent (restart, self-update)
  finds its cgroup again; :meth:`AgentCgroup.remove` kills what is left in it and removes it when the agent
  leaves the config.
- An exit is explained from the cgroup's own counters (``memory.events``/``memory.oom_control`` oom_kill,
  ``pids.events`` max): :meth:`AgentCgroup.exit_reason`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from baton.config import Config, ConfigError
from baton.errors import KeyedError
from baton.limits import CONTROLLER_OF, Limits

CGROUP_ROOT = Path("/sys/fs/cgroup")
AGENTS_DIR = "baton-agents"
SUPERVISOR_LEAF = "baton-supervisor"
CONTROLLERS = ("memory", "pids", "cpu")


class CgroupError(KeyedError):
    """A limit cannot be applied: ``key`` is the config key (``agents[0].memory_max``) or ""."""


@dataclass(frozen=True)
class Hierarchy:
    """Where one controller is: the directory of the supervisor's cgroup in it, and whether it is v2."""

    own_dir: Path
    v2: bool


def _read(path: Path) -> str:
    with open(path) as f:
        return f.read()


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _counter(path: Path, name: str) -> int:
    """``name N`` from a flat-keyed cgroup file (memory.events, pids.events, memory.oom_control); 0 if absent."""
    try:
        for line in _read(path).splitlines():
            k, _, v = line.partition(" ")
            if k == name:
                return int(v)
    except (OSError, ValueError):
        pass
    return 0


@dataclass
class CgroupHost:
    """The controllers this supervisor can use, found once from /proc/self/cgroup and the mounts."""

    hierarchies: dict[str, Hierarchy] = field(default_factory=dict)
    root: Path = CGROUP_ROOT

    @classmethod
    def detect(cls, root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> CgroupHost:
        host = cls(root=root)
        try:
            lines = _read(proc_cgroup).splitlines()
        except OSError:
            return host
        v2_path = ""
        v1: dict[str, str] = {}
        for line in lines:
            _, ctrls, path = line.split(":", 2)
            if ctrls == "":
                v2_path = path
            for c in ctrls.split(","):
                v1[c] = path
        v2_mount = root if (root / "cgroup.controllers").exists() else root / "unified"
        if v2_path and (v2_mount / "cgroup.controllers").exists():
            own = v2_mount / v2_path.lstrip("/")
            if own.name == SUPERVISOR_LEAF:  # moved there by an earlier process of ours (restart, self-update)
                own = own.parent
            with contextlib.suppress(OSError):
                for c in _read(own / "cgroup.controllers").split():
                    if c in CONTROLLERS:
                        host.hierarchies[c] = Hierarchy(own, True)
        for c in CONTROLLERS:
            if c not in host.hierarchies and c in v1 and (root / c / "cgroup.procs").exists():
                host.hierarchies[c] = Hierarchy(root / c / v1[c].lstrip("/"), False)
        return host

    def missing(self, limits: Limits) -> tuple[str, ...]:
        """The keys of ``limits`` whose controller this host does not offer."""
        return tuple(k for k in limits.asked() if CONTROLLER_OF[k] not in self.hierarchies)

    def check(self, limits: Limits, prefix: str) -> None:
        """CgroupError naming the first limit that cannot be enforced here."""
        for k in self.missing(limits):
            c = CONTROLLER_OF[k]
            raise CgroupError(f"{prefix}.{k}", f"needs the cgroup {c!r} controller, which this host does not "
                              "give the supervisor (cgroup v2 with Delegate=yes in its unit, or a cgroup v1 "
                              f"{c} hierarchy); remove the limit or enable the controller")

    def group(self, name: str) -> AgentCgroup:
        """The cgroup of agent ``name`` (not created: :meth:`prepare` does)."""
        return AgentCgroup(name, {c: h.own_dir / AGENTS_DIR / name for c, h in self.hierarchies.items()},
                           {c for c, h in self.hierarchies.items() if h.v2})

    def prepare(self, name: str, limits: Limits, prefix: str) -> AgentCgroup:
        """Create agent ``name``'s cgroup and write its limits; CgroupError naming the key if it cannot."""
        self.check(limits, prefix)
        needed = {CONTROLLER_OF[k] for k in limits.asked()}
        if any(self.hierarchies[c].v2 for c in needed):
            self._delegate_v2(sorted(c for c in needed if self.hierarchies[c].v2))
        cg = self.group(name)
        cg.create(needed)
        cg.apply(limits, prefix)
        return cg

    def _delegate_v2(self, controllers: list[str]) -> None:
        """Enable ``controllers`` for ``baton-agents`` below our cgroup, moving its processes into our leaf
        first (cgroup v2 enables controllers only below a cgroup without processes of its own). The root cgroup
        (only it has no ``cgroup.type``) is exempt from that rule: a supervisor started there moves nothing,
        since its processes are every process of the host, kernel threads (which cannot move) and init."""
        own = self.hierarchies[controllers[0]].own_dir
        agents = own / AGENTS_DIR
        try:
            if (own / "cgroup.type").exists():
                leaf = own / SUPERVISOR_LEAF
                with contextlib.suppress(FileExistsError):
                    leaf.mkdir(0o755)
                for pid in _read(own / "cgroup.procs").split():
                    with contextlib.suppress(ProcessLookupError):
                        _write(leaf / "cgroup.procs", pid)
            enable = " ".join(f"+{c}" for c in controllers)
            _write(own / "cgroup.subtree_control", enable)
            with contextlib.suppress(FileExistsError):
                agents.mkdir(0o755)
            _write(agents / "cgroup.subtree_control", enable)
        except OSError as e:
            raise CgroupError("", f"cannot delegate {', '.join(controllers)} to {agents}: {e.strerror} "
                              "(is Delegate=yes set in the supervisor's unit?)") from None


@dataclass
class AgentCgroup:
    """One agent's cgroup: a directory per controller (one directory for every v2 controller)."""

    name: str
    dirs: dict[str, Path]
    v2: set[str] = field(default_factory=set)
    _oom_base: int = 0
    _tasks_base: int = 0

    def _dirs(self, controllers: set[str] | None = None) -> list[Path]:
        out: list[Path] = []
        for c, d in self.dirs.items():
            if (controllers is None or c in controllers) and d not in out:
                out.append(d)
        return out

    def create(self, controllers: set[str]) -> None:
        for d in self._dirs(controllers):
            d.parent.mkdir(0o755, exist_ok=True)
            d.mkdir(0o755, exist_ok=True)

    def apply(self, limits: Limits, prefix: str) -> None:
        """Write every limit (an unset one is written as "no limit", so that a removed limit is lifted)."""
        writes: list[tuple[str, str, str, str]] = []  # (key, controller, file, value)
        mem = str(limits.memory_max_bytes) if limits.memory_max_bytes else None
        tasks = str(limits.tasks_max) if limits.tasks_max else "max"
        if "memory" in self.v2:
            writes.append(("memory_max", "memory", "memory.max", mem or "max"))
        elif "memory" in self.dirs:
            value = mem or "-1"  # -1 lifts a limit left in the directory by an earlier config
            memsw = self.dirs["memory"] / "memory.memsw.limit_in_bytes"  # memory and swap: or it would swap instead
            if memsw.exists():  # memsw may never be below the limit: raised first, lowered after
                with contextlib.suppress(OSError):
                    _write(memsw, value)
            writes.append(("memory_max", "memory", "memory.limit_in_bytes", value))
            if memsw.exists():
                writes.append(("memory_max", "memory", "memory.memsw.limit_in_bytes", value))
        if "pids" in self.dirs:
            writes.append(("tasks_max", "pids", "pids.max", tasks))
        if "cpu" in self.v2:
            writes.append(("cpu_weight", "cpu", "cpu.weight", str(limits.cpu_weight or 100)))
            writes.append(("cpu_quota", "cpu", "cpu.max",
                           f"{limits.cpu_quota_us or 'max'} {100_000}"))
        elif "cpu" in self.dirs:
            writes.append(("cpu_weight", "cpu", "cpu.shares", str((limits.cpu_weight or 100) * 1024 // 100)))
            writes.append(("cpu_quota", "cpu", "cpu.cfs_period_us", "100000"))
            writes.append(("cpu_quota", "cpu", "cpu.cfs_quota_us", str(limits.cpu_quota_us or -1)))
        asked = set(limits.asked())
        for key, c, fname, value in writes:
            path = self.dirs[c] / fname
            if not path.exists() and key not in asked:
                continue
            try:
                _write(path, value)
            except OSError as e:
                if key in asked:
                    raise CgroupError(f"{prefix}.{key}", f"cannot write {value} to {path}: {e.strerror}") from None
        self._oom_base = self.oom_kills()
        self._tasks_base = self.tasks_refused()

    def enter(self, pid: int) -> None:
        """Move ``pid`` (held at the gate, before its command runs) into every directory of this cgroup."""
        for d in self._dirs():
            if d.is_dir():
                _write(d / "cgroup.procs", str(pid))

    def baseline(self) -> None:
        """Count OOM kills and refused forks from now (an adopted agent: what happened before is not its)."""
        self._oom_base = self.oom_kills()
        self._tasks_base = self.tasks_refused()

    def oom_kills(self) -> int:
        d = self.dirs.get("memory")
        if d is None:
            return 0
        return _counter(d / ("memory.events" if "memory" in self.v2 else "memory.oom_control"), "oom_kill")

    def tasks_refused(self) -> int:
        d = self.dirs.get("pids")
        return _counter(d / "pids.events", "max") if d is not None else 0

    def exit_reason(self, limits: Limits) -> str:
        """Why the agent's last process exited, if a limit of its cgroup did it; "" otherwise."""
        reasons = []
        ooms = self.oom_kills() - self._oom_base
        if ooms > 0:
            reasons.append(f"killed by the kernel: memory limit (memory_max = {limits.memory_max_bytes} bytes) "
                           f"reached (oom_kill {ooms})")
        refused = self.tasks_refused() - self._tasks_base
        if refused > 0:
            reasons.append(f"tasks limit (tasks_max = {limits.tasks_max}) reached: {refused} fork(s) refused")
        self.baseline()
        return "; ".join(reasons)

    def remove(self) -> None:
        """Kill what is left in the cgroup and remove its directories (the agent left the config)."""
        for d in self._dirs():
            for _ in range(50):
                try:
                    pids = _read(d / "cgroup.procs").split()
                except FileNotFoundError:
                    break
                for p in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(p), signal.SIGKILL)
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY:
                        break
                    time.sleep(0.02)  # the killed processes are leaving


def check_config(cfg: Config, host: CgroupHost | None = None) -> None:
    """ConfigError naming the first agent limit this host cannot enforce (``supervisor check-config``)."""
    host = host or CgroupHost.detect()
    for i, a in enumerate(cfg.agents):
        try:
            host.check(a.limits(f"agents[{i}]"), f"agents[{i}]")
        except CgroupError as e:
            raise ConfigError(e.key, e.problem) from None
