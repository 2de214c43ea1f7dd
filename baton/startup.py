"""How a Baton process loads the code its command needs: with the cycle collector off.

Loading the update path (helper) or the daemon (supervisor, gRPC included)
creates tens of thousands of objects (modules, classes, functions) that live as
long as the process. With the collector on, its full passes walk all of them
again and again while more are being made: about a fifth of the start-up CPU.
Loaded with it off, then frozen (``gc.freeze``), they are never walked again,
neither at start nor by the collections of a long-running daemon; objects made
afterwards are collected as usual. The few cycles the imports leave behind
(hundreds of objects) are frozen with them: kept, not leaked repeatedly.
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
