"""The import source URL: basebackup://USER[:PASSWORD]@HOST[:PORT][/], its password from the
URL, PGPASSWORD or a .pgpass file (as libpq reads it), and clear refusals that never show the
password."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.snapshot_import import ServerSource, cut_wal_after, parse_server_url, pgpass_lookup
from proto.errors import InvalidArgument
from tests.pgtest import PgTestCluster


@pytest.fixture(autouse=True)
def no_ambient_password(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "absent.pgpass"))


def test_url_forms() -> None:
    assert parse_server_url("basebackup://rep:p%40ss@127.0.0.1:5433/") == ServerSource(
        "rep", "127.0.0.1", 5433, "p@ss"
    )
    assert parse_server_url("basebackup://rep@127.0.0.1") == ServerSource(
        "rep", "127.0.0.1", 5432, None
    )
    assert parse_server_url("basebackup://rep:pw@[::1]:6000/").host == "::1"


@pytest.mark.parametrize(
    "url, why",
    [
        ("basebackup://127.0.0.1:5432/", "expected basebackup://USER"),
        ("postgres://rep:secret@127.0.0.1/", "expected basebackup://USER"),
        ("basebackup://rep:secret@127.0.0.1:port/", "Port could not be cast"),
        ("basebackup://rep:secret@127.0.0.1:99999/", "out of range"),
        ("basebackup://rep:secret@127.0.0.1/db", "nothing may follow"),
        ("basebackup://rep:secret@127.0.0.1/?sslmode=disable", "nothing may follow"),
        ("basebackup://rep:secret@/", "expected basebackup://USER"),
    ],
)
def test_malformed_urls_are_refused_without_the_password(url: str, why: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_server_url(url)
    assert why in err.value.message
    assert "secret" not in err.value.message


def test_password_from_environment_then_pgpass(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    passfile = tmp_path / "pgpass"
    passfile.write_text(
        "# comment\n"
        "127.0.0.1:5432:postgres:rep:not-for-replication\n"
        "127.0.0.1:5432:replication:other:wrong-user\n"
        "127.0.0.1:5432:replication:rep:a\\:b\\\\c\n"
        "*:*:*:rep:wildcard\n"
    )
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    assert parse_server_url("basebackup://rep@127.0.0.1/").password == "a:b\\c"
    assert pgpass_lookup("127.0.0.1", 6000, "rep") == "wildcard"
    assert pgpass_lookup("127.0.0.1", 6000, "nobody") is None
    monkeypatch.setenv("PGPASSWORD", "from-env")
    assert parse_server_url("basebackup://rep@127.0.0.1/").password == "from-env"
    assert parse_server_url("basebackup://rep:url@127.0.0.1/").password == "url"


def test_wal_after_the_end_lsn_is_zeroed(pg_cluster: PgTestCluster) -> None:
    """Recovery must stop at the backup's end LSN: what follows it in its segment goes."""
    pgdata = pg_cluster.create(start=False).datadir  # a real pg_control (16 MiB segments)
    segment = 16 << 20
    wal = pgdata / "pg_wal" / "000000010000000000000003"
    wal.write_bytes(b"\xff" * segment)
    cut_wal_after(pgdata, 3 * segment + 0x1238, 1)
    data = wal.read_bytes()
    assert data[:0x1238] == b"\xff" * 0x1238
    assert data[0x1238:] == bytes(segment - 0x1238)
