"""The audit trail: one record per mutating call with who made it and what came of it (baton/audit.py,
supervisor/audit.py), read back with `supervisor audit`, kept across a self-update."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from baton.audit import AuditLog, AuditRecord, Caller
from baton.pb import common_pb2, daemon_pb2, daemon_pb2_grpc
from baton.signing import load_public_key
from manager.devca import make_dev_pki
from tests.conftest import PY, ROOT, agent, wait_for
from tests.test_unix_peer import open_dir, run_client  # noqa: F401  (open_dir is a fixture)

ALLOWED = "URI:spiffe://baton/manager/manager-1"


def records(state_dir: Path, call: str | None = None) -> list[AuditRecord]:
    return [r for r in AuditLog(state_dir).read() if call is None or r.call == call]


def written_records(state_dir: Path, n: int) -> list[AuditRecord]:
    """The records once there are ``n``: a call ended with ``context.abort`` is answered as it aborts (grpc aio
    sends the status there), so its record may be written just after the client hears the refusal."""
    return wait_for(lambda: rs if len(rs := records(state_dir)) >= n else None, 10, what=f"{n} records")


def audit_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "supervisor", "audit", "--config", str(config), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)


@pytest.mark.e2e
def test_a_push_is_recorded_with_the_local_caller_and_the_signing_key_id_not_the_signature(update_host):
    pkg = update_host.release.build("1.1.0")
    update_id = update_host.push(pkg)
    update_host.wait_final(update_id)

    [rec] = records(update_host.sup.state_dir, "PushUpdate")
    assert rec.outcome == "ok" and rec.code == "OK"
    assert (rec.caller.kind, rec.caller.uid, rec.caller.pid) == ("local", os.getuid(), os.getpid())
    assert rec.args["component"] == "app" and rec.args["version"] == "1.1.0"
    assert rec.args["signature_key_id"] == load_public_key(update_host.release.public_key).key_id_hex
    assert "signature" not in rec.args
    assert rec.result == {"update_id": update_id}
    raw = (update_host.sup.state_dir / "audit" / "audit.log").read_text()
    assert pkg.signature.splitlines()[1] not in raw, "the signature text is not in the log"
    st = (update_host.sup.state_dir / "audit" / "audit.log").stat()
    assert st.st_mode & 0o777 == 0o600


@pytest.mark.e2e
def test_a_stop_is_recorded_and_read_back_by_supervisor_audit(make_supervisor):
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True)])
    sup.start()
    sup.wait_agent("web", "running")
    sup.stub.StopAgent(daemon_pb2.AgentRef(name="web"), timeout=15)
    with pytest.raises(grpc.RpcError) as e:
        sup.stub.StopAgent(daemon_pb2.AgentRef(name="nope"), timeout=15)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    sup.status()  # read-only calls are not recorded

    ok, missing = written_records(sup.state_dir, 2)
    assert (ok.call, ok.args, ok.outcome) == ("StopAgent", {"name": "web"}, "ok")
    assert (missing.outcome, missing.code) == ("failed", "NOT_FOUND") and "nope" in missing.message

    res = audit_cli(sup.config_path, "--since", "1h", "--json")
    assert res.returncode == 0, res.stderr
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert [(d["call"], d["outcome"]) for d in lines] == [("StopAgent", "ok"), ("StopAgent", "failed")]
    assert lines[0]["caller"]["uid"] == os.getuid()
    table = audit_cli(sup.config_path).stdout
    assert "StopAgent" in table and "name=web" in table and "failed NOT_FOUND" in table
    future = audit_cli(sup.config_path, "--since", "2999-01-01T00:00:00Z", "--json")
    assert future.returncode == 0 and future.stdout == ""
    bad = audit_cli(sup.config_path, "--since", "yesterday")
    assert bad.returncode == 2 and "--since 'yesterday'" in bad.stderr


@pytest.mark.e2e
def test_read_only_calls_are_recorded_only_when_grpc_audit_read_calls_asks(make_supervisor):
    quiet = make_supervisor([agent("web", "ready_agent.py", notify=True)], name="quiet")
    asked = make_supervisor([agent("web", "ready_agent.py", notify=True)], name="asked",
                            extra={"grpc": {"audit_read_calls": True}})
    for sup in (quiet, asked):
        sup.start()
        sup.stub.ListAgents(daemon_pb2.ListAgentsRequest(), timeout=15)
    assert records(quiet.state_dir) == []
    [rec] = records(asked.state_dir, "ListAgents")
    assert (rec.outcome, rec.caller.kind, rec.caller.uid) == ("ok", "local", os.getuid())


@pytest.mark.e2e
def test_a_grpc_audit_read_calls_that_is_not_a_boolean_is_refused_by_check_config_naming_the_key(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('[node]\nid = "n"\n[grpc]\nunix_socket = "/run/x.sock"\naudit_read_calls = "yes"\n')
    r = subprocess.run([PY, "-m", "supervisor", "check-config", str(path)], capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    assert r.returncode == 2
    [line] = r.stderr.strip().splitlines()
    assert line.startswith("supervisor: config error: grpc.audit_read_calls: ")


@pytest.mark.e2e
@pytest.mark.skipif(os.geteuid() != 0, reason="running a client as another user needs root")
def test_a_local_unprivileged_user_is_refused_and_audited_as_refused(make_supervisor, open_dir):  # noqa: F811
    sock = open_dir / "supervisor.sock"
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True)], extra={"grpc": {"unix_socket": str(sock)}})
    sup.socket = sock
    sup.start()
    sock.chmod(0o666)  # past the file permissions: SO_PEERCRED refuses nobody, and the refusal is recorded

    nobody = run_client(sock, "setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")
    assert nobody["closed_at_once"]
    rec = wait_for(lambda: records(sup.state_dir, "connect"), 10, what="the refusal record")[0]
    assert (rec.outcome, rec.code, rec.caller.kind, rec.caller.uid) == ("refused", "PERMISSION_DENIED", "local", 65534)
    assert rec.caller.pid and "uid 65534 may not use the local socket" in rec.message
    assert SYSTEM_CLIENT_MARK in rec.caller.command


STOP_WEB = ("import grpc, sys; from baton.pb import daemon_pb2, daemon_pb2_grpc; "
            "ch = grpc.insecure_channel('unix:' + sys.argv[1]); "
            "daemon_pb2_grpc.DaemonServiceStub(ch).StopAgent(daemon_pb2.AgentRef(name='web'), timeout=15)")


SET_LOGIN_UID_AND_EXEC = ("import os, sys\nwith open('/proc/self/loginuid', 'w') as f:\n    f.write(sys.argv[1])\n"
                          "os.execv(sys.argv[2], sys.argv[2:])\n")


def stop_web_as(sock: Path, login_uid: int | None, sudo_user: str | None) -> None:
    """StopAgent from a root child whose kernel login uid is ``login_uid`` (as PAM sets it at login) and whose
    environment claims ``SUDO_USER``."""
    env = {k: v for k, v in os.environ.items() if k != "SUDO_USER"}
    if sudo_user is not None:
        env["SUDO_USER"] = sudo_user
    argv = [PY, "-c", STOP_WEB, str(sock)]
    if login_uid is not None:
        # the child sets its login uid, then execs the call: a preexec_fn runs Python in a fork of this threaded
        # process (such a child was once aborted by gRPC's poller)
        argv = [PY, "-c", SET_LOGIN_UID_AND_EXEC, str(login_uid), *argv]
    subprocess.run(argv, cwd=ROOT, env=env, check=True, timeout=60)


@pytest.mark.e2e
@pytest.mark.skipif(os.geteuid() != 0, reason="setting a login uid needs root")
def test_a_root_call_is_recorded_with_the_login_user_behind_it_and_sudo_user_only_as_a_claim(make_supervisor):
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True)])
    sup.start()
    sup.wait_agent("web", "running")
    stop_web_as(sup.socket, login_uid=65534, sudo_user="mallory")

    [rec] = records(sup.state_dir, "StopAgent")
    c = rec.caller
    assert (c.kind, c.uid, c.login_uid, c.login_user, c.sudo_user) == ("local", 0, 65534, "nobody", "mallory")
    assert "uid 0 login nobody(65534) claims sudo mallory" in c.describe()
    row = audit_cli(sup.config_path).stdout.splitlines()[1]
    assert "login nobody(65534) claims sudo mallory" in row
    line = json.loads(audit_cli(sup.config_path, "--json").stdout)
    assert line["caller"]["login_uid"] == 65534 and line["caller"]["sudo_user"] == "mallory"


@pytest.mark.e2e
@pytest.mark.skipif(os.geteuid() != 0, reason="clearing a login uid needs root")
def test_a_caller_outside_any_login_session_has_no_login_user_whatever_it_claims(make_supervisor):
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True)])
    sup.start()
    sup.wait_agent("web", "running")
    stop_web_as(sup.socket, login_uid=0xFFFFFFFF, sudo_user=None)

    [rec] = records(sup.state_dir, "StopAgent")
    assert (rec.caller.login_uid, rec.caller.login_user, rec.caller.sudo_user) == (None, "", "")
    assert "login" not in rec.caller.describe()
    assert set(json.loads(audit_cli(sup.config_path, "--json").stdout)["caller"]) == {"kind", "uid", "pid",
                                                                                        "command"}


SYSTEM_CLIENT_MARK = "-I -c"  # run_client's command line, as /proc shows it


@pytest.mark.e2e
def test_a_tls_client_is_recorded_by_its_certificate_identity_allowed_or_refused(make_supervisor, tmp_path):
    pki = make_dev_pki(tmp_path / "pki", ["manager-1", "manager-2"], ["node-1"])
    node = pki.nodes["node-1"]
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True)], tcp=True, extra={"grpc": {
        "tls_cert": str(node.cert), "tls_key": str(node.key), "tls_ca": str(pki.ca.cert),
        "allowed_clients": [ALLOWED]}})
    sup.start()
    sup.wait_agent("web", "running")
    address = sup.cfg["grpc"]["listen"][0]

    def stub(client):  # type: ignore[no-untyped-def]
        creds = grpc.ssl_channel_credentials(root_certificates=pki.ca.cert.read_bytes(),
                                             private_key=client.key.read_bytes(),
                                             certificate_chain=client.cert.read_bytes())
        ch = grpc.secure_channel(address, creds, options=[("grpc.ssl_target_name_override", "node-1")])
        return ch, daemon_pb2_grpc.DaemonServiceStub(ch)

    ch1, allowed = stub(pki.managers["manager-1"])
    ch2, other = stub(pki.managers["manager-2"])
    with ch1, ch2:
        assert allowed.RestartAgent(daemon_pb2.AgentRef(name="web"), timeout=15).state
        with pytest.raises(grpc.RpcError) as e:
            other.StopAgent(daemon_pb2.AgentRef(name="web"), timeout=15)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    sup.wait_agent("web", "running")  # the refused stop did nothing

    ok, refused = written_records(sup.state_dir, 2)
    assert (ok.call, ok.outcome, ok.caller.kind) == ("RestartAgent", "ok", "tls")
    assert ALLOWED in ok.caller.identity and ok.caller.address.startswith("127.0.0.1:")
    assert (refused.call, refused.outcome, refused.code) == ("StopAgent", "refused", "PERMISSION_DENIED")
    assert "manager-2" in refused.caller.identity and "allowed_clients" in refused.message


@pytest.mark.e2e
def test_a_manual_helper_rollback_writes_its_own_record(update_host):
    update_host.wait_final(update_host.push(update_host.release.build("1.1.0")))
    res = subprocess.run([PY, "-m", "helper", "--rollback", "app", "--config", str(update_host.sup.config_path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**os.environ, "SUDO_USER": "alice"})
    assert res.returncode == 0, res.stderr
    [rec] = records(update_host.sup.state_dir, "helper --rollback")
    assert (rec.caller.kind, rec.caller.identity, rec.caller.uid) == ("helper", "alice", os.getuid())
    assert rec.args == {"component": "app"} and rec.outcome == "ok" and "1.1.0 -> 1.0.0" in rec.message

    refused = subprocess.run([PY, "-m", "helper", "--rollback", "nope", "--config",
                              str(update_host.sup.config_path)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert refused.returncode == 1
    failed = records(update_host.sup.state_dir, "helper --rollback")[-1]
    assert (failed.outcome, failed.args) == ("failed", {"component": "nope"}) and "unknown component" in failed.message


@pytest.mark.e2e
def test_the_audit_log_is_kept_across_a_self_update(make_self_host):
    host = make_self_host(tcp=False)
    host.sup.stub.RestartAgent(daemon_pb2.AgentRef(name="chatty"), timeout=15)
    update_id = host.push(host.supervisor_package("1.1.0"))
    assert host.wait_final(update_id, timeout=90).state == common_pb2.UPDATE_STATE_COMMITTED
    assert host.sup.status().supervisor_version == "1.1.0"
    host.sup.stub.StopAgent(daemon_pb2.AgentRef(name="chatty"), timeout=15)

    calls = [(r.call, r.outcome) for r in records(host.sup.state_dir) if r.caller.pid == os.getpid()]
    assert calls == [("RestartAgent", "ok"), ("PushUpdate", "ok"), ("StopAgent", "ok")]


@pytest.mark.e2e
def test_a_self_update_that_rolls_back_keeps_the_log_too(make_self_host):
    host = make_self_host(tcp=False)
    update_id = host.push(host.supervisor_package("1.1.0", "exit_at_start"))
    assert host.wait_final(update_id, timeout=90).state == common_pb2.UPDATE_STATE_ROLLED_BACK
    host.sup.stub.RestartAgent(daemon_pb2.AgentRef(name="chatty"), timeout=15)  # the old version, writing on

    calls = [(r.call, r.outcome) for r in records(host.sup.state_dir) if r.caller.pid == os.getpid()]
    assert calls == [("PushUpdate", "ok"), ("RestartAgent", "ok")]


@pytest.mark.e2e
def test_a_mutating_method_is_recorded_without_being_named_anywhere(make_supervisor):
    """CancelUpdate (contract version 2) is in no list: every method not known to be read-only is recorded."""
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True)])
    sup.start()
    code = "OK"
    try:
        sup.stub.CancelUpdate(daemon_pb2.UpdateRef(update_id="no-such-update"), timeout=15)
    except grpc.RpcError as e:
        code = e.code().name
    wait_for(lambda: records(sup.state_dir), 15, what="the CancelUpdate record")
    [rec] = records(sup.state_dir)
    assert (rec.call, rec.args, rec.code) == ("CancelUpdate", {"update_id": "no-such-update"}, code)


def test_rotation_renames_files_and_every_record_reads_back_in_order(tmp_path):
    log = AuditLog(tmp_path, max_bytes=600, backups=3)
    for i in range(12):
        log.append(AuditRecord(time=1000.0 + i, caller=Caller(kind="local", uid=0, pid=i), call="StopAgent",
                               outcome="ok", args={"name": f"a{i}"}))
    files = log.files()
    assert 3 <= len(files) <= 4 and {p.name for p in files} <= {"audit.log", "audit.log.1", "audit.log.2",
                                                                  "audit.log.3"}, "three backups at most"
    got = [r.caller.pid for r in log.read()]
    assert got == sorted(got) and got[-1] == 11, "the oldest rotate away first; the rest stay in order"
    assert [r.caller.pid for r in log.read(since=1010.0)] == [10, 11]


def test_a_torn_last_line_damages_only_itself(tmp_path):
    log = AuditLog(tmp_path)
    log.append(AuditRecord(time=1.0, caller=Caller(kind="helper"), call="helper --rollback", outcome="ok"))
    with open(log.path, "ab") as f:
        f.write(b'{"v":1,"time":"2026-01-01T0')  # a crash mid-write
    log.append(AuditRecord(time=2.0, caller=Caller(kind="helper"), call="helper --rollback", outcome="failed"))
    assert [r.outcome for r in log.read()] == ["ok", "failed"]


def test_an_audit_log_that_is_a_symlink_is_not_followed(tmp_path):
    from baton.audit import AuditError

    target = tmp_path / "elsewhere"
    target.write_text("")
    log = AuditLog(tmp_path / "state")
    log.dir.mkdir(parents=True)
    log.path.symlink_to(target)
    with pytest.raises(AuditError):
        log.append(AuditRecord(time=time.time(), caller=Caller(kind="helper"), call="x", outcome="ok"))
    assert target.read_text() == ""


@pytest.mark.e2e
def test_a_flood_of_refused_calls_is_bounded_and_never_rotates_away_accepted_changes(make_supervisor):
    """1,500 refused StopAgent calls through the read-only loopback listener, as fast as a client can make them."""
    from supervisor.audit import REFUSALS_PER_CALLER, SUPPRESSED_CALL

    sup = make_supervisor([agent("web", "ready_agent.py", notify=True)], tcp=True)
    sup.start()
    pid = sup.wait_agent("web", "running").pid
    sup.stub.RestartAgent(daemon_pb2.AgentRef(name="web"), timeout=15)  # an accepted change, through the socket
    pid = sup.wait_agent("web", "running", pred=lambda a: a.pid != pid).pid
    changes = wait_for(lambda: (sup.state_dir / "audit" / "audit.log").read_bytes(), 10, what="the change's record")

    with grpc.insecure_channel(sup.cfg["grpc"]["listen"][0]) as ch:
        stub = daemon_pb2_grpc.DaemonServiceStub(ch)
        codes = []
        for _ in range(15):
            calls = [stub.StopAgent.future(daemon_pb2.AgentRef(name="web"), timeout=30) for _ in range(100)]
            codes += [c.exception().code() for c in calls]  # type: ignore[union-attr]
    assert set(codes) == {grpc.StatusCode.PERMISSION_DENIED} and len(codes) == 1500

    summary = wait_for(lambda: records(sup.state_dir, SUPPRESSED_CALL), 30, what="the suppressed-refusals record")
    one_by_one = records(sup.state_dir, "StopAgent")
    assert len(one_by_one) == REFUSALS_PER_CALLER and {r.outcome for r in one_by_one} == {"refused"}
    assert [r.args["suppressed"] for r in summary] == [1500 - REFUSALS_PER_CALLER]
    assert summary[0].args["calls"] == {"StopAgent": 1500 - REFUSALS_PER_CALLER}
    assert summary[0].caller.kind == "tcp" and "1495 more refusals of tcp 127.0.0.1" in summary[0].message
    assert (sup.state_dir / "audit" / "audit.log").read_bytes() == changes, "the changes' file is untouched"
    assert sup.agent("web").pid == pid, "nothing was stopped"


@pytest.mark.e2e
def test_escape_sequences_in_a_records_arguments_are_printed_escaped_by_supervisor_audit(make_supervisor):
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True)], tcp=True)
    sup.start()
    evil = "web\x1b]0;owned\x07\x1b[2K\x1b[1A\rok \u202efdp.exe"
    with grpc.insecure_channel(sup.cfg["grpc"]["listen"][0]) as ch, pytest.raises(grpc.RpcError) as e:
        daemon_pb2_grpc.DaemonServiceStub(ch).StopAgent(daemon_pb2.AgentRef(name=evil), timeout=15)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    wait_for(lambda: records(sup.state_dir, "StopAgent"), 10, what="the refusal's record")

    res = subprocess.run([PY, "-m", "supervisor", "audit", "--config", str(sup.config_path)], capture_output=True,
                         cwd=ROOT, timeout=60)
    assert res.returncode == 0, res.stderr
    assert b"name=web\\x1b]0;owned\\x07\\x1b[2K\\x1b[1A\\rok \\u202efdp.exe" in res.stdout
    assert not set(res.stdout) & ((set(range(0x20)) - {0x0a}) | {0x7f}), "no control byte but the newlines"
    assert "\u202e".encode() not in res.stdout
    assert json.loads(audit_cli(sup.config_path, "--json").stdout)["args"]["name"] == evil, "--json keeps it exact"


def long_records(state_dir: Path, n: int) -> None:
    """``n`` records with a long caller, argument and message, as a busy host's log holds."""
    log = AuditLog(state_dir)
    caller = Caller(kind="local", uid=0, pid=4242, command="python3 " + "x" * 150, login_uid=1000,
                    login_user="alice", sudo_user="alice")
    for i in range(n):
        log.append(AuditRecord(time=1_700_000_000.0 + i, caller=caller, call="PushUpdate", outcome="failed",
                               code="FAILED_PRECONDITION", message="m" * 300,
                               args={"component": "app", "url": "file:///srv/" + "p" * 200}))


@pytest.mark.e2e
def test_supervisor_audit_on_a_terminal_prints_each_record_on_one_line_of_its_width(make_supervisor):
    import fcntl
    import pty
    import struct
    import termios

    sup = make_supervisor([])
    sup.write_config()
    long_records(sup.state_dir, 3)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        proc = subprocess.Popen([PY, "-m", "supervisor", "audit", "--config", str(sup.config_path)], cwd=ROOT,
                                stdout=slave, stderr=subprocess.PIPE)
        os.close(slave)
        out = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        assert proc.wait(60) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        os.close(master)
    lines = out.decode().replace("\r\n", "\n").splitlines()
    assert len(lines) == 4 and all(len(line) <= 100 for line in lines), lines
    assert all(line.startswith("2023-11-14T22:13:2") for line in lines[1:])
    wide = audit_cli(sup.config_path).stdout.splitlines()  # a pipe, not a terminal: whole cells
    assert "m" * 300 in wide[1]


@pytest.mark.e2e
def test_supervisor_audit_json_into_a_pipe_closed_early_ends_quietly(make_supervisor):
    sup = make_supervisor([])
    sup.write_config()
    long_records(sup.state_dir, 400)  # far more than a pipe holds
    for args in (["--json"], []):
        proc = subprocess.Popen([PY, "-m", "supervisor", "audit", "--config", str(sup.config_path), *args],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None and proc.stderr is not None
        first = proc.stdout.readline()
        proc.stdout.close()  # as `| head -1` does
        assert proc.wait(60) == 0
        assert proc.stderr.read() == b"", "no traceback, no complaint"
        assert first.strip()


def test_refusals_rotate_in_their_own_file_and_read_back_merged_with_changes_by_time(tmp_path):
    log = AuditLog(tmp_path, refusals_max_bytes=600, refusals_backups=1)
    old = AuditRecord(time=1.0, caller=Caller(kind="tcp"), call="StopAgent", outcome="refused")
    log.dir.mkdir(parents=True)
    log.path.write_text(json.dumps(old.to_json()) + "\n")  # written before refusals had a file of their own
    log.append(AuditRecord(time=2.0, caller=Caller(kind="local", uid=0), call="StopAgent", outcome="ok"))
    changes = log.path.read_bytes()
    for i in range(40):
        log.append(AuditRecord(time=3.0 + i, caller=Caller(kind="tcp"), call="StopAgent", outcome="refused"))

    assert log.path.read_bytes() == changes
    assert {"audit.log", "refused.log.1"} <= {p.name for p in log.files()} <= {"audit.log", "refused.log",
                                                                                "refused.log.1"}
    got = log.read()
    assert [r.time for r in got[:2]] == [1.0, 2.0] and [r.time for r in got] == sorted(r.time for r in got)
    assert got[-1].time == 42.0
