"""Hash, GIN, GiST, SP-GiST, BRIN and Generic redo against PostgreSQL's own pages.

One PostgreSQL 15 server runs with wal_consistency_checking=all through a workload that splits
and deletes pages of every index AM (and bloom, for generic WAL); `RedoVerifier` replays each
block with native redo and compares it with the logged image under the AM's mask. A record
type that appears in the WAL must verify at least one block, except the ones whose blocks are
all forced full-page images (nothing to redo) or that reference no block at all.
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import pageserver.redo.brin as brin_redo
from cli.waldump import collect_segments, iter_records
from pageserver.redo.verify import RedoVerifier
from tests.pgtest import PgTestCluster

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

INDEX_RMGRS = ("Hash", "Gin", "Gist", "SPGist", "BRIN", "Generic")

# Record types whose every block is a forced full-page image (REGBUF_FORCE_IMAGE), so there is
# nothing for redo to compute; GIN SPLIT verifies only its child block, on internal splits.
IMAGE_ONLY = {("Hash", "SPLIT_PAGE"), ("Gin", "SPLIT"), ("Gin", "VACUUM_PAGE")}
# Record types without block references (conflict points and LSN bumps).
NO_BLOCKS = {("Gist", "PAGE_REUSE"), ("Gist", "ASSIGN_LSN")}

REQUIRED = {
    "Hash": [
        "INIT_META_PAGE",
        "INIT_BITMAP_PAGE",
        "INSERT",
        "ADD_OVFL_PAGE",
        "SPLIT_ALLOCATE_PAGE",
        "SPLIT_COMPLETE",
        "MOVE_PAGE_CONTENTS",
        "SQUEEZE_PAGE",
        "DELETE",
        "SPLIT_CLEANUP",
        "UPDATE_META_PAGE",
        "VACUUM_ONE_PAGE",
    ],
    "Gin": [
        "CREATE_PTREE",
        "INSERT",
        "VACUUM_DATA_LEAF_PAGE",
        "DELETE_PAGE",
        "UPDATE_META_PAGE",
        "INSERT_LISTPAGE",
        "DELETE_LISTPAGE",
    ],
    "Gist": ["PAGE_UPDATE", "DELETE", "PAGE_SPLIT", "PAGE_DELETE"],
    "SPGist": [
        "ADD_LEAF",
        "MOVE_LEAFS",
        "ADD_NODE",
        "SPLIT_TUPLE",
        "PICKSPLIT",
        "VACUUM_LEAF",
        "VACUUM_ROOT",
        "VACUUM_REDIRECT",
    ],
    "BRIN": ["CREATE_INDEX", "INSERT", "UPDATE", "SAMEPAGE_UPDATE", "REVMAP_EXTEND", "DESUMMARIZE"],
    "Generic": ["Generic"],
}

INDEX_SQL_HEAD = """
-- hash: splits, overflow chains, LP_DEAD cleanup on insert, squeeze on VACUUM
CREATE TABLE th (id int, k int);
CREATE INDEX th_k ON th USING hash (k);
INSERT INTO th SELECT g, g FROM generate_series(1, 6000) g;
INSERT INTO th SELECT g, 7 FROM generate_series(1, 1500) g;
DELETE FROM th WHERE k = 7 AND id % 2 = 0;
SET enable_seqscan = off; SET enable_bitmapscan = off;
SELECT count(*) FROM th WHERE k = 7;
RESET enable_seqscan; RESET enable_bitmapscan;
INSERT INTO th SELECT g, 7 FROM generate_series(1, 600) g;
DELETE FROM th WHERE id % 3 = 0;
VACUUM th;
DELETE FROM th WHERE k = 7;
VACUUM th;
INSERT INTO th SELECT g, g FROM generate_series(6001, 8000) g;
VACUUM th;
-- gin: entry trees, pending lists (fastupdate), posting trees, vacuum and page deletion
CREATE TABLE tg (id int, a int[], t tsvector, j jsonb);
CREATE INDEX tg_a ON tg USING gin (a) WITH (fastupdate = off);
CREATE INDEX tg_t ON tg USING gin (t) WITH (fastupdate = on, gin_pending_list_limit = 64);
CREATE INDEX tg_j ON tg USING gin (j jsonb_path_ops);
INSERT INTO tg SELECT g, ARRAY[g % 5, g % 100, g],
  to_tsvector('simple', 'w' || (g % 50) || ' x' || g), jsonb_build_object('k', g % 20)
  FROM generate_series(1, 5000) g;
DELETE FROM tg WHERE id % 4 = 0 OR id BETWEEN 1000 AND 3500;
VACUUM tg;
INSERT INTO tg SELECT g, ARRAY[g % 5, g], to_tsvector('simple', 'w' || (g % 50)),
  jsonb_build_object('k', g % 20) FROM generate_series(5001, 6000) g;
VACUUM tg;
CREATE TABLE tg2 (id int, a int[]);
COPY tg2 FROM stdin;
"""

INDEX_SQL_TAIL = """
CREATE INDEX tg2_a ON tg2 USING gin (a) WITH (fastupdate = off);
DELETE FROM tg2 WHERE id BETWEEN 5000 AND 22000 OR id % 7 = 0;
VACUUM tg2;
INSERT INTO tg2 SELECT g, '{1}' FROM generate_series(1, 200) g;
-- one heap row per page: 2-byte TID deltas overflow an inline posting list (CREATE_PTREE)
CREATE TABLE tg3 (id int, a int[], pad text) WITH (fillfactor = 10);
CREATE INDEX tg3_a ON tg3 USING gin (a) WITH (fastupdate = on, gin_pending_list_limit = 4096);
INSERT INTO tg3 SELECT g, ARRAY[2], repeat(md5(g::text), 16) FROM generate_series(1, 1500) g;
VACUUM tg3;
INSERT INTO tg3 SELECT g, ARRAY[2, 3], repeat(md5(g::text), 16) FROM generate_series(1, 300) g;
VACUUM tg3;
-- gist: splits, LP_DEAD cleanup on insert, vacuum, page deletion and reuse
CREATE TABLE tgi (id int, p point, b box);
CREATE INDEX tgi_p ON tgi USING gist (p);
CREATE INDEX tgi_b ON tgi USING gist (b);
INSERT INTO tgi SELECT g, point(g % 100, g / 100),
  box(point(g % 100, g / 100), point(g % 100 + 1, g / 100 + 1)) FROM generate_series(1, 6000) g;
DELETE FROM tgi WHERE p <@ box '((0,0),(60,70))';
SET enable_seqscan = off; SET enable_bitmapscan = off;
SELECT count(*) FROM tgi WHERE p <@ box '((0,0),(60,70))';
SELECT count(*) FROM tgi WHERE b && box '((0,0),(60,70))';
RESET enable_seqscan; RESET enable_bitmapscan;
INSERT INTO tgi SELECT g, point(g % 50 + 0.5, (g / 50) % 60 + 0.5),
  box(point(g % 50, (g / 50) % 60), point(g % 50 + 1, (g / 50) % 60 + 1))
  FROM generate_series(1, 1500) g;
DELETE FROM tgi WHERE p <@ box '((0,0),(60,70))';
VACUUM tgi;
VACUUM tgi;
INSERT INTO tgi SELECT g, point(g % 100, g / 100),
  box(point(g % 100, g / 100), point(g % 100 + 1, g / 100 + 1)) FROM generate_series(1, 3000) g;
-- sp-gist: quad and kd points, text prefixes, nulls; vacuum of leaves, roots and redirects
CREATE TABLE ts (id int, p point, t text);
CREATE INDEX ts_pq ON ts USING spgist (p);
CREATE INDEX ts_pk ON ts USING spgist (p kd_point_ops);
CREATE INDEX ts_t ON ts USING spgist (t);
INSERT INTO ts SELECT g, point(g % 97, g % 89), 'pre' || (g % 7) || 'fix' || md5(g::text)
  FROM generate_series(1, 5000) g;
INSERT INTO ts SELECT g, NULL, NULL FROM generate_series(1, 200) g;
INSERT INTO ts SELECT g, point(g, g), 'a' || g FROM generate_series(1, 300) g;
DELETE FROM ts WHERE id % 3 = 0;
VACUUM ts;
INSERT INTO ts SELECT g, point(g % 97, g % 89), 'pre' || (g % 7) || 'fix' || md5(g::text)
  FROM generate_series(5001, 6000) g;
DELETE FROM ts WHERE id % 5 = 0;
VACUUM ts;
CREATE TABLE ts2 (p point);
CREATE INDEX ts2_p ON ts2 USING spgist (p);
INSERT INTO ts2 SELECT point(g, g) FROM generate_series(1, 50) g;
DELETE FROM ts2 WHERE p[0] < 20;
VACUUM ts2;
-- brin: one page per range so the revmap grows; summaries grow past their page (UPDATE)
CREATE TABLE tb (id int, v int, s text) WITH (fillfactor = 10);
CREATE INDEX tb_b ON tb USING brin (id) WITH (pages_per_range = 1);
CREATE INDEX tb_s ON tb USING brin (s) WITH (pages_per_range = 1);
INSERT INTO tb SELECT g, g, 's' || g FROM generate_series(1, 30000) g;
SELECT brin_summarize_new_values('tb_b');
SELECT brin_summarize_new_values('tb_s');
UPDATE tb SET v = -v, s = repeat('z', 40) || g.id
  FROM (SELECT id FROM tb WHERE id % 50 = 0) g WHERE tb.id = g.id;
SELECT brin_desummarize_range('tb_b', 5);
SELECT brin_desummarize_range('tb_s', 7);
SELECT brin_summarize_range('tb_b', 5);
INSERT INTO tb SELECT g, g, 's' || g FROM generate_series(1, 100) g;
-- generic WAL through bloom
CREATE EXTENSION bloom;
CREATE TABLE tbl (id int, a int, b int);
CREATE INDEX tbl_bloom ON tbl USING bloom (a, b);
INSERT INTO tbl SELECT g, g % 100, g % 37 FROM generate_series(1, 5000) g;
DELETE FROM tbl WHERE id % 3 = 0;
VACUUM tbl;
INSERT INTO tbl SELECT g, g % 100, g % 37 FROM generate_series(1, 1000) g;
SELECT pg_switch_wal();
"""


def workload_sql() -> str:
    """The SQL script; tg2 is loaded by COPY (one MULTI_INSERT per heap page) to stay small."""
    rows = "".join(f"{i}\t{{1,{10 + i % 3}}}\n" for i in range(1, 30001))
    return INDEX_SQL_HEAD + rows + "\\.\n" + INDEX_SQL_TAIL


@pytest.fixture(scope="module")
def wal_copy(
    pg_cluster_module: PgTestCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    server = pg_cluster_module.create(SETTINGS)
    server.psql(workload_sql())
    server.stop()
    out = tmp_path_factory.mktemp("wal")
    for seg in sorted(server.wal_dir.iterdir()):
        if seg.is_file() and len(seg.name) == 24:
            shutil.copy(seg, out / seg.name)
    yield out


@dataclass
class Run:
    verifier: RedoVerifier
    present: Counter[tuple[str, str]]


def verify(path: Path, stop_at_mismatch: bool = False) -> Run:
    """Feed the WAL to R1's verifier, also counting which index-AM record types occur."""
    segments, seg_size = collect_segments([path])
    verifier = RedoVerifier(max_reports=20)
    present: Counter[tuple[str, str]] = Counter()
    for record in iter_records(segments, seg_size, None, None):
        if record.rmgr_name in INDEX_RMGRS:
            present[(record.rmgr_name, record.type_name)] += 1
        verifier.feed(record)
        if stop_at_mismatch and verifier.total_mismatched:
            break
    return Run(verifier, present)


def test_index_am_redo_matches_postgres(wal_copy: Path) -> None:
    run = verify(wal_copy)
    report = run.verifier.report()
    details = "\n".join(m.describe() for m in run.verifier.mismatches)
    for rmgr in INDEX_RMGRS:
        for rtype, counts in report.get(rmgr, {}).items():
            print(rmgr, rtype, counts)
            assert counts["mismatched"] == 0, (rmgr, rtype, counts, details)
            assert counts["unsupported"] == 0, (rmgr, rtype, counts)
    for rmgr, types in REQUIRED.items():
        for rtype in types:
            assert run.present[(rmgr, rtype)] > 0, f"workload produced no {rmgr} {rtype}"
    for (rmgr, rtype), n in sorted(run.present.items()):
        verified = report.get(rmgr, {}).get(rtype, {}).get("verified", 0)
        print(f"{rmgr} {rtype}: {n} records, {verified} blocks verified")
        if (rmgr, rtype) not in IMAGE_ONLY | NO_BLOCKS:
            assert verified > 0, (rmgr, rtype, n)
    assert run.verifier.ok, details


def test_broken_index_redo_is_reported(wal_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A BRIN redo that points revmap entries one item off must show up as mismatches."""
    real = brin_redo.set_revmap_entry

    def off_by_one(page: bytearray, ppr: int, heap_blk: int, blkno: int, offnum: int) -> None:
        real(page, ppr, heap_blk, blkno, offnum + 1)

    monkeypatch.setattr(brin_redo, "set_revmap_entry", off_by_one)
    run = verify(wal_copy, stop_at_mismatch=True)
    brin = run.verifier.report()["BRIN"]
    assert sum(c["mismatched"] for c in brin.values()) > 0
    assert run.verifier.mismatches[0].rmgr == "BRIN"
    assert not run.verifier.ok
