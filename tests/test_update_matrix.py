"""The update's state x failure matrix, in-process: every step, every failure it can meet, every crash point.

The real ``UpdateRun`` and ``SelfUpdateRun`` drive real files (download directory, staging, the versioned
install layout, signature and hash checks on real signed packages) with fakes behind their seams
(``helper/ports.py``, ``tests/fakes/``): the journal's storage in memory, a clock that moves when slept on, a
fetcher serving bytes from memory, the supervisor's agents and the supervisor's own processes as models.
A crash is a kill right after a durable journal write (or at a handover step, or mid-download): the next
helper starts from what the journal holds, and the host must end consistent (what the chaos test checks with
processes): the journal final and settled, ``current`` on exactly the version that runs, no staging
directory or download left, the failure reason one of ``baton/reasons.py``'s codes.

Each behaviour also keeps one test with real processes (tests/test_agent_update.py, test_self_update.py ...).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from baton.config import SUPERVISOR_COMPONENT, AgentConfig, Config, NodeConfig, UpdateConfig
from baton.journal import CANCELLED, UpdateRecord, UpdateRequestRecord
from baton.layout import ComponentLayout
from baton.marks import Marks
from baton.reasons import FailureReason as R
from baton.states import Custody
from baton.states import UpdateState as S
from helper import download as dl
from helper.machine import MAX_ATTEMPTS, UpdateRun
from helper.self_update import SelfUpdateRun
from tests.conftest import Package, Release, install_version, snapshot_tree
from tests.fakes import handover as ho
from tests.fakes import supervisor as agents
from tests.fakes.clock import FakeClock
from tests.fakes.crash import Crash
from tests.fakes.fetcher import FakeFetcher
from tests.fakes.handover import SupervisorHost, probe
from tests.fakes.journal import MemoryJournal
from tests.fakes.supervisor import FakeSupervisor
from tests.hostile_archives import EVIL, write_hostile_archive

APP = "app"
OLD, NEW = "1.0.0", "1.1.0"
URL = "https://packages.test/pkg.tar.gz"
COMPONENTS = [APP, SUPERVISOR_COMPONENT]


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Release:
    return Release(tmp_path_factory.mktemp("matrix-release"))


@pytest.fixture(scope="module")
def packages(release: Release) -> dict[str, Package]:
    """Built and signed once: the good package of each component."""
    return {c: release.build(NEW, component=c, name=f"{c}-{NEW}.tar.gz") for c in COMPONENTS}


@dataclass
class Host:
    """One node: a config, the install layout, and the fakes behind every seam."""

    cfg: Config
    component: str
    journal: MemoryJournal
    clock: FakeClock
    fetcher: FakeFetcher
    agents: FakeSupervisor
    supervisors: SupervisorHost
    update_id: str = "u1"
    runs: int = 0
    sessions_of_last_run: list[ho.FakeHandover] = field(default_factory=list)

    @property
    def layout(self) -> ComponentLayout:
        return ComponentLayout(self.cfg.node.install_root, self.component)

    def push(self, pkg: Package, *, body: bytes | None = None, **request: object) -> None:
        self.fetcher.served[URL] = pkg.path.read_bytes() if body is None else body
        fields: dict[str, object] = dict(node_id="n1", component=self.component, version=NEW, download_url=URL,
                                         sha256=pkg.sha256, signature=pkg.signature, size=pkg.size)
        fields.update(request)
        self.journal.create(UpdateRecord(update_id=self.update_id, request=UpdateRequestRecord(**fields),  # type: ignore[arg-type]
                                         from_version=OLD, from_dir=self.layout.current_dir_name() or ""))

    def helper(self) -> UpdateRun:
        """A helper process started on the journal as it stands (the supervisor starts one per attempt)."""
        self.runs += 1
        start = len(self.supervisors.sessions)
        if self.component == SUPERVISOR_COMPONENT:
            run: UpdateRun = SelfUpdateRun(self.cfg, self.journal, self.update_id, self.agents.client,
                                           fetcher=self.fetcher, clock=self.clock, handover=self.supervisors.session,
                                           probe=probe(self.supervisors))
        else:
            run = UpdateRun(self.cfg, self.journal, self.update_id, self.agents.client, fetcher=self.fetcher,
                            clock=self.clock)
        self.sessions_of_last_run = self.supervisors.sessions[start:]
        return run

    def update(self) -> UpdateRecord:
        """Helpers, each killed where the fakes say, until one finishes: the record it leaves."""
        for _ in range(MAX_ATTEMPTS + 2):
            try:
                return self.helper().run()
            except Crash:
                self.sessions_of_last_run = self.supervisors.sessions[len(self.supervisors.sessions):]
                continue
        raise AssertionError("no helper finished the update")

    def running(self) -> str:
        """The version of the component that runs now."""
        if self.component == SUPERVISOR_COMPONENT:
            version, serving = self.supervisors.running()
            return version if serving else ""
        return self.agents.running.get(APP, "")


@pytest.fixture
def host_of(tmp_path: Path, release: Release) -> Callable[[str], Host]:
    def make(component: str) -> Host:
        cfg = Config(node=NodeConfig(id="n1", state_dir=tmp_path / "state", install_root=tmp_path / "install"),
                     update=UpdateConfig(trusted_keys=(release.public_key,), free_space_reserve_bytes=0,
                                         max_files=50, max_unpacked_bytes=200_000),
                     agents=(AgentConfig(name=APP, command="bin/agent", packaged=True),))
        cfg.run_dir.mkdir(parents=True)
        install_version(cfg.node.install_root, component, OLD, release.tree(OLD))
        clock = FakeClock()
        h = Host(cfg, component, MemoryJournal(), clock, FakeFetcher(),
                 FakeSupervisor(cfg.node.install_root, cfg.log_dir, clock),
                 SupervisorHost(cfg.node.install_root, clock))
        if component == SUPERVISOR_COMPONENT:
            h.supervisors.boot(OLD)
        else:
            h.agents.running[APP] = OLD
        return h

    return make


def assert_consistent(h: Host, rec: UpdateRecord) -> None:
    """What the chaos test checks: final and settled, ``current`` on the one version that runs, no leftovers."""
    assert rec.final and rec.settled, (rec.state, rec.error)
    want = NEW if rec.state is S.COMMITTED else OLD
    assert h.layout.current_version() == want
    assert h.running() == want or rec.reason == R.ROLLBACK_FAILED.value
    assert h.layout.installed_versions() == ([NEW, OLD] if rec.state is S.COMMITTED else [OLD])
    assert not [p.name for p in h.layout.versions_dir.iterdir() if p.name.startswith(".")]
    assert not h.cfg.download_dir.exists() or not any(h.cfg.download_dir.iterdir())
    assert all(s.custody is Custody.CLOSED for s in h.sessions_of_last_run)
    if rec.state is S.COMMITTED:
        assert rec.success and not rec.reason and Marks(h.cfg.node.state_dir).highest(h.component) == NEW
    else:
        assert not rec.success and R.parse(rec.reason) is not R.UNSPECIFIED
        assert Marks(h.cfg.node.state_dir).highest(h.component) is None


# ---- the happy path, for both drivers -------------------------------------------------------------------------


@pytest.mark.parametrize("component", COMPONENTS)
def test_an_update_commits_through_every_state_and_runs_the_new_version(host_of, packages, component):
    h = host_of(component)
    h.push(packages[component])
    rec = h.update()
    assert rec.state is S.COMMITTED, rec.error
    assert [t.state for t in rec.history] == ["requested", "downloading", "verifying", "staging", "switching",
                                              "restarting", "watching", "committed"]
    assert_consistent(h, rec)
    assert rec.attempts == 1


# ---- before the switch: every failure is FAILED and changes nothing -----------------------------------------


def _refusals(release: Release, pkg: Package, component: str) -> dict[str, tuple[Callable[[Host], None], R, str]]:
    """Each failure before the switch: (how to bring it about, the reason it is recorded with, what the error
    names)."""
    body = pkg.path.read_bytes()
    flipped = bytearray(body)
    flipped[len(body) // 2] ^= 0xFF

    def failing(err: dl.DownloadError) -> Callable[[Host], None]:
        def arrange(h: Host) -> None:
            h.push(pkg)
            h.fetcher.fail = err
        return arrange

    def signed(**kw: object) -> Callable[[Host], None]:
        def arrange(h: Host) -> None:
            h.push(release.build(NEW, component=component, name=f"{component}-{sorted(kw)}.tar.gz", **kw))  # type: ignore[arg-type]
        return arrange

    other = Release(release.base / "other-key")
    return {
        "connection refused": (failing(dl.ConnectionFailed(URL, "refused")), R.DOWNLOAD_UNREACHABLE,
                               "ConnectionFailed"),
        "http 404": (failing(dl.HttpStatusError(404, URL)), R.DOWNLOAD_UNREACHABLE, "HTTP 404"),
        "read timeout": (failing(dl.DownloadTimeout(URL, "no byte", 30)), R.DOWNLOAD_TIMEOUT, "timed out"),
        "too slow": (failing(dl.DownloadTooSlow(URL, 10, 1024, 30)), R.DOWNLOAD_TOO_SLOW, "too slow"),
        "not http": (failing(dl.ProtocolViolation(URL, "bad status line")), R.DOWNLOAD_PROTOCOL, "protocol"),
        "disk full at download": (failing(dl.InsufficientSpace(Path("/d"), 10, 1)), R.DISK_FULL, "space"),
        "someone else's file": (failing(dl.UntrustedDownloadFile(Path("/d"), "owner 1000")),
                                R.DOWNLOAD_FILE_UNTRUSTED, "not created by this helper"),
        "truncated": (lambda h: h.push(pkg, body=body[:-10]), R.DOWNLOAD_PROTOCOL, "DownloadTruncated"),
        "more than size": (lambda h: h.push(pkg, body=body + b"x"), R.DOWNLOAD_PROTOCOL, "DownloadTooLarge"),
        "size pushed wrong": (lambda h: h.push(pkg, size=pkg.size + 10), R.DOWNLOAD_PROTOCOL, "DownloadTruncated"),
        "flipped byte": (lambda h: h.push(pkg, body=bytes(flipped)), R.HASH_MISMATCH, "HashMismatch"),
        "sha256 pushed wrong": (lambda h: h.push(pkg, sha256="0" * 64), R.HASH_MISMATCH, "HashMismatch"),
        "flipped byte, hash matching": (
            lambda h: h.push(pkg, body=bytes(flipped), sha256=__import__("hashlib").sha256(flipped).hexdigest()),
            R.SIGNATURE_INVALID, "BadSignature"),
        "untrusted key": (lambda h: h.push(other.build(NEW, component=component)), R.SIGNATURE_UNTRUSTED_KEY,
                          "UntrustedKey"),
        "signed for another version": (signed(signed_version="1.0.1"), R.SIGNATURE_MANIFEST_MISMATCH,
                                       "ManifestMismatch"),
        "signed for another component": (signed(signed_component="other"), R.SIGNATURE_MANIFEST_MISMATCH,
                                         "ManifestMismatch"),
        "expired": (signed(expires=time.time() - 60), R.SIGNATURE_EXPIRED, "PackageExpired"),
        "for another node": (signed(nodes=["node-7"]), R.SIGNATURE_MANIFEST_MISMATCH, "WrongNode"),
        "disk full at the journal": (lambda h: (h.push(pkg), setattr(h.journal, "fail_at", 3)), R.DISK_FULL,
                                     "No space left"),
    }


REFUSALS = ["connection refused", "http 404", "read timeout", "too slow", "not http", "disk full at download",
            "someone else's file", "truncated", "more than size", "size pushed wrong", "flipped byte",
            "sha256 pushed wrong", "flipped byte, hash matching", "untrusted key", "signed for another version",
            "signed for another component", "expired", "for another node", "disk full at the journal"]


@pytest.mark.parametrize("component", COMPONENTS)
@pytest.mark.parametrize("failure", REFUSALS)
def test_a_failure_before_the_switch_ends_failed_with_its_reason_and_changes_nothing(host_of, packages, release,
                                                                                     component, failure):
    h = host_of(component)
    arrange, reason, names = _refusals(release, packages[component], component)[failure]
    running = h.running(), h.agents.pid, h.supervisors.pid
    installed = snapshot_tree(h.cfg.node.install_root)
    arrange(h)
    rec = h.update()
    assert rec.state is S.FAILED, rec.error
    assert rec.reason == reason.value and names in rec.error, (rec.reason, rec.error)
    assert not rec.rolled_back and rec.attempts == 1
    assert (h.running(), h.agents.pid, h.supervisors.pid) == running  # the running version was never touched
    assert h.agents.calls == [] and h.supervisors.sessions == []
    assert snapshot_tree(h.cfg.node.install_root) == installed  # nothing changed outside downloads and journal
    assert_consistent(h, rec)


@pytest.mark.parametrize("kind", sorted(EVIL))
def test_a_hostile_archive_is_refused_before_anything_is_installed(host_of, release, kind):
    h = host_of(APP)
    path = release.base / "pkgs" / f"evil-{kind}.tar"
    write_hostile_archive(path, kind)
    h.push(release.sign(path, APP, NEW))
    installed = snapshot_tree(h.cfg.node.install_root)
    rec = h.update()
    assert rec.state is S.FAILED and rec.reason == R.UNSAFE_ARCHIVE.value, rec.error
    assert not Path("/tmp/baton-evil-abs").exists()
    assert snapshot_tree(h.cfg.node.install_root) == installed
    assert h.agents.calls == []
    assert_consistent(h, rec)


@pytest.mark.parametrize("component", COMPONENTS)
@pytest.mark.parametrize("step", ["requested", "downloading", "verifying", "staging"])
def test_a_cancel_before_the_switch_ends_failed_cancelled_and_changes_nothing(host_of, packages, component, step):
    h = host_of(component)
    h.push(packages[component])
    real_save = h.journal.save

    def save(rec: UpdateRecord) -> None:
        real_save(rec)
        if rec.state.value == step:
            h.journal.cancelled.add(h.update_id)
    h.journal.save = save  # type: ignore[method-assign]
    rec = h.update()
    assert rec.state is S.FAILED and rec.reason == R.CANCELLED.value and rec.error == CANCELLED
    assert h.agents.calls == [] and h.supervisors.sessions == []
    assert_consistent(h, rec)


# ---- from the switch on: every failure rolls back to the old version, which runs again ----------------------


AGENT_FAILURES: dict[str, tuple[Callable[[Host], None], R, str]] = {
    "exits at start": (lambda h: h.agents.behaviour.update({NEW: agents.EXITS}), R.NEW_VERSION_EXITED, "exited"),
    "never ready": (lambda h: h.agents.behaviour.update({NEW: agents.NEVER_READY}), R.NEW_VERSION_NOT_READY,
                    "not ready within"),
    "dies in the health window": (lambda h: h.agents.behaviour.update({NEW: agents.DIES_IN_WINDOW}),
                                  R.NEW_VERSION_EXITED, "health window"),
    "supervisor unreachable at the restart": (lambda h: h.agents.unavailable_calls.add(1),
                                              R.SUPERVISOR_UNAVAILABLE, "restart app failed"),
    "supervisor unreachable in the health wait": (lambda h: h.agents.unavailable_calls.add(2),
                                                  R.SUPERVISOR_UNAVAILABLE, "wait_healthy app 1.1.0 failed"),
}


@pytest.mark.parametrize("failure", list(AGENT_FAILURES))
def test_an_agent_failing_after_the_switch_is_rolled_back_and_the_old_version_runs(host_of, packages, failure):
    h = host_of(APP)
    arrange, reason, names = AGENT_FAILURES[failure]
    h.push(packages[APP])
    arrange(h)
    old_pid = h.agents.pid
    rec = h.update()
    assert rec.state is S.ROLLED_BACK and rec.rolled_back and not rec.success, rec.error
    assert h.agents.running[APP] == OLD and h.agents.pid != old_pid  # the old version, started again
    assert rec.reason == reason.value and names in rec.error, (rec.reason, rec.error)
    assert [t.state for t in rec.history][-3:] == ["watching" if "restart" not in failure else "restarting",
                                                   "rolling_back", "rolled_back"]
    assert h.agents.calls[-2:] == ["restart app", f"wait_healthy app {OLD}"]
    assert_consistent(h, rec)
    assert NEW in Marks(h.cfg.node.state_dir).failed(APP)  # not retried unless forced
    if reason is R.NEW_VERSION_EXITED:  # what a person reads quotes the new version's own output
        assert f"app {NEW} starting" in rec.last_log and f"app {NEW} starting" in rec.error


@pytest.mark.parametrize("failure", ["the supervisor is down", "the old version fails too"])
def test_a_rollback_that_cannot_bring_the_old_version_back_says_rollback_failed(host_of, packages, failure):
    h = host_of(APP)
    h.push(packages[APP])
    if failure == "the supervisor is down":
        h.agents.down = True
    else:
        h.agents.behaviour.update({NEW: agents.EXITS, OLD: agents.EXITS})
    rec = h.update()
    assert rec.state is S.ROLLED_BACK and rec.reason == R.ROLLBACK_FAILED.value, rec.error
    assert f"the old version {OLD}" in rec.error or "no answer" in rec.error
    assert_consistent(h, rec)  # the link is back on the old version whatever runs


SUPERVISOR_FAILURES: dict[str, tuple[Callable[[Host], None], R, str]] = {
    "exits at start": (lambda h: h.supervisors.behaviour.update({NEW: ho.EXITS}), R.HANDSHAKE_REFUSED,
                       "exited before its handshake"),
    "hangs before the handshake": (lambda h: h.supervisors.behaviour.update({NEW: ho.HANGS}),
                                   R.HANDSHAKE_TIMEOUT, "HandshakeTimeout"),
    "speaks an old protocol": (lambda h: h.supervisors.behaviour.update({NEW: ho.OLD_PROTOCOL}),
                               R.HANDSHAKE_REFUSED, "handover protocol 0"),
    "reports unhealthy": (lambda h: h.supervisors.behaviour.update({NEW: ho.UNHEALTHY}), R.NEW_VERSION_NOT_READY,
                          "reported unhealthy"),
    "the running one refuses to hand over": (lambda h: setattr(h.supervisors, "refuse_prepare", True),
                                             R.HANDSHAKE_REFUSED, "refused to hand over"),
}


@pytest.mark.parametrize("failure", list(SUPERVISOR_FAILURES))
def test_a_supervisor_failing_the_handover_is_rolled_back_and_the_old_version_serves(host_of, packages, failure):
    h = host_of(SUPERVISOR_COMPONENT)
    old_pid = h.supervisors.pid
    arrange, reason, names = SUPERVISOR_FAILURES[failure]
    h.push(packages[SUPERVISOR_COMPONENT])
    arrange(h)
    rec = h.update()
    assert rec.state is S.ROLLED_BACK and rec.rolled_back, rec.error
    assert rec.reason == reason.value and names in rec.error, (rec.reason, rec.error)
    assert_consistent(h, rec)
    assert NEW in Marks(h.cfg.node.state_dir).failed(SUPERVISOR_COMPONENT)
    if failure == "the running one refuses to hand over":  # it never stopped: the link back is all
        assert h.supervisors.pid == old_pid and h.supervisors.starts == 0
    else:
        assert h.supervisors.starts == 1  # the helper started the old version itself, which passed the handshake


def test_a_self_update_whose_old_version_fails_the_handshake_too_says_rollback_failed(host_of, packages):
    h = host_of(SUPERVISOR_COMPONENT)
    h.push(packages[SUPERVISOR_COMPONENT])
    h.supervisors.behaviour.update({NEW: ho.EXITS, OLD: ho.HANGS})
    rec = h.update()
    assert rec.state is S.ROLLED_BACK and rec.reason == R.ROLLBACK_FAILED.value, rec.error
    assert f"the old version {OLD} did not come back cleanly" in rec.error
    assert h.layout.current_version() == OLD and h.layout.installed_versions() == [OLD]
    assert all(s.custody is Custody.CLOSED for s in h.sessions_of_last_run)


@pytest.mark.parametrize("component", COMPONENTS)
def test_a_cancel_after_the_switch_rolls_back(host_of, packages, component):
    h = host_of(component)
    h.push(packages[component])
    real_save = h.journal.save

    def save(rec: UpdateRecord) -> None:
        real_save(rec)
        if rec.state is S.SWITCHING:
            h.journal.cancelled.add(h.update_id)
    h.journal.save = save  # type: ignore[method-assign]
    rec = h.update()
    assert rec.state is S.ROLLED_BACK and rec.reason == R.CANCELLED.value, rec.error
    assert_consistent(h, rec)
    assert NEW not in Marks(h.cfg.node.state_dir).failed(component)  # a cancelled version is not known bad


# ---- crash points: a kill after every durable write, at every handover step, mid-download -------------------

# The durable writes of a run, in order: the attempt count, each state (moved before its work), the download
# file's identity, the settling. A helper killed after write n is followed by one that finds the journal so.
WRITES = {
    "good": ["requested", "downloading", "downloading", "verifying", "staging", "switching", "restarting",
             "watching", "committed", "committed"],
    "new version fails": ["requested", "downloading", "downloading", "verifying", "staging", "switching",
                          "restarting", "watching", "rolling_back", "rolled_back", "rolled_back"],
    "download fails": ["requested", "downloading", "failed", "failed"],
}


def _arrange(h: Host, scenario: str) -> None:
    if scenario == "new version fails":
        h.agents.behaviour[NEW] = agents.EXITS
        h.supervisors.behaviour[NEW] = ho.EXITS
    elif scenario == "download fails":
        h.fetcher.fail = dl.ConnectionFailed(URL, "refused")


def _outcome(h: Host, scenario: str, crashed_in: S) -> tuple[S, R | None]:
    """The end a killed update must reach: as if uninterrupted, except that a kill between the switch and the
    verdict is HELPER_CRASHED (the new version was never judged; a self-update's successor looks at what runs,
    and here nothing new serves)."""
    if scenario == "download fails":
        return S.FAILED, R.DOWNLOAD_UNREACHABLE
    if crashed_in in (S.SWITCHING, S.RESTARTING, S.WATCHING):
        return S.ROLLED_BACK, R.HELPER_CRASHED
    if scenario == "good":
        return S.COMMITTED, None
    return S.ROLLED_BACK, R.NEW_VERSION_EXITED if h.component == APP else R.HANDSHAKE_REFUSED


@pytest.mark.parametrize("component", COMPONENTS)
@pytest.mark.parametrize("scenario", list(WRITES))
def test_a_run_makes_exactly_the_durable_writes_the_crash_points_name(host_of, packages, component, scenario):
    h = host_of(component)
    h.push(packages[component])
    _arrange(h, scenario)
    h.update()
    assert h.journal.states_written == WRITES[scenario]


CRASH_POINTS = [(scenario, n) for scenario, writes in WRITES.items() for n in range(1, len(writes) + 1)]


@pytest.mark.parametrize("component", COMPONENTS)
@pytest.mark.parametrize("scenario,write", CRASH_POINTS, ids=[f"{s}-after-write-{n}" for s, n in CRASH_POINTS])
def test_a_helper_killed_after_any_durable_write_is_finished_consistently_by_the_next(host_of, packages, component,
                                                                                     scenario, write):
    h = host_of(component)
    h.push(packages[component])
    _arrange(h, scenario)
    h.journal.crash_after = write
    rec = h.update()
    settled_already = write == len(WRITES[scenario])  # the next helper finds nothing to do
    assert h.runs == 2 and rec.attempts == (1 if settled_already else 2)
    crashed_in = S(WRITES[scenario][write - 1])
    state, reason = _outcome(h, scenario, crashed_in)
    assert (rec.state, R.parse(rec.reason) if reason else None) == (state, reason), rec.error
    assert_consistent(h, rec)


HANDOVER_STEPS = ["handover-state-received", "handover-exec-sent", "handover-hello", "handover-healthy"]


@pytest.mark.parametrize("step", HANDOVER_STEPS)
def test_a_helper_killed_at_a_handover_step_leaves_one_supervisor_serving_a_consistent_version(host_of, packages,
                                                                                               step):
    h = host_of(SUPERVISOR_COMPONENT)
    h.push(packages[SUPERVISOR_COMPONENT])
    h.supervisors.crash_at = step
    rec = h.update()
    assert h.runs == 2 and not h.supervisors.crash_at, "the crash point was not reached"
    assert rec.state is S.ROLLED_BACK and rec.reason == R.HELPER_CRASHED.value, rec.error
    assert_consistent(h, rec)


def test_a_self_update_killed_after_the_new_version_serves_is_committed_by_the_next_helper(host_of, packages):
    h = host_of(SUPERVISOR_COMPONENT)
    h.push(packages[SUPERVISOR_COMPONENT])
    real_save = h.journal.save

    def save(rec: UpdateRecord) -> None:  # killed as the new supervisor serves, before COMMITTED is written
        if rec.state is S.COMMITTED and not rec.settled:
            raise Crash("killed before committing")
        real_save(rec)
    h.journal.save = save  # type: ignore[method-assign]
    with pytest.raises(Crash):
        h.helper().run()
    h.journal.save = real_save  # type: ignore[method-assign]
    rec = h.update()
    assert rec.state is S.COMMITTED, rec.error
    assert [t.note for t in rec.history if t.state == "committed"] == [""]
    assert_consistent(h, rec)


@pytest.mark.parametrize("component", COMPONENTS)
def test_a_helper_killed_mid_download_is_resumed_from_the_bytes_on_disk(host_of, packages, component):
    h = host_of(component)
    pkg = packages[component]
    h.push(pkg)
    h.fetcher.crash_after_bytes = pkg.size // 2
    rec = h.update()
    assert rec.state is S.COMMITTED, rec.error
    assert h.fetcher.resumed_from == [0, pkg.size // 2]
    assert_consistent(h, rec)


@pytest.mark.parametrize("component", COMPONENTS)
@pytest.mark.parametrize("first_killed_in", ["requested", "switching"])
def test_a_helper_killed_at_every_attempt_gives_up_after_the_last_one(host_of, packages, component,
                                                                      first_killed_in):
    h = host_of(component)
    h.push(packages[component])
    h.journal.crash_after = WRITES["good"].index(first_killed_in) + 1
    with pytest.raises(Crash):
        h.helper().run()
    for _ in range(MAX_ATTEMPTS - 1):
        h.journal.crash_after = h.journal.writes + 1  # each later helper dies as it counts its attempt
        with pytest.raises(Crash):
            h.helper().run()
    rec = h.update()
    assert rec.attempts == MAX_ATTEMPTS + 1 and rec.reason == R.HELPER_CRASHED.value
    # a self-update killed mid-handover is resolved by what runs (it cannot loop), not given up
    resolved = component == SUPERVISOR_COMPONENT and first_killed_in == "switching"
    assert ("interrupted during the handover" if resolved else f"gave up after {MAX_ATTEMPTS}") in rec.error
    assert rec.state is (S.FAILED if first_killed_in == "requested" else S.ROLLED_BACK), rec.error
    assert_consistent(h, rec)
