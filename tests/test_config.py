"""A bad config gives one clear line naming the key, exit code 2, and starts nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from baton.config import ConfigError, load_config
from tests.conftest import PY, ROOT


def write(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(body)
    return p


BASE = """
[node]
id = "n1"
state_dir = "/tmp/baton-cfg-test/state"
install_root = "/tmp/baton-cfg-test/install"
[grpc]
unix_socket = "/tmp/baton-cfg-test/s.sock"
"""
AGENT = f"""
[[agents]]
name = "web"
command = "{sys.executable}"
"""

BAD = {
    "unknown_key": (BASE + "[update]\nmax_backup = 3\n", "update.max_backup", "unknown key"),
    "unknown_section": (BASE + "[bogus]\nx = 1\n", "bogus", "unknown section"),
    "wrong_type": (BASE + "[update]\nmax_backups = \"three\"\n", "update.max_backups", "must be an integer"),
    "wrong_type_bool": (BASE + AGENT + "notify = 1\n", "agents[0].notify", "true or false"),
    "missing_file": (BASE + "[manager]\naddress = \"127.0.0.1:1\"\ntls_ca = \"/nonexistent/ca.pem\"\n",
                     "manager.tls_ca", "not found"),
    "missing_tls_file": (BASE.replace("[grpc]", "[grpc]\ntls_cert = \"/nope/c.pem\"\ntls_key = \"/nope/k.pem\"\n"
                                      "tls_ca = \"/nope/ca.pem\""), "grpc.tls_cert", "not found"),
    "relative_path": (BASE.replace('state_dir = "/tmp/baton-cfg-test/state"', 'state_dir = "state"'),
                      "node.state_dir", "absolute path"),
    "relative_command": (BASE + "[[agents]]\nname = \"web\"\ncommand = \"bin/web\"\n", "agents[0].command",
                         "absolute path"),
    "duplicate_agent": (BASE + AGENT + AGENT, "agents[1].name", "duplicate agent name 'web'"),
    "bad_policy": (BASE + AGENT + "restart = \"sometimes\"\n", "agents[0].restart", "must be one of"),
    "bad_signal": (BASE + AGENT + "stop_signal = \"NOPE\"\n", "agents[0].stop_signal", "unknown signal"),
    "missing_node_id": (BASE.replace('id = "n1"\n', ""), "node.id", "is required"),
    "no_listener": (BASE.replace('unix_socket = "/tmp/baton-cfg-test/s.sock"', ""), "grpc", "listen"),
    "reserved_name": (BASE + AGENT.replace('"web"', '"supervisor"'), "agents[0].name", "reserved"),
    "not_toml": ("[node\nid=", "", "not valid TOML"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_names_the_key_and_the_problem(tmp_path, case):
    body, key, problem = BAD[case]
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, body), environ={})
    assert key in str(e.value)
    assert problem in str(e.value)


@pytest.mark.parametrize("case", ["unknown_key", "duplicate_agent", "relative_path", "missing_file"])
def test_run_with_bad_config_exits_2_and_starts_nothing(tmp_path, case):
    body, key, _ = BAD[case]
    body = body.replace("/tmp/baton-cfg-test", str(tmp_path))
    cfg = write(tmp_path, body)
    res = subprocess.run([PY, "-m", "supervisor", "run", "--config", str(cfg)], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert key in lines[0]
    assert not (tmp_path / "state").exists()


def test_check_config_accepts_a_good_file_and_refuses_a_bad_one(tmp_path):
    good = write(tmp_path, BASE + AGENT)
    ok = subprocess.run([PY, "-m", "supervisor", "check-config", str(good)], capture_output=True, text=True,
                        cwd=ROOT, timeout=60)
    assert ok.returncode == 0
    assert "1 agents" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text(BAD["duplicate_agent"][0])
    res = subprocess.run([PY, "-m", "supervisor", "check-config", str(bad)], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert res.returncode == 2
    assert "agents[1].name" in res.stderr


def test_defaults_fill_what_the_file_leaves_out(tmp_path):
    cfg = load_config(write(tmp_path, BASE + AGENT), environ={})
    assert cfg.update.max_backups == 2
    assert cfg.agents[0].restart == "on-failure"
    assert cfg.download_dir == Path("/tmp/baton-cfg-test/state/downloads")


def test_environment_overrides_node_id_and_listen_address(tmp_path):
    cfg = load_config(write(tmp_path, BASE + "insecure_tcp = true\n"), environ={"BATON_NODE_ID": "from-env",
                                                      "BATON_GRPC_LISTEN": "127.0.0.1:9001,[::1]:9002"})
    assert cfg.node.id == "from-env"
    assert cfg.grpc.listen == ("127.0.0.1:9001", "[::1]:9002")


def test_config_is_frozen(tmp_path):
    import dataclasses

    cfg = load_config(write(tmp_path, BASE), environ={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.node.id = "x"  # type: ignore[misc]


def test_example_config_in_packaging_is_valid():
    import tomllib

    from baton.config import config_from_dict

    raw = tomllib.loads((ROOT / "packaging" / "supervisor.example.toml").read_text())
    for a in raw.get("agents", []):
        a["command"] = sys.executable
    for k in ("trusted_keys",):
        raw.get("update", {}).pop(k, None)
    cfg = config_from_dict(raw, environ={})
    assert cfg.node.id
