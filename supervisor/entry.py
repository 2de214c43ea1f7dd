"""The ``supervisor`` command's entry point, for every way it starts: the console script, a release's
``bin/supervisor`` launcher and ``python -m supervisor``.

``supervisor run`` first imports asyncio with Python's ssl hidden, so the daemon does not map OpenSSL: asyncio
imports ssl eagerly, for TLS the daemon never asks of it (its TLS is gRPC's own, BoringSSL in grpcio, and its
front relays bytes). asyncio takes the failed import as "no ssl"; ssl itself stays importable for whatever needs
it later (prometheus_client, with [metrics]). Tested by tests/test_startup_rules.py; what it saves is in
docs/benchmarks.md, "Start-up rules and their history".
"""

from __future__ import annotations

import sys


def import_asyncio_without_ssl() -> None:
    if "ssl" in sys.modules or "asyncio" in sys.modules:
        return  # too late, or loaded by the environment: leave both as they are
    sys.modules["ssl"] = None  # type: ignore[assignment]  # None in sys.modules: `import ssl` raises ImportError
    try:
        import asyncio  # noqa: F401
    finally:
        del sys.modules["ssl"]


if sys.argv[1:2] == ["run"]:  # at import: a release's launcher reports a failed import of what follows
    import_asyncio_without_ssl()

from supervisor.cli.main import main  # noqa: E402  (after asyncio, above)

__all__ = ["import_asyncio_without_ssl", "main"]
