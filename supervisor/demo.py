"""A self-contained demo: a supervisor with sample agents in a temporary directory.

Nothing to configure: it writes a config, starts a real supervisor process,
shows its agents, kills one to show the restart, and stops everything.
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

from baton.pb import daemon_pb2, daemon_pb2_grpc

SAMPLE_AGENT = r'''
import os, signal, socket, sys, time
stop = False
def on_term(*_):
    global stop
    stop = True
signal.signal(signal.SIGTERM, on_term)
name = os.environ.get("BATON_AGENT_NAME", "?")
if os.environ.get("NOTIFY_SOCKET"):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(os.environ["NOTIFY_SOCKET"])
        s.sendall(b"READY=1\nSTATUS=serving")
n = 0
while not stop:
    n += 1
    print(f"{name}: tick {n}", flush=True)
    time.sleep(1)
'''


def _config(base: Path) -> str:
    agent = base / "sample_agent.py"
    agent.write_text(SAMPLE_AGENT)
    py = sys.executable
    agents = ""
    for name, notify in (("web", "true"), ("metrics", "false"), ("shipper", "true")):
        agents += f"""
[[agents]]
name = "{name}"
command = "{py}"
args = ["-u", "{agent}"]
notify = {notify}
restart = "always"
backoff_initial_s = 0.5
"""
    return f"""
[node]
id = "demo-node"
state_dir = "{base}/state"
install_root = "{base}/install"

[grpc]
unix_socket = "{base}/run/supervisor.sock"
{agents}"""


def _table(stub: daemon_pb2_grpc.DaemonServiceStub) -> str:
    from supervisor.cli import _fmt_agents

    st = stub.GetStatus(daemon_pb2.GetStatusRequest(), timeout=5)
    return f"supervisor {st.supervisor_version} pid {st.pid}\n" + _fmt_agents(list(st.agents))


def _wait_running(stub: daemon_pb2_grpc.DaemonServiceStub, n: int, timeout: float = 20) -> None:
    from baton.pb import common_pb2

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            agents = stub.ListAgents(daemon_pb2.ListAgentsRequest(), timeout=2).agents
            if sum(a.state == common_pb2.AGENT_STATE_RUNNING for a in agents) >= n:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise SystemExit("demo: agents did not come up")


def run_demo(seconds: float = 20.0, keep: bool = False) -> int:
    base = Path(tempfile.mkdtemp(prefix="baton-demo-"))
    cfg = base / "supervisor.toml"
    cfg.write_text(_config(base))
    print(f"== Baton demo in {base}\n== config: {cfg}")
    log = open(base / "supervisor.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "supervisor", "run", "--config", str(cfg)], stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        with grpc.insecure_channel(f"unix:{base}/run/supervisor.sock") as ch:
            stub = daemon_pb2_grpc.DaemonServiceStub(ch)
            _wait_running(stub, 3)
            print("\n== three agents running:\n" + _table(stub))
            victim = next(a for a in stub.ListAgents(daemon_pb2.ListAgentsRequest()).agents if a.name == "metrics")
            print(f"\n== kill -9 metrics (pid {victim.pid}); the supervisor restarts it after its backoff")
            os.kill(victim.pid, signal.SIGKILL)
            time.sleep(0.3)
            _wait_running(stub, 3)
            print(_table(stub))
            end = time.monotonic() + seconds if seconds > 0 else float("inf")
            print(f"\n== running{' until Ctrl-C' if seconds <= 0 else f' for {seconds:.0f}s'}; "
                  f"try: supervisor status --socket {base}/run/supervisor.sock")
            while time.monotonic() < end:
                time.sleep(min(5.0, max(0.0, end - time.monotonic())))
                if time.monotonic() < end:
                    print(_table(stub))
    except KeyboardInterrupt:
        pass
    finally:
        print("\n== SIGTERM to the supervisor: it stops every agent")
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
        log.close()
        print(f"supervisor exited with {rc}; last log lines:")
        print("\n".join((base / "supervisor.log").read_text().splitlines()[-6:]))
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
    return 0
