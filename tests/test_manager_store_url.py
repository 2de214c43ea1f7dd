"""``--db`` takes a SQLite path, ``sqlite:///PATH`` or a ``postgresql://`` URL and nothing else, never shows a
password, and takes the password from outside the command line: ``--db-password-file``, or libpq's own
``PGPASSWORD`` and ``PGPASSFILE``. The PostgreSQL here requires the password (scram-sha-256), so a Manager that
works has used it.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import PY, ROOT
from tests.manager_fixtures import make_manager_fixture  # noqa: F401  (the make_manager fixture)
from tests.pg_fixture import PgCluster

pytestmark = pytest.mark.e2e  # every test here starts a process

SECRET = "s3cret-Pa55"


@pytest.fixture(scope="module")
def locked_cluster() -> Iterator[PgCluster]:
    cluster = PgCluster(password=SECRET)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture
def locked_url(locked_cluster: PgCluster) -> str:
    """A fresh database whose role must give SECRET; the URL carries no password."""
    return locked_cluster.new_database()


def manager(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "BATON_MANAGER"))}
    return subprocess.run([PY, "-m", "manager", *args], capture_output=True, text=True, cwd=cwd, timeout=60,
                          env={**environ, "PYTHONPATH": str(ROOT), **(env or {})})


def password_file(tmp_path: Path, mode: int = 0o600) -> Path:
    f = tmp_path / "db-password"
    f.write_text(SECRET + "\n")
    f.chmod(mode)
    return f


@pytest.mark.parametrize("dsn", [f"host=/tmp dbname=baton user=baton password={SECRET}",
                                 f"  dbname=baton password='{SECRET}'"])
def test_a_libpq_keyword_string_is_refused_without_its_password_and_creates_no_file(tmp_path, dsn):
    for args in (("nodes", "--db", dsn), ("serve", "--db", dsn, "--listen", "127.0.0.1:1", "--insecure-loopback")):
        res = manager(tmp_path, *args)
        assert res.returncode == 2
        assert res.stderr.strip().splitlines() == [
            "baton-manager: --db looks like a libpq keyword string (KEY=VALUE ...), which this Manager does not "
            "read: give postgresql://USER@HOST/DB (the password by PGPASSWORD, ~/.pgpass or --db-password-file)"]
        assert SECRET not in res.stdout + res.stderr
    assert list(tmp_path.iterdir()) == [], "no SQLite file named after the string"


@pytest.mark.parametrize("form", ["sqlite:m.db", "sqlite://m.db", "mysql://baton@db/baton"])
def test_an_unknown_database_string_is_refused_with_one_line_and_creates_no_file(tmp_path, form):
    res = manager(tmp_path, "nodes", "--db", form)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert res.stderr.startswith(f"baton-manager: {form}: ")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("spelling", [f"postgresql://baton:{SECRET}@/nodb?host={{dir}}",
                                      f"postgresql://baton@/nodb?host={{dir}}&password={SECRET}",
                                      f"postgres://baton@/nodb?password={SECRET}&host={{dir}}"])
def test_a_password_in_the_url_is_redacted_in_errors(tmp_path, locked_cluster, spelling):
    res = manager(tmp_path, "nodes", "--db", spelling.format(dir=locked_cluster.dir))
    assert res.returncode == 2 and "cannot open the database" in res.stderr and "***" in res.stderr
    assert SECRET not in res.stdout + res.stderr


def test_a_password_in_the_url_query_is_redacted_in_the_log(make_manager, locked_url):
    m = make_manager(db=f"{locked_url}&password={SECRET}")
    assert m.cli("nodes").returncode == 0
    m.stop()
    assert "password=***" in m.output()
    assert SECRET not in m.output()


def test_the_password_from_a_file_is_used_and_not_in_proc_cmdline(make_manager, locked_url, tmp_path):
    refused = manager(tmp_path, "nodes", "--db", locked_url)
    assert refused.returncode == 2 and "password" in refused.stderr, "the database does require the password"
    m = make_manager(db=locked_url, args=("--db-password-file", str(password_file(tmp_path))))
    assert m.proc is not None
    cmdline = Path(f"/proc/{m.proc.pid}/cmdline").read_bytes()
    assert b"--db-password-file" in cmdline and SECRET.encode() not in cmdline
    assert SECRET not in m.output()
    listed = manager(tmp_path, "nodes", "--db", locked_url, env={"BATON_MANAGER_DB_PASSWORD_FILE":
                                                                 str(tmp_path / "db-password")})
    assert listed.returncode == 0, listed.stderr


@pytest.mark.parametrize("how", ["PGPASSWORD", "PGPASSFILE"])
def test_libpq_password_conventions_work_and_keep_the_password_off_the_command_line(tmp_path, locked_cluster,
                                                                                    locked_url, how):
    if how == "PGPASSWORD":
        env = {"PGPASSWORD": SECRET}
    else:
        pgpass = tmp_path / "pgpass"
        pgpass.write_text(f"*:*:*:baton:{SECRET}\n")
        pgpass.chmod(0o600)
        env = {"PGPASSFILE": str(pgpass)}
    proc = subprocess.Popen([PY, "-m", "manager", "nodes", "--db", locked_url], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert SECRET.encode() not in cmdline and SECRET not in out + err


def test_a_password_file_others_may_read_is_refused_and_opens_nothing(tmp_path, locked_url):
    res = manager(tmp_path, "nodes", "--db", locked_url, "--db-password-file", str(password_file(tmp_path, 0o644)))
    assert (res.returncode, res.stderr.strip().splitlines()) == (2, [
        f"baton-manager: --db-password-file {tmp_path / 'db-password'}: group or others may read it (mode 0644); "
        "chmod 600 it"])
    assert SECRET not in res.stderr


def test_a_password_both_in_the_url_and_in_a_file_is_refused(tmp_path, locked_url):
    res = manager(tmp_path, "nodes", "--db", f"{locked_url}&password=Xyzzy-9", "--db-password-file",
                  str(password_file(tmp_path)))
    assert (res.returncode, res.stderr.strip().splitlines()) == (2, [
        f"baton-manager: --db {locked_url}&password=*** has a password and --db-password-file gives another: "
        "give it once"])
