"""What an operator can do by hand: see versions and unfinished updates, roll back.

``helper --rollback AGENT`` switches the agent back to its previous good
version (the highest installed one below the current that is not marked failed,
or ``--to VERSION``) and restarts it through the supervisor; when the
supervisor is down it only switches the link, and the next supervisor start
runs the old version. The version rolled away from (to a lower one) is marked
failed, so a second rollback never moves forward to it. With ``--to`` the
operator names the version: nothing is marked failed (the one left may be
good), the named one loses any failed mark (choosing it is the operator's
word that it is good), and going to a newer version is said as such.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from baton.config import SUPERVISOR_COMPONENT, Config
from baton.errors import BatonError
from baton.journal import Journal
from baton.layout import ComponentLayout
from baton.marks import Marks
from baton.versions import compare_versions, previous_good
from helper.control import HealthCheckFailed, SupervisorControl, SupervisorUnavailable
from helper.locks import ComponentLock


class RollbackError(BatonError):
    pass


def components(cfg: Config) -> list[str]:
    return [a.name for a in cfg.agents if a.packaged] + [SUPERVISOR_COMPONENT]


def rollback_component(cfg: Config, named: str | None) -> str:
    """The component ``helper --rollback [COMPONENT]`` means: the one named, or the only one there is.

    Raises:
        RollbackError: none named while there is more than one to choose from (a bare ``--rollback`` once
            meant the supervisor, a surprise on a host whose operator meant an agent).
    """
    if named is not None:
        return named
    choices = components(cfg)
    if len(choices) == 1:
        return choices[0]
    raise RollbackError(f"name the component to roll back: one of {', '.join(choices)} "
                        "(helper --rollback COMPONENT)")


def moved(cur: str | None, target: str) -> str:
    """How a switch reads: "rolled back 2.0 -> 1.0", or "moved forward 1.0 -> 2.0 (a newer version)"."""
    if cur and compare_versions(target, cur) > 0:
        return f"moved forward {cur} -> {target} (a newer version)"
    return f"rolled back {cur or '-'} -> {target}"


def status_report(cfg: Config) -> str:
    marks = Marks(cfg.node.state_dir)
    rows = [("COMPONENT", "CURRENT", "BACKUPS (newest first)", "HIGHEST", "FAILED")]
    for comp in components(cfg):
        layout = ComponentLayout(cfg.node.install_root, comp)
        cur = layout.current_version()
        backups = [v for v in layout.installed_versions() if v != cur]
        rows.append((comp, cur or "-", ", ".join(backups) or "-", marks.highest(comp) or "-",
                     ", ".join(marks.failed(comp)) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    unfinished = Journal(cfg.node.state_dir).unfinished()
    out.append("")
    if unfinished:
        out.append("unfinished updates:")
        out += [f"  {r.update_id}  {r.component} {r.from_version or '-'} -> {r.to_version}  {r.state.value}"
                for r in unfinished]
    else:
        out.append("no unfinished update")
    return "\n".join(out)


def rollback_target(cfg: Config, component: str, to: str | None = None) -> tuple[str | None, str]:
    """(current, target) of a manual rollback: ``to`` if given, else the previous good version.

    Raises:
        RollbackError: ``to`` is not installed or is current, or there is no earlier good version.
    """
    layout = ComponentLayout(cfg.node.install_root, component)
    cur = layout.current_version()
    if to is not None:
        if to == cur:
            raise RollbackError(f"{component}: {to} is already the current version")
        if not layout.is_installed(to):
            installed = ", ".join(layout.installed_versions()) or "none"
            raise RollbackError(f"{component}: version {to} is not installed (installed: {installed})")
        return cur, to
    failed = Marks(cfg.node.state_dir).failed(component)
    target = previous_good(layout.installed_versions(), cur, failed)
    if target is None:
        skipped = [v for v in layout.installed_versions() if v != cur]
        why = f"; not going to {', '.join(skipped)} (newer or marked failed; use --to VERSION)" if skipped else ""
        raise RollbackError(f"{component}: no earlier good version installed to roll back to "
                            f"(current {cur or '-'}){why}")
    return cur, target


@contextmanager
def switched_back(cfg: Config, component: str, to: str | None = None,
                  before_switch: Callable[[], None] = lambda: None) -> Iterator[tuple[str | None, str]]:
    """Under the component's lock: ``current`` -> the rollback target; yields (current before, target).

    Without ``to``, the version rolled away from (to a lower one) is marked failed, so it is never chosen
    again automatically. With ``to``, nothing is marked and ``to`` loses its failed mark. The lock is held
    until the block (restarting what now is current) ends.
    """
    layout = ComponentLayout(cfg.node.install_root, component)
    marks = Marks(cfg.node.state_dir)
    with ComponentLock(cfg.node.state_dir, component):
        cur, target = rollback_target(cfg, component, to)
        before_switch()
        layout.switch(target)
        if to is not None:
            marks.clear_failed(component, target)
        elif cur and compare_versions(target, cur) < 0:
            marks.record_failure(component, cur)
        yield cur, target


def manual_rollback(cfg: Config, component: str, to: str | None = None) -> str:
    """``helper --rollback AGENT`` (the supervisor goes through ``helper.self_update.rollback_supervisor``)."""
    if component not in components(cfg):
        raise RollbackError(f"unknown component {component!r}; known: {', '.join(components(cfg))}")
    if component == SUPERVISOR_COMPONENT:
        raise RollbackError("the supervisor is rolled back by helper.self_update.rollback_supervisor (a handover)")
    with switched_back(cfg, component, to) as (cur, target):
        control = SupervisorControl(cfg.control_socket, rpc_timeout_s=10.0)
        try:
            if not control.reachable():
                return (f"{component}: switched {cur} -> {target}; the supervisor is not running, "
                        f"so the next start runs {target}")
            control.restart(component)
            control.wait_healthy(component, target, cfg.update.health_timeout_s, 0.0)
        except (SupervisorUnavailable, HealthCheckFailed) as e:
            raise RollbackError(f"{component}: switched {cur} -> {target}, but: {e}") from None
        finally:
            control.close()
    return f"{component}: {moved(cur, target)}; running"
