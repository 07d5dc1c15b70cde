"""Acceptance test of ingest + materialization against a real PostgreSQL 15 server.

A fresh initdb'd cluster is imported at its shutdown checkpoint, then started with every WAL
segment retained (wal_keep_size). A workload runs (pgbench, every index type, TRUNCATE,
VACUUM and VACUUM FULL, CREATE DATABASE with both strategies, DROP DATABASE, two-phase commit,
subtransactions, a multixact, an unlogged table, a sequence). At capture points the server
is idle after CHECKPOINT, and its data files, pg_xact, pg_multixact and pg_twophase are
copied together with the insert LSN; the last capture is the cleanly stopped directory.
Then the server's WAL is decoded and ingested, and every capture is compared with the store
at its LSN:

* every page of every main, init and VM fork, under the wal_consistency_checking mask of
  the relation's access method (heap, btree, hash, gin, gist, spgist, brin, sequence); VM
  pages under pd_lsn/checksum masking only;
* fork sizes (main, init, VM; FSM forks are reported, not asserted: PostgreSQL does not
  WAL-log the FSM), relation and database lists;
* the CLOG status of every xid below nextXid, the multixact pages, the two-phase files.

Known, documented differences that are not failures:
* main forks of unlogged relations (never WAL-logged; basebackup copies the init fork);
* VM forks (or trailing VM pages) that VACUUM created without setting a bit: extending the
  map is not WAL-logged, so a map whose pages are all empty may be missing or shorter here;
* FSM forks (content and size).

With wal_consistency_checking off the native redo of every rmgr is exercised; rmgrs without
native redo (whatever `REDO_BY_RMGR` lacks) give UnsupportedRecord, which the test records
per rmgr and reports instead of failing, since refusing is the specified behaviour.

The store side (import, ingest, layers, reads, redo) runs with the C fast paths and, over the
WAL without verification images (whose decoding test_waldump_oracle checks pure-Python too),
again as the pure-Python reference over the same base copy, WAL and captures
(NEON_PURE_PYTHON=1, in a child process): the same pages, records and differences.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pageserver.ingest.import_datadir import import_datadir
from pageserver.ingest.walingest import WalIngest
from pageserver.reconstruct.apply_delta import ReconstructError
from pageserver.reconstruct.reads import (
    get_checkpoint,
    get_rel_size,
    get_slru_page,
    get_slru_segment_size,
    get_twophase_files,
    list_dbs,
    list_rels,
    materialize,
)
from pageserver.redo import UnsupportedRecord
from pageserver.redo.clog import clog_get_status
from pageserver.redo.masks import mask_page_lsn_and_checksum
from pageserver.redo.page import PageError, page_is_new
from pageserver.storage.keys import SlruKind, rel_block_key
from pageserver.storage.timeline import Timeline
from pageserver.storage.timeline_store import TimelineStore
from pg15.constants import BLCKSZ
from pg15.lsn import parse_lsn, segment_file_name
from pg15.pg_control import read_control_file
from pg15.records import decode_record
from pg15.xlog_reader import WalReader
from tests.page_compare import (
    fork_pages,
    masked_page,
    relation_files,
    relation_kinds,
    sequence_last_value,
)
from tests.pgtest import PgTestCluster, PgTestServer
from tests.pure_python import run_pure

pytestmark = pytest.mark.slow

SEG_SIZE = 16 * 1024 * 1024

EXPECTED_RECORDS = {
    "Storage/TRUNCATE",
    "Database/CREATE_FILE_COPY",
    "Database/CREATE_WAL_LOG",
    "Database/DROP",
    "Transaction/PREPARE",
    "Transaction/COMMIT_PREPARED",
    "MultiXact/CREATE_ID",
    "Heap2/VISIBLE",
    "RelMap/UPDATE",
}
EXPECTED_RMGRS = {"Hash", "Gin", "Gist", "SPGist", "BRIN", "Sequence", "Btree", "XLOG"}


@dataclass
class Capture:
    name: str
    lsn: int
    root: Path
    kinds: dict[tuple[int, int, int], str]
    next_xid: int
    wal_log_dbs: set[int]


@dataclass
class Report:
    pages: int = 0
    mismatches: list[str] = field(default_factory=list)
    unsupported: Counter[str] = field(default_factory=Counter)
    fsm_size_diffs: int = 0
    vm_missing_empty: int = 0
    vm_bits_lost: int = 0
    twophase_files: int = 0
    clog_xids: int = 0


def _capture(server: PgTestServer, name: str, dest: Path, *, stopped: bool = False) -> Capture:
    if not stopped:
        server.psql("CHECKPOINT")
        server.psql("CHECKPOINT")
        lsn = parse_lsn(server.psql("SELECT pg_current_wal_insert_lsn()"))
    root = dest / name
    kinds: dict[tuple[int, int, int], str] = {}
    wal_log_dbs = (
        {
            int(oid)
            for oid in server.psql("SELECT oid FROM pg_database WHERE datname = 'db_wal'").split()
        }
        if not stopped
        else set()
    )
    if not stopped:
        dbs = server.psql("SELECT oid, datname, datallowconn FROM pg_database").splitlines()
        template1 = {}
        for line in dbs:
            oid, datname, allow = line.split("|")
            if allow == "t":
                found = relation_kinds(lambda sql, d=datname: server.psql(sql, d), int(oid))
                kinds.update(found)
                if datname == "template1":
                    template1 = found
        for line in dbs:
            oid, _datname, allow = line.split("|")
            if allow != "t":  # template0: same catalog filenodes as template1
                for (spc, _db, node), kind in template1.items():
                    kinds.setdefault((spc, int(oid), node), kind)
        # Copy while the server is idle (nothing writes after the checkpoint).
        next_xid = int(server.psql("SELECT next_xid FROM pg_control_checkpoint()").split(":")[-1])
    for sub in ("base", "global", "pg_xact", "pg_multixact", "pg_twophase"):
        shutil.copytree(server.datadir / sub, root / sub)
    if stopped:
        control = read_control_file(server.datadir)
        lsn = _record_end(server.wal_dir, control.checkpoint_lsn)
        next_xid = control.checkpoint.next_xid
    return Capture(name, lsn, root, kinds, next_xid, wal_log_dbs)


def _record_end(wal_dir: Path, lsn: int) -> int:
    """The end of the record at `lsn` (the shutdown checkpoint: 114 bytes, 120 aligned, plus a
    page header when it crosses a WAL page boundary), as the reader finds it."""
    segno = lsn // SEG_SIZE
    reader = WalReader(segno * SEG_SIZE, SEG_SIZE, 1)
    for seg in (segno, segno + 1):  # it may end in the next segment
        path = wal_dir / segment_file_name(1, seg, SEG_SIZE)
        if path.exists():
            reader.feed(path.read_bytes())
        for raw in reader.records():
            if raw.lsn == lsn:
                return raw.end_lsn
    raise AssertionError(f"no record starts at {lsn:X} in its segment")


def _ingest_wal(
    ingest: WalIngest, wal_dir: Path, start_lsn: int, stop_lsn: int | None = None
) -> Counter[str]:
    """Feed the server's segments from the one holding start_lsn (records the timeline has
    are skipped by ingest_record); stop after the record ending at stop_lsn, if given."""
    segno = start_lsn // SEG_SIZE
    reader = WalReader(segno * SEG_SIZE, SEG_SIZE, 1)
    count: Counter[str] = Counter()
    while True:
        path = wal_dir / segment_file_name(1, segno, SEG_SIZE)
        if not path.exists():
            break
        reader.feed(path.read_bytes())
        for raw in reader.records():
            if stop_lsn is not None and raw.end_lsn > stop_lsn:
                return count
            record = decode_record(raw)
            if ingest.ingest_record(record, raw.data):
                count[f"{record.rmgr_name}/{record.type_name}"] += 1
                count["checked"] += record.check_consistency
        if reader.end_of_wal is not None:
            break
        segno += 1
    return count


def _vm_subset(ours: bytearray, theirs: bytearray) -> bool:
    return all(a & ~b == 0 for a, b in zip(ours, theirs, strict=True))


def _vm_empty(page: bytes) -> bool:
    return page_is_new(page) or not any(b & 0xFF for b in page[24:])


def _compare_db(
    tl: Timeline, cap: Capture, spc: int, db: int, directory: Path, report: Report
) -> None:
    files = relation_files(directory)
    ours = set(list_rels(tl, spc, db, cap.lsn))
    unlogged = {rel for rel, fork in files if fork == 3}
    for (rel, fork), segments in sorted(files.items()):
        pages = fork_pages(segments)
        where = f"{cap.name}: rel {spc}/{db}/{rel} fork {fork}"
        if fork == 0 and rel in unlogged:
            continue
        size = get_rel_size(tl, spc, db, rel, fork, cap.lsn)
        if fork == 1:
            report.fsm_size_diffs += size != len(pages)
            continue
        if fork == 2:
            # VM pages that VACUUM extended without setting a bit are not in WAL.
            while pages and (size or 0) < len(pages) and _vm_empty(pages[-1]):
                pages.pop()
                report.vm_missing_empty += 1
            if not pages and size is None:
                continue
        if not pages and size is None:
            continue  # a dropped relation's empty main fork waiting for unlink
        if size != len(pages):
            report.mismatches.append(f"{where}: size {size}, file has {len(pages)} pages")
            continue
        assert (rel, fork) in ours, where
        kind = cap.kinds.get((spc, db, rel), "heap")
        for blkno, pg_page in enumerate(pages):
            report.pages += 1
            try:
                mine = materialize(tl, rel_block_key(spc, db, rel, fork, blkno), cap.lsn)
            except UnsupportedRecord as exc:
                report.unsupported[str(exc).split(" at ")[0]] += 1
                continue
            except (ReconstructError, PageError) as exc:
                report.mismatches.append(f"{where} blk {blkno}: {exc}")
                continue
            if fork == 2:
                a, b = bytearray(mine), bytearray(pg_page)
                mask_page_lsn_and_checksum(a)
                mask_page_lsn_and_checksum(b)
                same = a == b
                if not same and db in cap.wal_log_dbs and _vm_subset(a, b):
                    # CREATE DATABASE ... WAL_LOG logs VM pages as standard pages, so their
                    # bitmap is the image's "hole": recovery (ours and PostgreSQL's) gets a
                    # map without bits, which is safe (never a bit the server lacks).
                    report.vm_bits_lost += 1
                    same = True
            else:
                if kind == "sequence" and not page_is_new(pg_page):
                    assert sequence_last_value(mine) >= sequence_last_value(pg_page), where
                same = masked_page(kind, mine, blkno) == masked_page(kind, pg_page, blkno)
            if not same:
                diff = [i for i in range(BLCKSZ) if mine[i] != pg_page[i]]
                report.mismatches.append(
                    f"{where} ({kind}) blk {blkno}: page differs at {diff[:8]} "
                    f"ours {mine[diff[0] : diff[0] + 8].hex() if diff else ''} "
                    f"pg {pg_page[diff[0] : diff[0] + 8].hex() if diff else ''}"
                )
    # Every main fork we know exists in the directory (dropped ones are gone).
    for rel, fork in ours:
        if fork == 0 and (rel, 0) not in files:
            report.mismatches.append(f"{cap.name}: rel {spc}/{db}/{rel} exists only in the store")


def _compare_clog(tl: Timeline, cap: Capture, report: Report) -> None:
    pg_pages: dict[int, bytes] = {}
    for path in (cap.root / "pg_xact").iterdir():
        data = path.read_bytes()
        segno = int(path.name, 16)
        for i in range(0, len(data), BLCKSZ):
            pg_pages[segno * 32 + i // BLCKSZ] = data[i : i + BLCKSZ]
    ours: dict[int, bytes] = {}
    for xid in range(3, cap.next_xid):
        pageno = xid // (BLCKSZ * 4)
        if pageno not in ours:
            seg, blk = divmod(pageno, 32)
            assert (get_slru_segment_size(tl, SlruKind.CLOG, seg, cap.lsn) or 0) > blk
            ours[pageno] = get_slru_page(tl, SlruKind.CLOG, seg, blk, cap.lsn)
        theirs = clog_get_status(pg_pages[pageno], xid)
        mine = clog_get_status(ours[pageno], xid)
        report.clog_xids += 1
        if theirs != mine:
            report.mismatches.append(f"{cap.name}: xid {xid} status {mine}, server has {theirs}")


def _compare_multixact(tl: Timeline, cap: Capture, report: Report) -> None:
    for kind in (SlruKind.MULTIXACT_OFFSETS, SlruKind.MULTIXACT_MEMBERS):
        for path in (cap.root / kind.directory).iterdir():
            data = path.read_bytes()
            segno = int(path.name, 16)
            for i in range(0, len(data), BLCKSZ):
                mine = get_slru_page(tl, kind, segno, i // BLCKSZ, cap.lsn)
                if mine != data[i : i + BLCKSZ]:
                    report.mismatches.append(
                        f"{cap.name}: {kind.directory} {path.name} page differs"
                    )


def _compare(tl: Timeline, cap: Capture, report: Report) -> None:
    dbs = set(list_dbs(tl, cap.lsn))
    base = (cap.root / "base").iterdir()
    on_disk = {(1663, int(p.name)) for p in base if p.name.isdigit()} | {(1664, 0)}
    assert dbs == on_disk, cap.name
    for spc, db in sorted(dbs):
        directory = cap.root / "global" if spc == 1664 else cap.root / "base" / str(db)
        _compare_db(tl, cap, spc, db, directory, report)
    _compare_clog(tl, cap, report)
    _compare_multixact(tl, cap, report)
    twophase = {int(p.name, 16): p.read_bytes() for p in (cap.root / "pg_twophase").iterdir()}
    mine = get_twophase_files(tl, cap.lsn)
    for xid, data in twophase.items():
        assert mine.get(xid) == data, f"{cap.name}: two-phase file of xid {xid}"
        report.twophase_files += 1
    checkpoint = get_checkpoint(tl, cap.lsn)
    assert checkpoint is not None and checkpoint.next_xid >= cap.next_xid


WORKLOAD_1 = """
CREATE TABLE items (id int PRIMARY KEY, a int, tags int[], pt point, word text, r int4range);
INSERT INTO items SELECT g, g % 97, ARRAY[g % 7, g % 11], point(g % 50, g % 31), md5(g::text),
  int4range(g, g + 10) FROM generate_series(1, 4000) g;
CREATE INDEX items_hash ON items USING hash (a);
CREATE INDEX items_gin ON items USING gin (tags);
CREATE INDEX items_gist ON items USING gist (pt);
CREATE INDEX items_spgist ON items USING spgist (word);
CREATE INDEX items_brin ON items USING brin (id);
CREATE INDEX items_range ON items USING gist (r);
CREATE UNLOGGED TABLE scratch (id int PRIMARY KEY, v text);
INSERT INTO scratch SELECT g, 'x' || g FROM generate_series(1, 500) g;
CREATE TABLE docs (id int PRIMARY KEY, body text);
INSERT INTO docs SELECT g, (SELECT string_agg(md5(g::text || i::text), '') FROM
  generate_series(1, 300) i) FROM generate_series(1, 40) g;
CREATE SEQUENCE counter;
SELECT nextval('counter') FROM generate_series(1, 50);
CREATE TABLE locks (id int PRIMARY KEY, v int);
INSERT INTO locks SELECT g, 0 FROM generate_series(1, 10) g;
BEGIN;
SELECT * FROM locks WHERE id = 1 FOR SHARE;
SAVEPOINT s1;
UPDATE locks SET v = 1 WHERE id = 1;
COMMIT;
BEGIN;
INSERT INTO locks VALUES (100, 1);
SAVEPOINT a; INSERT INTO locks VALUES (101, 1);
SAVEPOINT b; INSERT INTO locks VALUES (102, 1);
ROLLBACK TO SAVEPOINT b;
RELEASE SAVEPOINT a;
COMMIT;
"""

WORKLOAD_2 = """
UPDATE items SET a = a + 1, tags = tags || 5, pt = point(1, 1), word = word || 'z'
  WHERE id % 5 = 0;
DELETE FROM items WHERE id > 3500;
INSERT INTO items SELECT g, g % 13, ARRAY[g], point(g, g), 'w' || g, int4range(g, g + 1)
  FROM generate_series(5000, 5600) g;
VACUUM items;
CREATE TABLE shrink AS SELECT g AS id, repeat('y', 200) AS pad FROM generate_series(1, 3000) g;
DELETE FROM shrink WHERE id > 100;
VACUUM shrink;
VACUUM FULL pgbench_history;
TRUNCATE pgbench_history;
VACUUM pgbench_accounts;
CREATE DATABASE db_wal STRATEGY wal_log;
CREATE DATABASE db_copy STRATEGY file_copy;
CREATE DATABASE db_gone;
DROP DATABASE db_gone;
BEGIN;
INSERT INTO locks VALUES (200, 2);
PREPARE TRANSACTION 'done';
COMMIT PREPARED 'done';
BEGIN;
INSERT INTO locks VALUES (201, 2);
PREPARE TRANSACTION 'pending';
SELECT nextval('counter') FROM generate_series(1, 40);
"""


def _run_workload(server: PgTestServer, dest: Path) -> list[Capture]:
    captures = []
    server.run("pgbench", "-i", "-s", "1", "-q", "postgres")
    server.psql(WORKLOAD_1)
    captures.append(_capture(server, "c1", dest))
    server.run("pgbench", "-n", "-t", "400", "-c", "2", "-j", "2", "postgres")
    server.psql(WORKLOAD_2)
    server.psql(
        "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'a')", "db_copy"
    )
    server.psql(
        "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 100)",
        "db_wal",
    )
    captures.append(_capture(server, "c2", dest))
    server.stop()
    last = _capture(server, "stopped", dest, stopped=True)
    last.kinds, last.wal_log_dbs = captures[-1].kinds, captures[-1].wal_log_dbs
    captures.append(last)
    return captures


@pytest.mark.parametrize("wcc", ["all", "off"])
def test_pagestore_fidelity(pg_cluster: PgTestCluster, tmp_path: Path, wcc: str) -> None:
    server = pg_cluster.create(
        {
            "wal_consistency_checking": "all" if wcc == "all" else "",
            "wal_keep_size": "2GB",
            "max_wal_size": "2GB",
            "checkpoint_timeout": "1h",
            "autovacuum": "off",
        },
        start=False,
    )
    base = tmp_path / "base"  # the initdb state, imported at its shutdown checkpoint
    subprocess.run(["cp", "-a", str(server.datadir), str(base)], check=True)
    started = time.monotonic()
    server.start()
    captures = _run_workload(server, tmp_path / "captures")
    print(f"\nwcc={wcc}: workload {time.monotonic() - started:.1f}s")
    ours = _check_store(base, server.wal_dir, captures, tmp_path / "store", wcc)
    if wcc == "off":  # verification images add to the decoding, not to what is stored or redone
        pure = run_pure(_check_store, base, server.wal_dir, captures, tmp_path / "pure", wcc)
        assert pure == ours  # the same records, pages and known differences


@dataclass(frozen=True, slots=True)
class StoreCheck:
    """What `_check_store` found: the same with and without the C fast paths."""

    types: Counter[str]
    checked: int
    pages: int
    unsupported: Counter[str]
    known_differences: tuple[int, int, int]
    twophase_files: int
    clog_xids: int


def _check_store(
    base: Path, wal_dir: Path, captures: list[Capture], store_dir: Path, wcc: str
) -> StoreCheck:
    """Import `base`, ingest the WAL (to the first capture, then, reopened, the rest) and
    compare every capture with the store at its LSN; fail on any mismatch."""
    store = TimelineStore(store_dir)
    tl = store.create_timeline()
    lsn0 = import_datadir(tl, base)
    started = time.monotonic()
    # Ingest up to the first capture, make it durable, reopen the store (a restart: the
    # metadata cache must reload from the timeline), then ingest the rest.
    types = _ingest_wal(WalIngest(tl), wal_dir, lsn0, captures[0].lsn)
    tl.freeze_and_flush()
    store.close()
    store = TimelineStore(store_dir)
    tl = store.get(tl.timeline_id)
    assert tl.last_record_lsn == captures[0].lsn
    types += _ingest_wal(WalIngest(tl), wal_dir, lsn0)
    checked = types.pop("checked", 0)
    assert (checked > 0) == (wcc == "all")
    n_records = sum(types.values())
    assert set(types) >= EXPECTED_RECORDS, EXPECTED_RECORDS - set(types)
    assert {name.split("/")[0] for name in types} >= EXPECTED_RMGRS
    t_ingest = time.monotonic()
    assert tl.last_record_lsn == captures[-1].lsn
    report = Report()
    for cap in captures:
        _compare(tl, cap, report)
    t_compare = time.monotonic()
    print(
        f"wcc={wcc}: {n_records} records ({checked} with verification images) "
        f"ingested in {t_ingest - started:.1f}s; {report.pages} pages compared in "
        f"{t_compare - t_ingest:.1f}s, {len(report.mismatches)} mismatches, "
        f"{report.clog_xids} CLOG statuses; FSM size differences {report.fsm_size_diffs}, "
        f"empty VM pages not in WAL {report.vm_missing_empty}, VM pages without the bits "
        f"CREATE DATABASE WAL_LOG drops {report.vm_bits_lost}; unsupported: "
        f"{dict(report.unsupported)}"
    )
    for line in report.mismatches[:40]:
        print("  ", line)
    assert not report.mismatches
    assert report.twophase_files >= 2  # 'pending' at c2 and after the stop
    if wcc == "all":
        assert not report.unsupported
    store.close()
    return StoreCheck(
        types,
        checked,
        report.pages,
        report.unsupported,
        (report.fsm_size_diffs, report.vm_missing_empty, report.vm_bits_lost),
        report.twophase_files,
        report.clog_xids,
    )
