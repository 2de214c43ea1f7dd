#!/usr/bin/env bash
# The README's test command: set-up, lint, type check, then the tests.
#   bash scripts/test.sh           the full suite on pytest-xdist workers (what CI runs)
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
if [ "$fast" = 1 ]; then
    echo "== pytest (fast tier: not e2e)"
    pytest -p no:cacheprovider -m "not e2e" "$@"
else
    # Most end-to-end tests wait on processes, not the CPU: more workers than cores pay (docs in README).
    echo "== pytest (full suite, ${BATON_TEST_WORKERS:-4} workers)"
    pytest -p no:cacheprovider -n "${BATON_TEST_WORKERS:-4}" --dist loadgroup "$@"
fi
