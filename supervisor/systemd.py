"""Talking to systemd: ``$NOTIFY_SOCKET`` (READY, STATUS, WATCHDOG, MAINPID), the unit's pending job, transient units.

Without systemd (no ``NOTIFY_SOCKET``) :func:`notify` is a silent no-op.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from supervisor.cgroups import SUPERVISOR_LEAF


def notify(message: str) -> bool:
    """Send one sd_notify datagram; return False when not under systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.connect(path)
            s.sendall(message.encode())
        except OSError:
            return False
    return True


def enabled() -> bool:
    """Whether :func:`notify` sends anything (a caller may then skip building the message)."""
    return bool(os.environ.get("NOTIFY_SOCKET"))


def watchdog_interval_s() -> float | None:
    """Half of ``WATCHDOG_USEC`` when the watchdog is meant for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1e6 / 2
    except ValueError:
        return None


def under_systemd() -> bool:
    return bool(os.environ.get("NOTIFY_SOCKET") or os.environ.get("INVOCATION_ID"))


# ---- telling `systemctl restart` from `systemctl stop` (docs/handover.md, "Under systemd") ---------------------

RESTART_JOBS = frozenset({"restart", "try-restart"})  # job types after which systemd starts the unit again
JOB_QUERY_TIMEOUT_S = 5.0  # a manager that does not answer by then: treated as a stop (the documented default)


def own_unit(cgroup_file: str = "/proc/self/cgroup") -> str:
    """The service unit this process runs in, from its cgroup ("" outside a ``.service``)."""
    try:
        with open(cgroup_file) as f:
            lines = f.read().splitlines()
    except OSError:
        return ""
    for line in lines:  # "0::/system.slice/baton-supervisor.service", or v1's "1:name=systemd:/..."
        _, controllers, path = line.split(":", 2)
        if controllers in ("", "name=systemd"):
            parts = path.rstrip("/").rsplit("/", 2)
            # The leaf our cgroup v2 limits move us into (supervisor/cgroups.py) is still the unit's.
            last = parts[-2] if parts[-1] == SUPERVISOR_LEAF and len(parts) > 1 else parts[-1]
            if last.endswith(".service"):
                return last
    return ""


def pending_job(unit: str, timeout_s: float = JOB_QUERY_TIMEOUT_S) -> str:
    """The type of the job systemd runs for ``unit`` now (``restart``, ``stop`` ...), "" if none or unknown.

    Asked with ``systemctl list-jobs``, which reaches the manager over its private socket (no D-Bus needed): while
    ``systemctl restart`` stops the unit, its job is listed as ``restart``; ``systemctl stop`` and a shutdown list
    ``stop``.
    """
    import subprocess

    try:
        res = subprocess.run(["systemctl", "list-jobs", "--no-legend", "--full", "--no-pager", unit],
                             capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    for line in res.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[1] == unit:
            return fields[2]
    return ""


def transient_unit_argv(unit: str, log_path: Path, argv: list[str]) -> list[str]:
    """``argv`` run by ``systemd-run`` as a unit of its own: outside what systemd stops or kills with our service.

    The ``BATON_*`` variables and ``PYTHONPATH`` go with it (a development tree runs with ``BATON_PYTHON``).
    """
    env = [f"--setenv={k}={v}" for k, v in os.environ.items() if k.startswith("BATON_") or k == "PYTHONPATH"]
    return ["systemd-run", f"--unit={unit}", "--collect", "--quiet",
            f"--property=StandardOutput=append:{log_path}", f"--property=StandardError=append:{log_path}",
            *env, *argv]
