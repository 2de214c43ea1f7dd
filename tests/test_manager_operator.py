"""The Manager records who started each push and rollout, and on which host (``--as``, else the login name)."""

from __future__ import annotations

import json
import re
import socket

import pytest

from tests.manager_fixtures import (
    make_fleet,
    make_manager_fixture,  # noqa: F401  (the make_manager fixture)
    package_args,
    signed,
)

pytestmark = pytest.mark.e2e  # every test here starts a process


def test_push_and_rollout_record_the_operator_and_host_and_updates_shows_them(
        make_manager, make_supervisor, release, monkeypatch):
    manager = make_manager()
    make_fleet(make_supervisor, release, manager, 1)
    host = socket.gethostname()

    manager.cli("push", "node-1", *package_args(signed(release.build("1.1.0"))), "--as", "alice")
    monkeypatch.setenv("SUDO_USER", "bob")  # `sudo baton-manager rollout ...` run by bob
    out = manager.cli("rollout", "--all", *package_args(signed(release.build("1.2.0")))).stdout
    rollout_id = re.search(r"rollout (r-[0-9a-f]+)", out).group(1)

    history = manager.updates()
    assert [(u["to_version"], u["started_by"], u["started_on"]) for u in history] == [
        ("1.1.0", "alice", host), ("1.2.0", "bob", host)]
    table = manager.cli("updates").stdout.splitlines()
    assert "BY" in table[0].split() and f"alice@{host}" in table[1] and f"bob@{host}" in table[2]
    [rollout] = json.loads(manager.cli("rollouts", "--json").stdout)
    assert (rollout["id"], rollout["started_by"], rollout["started_on"]) == (rollout_id, "bob", host)
    assert f"bob@{host}" in manager.cli("rollouts").stdout
