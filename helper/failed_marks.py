"""``helper clear-failed COMPONENT [VERSION]``: forget versions that failed, so they may be pushed again.

A version that failed or was rolled back is refused without ``force`` (baton/marks.py). After the cause is
fixed, an operator clears the mark here instead of handing every pusher the ``force`` power. The marks file
is written only under the component's update lock, so a running update is never raced: a busy component is
refused with a clear line. The high-water mark is not touched (a downgrade stays a downgrade).
"""

from __future__ import annotations

import argparse
import sys

from baton.config import Config
from baton.marks import Marks
from helper.locks import ComponentBusy, ComponentLock

CLEAR_FAILED_EPILOG = """example:
  helper --status                         # the FAILED column lists the versions refused without force
  helper clear-failed app 1.3.0           # 1.3.0 may be pushed again without force
  helper clear-failed app                 # forget every failed version of app
"""


def cmd_clear_failed(cfg: Config, ns: argparse.Namespace) -> int:
    from baton.admission import updatable_components

    known = updatable_components(cfg)
    if ns.component not in known:
        print(f"helper clear-failed: unknown component {ns.component!r}; updatable: {', '.join(known) or 'none'}",
              file=sys.stderr)
        return 2
    marks = Marks(cfg.node.state_dir)
    try:
        with ComponentLock(cfg.node.state_dir, ns.component):
            gone = marks.clear_failed(ns.component, ns.version)
    except ComponentBusy as e:
        print(f"helper clear-failed: {e}; try again when it is final", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"helper clear-failed: cannot write the marks of {ns.component}: {e.strerror or e}", file=sys.stderr)
        return 1
    if not gone:
        what = f"version {ns.version} of {ns.component} is" if ns.version else f"no version of {ns.component} is"
        print(f"{what} not marked failed; nothing to clear")
        return 0
    print(f"{ns.component}: forgot failed {', '.join(gone)}; {'it' if len(gone) == 1 else 'they'} may be pushed "
          "again without force")
    return 0


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    c = sub.add_parser("clear-failed", help="forget failed versions of COMPONENT (pushable again without force)",
                       epilog=CLEAR_FAILED_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--config", "-c", dest="config", default=argparse.SUPPRESS)
    c.add_argument("component")
    c.add_argument("version", nargs="?", default=None, help="one version (default: all of them)")
    c.set_defaults(fn_cfg=cmd_clear_failed, audit_call="clear-failed")
