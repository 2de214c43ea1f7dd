"""The two tiers' fence: a test not marked ``e2e`` may not start a process.

``bash scripts/test.sh --fast`` runs ``pytest -m "not e2e"``, the tests that start no process. So that a
mis-marked test cannot hide in it, every way this interpreter starts a process (``subprocess``, and so
``asyncio``'s subprocesses; ``os.fork``/``forkpty``, and so ``multiprocessing``; ``os.posix_spawn*``;
``os.system``/``os.exec*``) fails such a test, in its set-up (fixtures included) and its body, with a
message saying to mark it. The fence is down while ``e2e`` tests run, and in every test's teardown: a
session fixture that an ``e2e`` test started may be torn down after the last test, whichever it is.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Generator
from typing import Any

import pytest

E2E = "e2e"

_GUARDED_OS = ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system",
               "execv", "execve", "execvp", "execvpe", "execl", "execle", "execlp", "execlpe")


class ProcessStartInFastTier(pytest.fail.Exception):
    """Raised where a test not marked ``e2e`` starts a process; a pytest failure, so ``except Exception`` in
    the code under test cannot swallow it."""


def _refuse(nodeid: str, what: str, attempts: list[str]) -> Callable[..., Any]:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        attempts.append(what)
        raise ProcessStartInFastTier(
            f"{nodeid} started a process ({what}) but is not marked e2e: mark it "
            f"@pytest.mark.e2e (or its module: pytestmark = pytest.mark.e2e); the fast tier starts none",
            pytrace=False)

    return refuse


def _fenced(item: pytest.Item) -> Generator[None, Any, Any]:
    if item.get_closest_marker(E2E) is not None:
        return (yield)
    attempts: list[str] = []
    mp = pytest.MonkeyPatch()
    mp.setattr(subprocess.Popen, "_execute_child", _refuse(item.nodeid, "subprocess.Popen", attempts))
    for name in _GUARDED_OS:
        if hasattr(os, name):
            mp.setattr(os, name, _refuse(item.nodeid, f"os.{name}", attempts))
    try:
        result = yield
    finally:
        mp.undo()
    if attempts:  # swallowed on the way (a thread, a broad except): still this test's failure
        raise ProcessStartInFastTier(f"{item.nodeid} tried to start a process ({', '.join(attempts)}) but is "
                                     "not marked e2e: mark it @pytest.mark.e2e", pytrace=False)
    return result


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, Any, Any]:
    return (yield from _fenced(item))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, Any, Any]:
    return (yield from _fenced(item))
