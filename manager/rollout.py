"""A staged rollout: canary nodes first, then batches, halting when failures pass a threshold.

Semantics (docs/manager.md):

- the nodes are taken in the given order; the first ``canary`` of them form
  batch 0, the rest are cut into batches of ``batch_size``;
- a batch's updates run in parallel, and the next batch starts only when every
  update of this one is final;
- any canary failure halts the rollout; after that it halts once the failures
  counted over the whole rollout exceed ``max_failures``;
- a halted rollout leaves the remaining nodes untouched (``pending``).

Every step of every node is saved in the store before it is acted on, so a
rollout whose process dies can be resumed (``rollout --resume ID``): a node
``pending`` is pushed; ``pushing`` (the id was chosen, the push may or may not
have reached the node) asks the node with ``GetUpdate`` and pushes with the same
id only if it does not have it; ``running`` is followed by polling
``GetUpdate``, or taken from the supervisor's result if it arrived meanwhile.
No node is ever pushed twice.
"""

from __future__ import annotations

import enum
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from manager.errors import PushRefused, RolloutError
from manager.publish import PackageRef
from manager.push import NO_OPERATOR, ClientTls, Operator, Outcome, Pusher, PushOptions, Target, new_update_id, state_of
from manager.store import RolloutRow, Store

MAX_PARALLEL = 32


class RolloutState(enum.Enum):
    RUNNING = "running"
    COMPLETED = "completed"
    HALTED = "halted"


class NodeStep(enum.Enum):
    PENDING = "pending"  # untouched
    PUSHING = "pushing"  # update id chosen and recorded; the push may or may not have arrived
    RUNNING = "running"  # the node accepted it
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def done(self) -> bool:
        return self in (NodeStep.SUCCEEDED, NodeStep.FAILED)


@dataclass(frozen=True)
class RolloutSpec:
    package: PackageRef
    nodes: tuple[str, ...]
    canary: int = 1
    batch_size: int = 1
    max_failures: int = 0  # halt once more than this many nodes failed
    force: bool = False
    allow_downgrade: bool = False
    timeout_s: float = 600.0  # per update

    def __post_init__(self) -> None:
        if not self.nodes:
            raise RolloutError("a rollout needs at least one node")
        if len(set(self.nodes)) != len(self.nodes):
            raise RolloutError("a node is named twice")
        if self.canary < 0 or self.batch_size < 1 or self.max_failures < 0:
            raise RolloutError("canary must be 0 or more, batch size 1 or more, max failures 0 or more")

    def batches(self) -> list[tuple[str, ...]]:
        canary = self.nodes[:self.canary]
        rest = self.nodes[self.canary:]
        out = [canary] if canary else []
        return out + [rest[i:i + self.batch_size] for i in range(0, len(rest), self.batch_size)]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["package"] = self.package.to_json()
        d["nodes"] = list(self.nodes)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RolloutSpec:
        return cls(**{**d, "package": PackageRef.from_json(d["package"]), "nodes": tuple(d["nodes"])})


@dataclass(frozen=True)
class NodeProgress:
    step: NodeStep = NodeStep.PENDING
    batch: int = 0
    update_id: str = ""
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step.value, "batch": self.batch, "update_id": self.update_id, "error": self.error}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> NodeProgress:
        return cls(NodeStep(d["step"]), int(d["batch"]), d.get("update_id", ""), d.get("error", ""))


@dataclass(frozen=True)
class RolloutEvent:
    """What the progress display is told: a node's step changed, a batch began, the rollout ended."""

    kind: str  # "batch", "node", "update", "end"
    message: str
    node: str = ""


@dataclass
class RolloutReport:
    rollout_id: str
    state: RolloutState
    nodes: dict[str, NodeProgress] = field(default_factory=dict)
    reason: str = ""

    @property
    def failures(self) -> int:
        return sum(1 for p in self.nodes.values() if p.step == NodeStep.FAILED)


class Rollout:
    """One rollout, driven by ``run()``; create with ``Rollout.create`` or ``Rollout.resume``."""

    def __init__(self, store: Store, rollout_id: str, spec: RolloutSpec, progress: dict[str, NodeProgress],
                 addresses: Mapping[str, str], tls: ClientTls | None,
                 on_event: Callable[[RolloutEvent], None] | None = None, resumed: bool = False,
                 operator: Operator = NO_OPERATOR) -> None:
        self.store = store
        self.operator = operator  # who runs this process: recorded on each update it pushes
        self.id = rollout_id
        self.spec = spec
        self.progress = progress
        self.addresses = addresses
        self.tls = tls
        self.on_event = on_event or (lambda e: None)
        self.resumed = resumed
        self._lock = threading.Lock()

    @classmethod
    def create(cls, store: Store, spec: RolloutSpec, addresses: Mapping[str, str], tls: ClientTls | None,
               on_event: Callable[[RolloutEvent], None] | None = None, operator: Operator = NO_OPERATOR) -> Rollout:
        missing = [n for n in spec.nodes if not addresses.get(n)]
        if missing:
            raise RolloutError(f"no address for {', '.join(missing)} (not registered; use --node-address)")
        rollout_id = "r-" + uuid.uuid4().hex[:10]
        progress = {n: NodeProgress(batch=i) for i, batch in enumerate(spec.batches()) for n in batch}
        now = time.time()
        store.create_rollout(RolloutRow(rollout_id, spec.to_json(), RolloutState.RUNNING.value,
                                        _progress_json(progress), now, now, operator.name, operator.host))
        return cls(store, rollout_id, spec, progress, addresses, tls, on_event, operator=operator)

    @classmethod
    def resume(cls, store: Store, rollout_id: str, addresses: Mapping[str, str], tls: ClientTls | None,
               on_event: Callable[[RolloutEvent], None] | None = None, operator: Operator = NO_OPERATOR) -> Rollout:
        row = store.rollout(rollout_id)
        if row is None:
            raise RolloutError(f"no rollout {rollout_id!r}")
        if row.state != RolloutState.RUNNING.value:
            raise RolloutError(f"rollout {rollout_id} is {row.state}; only a running one can be resumed")
        spec = RolloutSpec.from_json(row.spec)
        progress = {n: NodeProgress.from_json(p) for n, p in row.progress["nodes"].items()}
        missing = [n for n, p in progress.items() if not p.step.done and not addresses.get(n)]
        if missing:
            raise RolloutError(f"no address for {', '.join(missing)} (not registered; use --node-address)")
        return cls(store, rollout_id, spec, progress, addresses, tls, on_event, resumed=True, operator=operator)

    # ---- the run -----------------------------------------------------------------------------------

    def run(self) -> RolloutReport:
        batches = self.spec.batches()
        for i, batch in enumerate(batches):
            todo = [n for n in batch if not self.progress[n].step.done]
            if todo:
                label = "canary" if i == 0 and self.spec.canary else f"batch {i}"
                self.on_event(RolloutEvent("batch", f"{label}: {', '.join(batch)}"))
                with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL, len(todo)),
                                        thread_name_prefix="rollout") as pool:
                    list(pool.map(self._drive, todo))
            reason = self._halt_reason(i, batch)
            if reason:
                untouched = [n for n, p in self.progress.items() if p.step == NodeStep.PENDING]
                if untouched:
                    reason += f"; {', '.join(untouched)} left untouched"
                return self._end(RolloutState.HALTED, reason)
        return self._end(RolloutState.COMPLETED, f"{self._count(NodeStep.SUCCEEDED)} of {len(self.progress)} "
                                                 "nodes updated")

    def _halt_reason(self, index: int, batch: tuple[str, ...]) -> str:
        failed_here = [n for n in batch if self.progress[n].step == NodeStep.FAILED]
        if index == 0 and self.spec.canary and failed_here:
            return f"the canary failed on {', '.join(failed_here)}"
        failures = self._count(NodeStep.FAILED)
        if failures > self.spec.max_failures:
            return f"{failures} failures, more than the {self.spec.max_failures} allowed"
        return ""

    def _count(self, step: NodeStep) -> int:
        return sum(1 for p in self.progress.values() if p.step == step)

    def _end(self, state: RolloutState, reason: str) -> RolloutReport:
        with self._lock:
            self.store.save_rollout(self.id, state.value, self._progress_doc(reason))
        self.on_event(RolloutEvent("end", f"{state.value}: {reason}"))
        return RolloutReport(self.id, state, dict(self.progress), reason)

    def _progress_doc(self, reason: str = "") -> dict[str, Any]:
        return {**_progress_json(self.progress), "reason": reason}

    def _set(self, node: str, **changes: Any) -> NodeProgress:
        """Saved before it is acted on: the store always knows at least as much as the nodes."""
        with self._lock:
            p = replace(self.progress[node], **changes)
            self.progress[node] = p
            self.store.save_rollout(self.id, RolloutState.RUNNING.value, self._progress_doc())
        self.on_event(RolloutEvent("node", f"{p.step.value}" + (f" ({p.update_id})" if p.update_id else "")
                                   + (f": {p.error}" if p.error else ""), node))
        return p

    def _drive(self, node: str) -> None:
        try:
            outcome = self._drive_one(node)
        except PushRefused as e:
            self._set(node, step=NodeStep.FAILED, error=str(e))
            return
        except Exception as e:  # one node's trouble must not take the batch down
            self._set(node, step=NodeStep.FAILED, error=f"{type(e).__name__}: {e}")
            return
        if outcome.success:
            self._set(node, step=NodeStep.SUCCEEDED, error="")
        else:
            self._set(node, step=NodeStep.FAILED,
                      error=outcome.error or f"ended {outcome.state.value}")

    def _drive_one(self, node: str) -> Outcome:
        p = self.progress[node]
        options = PushOptions(force=self.spec.force, allow_downgrade=self.spec.allow_downgrade,
                              timeout_s=self.spec.timeout_s, watch=p.step == NodeStep.PENDING,
                              operator=self.operator)
        if p.step == NodeStep.RUNNING:
            row = self.store.update(p.update_id)
            if row is not None and row.state.final:  # its result arrived while no rollout process ran
                self.on_event(RolloutEvent("update", f"{row.state.value} (result already recorded)", node))
                return Outcome(row.update_id, node, row.state, row.success, row.rolled_back, row.error)
        with Pusher(self.store, Target(node, self.addresses[node]), self.tls, options,
                    on_progress=self._progress_event) as pusher:
            if p.step == NodeStep.PENDING:
                p = self._set(node, step=NodeStep.PUSHING, update_id=new_update_id())
            if p.step == NodeStep.PUSHING:
                if not (self.resumed and pusher.has(p.update_id)):  # resumed: the push may have arrived
                    pusher.start(self.spec.package, p.update_id, rollout_id=self.id)
                p = self._set(node, step=NodeStep.RUNNING)
            return pusher.follow(p.update_id)

    def _progress_event(self, node: str, status: Any) -> None:
        text = state_of(status).value
        if status.finished:
            text += " (ok)" if status.success else f": {status.error}" if status.error else ""
        self.on_event(RolloutEvent("update", text, node))


def _progress_json(progress: dict[str, NodeProgress]) -> dict[str, Any]:
    return {"nodes": {n: p.to_json() for n, p in progress.items()}}
