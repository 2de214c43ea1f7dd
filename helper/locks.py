"""One update per component at a time, across processes: an flock held for the helper's life."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from baton.errors import BatonError
from baton.journal import lock_dir


class ComponentBusy(BatonError):
    def __init__(self, component: str) -> None:
        super().__init__(f"another helper is updating {component} right now")
        self.component = component


class ComponentLock:
    def __init__(self, state_dir: Path, component: str) -> None:
        self.path = lock_dir(state_dir) / f"{component}.lock"
        self.component = component
        self._fd = -1

    def acquire(self) -> ComponentLock:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ComponentBusy(self.component) from None
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> ComponentLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
