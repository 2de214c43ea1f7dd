"""A failed version's last output (which may hold a secret it printed on the way down) is shown only to the
callers allowed to operate it (supervisor/daemon_service.py, ``Policy.may_operate``), never to a read-only one."""

from __future__ import annotations

import grpc
import pytest

from baton.pb import common_pb2, daemon_pb2, daemon_pb2_grpc
from baton.reasons import OUTPUT_WITHHELD
from tests.conftest import UpdateHost, install_version

pytestmark = pytest.mark.e2e  # every test here starts a process

SECRET = "db password: hunter2"


def _host_with_read_only_listener(make_supervisor, release) -> UpdateHost:  # type: ignore[no-untyped-def]
    sup = make_supervisor(
        [{"name": "app", "packaged": True, "command": "bin/agent", "notify": True, "restart": "always",
          "backoff_initial_s": 0.2, "stop_timeout_s": 5.0}],
        tcp=True,  # grpc.insecure_tcp on loopback: read-only
        extra={"update": {"trusted_keys": [str(release.public_key)], "health_timeout_s": 10.0,
                          "health_window_s": 1.0}},
    )
    install_version(sup.base / "install", "app", "1.0.0", release.tree("1.0.0"))
    sup.start()
    sup.wait_agent("app", "running")
    return UpdateHost(sup, release)


def test_a_read_only_caller_gets_no_output_of_a_failed_version_while_a_root_socket_caller_does(make_supervisor,
                                                                                               release):
    host = _host_with_read_only_listener(make_supervisor, release)
    tree = release.tree("1.1.0", "exit_at_once")
    agent_py = tree / "agent.py"
    agent_py.write_text(agent_py.read_text().replace("\nimport os\n", f"\nimport os\nprint({SECRET!r}, flush=True)\n",
                                                     1))
    update_id = host.push(release.build("1.1.0", tree=tree))
    root_view = host.wait_final(update_id)
    assert root_view.state == common_pb2.UPDATE_STATE_ROLLED_BACK, root_view.error
    assert SECRET in root_view.last_log and SECRET in root_view.error, "the operator sees what it printed"
    record = host.journal(update_id)

    ref = daemon_pb2.UpdateRef(update_id=update_id)
    with grpc.insecure_channel(host.sup.cfg["grpc"]["listen"][0]) as ch:
        stub = daemon_pb2_grpc.DaemonServiceStub(ch)
        got = stub.GetUpdate(ref, timeout=10)
        listed = stub.ListUpdates(daemon_pb2.ListUpdatesRequest(), timeout=10).updates
        watched = next(iter(stub.WatchUpdate(ref, timeout=10)))
    for view in (got, *listed, watched):
        assert SECRET.encode() not in view.SerializeToString(), view
        assert view.last_log == "" and OUTPUT_WITHHELD in view.error
        assert (view.state, view.reason, view.update_id) == (root_view.state, root_view.reason, update_id)
        assert view.error.split("; its last output")[0] == root_view.error.split("; its last output")[0]
    assert host.journal(update_id) == record and SECRET in record.last_log, "the record itself is unchanged"
    assert SECRET in host.sup.stub.GetUpdate(ref, timeout=10).last_log
