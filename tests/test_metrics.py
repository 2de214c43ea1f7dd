"""The optional Prometheus endpoints of the supervisor and the reference Manager, scraped over real HTTP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from baton.config import ConfigError, config_from_dict
from tests.conftest import PY, ROOT, UpdateHost, free_port, install_version, wait_for
from tests.manager_fixtures import ManagerProc, make_fleet, package_args, port_open, signed

PACKAGED_APP = {"name": "app", "packaged": True, "command": "bin/agent", "notify": True, "restart": "always",
                "backoff_initial_s": 0.2, "stop_timeout_s": 5.0}


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample as {(name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def metrics_host(make_supervisor, release) -> tuple[UpdateHost, int]:
    port = free_port()
    sup = make_supervisor(
        [dict(PACKAGED_APP)],
        extra={"update": {"trusted_keys": [str(release.public_key)], "health_timeout_s": 10.0,
                          "health_window_s": 0.5, "free_space_reserve_bytes": 0},
               "metrics": {"listen": f"127.0.0.1:{port}"}},
    )
    install_version(sup.base / "install", "app", "1.0.0", release.tree("1.0.0"))
    sup.start()
    sup.wait_agent("app", "running")
    wait_for(lambda: port_open(port), 10, what="the metrics endpoint")
    return UpdateHost(sup, release), port


@pytest.mark.e2e
def test_supervisor_metrics_move_with_a_killed_agent_and_a_committed_update(metrics_host):
    host, port = metrics_host
    before = scrape(port)
    assert value(before, "baton_agents", state="running") == 1
    assert value(before, "baton_agent_up", agent="app") == 1
    assert value(before, "baton_manager_configured") == 0 and value(before, "baton_manager_connected") == 0
    restarts = value(before, "baton_agent_restarts_total", agent="app")

    old = host.sup.agent("app")
    os.kill(old.pid, signal.SIGKILL)
    host.sup.wait_agent("app", "running", pred=lambda a: a.pid != old.pid)
    after_kill = scrape(port)
    assert value(after_kill, "baton_agent_restarts_total", agent="app") == restarts + 1
    assert value(after_kill, "baton_agent_last_exit_status", agent="app") == -signal.SIGKILL

    st = host.wait_final(host.push(host.release.build("1.1.0")))
    assert st.success, st.error
    after_update = scrape(port)
    assert value(after_update, "baton_updates_finished_total", component="app", result="committed") == 1
    assert value(after_update, "baton_updates", component="app", state="committed") == 1
    assert value(after_update, "baton_update_step_seconds_count", component="app", step="download") == 1
    assert value(after_update, "baton_update_step_seconds_sum", component="app", step="health") > 0
    assert value(after_update, "baton_helper_runs_total") >= 1


@pytest.mark.e2e
def test_finished_updates_total_never_goes_down_when_the_journal_is_pruned_or_the_supervisor_restarts(
        make_supervisor, release):
    port = free_port()
    sup = make_supervisor(
        [dict(PACKAGED_APP)],
        extra={"update": {"trusted_keys": [str(release.public_key)], "health_timeout_s": 10.0,
                          "health_window_s": 0.5, "free_space_reserve_bytes": 0, "keep_updates": 1},
               "metrics": {"listen": f"127.0.0.1:{port}"}},
    )
    install_version(sup.base / "install", "app", "1.0.0", release.tree("1.0.0"))
    sup.start()
    sup.wait_agent("app", "running")
    wait_for(lambda: port_open(port), 10, what="the metrics endpoint")
    host = UpdateHost(sup, release)
    for n, version in enumerate(("1.1.0", "1.2.0", "1.3.0"), start=1):
        st = host.wait_final(host.push(host.release.build(version)))
        assert st.success, st.error
        wait_for(lambda: len(list((sup.state_dir / "updates").glob("*/journal.json"))) == 1, 10,
                 what="the journal pruned to one record")
        samples = scrape(port)
        assert value(samples, "baton_updates_finished_total", component="app", result="committed") == n
        assert value(samples, "baton_updates", component="app", state="committed") == 1  # what the journal holds
    sup.terminate()
    sup.start()
    wait_for(lambda: port_open(port), 10, what="the metrics endpoint after the restart")
    assert value(scrape(port), "baton_updates_finished_total", component="app", result="committed") == 3


@pytest.mark.e2e
def test_a_journal_whose_totals_cannot_be_kept_is_not_pruned_so_no_finished_update_is_lost(make_supervisor, release):
    port = free_port()
    sup = make_supervisor(
        [dict(PACKAGED_APP)],
        extra={"update": {"trusted_keys": [str(release.public_key)], "health_timeout_s": 10.0,
                          "health_window_s": 0.5, "free_space_reserve_bytes": 0, "keep_updates": 1},
               "metrics": {"listen": f"127.0.0.1:{port}"}},
    )
    install_version(sup.base / "install", "app", "1.0.0", release.tree("1.0.0"))
    sup.state_dir.mkdir(parents=True, exist_ok=True)
    (sup.state_dir / "metrics").write_text("not a directory\n")  # update-totals.json cannot be written below it
    sup.start()
    sup.wait_agent("app", "running")
    wait_for(lambda: port_open(port), 10, what="the metrics endpoint")
    host = UpdateHost(sup, release)
    for version in ("1.1.0", "1.2.0"):
        st = host.wait_final(host.push(host.release.build(version)))
        assert st.success, st.error
    wait_for(lambda: "pruning the update journal failed" in sup.output(), 10, what="the refused prune in the log")
    assert len(list((sup.state_dir / "updates").glob("*/journal.json"))) == 2, "both records kept"
    assert (sup.state_dir / "metrics").read_text() == "not a directory\n"
    assert value(scrape(port), "baton_updates_finished_total", component="app", result="committed") == 2


@pytest.mark.e2e
def test_start_times_are_gauges_of_when_each_process_started_and_the_agent_version_is_an_info_metric(
        metrics_host):
    host, port = metrics_host
    samples = scrape(port)
    app = host.sup.agent("app")
    st = host.sup.status()
    assert value(samples, "baton_supervisor_start_time_seconds") == pytest.approx(st.started_at, abs=1)
    assert value(samples, "baton_agent_start_time_seconds", agent="app") == pytest.approx(app.start_time, abs=1)
    assert value(samples, "baton_agent_version_info", agent="app", version="1.0.0") == 1
    assert not any(name.endswith("uptime_seconds") for name, _ in samples)
    again = scrape(port)  # a start time does not move while the process runs, as an uptime would
    assert value(again, "baton_agent_start_time_seconds", agent="app") == \
        value(samples, "baton_agent_start_time_seconds", agent="app")


@pytest.mark.e2e
def test_supervisor_metrics_are_off_by_default_and_not_even_imported():
    out = subprocess.run([PY, "-c", "import sys, supervisor.daemon, supervisor.cli; "
                                    "print('prometheus_client' in sys.modules)"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
    cfg = config_from_dict({"node": {"id": "n"}, "grpc": {"unix_socket": "/run/x.sock"}})
    assert cfg.metrics.address is None


@pytest.mark.parametrize("listen", ["0.0.0.0:9464", "192.0.2.1:9464"])
def test_a_non_loopback_metrics_address_is_refused_naming_the_key(listen):
    with pytest.raises(ConfigError) as e:
        config_from_dict({"node": {"id": "n"}, "grpc": {"unix_socket": "/run/x.sock"}, "metrics": {"listen": listen}})
    assert str(e.value).startswith("metrics.listen: ")
    assert "allow_remote" in str(e.value)


def test_a_non_loopback_metrics_address_is_accepted_with_allow_remote():
    cfg = config_from_dict({"node": {"id": "n"}, "grpc": {"unix_socket": "/run/x.sock"},
                            "metrics": {"listen": "0.0.0.0:9464", "allow_remote": True}})
    assert cfg.metrics.address == ("0.0.0.0", 9464)


@pytest.mark.parametrize("key", ["http_head_timeout_s", "http_idle_timeout_s"])
def test_a_metrics_http_bound_of_zero_is_refused_naming_the_key(key):
    with pytest.raises(ConfigError) as e:
        config_from_dict({"node": {"id": "n"}, "grpc": {"unix_socket": "/run/x.sock"},
                          "metrics": {"listen": "127.0.0.1:9464", key: 0}})
    assert str(e.value) == f"metrics.{key}: must be greater than 0"


def test_the_metrics_http_bounds_default_to_every_endpoints_own():
    from baton.bounded_http import HttpLimits

    m = config_from_dict({"node": {"id": "n"}, "grpc": {"unix_socket": "/run/x.sock"}}).metrics
    assert (m.http_head_timeout_s, m.http_idle_timeout_s) == (HttpLimits.head_timeout_s, HttpLimits.idle_timeout_s)


@pytest.mark.e2e
def test_check_config_refuses_a_malformed_metrics_listen_in_one_line(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('[node]\nid = "n"\n[grpc]\nunix_socket = "/run/x.sock"\n[metrics]\nlisten = "9464"\n')
    r = subprocess.run([sys.executable, "-m", "supervisor", "check-config", str(path)], capture_output=True,
                       text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "supervisor: config error: metrics.listen: '9464' is not HOST:PORT (e.g. 127.0.0.1:9464)"]


@pytest.mark.e2e
def test_manager_metrics_show_nodes_online_and_move_with_a_committed_push(tmp_path, reaper, make_supervisor,
                                                                          release):
    metrics_port = free_port()
    manager = ManagerProc(tmp_path / "manager", reaper)
    manager.extra_args = ["--metrics", f"127.0.0.1:{metrics_port}"]
    manager.start()
    try:
        wait_for(lambda: port_open(metrics_port), 10, what="the Manager's metrics endpoint")
        make_fleet(make_supervisor, release, manager, 1)
        before = scrape(metrics_port)
        assert value(before, "baton_manager_nodes", status="online") == 1
        assert value(before, "baton_manager_node_online", node="node-1") == 1
        assert value(before, "baton_manager_updates_finished_total", component="app", result="committed") == 0

        manager.cli("push", "node-1", *package_args(signed(release.build("1.1.0"))))
        after = scrape(metrics_port)
        assert value(after, "baton_manager_updates_finished_total", component="app", result="committed") == 1
        assert value(after, "baton_manager_updates", component="app", state="committed") == 1
    finally:
        manager.stop()


@pytest.mark.e2e
def test_manager_refuses_a_non_loopback_metrics_address(tmp_path):
    r = subprocess.run([PY, "-m", "manager", "serve", "--listen", f"127.0.0.1:{free_port()}", "--insecure-loopback",
                        "--metrics", "0.0.0.0:9464"], capture_output=True, text=True, cwd=ROOT, timeout=60,
                       env={**os.environ, "BATON_MANAGER_DB": str(tmp_path / "m.db")})
    assert r.returncode != 0
    assert "--metrics: 0.0.0.0 is not a loopback address" in r.stderr


@pytest.mark.e2e
def test_supervisor_metrics_survive_a_self_update_and_count_its_handover(make_self_host):
    host = make_self_host(tcp=False)
    port = free_port()
    host.sup.terminate()
    host.sup.cfg["metrics"] = {"listen": f"127.0.0.1:{port}"}
    host.sup.start(launcher=host.launcher)
    wait_for(lambda: port_open(port), 10, what="the metrics endpoint")
    assert value(scrape(port), "baton_handover_seconds_count") == 0

    st = host.wait_final(host.push(host.supervisor_package("1.1.0")), timeout=90)
    assert st.success, st.error
    assert host.sup.status().supervisor_version == "1.1.0"

    def handover_counted() -> bool:
        return port_open(port) and value(scrape(port), "baton_handover_seconds_count") == 1

    wait_for(handover_counted, 20, what="the new supervisor's metrics to count the handover")
    after = scrape(port)
    assert value(after, "baton_supervisor_info", node="node-1", version="1.1.0") == 1
    assert value(after, "baton_handover_seconds_sum") > 0
    assert value(after, "baton_updates_finished_total", component="supervisor", result="committed") == 1
