"""Non-default tablespaces through the real CLI: a node with an in-place and an absolute
tablespace (tables, indexes, databases whose default tablespace they are). `snapshot start`,
`pg create --snapshot`, `pg checkout` and `pitr extract-snapshot` give the node's pg_dump at
that point. A new data directory has every tablespace in place and never writes to the
absolute location; a checkout puts the node's own absolute tablespace back at its location.
DROP TABLESPACE, then extraction before and after it."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from datadir_files.pg_account import make_pg_dir
from pg15.datadir_layout import parse_relation_file_name
from tests.e2e.test_pitr_faithfulness import assert_same_dumps, dump_all
from tests.neoncli import NeonCli, free_port, psql
from tests.pgtest import pg_reachable_tmpdir

pytestmark = pytest.mark.slow

# No sequences: the WAL holds sequence values ahead of the live server, which would make a
# snapshot's dump differ from the live one for a reason that has nothing to do with tablespaces.
WORKLOAD = """
SET allow_in_place_tablespaces = on;
CREATE TABLESPACE ts_here LOCATION '';
CREATE TABLESPACE ts_far LOCATION '{far}';
CREATE TABLE near (id int PRIMARY KEY, t text) TABLESPACE ts_here;
INSERT INTO near SELECT g, md5(g::text) FROM generate_series(1, 3000) g;
CREATE INDEX near_t ON near (t) TABLESPACE ts_far;
CREATE TABLE far (id int, v int[]) TABLESPACE ts_far;
INSERT INTO far SELECT g, ARRAY[g % 7, g % 11] FROM generate_series(1, 2000) g;
CREATE INDEX far_v ON far USING gin (v) TABLESPACE ts_here;
ALTER TABLE far ADD PRIMARY KEY (id) USING INDEX TABLESPACE ts_far;
CREATE TABLE moved AS SELECT g AS id FROM generate_series(1, 700) g;
ALTER TABLE moved SET TABLESPACE ts_far;
CREATE DATABASE far_db TABLESPACE ts_far;
CREATE DATABASE here_db STRATEGY file_copy TABLESPACE ts_here;
VACUUM ANALYZE;  -- so autovacuum adds no _fsm/_vm file to a location while a test looks at it
"""

PER_DB = """
CREATE TABLE items AS SELECT g AS id, repeat('x', g % 50) AS body FROM generate_series(1, 500) g;
CREATE INDEX items_body ON items (body);
"""


@pytest.fixture
def far() -> Iterator[Path]:
    """An empty directory of PostgreSQL's OS user for an absolute LOCATION."""
    base = pg_reachable_tmpdir("neon-ts-")
    path = base / "far"
    make_pg_dir(path)
    try:
        yield path
    finally:
        shutil.rmtree(base, ignore_errors=True)


def connstr(neon: NeonCli, node: str) -> str:
    return str(neon.json("pg", "show", node)["connstr"])


def populate(conn: str, far: Path) -> None:
    psql(conn, WORKLOAD.format(far=far))
    for db in ("far_db", "here_db"):
        psql(conn, PER_DB, db)


def files_under(path: Path) -> dict[str, int]:
    """The relation files under a location and their sizes (pg_internal.init comes and goes
    with connections, so it is not compared)."""
    return {
        str(p.relative_to(path)): p.stat().st_size
        for p in path.rglob("*")
        if p.is_file() and parse_relation_file_name(p.name) is not None
    }


def tablespace_locations(conn: str) -> dict[str, str]:
    rows = psql(
        conn,
        "SELECT spcname, pg_tablespace_location(oid) FROM pg_tablespace "
        "WHERE spcname LIKE 'ts\\_%' ORDER BY 1",
    )
    return dict(line.split("|") for line in rows.splitlines())


def in_place(conn: str) -> None:
    """Every tablespace of a server on a rebuilt data directory is in place (pg_tblspc/OID)."""
    for name, location in tablespace_locations(conn).items():
        assert location.startswith("pg_tblspc/"), (name, location)


def test_snapshot_start_create_and_checkout_with_tablespaces(neon: NeonCli, far: Path) -> None:
    neon.run("pg", "create", "--port", str(free_port()))
    conn = connstr(neon, "pgdata1")
    neon.run("snapshot", "create", "pgdata1@bare")
    bare = dump_all(conn)
    populate(conn, far)
    assert tablespace_locations(conn)["ts_far"] == str(far)
    want = dump_all(conn)
    assert {"far_db", "here_db"} <= set(want) and "default_tablespace = ts_far" in want["postgres"]
    neon.run("snapshot", "create", "pgdata1@ts")
    psql(conn, "INSERT INTO far SELECT g, '{1}' FROM generate_series(5001, 5100) g")
    psql(conn, "CREATE TABLE later (x int) TABLESPACE ts_here; INSERT INTO later VALUES (1)")
    far_files = files_under(far)

    ro = neon.json("snapshot", "start", "pgdata1@ts")["connstr"]
    try:
        assert_same_dumps(dump_all(ro), want, "snapshot start")
        in_place(ro)
        assert psql(ro, "SELECT count(*) FROM far WHERE v @> '{3}'") == "442"
    finally:
        neon.run("snapshot", "stop", "pgdata1@ts")

    copy = neon.json("pg", "create", "--snapshot", "pgdata1@ts", "-n", "tscopy",
                     "--port", str(free_port()))["pgdata"]  # fmt: skip
    try:
        copy_conn = connstr(neon, copy)
        assert_same_dumps(dump_all(copy_conn), want, "pg create --snapshot")
        in_place(copy_conn)
        psql(
            copy_conn, "INSERT INTO far VALUES (-1, '{}'); CREATE TABLE n (x int) TABLESPACE ts_far"
        )
    finally:
        neon.run("pg", "destroy", "--yes", copy)
    assert files_under(far) == far_files  # the copy never wrote to the node's location

    check_tablespace_mapping(neon, far, want)
    check_neon_file_round_trip(neon, far, want)
    assert files_under(far) == far_files

    neon.run("pg", "checkout", "pgdata1@ts")
    assert_same_dumps(dump_all(conn), want, "pg checkout")
    # The node's own absolute tablespace is back at its location; the in-place one in place.
    locations = tablespace_locations(conn)
    assert locations["ts_far"] == str(far) and locations["ts_here"].startswith("pg_tblspc/")
    assert psql(conn, "SELECT to_regclass('later') IS NULL") == "t"
    # The node goes on writing into its tablespaces, and that is history too.
    psql(conn, "INSERT INTO far SELECT g, '{2}' FROM generate_series(6001, 6050) g")
    psql(conn, "CREATE TABLE after (x int) TABLESPACE ts_far; INSERT INTO after VALUES (7)")
    want_after = dump_all(conn)
    neon.run("snapshot", "create", "pgdata1@after")
    ro = neon.json("snapshot", "start", "pgdata1@after")["connstr"]
    try:
        assert_same_dumps(dump_all(ro), want_after, "snapshot after checkout")
    finally:
        neon.run("snapshot", "stop", "pgdata1@after")

    # Back to before the tablespaces existed: the node's files at `far` are not left behind
    # unnoticed (the history keeps them in pgdata1@HEAD{1}).
    out = neon.run("pg", "checkout", "pgdata1@bare").stdout
    version_dir = far / "PG_15_202209061"
    assert f"Removed {version_dir}: its tablespace is not in pgdata1@bare" in out, out
    assert not version_dir.exists() and far.is_dir()
    assert_same_dumps(dump_all(conn), bare, "pg checkout before the tablespaces")
    # The location is free again for a new tablespace.
    psql(conn, f"CREATE TABLESPACE ts_again LOCATION '{far}'")


def check_tablespace_mapping(neon: NeonCli, far: Path, want: dict[str, str]) -> None:
    """pg create --snapshot --tablespace-mapping: bad mappings and a location in use are one
    clear line that creates nothing; a good one puts the tablespace at NEW, also after a
    checkout of the new node."""
    nodes_before = [n["id"] for n in neon.json("pg", "list")]
    new = far.parent / "mapped" / "ts_far"
    port = str(free_port())
    create = ("pg", "create", "--snapshot", "pgdata1@ts", "-n", "mapped", "--port", port)
    for mapping, says in [
        ("far=/x", "'far' is not an absolute path"),
        (f"{far}", "no OLD=NEW"),
        (f"{far}={new}=x", "multiple '=' signs"),
        (f"/not/a/tablespace={new}", "/not/a/tablespace is not a tablespace location of"),
        # The running node's own location: never written by another node.
        (f"{far}={far}", f"tablespace location {far} exists and is not empty"),
    ]:
        err = neon.fail(*create, "--tablespace-mapping", mapping)
        assert says in err and "--tablespace-mapping" in err, (mapping, err)
    assert [n["id"] for n in neon.json("pg", "list")] == nodes_before
    assert not new.parent.exists()

    mapped = neon.json(*create, "--tablespace-mapping", f"{far}={new}")["pgdata"]
    try:
        conn = connstr(neon, mapped)
        assert_same_dumps(dump_all(conn), want, "pg create --snapshot --tablespace-mapping")
        locations = tablespace_locations(conn)
        assert locations["ts_far"] == str(new) and locations["ts_here"].startswith("pg_tblspc/")
        assert files_under(new) and files_under(new).keys() <= files_under(far).keys()
        path = psql(conn, "SELECT pg_relation_filepath('far')")  # pg_tblspc/OID/PG_15_.../...
        assert (new / path.split("/", 2)[2]).is_file(), path
        neon.run("snapshot", "create", f"{mapped}@m")
        psql(conn, "CREATE TABLE gone (x int) TABLESPACE ts_far")
        neon.run("pg", "checkout", f"{mapped}@m")
        assert tablespace_locations(conn)["ts_far"] == str(new)  # its own location, kept
        assert psql(conn, "SELECT to_regclass('gone') IS NULL") == "t"
        assert_same_dumps(dump_all(conn), want, "checkout of the mapped node")
    finally:
        out = neon.run("pg", "destroy", "--yes", mapped).stdout
    # Its tablespace's files go with it; NEW itself stays.
    assert f"Removed {new / 'PG_15_202209061'} (a tablespace of {mapped})." in out, out
    assert new.is_dir() and not any(new.iterdir())


def check_neon_file_round_trip(neon: NeonCli, far: Path, want: dict[str, str]) -> None:
    """`snapshot export` to a .neon file and `snapshot import` of it: the file has every
    tablespace in place and no locations, so the import records both as in place (the
    absolute one's location stays behind: mapping it is refused, naming none), and a node
    made from it has the data with both tablespaces in place."""
    neon_file = far.parent / "ts.neon"
    neon.run("snapshot", "export", "pgdata1@ts", "-o", str(neon_file))
    neon.run("snapshot", "import", "--from", str(neon_file), "tsfile")
    err = neon.fail("pg", "create", "--snapshot", "tsfile", "--tablespace-mapping", f"{far}=/x")
    assert "its absolute tablespace locations: none" in err, err
    node = neon.json("pg", "create", "--snapshot", "tsfile", "--port", str(free_port()))["pgdata"]
    try:
        conn = connstr(neon, node)
        assert_same_dumps(dump_all(conn), want, "pg create --snapshot of a re-imported .neon")
        in_place(conn)
    finally:
        neon.run("pg", "destroy", "--yes", node)
        neon.run("snapshot", "destroy", "tsfile")
        neon_file.unlink()


def extract_and_dump(neon: NeonCli, lsn: str, tag: str) -> tuple[dict[str, str], list[str]]:
    neon.run("pitr", "extract-snapshot", "area", "--lsn", lsn, "--as", tag)
    ro = neon.json("snapshot", "start", f"pgdata1@{tag}")["connstr"]
    try:
        names = psql(ro, "SELECT spcname FROM pg_tablespace ORDER BY 1").splitlines()
        dirs = psql(ro, "SELECT pg_ls_dir('pg_tblspc') ORDER BY 1").splitlines()
        oids = psql(ro, "SELECT oid FROM pg_tablespace WHERE spcname LIKE 'ts\\_%' ORDER BY 1")
        assert dirs == oids.splitlines()  # exactly the tablespaces that exist at that LSN
        return dump_all(ro), names
    finally:
        neon.run("snapshot", "stop", f"pgdata1@{tag}")


def test_pitr_extraction_before_and_after_drop_tablespace(neon: NeonCli, far: Path) -> None:
    neon.run("pg", "create", "--port", str(free_port()))
    neon.run("pitr", "create", "area", "--pg", "pgdata1", "--ttl", "inf")
    conn = connstr(neon, "pgdata1")
    populate(conn, far)
    with_ts = dump_all(conn)
    lsn_with = psql(conn, "SELECT pg_current_wal_flush_lsn()")
    psql(conn, "DROP DATABASE far_db")
    psql(conn, "DROP TABLE far; ALTER TABLE moved SET TABLESPACE pg_default; DROP INDEX near_t")
    psql(conn, "DROP TABLESPACE ts_far")
    without = dump_all(conn)
    lsn_without = psql(conn, "SELECT pg_current_wal_flush_lsn()")
    assert not (far / "PG_15_202209061").exists()  # PostgreSQL removed its directory

    got, names = extract_and_dump(neon, lsn_with, "with")
    assert_same_dumps(got, with_ts, f"before DROP TABLESPACE ({lsn_with})")
    assert "ts_far" in names
    got, names = extract_and_dump(neon, lsn_without, "without")
    assert_same_dumps(got, without, f"after DROP TABLESPACE ({lsn_without})")
    assert "ts_far" not in names and "ts_here" in names
