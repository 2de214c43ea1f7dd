"""How the helper loads the code an update needs: with the cycle collector off.

Loading the update path creates tens of thousands of objects (modules,
classes, functions) that live as long as the process. With the collector on,
its full passes walk all of them again and again while more are being made:
about a fifth of the helper's start-up CPU, on every update. Loaded with it
off, then frozen (``gc.freeze``), they are never walked again; objects made
afterwards are collected as usual. The few cycles the imports leave behind
(hundreds of objects) are frozen with them: kept, not leaked repeatedly.

The supervisor does not load its daemon this way: it would start with about
45 ms less CPU but stay about 0.2 MiB larger (VmRSS with 100 agents, measured
against the same code loading with the collector on), and its memory is a goal
(docs/benchmarks.md, section 5) while its start-up time is not.
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
