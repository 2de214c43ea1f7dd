"""Shared fixtures: real supervisor processes, real agents, real sockets.

Every process a test starts is recorded and killed (by pid, with its process
group) when the test ends, whatever happened in the test.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest

from baton.pb import common_pb2, daemon_pb2, daemon_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
AGENTS = Path(__file__).resolve().parent / "agents"
PY = sys.executable


def wait_for(pred: Callable[[], Any], timeout: float = 15.0, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            v = pred()
            if v:
                return v
        except Exception as e:
            last_exc = e
        time.sleep(interval)
    detail = f" (last error: {last_exc!r})" if last_exc else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what}{detail}")


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str | Path):
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


def dump_toml(cfg: dict[str, Any]) -> str:
    lines: list[str] = []
    for section, body in cfg.items():
        if section == "agents":
            continue
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in body.items()]
        lines.append("")
    for agent in cfg.get("agents", []):
        lines.append("[[agents]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in agent.items()]
        lines.append("")
    text = "\n".join(lines)
    tomllib.loads(text)
    return text


def agent(name: str, script: str, **kw: Any) -> dict[str, Any]:
    """An [[agents]] entry running one of the sample agents in tests/agents/."""
    d: dict[str, Any] = {"name": name, "command": PY, "args": ["-u", str(AGENTS / script)]}
    d.update(kw)
    return d


class ProcessReaper:
    """Remembers every process a test started and kills what is left at the end."""

    def __init__(self) -> None:
        self.pids: set[int] = set()

    def track(self, pid: int) -> None:
        self.pids.add(pid)

    def kill_all(self) -> None:
        procs = []
        for pid in self.pids:
            with contextlib.suppress(psutil.NoSuchProcess):
                p = psutil.Process(pid)
                procs.append(p)
                procs += p.children(recursive=True)
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(procs, timeout=5)


class SupervisorProc:
    """A real supervisor process on a config of the test's making."""

    def __init__(self, base: Path, reaper: ProcessReaper, agents: list[dict[str, Any]], node_id: str = "node-1",
                 extra: dict[str, dict[str, Any]] | None = None, tcp: bool = False) -> None:
        self.base = base
        self.reaper = reaper
        self.state_dir = base / "state"
        self.socket = base / "run" / "supervisor.sock"
        self.config_path = base / "supervisor.toml"
        self.stdout_path = base / "supervisor.out"
        cfg: dict[str, Any] = {
            "node": {"id": node_id, "state_dir": str(self.state_dir), "install_root": str(base / "install")},
            "grpc": {"unix_socket": str(self.socket)},
            "update": {},
            "log": {"level": "DEBUG"},
            "agents": agents,
        }
        if tcp:
            cfg["grpc"]["listen"] = [f"127.0.0.1:{free_port()}"]
        for section, body in (extra or {}).items():
            cfg.setdefault(section, {}).update(body)
        self.cfg = cfg
        self.proc: subprocess.Popen[bytes] | None = None
        self._channel: grpc.Channel | None = None

    def write_config(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(dump_toml(self.cfg))

    def start(self, wait: bool = True, env: dict[str, str] | None = None) -> SupervisorProc:
        self.write_config()
        out = open(self.stdout_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [PY, "-m", "supervisor", "run", "--config", str(self.config_path)],
            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})},
        )
        out.close()
        self.reaper.track(self.proc.pid)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"supervisor exited with {self.proc.returncode}:\n{self.output()}")
            self.status(timeout=1)
            return True

        wait_for(ready, timeout, what="supervisor to serve")

    @property
    def stub(self) -> daemon_pb2_grpc.DaemonServiceStub:
        if self._channel is None:
            self._channel = grpc.insecure_channel(f"unix:{self.socket}")
        return daemon_pb2_grpc.DaemonServiceStub(self._channel)

    def status(self, timeout: float = 5) -> daemon_pb2.Status:
        return self.stub.GetStatus(daemon_pb2.GetStatusRequest(), timeout=timeout)

    def agent(self, name: str) -> common_pb2.AgentInfo:
        for a in self.status().agents:
            if a.name == name:
                return a
        raise KeyError(name)

    def wait_agent(self, name: str, state: str, timeout: float = 15.0, pred: Callable[[Any], bool] | None = None
                   ) -> common_pb2.AgentInfo:
        want = getattr(common_pb2, f"AGENT_STATE_{state.upper()}")

        def check() -> Any:
            a = self.agent(name)
            return a if a.state == want and (pred is None or pred(a)) else None

        return wait_for(check, timeout, what=f"agent {name} to be {state}")

    def output(self) -> str:
        try:
            return self.stdout_path.read_text(errors="replace")[-6000:]
        except FileNotFoundError:
            return ""

    def log_of(self, name: str) -> Path:
        return self.state_dir / "logs" / f"{name}.log"

    def tree(self) -> list[psutil.Process]:
        assert self.proc is not None
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.close_channel()
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.close_channel()
        self.proc.kill()
        self.proc.wait(10)

    def close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def reaper() -> Iterator[ProcessReaper]:
    r = ProcessReaper()
    yield r
    r.kill_all()


@pytest.fixture
def make_supervisor(tmp_path: Path, reaper: ProcessReaper) -> Iterator[Callable[..., SupervisorProc]]:
    made: list[SupervisorProc] = []

    def make(agents: list[dict[str, Any]], name: str = "sup", **kw: Any) -> SupervisorProc:
        s = SupervisorProc(tmp_path / name, reaper, agents, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close_channel()
        if s.proc is not None and s.proc.poll() is None:
            with contextlib.suppress(Exception):
                s.terminate(timeout=15)
