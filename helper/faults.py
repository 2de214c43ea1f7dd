"""Crash points for tests of crash safety: kill -9 the helper right after a given step.

When ``BATON_HELPER_CRASH_FILE`` names an existing file whose content is a step
name (a journal state, ``started`` or ``settling``), the helper removes the file
and SIGKILLs itself when it reaches that step. One shot: the helper started
after it runs through. Without the variable this does nothing.
"""

from __future__ import annotations

import os
import signal

from baton import durable

ENV = "BATON_HELPER_CRASH_FILE"


def crash_point(step: str) -> None:
    path = os.environ.get(ENV)
    if not path:
        return
    try:
        with open(path) as f:
            wanted = f.read().strip()
    except OSError:
        return
    if wanted != step:
        return
    durable.remove_file(path)  # type: ignore[arg-type]
    os.kill(os.getpid(), signal.SIGKILL)
