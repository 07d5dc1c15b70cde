"""`neon snapshot import` of a plain PostgreSQL 15 server (initdb, not a neon node) with two
absolute tablespaces: over BASE_BACKUP, from `pg_basebackup -F tar -X stream` (OID.tar beside
base.tar), from plain `pg_basebackup` output (-T mapping) and from the stopped data directory;
and of a server with an in-place tablespace over BASE_BACKUP, from plain output and from the
stopped directory (not from -F tar: a backup with a tablespace_map, which pg_basebackup -F tar
asks for, leaves in-place tablespaces out, basebackup.c sendDir). `pg create --snapshot` on the
result has the source's data (pg_dump equal, every database), and the source's tablespace
locations are never written to."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from datadir_files.pg_account import give_to_pg_user, make_pg_dir
from tests.e2e.test_pitr_faithfulness import assert_same_dumps, dump_all
from tests.e2e.test_tablespaces import files_under
from tests.neoncli import NeonCli, free_port, neon_home, psql
from tests.pgtest import PASSWORD, SUPERUSER, PgTestCluster, PgTestServer, pg_reachable_tmpdir

pytestmark = pytest.mark.slow

SOURCE_SQL = """
SET allow_in_place_tablespaces = on;
CREATE TABLESPACE ts_here LOCATION '{here}';
CREATE TABLESPACE ts_far LOCATION '{far}';
CREATE TABLE near (id int PRIMARY KEY USING INDEX TABLESPACE ts_far, t text) TABLESPACE ts_here;
INSERT INTO near SELECT g, md5(g::text) FROM generate_series(1, 3000) g;
CREATE TABLE far (id int, v int[]) TABLESPACE ts_far;
INSERT INTO far SELECT g, ARRAY[g % 7, g % 11] FROM generate_series(1, 2000) g;
CREATE INDEX far_v ON far USING gin (v) TABLESPACE ts_here;
CREATE INDEX far_id ON far USING hash (id);
CREATE DATABASE far_db TABLESPACE ts_far;
CREATE DATABASE here_db STRATEGY file_copy TABLESPACE ts_here;
VACUUM ANALYZE;  -- so autovacuum adds no _fsm/_vm file to the location while a test looks
"""


@pytest.fixture(scope="module")
def locations() -> Iterator[Path]:
    """A directory for the tablespace locations (each test server's are its own)."""
    base = pg_reachable_tmpdir("neon-ts-")
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def make_source(cluster: PgTestCluster, far: Path, here: str) -> PgTestServer:
    """A server with ts_far at `far` and ts_here at `here` ('' = in place); no writes after."""
    server = cluster.create({"checkpoint_timeout": "1h"})
    for location in (far, Path(here)) if here else (far,):
        make_pg_dir(location)
    server.psql(SOURCE_SQL.format(far=far, here=here))
    for db in ("far_db", "here_db"):
        server.psql(
            "CREATE TABLE items AS SELECT g AS id, repeat('x', g % 50) AS body "
            "FROM generate_series(1, 500) g; CREATE INDEX items_body ON items (body); VACUUM;",
            dbname=db,
        )
    return server


@pytest.fixture(scope="module")
def source(pg_cluster_module: PgTestCluster, locations: Path) -> PgTestServer:
    return make_source(pg_cluster_module, locations / "far", str(locations / "far2"))


@pytest.fixture(scope="module")
def in_place_source(pg_cluster_module: PgTestCluster, locations: Path) -> PgTestServer:
    return make_source(pg_cluster_module, locations / "far3", "")


@pytest.fixture(scope="module")
def home() -> Iterator[NeonCli]:
    yield from neon_home()


def source_far(server: PgTestServer) -> str:
    """The location of the source's ts_far."""
    return psql(
        source_conn(server),
        "SELECT pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname = 'ts_far'",
    )


def source_conn(server: PgTestServer) -> str:
    return f"host={server.sockdir} port={server.port} user={SUPERUSER} dbname=postgres"


def check_node_equals_source(neon: NeonCli, want: dict[str, str], snapshot: str) -> None:
    node = neon.json(
        "pg", "create", "--snapshot", snapshot, "-n", f"from-{snapshot}", "--port", str(free_port())
    )["pgdata"]
    conn = neon.json("pg", "show", node)["connstr"]
    try:
        assert_same_dumps(dump_all(conn), want, f"node from {snapshot}")
        locations = psql(
            conn,
            "SELECT pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname LIKE 'ts\\_%'",
        ).splitlines()
        assert len(locations) == 2 and all(loc.startswith("pg_tblspc/") for loc in locations)
        count = "SET enable_seqscan = off; SELECT count(*) FROM far WHERE v @> ARRAY[3]"
        assert psql(conn, count) == "442"
    finally:
        neon.run("pg", "destroy", "--yes", node)


def backup_dir() -> Path:
    out = Path(tempfile.mkdtemp(prefix="pgbb-", dir=pg_reachable_tmpdir("neon-bb-")))
    os.chmod(out, 0o777)
    give_to_pg_user(out)
    return out


@pytest.mark.parametrize("how", ["basebackup", "tar", "plain", "stopped"])
def test_import_with_tablespaces(
    home: NeonCli, source: PgTestServer, locations: Path, how: str
) -> None:
    import_and_check(home, source, locations, how, f"ts{how}")


@pytest.mark.parametrize("how", ["basebackup", "plain", "stopped"])
def test_import_with_an_in_place_tablespace(
    home: NeonCli, in_place_source: PgTestServer, locations: Path, how: str
) -> None:
    import_and_check(home, in_place_source, locations, how, f"inplace{how}")


def import_and_check(
    home: NeonCli, source: PgTestServer, locations: Path, how: str, name: str
) -> None:
    want = dump_all(source_conn(source))
    assert {"far_db", "here_db"} <= set(want)
    far_before = files_under(locations)
    out = backup_dir()
    try:
        if how == "basebackup":
            url = f"basebackup://{SUPERUSER}:{PASSWORD}@127.0.0.1:{source.port}/"
            home.run("snapshot", "import", f"--from={url}", name)
        elif how == "tar":
            target = out / "backup"
            source.run("pg_basebackup", "-D", str(target), "-F", "tar", "-X", "stream",
                       "-c", "fast", "-d", source.dsn())  # fmt: skip
            oids = psql(source_conn(source), "SELECT oid FROM pg_tablespace WHERE oid > 16000")
            assert (target / "base.tar").is_file()
            assert all((target / f"{oid}.tar").is_file() for oid in oids.splitlines())
            # The files come from the archives; a mapping changes the location recorded.
            mapping = f"{source_far(source)}={locations / 'recorded'}"
            home.run("snapshot", "import", "--from", str(target), name,
                     "--tablespace-mapping", mapping)  # fmt: skip
            err = home.fail("pg", "create", "--snapshot", name, "--tablespace-mapping", "/a=/b")
            assert str(locations / "recorded") in err and f"{source_far(source)}," not in err
        elif how == "plain":
            target = out / "backup"
            spaces = psql(source_conn(source), "SELECT pg_tablespace_location(oid) "
                          "FROM pg_tablespace WHERE oid > 16000").splitlines()  # fmt: skip
            mapping = [
                arg
                for i, loc in enumerate(spaces)
                if loc.startswith("/")
                for arg in ("-T", f"{loc}={out / f'copy{i}'}")
            ]
            source.run("pg_basebackup", "-D", str(target), "-F", "plain", "-X", "stream",
                       "-c", "fast", *mapping, "-d", source.dsn())  # fmt: skip
            home.run("snapshot", "import", "--from", str(target), name)
        else:
            source.stop()
            try:
                home.run("snapshot", "import", "--from", str(source.datadir), name)
            finally:
                source.start()
        assert files_under(locations) == far_before  # the source's locations are not written
        check_node_equals_source(home, want, name)
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)


def test_tar_backup_without_its_in_place_tablespace_is_refused(
    home: NeonCli, in_place_source: PgTestServer
) -> None:
    """pg_basebackup -F tar leaves an in-place tablespace out (no OID.tar, nothing in
    base.tar): the import says so and what to use instead, and no snapshot appears."""
    out = backup_dir()
    try:
        target = out / "backup"
        in_place_source.run("pg_basebackup", "-D", str(target), "-F", "tar", "-X", "stream",
                            "-c", "fast", "-d", in_place_source.dsn())  # fmt: skip
        oid = psql(source_conn(in_place_source),
                   "SELECT oid FROM pg_tablespace WHERE spcname = 'ts_here'")  # fmt: skip
        assert not (target / f"{oid}.tar").exists()
        before = home.json("snapshot", "list")
        err = home.fail("snapshot", "import", "--from", str(target), "tarinplace")
        assert f"tablespace {oid}" in err and "in-place" in err and "basebackup://" in err, err
        assert home.json("snapshot", "list") == before
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)


def test_backup_whose_wal_creates_a_tablespace_is_refused(
    home: NeonCli, pg_cluster_module: PgTestCluster, locations: Path
) -> None:
    """A CREATE TABLESPACE that ran while the backup was taken is in the WAL recovery would
    replay, which would write into the source's location: refused before recovery, by name,
    and nothing is written there."""
    server = pg_cluster_module.create({"checkpoint_timeout": "1h"})
    during = locations / "during"
    make_pg_dir(during)
    out = backup_dir()
    try:
        copy = out / "backup"
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            conn.execute("SELECT pg_backup_start('neon test', true)")
            server.psql(
                f"CREATE TABLESPACE ts_during LOCATION '{during}';"
                "CREATE TABLE t (a int) TABLESPACE ts_during; INSERT INTO t VALUES (1)"
            )
            shutil.copytree(server.datadir, copy, symlinks=True)
            row = conn.execute("SELECT labelfile FROM pg_backup_stop(false)").fetchone()
            assert row is not None
        (copy / "postmaster.pid").unlink()
        (copy / "backup_label").write_text(row[0])
        shutil.rmtree(copy / "pg_wal")
        shutil.copytree(server.datadir / "pg_wal", copy / "pg_wal")  # up to the backup's end
        before = files_under(during)
        err = home.fail("snapshot", "import", "--from", str(copy), "during")
        assert "creates tablespace" in err and f"at {during}" in err, err
        assert "take the backup again" in err
        assert files_under(during) == before
        assert "during" not in {s["name"] for s in home.json("snapshot", "list")}
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)


def test_import_of_a_backup_whose_tablespace_moved(
    home: NeonCli, source: PgTestServer, locations: Path
) -> None:
    """Plain pg_basebackup output whose tablespace directory was moved away from where its
    pg_tblspc link points: refused naming the location and --tablespace-mapping, which reads
    it from NEW and records NEW as its location."""
    want = dump_all(source_conn(source))
    out = backup_dir()
    try:
        target = out / "backup"
        spaces = psql(source_conn(source), "SELECT pg_tablespace_location(oid) "
                      "FROM pg_tablespace WHERE oid > 16000 ORDER BY 1").splitlines()  # fmt: skip
        copies = [out / f"copy{i}" for i in range(len(spaces))]
        mapping = [a for loc, c in zip(spaces, copies, strict=True) for a in ("-T", f"{loc}={c}")]
        source.run("pg_basebackup", "-D", str(target), "-F", "plain", "-X", "stream",
                   "-c", "fast", *mapping, "-d", source.dsn())  # fmt: skip
        moved = out / "moved=0"  # an '=' in a path: written '\=' in a mapping
        copies[0].rename(moved)
        err = home.fail("snapshot", "import", "--from", str(target), "tsmoved")
        assert f"is at {copies[0]}, which does not exist" in err, err
        assert f"--tablespace-mapping {copies[0]}=DIR" in err
        err = home.fail("snapshot", "import", "--from", str(target), "tsmoved",
                        "--tablespace-mapping", f"{out / 'nothere'}=/x")  # fmt: skip
        assert f"{out / 'nothere'} is not a tablespace location of {target}" in err, err

        escaped = str(moved).replace("=", "\\=")
        home.run("snapshot", "import", "--from", str(target), "tsmoved",
                 "--tablespace-mapping", f"{copies[0]}={escaped}")  # fmt: skip
        check_node_equals_source(home, want, "tsmoved")
        # The history records NEW as the location (OLD is unknown to it).
        err = home.fail("pg", "create", "--snapshot", "tsmoved", "--tablespace-mapping", "/a=/b")
        assert f"its absolute tablespace locations: {copies[1]}, {moved})" in err, err
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
