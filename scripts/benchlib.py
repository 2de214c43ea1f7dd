"""What every benchmark in ``scripts/bench_*.py`` shares: processes, timing, packages, supervisors, Markdown.

Every process a benchmark starts goes through :class:`Reaper`, which puts a
per-run token in its environment. At the end (and on Ctrl-C or an exception)
the reaper stops what it started, by pid, and then kills any process that still
carries the token (agents, helpers, orphans), again by pid. Nothing here binds
anything but 127.0.0.1 and Unix sockets.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
import xmlrpc.client
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
PY = sys.executable
MiB = 1024 * 1024
GiB = 1024 * MiB
TOKEN_VAR = "BATON_BENCH_TOKEN"
# gRPC channels that reconnect within 10-100 ms instead of gRPC's default 1 s and more: a figure measures the
# server, not the client library's backoff. Own subchannels, so channels do not share a failed connection.
FAST_RECONNECT = [("grpc.use_local_subchannel_pool", 1), ("grpc.initial_reconnect_backoff_ms", 10),
                  ("grpc.min_reconnect_backoff_ms", 10), ("grpc.max_reconnect_backoff_ms", 100)]
CLK_TCK = os.sysconf("SC_CLK_TCK")

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# ---------------------------------------------------------------------------------------------- processes


class Reaper:
    """Starts processes with this run's token and kills every one of them at the end, by pid."""

    def __init__(self) -> None:
        self.token = uuid.uuid4().hex
        self.procs: list[subprocess.Popen[bytes]] = []
        self.env = {**os.environ, TOKEN_VAR: self.token}

    def popen(self, argv: Sequence[str | Path], *, env: dict[str, str] | None = None, log: Path | None = None,
              cwd: Path | None = None, new_session: bool = True) -> subprocess.Popen[bytes]:
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - closed right after the start
        try:
            p = subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT, cwd=cwd or ROOT, env={**self.env, **(env or {})},
                                 start_new_session=new_session)
        finally:
            if log:
                out.close()  # type: ignore[union-attr]
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen[bytes], timeout: float = 20.0) -> int | None:
        """SIGTERM (a supervisor then stops its agents), wait, SIGKILL its group if it lingers."""
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                p.wait(10)
        return p.returncode

    def tokened_pids(self) -> list[int]:
        """Live processes (not zombies) that carry this run's token, other than this one."""
        me = os.getpid()
        needle = f"{TOKEN_VAR}={self.token}".encode()
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == me:
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    env = f.read()
            except OSError:
                continue
            if needle in env.split(b"\0") and proc_state(int(entry)) not in ("Z", "X", ""):
                found.append(int(entry))
        return found

    def sweep(self) -> list[int]:
        """SIGKILL every live process with the token (agents and helpers left behind); returns their pids."""
        killed = []
        for _ in range(5):
            pids = self.tokened_pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.2)
        return sorted(set(killed))

    def cleanup(self) -> list[int]:
        for p in reversed(self.procs):
            with contextlib.suppress(Exception):
                self.stop(p, timeout=15)
        self.procs.clear()
        return self.sweep()


def proc_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def proc_cpu_s(pid: int) -> float:
    """User plus system CPU seconds of the process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_cpu_split_s(pid: int) -> tuple[float, float]:
    """User plus system CPU seconds of the process itself, and of the children it has reaped (helpers, old agents)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = [int(x) for x in f.read().rsplit(")", 1)[1].split()[11:15]]
    return (fields[0] + fields[1]) / CLK_TCK, (fields[2] + fields[3]) / CLK_TCK


def proc_cpu_with_children_s(pid: int) -> float:
    return sum(proc_cpu_split_s(pid))


def proc_cpu_ns(pid: int) -> int:
    """CPU nanoseconds of every live thread of the process (``/proc/PID/task/*/schedstat``): finer than ticks."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            total += int(f.read().split()[0])
    return total


def proc_status_kib(pid: int, key: str) -> int:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM), 0 if absent."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def children(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return {int(x) for x in f.read().split()}
    except OSError:
        return set()


def wait_for(pred: Callable[[], Any], timeout: float, interval: float = 0.02, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            v = pred()
            if v:
                return v
        except Exception as e:  # a server not up yet, a file not written yet
            last = e
        time.sleep(interval)
    detail = f" (last error: {last!r})" if last else ""
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}{detail}")


def timed(argv: Sequence[str | Path], env: dict[str, str] | None = None, stdout: Any = subprocess.DEVNULL) -> float:
    """Wall seconds of one command run to completion; raises if it fails."""
    t0 = time.perf_counter()
    subprocess.run([str(a) for a in argv], check=True, stdin=subprocess.DEVNULL, stdout=stdout,
                   stderr=subprocess.PIPE, env=env, timeout=600)
    return time.perf_counter() - t0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def drop_dirty_pages() -> None:
    """Write back dirty pages so one run's writes are not flushed during the next one's timing."""
    os.sync()


def compile_checkout() -> None:
    """Compile this checkout's bytecode, as a release's is compiled when it is installed (baton/release.py).

    Processes started from the checkout (the helper of each update) otherwise compile every module from source
    at every start when ``PYTHONDONTWRITEBYTECODE`` is set, a cost an installed release never pays.
    """
    import compileall

    for pkg in ("baton", "helper", "supervisor"):
        compileall.compile_dir(str(ROOT / pkg), quiet=2, workers=1)


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(8 * MiB):
            pass


def random_file(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 16 * MiB)
            f.write(os.urandom(n))
            left -= n
    return path


# ---------------------------------------------------------------------------------------------- figures


def median(xs: Iterable[float]) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


def fmt_s(s: float) -> str:
    if s != s:  # NaN
        return "n/a"
    if s < 0.01:
        return f"{s * 1000:.2f} ms"
    if s < 1:
        return f"{s * 1000:.0f} ms"
    return f"{s:.2f} s"


def fmt_spread(xs: Sequence[float]) -> str:
    """``median [min, max]`` for a list of seconds."""
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return fmt_s(xs[0])
    return f"{fmt_s(median(xs))} [{fmt_s(min(xs))}, {fmt_s(max(xs))}]"


def fmt_rate(nbytes: int, s: float) -> str:
    return f"{nbytes / s / 1e6:.0f} MB/s" if s > 0 else "n/a"


def fmt_mib(kib: float) -> str:
    return f"{kib / 1024:.1f} MiB"


def fmt_x(r: float) -> str:
    return "n/a" if r != r else f"{r:.2f}x"


def fmt_size(n: int) -> str:
    return f"{n // GiB} GiB" if n >= GiB and n % GiB == 0 else f"{n / MiB:.0f} MiB"


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


@dataclass
class SummaryRow:
    benchmark: str
    measure: str
    ours: str
    baseline: str
    ratio: str
    target: str = ""
    met: str = ""


@dataclass
class Section:
    key: str
    title: str
    lines: list[str] = field(default_factory=list)
    summary: list[SummaryRow] = field(default_factory=list)
    elapsed_s: float = 0.0

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)


@dataclass
class Ctx:
    quick: bool
    work: Path
    reaper: Reaper
    log: Callable[[str], None]

    def runs(self, full: int, quick: int) -> int:
        return quick if self.quick else full


def yes_no(ok: bool) -> str:
    return "yes" if ok else "**no**"


# ---------------------------------------------------------------------------------------------- machine


def _first_line(argv: Sequence[str]) -> str:
    try:
        r = subprocess.run(list(argv), capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    text = (r.stdout or r.stderr).strip()
    return text.splitlines()[0] if text else "not found"


def machine_info() -> dict[str, str]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    from importlib.metadata import version

    def pkg(name: str) -> str:
        try:
            return version(name)
        except Exception:
            return "?"

    return {
        "CPUs": f"{os.cpu_count()} x {model}",
        "memory": mem,
        "kernel": f"{platform.system()} {platform.release()}",
        "Python": f"{platform.python_version()} ({PY})",
        "grpcio / httpx / cryptography": f"{pkg('grpcio')} / {pkg('httpx')} / {pkg('cryptography')}",
        "openssl": _first_line(["openssl", "version"]),
        "minisign": _first_line(["minisign", "-v"]),
        "curl": _first_line(["curl", "--version"]),
        "sha256sum": _first_line(["sha256sum", "--version"]),
    }


# ---------------------------------------------------------------------------------------------- config


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


# ---------------------------------------------------------------------------------------------- keys, packages

# A well-behaved agent: READY=1 on $NOTIFY_SOCKET (or its pid in $BENCH_READY_FILE), stops at once on SIGTERM.
READY_AGENT = r'''
import os, signal, socket
def on_term(*_):
    raise SystemExit(0)  # from inside the wait below: at once, not at a poll's next wake-up
signal.signal(signal.SIGTERM, on_term)
if os.environ.get("NOTIFY_SOCKET"):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(os.environ["NOTIFY_SOCKET"])
        s.sendall(b"READY=1")
ready = os.environ.get("BENCH_READY_FILE")
if ready:
    with open(ready + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(ready + ".tmp", ready)
while True:
    signal.pause()
'''


@dataclass
class Keys:
    public: Path
    secret_path: Path
    secret: Any  # baton.signing.SecretKey


def make_keys(d: Path) -> Keys:
    """A key pair made by ``minisign -G -W`` (unencrypted), loaded by our code too."""
    from baton.signing import load_secret_key

    d.mkdir(parents=True, exist_ok=True)
    pub, sec = d / "release.pub", d / "release.sec"
    subprocess.run(["minisign", "-G", "-W", "-f", "-p", str(pub), "-s", str(sec)], check=True,
                   capture_output=True, timeout=60)
    return Keys(pub, sec, load_secret_key(sec))


@dataclass
class Package:
    path: Path
    component: str
    version: str
    sha256: str
    size: int
    signature: str
    url: str = ""

    @property
    def sig_path(self) -> Path:
        return self.path.with_name(self.path.name + ".minisig")

    def request(self, url: str | None = None) -> Any:
        from baton.pb import daemon_pb2

        return daemon_pb2.UpdateRequest(component=self.component, version=self.version,
                                        download_url=url or self.url or self.path.as_uri(), sha256=self.sha256,
                                        size=self.size, signature=self.signature)


def build_package(tree: Path, out: Path, component: str, version: str, keys: Keys, gzip: bool = True) -> Package:
    """``baton-package build`` and ``sign`` in-process: a deterministic tar, its ``.minisig`` beside it."""
    from baton.signing import format_manifest, sign_prehash
    from manager.build.package_tool import build_package as build

    out.parent.mkdir(parents=True, exist_ok=True)
    d = build(tree, out, gzip)
    sig = sign_prehash(keys.secret, d.blake2b512, format_manifest(component, version))
    out.with_name(out.name + ".minisig").write_text(sig)
    return Package(out, component, version, d.sha256_hex, d.size, sig)


def agent_tree(d: Path, payload_bytes: int = 0) -> Path:
    """A packaged agent's version tree: ``bin/agent`` runs ``agent.py``, plus an incompressible payload."""
    if d.exists():
        shutil.rmtree(d)
    (d / "bin").mkdir(parents=True)
    (d / "agent.py").write_text(READY_AGENT)
    launcher = d / "bin" / "agent"
    launcher.write_text(f'#!/bin/sh\nexec "{PY}" -u "$(dirname "$0")/../agent.py" "$@"\n')
    launcher.chmod(0o755)
    if payload_bytes:
        random_file(d / "payload.bin", payload_bytes)
    return d


def install_version(install_root: Path, component: str, version: str, tree: Path) -> None:
    """Provision a version on disk before the first start, as an installer would."""
    from baton.layout import ComponentLayout

    layout = ComponentLayout(install_root, component)
    layout.versions_dir.mkdir(parents=True, exist_ok=True)
    staged = layout.versions_dir / f".staging-{version}"
    shutil.copytree(tree, staged, symlinks=True)
    layout.install(staged, version)
    layout.switch(version)


# ---------------------------------------------------------------------------------------------- servers


class HttpServer:
    """``scripts/bench_httpd.py`` (sendfile) serving a directory on 127.0.0.1, as a separate process."""

    def __init__(self, ctx: Ctx, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.proc = ctx.reaper.popen([PY, SCRIPTS / "bench_httpd.py", directory, str(self.port)],
                                     log=ctx.work / "httpd.log")
        self.reaper = ctx.reaper

        def up() -> bool:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True

        wait_for(up, 15, what="the HTTP server")

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        self.reaper.stop(self.proc, timeout=5)


class BatonSupervisor:
    """A real supervisor process on a config of the benchmark's making."""

    def __init__(self, ctx: Ctx, base: Path, agents: list[dict[str, Any]], *, node_id: str = "bench",
                 update: dict[str, Any] | None = None, tcp_port: int | None = None,
                 extra: dict[str, dict[str, Any]] | None = None) -> None:
        self.ctx = ctx
        self.base = base
        self.state_dir = base / "state"
        self.install_root = base / "install"
        self.socket = base / "run" / "supervisor.sock"
        self.config_path = base / "supervisor.toml"
        self.log_path = base / "supervisor.out"
        self.tcp_port = tcp_port
        cfg: dict[str, Any] = {
            "node": {"id": node_id, "state_dir": str(self.state_dir), "install_root": str(self.install_root)},
            "grpc": {"unix_socket": str(self.socket)},
            "update": {"free_space_reserve_bytes": 0, **(update or {})},
            "log": {"level": "INFO"},
            "agents": agents,
        }
        if tcp_port:
            # Loopback and read-only (status probes); updates go over the Unix socket or the Manager's stream.
            cfg["grpc"].update(listen=[f"127.0.0.1:{tcp_port}"], insecure_tcp=True)
        for section, body in (extra or {}).items():
            cfg.setdefault(section, {}).update(body)
        base.mkdir(parents=True, exist_ok=True)
        (base / "run").mkdir(exist_ok=True)
        self.config_path.write_text(dump_toml(cfg))
        self.proc: subprocess.Popen[bytes] | None = None
        self._channel: Any = None

    @property
    def launcher(self) -> Path:
        return self.install_root / "supervisor" / "current" / "bin" / "supervisor"

    def install_self(self, version: str = "1.0.0") -> None:
        from baton.config import load_config
        from supervisor.cli.install_self import install_self

        install_self(load_config(self.config_path), version)

    def start(self, from_layout: bool = False, wait: bool = True) -> BatonSupervisor:
        argv = [self.launcher] if from_layout else [PY, "-m", "supervisor"]
        self.proc = self.ctx.reaper.popen([*argv, "run", "--config", self.config_path], log=self.log_path,
                                          env={"BATON_PYTHON": PY})
        if wait:
            self.wait_serving()
        return self

    def wait_serving(self, timeout: float = 60) -> None:
        def serving() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"supervisor exited with {self.proc.returncode}; see {self.log_path}")
            self.status(timeout=1)
            return True

        wait_for(serving, timeout, interval=0.02, what="the supervisor to serve")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def stub(self) -> Any:
        import grpc

        from baton.pb import daemon_pb2_grpc

        if self._channel is None:
            self._channel = grpc.insecure_channel(f"unix:{self.socket}", options=FAST_RECONNECT)
        return daemon_pb2_grpc.DaemonServiceStub(self._channel)

    def close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def status(self, timeout: float = 5) -> Any:
        from baton.pb import daemon_pb2

        return self.stub.GetStatus(daemon_pb2.GetStatusRequest(), timeout=timeout)

    def agents(self) -> dict[str, Any]:
        return {a.name: a for a in self.status().agents}

    def count_running(self) -> int:
        from baton.pb import common_pb2

        return sum(a.state == common_pb2.AGENT_STATE_RUNNING for a in self.status(timeout=5).agents)

    def stop(self, timeout: float = 60) -> int | None:
        self.close_channel()
        if self.proc is None:
            return None
        return self.ctx.reaper.stop(self.proc, timeout=timeout)


def follow_update(sup: BatonSupervisor, update_id: str, timeout: float = 300) -> Any:
    """Watch an update to its final, settled status; re-attach when a self-update replaces the server."""
    import grpc

    from baton.pb import daemon_pb2

    final = None
    deadline = time.monotonic() + timeout
    while (final is None or not final.finished) and time.monotonic() < deadline:
        try:
            for st in sup.stub.WatchUpdate(daemon_pb2.UpdateRef(update_id=update_id),
                                           timeout=max(1.0, deadline - time.monotonic()), wait_for_ready=True):
                final = st
                if st.finished:
                    break
        except grpc.RpcError:
            sup.close_channel()  # a self-update replaced the server: reconnect without the channel's backoff
            time.sleep(0.01)
    if final is None or not final.finished:
        raise TimeoutError(f"update {update_id} did not finish within {timeout:g} s")
    return final


# ---------------------------------------------------------------------------------------------- supervisord


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self._path)
        self.sock = s


class _UnixTransport(xmlrpc.client.Transport):
    def __init__(self, path: str, timeout: float = 10) -> None:
        super().__init__()
        self._path = path
        self._timeout = timeout

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        return _UnixHTTPConnection(self._path, self._timeout)


def supervisord_rpc(sock: Path, timeout: float = 10) -> Any:
    """supervisord's XML-RPC interface over its Unix socket (what ``supervisorctl`` uses)."""
    return xmlrpc.client.ServerProxy("http://localhost/RPC2", transport=_UnixTransport(str(sock), timeout))


def supervisord_venv(ctx: Ctx) -> Path:
    """``.bench/supervisord-venv`` with supervisor from PyPI; created on first use, never system-wide."""
    venv = ROOT / ".bench" / "supervisord-venv"
    exe = venv / "bin" / "supervisord"
    if not exe.exists():
        ctx.log(f"creating {venv} and installing supervisor from PyPI")
        venv.parent.mkdir(exist_ok=True)
        base_py = shutil.which("python3") or PY
        subprocess.run([base_py, "-m", "venv", str(venv)], check=True, timeout=300)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "supervisor"], check=True, timeout=600)
    return venv
