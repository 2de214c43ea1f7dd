"""supervisor/libc.py: the libc calls the daemon makes through ctypes, each in a fresh process."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import PY, ROOT

pytestmark = pytest.mark.e2e  # every test here starts a process


def run(code: str) -> str:
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_trim_heap_gives_freed_memory_in_the_middle_of_the_heap_back():
    """free() returns only the heap's top; what a burst freed below a block still in use stays resident
    until malloc_trim."""
    out = run(
        "from supervisor.libc import trim_heap\n"
        "def anon():\n"
        "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('RssAnon'))\n"
        "burst = [bytes(1000) + bytes([i % 256]) for i in range(100_000)]\n"  # ~100 MB through malloc
        "kept = burst[-1]\n"
        "del burst\n"
        "before = anon()\n"
        "trim_heap()\n"
        "print(before - anon())\n")
    assert int(out) > 50 * 1024, f"only {out} KiB given back"


def test_set_child_subreaper_makes_this_process_the_reaper_of_its_orphans():
    out = run(
        "import ctypes\n"
        "from supervisor.libc import libc, set_child_subreaper\n"
        "assert set_child_subreaper() is None\n"
        "v = ctypes.c_int(0)\n"
        "libc().prctl(37, ctypes.byref(v), 0, 0, 0)\n"  # PR_GET_CHILD_SUBREAPER
        "print(v.value)\n")
    assert out == "1"
