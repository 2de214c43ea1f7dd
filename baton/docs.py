"""Where the operator's guides are on this host, so that an error names a file one can open here.

A release carries ``docs/*.md`` in ``share/doc/baton/`` (``manager/build/release.py``); a checkout has ``docs/``.
An error says ``/opt/baton/supervisor/versions/1.2.0/share/doc/baton/troubleshooting.md#failure-...`` on a
host, not a path of the source tree the operator may never have seen.
"""

from __future__ import annotations

from pathlib import Path

from baton.layout import DOCS_IN_CHECKOUT, DOCS_IN_VERSION


def guide(name: str, anchor: str = "") -> str:
    """The path of guide ``name`` (``troubleshooting.md``) in the running code's release or checkout, and anchor."""
    here = Path(__file__).resolve().parent.parent  # a checkout's root, or a release's lib/
    path = next((d / name for d in (here.parent / DOCS_IN_VERSION, here / DOCS_IN_CHECKOUT) if (d / name).is_file()),
                DOCS_IN_CHECKOUT / name)
    return f"{path}#{anchor}" if anchor else str(path)
