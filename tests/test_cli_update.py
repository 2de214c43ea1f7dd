"""``supervisor update|updates|cancel`` and ``helper hold|unhold`` against a real supervisor, helper and agent."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import grpc
import pytest

from baton.pb import common_pb2, daemon_pb2
from tests.conftest import PY, ROOT, UpdateHost


def cli(module: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", module, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def supervisor(host: UpdateHost, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return cli("supervisor", *args, "--socket", str(host.sup.socket), timeout=timeout)


def helper(host: UpdateHost, *args: str) -> subprocess.CompletedProcess[str]:
    return cli("helper", "--config", str(host.sup.config_path), *args)


def write_signature(pkg) -> Path:  # type: ignore[no-untyped-def]
    sig = pkg.path.with_name(pkg.path.name + ".minisig")
    sig.write_text(pkg.signature)
    return sig


def one_line_error(r: subprocess.CompletedProcess[str], prog: str) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"{prog}: "), r.stderr
    assert "Traceback" not in r.stderr and "debug_error_string" not in r.stderr
    return lines[0]


# ---- supervisor update --------------------------------------------------------------------------------


@pytest.mark.e2e
def test_update_with_a_local_package_commits_and_runs_the_new_version(update_host):
    pkg = update_host.release.build("1.1.0")
    write_signature(pkg)
    old = update_host.sup.agent("app")
    r = supervisor(update_host, "update", "app", "--package", str(pkg.path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "committed app 1.1.0" in r.stdout
    # plain lines, one per state seen (a fast download may fall between two looks), when not on a terminal
    states = [line.split("  ")[1] for line in r.stdout.splitlines() if line.startswith("app 1.0.0 -> 1.1.0")]
    assert states[-1] == "committed" and len(states) == len(set(states)), r.stdout
    assert "\r" not in r.stdout
    app = update_host.sup.agent("app")
    assert (app.version, app.state) == ("1.1.0", common_pb2.AGENT_STATE_RUNNING)
    assert app.pid != old.pid
    assert update_host.layout.current_version() == "1.1.0"


@pytest.mark.e2e
def test_update_serves_the_package_only_on_loopback_and_only_while_it_runs(update_host):
    pkg = update_host.release.build("1.1.0")
    write_signature(pkg)
    r = supervisor(update_host, "update", "app", "--package", str(pkg.path), "--json")
    assert r.returncode == 0, r.stderr
    uid = json.loads(r.stdout)["updateId"]
    url = update_host.journal(uid).request.download_url
    assert url.startswith("http://127.0.0.1:")
    assert len(url.split("/")[3]) == 32  # a random 128-bit path component
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=5)  # the server is gone with the command


@pytest.mark.e2e
def test_update_json_prints_the_final_status_with_every_field(update_host):
    pkg = update_host.release.build("1.1.0")
    write_signature(pkg)
    r = supervisor(update_host, "update", "app", "--package", str(pkg.path), "--json")
    assert r.returncode == 0, r.stderr
    final = json.loads(r.stdout)
    assert final["state"] == "UPDATE_STATE_COMMITTED"
    assert final["success"] is True and final["rolledBack"] is False and final["error"] == ""
    assert (final["fromVersion"], final["toVersion"]) == ("1.0.0", "1.1.0")


@pytest.mark.e2e
def test_update_reads_the_version_from_the_signed_manifest_and_refuses_a_different_one(update_host):
    pkg = update_host.release.build("1.1.0")
    write_signature(pkg)
    before = update_host.disk()
    r = supervisor(update_host, "update", "app", "--package", str(pkg.path), "--version", "1.2.0")
    assert r.returncode == 1
    assert "signed for version '1.1.0', not '1.2.0'" in one_line_error(r, "supervisor update")
    assert update_host.disk() == before
    assert supervisor(update_host, "updates", "--json").stdout.strip() == "[]"


@pytest.mark.e2e
def test_update_of_a_package_signed_for_another_component_is_refused_before_the_push(update_host):
    pkg = update_host.release.build("1.1.0", component="other")
    write_signature(pkg)
    r = supervisor(update_host, "update", "app", "--package", str(pkg.path))
    assert r.returncode == 1
    assert "signed for component 'other', not 'app'" in one_line_error(r, "supervisor update")


@pytest.mark.e2e
def test_update_from_a_url_commits(update_host, pkgserver):
    pkg = update_host.release.build("1.1.0")
    sig = write_signature(pkg)
    (pkgserver.root / pkg.path.name).write_bytes(pkg.path.read_bytes())
    r = supervisor(update_host, "update", "app", "--url", pkgserver.url(pkg.path.name), "--signature", str(sig))
    assert r.returncode == 0, r.stdout + r.stderr
    assert update_host.sup.agent("app").version == "1.1.0"


@pytest.mark.e2e
def test_update_that_rolls_back_exits_1_with_the_error(update_host):
    pkg = update_host.release.build("1.1.0", behaviour="exit_at_once")
    write_signature(pkg)
    r = supervisor(update_host, "update", "app", "--package", str(pkg.path))
    assert r.returncode == 1, r.stdout
    line = one_line_error(r, "supervisor update")
    assert "rolled back" in line
    assert update_host.sup.agent("app").version == "1.0.0"


@pytest.mark.e2e
def test_update_to_an_unreachable_supervisor_is_one_clear_line(tmp_path, release):
    pkg = release.build("1.1.0")
    write_signature(pkg)
    r = cli("supervisor", "update", "app", "--package", str(pkg.path), "--socket", str(tmp_path / "none.sock"))
    assert r.returncode == 1
    assert "cannot reach the supervisor" in one_line_error(r, "supervisor update")


# ---- supervisor updates / cancel ------------------------------------------------------------------------


@pytest.mark.e2e
def test_updates_lists_recent_updates_newest_first(update_host):
    first = update_host.wait_final(update_host.push(update_host.release.build("1.1.0")))
    second = update_host.wait_final(update_host.push(update_host.release.build("1.2.0", behaviour="exit_at_once")))
    r = supervisor(update_host, "updates")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:5] == ["ID", "COMPONENT", "FROM", "TO", "STATE"]
    assert lines[1].split()[:5] == [second.update_id, "app", "1.1.0", "1.2.0", "rolled_back"]
    assert lines[2].split()[:5] == [first.update_id, "app", "1.0.0", "1.1.0", "committed"]
    listed = json.loads(supervisor(update_host, "updates", "--json").stdout)
    assert [u["updateId"] for u in listed] == [second.update_id, first.update_id]


def test_list_updates_is_read_only_for_the_authz_policy():
    from supervisor.authz import READ_ONLY_METHODS

    assert "/baton.v1.DaemonService/ListUpdates" in READ_ONLY_METHODS


@pytest.mark.e2e
def test_cancel_of_an_unknown_update_is_one_clear_line(update_host):
    # Before CancelUpdate is served this says so; after, it names the unknown id. Either way: one line, exit 1.
    r = supervisor(update_host, "cancel", "0123456789abcdef")
    assert r.returncode == 1
    line = one_line_error(r, "supervisor cancel")
    assert "0123456789abcdef" in line or "cannot cancel updates" in line


# ---- holds --------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_held_component_refuses_a_push_naming_the_hold_and_its_reason(update_host):
    r = helper(update_host, "hold", "app", "--reason", "payroll run until Friday")
    assert r.returncode == 0, r.stderr
    before_disk = update_host.disk()
    before = update_host.sup.agent("app")
    with pytest.raises(grpc.RpcError) as e:
        update_host.push(update_host.release.build("1.1.0"))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "app is held since" in e.value.details()
    assert "payroll run until Friday" in e.value.details()
    assert update_host.disk() == before_disk
    assert update_host.sup.agent("app").pid == before.pid
    assert not list(update_host.sup.stub.ListUpdates(daemon_pb2.ListUpdatesRequest(), timeout=5).updates)


@pytest.mark.e2e
def test_supervisor_update_of_a_held_component_is_refused_in_one_line(update_host):
    helper(update_host, "hold", "app", "--reason", "freeze")
    pkg = update_host.release.build("1.1.0")
    write_signature(pkg)
    r = supervisor(update_host, "update", "app", "--package", str(pkg.path))
    assert r.returncode == 1
    line = one_line_error(r, "supervisor update")
    assert "FAILED_PRECONDITION" in line and "held" in line and "freeze" in line


@pytest.mark.e2e
def test_unhold_accepts_pushes_again(update_host):
    helper(update_host, "hold", "app")
    r = helper(update_host, "unhold", "app")
    assert r.returncode == 0 and "hold removed" in r.stdout
    st = update_host.wait_final(update_host.push(update_host.release.build("1.1.0")))
    assert st.success, st.error


@pytest.mark.e2e
def test_hold_survives_a_supervisor_restart(update_host):
    helper(update_host, "hold", "app", "--reason", "pinned")
    update_host.sup.terminate()
    update_host.sup.start()
    with pytest.raises(grpc.RpcError) as e:
        update_host.push(update_host.release.build("1.1.0"))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.e2e
def test_hold_file_is_private_and_written_durably(update_host):
    helper(update_host, "hold", "app", "--reason", "x")
    path = update_host.sup.state_dir / "holds" / "app.json"
    assert path.stat().st_mode & 0o777 == 0o600
    assert (path.parent.stat().st_mode & 0o777) == 0o700
    assert not [p for p in path.parent.iterdir() if p.name != "app.json"]  # no temp file left behind


@pytest.mark.e2e
def test_hold_of_an_unknown_component_is_refused(update_host):
    r = helper(update_host, "hold", "nope")
    assert r.returncode == 2
    assert "unknown component 'nope'" in r.stderr
    assert not (update_host.sup.state_dir / "holds").exists()


@pytest.mark.e2e
def test_status_commands_show_holds(update_host):
    helper(update_host, "hold", "app", "--reason", "payroll")
    r = helper(update_host, "--status")
    assert r.returncode == 0, r.stderr
    assert "holds:" in r.stdout and "app is held since" in r.stdout and "payroll" in r.stdout
    s = cli("supervisor", "status", "--socket", str(update_host.sup.socket))
    assert "held (pushes refused):" in s.stdout and "app: payroll" in s.stdout
    status = json.loads(cli("supervisor", "status", "--socket", str(update_host.sup.socket), "--json").stdout)
    assert status["holds"][0]["component"] == "app" and status["holds"][0]["reason"] == "payroll"


@pytest.mark.e2e
def test_admission_refuses_a_held_component_with_its_own_error_class(update_host):
    """The supervisor and the helper share check_request, so both refuse a held component the same way."""
    from baton.admission import Held, check_request
    from baton.config import load_config
    from baton.holds import Holds

    cfg = load_config(update_host.sup.config_path)
    Holds(cfg.node.state_dir).hold("app", "late")
    pkg = update_host.release.build("1.1.0")
    with pytest.raises(Held) as e:
        check_request(cfg, component="app", version="1.1.0", download_url=pkg.url, sha256=pkg.sha256,
                      size=pkg.size, signature=pkg.signature, node_id="", allow_downgrade=False, force=False)
    assert e.value.hold.reason == "late"


@pytest.mark.e2e
def test_manager_records_a_push_refused_by_a_hold_as_held(update_host, tmp_path):
    from baton.states import UpdateState
    from manager.errors import PushRefused
    from manager.publish import PackageRef
    from manager.push import Pusher, Target
    from manager.store import SqliteStore

    helper(update_host, "hold", "app", "--reason", "audit week")
    pkg = update_host.release.build("1.1.0")
    store = SqliteStore(tmp_path / "manager.db")
    ref = PackageRef("app", "1.1.0", pkg.url, pkg.sha256, pkg.size, pkg.signature)
    with Pusher(store, Target("node-1", f"unix:{update_host.sup.socket}"), None) as pusher, \
            pytest.raises(PushRefused) as e:
        pusher.push(ref, update_id="feedfacefeedface")
    assert e.value.code == "FAILED_PRECONDITION"
    row = store.update("feedfacefeedface")
    assert row is not None and row.state == UpdateState.FAILED
    assert row.error.startswith("held on node-1: app is held since"), row.error
    assert "audit week" in row.error


@pytest.mark.e2e
def test_update_on_a_terminal_redraws_one_progress_line(update_host, pkgserver):
    import os
    import pty

    pkg = update_host.release.build("1.1.0")
    sig = write_signature(pkg)
    (pkgserver.root / pkg.path.name).write_bytes(pkg.path.read_bytes())
    pkgserver.on(pkg.path.name).rate_limit(max(pkg.size // 3, 256))
    master, slave = pty.openpty()
    proc = subprocess.Popen([PY, "-m", "supervisor", "update", "app", "--url", pkgserver.url(pkg.path.name),
                             "--signature", str(sig), "--socket", str(update_host.sup.socket)],
                            stdout=slave, stderr=subprocess.PIPE, cwd=ROOT)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the command exited and closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert proc.wait(120) == 0, proc.stderr.read() if proc.stderr else ""
    text = out.decode(errors="replace")
    import re

    assert re.search("\r(?!\n)", text), text  # a carriage return that redraws (the pty adds \r before \n)
    assert "downloading" in text and "/s" in text and "ETA" in text, text
    assert "committed app 1.1.0" in text


@pytest.mark.e2e
def test_updates_watch_prints_a_new_table_when_an_update_appears(update_host):
    proc = subprocess.Popen([PY, "-m", "supervisor", "updates", "--watch", "--interval", "0.2", "--socket",
                             str(update_host.sup.socket)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)
    update_host.sup.reaper.track(proc.pid)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "no update recorded"
        st = update_host.wait_final(update_host.push(update_host.release.build("1.1.0")))
        seen = ""
        while st.update_id not in seen or " committed" not in seen:
            line = proc.stdout.readline()
            assert line, f"the watch ended: {seen}"
            seen += line
        assert "app" in seen
    finally:
        proc.kill()
        proc.wait(10)


@pytest.mark.parametrize("argv", [("supervisor", "update"), ("supervisor", "updates"), ("supervisor", "cancel"),
                                  ("helper", "hold"), ("helper", "unhold")])
@pytest.mark.e2e
def test_every_new_command_has_help_with_an_example(argv):
    r = cli(*argv, "--help")
    assert r.returncode == 0, r.stderr
    assert "example" in r.stdout


def test_loopback_package_server_answers_only_its_one_path_with_ranges_and_stops(tmp_path):
    import http.client
    from urllib.parse import urlsplit

    from supervisor.file_server import serve_file

    pkg = tmp_path / "app-1.1.0.tar.gz"
    pkg.write_bytes(bytes(range(256)) * 40)
    with serve_file(pkg) as url:
        u = urlsplit(url)
        assert u.hostname == "127.0.0.1"

        def get(path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, str]:
            conn = http.client.HTTPConnection("127.0.0.1", u.port, timeout=10)
            conn.request("GET", path, headers=headers or {})
            r = conn.getresponse()
            body = r.read()
            conn.close()
            return r.status, body, r.getheader("Content-Range", "")

        assert get(u.path)[:2] == (200, pkg.read_bytes())
        assert get(u.path, {"Range": "bytes=1000-"}) == (206, pkg.read_bytes()[1000:], "bytes 1000-10239/10240")
        assert get("/" + pkg.name)[0] == 404
        assert get(u.path.rsplit("/", 1)[0] + "/../../etc/passwd")[0] == 404
    conn = http.client.HTTPConnection("127.0.0.1", u.port, timeout=5)
    with pytest.raises(OSError):
        conn.request("GET", u.path)
        conn.getresponse()


@pytest.mark.e2e
def test_run_has_its_own_help_and_the_full_command_list_is_unchanged():
    """`supervisor run` parses with run's parser alone (the daemon keeps no other command's parser loaded)."""
    r = cli("supervisor", "run", "--help")
    assert r.returncode == 0, r.stderr
    assert "usage: supervisor run" in r.stdout and "--config" in r.stdout
    full = cli("supervisor", "--help")
    for command in ("run", "status", "doctor", "audit", "update", "updates", "cancel", "install-self"):
        assert command in full.stdout
    missing = cli("supervisor", "run")
    assert missing.returncode == 2 and "--config" in missing.stderr
