"""Start-up rules that comments state, each a test that fails when the rule is broken.

A rule names a module that must not be imported by a process at start (or on an
agent update's path), and the comment that states it; docs/benchmarks.md,
"Start-up rules and their history", has what each costs. The supervisor's rules
are checked on a real one, serving, with ``PYTHONPROFILEIMPORTTIME`` on: every
module it imported from its first line until it answered is in its output.
OpenSSL through ``ssl`` (supervisor/entry.py) and the extension modules are
checked on the process's memory maps instead:
tests/test_supervisor.py::test_a_running_supervisor_has_not_loaded_what_it_needs_only_now_and_then and
tests/test_release.py::test_a_supervisor_started_by_a_release_launcher_maps_no_openssl.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator

import pytest

from tests.conftest import PY, ROOT, ProcessReaper, agent, supervisors_in

pytestmark = pytest.mark.e2e  # every test here starts a process

IMPORT_LINE = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)\s*$")


@pytest.fixture(scope="module")
def supervisor_imports(tmp_path_factory: pytest.TempPathFactory) -> Iterator[frozenset[str]]:
    """Every module a supervisor with one agent imported until it served a GetStatus."""
    reaper = ProcessReaper()
    try:
        with supervisors_in(tmp_path_factory.mktemp("startup-rules"), reaper) as make:
            sup = make([agent("web", "ready_agent.py", notify=True)])
            sup.start(env={"PYTHONPROFILEIMPORTTIME": "1"})
            sup.wait_agent("web", "running")
            sup.status()
            text = sup.stdout_path.read_text(errors="replace")
        modules = frozenset(m[1] for m in map(IMPORT_LINE.match, text.splitlines()) if m)
        assert "supervisor.daemon" in modules, text[-3000:]  # the profile is there at all
        yield modules
    finally:
        reaper.kill_all()


# (module, where the rule is written): what a supervisor that has not been updated must not have imported.
# Not ssl: the profile lists asyncio's attempt that entry.py makes fail (the memory-map tests above check it).
SUPERVISOR_RULES = [
    pytest.param("aiofiles", "supervisor/updates.py, baton/rotating_log.py: at the first read or tail",
                 id="aiofiles-at-first-read"),
    pytest.param("baton.admission", "supervisor/updates.py: when an update comes (signature code and hashlib)",
                 id="admission-when-an-update-comes"),
    pytest.param("baton.signing", "baton/config.py trusted_keys_problem: only when trusted keys are configured",
                 id="signing-only-with-trusted-keys"),
    pytest.param("psutil", "supervisor/updates.py: only for a journaled helper pid or a cancel",
                 id="psutil-only-for-an-update"),
    pytest.param("secrets", "supervisor/audit.py: os.urandom, not secrets (hashlib and OpenSSL's digests)",
                 id="no-secrets-module"),
    pytest.param("supervisor.cli.ctl", "supervisor/cli/main.py: the operator client, not kept by `run`",
                 id="ctl-not-kept-by-run"),
    pytest.param("manager.build.release", "baton/layout.py: the release builder (and cryptography) not for two names",
                 id="release-builder-not-in-the-daemon"),
    pytest.param("importlib.metadata", "manager/build/release.py: building a release only",
                 id="importlib-metadata-for-builds-only"),
    pytest.param("prometheus_client", "supervisor/daemon.py: only when [metrics] is configured",
                 id="metrics-only-when-configured"),
]


@pytest.mark.parametrize(("module", "rule"), SUPERVISOR_RULES)
def test_a_serving_supervisor_has_not_imported_what_it_needs_only_later(
    supervisor_imports: frozenset[str], module: str, rule: str
) -> None:
    assert module not in supervisor_imports, f"{module} imported at start, against the rule in {rule}"


def _imports_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``code``."""
    out = subprocess.run([PY, "-c", f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_an_agent_updates_helper_imports_neither_grpc_nor_protobuf() -> None:
    """helper/wiring.py `supervisor_client`, baton/agent_channel.py: the helper speaks the agent channel, not gRPC (a
    third of its imports): what `helper apply` loads, the supervisor's client included, pulls in neither."""
    loaded = _imports_after("import helper.cli, helper.wiring\n"
                            "from baton.journal import Journal\n"
                            "import helper.locks, helper.machine, helper.installer, helper.download\n"
                            "helper.wiring.supervisor_client(__import__('pathlib').Path('/nonexistent.sock'))()")
    assert "helper.control" in loaded
    assert not {m for m in loaded if m == "grpc" or m.startswith(("grpc.", "google.protobuf"))}


def test_helper_apply_loads_the_update_path_with_the_collector_off_and_freezes_it() -> None:
    """baton/startup.py and helper/cli.py `cmd_apply`: what an update loads is frozen (``gc.freeze``), never walked
    by the collector again; tests/test_helper_cli.py specifies ``loading()`` itself."""
    code = ("import gc, helper.cli\n"
            "try:\n"
            "    helper.cli.main(['apply', '--update-id', 'u1', '--config', '/nonexistent/supervisor.toml'])\n"
            "except SystemExit:\n"
            "    pass\n"
            "import sys\n"
            "print(gc.get_freeze_count(), 'helper.machine' in sys.modules)\n")
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    frozen, loaded = out.stdout.split()
    assert loaded == "True", out.stderr
    assert int(frozen) > 1000, out.stderr


def test_supervisor_run_imports_asyncio_with_ssl_hidden_and_ssl_stays_importable() -> None:
    """supervisor/entry.py: asyncio would import ssl eagerly, for TLS the daemon never asks of it; hidden, the
    daemon maps no OpenSSL, and whatever needs ssl later (prometheus_client, with [metrics]) still imports it."""
    code = ("import sys\nsys.argv = ['supervisor', 'run']\nimport supervisor.entry\n"
            "print('ssl' in sys.modules, 'asyncio' in sys.modules)\nimport ssl\nprint(ssl.OPENSSL_VERSION != '')")
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True", "True"]
