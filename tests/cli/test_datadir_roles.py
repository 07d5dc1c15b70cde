"""The bootstrap superuser read from a data directory's pg_authid (cli/datadir_roles.py)."""

from __future__ import annotations

from pathlib import Path

from cli.datadir_roles import bootstrap_superuser
from tests.pgtest import SUPERUSER, PgTestCluster


def test_initdb_superuser_and_after_rename_and_vacuum_full(pg_cluster: PgTestCluster) -> None:
    server = pg_cluster.create()
    assert bootstrap_superuser(server.datadir) == SUPERUSER  # read while it runs: same files
    # A renamed bootstrap superuser is a new row version; VACUUM FULL moves pg_authid to a
    # new relfilenode (found through global/pg_filenode.map).
    server.psql("CREATE ROLE tmp SUPERUSER LOGIN")
    for sql in (f"ALTER ROLE {SUPERUSER} RENAME TO boss", "VACUUM FULL pg_authid", "CHECKPOINT"):
        server.run("psql", "-U", "tmp", "-d", "postgres", "-c", sql)
    assert bootstrap_superuser(server.datadir) == "boss"


def test_unreadable_directory_gives_none(tmp_path: Path) -> None:
    assert bootstrap_superuser(tmp_path) is None
    (tmp_path / "global").mkdir()
    (tmp_path / "global" / "pg_filenode.map").write_bytes(b"junk")
    assert bootstrap_superuser(tmp_path) is None
