"""Shared fixtures: real supervisor processes, real agents, real sockets.

Every process a test starts is recorded and killed (by pid, with its process
group) when the test ends, whatever happened in the test.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest

from baton.pb import common_pb2, daemon_pb2, daemon_pb2_grpc, manager_pb2, manager_pb2_grpc
from tests.pg_fixture import pg_cluster, pg_url  # noqa: F401  (a real PostgreSQL per session)
from tests.process_guard import pytest_runtest_call, pytest_runtest_setup  # noqa: F401  (the fast tier's fence)

ROOT = Path(__file__).resolve().parent.parent
AGENTS = Path(__file__).resolve().parent / "agents"
PY = sys.executable
# For agents run as nobody: the test's virtualenv may be unreadable to that user, the system interpreter is not.
SYSTEM_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable


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


def dump_toml(cfg: dict[str, Any]) -> str:
    """A config file from plain data (paths as strings)."""
    import tomli_w

    def plain(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        return v

    return tomli_w.dumps(plain(cfg))


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


def default_file_url_root(base: Path) -> Path:
    """Where a test's file:// packages may be: its tmp_path or, for the session's releases, beside it; never a
    world-writable directory such as /tmp itself (a supervisor refuses a file_url_root others may write).
    Under pytest-xdist the releases are the run's, one level above the worker's ``popen-gwN``."""
    root = base.parent.parent
    worker = f"popen-{os.environ.get('PYTEST_XDIST_WORKER', '')}"
    if worker in base.parts:
        root = Path(*base.parts[:base.parts.index(worker)])
    return base.parent if root.stat().st_mode & 0o002 else root


class SupervisorProc:
    """A real supervisor process on a config of the test's making."""

    def __init__(self, base: Path, reaper: ProcessReaper, agents: list[dict[str, Any]], node_id: str = "node-1",
                 extra: dict[str, dict[str, Any]] | None = None, tcp: bool = False, standby_helper: bool = False
                 ) -> None:
        """``standby_helper``: off unless asked for (the ``standby_helper`` mark): a standby's start in each of the
        suite's hundreds of supervisors costs about 0.2 s of CPU (README, "The tests come in two tiers")."""
        self.base = base
        self.reaper = reaper
        self.state_dir = base / "state"
        self.socket = base / "run" / "supervisor.sock"
        self.config_path = base / "supervisor.toml"
        self.stdout_path = base / "supervisor.out"
        cfg: dict[str, Any] = {
            "node": {"id": node_id, "state_dir": str(self.state_dir), "install_root": str(base / "install")},
            "grpc": {"unix_socket": str(self.socket)},
            "update": {"file_url_root": str(default_file_url_root(base)), "standby_helper": standby_helper},
            "log": {"level": "DEBUG"},
            "agents": agents,
        }
        if tcp:
            cfg["grpc"]["listen"] = [f"127.0.0.1:{free_port()}"]
        for section, body in (extra or {}).items():
            cfg.setdefault(section, {}).update(body)
        if tcp and "tls_cert" not in cfg["grpc"]:
            cfg["grpc"]["insecure_tcp"] = True  # read-only on loopback; mutating calls use the Unix socket
        self.cfg = cfg
        self.proc: subprocess.Popen[bytes] | None = None
        self._channel: grpc.Channel | None = None

    def write_config(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(dump_toml(self.cfg))

    def start(self, wait: bool = True, env: dict[str, str] | None = None, launcher: Path | None = None
              ) -> SupervisorProc:
        """Start from this checkout, or through an installed version's launcher (as systemd would)."""
        self.write_config()
        out = open(self.stdout_path, "ab")  # noqa: SIM115
        argv = [str(launcher)] if launcher else [PY, "-m", "supervisor"]
        self.proc = subprocess.Popen(
            [*argv, "run", "--config", str(self.config_path)],
            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "BATON_PYTHON": PY, **(env or {})},
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


def agent_processes(state_dir: Path, name: str) -> list[int]:
    """Every live process writing to this agent's output FIFO: the instances of one agent of one host."""
    fifo = str(state_dir / "agents" / name / "output.fifo")
    out = []
    for p in psutil.process_iter():
        try:
            if os.readlink(f"/proc/{p.pid}/fd/1") == fifo and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except (OSError, psutil.Error):
            continue
    return out


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
def traversable_base(reaper: ProcessReaper) -> Iterator[Path]:
    """A base directory outside pytest's 0700 tmp tree, so that a path below it is reachable by nobody."""
    d = Path(tempfile.mkdtemp(prefix="baton-user-", dir="/tmp"))
    d.chmod(0o711)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def supervisors_in(base: Path, reaper: ProcessReaper, standby_helper: bool = False
                   ) -> Iterator[Callable[..., SupervisorProc]]:
    """``make(agents, name="sup", **kw)``: supervisors below ``base``, each stopped with all it ran at the end."""
    made: list[SupervisorProc] = []

    def make(agents: list[dict[str, Any]], name: str = "sup", **kw: Any) -> SupervisorProc:
        s = SupervisorProc(base / name, reaper, agents, **{"standby_helper": standby_helper, **kw})
        made.append(s)
        return s

    try:
        yield make
    finally:
        for s in made:
            s.close_channel()
            stop_everything_of(s)


@pytest.fixture
def make_supervisor(tmp_path: Path, reaper: ProcessReaper, request: pytest.FixtureRequest
                    ) -> Iterator[Callable[..., SupervisorProc]]:
    """Supervisors for the test; with a standby helper, as in production, if it is marked ``standby_helper``."""
    with supervisors_in(tmp_path, reaper, request.node.get_closest_marker("standby_helper") is not None) as make:
        yield make


def stop_everything_of(s: SupervisorProc) -> None:
    """Whatever runs for this supervisor's directory now (a self-update or a rollback may have replaced the
    process the test started): SIGTERM the supervisors, then kill helpers and any agent left."""
    from baton.agent_table import AgentTable

    def mine() -> list[psutil.Process]:
        out = []
        for p in psutil.process_iter(["cmdline"]):
            cmd = p.info["cmdline"] or []
            if any(str(s.base) in c for c in cmd):
                out.append(p)
        return out

    sups = [p for p in mine() if "supervisor" in " ".join(p.info["cmdline"]) and "run" in p.info["cmdline"]]
    for p in sups:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    psutil.wait_procs(sups, timeout=20)
    for rec in AgentTable(s.state_dir / "agents.json").load():
        if rec.pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(rec.pid, signal.SIGKILL)
    left = mine()
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(left, timeout=5)


# ---- signed packages and a package server ------------------------------------------------------------


class Package:
    def __init__(self, path: Path, sha256: str, size: int, signature: str, component: str, version: str) -> None:
        self.path = path
        self.sha256 = sha256
        self.size = size
        self.signature = signature
        self.component = component
        self.version = version
        self.url = path.as_uri()

    def request(self, **overrides: Any) -> daemon_pb2.UpdateRequest:
        fields: dict[str, Any] = dict(component=self.component, version=self.version, download_url=self.url,
                                      sha256=self.sha256, size=self.size, signature=self.signature)
        fields.update(overrides)
        return daemon_pb2.UpdateRequest(**fields)


class Release:
    """A release engineer with a real Ed25519 key, building and signing real packages."""

    def __init__(self, base: Path) -> None:
        from baton.signing import format_public_key, format_secret_key, generate_keypair

        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.secret, public = generate_keypair()
        self.public_key = base / "release.pub"
        self.secret_key = base / "release.sec"
        self.public_key.write_text(format_public_key(public))
        self.secret_key.write_text(format_secret_key(self.secret))
        self.secret_key.chmod(0o600)

    def tree(self, version: str, behaviour: str = "good") -> Path:
        """The directory tree of one version of the sample packaged agent."""
        import shutil

        root = self.base / "trees" / f"{version}-{behaviour}"
        if root.exists():
            shutil.rmtree(root)
        (root / "bin").mkdir(parents=True)
        shutil.copy(AGENTS / "versioned_agent.py", root / "agent.py")
        (root / "behaviour.txt").write_text(behaviour + "\n")
        launcher = root / "bin" / "agent"
        launcher.write_text(f'#!/bin/sh\nexec "{PY}" -u "$(dirname "$0")/../agent.py" "$@"\n')
        launcher.chmod(0o755)
        return root

    def build(self, version: str, behaviour: str = "good", component: str = "app", *,
              signed_component: str | None = None, signed_version: str | None = None,
              expires: float | None = None, nodes: list[str] | None = None, tree: Path | None = None,
              name: str | None = None) -> Package:
        from manager.build.package_tool import build_package

        tree = tree or self.tree(version, behaviour)
        out = self.base / "pkgs" / (name or f"{component}-{version}-{behaviour}.tar.gz")
        out.parent.mkdir(parents=True, exist_ok=True)
        build_package(tree, out, True)
        return self.sign(out, component, version, signed_component=signed_component, signed_version=signed_version,
                         expires=expires, nodes=nodes)

    def sign(self, path: Path, component: str, version: str, *, signed_component: str | None = None,
             signed_version: str | None = None, expires: float | None = None, nodes: list[str] | None = None,
             secret: Any = None) -> Package:
        from baton.digest import digest_stream
        from baton.signing import format_manifest, sign_prehash

        with open(path, "rb") as f:
            d = digest_stream(f)
        manifest = format_manifest(signed_component or component, signed_version or version, expires=expires,
                                   nodes=nodes)
        sig = sign_prehash(secret or self.secret, d.blake2b512, manifest)
        return Package(path, d.sha256_hex, d.size, sig, component, version)


def install_version(install_root: Path, component: str, version: str, tree: Path) -> None:
    """Provision a version directly on disk, as an installer would before the first supervisor start."""
    import shutil

    from baton.layout import ComponentLayout

    layout = ComponentLayout(install_root, component)
    layout.versions_dir.mkdir(parents=True, exist_ok=True)
    staged = layout.versions_dir / f".staging-{version}"
    shutil.copytree(tree, staged, symlinks=True)
    layout.install(staged, version)
    layout.switch(version)


def snapshot_tree(root: Path, skip: tuple[str, ...] = ()) -> dict[str, tuple[int, int, str]]:
    """Every path under ``root`` with its mode, size and link target: to prove nothing changed."""
    out: dict[str, tuple[int, int, str]] = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if any(rel_dir == s or rel_dir.startswith(s + os.sep) for s in skip):
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = os.path.relpath(p, root)
            if any(rel == s or rel.startswith(s + os.sep) for s in skip):
                continue
            st = p.lstat()
            target = os.readlink(p) if p.is_symlink() else ""
            out[rel] = (st.st_mode, st.st_size if not p.is_dir() else 0, target)
    return out


@pytest.fixture
def release(tmp_path: Path) -> Release:
    return Release(tmp_path / "release")


@pytest.fixture
def pkgserver(tmp_path: Path) -> Iterator[Any]:
    from tests.pkgserver import PackageServer

    root = tmp_path / "served"
    root.mkdir()
    with PackageServer(root) as server:
        yield server


class UpdateHost:
    """A supervisor with one packaged agent ``app`` at 1.0.0 and the release key trusted."""

    def __init__(self, sup: SupervisorProc, release: Release) -> None:
        self.sup = sup
        self.release = release
        self.install_root = sup.base / "install"

    @property
    def layout(self) -> Any:
        from baton.layout import ComponentLayout

        return ComponentLayout(self.install_root, "app")

    def push(self, pkg: Package, **overrides: Any) -> str:
        return str(self.sup.stub.PushUpdate(pkg.request(**overrides), timeout=10).update_id)

    def wait_final(self, update_id: str, timeout: float = 60) -> daemon_pb2.UpdateStatus:
        def final() -> Any:
            st = self.sup.stub.GetUpdate(daemon_pb2.UpdateRef(update_id=update_id), timeout=5)
            return st if st.finished else None

        return wait_for(final, timeout, interval=0.1, what=f"update {update_id} to finish")

    def journal(self, update_id: str) -> Any:
        from baton.journal import Journal

        return Journal(self.sup.state_dir).load(update_id)

    def disk(self) -> dict[str, tuple[int, int, str]]:
        """Everything on disk outside the download and journal areas (and the logs agents write)."""
        return snapshot_tree(self.sup.base, skip=("state", "supervisor.out", "release"))


@pytest.fixture
def update_host(make_supervisor: Callable[..., SupervisorProc], release: Release) -> UpdateHost:
    sup = make_supervisor(
        [{"name": "app", "packaged": True, "command": "bin/agent", "notify": True, "restart": "always",
          "backoff_initial_s": 0.2, "stop_timeout_s": 5.0}],
        extra={"update": {"trusted_keys": [str(release.public_key)], "health_timeout_s": 10.0,
                          "health_window_s": 1.0, "max_backups": 2, "read_timeout_s": 2.0,
                          "connect_timeout_s": 2.0, "free_space_reserve_bytes": 0}},
    )
    install_version(sup.base / "install", "app", "1.0.0", release.tree("1.0.0"))
    sup.start()
    sup.wait_agent("app", "running")
    return UpdateHost(sup, release)


# ---- a Manager on loopback (the reference Manager lives in its own package) ------------------------------


class RecordingManager(manager_pb2_grpc.ManagerServiceServicer):
    """A real ManagerService on loopback that records what it was told."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.registers: list[manager_pb2.RegisterRequest] = []
        self.heartbeats: list[manager_pb2.HeartbeatRequest] = []
        self.syncs: list[manager_pb2.SyncAgentStatesRequest] = []
        self.results: list[common_pb2.UpdateResult] = []

    def Register(self, request, context):
        with self.lock:
            self.registers.append(request)
        return manager_pb2.RegisterResponse(heartbeat_interval_seconds=0.2)

    def Heartbeat(self, request, context):
        with self.lock:
            self.heartbeats.append(request)
        return manager_pb2.HeartbeatResponse(known=True)

    def SyncAgentStates(self, request, context):
        with self.lock:
            self.syncs.append(request)
        return manager_pb2.SyncAgentStatesResponse()

    def ReportUpdateResult(self, request, context):
        with self.lock:
            duplicate = any(r.update_id == request.update_id for r in self.results)
            self.results.append(request)
        return manager_pb2.ReportAck(update_id=request.update_id, duplicate=duplicate)


def serve_manager(port: int, servicer: RecordingManager) -> grpc.Server:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    manager_pb2_grpc.add_ManagerServiceServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server


# ---- a supervisor installed in its versioned layout, and its update packages -------------------------------


class SelfUpdateHost(UpdateHost):
    """A supervisor running from ``install/supervisor/current`` (1.0.0), three agents, the release key trusted."""

    @property
    def sup_layout(self) -> Any:
        from baton.layout import ComponentLayout

        return ComponentLayout(self.install_root, "supervisor")

    @property
    def launcher(self) -> Path:
        return self.install_root / "supervisor" / "current" / "bin" / "supervisor"

    def supervisor_package(self, version: str, fault: str = "") -> Package:
        import re
        import shutil

        from supervisor.cli.install_self import write_tree

        tree = self.release.base / "trees" / f"supervisor-{version}-{fault or 'good'}"
        if tree.exists():
            shutil.rmtree(tree)
        write_tree(tree, version)
        if fault == "exit_at_start":
            (tree / "bin" / "supervisor").write_text("#!/bin/sh\necho 'supervisor: broken build' >&2\nexit 3\n")
        elif fault == "hang":
            (tree / "bin" / "supervisor").write_text("#!/bin/sh\nexec sleep 3600\n")
        elif fault == "slow_start":  # a good build whose start takes 2 s longer (a cold cache, a slow disk)
            launcher = tree / "bin" / "supervisor"
            launcher.write_text(launcher.read_text().replace("\nexec ", "\nsleep 2\nexec ", 1))
        elif fault == "old_protocol":
            p = tree / "lib" / "baton" / "handover.py"
            text = re.sub(r"^PROTOCOL_VERSION = \d+", "PROTOCOL_VERSION = 0", p.read_text(), flags=re.M)
            p.write_text(re.sub(r"^MIN_PROTOCOL_VERSION = \d+", "MIN_PROTOCOL_VERSION = 0", text, flags=re.M))
        elif fault == "unhealthy":
            p = tree / "lib" / "supervisor" / "daemon.py"
            text = p.read_text()
            assert "        problems = []\n" in text
            p.write_text(text.replace("        problems = []\n",
                                      '        problems = ["this build reports itself unhealthy"]\n', 1))
        elif fault:
            raise ValueError(fault)
        return self.release.build(version, component="supervisor", tree=tree, name=f"supervisor-{version}-{fault}.tgz")


SELF_AGENTS = [
    agent("web", "ready_agent.py", notify=True),
    agent("worker", "crash_agent.py", start_seconds=0.5, backoff_initial_s=0.2),
    agent("chatty", "ready_agent.py", notify=True),
]


@pytest.fixture
def make_self_host(make_supervisor: Callable[..., SupervisorProc], release: Release
                   ) -> Callable[..., SelfUpdateHost]:
    def make(name: str = "sup", env: dict[str, str] | None = None, tcp: bool = True,
             update: dict[str, Any] | None = None, agents: list[dict[str, Any]] | None = None) -> SelfUpdateHost:
        sup = make_supervisor(
            list(agents or SELF_AGENTS), name=name, tcp=tcp,
            extra={"update": {"trusted_keys": [str(release.public_key)], "handshake_timeout_s": 20.0,
                              "free_space_reserve_bytes": 0, "max_backups": 2, **(update or {})}},
        )
        sup.write_config()
        from baton.config import load_config
        from supervisor.cli.install_self import install_self

        install_self(load_config(sup.config_path), "1.0.0")
        sup.start(launcher=sup.base / "install" / "supervisor" / "current" / "bin" / "supervisor", env=env)
        for a in (agents or SELF_AGENTS):
            sup.wait_agent(a["name"], "running")
        return SelfUpdateHost(sup, release)

    return make


# ---- supervisor releases (slow: built once per session, shared by test_release.py and test_systemd.py) ---------

from tests.release_fixtures import releases  # noqa: E402,F401
