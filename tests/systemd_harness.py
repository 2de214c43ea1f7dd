"""A real systemd system manager for tests, contained in its own PID, mount and cgroup namespaces.

Follows ../shared/SYSTEMD.md, recipe A, exactly: the launching shell first moves
itself out of the root cgroup into a cgroup of its own (in the unified hierarchy
and each v1 hierarchy the recipe names), then unshares and execs systemd with a
unit path that holds only the test's units and ``/etc/systemd/system``, which inside the
namespace is an empty tmpfs: ``systemctl enable`` and ``install-self --enable`` write there, never
to the machine's own ``/etc``. :meth:`SystemdManager.stop` shuts the
manager down by its pid (SIGRTMIN+14), kills by pid anything left in the test's
cgroups, and removes the cgroup directories it made. When the manager (PID 1 of
its namespace) exits, the kernel kills every process left in the namespace.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import psutil

TARGET = "baton-test.target"
STUB_TARGETS = ("sysinit.target", "basic.target", "shutdown.target", "local-fs.target", "sockets.target",
                "paths.target", "slices.target", "swap.target", "timers.target", "umount.target",
                "local-fs-pre.target")
LAUNCH = r"""set -e
name=$1; unitdir=$2; target=$3
# Never start a manager from the root cgroup: move this shell into a cgroup of its own first.
while IFS=: read -r _ ctrl path; do
  case "$ctrl" in
    "") h=unified ;;
    name=systemd) h=systemd ;;
    memory|pids|cpu) h=$ctrl ;;
    *) continue ;;
  esac
  [ -d "/sys/fs/cgroup/$h" ] || continue
  if [ "$path" = / ]; then d="/sys/fs/cgroup/$h/$name"; else d="/sys/fs/cgroup/$h$path/$name"; fi
  mkdir -p "$d"
  echo $$ > "$d/cgroup.procs"
done < /proc/self/cgroup
if grep -qE '^0::/$' /proc/self/cgroup; then echo "still in the root cgroup; refusing" >&2; exit 97; fi
exec unshare --pid --fork --mount --uts --ipc --cgroup --propagation private bash -c "
  mount -t proc proc /proc
  umount -R /sys/fs/cgroup
  mount -t cgroup2 cgroup2 /sys/fs/cgroup
  mount -t tmpfs -o mode=755 tmpfs /run
  mount -t tmpfs -o mode=755 tmpfs /etc/systemd/system || exit 98  # else enable would link in the real /etc
  export container=test SYSTEMD_UNIT_PATH=$unitdir:/etc/systemd/system
  exec /lib/systemd/systemd --system --unit=$target --log-target=console --show-status=0"
"""


def unavailable_reason() -> str:
    """Why a real systemd cannot run here ("" when it can)."""
    if os.geteuid() != 0:
        return "needs root to create cgroups and namespaces"
    for tool in ("unshare", "nsenter", "systemd-run"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not Path("/lib/systemd/systemd").exists():
        return "/lib/systemd/systemd is not installed"
    if not Path("/sys/fs/cgroup").is_dir():
        return "no cgroup filesystem"
    return ""


class SystemdManager:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.units = base / "units"
        self.name = f"batontest-{uuid.uuid4().hex[:10]}"
        self.log = base / "systemd.log"
        self.pid = 0
        self._launcher: subprocess.Popen[bytes] | None = None
        self.units.mkdir(parents=True, exist_ok=True)
        (self.units / TARGET).write_text("[Unit]\nDescription=Baton test target\nDefaultDependencies=no\n")
        for stub in STUB_TARGETS:  # what transient units (systemd-run) depend on by default
            (self.units / stub).write_text("[Unit]\nDefaultDependencies=no\n")

    def add_unit(self, name: str, text: str) -> None:
        (self.units / name).write_text(text)
        if self.pid:
            self.systemctl("daemon-reload", check=True)

    def start(self, timeout: float = 30.0) -> None:
        script = self.base / "launch-systemd.sh"
        script.write_text(LAUNCH)
        with open(self.log, "ab") as log:
            self._launcher = subprocess.Popen(["bash", str(script), self.name, str(self.units), TARGET],
                                              stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._launcher.poll() is not None:
                raise RuntimeError(f"systemd launcher exited {self._launcher.returncode}: {self.log.read_text()}")
            kids = []
            for c in psutil.Process(self._launcher.pid).children():
                with contextlib.suppress(psutil.Error):  # the launch script's own short-lived children
                    if "systemd" in " ".join(c.cmdline()):
                        kids.append(c)
            if kids:
                self.pid = kids[0].pid
                state = self.systemctl("is-system-running").stdout.strip()
                if state in ("running", "degraded"):
                    return
            time.sleep(0.1)
        raise RuntimeError(f"systemd did not come up: {self.log.read_text()[-2000:]}")

    def systemctl(self, *args: str, check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["nsenter", "-t", str(self.pid), "-m", "-p", "systemctl", *args], capture_output=True,
                              text=True, timeout=timeout, check=check)

    def inside(self, *argv: str | Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        """Run a command in the manager's mount and PID namespaces: its /run, its tmpfs /etc/systemd/system."""
        return subprocess.run(["nsenter", "-t", str(self.pid), "-m", "-p", *map(str, argv)], capture_output=True,
                              text=True, timeout=timeout, cwd="/", stdin=subprocess.DEVNULL)

    def path_inside(self, path: Path) -> Path:
        """``path`` as the manager's mount namespace sees it, read from outside through /proc."""
        return Path(f"/proc/{self.pid}/root") / path.relative_to("/")

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, "-p", ",".join(props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def _cgroup_dirs(self) -> list[Path]:
        return sorted((p for p in Path("/sys/fs/cgroup").glob(f"**/{self.name}") if p.is_dir()),
                      key=lambda p: len(p.parts), reverse=True)

    def stop(self) -> None:
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGRTMIN + 14)
            with contextlib.suppress(psutil.Error):
                psutil.Process(self.pid).wait(20)
        if self._launcher is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._launcher.wait(10)
            if self._launcher.poll() is None:
                self._launcher.kill()
                self._launcher.wait(5)
        for d in self._cgroup_dirs():
            for procs in d.rglob("cgroup.procs"):
                with contextlib.suppress(OSError):
                    for pid in procs.read_text().split():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(int(pid), signal.SIGKILL)
        time.sleep(0.2)
        for d in self._cgroup_dirs():
            for sub in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                with contextlib.suppress(OSError):
                    sub.rmdir()
            with contextlib.suppress(OSError):
                d.rmdir()
        self.pid = 0
