"""The fast tier's fence (tests/process_guard.py), run on small test files in this interpreter (pytester's
in-process run): a test not marked e2e that starts a process fails, naming the mark; a marked one runs."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

CONFTEST = "from tests.process_guard import pytest_runtest_call, pytest_runtest_setup  # noqa: F401\n"


def run(pytester: pytest.Pytester, body: str) -> pytest.RunResult:
    pytester.makeconftest(CONFTEST)
    pytester.makeini("[pytest]\nmarkers = e2e: starts a process\n")
    pytester.makepyfile(test_tier="import asyncio, os, subprocess\nimport pytest\n\n" + body)
    return pytester.runpytest_inprocess("-p", "no:cacheprovider")


@pytest.mark.parametrize("start", [
    "subprocess.run(['true'])",
    "asyncio.run(asyncio.create_subprocess_exec('true'))",
    "os.posix_spawn('/bin/true', ['true'], {})",
    "os.fork()",
])
def test_an_unmarked_test_that_starts_a_process_fails_naming_the_e2e_mark(pytester: pytest.Pytester, start: str):
    result = run(pytester, f"def test_starts():\n    {start}\n")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*test_starts started a process (*) but is not marked e2e*"])


def test_a_process_start_swallowed_by_a_broad_except_still_fails_the_test(pytester: pytest.Pytester):
    result = run(pytester, "import threading\n\ndef test_hides():\n"
                           "    t = threading.Thread(target=lambda: subprocess.run(['true']))\n"
                           "    t.start(); t.join()\n")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*test_hides tried to start a process (subprocess.Popen) but is not marked e2e*"])


def test_a_fixture_that_starts_a_process_for_an_unmarked_test_fails_it(pytester: pytest.Pytester):
    result = run(pytester, "@pytest.fixture(scope='session')\ndef server():\n    return subprocess.Popen(['true'])\n\n"
                           "def test_uses(server):\n    pass\n")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*test_uses started a process (subprocess.Popen) but is not marked e2e*"])


@pytest.mark.e2e  # its inner marked test starts a real process in this interpreter
def test_a_test_marked_e2e_may_start_a_process_and_the_next_unmarked_one_may_not(pytester: pytest.Pytester):
    result = run(pytester, "@pytest.mark.e2e\ndef test_marked():\n"
                           "    assert subprocess.run(['true']).returncode == 0\n\n"
                           "def test_after():\n    subprocess.run(['true'])\n")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*test_after started a process*"])

