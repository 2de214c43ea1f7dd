"""Waiting for a supervisor's standby helper (supervisor/standby.py) to be loaded and connected."""

from __future__ import annotations

import re

import psutil

from baton.standby import FLAG
from tests.conftest import SupervisorProc, wait_for


def ready_standby(sup: SupervisorProc, not_pid: int = 0, timeout: float = 30) -> psutil.Process:
    """The standby the supervisor last said is ready (not ``not_pid``), as a process."""

    def ready() -> psutil.Process | None:
        pids = [int(p) for p in re.findall(r"standby helper pid (\d+) is ready", sup.stdout_path.read_text())]
        pids = [p for p in pids if p != not_pid]
        if not pids or not psutil.pid_exists(pids[-1]):
            return None
        proc = psutil.Process(pids[-1])
        return proc if FLAG in proc.cmdline() else None

    return wait_for(ready, timeout, interval=0.05, what="a standby helper to be ready")
