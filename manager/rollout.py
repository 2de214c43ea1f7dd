"""A staged rollout: canary nodes first, then batches, halting when failures pass a threshold.

A rollout is a row in the store; ``baton-manager rollout`` only submits it and
follows it. The ``serve`` processes carry it out (:class:`RolloutRunner`): the
replica that claims it holds a lease in the database and renews it; when that
replica dies, another claims the rollout once the lease has run out and
continues from what the store says (docs/manager.md).

Semantics:

- the nodes are taken in the given order; the first ``canary`` of them form
  batch 0, the rest are cut into batches of ``batch_size``;
- a batch's updates run in parallel, at most ``max_parallel`` at once, and the
  next batch starts only when every update of this one is final;
- any canary failure halts the rollout (so does a canary that could not be
  reached at all); after that it halts once the failures counted over the whole
  rollout exceed ``max_failures``;
- a halted rollout leaves the remaining nodes untouched (``pending``);
- a node that cannot be reached when its turn comes is ``offline``: the batches
  go on, and it is pushed (with the same update id) when it heartbeats again;
  still offline ``offline_wait_s`` after the last batch, it is ``skipped``;
- ``pause`` stops new pushes and lets running updates finish; ``cancel`` stops
  new pushes, asks the nodes to cancel the running ones (DaemonService.CancelUpdate)
  and ends ``cancelled``, each node's outcome recorded.

Every step of every node is saved in the store before it is acted on, and only
while the saver still owns the rollout, so no node is ever pushed twice: a node
``pending`` is pushed; ``pushing`` (the id was chosen, the push may or may not
have reached the node) asks the node with ``GetUpdate`` and pushes with the same
id only if it does not have it; ``running`` is followed by polling
``GetUpdate``, or taken from the supervisor's result if it arrived meanwhile.
"""

from __future__ import annotations

import contextlib
import enum
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from baton.log import logger
from baton.states import UpdateState
from manager.errors import NodeOffline, PushRefused, RolloutError
from manager.publish import PackageRef
from manager.push import NO_OPERATOR, ClientTls, Operator, Outcome, Pusher, PushOptions, Target, new_update_id, state_of
from manager.store import RolloutNodeRow, RolloutRow, Store, UpdateRow

MAX_PARALLEL = 32
TICK_S = 0.2  # how often the owner looks at the store (control, reconnected nodes) and its workers
DEFAULT_LEASE_S = 15.0
OFFLINE_WAIT_S = 300.0


class RolloutState(enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    HALTED = "halted"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (RolloutState.COMPLETED, RolloutState.HALTED, RolloutState.CANCELLED)


class NodeStep(enum.Enum):
    PENDING = "pending"  # untouched
    PUSHING = "pushing"  # update id chosen and recorded; the push may or may not have arrived
    RUNNING = "running"  # the node accepted it
    OFFLINE = "offline"  # unreachable when its turn came: pushed (same id) when it heartbeats again
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"  # offline for the whole rollout
    CANCELLED = "cancelled"  # never pushed: the rollout was cancelled first

    @property
    def done(self) -> bool:
        return self in (NodeStep.SUCCEEDED, NodeStep.FAILED, NodeStep.SKIPPED, NodeStep.CANCELLED)

    @property
    def active(self) -> bool:
        return self in (NodeStep.PUSHING, NodeStep.RUNNING)


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
    max_parallel: int = MAX_PARALLEL  # nodes updating at once
    offline_wait_s: float = OFFLINE_WAIT_S  # after the last batch, for offline nodes to come back
    addresses: dict[str, str] = field(default_factory=dict)  # NODE -> HOST:PORT instead of the registered one
    selector: dict[str, str] = field(default_factory=dict)  # the labels the nodes were chosen by, if any

    def __post_init__(self) -> None:
        if not self.nodes:
            raise RolloutError("a rollout needs at least one node")
        if len(set(self.nodes)) != len(self.nodes):
            raise RolloutError("a node is named twice")
        if self.canary < 0 or self.batch_size < 1 or self.max_failures < 0:
            raise RolloutError("canary must be 0 or more, batch size 1 or more, max failures 0 or more")
        if self.max_parallel < 1:
            raise RolloutError("max parallel must be 1 or more")
        if not self.timeout_s > 0 or self.offline_wait_s < 0:
            raise RolloutError("the timeout must be greater than 0 and the offline wait 0 or more")

    def batches(self) -> list[tuple[str, ...]]:
        canary = self.nodes[:self.canary]
        rest = self.nodes[self.canary:]
        out = [canary] if canary else []
        return out + [rest[i:i + self.batch_size] for i in range(0, len(rest), self.batch_size)]

    def batch_label(self, index: int) -> str:
        return "canary" if index == 0 and self.canary else f"batch {index}"

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
    offline_since: float = 0.0  # when it was found unreachable (a heartbeat after this brings it back)
    cancel: str = ""  # what came of asking the node to cancel its update

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step.value, "batch": self.batch, "update_id": self.update_id, "error": self.error,
                "offline_since": self.offline_since, "cancel": self.cancel}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> NodeProgress:
        return cls(NodeStep(d["step"]), int(d["batch"]), d.get("update_id", ""), d.get("error", ""),
                   float(d.get("offline_since", 0.0)), d.get("cancel", ""))


DOWNLOAD_BASE_KEY = "rollout_download_base:"  # + rollout id: its package's served bytes when it was submitted


def new_rollout(store: Store, spec: RolloutSpec, operator: Operator = NO_OPERATOR) -> str:
    """Record a rollout for the serve replicas to carry out; returns its id."""
    known = {n.id: n for n in store.nodes()}
    missing = [n for n in spec.nodes if not spec.addresses.get(n) and not (n in known and known[n].address)]
    if missing:
        raise RolloutError(f"no address for {', '.join(missing)} (not registered; use --node-address)")
    rollout_id = "r-" + uuid.uuid4().hex[:10]
    now = time.time()
    store.create_rollout(RolloutRow(rollout_id, spec.to_json(), RolloutState.RUNNING.value, {"reason": ""}, now, now,
                                    started_by=operator.name, started_on=operator.host),
                         [RolloutNodeRow(n, batch=i) for i, batch in enumerate(spec.batches()) for n in batch])
    store.set_setting(DOWNLOAD_BASE_KEY + rollout_id, str(store.served_bytes(spec.package.sha256)))
    return rollout_id


def download_bytes(store: Store, row: RolloutRow) -> int:
    """Package bytes the Manager's package servers sent for this rollout's package since it was submitted.

    Counted per content address (``Store.served_bytes``), so another push of the same package at the same
    time counts too; a package fetched from elsewhere (``--url``) counts 0.
    """
    base = store.setting(DOWNLOAD_BASE_KEY + row.id)
    sha256 = str(row.spec.get("package", {}).get("sha256", ""))
    return max(0, store.served_bytes(sha256) - int(base)) if base and sha256 else 0


class LostLease(Exception):
    """Another replica owns the rollout now (or this serve is stopping): stop acting on it at once."""


class RolloutDriver:
    """Carries out one rollout while ``owner`` holds its lease; ``run()`` returns when it ends or is lost."""

    def __init__(self, store: Store, rollout_id: str, owner: str, tls: ClientTls | None,
                 lease_s: float = DEFAULT_LEASE_S, stop: threading.Event | None = None) -> None:
        row = store.rollout(rollout_id)
        if row is None:
            raise RolloutError(f"no rollout {rollout_id!r}")
        self.store = store
        self.id = rollout_id
        self.owner = owner
        self.tls = tls
        self.lease_s = lease_s
        self.stop = stop or threading.Event()
        self.spec = RolloutSpec.from_json(row.spec)
        self.progress = {n: NodeProgress.from_json(p) for n, p in row.progress["nodes"].items()}
        self._position = {n: i for i, n in enumerate(self.spec.nodes)}
        self.offline_deadline = float(row.progress.get("offline_deadline", 0.0))
        # Steps found PUSHING were saved by an earlier owner: that push may have arrived.
        self._maybe_sent = {n for n, p in self.progress.items() if p.update_id}
        self.state = RolloutState(row.state)
        self.reason = str(row.progress.get("reason", ""))
        self.operator = Operator(row.started_by, row.started_on)  # recorded on each update it pushes
        self._lock = threading.Lock()
        self._workers: dict[str, threading.Thread] = {}
        self._stopping = False  # no new pushes (cancelled, lost, or serve stopping)
        self._lost = False

    # ---- the store ---------------------------------------------------------------------------------

    def _fenced(self, saved: bool) -> None:
        """A save is made only while we own the rollout: one refused means another replica has it."""
        if not saved:
            self._lost = True
            raise LostLease(self.id)

    def _save(self) -> None:
        extra = {"offline_deadline": self.offline_deadline} if self.offline_deadline else {}
        self._fenced(self.store.save_rollout(self.id, self.state.value, {"reason": self.reason, **extra},
                                             owner=self.owner))

    def _set(self, node: str, **changes: Any) -> NodeProgress:
        """A node's step, saved before it is acted on: the store always knows at least as much as the nodes."""
        with self._lock:
            if self._lost:
                raise LostLease(self.id)
            p = replace(self.progress[node], **changes)
            self._fenced(self.store.save_rollout_node(self.id, RolloutNodeRow(
                node, p.batch, position=self._position[node], step=p.step.value, update_id=p.update_id, error=p.error,
                offline_since=p.offline_since, cancel=p.cancel), owner=self.owner))
            self.progress[node] = p
        logger.info("rollout {}: {} {}{}{}", self.id, node, p.step.value, f" ({p.update_id})" if p.update_id else "",
                    f": {p.error}" if p.error else "")
        return p

    def _set_state(self, state: RolloutState, reason: str = "") -> None:
        with self._lock:
            if (state, reason) == (self.state, self.reason):
                return
            self.state, self.reason = state, reason
            self._save()
        logger.info("rollout {} {}{}", self.id, state.value, f": {reason}" if reason else "")

    def _keep_lease(self, done: threading.Event) -> None:
        """Renew the lease every third of it, on its own thread so a slow call elsewhere cannot lose it."""
        while not done.wait(self.lease_s / 3):
            try:
                renewed = self.store.renew_lease(self.id, self.owner, self.lease_s)
            except Exception as e:  # the database blinked: the next try may work, within the lease
                logger.warning("rollout {}: lease not renewed: {!r}", self.id, e)
                continue
            if not renewed:
                self._lost = True
                return

    def _tick(self) -> str:
        """Returns the control asked ("", "pause", "cancel"); raises LostLease once the lease is gone."""
        if self._lost:
            raise LostLease(self.id)
        row = self.store.rollout(self.id, with_nodes=False)
        return row.control if row is not None else "cancel"

    # ---- the run -----------------------------------------------------------------------------------

    def run(self) -> RolloutState | None:
        """Until the rollout ends (its final state) or is lost or serve stops (None: another replica goes on)."""
        done = threading.Event()
        keeper = threading.Thread(target=self._keep_lease, args=(done,), name=f"lease-{self.id}", daemon=True)
        keeper.start()
        try:
            return self._run()
        except LostLease:
            if not self.stop.is_set():
                logger.warning("rollout {}: another replica owns it now; this one stops", self.id)
            return None
        finally:
            self._stopping = True
            done.set()

    def _run(self) -> RolloutState | None:
        if self.state.final:
            return self.state
        known = {n.node for n in self.store.rollout_nodes(self.id)}
        for node in self.progress:
            if node not in known:  # a rollout started before schema 3: its nodes get their rows first
                self._set(node)
        batches = self.spec.batches()
        for i, batch in enumerate(batches):
            ended = self._run_batch(i, batch)
            if ended is not None:
                return ended
            reason = self._halt_reason(i, batch)
            if reason:
                untouched = [n for n, p in self.progress.items() if p.step == NodeStep.PENDING]
                if untouched:
                    reason += f"; {', '.join(untouched)} left untouched"
                return self._end(RolloutState.HALTED, reason)
        if any(p.step == NodeStep.OFFLINE for p in self.progress.values()):
            if not self.offline_deadline:
                self.offline_deadline = time.time() + self.spec.offline_wait_s
                self._set_state(self.state, "waiting for offline nodes")
            ended = self._run_batch(len(batches), (), until=self.offline_deadline)
            if ended is not None:
                return ended
            for n, p in self.progress.items():
                if p.step == NodeStep.OFFLINE:
                    self._close_row(n, p, f"skipped: {n} was offline through the rollout")
                    self._set(n, step=NodeStep.SKIPPED, error=f"offline: {p.error}")
            reason = self._halt_reason(len(batches), ())
            if reason:
                return self._end(RolloutState.HALTED, reason)
        done = sum(1 for p in self.progress.values() if p.step == NodeStep.SUCCEEDED)
        skipped = sum(1 for p in self.progress.values() if p.step == NodeStep.SKIPPED)
        return self._end(RolloutState.COMPLETED, f"{done} of {len(self.progress)} nodes updated"
                                                 + (f", {skipped} skipped (offline)" if skipped else ""))

    def _run_batch(self, index: int, batch: tuple[str, ...], until: float = 0.0) -> RolloutState | None:
        """Drive one batch (and any offline node that came back) to its end.

        Returns None when the batch is done, a final state when the rollout ended (cancelled); raises
        LostLease when this replica must stop (serve stopping, or another replica took over).
        """
        todo = [n for n in batch if self.progress[n].step != NodeStep.OFFLINE and not self.progress[n].step.done]
        while True:
            if self.stop.is_set():
                self._stopping = True
                raise LostLease(self.id)
            control = self._tick()
            self._reap()
            if control == "cancel":
                return self._cancel()
            paused = control == "pause"
            self._set_state(RolloutState.PAUSED if paused else RolloutState.RUNNING,
                            "paused" if paused else self.reason if self.reason == "waiting for offline nodes"
                            else "")
            if not paused:
                todo += [n for n in self._reconnected() if n not in todo]
                while todo and len(self._workers) < self.spec.max_parallel:
                    node = todo.pop(0)
                    if node not in self._workers:
                        self._start_worker(node)
            waiting = until and time.time() < until and any(p.step == NodeStep.OFFLINE
                                                            for p in self.progress.values())
            if not todo and not self._workers and not waiting:
                return None
            time.sleep(TICK_S)

    def _reconnected(self) -> list[str]:
        """Offline nodes that heartbeat or registered since they were found unreachable."""
        offline = {n: p for n, p in self.progress.items() if p.step == NodeStep.OFFLINE}
        if not offline:
            return []
        seen = {n.id: n.last_seen for n in self.store.nodes() if n.id in offline}
        return [n for n, p in offline.items() if seen.get(n, 0.0) > p.offline_since]

    def _start_worker(self, node: str) -> None:
        t = threading.Thread(target=self._drive, args=(node,), name=f"rollout-{node}", daemon=True)
        self._workers[node] = t
        t.start()

    def _reap(self) -> None:
        for node, t in list(self._workers.items()):
            if not t.is_alive():
                del self._workers[node]

    def _cancel(self) -> RolloutState:
        """No new pushes; ask each node with a running update to cancel it; wait for those to end."""
        with self._lock:
            self._stopping = True
        for node, p in self.progress.items():  # left by an earlier owner: followed, never pushed now
            if p.step.active and node not in self._workers:
                self._start_worker(node)
        asked: set[str] = set()
        while True:
            self._tick()
            for node in list(self._workers):
                p = self.progress[node]
                if node not in asked and p.step == NodeStep.RUNNING:
                    asked.add(node)
                    try:
                        with self._pusher(node, PushOptions(rpc_timeout_s=5.0)) as pusher:
                            outcome = pusher.cancel(p.update_id)
                    except Exception as e:
                        outcome = f"could not cancel: {e}"
                    self._set(node, cancel=outcome)
            self._reap()
            if not self._workers:
                break
            time.sleep(TICK_S)
        for node, p in self.progress.items():
            if p.step in (NodeStep.PENDING, NodeStep.OFFLINE, NodeStep.PUSHING):
                if p.update_id:
                    self._close_row(node, p, "not pushed: the rollout was cancelled")
                self._set(node, step=NodeStep.CANCELLED, cancel="not pushed")
        counts = {s: sum(1 for p in self.progress.values() if p.step == s) for s in NodeStep}
        return self._end(RolloutState.CANCELLED,
                         f"cancelled: {counts[NodeStep.SUCCEEDED]} updated, {counts[NodeStep.FAILED]} failed, "
                         f"{counts[NodeStep.CANCELLED]} not pushed")

    def _close_row(self, node: str, p: NodeProgress, error: str) -> None:
        """An update id chosen but never taken by the node: its row ends FAILED with why."""
        row = self.store.update(p.update_id) if p.update_id else None
        if row is not None and not row.state.final:
            self.store.finish_update(UpdateRow(update_id=row.update_id, node=node, component=row.component,
                                               to_version=row.to_version, state=UpdateState.FAILED, error=error))

    def _halt_reason(self, index: int, batch: tuple[str, ...]) -> str:
        failed_here = [n for n in batch if self.progress[n].step == NodeStep.FAILED]
        if index == 0 and self.spec.canary and failed_here:
            return f"the canary failed on {', '.join(failed_here)}"
        if index == 0 and self.spec.canary and batch and \
                not any(self.progress[n].step == NodeStep.SUCCEEDED for n in batch):
            return f"the canary could not be reached: {', '.join(batch)} offline"
        failures = sum(1 for p in self.progress.values() if p.step == NodeStep.FAILED)
        if failures > self.spec.max_failures:
            return f"{failures} failures, more than the {self.spec.max_failures} allowed"
        return ""

    def _end(self, state: RolloutState, reason: str) -> RolloutState:
        self._set_state(state, reason)
        self.store.release_rollout(self.id, self.owner)
        return state

    # ---- one node ----------------------------------------------------------------------------------

    def _pusher(self, node: str, options: PushOptions) -> Pusher:
        address = self.spec.addresses.get(node) or ""
        if not address:
            known = self.store.node(node)
            address = known.address if known else ""
        if not address:
            raise NodeOffline(node, "UNAVAILABLE", "no address: the node has not registered")
        return Pusher(self.store, Target(node, address), self.tls, options)

    def _drive(self, node: str) -> None:
        try:
            outcome = self._drive_one(node)
        except LostLease:
            return
        except NodeOffline as e:
            self._quietly(node, step=NodeStep.OFFLINE, offline_since=time.time(), error=f"{e.code}: {e.details}")
            return
        except PushRefused as e:
            self._quietly(node, step=NodeStep.FAILED, error=str(e))
            return
        except Exception as e:  # one node's trouble must not take the batch down
            self._quietly(node, step=NodeStep.FAILED, error=f"{type(e).__name__}: {e}")
            return
        if outcome is None:
            return
        if outcome.success:
            self._quietly(node, step=NodeStep.SUCCEEDED, error="")
        else:
            self._quietly(node, step=NodeStep.FAILED, error=outcome.error or f"ended {outcome.state.value}")

    def _quietly(self, node: str, **changes: Any) -> None:
        with contextlib.suppress(LostLease):
            self._set(node, **changes)

    def _drive_one(self, node: str) -> Outcome | None:
        p = self.progress[node]
        options = PushOptions(force=self.spec.force, allow_downgrade=self.spec.allow_downgrade,
                              timeout_s=self.spec.timeout_s, watch=p.step == NodeStep.PENDING, offline_ok=True,
                              operator=self.operator)
        if p.step == NodeStep.RUNNING:
            row = self.store.update(p.update_id)
            if row is not None and row.state.final:  # its result arrived while nobody followed it
                return Outcome(row.update_id, node, row.state, row.success, row.rolled_back, row.error)
        with self._pusher(node, options) as pusher:
            if p.step in (NodeStep.PENDING, NodeStep.OFFLINE):
                with self._lock:
                    if self._stopping:
                        return None
                p = self._set(node, step=NodeStep.PUSHING, update_id=p.update_id or new_update_id(), error="")
            if p.step == NodeStep.PUSHING:
                if not (node in self._maybe_sent and pusher.has(p.update_id)):
                    if self._stopping:  # cancelled before this push went out: it never will
                        return None
                    self._maybe_sent.add(node)
                    pusher.start(self.spec.package, p.update_id, rollout_id=self.id)
                p = self._set(node, step=NodeStep.RUNNING)
            return pusher.follow(p.update_id)


def replica_id() -> str:
    """This serve process among the replicas: host, pid and a random part (a restarted serve is another)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class RolloutRunner:
    """In ``serve``: claims rollouts nobody holds (or whose owner's lease ran out) and carries each out."""

    def __init__(self, store: Store, tls: ClientTls | None, lease_s: float = DEFAULT_LEASE_S,
                 owner: str = "", poll_s: float = 0.5) -> None:
        self.store = store
        self.tls = tls
        self.lease_s = lease_s
        self.owner = owner or replica_id()
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._drivers: dict[str, threading.Thread] = {}

    def start(self) -> RolloutRunner:
        self._thread = threading.Thread(target=self._loop, name="rollout-runner", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """No new pushes; give the lease of every rollout back so another replica (or the next start) goes on."""
        self._stop.set()
        for t in list(self._drivers.values()):
            t.join(timeout)
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                for done, t in list(self._drivers.items()):
                    if not t.is_alive():
                        del self._drivers[done]
                while (claimed := self.store.claim_rollout(self.owner, self.lease_s)) is not None:
                    logger.info("rollout {}: carried out by this replica ({})", claimed, self.owner)
                    t = threading.Thread(target=self._drive, args=(claimed,), name=f"rollout-{claimed}",
                                         daemon=True)
                    self._drivers[claimed] = t
                    t.start()
            except Exception as e:  # the database blinked: try again at the next poll
                logger.warning("rollout runner: {!r}", e)
            self._stop.wait(self.poll_s)

    def _drive(self, rollout_id: str) -> None:
        try:
            RolloutDriver(self.store, rollout_id, self.owner, self.tls, self.lease_s, self._stop).run()
        except Exception as e:
            logger.exception("rollout {}: {!r}", rollout_id, e)
        finally:
            if self._stop.is_set():
                self.store.release_rollout(rollout_id, self.owner)


def describe(progress: NodeProgress) -> str:
    """One node's step as the follower prints it."""
    return (progress.step.value + (f" ({progress.update_id})" if progress.update_id else "")
            + (f": {progress.error}" if progress.error else "")
            + (f" [{progress.cancel}]" if progress.cancel else ""))


def follow(store: Store, rollout_id: str, say: Callable[[str], None], poll_s: float = 0.25,
           stop: threading.Event | None = None) -> RolloutRow:
    """Print what changes until the rollout ends (or ``stop`` is set); returns its last row."""
    seen: dict[str, tuple[str, str, str]] = {}
    started: set[int] = set()
    state: str = ""
    while True:
        row = store.rollout(rollout_id)
        if row is None:
            raise RolloutError(f"no rollout {rollout_id!r}")
        spec = RolloutSpec.from_json(row.spec)
        progress = {n: NodeProgress.from_json(p) for n, p in row.progress["nodes"].items()}
        for i, batch in enumerate(spec.batches()):
            for n in batch:
                p = progress[n]
                if p.step != NodeStep.PENDING and i not in started:
                    started.add(i)
                    say(f"{spec.batch_label(i)}: {', '.join(batch)}")
                key = (p.step.value, p.error, p.cancel)
                if key != seen.get(n, ("pending", "", "")):
                    seen[n] = key
                    say(f"  {n}: {describe(p)}")
        if row.state != state:
            state = row.state
            reason = row.progress.get("reason", "")
            if RolloutState(state).final:
                say(f"rollout {rollout_id} {state}: {reason}")
                return row
            if state == RolloutState.PAUSED.value or started:
                say(f"rollout {rollout_id} {state}" + (f": {reason}" if reason and reason != state else ""))
        if stop is not None and stop.wait(poll_s):
            return row
        if stop is None:
            time.sleep(poll_s)


__all__ = ["RolloutDriver", "RolloutRunner", "RolloutSpec", "RolloutState", "follow", "new_rollout", "state_of"]
