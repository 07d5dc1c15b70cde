"""Native redo against PostgreSQL's own pages: `neon debug verify-redo` over real WAL.

One PostgreSQL 15 server runs with wal_consistency_checking=all (so every Heap/Heap2/Btree/
Sequence block reference carries the page as PostgreSQL left it) through a workload that
produces every record type of those rmgrs; the verifier replays each block with native redo
and compares under the rmgr masks. Also: a deliberately broken redo must be reported, and
the CLOG / multixact SLRU pages rebuilt from the same WAL must equal the server's files. The
verification and the SLRU pages are checked with the C fast paths and again as the pure-Python
reference (NEON_PURE_PYTHON=1, in a child process) over the same WAL.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

import pageserver.redo.heap as heap_redo
import pageserver.redo.verify as verify_module
from cli.debug_commands import debug_group
from cli.waldump import collect_segments, iter_records
from pageserver.redo import clog, multixact, redo_block_python
from pg15.constants import SLRU_PAGES_PER_SEGMENT
from pg15.records import DecodedRecord
from pg15.rmgr import clog as clog_rmgr
from pg15.rmgr import multixact as mx_rmgr
from pg15.rmgr import xact
from pg15.rmgr.heap import HeapDelete, decode_heap
from pg15.rmgr.main_data import decode_main
from tests.pgtest import PgTestCluster, PgTestServer
from tests.pure_python import run_pure

pytestmark = pytest.mark.slow

SETTINGS = {
    "wal_consistency_checking": "all",
    "full_page_writes": "on",
    # Keep every segment: no checkpoint may recycle WAL before we read it.
    "max_wal_size": "4GB",
    "wal_keep_size": "4GB",
    "checkpoint_timeout": "1h",
    "autovacuum": "off",
}

DDL_AND_BTREE = """
CREATE TABLE t (id int PRIMARY KEY, v text, n int, big text);
CREATE INDEX t_n ON t (n);
INSERT INTO t SELECT g, md5(g::text), g % 10 FROM generate_series(1, 12000) g;
UPDATE t SET v = v || 'x' WHERE id % 7 = 0;
UPDATE t SET n = n + 1 WHERE id % 11 = 0;
DELETE FROM t WHERE id BETWEEN 1500 AND 10500;
VACUUM t;
VACUUM t;
-- Heap space freed by VACUUM is reused: duplicates land inside existing posting lists.
INSERT INTO t SELECT g, md5(g::text), g % 10 FROM generate_series(20001, 23000) g;
INSERT INTO t VALUES (1, 'dup', 1) ON CONFLICT DO NOTHING;
INSERT INTO t VALUES (30001, 'spec', 1) ON CONFLICT DO NOTHING;
INSERT INTO t (id, v, n, big)
  SELECT g, 'toast', 0, (SELECT string_agg(md5(random()::text || i), '')
                         FROM generate_series(1, 150) i)
  FROM generate_series(40001, 40030) g;
SELECT count(*) FROM t WHERE id < 100;
BEGIN; SELECT id FROM t WHERE id < 50 FOR UPDATE; COMMIT;
BEGIN; SELECT id FROM t WHERE id BETWEEN 50 AND 90 FOR SHARE; COMMIT;
BEGIN; SELECT id FROM t WHERE id BETWEEN 90 AND 120 FOR KEY SHARE; COMMIT;
BEGIN; INSERT INTO t VALUES (50001, 'sub'); SAVEPOINT a; INSERT INTO t VALUES (50002, 'sub');
RELEASE a; SAVEPOINT b; INSERT INTO t VALUES (50003, 'gone'); ROLLBACK TO b; COMMIT;
BEGIN; INSERT INTO t VALUES (50004, 'aborted'); ROLLBACK;
CREATE SEQUENCE s1;
SELECT count(nextval('s1')) FROM generate_series(1, 100);
CREATE TABLE c (a int, b text);
COPY c FROM stdin;
{copy_rows}\\.
ALTER TABLE c ADD COLUMN d int DEFAULT 5;
CREATE INDEX c_a ON c (a);
UPDATE c SET b = b || 'y' WHERE a % 3 = 0;
VACUUM FREEZE c;
VACUUM FREEZE t;
CLUSTER t USING t_pkey;
VACUUM FULL c;
CREATE TABLE h (k int, pad text) WITH (fillfactor = 50);
INSERT INTO h SELECT g % 20, 'x' FROM generate_series(1, 400) g;
UPDATE h SET pad = pad || 'y';
UPDATE h SET pad = pad || 'z';
SELECT count(*) FROM h;
VACUUM h;
"""

MULTIXACT_HOLD = (
    "BEGIN; SELECT id FROM t WHERE id BETWEEN 200 AND 210 FOR SHARE; SELECT pg_sleep(1.5); COMMIT;"
)
MULTIXACT_JOIN = "BEGIN; SELECT id FROM t WHERE id BETWEEN 200 AND 210 FOR SHARE; COMMIT;"


def run_workload(server: PgTestServer) -> None:
    """Every record type of Heap, Heap2, Btree and Sequence, in a couple of minutes at most."""
    server.run("pgbench", "-i", "-s", "1", "-q", "postgres")
    copy_rows = "".join(f"{i}\trow {i}\n" for i in range(1, 3001))
    server.psql(DDL_AND_BTREE.replace("{copy_rows}", copy_rows))
    # Two sessions share-locking the same rows: a multixact.
    holder = threading.Thread(target=server.psql, args=(MULTIXACT_HOLD,))
    holder.start()
    time.sleep(0.5)
    server.psql(MULTIXACT_JOIN)
    holder.join()
    server.run("pgbench", "-n", "-t", "300", "-c", "2", "postgres")
    server.psql("VACUUM pgbench_accounts; VACUUM pgbench_branches; VACUUM pgbench_tellers;")
    server.psql("SELECT pg_switch_wal();")


@pytest.fixture(scope="module")
def server_files(
    pg_cluster_module: PgTestCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """A copy of the WAL (wal/) and SLRU directories of the server after a clean shutdown."""
    server = pg_cluster_module.create(SETTINGS)
    run_workload(server)
    server.stop()
    out = tmp_path_factory.mktemp("server")
    (out / "wal").mkdir()
    for seg in sorted(server.wal_dir.iterdir()):
        if seg.is_file() and len(seg.name) == 24:
            shutil.copy(seg, out / "wal" / seg.name)
    for slru in ("pg_xact", "pg_multixact"):
        shutil.copytree(server.datadir / slru, out / slru)
    yield out


@pytest.fixture(scope="module")
def wal_copy(server_files: Path) -> Path:
    return server_files / "wal"


def verify(path: Path) -> tuple[int, dict[str, dict[str, dict[str, int]]], str]:
    result = CliRunner().invoke(debug_group, ["verify-redo", "--json", str(path)])
    lines = result.stdout.strip().splitlines()
    report = json.loads(lines[0]) if lines else {}
    return result.exit_code, report, result.stderr if result.stderr_bytes else ""


REQUIRED = {
    "Heap": ["INSERT", "INSERT+INIT", "UPDATE", "HOT_UPDATE", "DELETE", "LOCK", "INPLACE"],
    "Heap2": ["PRUNE", "VACUUM", "FREEZE_PAGE", "VISIBLE", "MULTI_INSERT"],
    "Btree": ["INSERT_LEAF", "INSERT_UPPER", "DEDUP", "VACUUM", "NEWROOT"],
    "Sequence": ["LOG"],
}


def test_native_redo_matches_postgres(wal_copy: Path, covering_wal: Path) -> None:
    code, report, stderr = verify(wal_copy)
    print(json.dumps(report, indent=1, sort_keys=True))
    check_verified(code, report, stderr)
    # The pure-Python decoder and redo (NEON_PURE_PYTHON=1) over the segments in which the C
    # path verifies every type checked: the same verdict.
    check_verified(*run_pure(verify, covering_wal))


Report = dict[str, dict[str, dict[str, int]]]


def check_verified(code: int, report: Report, stderr: str) -> None:
    """Every block of the rmgrs with native redo equal to PostgreSQL's; each type verified."""
    for rmgr in ("Heap", "Heap2", "Btree", "Sequence"):
        for rtype, counts in report.get(rmgr, {}).items():
            assert counts["mismatched"] == 0, (rmgr, rtype, counts, stderr)
            assert counts["unsupported"] == 0, (rmgr, rtype, counts)
    assert unverified(report) == []
    assert code == 0, stderr


def unverified(report: Report) -> list[str]:
    """What `check_verified` asks to be verified at least once and `report` has not."""

    def verified(rmgr: str, rtype: str) -> bool:
        return report.get(rmgr, {}).get(rtype, {}).get("verified", 0) > 0

    missing = [f"{m} {t}" for m, types in REQUIRED.items() for t in types if not verified(m, t)]
    if not (verified("Btree", "SPLIT_L") or verified("Btree", "SPLIT_R")):
        missing.append("Btree SPLIT_L or SPLIT_R")
    unlinked = verified("Btree", "MARK_PAGE_HALFDEAD") and verified("Btree", "UNLINK_PAGE")
    if not (verified("Btree", "DELETE") or unlinked):
        missing.append("Btree DELETE or MARK_PAGE_HALFDEAD and UNLINK_PAGE")
    return missing


@pytest.fixture(scope="module")
def covering_wal(wal_copy: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Copies of the fewest consecutive segments in which the C path verifies every type
    `check_verified` asks for, and the segment after them (their last record may end there):
    a few segments check every type where the whole WAL took minutes of Python redo.

    The verifier bases each check on an image of the block earlier in the WAL it is given
    (or on a record that makes the page anew) and skips the block otherwise, so a window
    holding a type only as the first touch of its blocks sees it and verifies none (review
    L4): windows are tried, smallest first, among those holding every type, until the C
    verifier verifies each in one."""
    segments, seg_size = collect_segments([wal_copy])
    types: dict[int, set[tuple[str, str]]] = defaultdict(set)
    for rec in iter_records(segments, seg_size, None, None):
        types[rec.lsn // seg_size].add((rec.rmgr_name, rec.type_name))
    numbers = sorted(types)
    windows = [
        (j - i, numbers[i], numbers[j])
        for i in range(len(numbers))
        for j in range(i, len(numbers))
        if not unverified(_seen(set().union(*(types[n] for n in numbers[i : j + 1]))))
    ]
    dest = tmp_path_factory.mktemp("covering")
    for tried, (_, first, last) in enumerate(sorted(windows)):
        window = dest / f"wal{tried}"
        window.mkdir()
        for seg in segments:
            if first <= seg.segno <= last + 1:
                shutil.copy(seg.path, window / seg.path.name)
        code, report, _ = verify(window)
        if code == 0 and not unverified(report):
            return window
    raise AssertionError("no run of segments has every type verified")


def _seen(types: set[tuple[str, str]]) -> Report:
    """A report in which each of `types` counts as verified once."""
    report: Report = defaultdict(dict)
    for rmgr, rtype in types:
        report[rmgr][rtype] = {"verified": 1}
    return report


def test_broken_redo_is_reported(covering_wal: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A redo that garbles xmax of deleted tuples must show up as DELETE mismatches, and only
    there."""
    real = heap_redo._REDO[heap_redo.XLOG_HEAP_DELETE]

    def broken_delete(record: DecodedRecord, block_id: int, page: bytearray | None) -> bytearray:
        out = real(record, block_id, page)
        xl = decode_heap(record.info, record.main_data)
        assert isinstance(xl, HeapDelete)
        out[heap_redo.normal_tuple(out, xl.offnum, "test") + heap_redo.T_XMAX] ^= 0xFF
        return out

    monkeypatch.setitem(heap_redo._REDO, heap_redo.XLOG_HEAP_DELETE, broken_delete)
    # the C fast path would redo DELETE itself: the verifier runs the Python redo alone
    monkeypatch.setattr(verify_module, "redo_block", redo_block_python)
    code, report, stderr = verify(covering_wal)
    assert code == 1
    assert report["Heap"]["DELETE"]["mismatched"] > 0
    assert report["Heap"]["DELETE"]["verified"] == 0
    others = [
        counts
        for rmgr, types in report.items()
        for rtype, counts in types.items()
        if (rmgr, rtype) != ("Heap", "DELETE")
    ]
    assert sum(c["verified"] for c in others) > 1000
    assert not any(c["mismatched"] for c in others)
    assert "mismatch at" in stderr and "Heap DELETE" in stderr


def test_clog_and_multixact_pages_match_server(server_files: Path) -> None:
    """CLOG statuses and multixact offsets/members rebuilt from WAL equal the server's files,
    with the C decoder and the pure-Python one."""
    check_slru_pages(server_files)
    run_pure(check_slru_pages, server_files)


def check_slru_pages(server_files: Path) -> None:
    """The CLOG and multixact pages rebuilt from the WAL in `server_files` equal its files."""
    segments, seg_size = collect_segments([server_files / "wal"])
    xact_pages: dict[int, bytearray] = {}
    offsets: dict[int, bytearray] = {}
    members: dict[int, bytearray] = {}
    statuses = set()
    for rec in iter_records(segments, seg_size, None, None):
        main = decode_main(rec)
        if isinstance(main, xact.XactFinish):
            xids = [main.two_phase_xid or rec.xid, *main.subxacts]
            committed = isinstance(main, xact.XactCommit)
            status = (
                clog.TRANSACTION_STATUS_COMMITTED if committed else clog.TRANSACTION_STATUS_ABORTED
            )
            statuses.add(status)
            for xid in xids:
                page = xact_pages.setdefault(clog.clog_page(xid), clog.zero_page())
                clog.clog_set_status(page, [xid], status, pageno=clog.clog_page(xid))
        elif isinstance(main, clog_rmgr.ClogZeroPage):
            xact_pages[main.pageno] = clog.zero_page()
        elif isinstance(main, mx_rmgr.MultiXactZeroPage):
            (members if main.members else offsets)[main.pageno] = clog.zero_page()
        elif isinstance(main, mx_rmgr.MultiXactCreate):
            multixact.apply_create(main, offsets, members)
    assert statuses == {clog.TRANSACTION_STATUS_COMMITTED, clog.TRANSACTION_STATUS_ABORTED}
    assert offsets and members, "the workload made no multixact"
    for name, pages in (
        ("pg_xact", xact_pages),
        ("pg_multixact/offsets", offsets),
        ("pg_multixact/members", members),
    ):
        for pageno, page in pages.items():
            seg = server_files / name / f"{pageno // SLRU_PAGES_PER_SEGMENT:04X}"
            start = (pageno % SLRU_PAGES_PER_SEGMENT) * 8192
            assert seg.read_bytes()[start : start + 8192] == page, (name, pageno)
