"""Per-node call rates at ManagerService: one node's flood must not starve the others.

A token bucket per (kind of call, node) is checked before the store is touched; an empty bucket is answered
RESOURCE_EXHAUSTED at once, with the seconds until the next token in the trailing metadata
(``baton/throttle.py``), so a supervisor waits that long instead of asking again.
The node is the one the request names: with mutual TLS its certificate must name it too (manager/service.py),
so a node can only spend its own buckets; without TLS (``--insecure-loopback``) every caller is trusted anyway.

The limits are ``CallLimits``, defined once here. A well-behaved supervisor registers once per connection and
calls about once per ``heartbeat_interval_s`` (10 s) plus one SyncAgentStates per agent change (coalesced over
0.2 s) and one ReportUpdateResult per update, so the defaults leave it a wide margin.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


class CallKind(enum.Enum):
    """Which bucket a ManagerService method draws from."""

    REGISTER = "Register"  # the expensive one: a row rewritten, the node's address changed
    REPORT = "Heartbeat, SyncAgentStates and ReportUpdateResult"


@dataclass(frozen=True)
class Bucket:
    rate_per_s: float  # tokens added per second
    burst: int  # the most tokens a bucket holds: calls answered at once after a quiet spell


@dataclass(frozen=True)
class CallLimits:
    register: Bucket = Bucket(rate_per_s=1.0, burst=5)
    report: Bucket = Bucket(rate_per_s=20.0, burst=50)
    max_tracked: int = 100_000  # buckets kept in memory; full (idle) ones are dropped first beyond this

    def of(self, kind: CallKind) -> Bucket:
        return self.register if kind is CallKind.REGISTER else self.report


class NodeRateLimiter:
    """Token buckets keyed by (kind, node id); safe to share between the service's worker threads."""

    def __init__(self, limits: CallLimits | None = None, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits or CallLimits()
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._tokens: dict[tuple[CallKind, str], tuple[float, float]] = {}  # -> (tokens, when counted)

    def admit(self, kind: CallKind, node_id: str) -> float:
        """Take a token: 0.0 when the call may go on, else the seconds until the next token."""
        bucket = self.limits.of(kind)
        now = self._monotonic()
        with self._lock:
            tokens, then = self._tokens.get((kind, node_id), (float(bucket.burst), now))
            tokens = min(float(bucket.burst), tokens + (now - then) * bucket.rate_per_s)
            if tokens < 1.0:
                self._tokens[(kind, node_id)] = (tokens, now)
                return (1.0 - tokens) / bucket.rate_per_s
            self._tokens[(kind, node_id)] = (tokens - 1.0, now)
            if len(self._tokens) > self.limits.max_tracked:
                self._forget_idle(now)
            return 0.0

    def _forget_idle(self, now: float) -> None:
        """Drop the buckets that have filled up again (forgetting one changes nothing), else the first-made half."""
        full = [k for k, (tokens, then) in self._tokens.items()
                if tokens + (now - then) * self.limits.of(k[0]).rate_per_s >= self.limits.of(k[0]).burst]
        for k in full:
            del self._tokens[k]
        if len(self._tokens) > self.limits.max_tracked:
            for k in list(self._tokens)[: len(self._tokens) // 2]:
                del self._tokens[k]
