"""``python -m supervisor``: the command line (supervisor/cli.py); ``supervisor run`` first imports asyncio lean."""

import sys


def import_asyncio_without_ssl() -> None:
    """Import asyncio with Python's ssl hidden, so that the daemon does not map OpenSSL (about 4 MiB resident).

    asyncio imports ssl eagerly, for TLS the daemon never asks of it: its TLS is gRPC's own (BoringSSL, in
    grpcio), and its front relays bytes. asyncio takes the failed import as "no ssl" and supports no TLS in
    this process; ssl itself stays importable for whatever needs it later (prometheus_client, with [metrics]).
    """
    if "ssl" in sys.modules or "asyncio" in sys.modules:
        return  # too late, or loaded by the environment: leave both as they are
    sys.modules["ssl"] = None  # type: ignore[assignment]  # None in sys.modules: `import ssl` raises ImportError
    try:
        import asyncio  # noqa: F401
    finally:
        del sys.modules["ssl"]


if sys.argv[1:2] == ["run"]:
    import_asyncio_without_ssl()

from supervisor.cli import main  # noqa: E402

sys.exit(main())
