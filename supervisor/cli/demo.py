"""A self-contained demo in a temporary directory: nothing to configure, no external service.

It starts the reference Manager (``baton-manager serve``, SQLite and a package
server on 127.0.0.1), generates a release key, builds a supervisor release
from this checkout and installs it with ``install-self`` (1.0.0), starts it with three agents, kills one to show the
restart, has the Manager push a signed update of the ``web`` agent and then a
signed self-update to a second release (1.1.0; the agents keep their pids), shows the
Manager's update history, and stops everything.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from baton.pb import common_pb2, daemon_pb2, daemon_pb2_grpc

SAMPLE_AGENT = r'''
import os, signal, socket, sys, time
stop = False
def on_term(*_):
    global stop
    stop = True
signal.signal(signal.SIGTERM, on_term)
name = os.environ.get("BATON_AGENT_NAME", "?")
version = os.environ.get("BATON_AGENT_VERSION") or "-"
if os.environ.get("NOTIFY_SOCKET"):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(os.environ["NOTIFY_SOCKET"])
        s.sendall(b"READY=1\nSTATUS=serving")
n = 0
while not stop:
    n += 1
    print(f"{name} {version}: tick {n}", flush=True)
    time.sleep(1)
'''


class Demo:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.cfg_path = base / "supervisor.toml"
        self.proc: subprocess.Popen[bytes] | None = None
        self.manager: subprocess.Popen[bytes] | None = None
        self.channel: grpc.Channel | None = None
        self.db = base / "manager.db"
        self.manager_port, self.http_port, self.grpc_port = _free_ports(3)

    def say(self, text: str) -> None:
        print(f"\n== {text}", flush=True)

    # ---- set-up ------------------------------------------------------------------------------------------

    def write_files(self) -> None:
        from baton.signing import format_public_key, format_secret_key, generate_keypair

        secret, public = generate_keypair()
        (self.base / "release.pub").write_text(format_public_key(public))
        (self.base / "release.sec").write_text(format_secret_key(secret))
        os.chmod(self.base / "release.sec", 0o600)
        self.secret = secret
        agent = self.base / "sample_agent.py"
        agent.write_text(SAMPLE_AGENT)
        py = sys.executable
        self.cfg_path.write_text(f"""
[node]
id = "demo-node"
state_dir = "{self.base}/state"
install_root = "{self.base}/install"

[grpc]
unix_socket = "{self.base}/run/supervisor.sock"
listen = ["127.0.0.1:{self.grpc_port}"]
insecure_tcp = true   # loopback, read-only: the Manager pushes over the Unix socket (TCP needs mutual TLS)

[manager]
address = "127.0.0.1:{self.manager_port}"
retry_initial_s = 0.2
retry_max_s = 1.0

[update]
trusted_keys = ["{self.base}/release.pub"]
health_window_s = 1.0
free_space_reserve_bytes = 0

[[agents]]
name = "web"
packaged = true
command = "bin/web"
notify = true
restart = "always"

[[agents]]
name = "metrics"
command = "{py}"
args = ["-u", "{agent}"]
restart = "always"
backoff_initial_s = 0.5

[[agents]]
name = "shipper"
command = "{py}"
args = ["-u", "{agent}"]
notify = true
restart = "always"
""")

    def web_tree(self, version: str) -> Path:
        tree = self.base / "trees" / f"web-{version}"
        (tree / "bin").mkdir(parents=True, exist_ok=True)
        shutil.copy(self.base / "sample_agent.py", tree / "agent.py")
        launcher = tree / "bin" / "web"
        launcher.write_text(f'#!/bin/sh\nexec "{sys.executable}" -u "$(dirname "$0")/../agent.py"\n')
        launcher.chmod(0o755)
        return tree

    def package(self, tree: Path, component: str, version: str) -> Path:
        """Build and sign, as a release engineer would (baton-package build + sign)."""
        from baton.signing import format_manifest, sign_prehash
        from manager.build.package_tool import build_package

        out = self.base / "release" / f"{component}-{version}.tar.gz"
        out.parent.mkdir(exist_ok=True)
        digests = build_package(tree, out, True)
        signature = sign_prehash(self.secret, digests.blake2b512, format_manifest(component, version))
        out.with_name(out.name + ".minisig").write_text(signature)
        return out

    def baton_manager(self, *args: str, check: bool = True) -> str:
        res = subprocess.run([sys.executable, "-m", "manager", *args, "--db", str(self.db)], capture_output=True,
                             text=True, timeout=300)
        if check and res.returncode != 0:
            print(res.stdout + res.stderr)
        return res.stdout

    def start_manager(self) -> None:
        log = open(self.base / "manager.log", "wb")  # noqa: SIM115
        self.manager = subprocess.Popen(
            [sys.executable, "-m", "manager", "serve", "--db", str(self.db), "--listen",
             f"127.0.0.1:{self.manager_port}", "--packages", str(self.base / "served"), "--http",
             f"127.0.0.1:{self.http_port}", "--insecure-loopback"], stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def release(self, version: str) -> Path:
        """``baton-package release`` from this checkout and its lock file, then ``baton-package sign``."""
        from baton.digest import digest_stream
        from baton.signing import format_manifest, sign_prehash
        from manager.build.release import CHECKOUT, RUNTIME_LOCK, build_release

        out, manifest, _ = build_release(version, self.base / "release", lock=RUNTIME_LOCK, source=CHECKOUT)
        with open(out, "rb") as f:
            digests = digest_stream(f)
        signature = sign_prehash(self.secret, digests.blake2b512, format_manifest("supervisor", version))
        out.with_name(out.name + ".minisig").write_text(signature)
        print(f"   $ baton-package release --version {version} -o release/   -> {out.name} "
              f"({digests.size / 1e6:.1f} MB, {len(manifest.dependencies)} bundled dependencies)")
        return out

    def install(self) -> None:
        from baton.config import load_config
        from baton.layout import ComponentLayout

        cfg = load_config(self.cfg_path)
        (self.base / "release").mkdir(exist_ok=True)
        self.say("a supervisor release (Baton + every locked dependency), installed as the README says")
        tarball = self.release("1.0.0")
        subprocess.run(["tar", "-xzf", str(tarball), "-C", str(self.base / "release")], check=True)
        unpacked = self.base / "release" / "baton-1.0.0"
        print(f"   $ tar -xzf {tarball.name} && ./baton-1.0.0/bin/supervisor install-self --config supervisor.toml")
        res = subprocess.run(["env", "-i", str(unpacked / "bin" / "supervisor"), "install-self", "--config",
                              str(self.cfg_path), "--unit-dir", str(self.base / "systemd"), "--bin-dir",
                              str(self.base / "bin")],
                             capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise SystemExit(f"demo: install-self failed: {res.stderr.strip()}")
        print("\n".join("   " + line for line in res.stdout.strip().splitlines()))
        web = ComponentLayout(cfg.node.install_root, "web")
        web.versions_dir.mkdir(parents=True, exist_ok=True)
        staged = web.versions_dir / ".staging-demo"
        shutil.copytree(self.web_tree("1.0.0"), staged)
        web.install(staged, "1.0.0")
        web.switch("1.0.0")

    def start(self) -> None:
        launcher = self.base / "install" / "supervisor" / "current" / "bin" / "supervisor"
        log = open(self.base / "supervisor.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen([str(launcher), "run", "--config", str(self.cfg_path)], stdout=log,
                                     stderr=subprocess.STDOUT, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
        log.close()
        self.channel = grpc.insecure_channel(f"unix:{self.base}/run/supervisor.sock")
        self.stub = daemon_pb2_grpc.DaemonServiceStub(self.channel)

    # ---- watching ------------------------------------------------------------------------------------------

    def table(self) -> str:
        from supervisor.cli.main import _fmt_agents

        st = self.stub.GetStatus(daemon_pb2.GetStatusRequest(), timeout=10)
        return f"supervisor {st.supervisor_version}, pid {st.pid}\n" + _fmt_agents(list(st.agents))

    def wait_running(self, n: int = 3, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                agents = self.stub.ListAgents(daemon_pb2.ListAgentsRequest(), timeout=2).agents
                if sum(a.state == common_pb2.AGENT_STATE_RUNNING for a in agents) >= n:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"demo: agents did not come up; see {self.base}/supervisor.log")

    def manager_push(self, package: Path, component: str, version: str) -> None:
        """The Manager publishes the package on its HTTP server, pushes it and follows it to the end."""
        print(f"   $ baton-manager push demo-node --package {package.name} --component {component} "
              f"--version {version}")
        out = self.baton_manager("push", "demo-node", "--package", str(package), "--component", component,
                                 "--version", version)
        print("\n".join("   " + line for line in out.strip().splitlines()))

    def wait_registered(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.stub.GetStatus(daemon_pb2.GetStatusRequest(), timeout=5).manager_connected:
                return
            time.sleep(0.2)
        raise SystemExit(f"demo: the supervisor did not register with the Manager; see {self.base}/manager.log")

    # ---- the story ---------------------------------------------------------------------------------------

    def run(self, seconds: float) -> None:
        self.write_files()
        self.install()
        self.start_manager()
        self.start()
        self.wait_running()
        self.wait_registered()
        self.say("the reference Manager (SQLite, package server) and a supervisor (1.0.0, from its versioned "
                 "layout) keeping three agents running; the supervisor registered with the Manager")
        print(self.baton_manager("nodes").rstrip())
        print(self.table())

        victim = next(a for a in self.stub.ListAgents(daemon_pb2.ListAgentsRequest()).agents if a.name == "metrics")
        self.say(f"kill -9 metrics (pid {victim.pid}): it had been running, so the supervisor restarts it at once")
        os.kill(victim.pid, signal.SIGKILL)
        time.sleep(0.3)
        self.wait_running()
        print(self.table())

        self.say("the Manager pushes a signed update of the web agent (1.0.0 -> 1.1.0); a helper process "
                 "downloads, verifies, switches, checks health and commits")
        self.manager_push(self.package(self.web_tree("1.1.0"), "web", "1.1.0"), "web", "1.1.0")
        self.wait_running()
        print(self.table())

        before = {a.name: a.pid for a in self.stub.ListAgents(daemon_pb2.ListAgentsRequest()).agents}
        self.say("the Manager pushes a signed self-update of the supervisor to a second release (1.0.0 -> 1.1.0): "
                 "it execs in place, the helper holds its sockets and agent table meanwhile")
        self.manager_push(self.release("1.1.0"), "supervisor", "1.1.0")
        self.wait_running()
        print(self.table())
        after = {a.name: a.pid for a in self.stub.ListAgents(daemon_pb2.ListAgentsRequest()).agents}
        print(f"   agent pids before: {before}\n   agent pids after:  {after}"
              f"\n   -> {'unchanged: no agent was disturbed' if before == after else 'CHANGED'}")

        self.say("the Manager's record of every update (results reported by the supervisor, exactly once)")
        time.sleep(1.0)
        print(self.baton_manager("updates").rstrip())

        if seconds > 0:
            self.say(f"running for {seconds:.0f}s; try: supervisor status --socket {self.base}/run/supervisor.sock")
            time.sleep(seconds)

    def stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
        if self.manager is not None:
            self.manager.terminate()
            self.manager.wait(30)
        if self.proc is None:
            return
        self.say("SIGTERM to the supervisor: it stops every agent")
        try:
            pid = self.proc.pid
            os.kill(pid, signal.SIGTERM)
            rc = self.proc.wait(60)
            print(f"supervisor exited with {rc}")
        except (ProcessLookupError, subprocess.TimeoutExpired) as e:
            print(f"supervisor did not stop cleanly: {e}")


def _free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [int(s.getsockname()[1]) for s in socks]
    for s in socks:
        s.close()
    return ports


def run_demo(seconds: float = 5.0, keep: bool = False) -> int:
    base = Path(tempfile.mkdtemp(prefix="baton-demo-"))
    print(f"== Baton demo in {base}")
    demo = Demo(base)
    try:
        demo.run(seconds)
    except KeyboardInterrupt:
        pass
    finally:
        demo.stop()
        if keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    return 0
