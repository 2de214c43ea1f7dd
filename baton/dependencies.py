"""Which distributions this process runs with: a release's bundled dependencies, for GetStatus.

Apart from :mod:`manager.build.release` (the release builder: tempfile, shutil, subprocess) so that a supervisor
answering GetStatus keeps none of those loaded.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def dependency_versions() -> dict[str, str]:
    """Every distribution on this process's ``sys.path``: a release's bundled dependencies.

    Reads the ``Name`` and ``Version`` headers of each ``*.dist-info/METADATA`` (``*.egg-info/PKG-INFO``) where
    importlib.metadata would find them, the first of a name winning: importlib.metadata's email parser would stay
    loaded in the supervisor (about 1 MiB) for this one answer.
    """
    found: dict[str, str] = {}
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:  # a zip file or a missing directory: no distributions there
            continue
        for d in names:
            meta = (Path(entry, d, "METADATA") if d.endswith(".dist-info")
                    else Path(entry, d, "PKG-INFO") if d.endswith(".egg-info") else None)
            if meta is None:
                continue
            headers = _metadata_headers(meta)
            name, version = headers.get("name"), headers.get("version")
            if name and version is not None:
                found.setdefault(name.lower().replace("_", "-"), version)
    return found


def _metadata_headers(path: Path) -> dict[str, str]:
    """The first ``Name`` and ``Version`` of a core-metadata file (its header ends at the first blank line)."""
    out: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    break
                key, sep, value = line.partition(":")
                if sep and key.lower() in ("name", "version"):
                    out.setdefault(key.lower(), value.strip())
    except OSError:
        pass
    return out
