"""The supervisor daemon: wires the process manager, gRPC, the Manager client and systemd.

Start-up order: lock the state directory, start gRPC on its private socket,
bind (or inherit) the public sockets, adopt or start agents, report SERVING and
READY=1. Shutdown on SIGTERM/SIGINT is the reverse, and stops every agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import os
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from baton import agent_channel
from baton.agent_table import AgentRecord
from baton.audit import AuditLog
from baton.config import Config, ConfigError, load_config
from baton.errors import BatonError
from baton.front import SERVER_OPTIONS, Front, UnixPeerPolicy, bind_tcp, bind_unix
from baton.log import logger
from baton.pb import daemon_pb2_grpc
from baton.serving import SERVICE_NAME
from baton.standby import FLAG as STANDBY_FLAG
from baton.states import AgentState
from baton.strict_modes import make_dirs
from baton.tls import server_tls
from baton.tls_files import TlsFilesError
from supervisor import handover, libc, systemd
from supervisor.adoption import same_process
from supervisor.agent_socket import AgentSocket
from supervisor.agents import AgentSnapshot, ProcessManager, ReloadResult
from supervisor.audit import AuditInterceptor, AuditTrail, Callers
from supervisor.clock import keep_clock_record, try_record_clock
from supervisor.daemon_service import DaemonService, agent_info
from supervisor.handover import ReceivedState
from supervisor.own_layout import helper_argv
from supervisor.processes import AioFilesReader, LoopClock, PosixProcesses, SubprocessHelpers
from supervisor.standby import Standby
from supervisor.updates import UpdateManager
from supervisor.version import supervisor_version

if TYPE_CHECKING:
    from baton.metrics import MetricsServer  # prometheus_client: imported only when [metrics] is configured
    from supervisor.manager_client import ManagerClient  # and these when a Manager is
    from supervisor.outbox import ResultOutbox

STATUS_DELAY_S = 0.05  # agent changes within this share one systemd STATUS line
STRAY_REAP_DELAY_S = 0.05  # SIGCHLDs within this share one look for stray children
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
TRIM_HEAP_AFTER_START_S = 1.0  # start-up's garbage (config, handover, spawning every agent) freed by then
RESTART_HOLDER_TIMEOUT_S = 30.0  # systemctl restart: the helper's PREPARE by then, else the agents are left to adopt
TRIM_HEAP_EVERY_S = 60.0  # and what later bursts (updates, waves of restarts) left: a trim costs well under 1 ms


class AlreadyRunning(BatonError):
    pass


@dataclass(frozen=True)
class Reloaded:
    """A reload's outcome: what happened to each agent, and config sections that wait for the next start."""

    agents: ReloadResult
    not_applied: tuple[str, ...]
    tls: str = ""  # what became of grpc.tls_*: "" without TLS, else one line (re-read, unchanged, or kept and why)
    tls_kept_old: bool = False  # the files on disk did not load: the old ones are still served


def status_line(states: list[AgentState]) -> str:
    """systemd's STATUS=: how many agents run, start and have failed."""
    count = Counter(states)
    failed = count[AgentState.FATAL] + count[AgentState.BACKOFF]
    return (f"{count[AgentState.RUNNING]} running, {count[AgentState.STARTING]} starting, {failed} failed "
            f"of {len(states)} agents")


def log_broken_agents(cfg: Config) -> None:
    """Each agent set apart for its invalid section, loudly: it is not run until the file is fixed and reloaded."""
    for b in cfg.broken_agents:
        logger.error("agent {} is not run (config_error) until its section is fixed and reloaded: {}", b.name,
                     b.error)


def prepare_dirs(cfg: Config) -> None:
    """Create what is missing with our modes; a directory that exists keeps its mode (baton/strict_modes.py)."""
    for d, mode in ((cfg.node.state_dir, 0o700), (cfg.run_dir, 0o700), (cfg.log_dir, 0o750),
                    (cfg.node.install_root, 0o755), (cfg.notify_dir, 0o711), (cfg.download_dir, 0o700)):
        make_dirs(d, mode)


def lock_state_dir(cfg: Config) -> int:
    fd = os.open(cfg.node.state_dir / "supervisor.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AlreadyRunning(f"another supervisor holds {cfg.node.state_dir}/supervisor.lock") from None
    return fd


class Supervisor:
    """The daemon, built complete: every part exists from ``__init__`` on, and :meth:`run` starts them in order.

    Building a part creates nothing outside this process (no file, socket or child), so everything that does
    (the lock, the handover, binding, agents) still happens in :meth:`run`, in the order the module says.
    Built inside the event loop its parts bind to. ``manager``, ``outbox`` and ``metrics`` are None only
    when not configured.
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.version = supervisor_version()
        self.started_at = time.time()
        self._stop = asyncio.Event()
        self._reloads: set[asyncio.Task[None]] = set()
        self._restart_check: asyncio.Task[None] | None = None  # SIGTERM under systemd: a stop or a restart?
        self._agents_ready = asyncio.Event()  # a reload (SIGHUP, RPC) that comes while starting waits for it
        self._status_soon: asyncio.TimerHandle | None = None
        self._reap_soon: asyncio.TimerHandle | None = None
        self.audit = AuditTrail(AuditLog(cfg.node.state_dir), Callers())
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        # The drivers' collaborators (supervisor/ports.py): the real ones, built here and nowhere else.
        processes, clock = PosixProcesses(), LoopClock()
        helpers = SubprocessHelpers(processes)
        self.pm = ProcessManager(cfg, self._agent_changed, processes=processes, clock=clock)
        self.agent_socket = AgentSocket(self.pm, self.audit, agent_channel.socket_path(cfg.run_dir))
        standby = None
        if cfg.update.standby_helper and cfg.source is not None:
            standby = Standby(cfg.run_dir, lambda: helper_argv(self.updates.cfg, [STANDBY_FLAG]),
                              launcher=helpers, processes=processes, clock=clock)
        self.updates = UpdateManager(cfg, processes=processes, clock=clock, helpers=helpers,
                                     reader=AioFilesReader(), standby=standby)
        self.tls = server_tls(cfg.grpc)  # None: the TCP backend port is insecure
        self.gate = handover.HandoverGate()
        self.server = self._grpc_server()
        self.front = Front(self.backend_path,
                           UnixPeerPolicy(cfg.grpc.unix_socket_group, cfg.grpc.allow_downgrade_uids),
                           local_backend=self.local_backend_path, audit=self.audit)
        self.endpoint = handover.HandoverEndpoint(cfg, self.version, self.pm, self.front, self.server, self.gate,
                                                  self._stop_control_plane, self._stop)
        self.manager: ManagerClient | None = None
        self.outbox: ResultOutbox | None = None
        if cfg.manager.address:
            self.manager, self.outbox = self._manager_client()
        self.metrics = self._metrics_server()

    def _manager_client(self) -> tuple[ManagerClient, ResultOutbox]:
        """Imported only when a Manager is configured: its protobuf module and client are 0.1 MiB resident."""
        from supervisor.manager_client import ManagerClient
        from supervisor.outbox import ResultOutbox

        manager = ManagerClient(self.cfg.manager, self.cfg.node.id, self.version, self.started_at,
                                lambda: [agent_info(s) for s in self.pm.snapshots()],
                                grpc_address=self.cfg.grpc.push_address, labels=self.cfg.node.labels,
                                updates_refused=self.updates.refused_because)
        return manager, ResultOutbox(self.updates, manager, self.cfg.node.id)

    @property
    def backend_path(self) -> Path:
        """gRPC's private port for the public TCP sockets (TLS when configured)."""
        return self.cfg.run_dir / f"grpc-{os.getpid()}.sock"

    @property
    def local_backend_path(self) -> Path:
        """gRPC's private, always insecure port for the local Unix sockets (peers checked by SO_PEERCRED)."""
        return self.cfg.run_dir / f"local-{os.getpid()}.sock"

    def _grpc_server(self) -> grpc.aio.Server:
        """The gRPC server with its services and interceptors; its ports are added by :meth:`_start_grpc`."""
        from supervisor.authz import AuthzInterceptor, Policy

        g = self.cfg.grpc
        policy = Policy(g.allowed_clients, g.allow_downgrade_clients)
        interceptors: list[grpc.aio.ServerInterceptor] = [
            AuditInterceptor(self.audit, read_calls=g.audit_read_calls),  # first: sees refusals too
            self.gate,  # during a handover: changes wait for the next process, watches end
            AuthzInterceptor(policy),
        ]
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0), *SERVER_OPTIONS], interceptors=interceptors)
        daemon_pb2_grpc.add_DaemonServiceServicer_to_server(
            DaemonService(self.cfg.node.id, self.version, self.started_at, self.pm, self.updates,
                          manager_connected=self, reload=self.reload, state_dir=self.cfg.node.state_dir,
                          policy=policy),
            server,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        return server

    def _metrics_server(self) -> MetricsServer | None:
        address = self.cfg.metrics.address
        if address is None:
            return None
        from supervisor.metrics import metrics_server  # prometheus_client: loaded only when configured

        return metrics_server(self, *address)

    async def _start_grpc(self) -> None:
        """Two private ports: TCP clients reach ``backend_path`` (mutual TLS and the allow-list when configured),
        local clients ``local_backend_path``; ``supervisor/authz.py`` tells their calls apart by transport."""
        g = self.cfg.grpc
        creds = self.tls.credentials() if self.tls is not None else None
        if creds is not None and not (g.allowed_clients or g.allow_downgrade_clients):
            logger.warning("TLS is on but grpc.allowed_clients is empty: no client may change anything over TCP")
        if creds is None and g.listen:
            logger.warning("grpc.insecure_tcp: {} without TLS, read-only methods only (no authentication)",
                           ", ".join(g.listen))
        for path in (self.backend_path, self.local_backend_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        addr = f"unix:{self.backend_path}"
        if creds is None:
            self.server.add_insecure_port(addr)
        else:
            self.server.add_secure_port(addr, creds)
        self.server.add_insecure_port(f"unix:{self.local_backend_path}")
        await self.server.start()

    @property
    def connected(self) -> bool:
        return bool(self.manager and self.manager.connected)

    def _listening_sockets(self, received: ReceivedState | None) -> list[tuple[str, socket.socket]]:
        """Inherited from a handover where possible (no refused connection), bound fresh otherwise."""
        wanted: list[tuple[str, Callable[[], socket.socket]]] = [
            (a, partial(bind_tcp, a)) for a in self.cfg.grpc.listen
        ]
        wanted.append((handover.wire.CONTROL_LISTENER, partial(bind_unix, self.cfg.control_socket)))
        if self.cfg.grpc.unix_socket is not None:
            wanted.append((f"unix:{self.cfg.grpc.unix_socket}",
                           partial(bind_unix, self.cfg.grpc.unix_socket, self.cfg.grpc.unix_socket_group)))
        out = []
        for key, bind in wanted:
            inherited = received.take_listen(key) if received else None
            out.append((key, inherited if inherited is not None else bind()))
        if received:
            received.close_unused()
        return out

    async def _set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            res = self.health.set(name, status)
            if asyncio.iscoroutine(res):
                await res

    def _agent_changed(self, snap: AgentSnapshot) -> None:
        """Called for every agent state change, between an agent's exit and its restart: only flags work.

        The Manager client sends its report from its own task (``agents_changed`` only sets an event), and the
        STATUS line over all agents is built once per STATUS_DELAY_S however many agents changed (100 agents
        restarted together: one line, not 100 lines of 100 agents each). Neither is state a crash could lose:
        both are recomputed from the live agents when sent.
        """
        if self.manager is not None:
            self.manager.agents_changed()
        if self._status_soon is None and systemd.enabled():
            self._status_soon = asyncio.get_running_loop().call_later(STATUS_DELAY_S, self._send_status)

    def _send_status(self) -> None:
        self._status_soon = None
        systemd.notify(f"STATUS={status_line(self.pm.states())}")

    @property
    def manager_configured(self) -> bool:
        return bool(self.cfg.manager.address)

    @property
    def manager_clock(self) -> tuple[float, float]:
        """The Manager's clock minus ours and when it was measured (0, 0: never; supervisor/clock.py)."""
        return (self.manager.clock_offset_s, self.manager.clock_measured_at) if self.manager else (0.0, 0.0)

    async def reload(self) -> Reloaded:
        """Re-read the config file, apply its agents and re-read the TLS files; ConfigError (nothing changed) for
        a bad file.

        ``agents`` is applied, and ``grpc.tls_cert``/``tls_key``/``tls_ca`` are read again from the running
        config's paths (a renewed certificate written over the old file is served from the next connection; files
        that do not load leave the old ones served). Other sections that differ are named in ``not_applied``:
        ``supervisor restart-daemon`` applies them, keeping every agent (listening sockets, directories and the
        Manager client are not rebuilt live).
        """
        await self._agents_ready.wait()
        assert self.cfg.source is not None
        try:
            new = await asyncio.to_thread(partial(load_config, self.cfg.source, degrade=True))
        except ConfigError as e:  # a renewed TLS pair that does not belong together is refused here, old one kept
            logger.error("reload refused, the running config stays: {}", e)
            raise
        not_applied = tuple(f.name for f in dataclasses.fields(Config) if f.name not in ("agents", "broken_agents",
                            "source") and getattr(new, f.name) != getattr(self.cfg, f.name))
        if not_applied:
            logger.warning("reload: changes to [{}] take effect at `supervisor restart-daemon` or the next start",
                           ", ".join(not_applied))
        tls, tls_kept_old = await asyncio.to_thread(self._reload_tls)
        merged = dataclasses.replace(self.cfg, agents=new.agents, broken_agents=new.broken_agents)
        log_broken_agents(merged)
        systemd.notify("RELOADING=1\nSTATUS=reloading the config")
        try:
            result = await self.pm.reload(merged)
        finally:
            self.cfg = merged
            self.updates.cfg = merged
            systemd.notify(f"READY=1\nSTATUS={status_line(self.pm.states())}")
        if refused := self.updates.refused_because():
            logger.error("every update is refused until this is fixed (the agents are supervised): {}", refused)
        return Reloaded(result, not_applied, tls, tls_kept_old)

    def _reload_tls(self) -> tuple[str, bool]:
        """Re-read grpc.tls_*: (the line for the log and the reload's answer, whether the old files stay served)."""
        if self.tls is None:
            return "", False
        try:
            changed = self.tls.reload(self.cfg.grpc)
        except TlsFilesError as e:
            line = (f"TLS: the old certificate (serial {self.tls.files.serial:x}) is still served: the new files "
                    f"do not load: {e}")
            logger.error("reload: {}", line)
            return line, True
        if changed:
            line = f"TLS: serving the new certificate (serial {self.tls.files.serial:x}) from the next connection"
            logger.info("reload: {}", line)
        else:
            line = f"TLS: the certificate is unchanged (serial {self.tls.files.serial:x})"
        return line, False

    def _reload_on_signal(self) -> None:
        async def run() -> None:
            logger.info("SIGHUP: reloading {}", self.cfg.source)
            with contextlib.suppress(ConfigError):  # reload() logged it
                await self.reload()

        task = asyncio.get_running_loop().create_task(run())
        self._reloads.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(self._reloads.discard)

    def _on_stop_signal(self, sig: signal.Signals) -> None:
        deciding = self._restart_check is not None or self._stop.is_set()
        if sig is signal.SIGTERM and systemd.under_systemd() and not deciding:
            self._restart_check = asyncio.get_running_loop().create_task(self._stop_or_restart())
        else:
            self._stop.set()

    async def _stop_or_restart(self) -> None:
        """SIGTERM from systemd: ``systemctl restart`` keeps every agent, a stop (or a shutdown) stops them all.

        systemd says which in the unit's pending job (``restart`` or ``stop``). For a restart a helper of ours, in a
        transient unit of its own, takes the agents and descriptors through the self-update's handover; this
        process then exits instead of exec'ing and systemd starts the next one, which takes them from the helper.
        Anything we cannot tell or do is a stop, as documented. docs/handover.md, "Under systemd".
        """
        unit = systemd.own_unit()
        job = await asyncio.to_thread(systemd.pending_job, unit) if unit else ""
        if job not in systemd.RESTART_JOBS:
            self._stop.set()
            return
        why_not = handover.cannot_hand_over(self.cfg) or ("" if self._agents_ready.is_set() else "still starting")
        if not why_not and not await self._start_restart_helper(unit):
            why_not = "its helper could not be started"
        if why_not:
            logger.warning("systemd restarts {}, but the agents cannot be handed over ({}): stopping every agent",
                           unit, why_not)
            self._stop.set()
            return
        await asyncio.sleep(RESTART_HOLDER_TIMEOUT_S)
        if self.endpoint.busy:
            return  # the handover ends in exit_keeping_agents (its own timeouts bound it)
        logger.error("systemd restarts {}: no helper asked for the agents within {:g}s", unit, RESTART_HOLDER_TIMEOUT_S)
        self.pm.release_all()
        self.pm.persist()
        handover.exit_keeping_agents("the next process adopts them from agents.json")

    async def _start_restart_helper(self, unit: str) -> bool:
        """``supervisor restart-daemon --after-exit`` in a transient unit: outside what systemd stops with ours."""
        import subprocess

        from supervisor.own_layout import launcher

        logger.info("systemd restarts {}: handing every agent over to the next process", unit)
        self.endpoint.exit_after_handover = True
        log_path = self.cfg.log_dir / "restart-daemon.log"
        argv = systemd.transient_unit_argv(
            f"baton-restart-{os.getpid()}-{int(time.time())}", log_path,
            [str(launcher(self.cfg)), "restart-daemon", "--config", str(self.cfg.source), "--after-exit"])
        try:
            res = await asyncio.to_thread(subprocess.run, argv, stdin=subprocess.DEVNULL, capture_output=True,
                                          text=True, timeout=RESTART_HOLDER_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as e:
            logger.error("systemd-run: {}", e)
            self.endpoint.exit_after_handover = False
            return False
        if res.returncode != 0:
            logger.error("systemd-run exited {}: {}", res.returncode, res.stderr.strip()[-500:])
            self.endpoint.exit_after_handover = False
            return False
        return True

    async def _trim_heap(self) -> None:
        """Hand the C heap's free memory back shortly after start-up, then every TRIM_HEAP_EVERY_S (libc.trim_heap)."""
        await asyncio.sleep(TRIM_HEAP_AFTER_START_S)
        while True:
            libc.trim_heap()
            await asyncio.sleep(TRIM_HEAP_EVERY_S)

    async def _feed_watchdog(self, interval: float) -> None:
        while True:
            systemd.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(_log_loop_exception)
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._reload_on_signal)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, handover.HANDLED_SIGNALS)  # blocked across a handover's exec
        if os.environ.pop(handover.PENDING_STOP_ENV, None):
            logger.info("a stop was requested during the handover; stopping once it completes")
            self._stop.set()
        loop.add_signal_handler(signal.SIGCHLD, self._reap_strays_soon)
        interval = systemd.watchdog_interval_s()
        watchdog = asyncio.create_task(self._feed_watchdog(interval)) if interval else None
        prepare_dirs(self.cfg)
        lock_fd = lock_state_dir(self.cfg)
        try_record_clock(self.cfg.node.state_dir)  # doctor judges the clock by it (supervisor/clock.py)
        if (err := libc.set_child_subreaper()) is not None:
            logger.warning("{}: an agent's orphaned children will be reaped by PID 1, not by the supervisor", err)
        self._reap_strays()
        received = await asyncio.to_thread(handover.receive, self.cfg, self.version)
        await self._start_grpc()
        await self.front.serve(self._listening_sockets(received))
        if received is not None:
            await self.pm.start(channels=received.channels(), records=received.records)
        else:
            await self.pm.start()
        await self.agent_socket.start()  # before updates.start(): a helper it resumes finds the channel there
        await self.updates.start()
        self._agents_ready.set()
        self.endpoint.start()
        if self.metrics is not None:
            self.metrics.start(retry=True)
        await self._set_serving(True)
        logger.info("supervisor {} (node {}, pid {}) serving on {}; {} agents", self.version, self.cfg.node.id,
                    os.getpid(), ", ".join(self.front.addresses()), len(self.pm.agents))
        if refused := self.updates.refused_because():
            logger.error("every update is refused until this is fixed (the agents are supervised): {}", refused)
        log_broken_agents(self.cfg)
        if received is not None:
            await self._finish_handover(received)
        systemd.notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS={status_line(self.pm.states())}")
        trimmer = asyncio.create_task(self._trim_heap())
        if self.manager is not None:
            self.manager.start()
        if self.outbox is not None:
            self.outbox.start()
        clock = asyncio.create_task(keep_clock_record(self.cfg.node.state_dir))
        await self._stop.wait()
        logger.info("supervisor stopping: stopping every agent")
        systemd.notify("STOPPING=1\nSTATUS=stopping agents")
        await self._shutdown()
        trimmer.cancel()
        clock.cancel()
        if watchdog is not None:
            watchdog.cancel()
        logger.info("supervisor stopped")
        os.close(lock_fd)
        return 0

    async def _finish_handover(self, received: ReceivedState) -> None:
        problems = await self.health_problems(received.records)
        msg: handover.wire.Healthy | handover.wire.Unhealthy
        if problems:
            msg = handover.wire.Unhealthy(reason="; ".join(problems), version=self.version, pid=os.getpid())
        else:
            msg = handover.wire.Healthy(version=self.version, pid=os.getpid(),
                                        agents={s.name: s.pid for s in self.pm.snapshots()
                                                if s.state is not AgentState.CONFIG_ERROR})  # never run: no pid
        reply = await asyncio.to_thread(received.report, msg)
        logger.info("handover: reported {}; the helper answered {}", msg.TYPE, reply.TYPE if reply else "nothing")

    async def health_problems(self, records: list[AgentRecord]) -> list[str]:
        """Why this process must not be committed as the supervisor: agents not adopted, gRPC not serving."""
        problems = []
        for rec in records:
            agent = self.pm.agents.get(rec.name)
            if agent is None:
                continue
            if agent.pid != rec.pid and same_process(rec.pid, rec.start_time):
                problems.append(f"agent {rec.name} pid {rec.pid} runs but was not adopted")
        try:
            async with grpc.aio.insecure_channel(f"unix:{self.cfg.control_socket}") as ch:
                resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                                                  timeout=5.0)
            if resp.status != health_pb2.HealthCheckResponse.SERVING:
                problems.append("gRPC health is not SERVING")
        except grpc.aio.AioRpcError as e:
            problems.append(f"gRPC health check failed: {e.code().name}")
        return problems

    def _reap_strays_soon(self) -> None:
        """SIGCHLD: look for strays STRAY_REAP_DELAY_S later, once for a burst of exits.

        An agent's exit is handled at once through its pidfd; this look is kept off that path (it reads /proc)
        so that a restart never waits for it. A stray only waits a little longer as a zombie: nothing is lost.
        """
        if self._reap_soon is None:
            self._reap_soon = asyncio.get_running_loop().call_later(STRAY_REAP_DELAY_S, self._reap_strays)

    def _reap_strays(self) -> None:
        """Reap children we do not watch (helpers we lost track of across an exec, re-parented orphans)."""
        self._reap_soon = None
        known = set(self.updates.helper_pids()) | {a.pid for a in self.pm.agents.values() if a.pid}
        for pid in _child_pids() - known:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # a zombie is reaped; a live child is left alone

    async def _stop_control_plane(self) -> None:
        """The agent channel, health NOT_SERVING, then the Manager client, the outbox and helper watching; agents
        untouched."""
        await self.agent_socket.close()  # first: in a handover, no event-loop turn after the gate closes
        await self._set_serving(False)
        if self.outbox is not None:
            await self.outbox.stop()
        if self.manager is not None:
            await self.manager.stop()
        await self.updates.stop()

    async def _shutdown(self) -> None:
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.stop)
        await self._stop_control_plane()
        self.endpoint.close()
        await self.front.stop_accepting()
        await self.pm.stop_all()
        self.pm.table.save([])
        await self.front.close()
        await self.server.stop(grace=1.0)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.backend_path)


def _child_pids() -> set[int]:
    """This process's children: /proc/self/task/*/children (each thread lists those it forked), which reads our
    own tasks only; psutil's ``children()`` reads every process of the host (milliseconds with 100 agents)."""
    if not os.path.exists(f"/proc/self/task/{os.getpid()}/children"):  # a kernel without CONFIG_PROC_CHILDREN
        import psutil

        try:
            return {c.pid for c in psutil.Process().children()}
        except psutil.Error:
            return set()
    out: set[int] = set()
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError), open(f"/proc/self/task/{tid}/children") as f:  # a thread may have ended
            out.update(int(p) for p in f.read().split())
    return out


def _log_loop_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Unhandled errors in callbacks go to our log (one JSON line with --json), not to a bare traceback."""
    exc = context.get("exception")
    logger.opt(exception=exc).error("event loop: {}", context.get("message", "unhandled error"))


def run_supervisor(cfg: Config) -> int:
    async def main() -> int:
        return await Supervisor(cfg).run()  # built inside the loop its parts bind to

    return asyncio.run(main())
