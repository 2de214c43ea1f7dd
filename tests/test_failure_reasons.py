"""Every way an update ends other than committed has a stable reason code, produced here by a real failure.

A real supervisor, helper, agent and HTTP package server: a server that refuses, stalls, trickles or serves
other bytes; a package signed by another key; a download directory on a full 2 MiB tmpfs; a new version that
exits or never says READY; a cancel. Each ends with its ``FailureReason`` in ``GetUpdate`` and in the journal,
and a message that names the next step; the Manager stores and groups by the reason it is told.
"""

from __future__ import annotations

import importlib
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from baton.pb import common_pb2, daemon_pb2
from baton.reasons import BY_EXCEPTION, NEXT_STEP, FailureReason, classify, message, next_step
from tests.conftest import Package, UpdateHost, free_port, install_version, wait_for
from tests.manager_fixtures import (
    make_fleet,
    make_manager_fixture,  # noqa: F401  (the make_manager fixture)
    package_args,
    signed,
)

R = FailureReason
FAILED = common_pb2.UPDATE_STATE_FAILED
ROLLED_BACK = common_pb2.UPDATE_STATE_ROLLED_BACK
UPDATE = {"health_timeout_s": 4.0, "health_window_s": 0.5, "read_timeout_s": 1.5, "connect_timeout_s": 2.0,
          "min_rate_bytes_per_s": 256 * 1024, "min_rate_window_s": 1.5, "free_space_reserve_bytes": 0}


def _host(make_supervisor: Callable[..., Any], release: Any, **update: Any) -> UpdateHost:
    sup = make_supervisor(
        [{"name": "app", "packaged": True, "command": "bin/agent", "notify": True, "restart": "always",
          "backoff_initial_s": 0.2, "stop_timeout_s": 5.0}],
        extra={"update": {"trusted_keys": [str(release.public_key)], **UPDATE, **update}},
    )
    install_version(sup.base / "install", "app", "1.0.0", release.tree("1.0.0"))
    sup.start()
    sup.wait_agent("app", "running")
    return UpdateHost(sup, release)


def _big(host: UpdateHost, version: str = "1.1.0", mib: int = 3) -> Package:
    """A package of a few MiB of random bytes: long enough to stall, trickle or overflow."""
    tree = host.release.tree(version)
    (tree / "blob.bin").write_bytes(os.urandom(mib * 1024 * 1024))
    return host.release.build(version, tree=tree)


def _served(pkgserver: Any, pkg: Package) -> str:
    (pkgserver.root / pkg.path.name).write_bytes(pkg.path.read_bytes())
    return str(pkgserver.url(pkg.path.name))


def _ends_with(host: UpdateHost, update_id: str, state: int, reason: FailureReason) -> daemon_pb2.UpdateStatus:
    st = host.wait_final(update_id, timeout=60)
    assert (st.state, common_pb2.FailureReason.Name(st.reason)) == (state, reason.value), (st.state, st.error)
    assert host.journal(update_id).reason == reason.value
    return st


# ---- before the switch: FAILED, with the reason and the next step ---------------------------------------------


def _refused(host: UpdateHost, pkgserver: Any) -> tuple[Package, dict[str, Any]]:
    pkg = host.release.build("1.1.0")
    return pkg, {"download_url": f"http://127.0.0.1:{free_port()}/{pkg.path.name}"}  # nobody listens there


def _stalls(host: UpdateHost, pkgserver: Any) -> tuple[Package, dict[str, Any]]:
    pkg = _big(host)
    url = _served(pkgserver, pkg)
    pkgserver.on(pkg.path.name).stall_after(1000, 30.0)
    return pkg, {"download_url": url}


def _trickles(host: UpdateHost, pkgserver: Any) -> tuple[Package, dict[str, Any]]:
    pkg = _big(host)
    url = _served(pkgserver, pkg)
    pkgserver.on(pkg.path.name).rate_limit(32 * 1024)  # an eighth of the configured floor
    return pkg, {"download_url": url}


def _lies_about_the_hash(host: UpdateHost, pkgserver: Any) -> tuple[Package, dict[str, Any]]:
    pkg = host.release.build("1.1.0")
    url = _served(pkgserver, pkg)
    data = bytearray(pkg.path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the same size, other bytes
    (pkgserver.root / pkg.path.name).write_bytes(bytes(data))
    return pkg, {"download_url": url}


CASES = [
    pytest.param(_refused, R.DOWNLOAD_UNREACHABLE, "127.0.0.1", id="server-refuses"),
    pytest.param(_stalls, R.DOWNLOAD_TIMEOUT, "read_timeout_s", id="server-stalls"),
    pytest.param(_trickles, R.DOWNLOAD_TOO_SLOW, "min_rate_bytes_per_s", id="server-trickles"),
    pytest.param(_lies_about_the_hash, R.HASH_MISMATCH, "pushed sha256", id="server-lies-about-the-hash"),
]


@pytest.mark.e2e
@pytest.mark.parametrize(("setup", "reason", "step_part"), CASES)
def test_download_failure_ends_failed_with_its_reason_and_next_step(make_supervisor, release, pkgserver,
                                                                    setup, reason, step_part):
    host = _host(make_supervisor, release)
    pkg, overrides = setup(host, pkgserver)
    st = _ends_with(host, host.push(pkg, **overrides), FAILED, reason)
    assert "next step: " in st.error and step_part in st.error, st.error
    assert host.sup.agent("app").version == "1.0.0"


@pytest.mark.e2e
def test_package_signed_by_another_key_is_signature_untrusted_key_naming_both_key_ids(make_supervisor, release):
    from baton.signing import generate_keypair, load_public_key

    host = _host(make_supervisor, release)
    other, other_public = generate_keypair()
    pkg = host.release.build("1.1.0")
    bad = host.release.sign(pkg.path, "app", "1.1.0", secret=other)
    st = _ends_with(host, host.push(bad), FAILED, R.SIGNATURE_UNTRUSTED_KEY)
    trusted = load_public_key(release.public_key).key_id_hex
    signer = other_public.key_id_hex
    assert "update.trusted_keys holds the key" in st.error and trusted in st.error, st.error
    assert f"this signature was made with key id {signer}" in st.error, st.error


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs, root-owned 0700 (the download directory's required mode); unmounted afterwards."""
    mnt = tmp_path / "small-downloads"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.e2e
def test_download_to_a_full_filesystem_is_disk_full(make_supervisor, release, pkgserver, small_tmpfs):
    host = _host(make_supervisor, release, download_dir=str(small_tmpfs))
    pkg = _big(host, mib=3)
    st = _ends_with(host, host.push(pkg, download_url=_served(pkgserver, pkg)), FAILED, R.DISK_FULL)
    assert "free space in" in st.error and str(small_tmpfs) in st.error, st.error
    assert host.sup.agent("app").version == "1.0.0"


# ---- after the switch: ROLLED_BACK, the failed version's output in the message ----------------------------------


@pytest.mark.e2e
def test_new_version_that_exits_is_new_version_exited_and_its_output_is_in_the_message(make_supervisor, release):
    host = _host(make_supervisor, release)
    st = _ends_with(host, host.push(release.build("1.1.0", "exit_at_once")), ROLLED_BACK, R.NEW_VERSION_EXITED)
    assert "exited with status 4" in st.error, st.error
    assert "its last output: " in st.error and "versioned_agent 1.1.0 (exit_at_once)" in st.error, st.error
    assert "versioned_agent 1.1.0 (exit_at_once)" in st.last_log, "the separate field stays"
    assert host.sup.agent("app").version == "1.0.0"


@pytest.mark.e2e
def test_new_version_that_never_says_ready_is_new_version_not_ready(make_supervisor, release):
    host = _host(make_supervisor, release)
    st = _ends_with(host, host.push(release.build("1.1.0", "never_ready")), ROLLED_BACK, R.NEW_VERSION_NOT_READY)
    assert "not ready within" in st.error and "READY" in st.error, st.error
    assert "versioned_agent 1.1.0 (never_ready)" in st.error, st.error
    assert host.sup.agent("app").version == "1.0.0"


@pytest.mark.e2e
def test_a_rollback_whose_old_version_fails_too_is_rollback_failed_naming_the_recovery_by_hand(make_supervisor,
                                                                                               release):
    host = _host(make_supervisor, release)
    old = host.layout.version_dir("1.0.0")
    (old / "behaviour.txt").write_text("exit_at_once\n")  # the running 1.0.0 read it at its start; a new one exits
    st = _ends_with(host, host.push(release.build("1.1.0", "exit_at_once")), ROLLED_BACK, R.ROLLBACK_FAILED)
    assert "the old version 1.0.0 is not healthy either" in st.error, st.error
    assert "helper --rollback" in st.error, st.error
    assert os.readlink(host.layout.current_link) == "versions/1.0.0", "the link is switched back even so"


@pytest.mark.e2e
def test_cancelled_update_is_cancelled(make_supervisor, release, pkgserver):
    host = _host(make_supervisor, release, min_rate_bytes_per_s=1024, min_rate_window_s=30.0)
    pkg = _big(host, mib=2)
    url = _served(pkgserver, pkg)
    pkgserver.on(pkg.path.name).rate_limit(64 * 1024)
    uid = host.push(pkg, download_url=url)
    wait_for(lambda: host.sup.stub.GetUpdate(daemon_pb2.UpdateRef(update_id=uid), timeout=5).bytes_done > 0, 20,
             what="the download to start")
    host.sup.stub.CancelUpdate(daemon_pb2.UpdateRef(update_id=uid), timeout=30)
    st = _ends_with(host, uid, FAILED, R.CANCELLED)
    assert st.error == "cancelled"


# ---- the Manager stores the reason and groups by it ---------------------------------------------------------------


@pytest.mark.e2e
def test_manager_records_the_reason_and_groups_updates_by_it(make_manager, make_supervisor, release):
    manager = make_manager()
    make_fleet(make_supervisor, release, manager, 1, update={"health_timeout_s": 4.0})
    pkg = signed(release.build("1.1.0", "exit_at_once"))
    pushed = manager.cli("push", "node-1", *package_args(pkg), check=False)
    assert "node-1: rolled_back [NEW_VERSION_EXITED]: " in pushed.stdout, pushed.stdout
    wait_for(lambda: manager.updates() and manager.updates()[0]["reports"] == 1, 30, what="the node's result")
    [row] = manager.updates()
    assert (row["state"], row["reason"]) == ("rolled_back", "NEW_VERSION_EXITED")
    assert "versioned_agent 1.1.0 (exit_at_once)" in row["error"]

    table = manager.cli("updates").stdout.splitlines()
    assert "REASON" in table[0].split() and " NEW_VERSION_EXITED " in table[1]
    grouped = manager.cli("updates", "--by-reason").stdout.splitlines()
    assert grouped[0].split()[:3] == ["REASON", "COUNT", "NODES"]
    assert grouped[1].split()[:3] == ["NEW_VERSION_EXITED", "1", "node-1"]


# ---- the one table ------------------------------------------------------------------------------------------------


def test_every_reason_in_the_contract_is_defined_once_with_a_next_step():
    assert [r.value for r in FailureReason] == list(common_pb2.FailureReason.keys())
    assert all(NEXT_STEP[r] for r in FailureReason if r is not R.UNSPECIFIED)
    assert "<key_id>" in next_step(R.SIGNATURE_UNTRUSTED_KEY), "a missing fact reads as a placeholder"


def test_a_disk_error_without_a_class_of_its_own_is_disk_full():
    err = OSError(28, "No space left on device", "/var/lib/baton/downloads/x")
    assert classify(err) is R.DISK_FULL
    assert f"next step: {next_step(R.DISK_FULL, {'path': '/d'})}" in message(R.DISK_FULL, str(err), {"path": "/d"})


def test_every_reason_has_its_section_in_the_troubleshooting_guide():
    guide = (Path(__file__).resolve().parent.parent / "docs" / "troubleshooting.md").read_text()
    for r in FailureReason:
        if r is not R.UNSPECIFIED:
            assert f'<a id="{r.anchor}"></a>' in guide, f"no section {r.anchor} for {r.value}"
            assert f"`{r.value}`" in guide, f"{r.value} is not named in the guide"


# ---- a supervisor self-update: the handover's failures ------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize(("fault", "reason"), [("hang", R.HANDSHAKE_TIMEOUT), ("exit_at_start", R.HANDSHAKE_REFUSED)])
def test_self_update_whose_new_supervisor_fails_the_handover_has_its_reason(make_self_host, fault, reason):
    host = make_self_host(tcp=False, update={"handshake_timeout_s": 4.0})
    st = _ends_with(host, host.push(host.supervisor_package("1.1.0", fault)), ROLLED_BACK, reason)
    assert "next step: check the new supervisor's log" in st.error, st.error


def test_every_exception_class_named_for_a_reason_exists_where_it_is_named():
    """``classify`` matches by module and class name: a class moved without its entry would lose its reason."""
    for name in BY_EXCEPTION:
        module, _, qualname = name.rpartition(".")
        cls = getattr(importlib.import_module(module), qualname, None)
        assert isinstance(cls, type) and issubclass(cls, BaseException), name
        assert f"{cls.__module__}.{cls.__qualname__}" == name
