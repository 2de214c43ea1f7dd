#!/usr/bin/env bash
# The README's test command: set-up, lint, type check, then the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
. .venv/bin/activate
echo "== ruff"
ruff check baton supervisor helper manager scripts tests
echo "== mypy"
mypy
echo "== pytest"
pytest -p no:cacheprovider "$@"
