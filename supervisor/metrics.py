"""The supervisor's Prometheus metrics, computed at scrape time (imported only when ``[metrics] listen`` is set).

Agents come from the process manager (read on the event loop, so a scrape sees
a consistent snapshot); updates, step durations and handovers from the update
journal; helper runs from the update manager. Counters derived from the
journal (``baton_updates_finished_total``) count the records it keeps.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector

from baton.config import SUPERVISOR_COMPONENT
from baton.journal import Journal
from baton.metrics import MetricsServer
from baton.states import AgentState, UpdateState
from supervisor.agents import AgentSnapshot

SNAPSHOT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class _Snapshot:
    agents: list[AgentSnapshot]
    helper_runs: int
    helpers_running: int
    manager_configured: bool
    manager_connected: bool


def update_result(state: UpdateState) -> str | None:
    """committed / failed / rolled_back for a final state, None otherwise."""
    return {UpdateState.COMMITTED: "committed", UpdateState.FAILED: "failed",
            UpdateState.ROLLED_BACK: "rolled_back"}.get(state)


class SupervisorCollector(Collector):
    def __init__(self, sup: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.sup = sup  # supervisor.daemon.Supervisor
        self.loop = loop
        self.journal = Journal(sup.cfg.node.state_dir)

    async def _take(self) -> _Snapshot:
        pm, updates = self.sup.pm, self.sup.updates
        return _Snapshot(
            agents=pm.snapshots(),
            helper_runs=sum(updates.starts.values()),
            helpers_running=len(updates.helpers),
            manager_configured=bool(self.sup.cfg.manager.address),
            manager_connected=bool(self.sup.connected),
        )

    def collect(self) -> Iterator[Metric]:
        snap = asyncio.run_coroutine_threadsafe(self._take(), self.loop).result(SNAPSHOT_TIMEOUT_S)
        now = time.time()
        yield from self._agents(snap, now)
        yield from self._updates()
        info = GaugeMetricFamily("baton_supervisor_info", "This supervisor", labels=["node", "version"])
        info.add_metric([self.sup.cfg.node.id, self.sup.version], 1)
        yield info
        yield GaugeMetricFamily("baton_supervisor_uptime_seconds", "Seconds since this supervisor process started",
                                value=now - self.sup.started_at)
        yield CounterMetricFamily("baton_helper_runs", "Helper processes this supervisor process started",
                                  value=snap.helper_runs)
        yield GaugeMetricFamily("baton_helpers_running", "Helper processes running now", value=snap.helpers_running)
        yield GaugeMetricFamily("baton_manager_configured", "1 when a Manager address is configured",
                                value=int(snap.manager_configured))
        yield GaugeMetricFamily("baton_manager_connected", "1 while connected to the Manager",
                                value=int(snap.manager_connected))
        refused = bool(self.sup.updates.refused_because())
        yield GaugeMetricFamily("baton_updates_refused", "1 while every update is refused (broken trust material: "
                                "supervisor status says which key)", value=int(refused))

    def _agents(self, snap: _Snapshot, now: float) -> Iterator[Metric]:
        by_state = GaugeMetricFamily("baton_agents", "Agents by state", labels=["state"])
        counts = Counter(a.state for a in snap.agents)
        for state in AgentState:
            by_state.add_metric([state.value], counts.get(state, 0))
        yield by_state
        restarts = CounterMetricFamily("baton_agent_restarts", "Restarts of the agent since it was first started",
                                       labels=["agent"])
        uptime = GaugeMetricFamily("baton_agent_uptime_seconds", "Seconds the agent's process has run (0: none)",
                                   labels=["agent"])
        last_exit = GaugeMetricFamily("baton_agent_last_exit_status",
                                      "The agent's last exit code, or -N for signal N", labels=["agent"])
        up = GaugeMetricFamily("baton_agent_up", "1 while the agent is running", labels=["agent"])
        for a in snap.agents:
            restarts.add_metric([a.name], a.restarts)
            uptime.add_metric([a.name], max(now - a.start_time, 0.0) if a.pid and a.start_time else 0.0)
            if a.last_exit_status is not None:
                last_exit.add_metric([a.name], a.last_exit_status)
            up.add_metric([a.name], int(a.state == AgentState.RUNNING))
        yield from (restarts, uptime, last_exit, up)

    def _updates(self) -> Iterator[Metric]:
        records = self.journal.all()
        by_state = GaugeMetricFamily("baton_updates", "Updates in the journal by component and state",
                                     labels=["component", "state"])
        for (comp, state), n in sorted(Counter((r.component, r.state.value) for r in records).items()):
            by_state.add_metric([comp, state], n)
        yield by_state
        finished = CounterMetricFamily("baton_updates_finished", "Finished updates by component and result",
                                       labels=["component", "result"])
        results = Counter((r.component, update_result(r.state)) for r in records if r.final and r.settled)
        for (comp, result), n in sorted(results.items(), key=str):
            if result is not None:
                finished.add_metric([comp, result], n)
        yield finished
        steps = SummaryMetricFamily("baton_update_step_seconds", "Duration of each update step (from the journal)",
                                    labels=["component", "step"])
        sums: dict[tuple[str, str], tuple[int, float]] = {}
        handovers: list[float] = []
        for r in records:
            for step, seconds in r.timings.items():
                n, total = sums.get((r.component, step), (0, 0.0))
                sums[(r.component, step)] = (n + 1, total + seconds)
                if r.component == SUPERVISOR_COMPONENT and step == "handover":
                    handovers.append(seconds)
        for (comp, step), (n, total) in sorted(sums.items()):
            steps.add_metric([comp, step], count_value=n, sum_value=total)
        yield steps
        yield SummaryMetricFamily("baton_handover_seconds", "Self-update handovers: old supervisor to new",
                                  count_value=len(handovers), sum_value=sum(handovers))


def metrics_server(sup: Any, host: str, port: int) -> MetricsServer:
    """The supervisor's metrics endpoint, not yet bound (``start(retry=True)`` binds it)."""
    return MetricsServer(host, port, [SupervisorCollector(sup, asyncio.get_running_loop())])
