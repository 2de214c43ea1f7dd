"""How the helper loads the code an update needs: with the cycle collector off.

Loading the update path creates tens of thousands of objects (modules,
classes, functions) that live as long as the process; with the collector on,
its full passes walk all of them again and again while more are being made.
Loaded with it off, then frozen (``gc.freeze``), they are never walked again;
objects made afterwards are collected as usual. The few cycles the imports
leave behind (hundreds of objects) are frozen with them: kept, not leaked
repeatedly. The supervisor does not load its daemon this way: its memory is a
goal, its start-up time is not. Tested by tests/test_startup_rules.py; the
figures: docs/benchmarks.md, "Start-up rules and their history".
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def loading() -> Iterator[None]:
    """Run the imports inside with the cycle collector off; freeze what exists and turn it back on, always."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_on:
            gc.enable()
