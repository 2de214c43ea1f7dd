"""The supervisor's Prometheus metrics, computed at scrape time (imported only when ``[metrics] listen`` is set).

Agents come from the process manager (read on the event loop, so a scrape sees
a consistent snapshot); updates, step durations and handovers from the update
journal; helper runs from the update manager. ``baton_updates_finished_total``
comes from running totals that pruning the journal never lowers
(``supervisor/update_totals.py``). Uptimes are start times (the
``process_start_time_seconds`` convention): a gauge of seconds since start is
stale the moment it is scraped, and a start time also says when it restarted.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector

from baton.bounded_http import HttpLimits
from baton.config import SUPERVISOR_COMPONENT
from baton.journal import Journal
from baton.metrics import MetricsServer
from baton.states import AgentState
from supervisor.agents import AgentSnapshot

SNAPSHOT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class _Snapshot:
    agents: list[AgentSnapshot]
    helper_runs: int
    helpers_running: int
    manager_configured: bool
    manager_connected: bool


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
        yield from self._agents(snap)
        yield from self._updates()
        info = GaugeMetricFamily("baton_supervisor_info", "This supervisor", labels=["node", "version"])
        info.add_metric([self.sup.cfg.node.id, self.sup.version], 1)
        yield info
        yield GaugeMetricFamily("baton_supervisor_start_time_seconds",
                                "When this supervisor process started (Unix epoch seconds)",
                                value=self.sup.started_at)
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

    def _agents(self, snap: _Snapshot) -> Iterator[Metric]:
        by_state = GaugeMetricFamily("baton_agents", "Agents by state", labels=["state"])
        counts = Counter(a.state for a in snap.agents)
        for state in AgentState:
            by_state.add_metric([state.value], counts.get(state, 0))
        yield by_state
        restarts = CounterMetricFamily("baton_agent_restarts", "Restarts of the agent since it was first started",
                                       labels=["agent"])
        started = GaugeMetricFamily("baton_agent_start_time_seconds",
                                    "When the agent's process started (Unix epoch seconds; none while it has none)",
                                    labels=["agent"])
        version = GaugeMetricFamily("baton_agent_version_info", "1 for the version of each packaged agent installed",
                                    labels=["agent", "version"])
        last_exit = GaugeMetricFamily("baton_agent_last_exit_status",
                                      "The agent's last exit code, or -N for signal N", labels=["agent"])
        up = GaugeMetricFamily("baton_agent_up", "1 while the agent is running", labels=["agent"])
        for a in snap.agents:
            restarts.add_metric([a.name], a.restarts)
            if a.pid and a.start_time:
                started.add_metric([a.name], a.start_time)
            if a.version:  # a packaged agent's installed version; a plain command has none
                version.add_metric([a.name, a.version], 1)
            if a.last_exit_status is not None:
                last_exit.add_metric([a.name], a.last_exit_status)
            up.add_metric([a.name], int(a.state == AgentState.RUNNING))
        yield from (restarts, started, version, last_exit, up)

    def _updates(self) -> Iterator[Metric]:
        records = self.journal.all()
        by_state = GaugeMetricFamily("baton_updates", "Updates in the journal by component and state",
                                     labels=["component", "state"])
        for (comp, state), n in sorted(Counter((r.component, r.state.value) for r in records).items()):
            by_state.add_metric([comp, state], n)
        yield by_state
        finished = CounterMetricFamily("baton_updates_finished", "Finished updates by component and result",
                                       labels=["component", "result"])
        for (comp, result), n in sorted(self.sup.updates.totals.finished(self.journal).items()):
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
    m = sup.cfg.metrics
    limits = HttpLimits(head_timeout_s=m.http_head_timeout_s, idle_timeout_s=m.http_idle_timeout_s)
    return MetricsServer(host, port, [SupervisorCollector(sup, asyncio.get_running_loop())], limits)
