"""The running supervisor's own version.

An installed supervisor version lives at ``<install_root>/supervisor/versions/X/``
with its code in ``lib/`` and its version in ``VERSION``; a development checkout
falls back to the package version.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import baton


@cache
def supervisor_version() -> str:
    marker = Path(__file__).resolve().parents[2] / "VERSION"
    try:
        v = marker.read_text().strip()
    except OSError:
        v = ""
    return v or baton.__version__
