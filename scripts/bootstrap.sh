#!/usr/bin/env bash
# Sets up everything Baton needs on a fresh Debian machine: Debian packages,
# a virtual environment in .venv, and the project with its test extras.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v minisign >/dev/null 2>&1 || need_apt+=(minisign)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
command -v unshare >/dev/null 2>&1 || need_apt+=(util-linux)
command -v faketime >/dev/null 2>&1 || need_apt+=(faketime)  # the doctor's clock tests: a process whose clock is years off
ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || need_apt+=(postgresql)  # the tests' real PostgreSQL
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)  # the web page's test: a real headless browser
command -v chromedriver >/dev/null 2>&1 || need_apt+=(chromium-driver)
if [ ${#need_apt[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        echo "bootstrap: installing Debian packages: ${need_apt[*]}"
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
    else
        echo "bootstrap: missing ${need_apt[*]}; run as root or install them" >&2
    fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "bootstrap: creating .venv"
    "$PY" -m venv .venv
fi
stamp=.venv/.baton-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "bootstrap: installing baton[test] into .venv"
    .venv/bin/python -m pip install -q --upgrade pip
    # compat: a plain path entry; the default editable finder costs every Python process here ~8 ms of start-up
    # (a release has neither). setuptools calls the mode transitional: without it, the default still works.
    .venv/bin/python -m pip install -q -e '.[test]' --config-settings editable_mode=compat 2>/dev/null ||
        .venv/bin/python -m pip install -q -e '.[test]'
    touch "$stamp"
fi
