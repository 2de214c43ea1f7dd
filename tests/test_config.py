"""A bad config gives one clear line naming the key, exit code 2, and starts nothing."""

from __future__ import annotations

import os
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
    "relative_missing_file": (BASE + "[manager]\naddress = \"127.0.0.1:1\"\ntls_ca = \"certs/ca.pem\"\n",
                              "manager.tls_ca", "/certs/ca.pem not found"),
    "relative_command": (BASE + "[[agents]]\nname = \"web\"\ncommand = \"bin/web\"\n", "agents[0].command",
                         "/bin/web is not an executable file"),
    "bare_command": (BASE + "[[agents]]\nname = \"web\"\ncommand = \"web\"\n", "agents[0].command",
                     "absolute path"),
    "duplicate_agent": (BASE + AGENT + AGENT, "agents[1].name", "duplicate agent name 'web'"),
    "bad_policy": (BASE + AGENT + "restart = \"sometimes\"\n", "agents[0].restart", "must be one of"),
    "bad_signal": (BASE + AGENT + "stop_signal = \"NOPE\"\n", "agents[0].stop_signal", "unknown signal"),
    "missing_node_id": (BASE.replace('id = "n1"\n', ""), "node.id", "is required"),
    "no_listener": (BASE.replace('unix_socket = "/tmp/baton-cfg-test/s.sock"', ""), "grpc", "listen"),
    "reserved_name": (BASE + AGENT.replace('"web"', '"supervisor"'), "agents[0].name", "reserved"),
    "not_toml": ("[node\nid=", "", "not valid TOML"),
    # Values that crashed the helper or the supervisor later, or switched a safety check off.
    "nan_timeout": (BASE + "[update]\nhealth_timeout_s = nan\n", "update.health_timeout_s", "finite"),
    "nan_window": (BASE + "[update]\nhealth_window_s = nan\n", "update.health_window_s", "finite"),
    "inf_timeout": (BASE + "[update]\ndownload_timeout_s = inf\n", "update.download_timeout_s", "finite"),
    "negative_inf_backoff": (BASE + AGENT + "backoff_max_s = -inf\n", "agents[0].backoff_max_s", "finite"),
    "nan_start_seconds": (BASE + AGENT + "start_seconds = nan\n", "agents[0].start_seconds", "finite"),
    "huge_timeout": (BASE + "[manager]\nrpc_timeout_s = 1e300\n", "manager.rpc_timeout_s", "between 0 and"),
    "negative_limit": (BASE + "[update]\nmax_files = -1\n", "update.max_files", "greater than 0"),
    "negative_package_limit": (BASE + "[update]\nmax_package_bytes = -5\n", "update.max_package_bytes",
                               "greater than 0"),
    "negative_rate": (BASE + "[update]\nmin_rate_bytes_per_s = -1\n", "update.min_rate_bytes_per_s", "0 or more"),
    "negative_reserve": (BASE + "[update]\nfree_space_reserve_bytes = -1\n", "update.free_space_reserve_bytes",
                         "0 or more"),
    "zero_rate_window": (BASE + "[update]\nmin_rate_window_s = 0\n", "update.min_rate_window_s", "greater than 0"),
    "port_out_of_range": (BASE + 'listen = ["127.0.0.1:99999"]\ninsecure_tcp = true\n', "grpc.listen[0]",
                          "out of range"),
    "port_zero": (BASE + 'listen = ["127.0.0.1:0"]\ninsecure_tcp = true\n', "grpc.listen[0]", "out of range"),
    "manager_port": (BASE + '[manager]\naddress = "127.0.0.1:70000"\n', "manager.address", "out of range"),
    "unknown_group": (BASE + 'unix_socket_group = "no-such-group-baton"\n', "grpc.unix_socket_group",
                      "no such group"),
    "nul_in_env": (BASE + AGENT + 'env = { A = "x\\u0000y" }\n', "agents[0].env.A", "NUL"),
    "nul_in_env_name": (BASE + AGENT + 'env = { "A\\u0000" = "x" }\n', "agents[0].env.A", "not a valid name"),
    "equals_in_env_name": (BASE + AGENT + 'env = { "A=B" = "x" }\n', "agents[0].env.A=B", "not a valid name"),
    "nul_in_args": (BASE + AGENT + 'args = ["ok", "x\\u0000"]\n', "agents[0].args[1]", "NUL"),
    "nul_in_command": (BASE + '[[agents]]\nname = "web"\ncommand = "/bin/true\\u0000x"\n', "agents[0].command",
                       "NUL"),
    "nul_in_node_id": (BASE.replace('id = "n1"', 'id = "n\\u00001"'), "node.id", "NUL"),
    "missing_trusted_key": (BASE + '[update]\ntrusted_keys = ["/nonexistent/release.pub"]\n',
                            "update.trusted_keys[0]", "not found"),
    "allowed_clients_without_tls": (BASE + 'allowed_clients = ["CN=manager-1"]\n', "grpc.allowed_clients",
                                    "needs grpc.tls_cert"),
    "tcp_without_tls": (BASE + 'listen = ["127.0.0.1:7443"]\n', "grpc.listen[0]", "without TLS"),
    "negative_uid": (BASE + "allow_downgrade_uids = [-1]\n", "grpc.allow_downgrade_uids[0]", "not a uid"),
    "notify_socket_too_long": (BASE.replace("/tmp/baton-cfg-test/install", "/tmp/" + "i" * 90) + AGENT
                               + "notify = true\n", "agents[0].notify", "more than the 107 a Unix socket path holds"),
    "run_dir_too_long": (BASE.replace("/tmp/baton-cfg-test/state", "/tmp/" + "s" * 80), "node.state_dir",
                         "more than the 107 a Unix socket path holds"),
    "control_socket_too_long": (BASE.replace("/tmp/baton-cfg-test/s.sock", "/tmp/" + "c" * 110 + ".sock"),
                                "grpc.unix_socket", "more than the 107 a Unix socket path holds"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_names_the_key_and_the_problem(tmp_path, case):
    body, key, problem = BAD[case]
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, body), environ={})
    assert key in str(e.value)
    assert problem in str(e.value)
    if "/" in problem:
        assert f"{tmp_path}{problem}" in str(e.value), "a path in an error is shown absolute"


@pytest.mark.parametrize("case", ["unknown_key", "duplicate_agent", "relative_missing_file", "missing_file",
                                  "nan_timeout", "port_out_of_range", "unknown_group"])
@pytest.mark.e2e
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


@pytest.mark.e2e
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


def test_relative_paths_resolve_against_the_config_files_directory(tmp_path, monkeypatch):
    (tmp_path / "bin").mkdir()
    web = tmp_path / "bin" / "web"
    web.write_text("#!/bin/sh\n")
    web.chmod(0o755)
    body = BASE.replace('state_dir = "/tmp/baton-cfg-test/state"', 'state_dir = "state"')
    body += "[[agents]]\nname = \"web\"\ncommand = \"bin/web\"\nworking_dir = \".\"\n"
    write(tmp_path, body)
    monkeypatch.chdir("/")
    cfg = load_config(Path(os.path.relpath(tmp_path / "c.toml", "/")), environ={})
    assert cfg.node.state_dir == tmp_path / "state"
    assert cfg.agents[0].command == str(web)
    assert cfg.agents[0].working_dir == tmp_path


def test_unknown_key_suggests_the_closest_known_one(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, BASE + AGENT + "restrat = \"always\"\n"), environ={})
    assert str(e.value) == "agents[0].restrat: unknown key (did you mean restart?)"


@pytest.mark.parametrize("name", ["TERM", "SIGTERM", "sigint", "HUP"])
def test_stop_signal_accepts_names_with_and_without_sig(tmp_path, name):
    cfg = load_config(write(tmp_path, BASE + AGENT + f"stop_signal = \"{name}\"\n"), environ={})
    import signal

    assert cfg.agents[0].stop_signum == signal.Signals["SIG" + name.upper().removeprefix("SIG")]


@pytest.mark.parametrize(("line", "key", "problem"), [
    ('user = "no-such-user-here"', "agents[0].user", "no such user"),
    ('user = "nobody"\ngroup = "no-such-group-here"', "agents[0].group", "no such group"),
    ('umask = "999"', "agents[0].umask", "octal"),
    ('stderr = "elsewhere"', "agents[0].stderr", "merged, separate"),
    ('notify_access = "all"', "agents[0].notify_access", "main, group"),
])
def test_bad_user_group_umask_or_stderr_is_refused(tmp_path, line, key, problem):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, BASE + AGENT + line + "\n"), environ={})
    assert str(e.value).startswith(key) and problem in str(e.value)


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "supervisor", "check-config", str(path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


@pytest.mark.parametrize("case", ["nan_window", "negative_limit", "zero_rate_window", "port_out_of_range",
                                  "unknown_group", "nul_in_env", "missing_trusted_key", "tcp_without_tls"])
@pytest.mark.e2e
def test_check_config_refuses_a_bad_value_in_one_line_naming_the_key_with_exit_2(tmp_path, case):
    body, key, problem = BAD[case]
    res = check_config(write(tmp_path, body))
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert key in lines[0] and problem in lines[0]
    assert "Traceback" not in res.stderr


@pytest.mark.e2e
def test_group_without_user_is_refused_at_check_config_naming_the_key(tmp_path):
    import grp
    import pwd

    nogroup = grp.getgrgid(pwd.getpwnam("nobody").pw_gid).gr_name
    res = check_config(write(tmp_path, BASE + AGENT + f'group = "{nogroup}"\n'))
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert "agents[0].group: " in lines[0] and "without user would run the agent as root" in lines[0]


def test_group_with_user_is_accepted(tmp_path):
    import grp
    import pwd

    nobody = pwd.getpwnam("nobody")
    nogroup = grp.getgrgid(nobody.pw_gid).gr_name
    cfg = load_config(write(tmp_path, BASE + AGENT + f'user = "nobody"\ngroup = "{nogroup}"\n'), environ={})
    assert (cfg.agents[0].user, cfg.agents[0].group) == ("nobody", nogroup)


def test_trusted_key_that_is_not_a_minisign_public_key_is_refused(tmp_path):
    garbled = tmp_path / "release.pub"
    garbled.write_text("untrusted comment: minisign public key\nnot base64 at all\n")
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, BASE + f'[update]\ntrusted_keys = ["{garbled}"]\n'), environ={})
    assert e.value.key == "update.trusted_keys[0]"
    assert "not a minisign public key" in str(e.value)


def test_trusted_key_that_is_a_directory_or_a_fifo_is_refused_without_reading_it(tmp_path):
    fifo = tmp_path / "release.pub"
    os.mkfifo(fifo)
    for path in (tmp_path, fifo):
        with pytest.raises(ConfigError) as e:
            load_config(write(tmp_path, BASE + f'[update]\ntrusted_keys = ["{path}"]\n'), environ={})
        assert "not a regular file" in str(e.value)


def test_a_real_trusted_key_is_accepted(tmp_path, release):
    cfg = load_config(write(tmp_path, BASE + f'[update]\ntrusted_keys = ["{release.public_key}"]\n'), environ={})
    assert cfg.update.trusted_keys == (release.public_key,)


@pytest.mark.parametrize("name", ["tls_cert", "tls_key", "tls_ca"])
def test_tls_file_that_cannot_be_read_or_holds_no_pem_is_refused(tmp_path, name):
    files = {n: tmp_path / f"{n}.pem" for n in ("tls_cert", "tls_key", "tls_ca")}
    files["tls_cert"].write_text("-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n")
    files["tls_ca"].write_text("-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n")
    files["tls_key"].write_text("-----BEGIN PRIVATE KEY-----\nx\n-----END PRIVATE KEY-----\n")
    files[name].write_text("garbage\n")
    grpc = "".join(f'{n} = "{p}"\n' for n, p in files.items())
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, BASE + grpc), environ={})
    assert e.value.key == f"grpc.{name}" and "PEM" in str(e.value)
    files[name].unlink()
    files[name].mkdir()
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, BASE + grpc), environ={})
    assert e.value.key == f"grpc.{name}" and "not a regular file" in str(e.value)


def test_an_agent_whose_notify_socket_path_is_too_long_is_set_apart_and_the_others_run(tmp_path):
    """Only that agent's socket cannot be bound: it is the agent's own problem, not the host's (issue 25)."""
    body = (BASE.replace("/tmp/baton-cfg-test/install", "/tmp/" + "i" * 90) + AGENT + "notify = true\n"
            + AGENT.replace('"web"', '"worker"'))
    cfg = load_config(write(tmp_path, body), environ={}, host_checks=False, degrade=True)
    assert [a.name for a in cfg.agents] == ["worker"]
    assert [(b.name, b.key) for b in cfg.broken_agents] == [("web", "agents[0].notify")]
