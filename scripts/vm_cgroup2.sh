#!/usr/bin/env bash
# The resource-limit tests on a real cgroup v2 (unified) host: a small Debian bookworm VM under qemu.
#
#   bash scripts/vm_cgroup2.sh [--cache DIR] [--rebuild] [--timeout SECONDS] [PYTEST_ARGS...]
#
# Builds once (debootstrap: about 3.5 minutes) and caches under DIR (default /var/tmp/baton-vm) a root disk image
# with Debian's python3 (3.11), Debian's linux-image-amd64 and a virtualenv with the pinned runtime dependencies
# (requirements/runtime.lock, --require-hashes) and pytest. Each run boots it (writes go to a throw-away
# snapshot), shares this checkout read-only over 9p, mounts cgroup2 alone at /sys/fs/cgroup (cgroup_no_v1=all)
# with memory, pids and cpu given to a cgroup standing for the supervisor's unit (what Delegate=yes gives it),
# and runs as root, from a copy of the checkout, in that cgroup:
#   pytest tests/test_limits.py plus the cgroup detection tests of tests/test_systemd.py   (or PYTEST_ARGS)
# then powers off. Exit code: pytest's (125 if the VM gave none). Needs root, qemu-system-x86, debootstrap and
# e2fsprogs. KVM when a guest boots with it, else TCG (slower; BATON_VM_ACCEL=kvm or tcg forces one).
# Everything it creates is under DIR; the VM is killed on every exit path. Not part of scripts/test.sh
# (docs/troubleshooting.md#limits-on-cgroup-v2).
set -euo pipefail
{  # read whole before it runs: editing this file during a run (minutes) cannot change what the run does
cd "$(dirname "$0")/.."
SRC=$(pwd)

CACHE=/var/tmp/baton-vm
REBUILD=0
TIMEOUT_S=1800
MIRROR=${BATON_VM_MIRROR:-http://deb.debian.org/debian}
while [ $# -gt 0 ]; do
    case "$1" in
        --cache) CACHE=$2; shift 2 ;;
        --rebuild) REBUILD=1; shift ;;
        --timeout) TIMEOUT_S=$2; shift 2 ;;
        -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) break ;;
    esac
done
if [ $# -gt 0 ]; then
    PYTEST_ARGS=("$@")
else
    PYTEST_ARGS=(tests/test_limits.py
                 tests/test_systemd.py::test_the_supervisor_finds_its_own_unit_in_its_cgroup
                 tests/test_systemd.py::test_outside_a_service_there_is_no_unit_to_ask_about)
fi

die() { echo "vm_cgroup2: $*" >&2; exit 2; }
[ "$(id -u)" = 0 ] || die "needs root (debootstrap, and the tests run as root in the VM)"
for tool in qemu-system-x86_64 debootstrap mkfs.ext4; do
    command -v "$tool" >/dev/null || die "needs $tool (apt-get install -y qemu-system-x86 debootstrap e2fsprogs)"
done
HOST_PY=${PYTHON:-}
[ -n "$HOST_PY" ] || { [ -x .venv/bin/python ] && HOST_PY=.venv/bin/python; } || HOST_PY=python3
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
IMAGE=$CACHE/root.img
BUILD=$CACHE/build
RUN=$CACHE/run.$$
QEMU_PID=""
TAIL_PID=""

cleanup() {
    local rc=$?
    [ -z "$TAIL_PID" ] || kill "$TAIL_PID" 2>/dev/null || true
    if [ -n "$QEMU_PID" ] && kill -0 "$QEMU_PID" 2>/dev/null; then
        kill "$QEMU_PID" 2>/dev/null || true
        sleep 1
        kill -9 "$QEMU_PID" 2>/dev/null || true
    fi
    if mountpoint -q "$BUILD/rootfs/proc" 2>/dev/null; then
        umount -l "$BUILD/rootfs/proc"
    fi
    [ ! -f "$RUN/console.log" ] || cp "$RUN/console.log" "$CACHE/last-console.log"
    rm -rf "$RUN"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The test dependencies, pinned to what this checkout's virtualenv runs (pytest.ini needs pytest-timeout).
test_pins() {
    "$HOST_PY" - <<'EOF'
import importlib.metadata as m
for d in ("pytest", "pytest-timeout", "tomli-w"):
    print(f"{d}=={m.version(d)}")
EOF
}

# What the image is made of; a change to any of it builds a new one.
image_key() {
    { cat requirements/runtime.lock; test_pins; sed -n '/^build_image()/,/^}/p' "$0"; } | sha256sum | cut -c1-16
}

build_image() {
    echo "vm_cgroup2: building the image in $CACHE (debootstrap bookworm from $MIRROR)"
    local root=$BUILD/rootfs packages=linux-image-amd64,kmod,udev,python3,python3-venv,util-linux,procps,iproute2
    # A build stopped after debootstrap (the long step) starts again from its result.
    if [ "$(cat "$BUILD/debootstrap.done" 2>/dev/null)" != "$packages" ]; then
        rm -rf "$BUILD"
        mkdir -p "$BUILD"
        debootstrap --variant=minbase --include="$packages" bookworm "$root" "$MIRROR" > "$BUILD/debootstrap.log" \
            2>&1 || { tail -20 "$BUILD/debootstrap.log" >&2; die "debootstrap failed (log: $BUILD/debootstrap.log)"; }
        echo "$packages" > "$BUILD/debootstrap.done"
    fi
    rm -rf "$BUILD/wheels" "$root/opt/wheels" "$root/opt/baton-venv"
    mkdir -p "$BUILD/wheels"
    test_pins > "$BUILD/wheels/test.txt"
    cp requirements/runtime.lock "$BUILD/wheels/runtime.lock"
    # This host's pip and index (its configuration's warnings about absent mirrors are noise here).
    "$HOST_PY" -m pip download -q --require-hashes --no-deps -d "$BUILD/wheels" -r requirements/runtime.lock \
        2> >(grep -v "is ignored: it is neither" >&2)
    "$HOST_PY" -m pip download -q -d "$BUILD/wheels" -r "$BUILD/wheels/test.txt" \
        2> >(grep -v "is ignored: it is neither" >&2)
    cp -r "$BUILD/wheels" "$root/opt/wheels"
    mount -t proc proc "$root/proc"
    # Only the wheels brought here: no index, and none of this host's pip configuration.
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root chroot "$root" sh -ec '
        python3 -m venv /opt/baton-venv
        /opt/baton-venv/bin/pip install -q --no-index --find-links /opt/wheels --require-hashes --no-deps \
            -r /opt/wheels/runtime.lock
        /opt/baton-venv/bin/pip install -q --no-index --find-links /opt/wheels -r /opt/wheels/test.txt
        /opt/baton-venv/bin/pip check'
    umount "$root/proc"
    rm -rf "$root/opt/wheels" "$root"/var/cache/apt/archives/*.deb
    # PID 1 of the VM: mounts what the run needs, then runs the checkout's own guest script (kept in the checkout,
    # so a change to it needs no new image).
    cat > "$root/sbin/baton-vm-init" <<'EOF'
#!/bin/sh
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
modprobe -a 9pnet_virtio 9p
mkdir -p /mnt/src /mnt/out
mount -t 9p -o trans=virtio,version=9p2000.L,ro src /mnt/src
mount -t 9p -o trans=virtio,version=9p2000.L out /mnt/out
exec /bin/sh /mnt/src/scripts/vm_cgroup2_guest.sh
EOF
    chmod 755 "$root/sbin/baton-vm-init"
    echo "baton-vm" > "$root/etc/hostname"
    cp "$(ls "$root"/boot/vmlinuz-* | sort -V | tail -1)" "$BUILD/vmlinuz"
    cp "$(ls "$root"/boot/initrd.img-* | sort -V | tail -1)" "$BUILD/initrd.img"
    rm -f "$BUILD/root.img"
    truncate -s 3G "$BUILD/root.img"
    mkfs.ext4 -q -F -L baton-vm -d "$root" "$BUILD/root.img"
    mv "$BUILD/root.img" "$BUILD/vmlinuz" "$BUILD/initrd.img" "$CACHE/"
    rm -rf "$BUILD/wheels"  # the debootstrapped tree stays: a new lock file or test pin builds on it
}

KEY=$(image_key)
if [ "$REBUILD" = 1 ] || [ ! -f "$IMAGE" ] || [ "$(cat "$CACHE/image.key" 2>/dev/null)" != "$KEY" ]; then
    rm -f "$CACHE/image.key"
    build_image
    echo "$KEY" > "$CACHE/image.key"
fi

mkdir -p "$RUN/out" "$RUN/tmp"
# KVM if a guest kernel boots with it: /dev/kvm may open and still run no guest (nested virtualization that
# hangs it, or refuses the host CPU's MSRs). The probe boots the kernel alone: it panics without a root fs.
kvm_boots() {
    (exec 3<>/dev/kvm) 2>/dev/null || return 1
    (timeout 20 qemu-system-x86_64 -accel kvm -cpu host -machine q35 -m 256 -display none -no-reboot \
        -serial "file:$RUN/kvm-probe.log" -monitor none -nic none -kernel "$CACHE/vmlinuz" \
        -append "console=ttyS0 panic=-1" </dev/null >/dev/null 2>&1 || true) 2>/dev/null  # qemu may abort
    grep -q "Kernel panic" "$RUN/kvm-probe.log" 2>/dev/null
}
case "${BATON_VM_ACCEL:-probe}" in
    kvm) ACCEL=(-accel kvm -cpu host) ;;
    tcg) ACCEL=(-accel tcg -cpu max) ;;
    *) if kvm_boots; then
           ACCEL=(-accel kvm -cpu host)
       else
           echo "vm_cgroup2: KVM boots no guest here (no /dev/kvm, or it hangs the kernel): TCG, slower" >&2
           ACCEL=(-accel tcg -cpu max)
       fi ;;
esac
printf '%s\n' "${PYTEST_ARGS[@]}" > "$RUN/out/pytest-args"
rm -f "$CACHE/last-pytest-tmp.tar.gz"
echo "vm_cgroup2: booting (${ACCEL[1]}); the console is kept in $CACHE/last-console.log"
# The snapshot's writes go to TMPDIR: under the cache, removed with the run.
TMPDIR=$RUN/tmp qemu-system-x86_64 "${ACCEL[@]}" -machine q35 -m 2048 -smp 2 \
    -display none -no-reboot -serial "file:$RUN/console.log" -monitor none -nic none \
    -kernel "$CACHE/vmlinuz" -initrd "$CACHE/initrd.img" \
    -append "root=/dev/vda rw console=ttyS0 init=/sbin/baton-vm-init cgroup_no_v1=all panic=-1 quiet" \
    -drive "file=$IMAGE,format=raw,if=virtio,snapshot=on" \
    -virtfs "local,path=$SRC,mount_tag=src,security_model=none,readonly=on" \
    -virtfs "local,path=$RUN/out,mount_tag=out,security_model=none" </dev/null &
QEMU_PID=$!
tail -n +1 -F "$RUN/console.log" 2>/dev/null &
TAIL_PID=$!
deadline=$((SECONDS + TIMEOUT_S))
while kill -0 "$QEMU_PID" 2>/dev/null && [ $SECONDS -lt $deadline ]; do
    sleep 1
done
timed_out=0
kill -0 "$QEMU_PID" 2>/dev/null && timed_out=1
wait "$QEMU_PID" 2>/dev/null || true
QEMU_PID=""
sleep 0.5
kill "$TAIL_PID" 2>/dev/null || true
wait "$TAIL_PID" 2>/dev/null || true
TAIL_PID=""
[ "$timed_out" = 0 ] || { echo "vm_cgroup2: the VM ran past --timeout $TIMEOUT_S s: killed" >&2; exit 125; }
[ -f "$RUN/out/rc" ] || { echo "vm_cgroup2: the VM stopped without a pytest result" >&2; exit 125; }
[ ! -f "$RUN/out/pytest-tmp.tar.gz" ] || mv "$RUN/out/pytest-tmp.tar.gz" "$CACHE/last-pytest-tmp.tar.gz"
rc=$(cat "$RUN/out/rc")
echo "vm_cgroup2: pytest in the VM exited $rc"
exit "$rc"
}
