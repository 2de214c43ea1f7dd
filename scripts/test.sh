#!/usr/bin/env bash
# The README's test command: set-up, lint, type check, then the tests.
#   bash scripts/test.sh           the full suite (what CI runs), in one process unless BATON_TEST_WORKERS says
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
    # BATON_TEST_WORKERS=4: pytest-xdist workers (most end-to-end tests wait on processes, so more workers than
    # cores pay: about 8 minutes against 16-25). Serial by default until the suite passes on workers every time
    # (README, "The two commands").
    echo "== pytest (full suite, ${BATON_TEST_WORKERS:-0} workers)"
    pytest -p no:cacheprovider -n "${BATON_TEST_WORKERS:-0}" --dist loadgroup "$@"
fi
