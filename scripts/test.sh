#!/usr/bin/env bash
# The README's test command: set-up, lint, type check, then the tests.
#   bash scripts/test.sh           the full suite (what CI runs), on BATON_TEST_WORKERS workers (4; 0: one process)
#   bash scripts/test.sh --fast    only the tests that start no process (pytest -m "not e2e"), about half a minute
# Further arguments go to pytest (a file, -k, -x ...). BATON_TEST_WORKERS sets the full suite's worker count.
set -euo pipefail
cd "$(dirname "$0")/.."
fast=0
if [ "${1:-}" = "--fast" ]; then
    fast=1
    shift
fi
bash scripts/bootstrap.sh
. .venv/bin/activate
echo "== ruff"
ruff check baton supervisor helper manager scripts tests
echo "== mypy"
mypy
# A short base directory: the tests bind Unix sockets below it (sun_path holds 107 bytes), and pytest's default
# (/tmp/pytest-of-root/pytest-N) with a worker's popen-gwN/ put some of them past it.
base=()
case " $* " in *" --basetemp"*) ;; *) base=(--basetemp "$(mktemp -d /tmp/bt.XXXXXX)") ;; esac
if [ "$fast" = 1 ]; then
    echo "== pytest (fast tier: not e2e)"
    pytest -p no:cacheprovider "${base[@]}" -m "not e2e" "$@"
else
    # pytest-xdist workers: most end-to-end tests wait on processes, so more workers than cores pay (README,
    # "The two commands").
    workers="${BATON_TEST_WORKERS:-4}"
    echo "== pytest (full suite, $workers workers)"
    pytest -p no:cacheprovider "${base[@]}" -n "$workers" --dist loadgroup "$@"
fi
