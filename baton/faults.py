"""Crash points for tests of crash safety: kill -9 a process right after a given step.

When ``BATON_HELPER_CRASH_FILE`` (in a helper) or ``BATON_SUPERVISOR_CRASH_FILE``
(in a supervisor) names an existing file whose content is a step name, the
process removes the file and SIGKILLs itself when it reaches that step. One
shot: the process started after it runs through. Without the variables this does
nothing. Steps are journal state names (``downloading``, ``watching`` ...) and the
handover steps listed in docs/handover.md.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from baton import durable

HELPER = "BATON_HELPER_CRASH_FILE"
SUPERVISOR = "BATON_SUPERVISOR_CRASH_FILE"


def crash_point(step: str, env: str = HELPER) -> None:
    path = os.environ.get(env)
    if not path:
        return
    try:
        with open(path) as f:
            wanted = f.read().strip()
    except OSError:
        return
    if wanted != step:
        return
    durable.remove_file(Path(path))
    os.kill(os.getpid(), signal.SIGKILL)
