#!/usr/bin/env bash
# The README's demo command: set-up, then a supervisor with sample agents in a temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m supervisor demo "$@"
