"""The reference Manager's Prometheus metrics (``baton-manager serve --metrics 127.0.0.1:PORT``).

Computed from the store at scrape time: nodes online or offline (seen within
``offline_after_s``), updates by component and state, finished updates by
result, rollouts by state. Imported only when ``--metrics`` is given.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from baton.bounded_http import HttpLimits
from baton.metrics import MetricsServer
from baton.states import UpdateState
from manager.store import Store

DEFAULT_HEARTBEAT_S = 10.0  # the supervisors' default manager.heartbeat_interval_s
MISSED_HEARTBEATS = 3


class ManagerCollector(Collector):
    def __init__(self, store: Store, offline_after_s: float) -> None:
        self.store = store
        self.offline_after_s = offline_after_s

    def collect(self) -> Iterator[Metric]:
        now = time.time()
        nodes = self.store.nodes()
        online = {n.id: now - n.last_seen <= self.offline_after_s for n in nodes}
        by_status = GaugeMetricFamily("baton_manager_nodes", "Registered nodes, online (heard from within "
                                      f"{self.offline_after_s:g}s) or offline", labels=["status"])
        by_status.add_metric(["online"], sum(online.values()))
        by_status.add_metric(["offline"], len(nodes) - sum(online.values()))
        yield by_status
        node_online = GaugeMetricFamily("baton_manager_node_online", "1 while the node is online", labels=["node"])
        for node_id, is_online in sorted(online.items()):
            node_online.add_metric([node_id], int(is_online))
        yield node_online
        updates = self.store.updates()
        by_state = GaugeMetricFamily("baton_manager_updates", "Recorded updates by component and state",
                                     labels=["component", "state"])
        for (comp, state), n in sorted(Counter((u.component, u.state.value) for u in updates).items()):
            by_state.add_metric([comp, state], n)
        yield by_state
        finished = CounterMetricFamily("baton_manager_updates_finished", "Finished updates by component and result",
                                       labels=["component", "result"])
        results = {UpdateState.COMMITTED: "committed", UpdateState.FAILED: "failed",
                   UpdateState.ROLLED_BACK: "rolled_back"}
        for (comp, result), n in sorted(Counter((u.component, results[u.state]) for u in updates
                                                if u.state in results).items()):
            finished.add_metric([comp, result], n)
        yield finished
        rollouts = GaugeMetricFamily("baton_manager_rollouts", "Rollouts by state", labels=["state"])
        for state, n in sorted(Counter(r.state for r in self.store.rollouts()).items()):
            rollouts.add_metric([state], n)
        yield rollouts


def start_metrics(store: Store, host: str, port: int, heartbeat_interval_s: float,
                  limits: HttpLimits | None = None) -> MetricsServer:
    offline_after = MISSED_HEARTBEATS * (heartbeat_interval_s or DEFAULT_HEARTBEAT_S)
    return MetricsServer(host, port, [ManagerCollector(store, offline_after)], limits).start()
