"""Fixtures for the reference Manager's tests: a real ``baton-manager serve`` and supervisors that report to it.

``make_manager`` (import ``make_manager_fixture``) starts ``python -m manager serve`` on loopback ports
(killed with the test by the reaper);
``make_fleet`` starts supervisors with the packaged agent ``app`` at 1.0.0 that register with it.
``signed(pkg)`` writes the ``.minisig`` beside a package, as ``baton-package sign`` would.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from baton.pb import daemon_pb2
from manager.store import RolloutRow, UpdateRow, open_store
from tests.conftest import (
    PY,
    ROOT,
    Package,
    ProcessReaper,
    Release,
    SupervisorProc,
    UpdateHost,
    free_port,
    install_version,
    wait_for,
)

PACKAGED_APP = {"name": "app", "packaged": True, "command": "bin/agent", "notify": True, "restart": "always",
                "backoff_initial_s": 0.2, "stop_timeout_s": 5.0}


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class ManagerProc:
    """A real ``baton-manager serve`` on 127.0.0.1, and its CLI on the same database."""

    def __init__(self, base: Path, reaper: ProcessReaper, tls: dict[str, Path] | None = None, db: str = "",
                 args: tuple[str, ...] = ()) -> None:
        self.base = base
        self.reaper = reaper
        self.db = db or str(base / "manager.db")  # a SQLite path, or postgresql://... shared by replicas
        self.args = args  # more `serve` flags
        self.packages = base / "packages"
        self.port = free_port()
        self.http_port = free_port()
        self.tls = tls
        self.log = base / "manager.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.extra_args: list[str] = []  # more ``serve`` flags (e.g. --metrics)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "BATON_MANAGER_DB": str(self.db)}

    def start(self) -> ManagerProc:
        self.base.mkdir(parents=True, exist_ok=True)
        argv = [PY, "-m", "manager", "serve", "--listen", self.address, "--packages", str(self.packages),
                "--http", f"127.0.0.1:{self.http_port}", *self.args]
        if self.tls:
            argv += ["--tls-cert", str(self.tls["cert"]), "--tls-key", str(self.tls["key"]),
                     "--tls-ca", str(self.tls["ca"])]
        else:
            argv.append("--insecure-loopback")  # loopback only: a Manager without TLS is refused elsewhere
        argv += self.extra_args
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=self.env)
        self.reaper.track(self.proc.pid)

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"manager exited with {self.proc.returncode}:\n{self.output()}")
            return port_open(self.port) and port_open(self.http_port)

        wait_for(up, 20, what="the Manager to listen")
        return self

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(15)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:] if self.log.exists() else ""

    def cli(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run ``baton-manager ARGS`` on this Manager's database."""
        res = subprocess.run([PY, "-m", "manager", *args], capture_output=True, text=True, cwd=ROOT, env=self.env,
                             timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"baton-manager {' '.join(args)} exited {res.returncode}:\n{res.stdout}\n{res.stderr}")
        return res

    def popen(self, *args: str, log: Path) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            p = subprocess.Popen([PY, "-m", "manager", *args], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                 env=self.env)
        self.reaper.track(p.pid)
        return p

    def updates(self, *filters: str) -> list[dict[str, Any]]:
        return list(json.loads(self.cli("updates", "--json", *filters).stdout))

    def nodes(self) -> dict[str, dict[str, Any]]:
        return {n["id"]: n for n in json.loads(self.cli("nodes", "--json").stdout)}

    def row(self, update_id: str) -> UpdateRow | None:
        store = open_store(self.db)
        try:
            return store.update(update_id)
        finally:
            store.close()

    def rollout(self, rollout_id: str) -> RolloutRow:
        """The rollout with its nodes, read in-process: milliseconds, where ``rollouts --json`` starts a Python
        (seconds on a loaded machine, longer than a canary's health window)."""
        store = open_store(self.db)
        try:
            row = store.rollout(rollout_id)
        finally:
            store.close()
        assert row is not None, f"no rollout {rollout_id}"
        return row


@pytest.fixture(name="make_manager")
def make_manager_fixture(tmp_path: Path, reaper: ProcessReaper) -> Iterator[Callable[..., ManagerProc]]:
    """``make_manager(name="manager", tls=None, db="", args=())`` starts one; test modules import this to use it."""
    made: list[ManagerProc] = []

    def make(name: str = "manager", tls: dict[str, Path] | None = None, db: str = "", args: tuple[str, ...] = ()
             ) -> ManagerProc:
        m = ManagerProc(tmp_path / name, reaper, tls, db, args)
        made.append(m)
        return m.start()

    yield make
    for m in made:
        if m.proc is not None and m.proc.poll() is None:
            m.proc.kill()
            m.proc.wait(10)


def signed(pkg: Package) -> Package:
    """Write ``FILE.minisig`` beside the package: what the Manager reads."""
    pkg.path.with_name(pkg.path.name + ".minisig").write_text(pkg.signature)
    return pkg


def package_args(pkg: Package) -> list[str]:
    return ["--package", str(pkg.path), "--component", pkg.component, "--version", pkg.version]


def node_config(manager: ManagerProc, release: Release, update: dict[str, Any] | None = None,
                manager_extra: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    return {
        "update": {"trusted_keys": [str(release.public_key)], "health_timeout_s": 10.0, "health_window_s": 0.3,
                   "read_timeout_s": 2.0, "connect_timeout_s": 2.0, "free_space_reserve_bytes": 0,
                   **(update or {})},
        "manager": {"address": manager.address, "retry_initial_s": 0.1, "retry_max_s": 0.3,
                    "heartbeat_interval_s": 0.5, "rpc_timeout_s": 2.0, **(manager_extra or {})},
    }


def start_node(make_supervisor: Callable[..., SupervisorProc], release: Release, node_id: str,
               extra: dict[str, dict[str, Any]], grpc: dict[str, Any] | None = None, wait: bool = True
               ) -> UpdateHost:
    sup = make_supervisor([dict(PACKAGED_APP)], name=node_id, node_id=node_id, tcp=True,
                          extra={**extra, "grpc": {**extra.get("grpc", {}), **(grpc or {})}})
    install_version(sup.base / "install", "app", "1.0.0", release.tree("1.0.0"))
    sup.start(wait=False)
    if wait:
        sup.wait_ready()
    return UpdateHost(sup, release)


def make_fleet(make_supervisor: Callable[..., SupervisorProc], release: Release, manager: ManagerProc, n: int,
               update: dict[str, Any] | None = None) -> list[UpdateHost]:
    """``n`` nodes (node-1 ...), started together, each registered with the Manager with its TCP address."""
    extra = node_config(manager, release, update)
    hosts = [start_node(make_supervisor, release, f"node-{i}", extra, wait=False) for i in range(1, n + 1)]
    for h in hosts:
        h.sup.wait_ready()
        h.sup.wait_agent("app", "running")
    wait_for(lambda: {f"node-{i}" for i in range(1, n + 1)} <= {k for k, v in manager.nodes().items() if v["address"]},
             20, interval=0.2, what="every node to register")
    return hosts


def node_update(host: UpdateHost, update_id: str) -> daemon_pb2.UpdateStatus:
    return host.sup.stub.GetUpdate(daemon_pb2.UpdateRef(update_id=update_id), timeout=5)


def journal_ids(host: UpdateHost) -> list[str]:
    """The updates the node ever accepted (its journal directories)."""
    d = host.sup.state_dir / "updates"
    return sorted(p.name for p in d.iterdir() if p.is_dir() and p.name != "locks") if d.exists() else []
