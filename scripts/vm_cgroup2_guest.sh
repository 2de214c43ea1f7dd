#!/bin/sh
# PID 1 of scripts/vm_cgroup2.sh's VM, run from the checkout shared read-only at /mnt/src: a unified cgroup v2
# host with memory, pids and cpu delegated to one cgroup, the way systemd gives them to a unit with
# Delegate=yes; pytest runs as root in that cgroup, from a copy of the checkout. Writes pytest's exit code to
# /mnt/out/rc (the host's result), then powers off.
UNIT=/sys/fs/cgroup/system.slice/baton-tests.service  # stands for the supervisor's unit
PY=/opt/baton-venv/bin/python

power_off() {  # with $1 as the result
    echo "$1" > /mnt/out/rc
    echo "== vm: exit $1"
    sync
    echo 1 > /proc/sys/kernel/sysrq
    echo o > /proc/sysrq-trigger
    sleep 60
}

in_unit() {  # runs "$@" from the checkout's copy, in the unit's cgroup (and what it starts: there too)
    sh -c 'echo $$ > "$0/cgroup.procs" && cd /root/baton && exec "$@"' "$UNIT" "$@"
}

mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup
ip link set lo up
mkdir -p "$UNIT"
for d in /sys/fs/cgroup /sys/fs/cgroup/system.slice; do  # each level offers them to the next
    echo "+memory +pids +cpu" > "$d/cgroup.subtree_control"
done
echo "== vm: kernel $(uname -r) ($(uname -v)), $($PY --version)"
echo "== vm: cgroup mounts: $(grep cgroup /proc/mounts | tr '\n' ';')"
echo "== vm: $UNIT/cgroup.controllers: $(cat "$UNIT/cgroup.controllers")"

mkdir -p /root/baton
tar -C /mnt/src --exclude=./.venv --exclude=./.git --exclude=__pycache__ --exclude=./.mypy_cache \
    --exclude=./.ruff_cache -cf - . | tar -C /root/baton -xf -
# Compiled once here, not by every supervisor the tests start (under TCG that alone can take seconds each).
$PY -m compileall -q /root/baton/baton /root/baton/supervisor /root/baton/helper /root/baton/tests >/dev/null

# The limit tests skip where the controllers are missing: a run that would prove nothing stops here.
in_unit "$PY" -c '
from supervisor.cgroups import CgroupHost
h = CgroupHost.detect()
print("== vm: the supervisor finds:", {c: f"{x.own_dir} (v{1 + x.v2})" for c, x in sorted(h.hierarchies.items())})
raise SystemExit(set(h.hierarchies) != {"memory", "pids", "cpu"} or not all(x.v2 for x in h.hierarchies.values()))
' || { echo "== vm: cgroup v2 does not give memory, pids and cpu to $UNIT"; power_off 125; }

set --
while IFS= read -r arg; do
    set -- "$@" "$arg"
done < /mnt/out/pytest-args
echo "== vm: pytest $*"
in_unit "$PY" -m pytest -p no:cacheprovider --basetemp=/tmp/pt --color=no -v "$@"
rc=$?
# The tests' supervisors' logs, for a failure: the host keeps them as last-pytest-tmp.tar.gz in its cache.
[ "$rc" = 0 ] || tar -C /tmp -czf /mnt/out/pytest-tmp.tar.gz pt 2>/dev/null
power_off $rc
