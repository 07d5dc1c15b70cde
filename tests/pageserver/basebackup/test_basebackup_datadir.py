"""Basebackup against real PostgreSQL 15: build a data directory from a cleanly stopped
cluster (file by file, and through the page store), start stock PostgreSQL on it without
recovery, and compare pg_dump, prepared transactions, sequences, unlogged tables and amcheck."""

from __future__ import annotations

import difflib
import io
import re
from pathlib import Path

import pytest

from cli import postmaster
from datadir_files.untar import extract_basebackup
from pageserver.basebackup.sources import DatadirSource, SnapshotSource, TimelineSource
from pageserver.basebackup.tar_stream import basebackup
from pageserver.ingest.import_datadir import import_datadir
from pageserver.ingest.walingest import WalIngest
from pageserver.storage.timeline_store import TimelineStore
from pg15.lsn import format_lsn, parse_lsn
from pg15.pg_control import read_control_file
from tests.pgtest import PgTestCluster, PgTestServer

pytestmark = pytest.mark.slow

_SETVAL = re.compile(r"setval\('([^']+)', \d+,")
_RESTRICT = re.compile(r"^\\(un)?restrict ")
CONFIG_FILES = ("postgresql.conf", "pg_hba.conf", "pg_ident.conf", "postgresql.auto.conf")

WORKLOAD = """
CREATE TABLE items (id serial PRIMARY KEY, n int, v text, tags int[], pt point,
                    r int4range, doc tsvector);
INSERT INTO items (n, v, tags, pt, r, doc)
  SELECT g % 97, 'v' || g, ARRAY[g % 10, g % 7], point(g % 100, g / 100), int4range(g, g + 10),
         to_tsvector('simple', 'word' || (g % 50) || ' other' || (g % 13))
  FROM generate_series(1, 4000) g;
CREATE INDEX items_n ON items (n);
CREATE INDEX items_v_hash ON items USING hash (v);
CREATE INDEX items_tags_gin ON items USING gin (tags);
CREATE INDEX items_doc_gin ON items USING gin (doc);
CREATE INDEX items_pt_gist ON items USING gist (pt);
CREATE INDEX items_r_spgist ON items USING spgist (r);
CREATE INDEX items_id_brin ON items USING brin (id);
UPDATE items SET n = n + 1 WHERE id % 3 = 0;
DELETE FROM items WHERE id % 11 = 0;
VACUUM items;
CREATE TABLE docs (id int PRIMARY KEY, body text);
INSERT INTO docs
  SELECT g, (SELECT string_agg(md5(g::text || '-' || x::text), '') FROM generate_series(1, 300) x)
  FROM generate_series(1, 40) g;
CREATE SEQUENCE seq1;
SELECT count(nextval('seq1')) FROM generate_series(1, 10);
CREATE UNLOGGED TABLE scratch (id int PRIMARY KEY, v text);
INSERT INTO scratch SELECT g, 'x' || g FROM generate_series(1, 1000) g;
CREATE DATABASE db2;
"""

WORKLOAD_DB2 = """
CREATE TABLE t2 (a int PRIMARY KEY, b text);
INSERT INTO t2 SELECT g, repeat('b', g % 100) FROM generate_series(1, 2000) g;
CREATE INDEX t2_b ON t2 (b);
"""

PREPARE = """
BEGIN;
INSERT INTO items (n, v) VALUES (-1, 'prepared');
SELECT id FROM items WHERE id = 1 FOR SHARE;
PREPARE TRANSACTION 'p1';
"""

AMCHECK = """
CREATE EXTENSION IF NOT EXISTS amcheck;
SELECT count(bt_index_check(c.oid, true))
  FROM pg_class c JOIN pg_am a ON a.oid = c.relam
 WHERE a.amname = 'btree' AND c.relkind = 'i' AND c.relpersistence <> 't';
SELECT count(*) FROM pg_class c, LATERAL verify_heapam(c.oid) v
 WHERE c.relkind IN ('r', 'm', 't') AND c.relpersistence <> 't';
"""


def databases(server: PgTestServer) -> list[str]:
    return server.psql(
        "SELECT datname FROM pg_database WHERE datallowconn ORDER BY datname"
    ).splitlines()


def dumps(server: PgTestServer) -> dict[str, str]:
    """pg_dump of every database, without the per-run random \\restrict key lines."""
    out = {}
    for db in databases(server):
        text = server.run("pg_dump", "--no-unlogged-table-data", "-d", db).stdout
        out[db] = "".join(
            line for line in text.splitlines(keepends=True) if not _RESTRICT.match(line)
        )
    return out


def assert_same_dumps(got: dict[str, str], want: dict[str, str], sequences_exact: bool) -> None:
    """Equal dumps; with `sequences_exact` False, setval values may be ahead (a sequence
    page rebuilt from WAL has the pre-logged value, as after PostgreSQL's own recovery)."""
    assert sorted(got) == sorted(want)
    for db in want:
        a, b = got[db], want[db]
        if not sequences_exact:
            a, b = _SETVAL.sub("setval(\\1, N,", a), _SETVAL.sub("setval(\\1, N,", b)
        if a != b:
            diff = "".join(list(difflib.unified_diff(b.splitlines(True), a.splitlines(True)))[:60])
            raise AssertionError(f"pg_dump of {db} differs:\n{diff}")


def run_workload(server: PgTestServer) -> None:
    server.psql(WORKLOAD)
    server.psql(WORKLOAD_DB2, dbname="db2")
    server.psql(PREPARE)
    # A second locker of the row p1 holds FOR SHARE: creates a multixact.
    server.psql("BEGIN; SELECT id FROM items WHERE id = 1 FOR SHARE; COMMIT;")
    server.psql("CHECKPOINT")


def restore(
    pg_cluster: PgTestCluster,
    source: SnapshotSource,
    lsn: int,
    config_dir: Path,
    *,
    pg_timeline: int = 1,
    include_vm: bool = False,
) -> PgTestServer:
    """Basebackup -> tar -> extract -> configure -> start."""
    config = {name: (config_dir / name).read_bytes() for name in CONFIG_FILES}
    history = None
    if pg_timeline > 1:
        history = f"{pg_timeline - 1}\t{format_lsn(lsn)}\tbranch point\n".encode()
    tar = io.BytesIO()
    info = basebackup(
        source,
        lsn,
        pg_timeline=pg_timeline,
        out=tar,
        config_files=config,
        timeline_history=history,
        include_vm=include_vm,
    )
    assert info.checkpoint_lsn >= lsn
    tar.seek(0)
    server = pg_cluster.create_empty()
    extract_basebackup(tar, server.datadir)
    assert sorted(p.name for p in (server.datadir / "pg_wal").iterdir() if p.is_file()) == sorted(
        [info.wal_segment, *([f"{pg_timeline:08X}.history"] if history else [])]
    )
    assert not list(server.datadir.glob("base/*/*_fsm"))
    assert bool(list(server.datadir.glob("base/*/*_vm"))) == include_vm
    postmaster.write_config(server.datadir, *server.config())
    server.start()
    tli = server.psql("SELECT timeline_id FROM pg_control_checkpoint()")
    assert tli == str(pg_timeline)
    return server


def check_restored(
    restored: PgTestServer, expected_dumps: dict[str, str], last_seq: int, sequences_exact: bool
) -> None:
    log = restored.logfile.read_text()
    assert "database system was shut down at" in log, log
    assert "redo starts" not in log and "crash recovery" not in log, log
    assert_same_dumps(dumps(restored), expected_dumps, sequences_exact)
    # Prepared transaction survived, with its locks, and commits.
    assert restored.psql("SELECT gid FROM pg_prepared_xacts") == "p1"
    assert restored.psql("SELECT count(*) FROM items WHERE v = 'prepared'") == "0"
    restored.psql("COMMIT PREPARED 'p1'")
    assert restored.psql("SELECT count(*) FROM items WHERE v = 'prepared'") == "1"
    # Unlogged table: main fork is a copy of the init fork, so it is empty (as after a crash).
    assert restored.psql("SELECT count(*) FROM scratch") == "0"
    restored.psql("INSERT INTO scratch VALUES (1, 'new')")
    # Sequences continue.
    nxt = int(restored.psql("SELECT nextval('seq1')"))
    assert nxt == last_seq + 1 if sequences_exact else nxt > last_seq
    # New writes, index use, crash recovery, a clean restart.
    restored.psql("INSERT INTO items (n, v) SELECT -2, 'after' FROM generate_series(1, 500)")
    restored.psql("CREATE TABLE after_t AS SELECT g FROM generate_series(1, 100) g")
    # A crash now replays from our checkpoint record through the WAL written after it.
    restored.stop("immediate")
    restored.start()
    assert "redo starts at" in restored.logfile.read_text()
    assert restored.psql("SELECT count(*) FROM items WHERE v = 'after'") == "500"
    restored.stop()
    restored.start()
    assert restored.psql("SELECT count(*) FROM items WHERE v = 'after'") == "500"
    assert (
        restored.psql("SET enable_seqscan = off; SELECT count(*) FROM items WHERE n = -2") == "500"
    )
    assert restored.psql("SELECT count(*) FROM after_t", dbname="postgres") == "100"
    for db in databases(restored):
        out = restored.psql(AMCHECK, dbname=db).splitlines()
        assert int(out[0]) > 0 and out[1] == "0", (db, out)
    restored.stop()


@pytest.fixture(scope="module")
def stopped_source(pg_cluster_module: PgTestCluster) -> tuple[PgTestServer, dict[str, str], int]:
    """A cluster with the workload, dumped, then stopped cleanly (once per module)."""
    server = pg_cluster_module.create()
    run_workload(server)
    expected = dumps(server)
    last_seq = int(server.psql("SELECT last_value FROM seq1"))
    server.stop()
    return server, expected, last_seq


@pytest.mark.parametrize("pg_timeline", [1, 3])
def test_basebackup_from_datadir_starts_without_recovery(
    pg_cluster: PgTestCluster,
    stopped_source: tuple[PgTestServer, dict[str, str], int],
    pg_timeline: int,
) -> None:
    source_server, expected, last_seq = stopped_source
    control = read_control_file(source_server.datadir)
    with DatadirSource(source_server.datadir) as source:
        assert source.lsn == control.checkpoint_lsn + 120
        restored = restore(
            pg_cluster, source, source.lsn, source_server.datadir, pg_timeline=pg_timeline
        )
    check_restored(restored, expected, last_seq, sequences_exact=True)


def ingest_wal_until(ingest: object, wal_dir: Path, start_lsn: int, record_lsn: int) -> int:
    """Feed the server's pg_wal (read as root) through WalReader + decode_record into
    WalIngest, up to and including the record at `record_lsn`; return that record's end."""
    from pg15.lsn import DEFAULT_SEGMENT_SIZE as seg
    from pg15.lsn import segment_file_name
    from pg15.records import decode_record
    from pg15.xlog_reader import WalReader

    segno = start_lsn // seg
    reader = WalReader(segno * seg, seg, 1)
    while True:
        path = wal_dir / segment_file_name(1, segno, seg)
        assert path.exists(), f"{path.name} is missing before {format_lsn(record_lsn)}"
        reader.feed(path.read_bytes())
        for raw in reader.records():
            if raw.lsn > record_lsn:
                raise AssertionError(f"no record starts at {format_lsn(record_lsn)}")
            ingest.ingest_record(decode_record(raw), raw.data)  # type: ignore[attr-defined]
            if raw.lsn == record_lsn:
                return raw.end_lsn
        assert reader.end_of_wal is None, reader.end_of_wal
        segno += 1


def test_basebackup_through_pagestore(
    pg_cluster: PgTestCluster,
    stopped_source: tuple[PgTestServer, dict[str, str], int],
    tmp_path: Path,
) -> None:
    source_server, expected, last_seq = stopped_source
    store = TimelineStore(tmp_path / "store")
    try:
        timeline = store.create_timeline()
        lsn = import_datadir(timeline, source_server.datadir)
        # The imported VM is an exact copy, so this variant ships it.
        restored = restore(
            pg_cluster, TimelineSource(timeline, lsn), lsn, source_server.datadir, include_vm=True
        )
        check_restored(restored, expected, last_seq, sequences_exact=True)
    finally:
        store.close()


def test_basebackup_after_wal_ingest(pg_cluster: PgTestCluster, tmp_path: Path) -> None:
    """Import a fresh initdb, stream the workload's WAL through WalIngest, basebackup at the
    end of an idle CHECKPOINT record: the restored cluster dumps like the live one did."""
    server = pg_cluster.create(
        {
            "wal_keep_size": "2GB",
            "max_wal_size": "2GB",
            "checkpoint_timeout": "1h",
            "autovacuum": "off",
        },
        start=False,
    )
    store = TimelineStore(tmp_path / "store")
    try:
        timeline = store.create_timeline()
        lsn0 = import_datadir(timeline, server.datadir)
        server.start()
        run_workload(server)
        checkpoint_lsn = parse_lsn(
            server.psql("SELECT checkpoint_lsn FROM pg_control_checkpoint()")
        )
        expected = dumps(server)
        last_seq = int(server.psql("SELECT last_value FROM seq1"))
        end = ingest_wal_until(WalIngest(timeline), server.wal_dir, lsn0, checkpoint_lsn)
        server.stop()
        restored = restore(pg_cluster, TimelineSource(timeline, end), end, server.datadir)
        check_restored(restored, expected, last_seq, sequences_exact=False)
    finally:
        store.close()
