"""Decoder equality with pg_waldump on WAL written by a real PostgreSQL 15 (the oracle).

One server per compression setting runs a workload touching every index type, DDL, TOAST,
TRUNCATE, VACUUM (FULL), CLUSTER, both CREATE DATABASE strategies, DROP DATABASE, two-phase
commit, savepoints, sequences, unlogged tables and pgbench; two settings also run with
wal_consistency_checking=all. For every record, LSN, next LSN, prev, rmgr, type, rec/tot length,
xid and every block reference (rel, fork, block, image, apply, hole, compression) must equal
what pg_waldump prints. Decoded rmgr structs are then checked against what the SQL did and
against pg_controldata. The decoder runs with the C fast path and, over the uncompressed and
the lz4 (verification images) WAL, again as the pure-Python reference (NEON_PURE_PYTHON=1:
`neon waldump` and the checks in a child process): the same rows, the same checks.
"""

from __future__ import annotations

import itertools
import json
import random
import re
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from cli.pgbin import pg_binary
from cli.waldump import collect_segments, iter_records
from pg15.fpi import restore_page
from pg15.lsn import format_lsn, parse_lsn, parse_segment_file_name, segment_file_name
from pg15.records import DecodedRecord
from pg15.rmgr import dbase, multixact, relmap, sequence, smgr, xact
from pg15.rmgr.main_data import decode_main
from pg15.rmgr.xlog import XlogCheckpoint
from pg15.xlog_reader import RawRecord, WalReader
from tests.pgtest import PgTestCluster, PgTestServer
from tests.pure_python import pure_env, run_pure

pytestmark = pytest.mark.slow

SEG = 16 * 1024 * 1024
NEON = str(Path(sys.executable).with_name("neon"))

WORKLOAD = """
CREATE TABLE items (id serial PRIMARY KEY, name text, tags text[], doc tsvector, pt point,
                    rng int4range, payload text);
CREATE SEQUENCE s1;
SELECT count(nextval('s1')) FROM generate_series(1, 40);
INSERT INTO items (name, tags, doc, pt, rng, payload)
  SELECT 'item ' || g, ARRAY['t' || (g % 10), 'u' || (g % 7)],
         to_tsvector('simple', 'word' || g || ' other' || (g % 13)), point(g % 100, g / 100),
         int4range(g, g + 10),
         CASE WHEN g % 40 = 0 THEN repeat(md5(g::text), 300) ELSE 'p' END
  FROM generate_series(1, 3000) g;
CREATE INDEX items_name_btree ON items (name);
CREATE INDEX items_name_hash ON items USING hash (name);
CREATE INDEX items_tags_gin ON items USING gin (tags);
CREATE INDEX items_pt_gist ON items USING gist (pt);
CREATE INDEX items_rng_spgist ON items USING spgist (rng);
CREATE INDEX items_id_brin ON items USING brin (id) WITH (pages_per_range = 2);
INSERT INTO items (name, tags, doc, pt, rng, payload)
  SELECT 'more ' || g, ARRAY['v' || (g % 5)], to_tsvector('simple', 'late' || g),
         point(g, g), int4range(g, g + 3), repeat('z', g % 3000)
  FROM generate_series(3001, 4500) g;
UPDATE items SET name = name || 'x', payload = payload || 'y' WHERE id % 5 = 0;
DELETE FROM items WHERE id % 7 = 0;
BEGIN;
INSERT INTO items (name) VALUES ('sp1');
SAVEPOINT a;
INSERT INTO items (name) VALUES ('sp2');
ROLLBACK TO a;
SAVEPOINT b;
UPDATE items SET name = 'sp3' WHERE id = 3;
RELEASE b;
COMMIT;
BEGIN;
INSERT INTO items (name) VALUES ('rolled back');
ROLLBACK;
BEGIN;
SELECT id FROM items WHERE id = 1 FOR SHARE;
SAVEPOINT m;
UPDATE items SET name = 'multi' WHERE id = 1;
COMMIT;
BEGIN;
CREATE TABLE twopc1 (a int);
INSERT INTO twopc1 SELECT generate_series(1, 100);
PREPARE TRANSACTION 'gx1';
COMMIT PREPARED 'gx1';
BEGIN;
INSERT INTO items (name) VALUES ('gx2 row');
SAVEPOINT s;
INSERT INTO items (name) VALUES ('gx2 sub');
CREATE TABLE twopc2 (a int);
PREPARE TRANSACTION 'gx2';
ROLLBACK PREPARED 'gx2';
CREATE UNLOGGED TABLE ul (a int PRIMARY KEY, b text);
INSERT INTO ul SELECT g, 'x' FROM generate_series(1, 1000) g;
CREATE TABLE trunc_me AS SELECT g AS a FROM generate_series(1, 2000) g;
CREATE TABLE vt AS SELECT g AS a FROM generate_series(1, 5000) g;
DELETE FROM vt WHERE a > 100;
VACUUM vt;
VACUUM items;
VACUUM FULL items;
CLUSTER items USING items_pkey;
VACUUM (FREEZE) items;
VACUUM FULL pg_class;
SELECT setval('s1', 1000);
"""


@dataclass(frozen=True)
class WalRun:
    """A finished workload: copied WAL files and what the SQL reported."""

    server: PgTestServer
    wal_copy: Path
    start: int
    end: int
    facts: dict[str, int]
    control: dict[str, str]


def copy_segments(server: PgTestServer, dest: Path, start: int, end: int) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for path in server.wal_dir.iterdir():
        try:
            _, segno, _ = parse_segment_file_name(path.name)
        except Exception:
            continue
        if start // SEG <= segno <= end // SEG:
            shutil.copyfile(path, dest / path.name)


def run_workload(server: PgTestServer, dest: Path, with_pgbench: bool = True) -> WalRun:
    start = parse_lsn(server.psql("SELECT pg_current_wal_insert_lsn()")) // SEG * SEG
    facts: dict[str, int] = {}
    if with_pgbench:
        server.run("pgbench", "-i", "-s", "1", "-q", "postgres")
    server.psql(WORKLOAD)
    facts["trunc_filenode"] = int(server.psql("SELECT pg_relation_filenode('trunc_me')"))
    facts["vt_filenode"] = int(server.psql("SELECT pg_relation_filenode('vt')"))
    facts["s1_filenode"] = int(server.psql("SELECT pg_relation_filenode('s1')"))
    facts["db_postgres"] = int(
        server.psql("SELECT oid FROM pg_database WHERE datname = 'postgres'")
    )
    server.psql("TRUNCATE trunc_me")
    server.psql("CREATE DATABASE db_wal STRATEGY wal_log")
    server.psql("CREATE DATABASE db_copy STRATEGY file_copy")
    for name in ("db_wal", "db_copy"):
        facts[name] = int(server.psql(f"SELECT oid FROM pg_database WHERE datname = '{name}'"))
    server.psql("CREATE TABLE in_copy (a int); INSERT INTO in_copy VALUES (1)", dbname="db_copy")
    server.psql("DROP DATABASE db_wal")
    if with_pgbench:
        server.run("pgbench", "-t", "150", "-c", "2", "-j", "2", "postgres")
    server.psql("CHECKPOINT")
    control = parse_controldata(server.run("pg_controldata", str(server.datadir)).stdout)
    end = parse_lsn(server.psql("SELECT pg_current_wal_insert_lsn()"))
    server.psql("SELECT pg_switch_wal()")
    copy_segments(server, dest, start, end)
    return WalRun(server, dest, start, end, facts, control)


def parse_controldata(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


# ---- pg_waldump parsing ----------------------------------------------------------------------

_HEAD = re.compile(
    r"^rmgr: (\S+)\s+len \(rec/tot\):\s*(\d+)/\s*(\d+), tx:\s*(\d+), lsn: ([0-9A-F]+/[0-9A-F]+), "
    r"prev ([0-9A-F]+/[0-9A-F]+), desc: (UNKNOWN \(\w+\)|\S+)"
)
_BLOCK = re.compile(
    r"^\tblkref #(\d+): rel (\d+)/(\d+)/(\d+) fork (\w+) blk (\d+)"
    r"(?: \(FPW( for WAL verification)?\); hole: offset: (\d+), length: (\d+)"
    r"(?:, compression saved: \d+, method: (\w+))?)?$"
)


def pg_waldump(run: WalRun, *extra: str) -> str:
    proc = subprocess.run(
        [
            pg_binary("pg_waldump"),
            *extra,
            "-p",
            str(run.wal_copy),
            "-s",
            format_lsn(run.start),
            "-e",
            format_lsn(run.end),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def parse_pg_waldump_detailed(text: str) -> list[dict[str, object]]:
    """Records from `pg_waldump -b` output, in the shape of our --json rows."""
    records: list[dict[str, object]] = []
    for line in text.splitlines():
        if line.startswith("rmgr: "):
            m = _HEAD.match(line)
            assert m, line
            rmgr, rec_len, tot_len, xid, lsn, prev, type_name = m.groups()
            records.append(
                {
                    "rmgr": rmgr,
                    "rec_len": int(rec_len),
                    "tot_len": int(tot_len),
                    "xid": int(xid),
                    "lsn": lsn,
                    "prev": prev,
                    "type": type_name,
                    "blocks": [],
                }
            )
        elif line.startswith("\tblkref"):
            m = _BLOCK.match(line)
            assert m, line
            bid, spc, db, rel, fork, blk, verify, hole_off, hole_len, method = m.groups()
            image = None
            if hole_off is not None:
                image = {
                    "apply": verify is None,
                    "hole_offset": int(hole_off),
                    "hole_length": int(hole_len),
                    "compression": method,
                }
            blocks = records[-1]["blocks"]
            assert isinstance(blocks, list)
            blocks.append(
                {
                    "id": int(bid),
                    "rel": (int(spc), int(db), int(rel)),
                    "fork": fork,
                    "blk": int(blk),
                    "image": image,
                }
            )
        elif line.strip():
            raise AssertionError(f"unexpected pg_waldump line: {line!r}")
    return records


def our_rows(run: WalRun, env: dict[str, str] | None = None) -> list[dict[str, object]]:
    proc = subprocess.run(
        [
            NEON,
            "waldump",
            "--json",
            "--start",
            format_lsn(run.start),
            "--end",
            format_lsn(run.end),
            str(run.wal_copy),
        ],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def comparable(row: dict[str, object]) -> dict[str, object]:
    """Our JSON row reduced to what pg_waldump prints."""
    blocks = []
    for b in row["blocks"]:  # type: ignore[attr-defined]
        image = b["image"]
        blocks.append(
            {
                "id": b["id"],
                "rel": (b["spc"], b["db"], b["rel"]),
                "fork": b["fork"],
                "blk": b["blk"],
                "image": None
                if image is None
                else {
                    "apply": b["apply_image"],
                    "hole_offset": image["hole_offset"],
                    "hole_length": image["hole_length"],
                    "compression": image["compression"],
                },
            }
        )
        assert b["has_image"] == (image is not None)
    keys = ("rmgr", "rec_len", "tot_len", "xid", "lsn", "prev", "type")
    return {**{k: row[k] for k in keys}, "blocks": blocks}


def next_record_lsn(end_lsn: int) -> int:
    if end_lsn % 8192:
        return end_lsn
    return end_lsn + (40 if end_lsn % SEG == 0 else 24)


# ---- the oracle test -----------------------------------------------------------------------

SETTINGS = [
    pytest.param({"wal_compression": "off"}, id="off"),
    pytest.param({"wal_compression": "pglz", "wal_consistency_checking": "all"}, id="pglz-wcc"),
    pytest.param({"wal_compression": "lz4", "wal_consistency_checking": "all"}, id="lz4-wcc"),
    pytest.param({"wal_compression": "zstd"}, id="zstd"),
]


@pytest.mark.parametrize("settings", SETTINGS)
def test_decoder_matches_pg_waldump(
    pg_cluster: PgTestCluster, tmp_path: Path, settings: dict[str, str]
) -> None:
    server = pg_cluster.create({**settings, "wal_keep_size": "1GB"})
    run = run_workload(server, tmp_path / "wal")

    theirs = parse_pg_waldump_detailed(pg_waldump(run, "-b"))
    rows = our_rows(run)
    assert len(rows) == len(theirs) > 1000
    for ours, expected in zip(rows, theirs, strict=True):
        assert comparable(ours) == expected, expected["lsn"]
    for row, nxt in itertools.pairwise(rows):
        assert next_record_lsn(parse_lsn(str(row["end_lsn"]))) == parse_lsn(str(nxt["lsn"]))
    assert parse_lsn(str(rows[-1]["end_lsn"])) == run.end
    # The pure-Python reader and decoder (NEON_PURE_PYTHON=1) on two of the four WALs: plain,
    # and compressed with verification images (pglz and zstd differ from lz4 in one flag bit
    # of the image header; a pure `neon waldump --json` of one WAL takes 20-25 s at load 14).
    pure = settings["wal_compression"] in ("off", "lz4")
    if pure:
        assert our_rows(run, pure_env()) == rows  # every field

    if settings["wal_compression"] == "off":
        # Text mode: the columns pg_waldump prints before the desc details, and the blkrefs.
        check_text_output(run)
        check_text_output(run, pure_env())

    wal = (run.wal_copy, run.start, run.end, run.facts, run.control, settings)
    lsns = check_decoded(*wal)
    assert lsns == [row["lsn"] for row in rows]
    if pure:
        assert run_pure(check_decoded, *wal) == lsns


def check_decoded(
    wal_copy: Path,
    start: int,
    end: int,
    facts: dict[str, int],
    control: dict[str, str],
    settings: dict[str, str],
) -> list[str]:
    """The decoded records' images, rmgr structs and coverage checked; their LSNs."""
    records = list(iter_records(*collect_segments([wal_copy]), start, end))
    check_images(records, settings)
    check_rmgr_structs(records, facts, control)
    check_coverage(records, settings)
    return [format_lsn(r.lsn) for r in records]


def check_text_output(run: WalRun, env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(
        [NEON, "waldump", "--end", format_lsn(run.end), str(run.wal_copy)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    ours = proc.stdout.splitlines()
    theirs = pg_waldump(run).splitlines()
    assert len(ours) == len(theirs)
    for mine, expected in zip(ours, theirs, strict=True):
        head_mine, _, blocks_mine = mine.partition(", blkref")
        assert expected.startswith(head_mine), (mine, expected)
        if blocks_mine:
            assert expected.endswith(", blkref" + blocks_mine), (mine, expected)


def check_images(records: list[DecodedRecord], settings: dict[str, str]) -> None:
    """Every image restores to a sane page whose hole is exactly [pd_lower, pd_upper)."""
    method = settings["wal_compression"]
    # pglz is a Python byte loop: restore every 8th of its images to keep the run short.
    stride = 8 if method == "pglz" else 1
    compressed = verify_only = restored = 0
    for i, rec in enumerate(records):
        for blk in rec.blocks:
            if blk.image is None:
                continue
            if blk.image.compression is not None:
                compressed += 1
                assert blk.image.compression == method
            verify_only += not blk.image.apply
            if i % stride:
                continue
            restored += 1
            page = restore_page(blk.image)
            assert len(page) == 8192
            if not any(page):
                continue
            hi, lo, _checksum, _flags, lower, upper, special, size_version = struct.unpack_from(
                "<IIHHHHHH", page
            )
            assert size_version == 0x2004, (format_lsn(rec.lsn), blk)
            assert 24 <= lower <= upper <= special <= 8192
            assert (hi << 32 | lo) <= rec.lsn
            if blk.image.hole_length:
                assert blk.image.hole_offset == lower
                assert blk.image.hole_offset + blk.image.hole_length == upper
    assert restored > 100
    assert (compressed > 100) == (method != "off")
    assert (verify_only > 100) == ("wal_consistency_checking" in settings)


def check_rmgr_structs(
    records: list[DecodedRecord], facts: dict[str, int], control: dict[str, str]
) -> None:
    decoded = [(rec, decode_main(rec)) for rec in records]  # must not raise on any record
    mains = [m for _, m in decoded]

    prepares = {m.gid: m for m in mains if isinstance(m, xact.XactPrepare)}
    assert {"gx1", "gx2"} <= set(prepares)
    gx1, gx2 = prepares["gx1"], prepares["gx2"]
    assert len(gx2.subxacts) == 1 and gx2.database == facts["db_postgres"]
    assert gx1.abort_rels and gx2.abort_rels and not gx1.commit_rels  # each created a table
    committed = [m for m in mains if isinstance(m, xact.XactCommit) and m.two_phase_xid]
    aborted = [m for m in mains if isinstance(m, xact.XactAbort) and m.two_phase_xid]
    assert [m.two_phase_xid for m in committed] == [gx1.xid]
    assert [m.two_phase_xid for m in aborted] == [gx2.xid]
    assert aborted[0].subxacts == gx2.subxacts
    assert set(aborted[0].rels) == set(gx2.abort_rels) and aborted[0].rels

    dropped = {rel for m in mains if isinstance(m, xact.XactCommit) for rel in m.rels}
    trunc = next(r for r in dropped if r.rel == facts["trunc_filenode"])
    assert trunc.db == facts["db_postgres"] and trunc.spc == 1663
    assert any(isinstance(m, xact.XactCommit) and m.subxacts for m in mains)

    creates = [
        m for m in mains if isinstance(m, (dbase.DbaseCreateWalLog, dbase.DbaseCreateFileCopy))
    ]
    by_strategy = {m.strategy: m for m in creates}
    assert by_strategy["wal_log"].db_id == facts["db_wal"]
    file_copy = by_strategy["file_copy"]
    assert isinstance(file_copy, dbase.DbaseCreateFileCopy)
    assert (file_copy.db_id, file_copy.src_db_id) == (facts["db_copy"], 1)
    drops = [m for m in mains if isinstance(m, dbase.DbaseDrop)]
    assert [d.db_id for d in drops] == [facts["db_wal"]] and drops[0].tablespace_ids == (1663,)
    maps = [m for m in mains if isinstance(m, relmap.RelmapUpdate) and m.db_id == facts["db_wal"]]
    assert maps and all(len(m.mappings) > 5 for m in maps)

    truncates = [m for m in mains if isinstance(m, smgr.SmgrTruncate)]
    assert any(t.rnode.rel == facts["vt_filenode"] and t.truncates_main for t in truncates)
    assert any(isinstance(m, smgr.SmgrCreate) and m.rnode.db == facts["db_copy"] for m in mains)

    seqs = [
        m for m in mains if isinstance(m, sequence.SeqLog) and m.rnode.rel == facts["s1_filenode"]
    ]
    assert seqs[-1].last_value == 1000 and seqs[-1].is_called

    creates_mx = [m for m in mains if isinstance(m, multixact.MultiXactCreate)]
    assert any(len(m.members) == 2 for m in creates_mx)

    checkpoints = [(rec, m) for rec, m in decoded if isinstance(m, XlogCheckpoint)]
    _rec, last = next(
        (rec, m)
        for rec, m in reversed(checkpoints)
        if rec.lsn == parse_lsn(control["Latest checkpoint location"])
    )
    cp = last.checkpoint
    assert not last.shutdown
    assert cp.redo == parse_lsn(control["Latest checkpoint's REDO location"])
    assert str(cp.this_timeline) == control["Latest checkpoint's TimeLineID"]
    assert str(cp.prev_timeline) == control["Latest checkpoint's PrevTimeLineID"]
    assert ("on" if cp.full_page_writes else "off") == control[
        "Latest checkpoint's full_page_writes"
    ]
    assert f"{cp.next_xid_epoch}:{cp.next_xid}" == control["Latest checkpoint's NextXID"]
    assert str(cp.next_oid) == control["Latest checkpoint's NextOID"]
    assert str(cp.next_multi) == control["Latest checkpoint's NextMultiXactId"]
    assert str(cp.next_multi_offset) == control["Latest checkpoint's NextMultiOffset"]
    assert str(cp.oldest_xid) == control["Latest checkpoint's oldestXID"]
    assert str(cp.oldest_xid_db) == control["Latest checkpoint's oldestXID's DB"]
    assert str(cp.oldest_active_xid) == control["Latest checkpoint's oldestActiveXID"]
    assert str(cp.oldest_multi) == control["Latest checkpoint's oldestMultiXid"]
    assert str(cp.oldest_multi_db) == control["Latest checkpoint's oldestMulti's DB"]
    assert cp.next_multi > 1  # the FOR SHARE + savepoint UPDATE made a multixact


def check_coverage(records: list[DecodedRecord], settings: dict[str, str]) -> None:
    """The workload really produced what the oracle is meant to cover."""
    seen = {(r.rmgr_name, r.type_name) for r in records}
    rmgrs = {name for name, _ in seen}
    assert {
        "XLOG",
        "Transaction",
        "Storage",
        "CLOG",
        "Database",
        "MultiXact",
        "RelMap",
        "Standby",
        "Heap2",
        "Heap",
        "Btree",
        "Hash",
        "Gin",
        "Gist",
        "Sequence",
        "SPGist",
        "BRIN",
    } <= rmgrs, rmgrs
    expected = {
        ("Transaction", "PREPARE"),
        ("Transaction", "COMMIT_PREPARED"),
        ("Transaction", "ABORT_PREPARED"),
        ("Transaction", "ABORT"),
        ("Database", "CREATE_WAL_LOG"),
        ("Database", "CREATE_FILE_COPY"),
        ("Database", "DROP"),
        ("Storage", "CREATE"),
        ("Storage", "TRUNCATE"),
        ("XLOG", "CHECKPOINT_ONLINE"),
        ("XLOG", "FPI"),
        ("Heap", "INSERT"),
        ("Heap", "HOT_UPDATE"),
        ("Heap", "DELETE"),
        ("Heap", "LOCK"),
        ("Heap2", "MULTI_INSERT+INIT"),
        ("Heap2", "PRUNE"),
        ("Heap2", "VISIBLE"),
        ("Heap2", "FREEZE_PAGE"),
        ("Btree", "INSERT_LEAF"),
        ("Btree", "SPLIT_R"),
        ("MultiXact", "CREATE_ID"),
        ("Sequence", "LOG"),
        ("RelMap", "UPDATE"),
        ("Standby", "RUNNING_XACTS"),
    }
    assert expected <= seen, expected - seen
    assert not any(name.startswith("UNKNOWN") for _, name in seen)


# ---- bad input -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_wal(pg_cluster_module: PgTestCluster, tmp_path_factory: pytest.TempPathFactory) -> WalRun:
    server = pg_cluster_module.create({"wal_keep_size": "1GB"})
    server.psql(
        "CREATE TABLE t (a int, b text); "
        "INSERT INTO t SELECT g, repeat('v', g % 500) FROM generate_series(1, 20000) g; "
        "CREATE INDEX ON t (a);"
    )
    start = parse_lsn(server.psql("SELECT pg_current_wal_insert_lsn()")) // SEG * SEG
    server.psql("UPDATE t SET b = b || 'w' WHERE a % 3 = 0")
    server.psql("SELECT pg_switch_wal()")
    server.psql("UPDATE t SET b = b || 'q' WHERE a % 5 = 0")
    end = parse_lsn(server.psql("SELECT pg_current_wal_insert_lsn()"))
    server.psql("SELECT pg_switch_wal()")
    dest = tmp_path_factory.mktemp("small-wal")
    copy_segments(server, dest, start, end)
    return WalRun(server, dest, start, end, {}, {})


def neon_waldump(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [NEON, "waldump", "--json", *args], capture_output=True, text=True, check=False
    )


def _segment(run: WalRun) -> Path:
    path = run.wal_copy / segment_file_name(1, run.start // SEG)
    assert path.exists()
    return path


def _lsns(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [json.loads(line)["lsn"] for line in proc.stdout.splitlines()]


def test_flipped_byte_reports_lsn_and_segment(small_wal: WalRun, tmp_path: Path) -> None:
    seg = _segment(small_wal)
    full = neon_waldump(str(seg))
    assert full.returncode == 0, full.stderr
    rows = [json.loads(line) for line in full.stdout.splitlines()]
    # A record in the middle of the file that lies within one page.
    victim = next(
        r
        for r in rows[len(rows) // 2 :]
        if r["tot_len"] > 40 and parse_lsn(r["lsn"]) // 8192 == (parse_lsn(r["lsn"]) + 40) // 8192
    )
    lsn = parse_lsn(victim["lsn"])
    damaged = bytearray(seg.read_bytes())
    damaged[lsn % SEG + 30] ^= 0x10
    bad = tmp_path / seg.name
    bad.write_bytes(bytes(damaged))
    proc = neon_waldump(str(bad))
    assert proc.returncode != 0
    assert proc.stderr.startswith("neon: error: ") and proc.stderr.count("\n") == 1
    assert victim["lsn"] in proc.stderr and seg.name in proc.stderr
    before = [r["lsn"] for r in rows if parse_lsn(r["lsn"]) < lsn]
    assert _lsns(proc) == before


def test_truncated_segment(small_wal: WalRun, tmp_path: Path) -> None:
    seg = _segment(small_wal)
    full = [json.loads(line) for line in neon_waldump(str(seg)).stdout.splitlines()]
    cut = 37 * 8192
    truncated = tmp_path / seg.name
    truncated.write_bytes(seg.read_bytes()[:cut])
    expected = [r["lsn"] for r in full if parse_lsn(r["end_lsn"]) <= small_wal.start + cut]
    proc = neon_waldump(str(truncated))
    assert proc.returncode != 0 and "truncated" in proc.stderr and seg.name in proc.stderr
    assert _lsns(proc) == expected and expected
    partial = tmp_path / (seg.name + ".partial")
    truncated.rename(partial)
    proc = neon_waldump(str(partial))
    assert proc.returncode == 0, proc.stderr
    assert _lsns(proc) == expected


def test_wrong_magic_and_non_wal_files(small_wal: WalRun, tmp_path: Path) -> None:
    seg = _segment(small_wal)
    data = bytearray(seg.read_bytes())
    later = bytearray(data)
    struct.pack_into("<H", later, 5 * 8192, 0xD10D)  # a PG 14 magic on page 5
    bad = tmp_path / "later" / seg.name
    bad.parent.mkdir()
    bad.write_bytes(bytes(later))
    proc = neon_waldump(str(bad.parent))
    assert proc.returncode != 0
    assert "magic" in proc.stderr and format_lsn(small_wal.start + 5 * 8192) in proc.stderr
    assert seg.name in proc.stderr
    lsns = _lsns(proc)
    assert lsns and all(parse_lsn(x) < small_wal.start + 5 * 8192 for x in lsns)

    struct.pack_into("<H", data, 0, 0x1234)
    first = tmp_path / "first" / seg.name
    first.parent.mkdir()
    first.write_bytes(bytes(data))
    proc = neon_waldump(str(first))
    assert proc.returncode != 0 and "magic" in proc.stderr and proc.stdout == ""

    text = tmp_path / "notes.txt"
    text.write_text("not WAL at all\n" * 100)
    proc = neon_waldump(str(text))
    assert proc.returncode != 0 and "not a PostgreSQL 15 WAL segment" in proc.stderr


def test_bad_arguments(small_wal: WalRun, tmp_path: Path) -> None:
    proc = neon_waldump("--start", "nonsense", str(small_wal.wal_copy))
    assert proc.returncode == 2 and "invalid LSN" in proc.stderr
    proc = neon_waldump(str(tmp_path / "missing"))
    assert proc.returncode != 0 and "does not exist" in proc.stderr
    proc = neon_waldump("--start", "FF/0", str(small_wal.wal_copy))
    assert proc.returncode != 0 and "outside" in proc.stderr


def test_start_and_end_select_records_like_pg_waldump(small_wal: WalRun) -> None:
    rows = [json.loads(x) for x in neon_waldump(str(small_wal.wal_copy)).stdout.splitlines()]
    first, last = rows[10], rows[-10]
    proc = neon_waldump("--start", first["lsn"], "--end", last["end_lsn"], str(small_wal.wal_copy))
    assert proc.returncode == 0, proc.stderr
    assert _lsns(proc) == [r["lsn"] for r in rows[10:-9]]
    theirs = subprocess.run(
        [
            pg_binary("pg_waldump"),
            "-p",
            str(small_wal.wal_copy),
            "-s",
            first["lsn"],
            "-e",
            last["end_lsn"],
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert [m.group(5) for m in map(_HEAD.match, theirs) if m] == _lsns(proc)


def test_files_in_any_order_and_random_chunks(small_wal: WalRun) -> None:
    files = sorted(small_wal.wal_copy.iterdir())
    assert len(files) >= 2
    from_dir = neon_waldump(str(small_wal.wal_copy))
    reversed_files = neon_waldump(*map(str, reversed(files)))
    assert from_dir.returncode == reversed_files.returncode == 0
    assert from_dir.stdout == reversed_files.stdout

    # Streaming-style feeding of the same bytes in random chunk sizes gives the same records.
    stream = b"".join(f.read_bytes() for f in files)
    whole = WalReader(small_wal.start)
    whole.feed(stream)
    expected = list(whole.records())
    rng = random.Random(15)
    chunked = WalReader(small_wal.start)
    got: list[RawRecord] = []
    pos = 0
    while pos < len(stream):
        step = rng.choice([1, 13, 500, 8192, 131072, 1 << 20])
        chunked.feed(stream[pos : pos + step])
        pos += step
        got.extend(chunked.records())
    assert got == expected and len(expected) > 1000
    assert [r.lsn for r in expected] == [parse_lsn(x) for x in _lsns(from_dir)]
