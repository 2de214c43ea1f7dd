"""An agent's resource limits: what its config asks for, parsed once.

``memory_max``, ``tasks_max``, ``cpu_weight`` and ``cpu_quota`` are enforced by a cgroup of the agent's own
(``supervisor/cgroups.py``); ``open_files`` is ``RLIMIT_NOFILE``, set on the agent before it runs its command.
0 or "" means "no limit". The config checks every value here and names the key; the supervisor uses the
same parse, so both agree on what a value means.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from baton.errors import KeyedError

# systemd's ranges: CPUWeight= 1..10000 (100 is the default), CPUQuota= a percentage of one CPU.
CPU_WEIGHT_MAX = 10000
CPU_PERIOD_US = 100_000
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^([0-9]+)([KMGT]?)$")
_QUOTA_RE = re.compile(r"^([0-9]+)%$")
# Which cgroup controller enforces each limit, by its config key (open_files needs none).
CONTROLLER_OF = {"memory_max": "memory", "tasks_max": "pids", "cpu_weight": "cpu", "cpu_quota": "cpu"}
MIN_MEMORY_BYTES = 1 << 20  # below a MiB not even the shell that starts the agent fits: refused, not killed forever


class BadLimit(KeyedError):
    """A resource limit that is not a valid value, naming its key."""


@dataclass(frozen=True)
class Limits:
    memory_max_bytes: int = 0
    tasks_max: int = 0
    cpu_weight: int = 0
    cpu_quota_us: int = 0   # per CPU_PERIOD_US: 50% is 50_000, 200% (two CPUs) 200_000
    open_files: int = 0

    def asked(self) -> tuple[str, ...]:
        """The config keys of the cgroup limits set (those that need a controller)."""
        return tuple(k for k, v in (("memory_max", self.memory_max_bytes), ("tasks_max", self.tasks_max),
                                    ("cpu_weight", self.cpu_weight), ("cpu_quota", self.cpu_quota_us)) if v)

    @property
    def any(self) -> bool:
        return bool(self.asked() or self.open_files)


def parse_size(text: str, key: str) -> int:
    """``"512M"``, ``"1G"`` or a number of bytes; "" is 0 (no limit)."""
    if text == "":
        return 0
    m = _SIZE_RE.match(text.strip().upper().removesuffix("B"))
    if m is None:
        raise BadLimit(key, f"must be a size like \"512M\" or \"1G\" (K, M, G, T: powers of 1024), got {text!r}")
    return int(m.group(1)) * _UNITS[m.group(2)]


def limits_of(memory_max: str, tasks_max: int, cpu_weight: int, cpu_quota: str, open_files: int,
              prefix: str) -> Limits:
    """The limits of one agent section; BadLimit naming ``prefix.key`` for a value out of range."""
    mem = parse_size(memory_max, f"{prefix}.memory_max")
    if mem and mem < MIN_MEMORY_BYTES:
        raise BadLimit(f"{prefix}.memory_max", f"must be at least 1M, got {memory_max!r}")
    if tasks_max < 0:
        raise BadLimit(f"{prefix}.tasks_max", "must be 0 (no limit) or more")
    if not 0 <= cpu_weight <= CPU_WEIGHT_MAX:
        raise BadLimit(f"{prefix}.cpu_weight", f"must be 1 to {CPU_WEIGHT_MAX} (0: the default), got {cpu_weight}")
    quota = 0
    if cpu_quota:
        m = _QUOTA_RE.match(cpu_quota.strip())
        if m is None or int(m.group(1)) == 0:
            raise BadLimit(f"{prefix}.cpu_quota", f"must be a percentage of one CPU like \"50%\" or \"200%\", "
                           f"got {cpu_quota!r}")
        quota = int(m.group(1)) * CPU_PERIOD_US // 100
    if open_files < 0:
        raise BadLimit(f"{prefix}.open_files", "must be 0 (the supervisor's limit) or more")
    return Limits(mem, tasks_max, cpu_weight, quota, open_files)
