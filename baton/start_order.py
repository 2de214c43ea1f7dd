"""The order agents start in (``priority``, lower first, and ``after = ["name", ...]``), and stop in reverse.

One function, :func:`start_order`, used by the config check (an unknown name or a cycle is refused there,
naming the key) and by the supervisor: agents named in ``after`` come first whatever their priority; among
agents free to start, the lower priority, then the earlier section in the file, goes first.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

from baton.errors import KeyedError


class OrderError(KeyedError):
    """An ``after`` naming no agent, the agent itself, or a cycle, naming its key."""


@dataclass(frozen=True)
class Ordered:
    """What ordering needs of one agent section."""

    name: str
    priority: int
    after: tuple[str, ...]


def start_order(agents: Sequence[Ordered]) -> list[str]:
    """The names in start order; OrderError naming ``agents[i].after[j]`` (unknown) or ``agents[i].after``
    (a cycle)."""
    index = {a.name: i for i, a in enumerate(agents)}
    waiting_on: dict[str, int] = {}
    unblocks: dict[str, list[str]] = {a.name: [] for a in agents}
    for i, a in enumerate(agents):
        deps = set()
        for j, dep in enumerate(a.after):
            if dep not in index:
                raise OrderError(f"agents[{i}].after[{j}]", f"no agent named {dep!r}")
            if dep == a.name:
                raise OrderError(f"agents[{i}].after[{j}]", f"{a.name!r} cannot start after itself")
            deps.add(dep)
        waiting_on[a.name] = len(deps)
        for dep in deps:
            unblocks[dep].append(a.name)
    ready = [(a.priority, i, a.name) for i, a in enumerate(agents) if not waiting_on[a.name]]
    heapq.heapify(ready)
    out: list[str] = []
    while ready:
        _, _, name = heapq.heappop(ready)
        out.append(name)
        for n in unblocks[name]:
            waiting_on[n] -= 1
            if not waiting_on[n]:
                heapq.heappush(ready, (agents[index[n]].priority, index[n], n))
    if len(out) < len(agents):
        left = {a.name for a in agents if waiting_on[a.name]}
        stuck = next(a.name for a in agents if a.name in left)
        raise OrderError(f"agents[{index[stuck]}].after", f"a cycle: {_cycle(agents, index, left, stuck)}")
    return out


def _cycle(agents: Sequence[Ordered], index: dict[str, int], left: set[str], start: str) -> str:
    """``a -> b -> a``: following ``after`` from ``start`` through agents that never became free (each still
    waits on one of them) must come back to one already seen."""
    path = [start]
    while True:
        nxt = next(d for d in agents[index[path[-1]]].after if d in left)
        if nxt in path:
            return " -> ".join([*path[path.index(nxt):], nxt])
        path.append(nxt)
