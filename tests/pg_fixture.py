"""A real PostgreSQL for the tests: one private cluster per session, a fresh database per test.

As /work/shared/POSTGRES.md and docs/manager.md describe: ``initdb`` into a directory of its own
(``mktemp -d``, owned by the ``postgres`` system user, since the server refuses to run as root), ``pg_ctl``
with a Unix socket in that directory and no TCP port, stopped and removed at the end of the session even
when tests fail. ``pg_url`` gives each test ``postgresql://baton@/DB?host=DIR``, a database created from
``template0``.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


class PgCluster:
    """``fsync=False`` (the tests): no flush to disk at each commit. The benchmarks ask for PostgreSQL's
    default (``fsync=True``) where a commit's cost is what they measure."""

    def __init__(self, fsync: bool = False, password: str = "") -> None:
        if not PG_BIN_DIRS:
            raise RuntimeError("PostgreSQL is not installed (/usr/lib/postgresql/*/bin): run scripts/bootstrap.sh")
        self.bin = PG_BIN_DIRS[0]
        self.dir = Path(tempfile.mkdtemp(prefix="baton-pg-"))
        shutil.chown(self.dir, "postgres")
        self.data = self.dir / "data"
        self._counter = itertools.count(1)
        self.fsync = fsync
        self.password = password  # set: the role ``baton`` must give it (scram-sha-256), else trust

    def _as_postgres(self, *argv: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *argv], check=True, capture_output=True, timeout=60)

    def start(self) -> PgCluster:
        auth = ["-A", "trust"]
        if self.password:
            pwfile = self.dir / "pwfile"
            pwfile.write_text(self.password + "\n")
            shutil.chown(pwfile, "postgres")
            auth = ["-A", "scram-sha-256", "--pwfile", str(pwfile)]
        self._as_postgres(str(self.bin / "initdb"), "-D", str(self.data), *auth, "-U", "baton")
        self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o",
                          f"-k {self.dir} -c listen_addresses='' -c fsync={'on' if self.fsync else 'off'} "
                          "-c max_connections=200",
                          "-l", str(self.dir / "log"), "-w", "start")
        return self

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def postmaster_pid(self) -> int:
        """The server's main process (its backends are its children), 0 when it is not running."""
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return 0

    def url(self, db: str) -> str:
        return f"postgresql://baton@/{db}?host={self.dir}"

    def new_database(self) -> str:
        import psycopg

        name = f"t{os.getpid()}_{next(self._counter)}"
        with psycopg.connect(self.url("postgres"), autocommit=True, password=self.password or None) as conn:
            conn.execute(f"CREATE DATABASE {name} TEMPLATE template0".encode())
        return self.url(name)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    cluster = PgCluster()
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> str:
    """A fresh, empty database on the session's cluster."""
    return pg_cluster.new_database()
