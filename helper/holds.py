"""``helper hold COMPONENT [--reason ...]`` and ``helper unhold COMPONENT``: pin a component's version.

Run as root on the host: a hold is a file under the state directory
(baton/holds.py), so placing one needs no running supervisor, and a supervisor
that is down when it is placed honours it at its next start.
"""

from __future__ import annotations

import argparse
import sys

from baton.config import Config
from baton.holds import HoldError, Holds

HOLD_EPILOG = """example:
  helper hold app --reason "payroll run until Friday"   # pushes for app are now refused
  helper --status                                        # shows the hold
  helper unhold app                                      # pushes are accepted again
"""


def _known(cfg: Config, component: str) -> str | None:
    from baton.admission import updatable_components

    known = updatable_components(cfg)
    if component in known:
        return None
    return f"unknown component {component!r}; updatable: {', '.join(known) or 'none'}"


def cmd_hold(cfg: Config, ns: argparse.Namespace) -> int:
    problem = _known(cfg, ns.component)
    if problem:
        print(f"helper hold: {problem}", file=sys.stderr)
        return 2
    try:
        hold = Holds(cfg.node.state_dir).hold(ns.component, ns.reason or "")
    except (HoldError, OSError) as e:
        print(f"helper hold: {e}", file=sys.stderr)
        return 1
    print(f"{hold.describe()}; pushes for it are refused until `helper unhold {hold.component}`")
    return 0


def cmd_unhold(cfg: Config, ns: argparse.Namespace) -> int:
    try:
        removed = Holds(cfg.node.state_dir).unhold(ns.component)
    except (HoldError, OSError) as e:
        print(f"helper unhold: {e}", file=sys.stderr)
        return 1
    print(f"{ns.component}: hold removed; pushes are accepted again" if removed
          else f"{ns.component}: was not held")
    return 0


def status_lines(cfg: Config) -> list[str]:
    """The holds section of ``helper --status``."""
    holds = Holds(cfg.node.state_dir).all()
    if not holds:
        return ["no hold"]
    return ["holds:", *(f"  {h.describe()}" for h in holds)]


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    h = sub.add_parser("hold", help="refuse pushes for COMPONENT until unhold", epilog=HOLD_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    h.add_argument("--config", "-c", dest="config", default=argparse.SUPPRESS)
    h.add_argument("component")
    h.add_argument("--reason", default="", help="why (shown in refusals and status)")
    h.set_defaults(fn_cfg=cmd_hold, audit_call="hold")
    u = sub.add_parser("unhold", help="accept pushes for COMPONENT again", epilog=HOLD_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    u.add_argument("--config", "-c", dest="config", default=argparse.SUPPRESS)
    u.add_argument("component")
    u.set_defaults(fn_cfg=cmd_unhold, audit_call="unhold")
