"""LSN indexes: commit-time lookups, sparse boundaries, durability (torn tails, re-ingest),
and exactness against the WAL of a real PostgreSQL 15 (snap() equals the record boundaries our
reader reports; lsn_for_time() brackets commits whose times SQL reported)."""

from __future__ import annotations

import bisect
import errno
import itertools
import os
import random
import shutil
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from pageserver.ingest import lsn_index as lsn_index_module
from pageserver.ingest import native
from pageserver.ingest.lsn_index import (
    ENTRY_SIZE,
    INDEX_FILE,
    SAMPLE_DISTANCE,
    LsnIndex,
    archive_reader,
    datetime_to_pg_time,
    pg_time_to_datetime,
)
from pg15.constants import RM_HEAP_ID, RM_XACT_ID
from pg15.lsn import parse_lsn, parse_segment_file_name
from pg15.records import DecodedRecord, decode_record
from pg15.rmgr.main_data import decode_main
from pg15.rmgr.xact import (
    XLOG_XACT_COMMIT,
    XLOG_XACT_COMMIT_PREPARED,
    XLOG_XACT_OPMASK,
    XactCommit,
)
from pg15.xlog_reader import WalReader
from proto.errors import CorruptData, InvalidArgument, NotFound
from tests.native_ext import require_c_extension
from tests.pgtest import PgTestCluster

SEG = 16 << 20
T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)


def rec(end: int, *, at: datetime | None = None, info: int = XLOG_XACT_COMMIT) -> DecodedRecord:
    """A record ending at `end`: a commit at `at`, or else a heap record."""
    if at is None:
        return DecodedRecord(end - 64, end, 64, 0, 0, 0, RM_HEAP_ID, (), b"")
    main = datetime_to_pg_time(at).to_bytes(8, "little", signed=True)
    return DecodedRecord(end - 64, end, 64, 9, 0, info, RM_XACT_ID, (), main)


def test_pg_epoch_conversions() -> None:
    assert pg_time_to_datetime(0) == datetime(2000, 1, 1, tzinfo=UTC)
    assert datetime_to_pg_time(datetime(2000, 1, 1, 0, 0, 1, 5, tzinfo=UTC)) == 1_000_005
    t = datetime(2024, 3, 1, 13, 0, 0, 123456, tzinfo=timezone(timedelta(hours=1)))
    assert pg_time_to_datetime(datetime_to_pg_time(t)) == t
    assert datetime_to_pg_time(datetime(1999, 12, 31, 23, 59, 59, tzinfo=UTC)) == -1_000_000
    with pytest.raises(InvalidArgument, match="time zone"):
        datetime_to_pg_time(datetime(2024, 1, 1))


def test_lsn_for_time_follows_recovery_target_time(tmp_path: Path) -> None:
    index = LsnIndex(tmp_path, SEG)
    assert index.lsn_for_time(T0) is None and index.bounds() is None
    # Commit times are not monotonic in LSN order (concurrent commits).
    times = [0, 10, 30, 20, 40, 40, 50]
    for i, minutes in enumerate(times):
        index.observe(rec(1000 * (i + 1), at=T0 + timedelta(minutes=minutes)))
        index.observe(rec(1000 * (i + 1) + 500))  # not a commit
    index.observe(rec(9000, at=T0 + timedelta(minutes=60), info=XLOG_XACT_COMMIT_PREPARED | 0x80))
    index.observe(rec(9500, at=T0 + timedelta(minutes=1), info=0x20))  # an abort: ignored

    def at(minutes: float) -> int | None:
        return index.lsn_for_time(T0 + timedelta(minutes=minutes))

    assert at(-1) is None
    assert at(0) == 1000
    assert at(15) == 2000
    assert at(20) == 2000  # the commit at 30 comes first in WAL order: stop before it
    assert at(30) == 4000
    assert at(45) == 6000
    assert at(59) == 7000
    assert at(600) == 9000
    assert index.bounds() == ((T0, 1000), (T0 + timedelta(minutes=60), 9000))
    assert [lsn for lsn, _ in index.commits()] == [1000 * i for i in range(1, 8)] + [9000]


def test_sparse_boundaries(tmp_path: Path) -> None:
    index = LsnIndex(tmp_path, SEG)
    step = 8192
    for i in range(1, 400):
        index.observe(rec(SEG + i * step))
    got = index.boundaries()
    assert got[0] == SEG + step
    assert all(b - a >= SAMPLE_DISTANCE for a, b in itertools.pairwise(got))
    assert len(got) == 1 + (399 * step - step) // SAMPLE_DISTANCE
    index.add_boundary(SEG + 400 * step + 8, SEG + 400 * step - 56)
    assert index.boundaries()[-1] == SEG + 400 * step + 8
    assert index.wal_needed_from(SEG + 100 * step) <= SEG + 100 * step
    with pytest.raises(NotFound):
        index.snap(SEG, lambda a, b: b"")


def test_durability_reingest_and_torn_tails(tmp_path: Path) -> None:
    index = LsnIndex(tmp_path, SEG)
    for i in range(1, 6):
        index.observe(rec(1000 * i, at=T0 + timedelta(seconds=i)))
    assert not (tmp_path / INDEX_FILE).exists()  # nothing written before flush
    index.flush()
    index.observe(rec(6000, at=T0 + timedelta(seconds=6)))  # never flushed: lost in a "crash"
    reopened = LsnIndex(tmp_path, SEG)
    assert [lsn for lsn, _ in reopened.commits()] == [1000, 2000, 3000, 4000, 5000]
    # Re-ingest from an older durable LSN: known entries are ignored, new ones appended.
    for i in range(3, 8):
        reopened.observe(rec(1000 * i, at=T0 + timedelta(seconds=i)))
    reopened.flush()
    reopened.flush()  # nothing pending: a no-op
    path = tmp_path / INDEX_FILE
    assert path.stat().st_size == 7 * ENTRY_SIZE
    assert [lsn for lsn, _ in LsnIndex(tmp_path, SEG).commits()] == [1000 * i for i in range(1, 8)]
    # A torn append: half an entry.
    with open(path, "ab") as f:
        f.write(b"\x01" * (ENTRY_SIZE // 2))
    assert len(LsnIndex(tmp_path, SEG).commits()) == 7
    assert path.stat().st_size == 7 * ENTRY_SIZE
    # A corrupt last entry (bit flip) and a zero-filled tail.
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data) + bytes(3 * ENTRY_SIZE))
    survivor = LsnIndex(tmp_path, SEG)
    assert [lsn for lsn, _ in survivor.commits()] == [1000 * i for i in range(1, 7)]
    assert path.stat().st_size == 6 * ENTRY_SIZE
    survivor.observe(rec(7000, at=T0 + timedelta(seconds=7)))
    survivor.flush()
    assert LsnIndex(tmp_path, SEG).lsn_for_time(T0 + timedelta(days=1)) == 7000


@pytest.mark.parametrize("failing", ["write", "fsync"])
def test_a_failed_flush_is_written_again_not_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """A flush that fails after its bytes (all, or some) reached the file: the next flush
    writes them again over the same place. Appended a second time, the repeated entries
    stopped `_load`, which cut off every entry flushed after them. The disk error is injected
    at the system call (one cannot be made on demand here)."""
    index = LsnIndex(tmp_path, SEG)
    index.observe(rec(1000, at=T0))
    index.flush()
    for i in (2, 3):
        index.observe(rec(1000 * i, at=T0 + timedelta(seconds=i)))
    real_pwrite, real_fsync = os.pwrite, os.fsync

    def short_pwrite(fd: int, data: bytes, offset: int) -> int:
        real_pwrite(fd, bytes(data)[: ENTRY_SIZE + 5], offset)
        raise OSError(errno.ENOSPC, "No space left on device")

    def lost_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    if failing == "write":
        monkeypatch.setattr(lsn_index_module.os, "pwrite", short_pwrite)
    else:
        monkeypatch.setattr(lsn_index_module.os, "fsync", lost_fsync)
    with pytest.raises(OSError):
        index.flush()
    monkeypatch.setattr(lsn_index_module.os, "pwrite", real_pwrite)
    monkeypatch.setattr(lsn_index_module.os, "fsync", real_fsync)
    index.observe(rec(4000, at=T0 + timedelta(seconds=4)))
    index.flush()
    assert (tmp_path / INDEX_FILE).stat().st_size == 4 * ENTRY_SIZE
    assert [lsn for lsn, _ in LsnIndex(tmp_path, SEG).commits()] == [1000, 2000, 3000, 4000]


# --- against a real server --------------------------------------------------------------------

N_TXNS = 6


def read_all_records(wal_dir: Path, start: int) -> list[DecodedRecord]:
    reader = WalReader(start, SEG)
    out: list[DecodedRecord] = []
    read_wal = archive_reader(wal_dir, SEG)
    pos = start
    while reader.end_of_wal is None:
        data = read_wal(pos, pos + (1 << 20))
        if not data:
            break
        reader.feed(data)
        pos += len(data)
        out.extend(decode_record(raw) for raw in reader.records())
    return out


def test_real_wal_snap_and_commit_times(pg_cluster: PgTestCluster, tmp_path: Path) -> None:
    server = pg_cluster.create({"autovacuum": "off"})
    start = parse_lsn(server.psql("SELECT pg_current_wal_insert_lsn()")) // SEG * SEG
    script = ["CREATE TABLE t (a int, b text);"]
    for i in range(N_TXNS):
        script.append(
            "BEGIN; SELECT (extract(epoch FROM now()) * 1000000)::bigint, txid_current();"
            f" INSERT INTO t SELECT g, repeat('x{i}', 150) FROM generate_series(1, 1500) g;"
            " COMMIT; SELECT pg_sleep(0.02);"
        )
        if i == 2:
            script.append("SELECT pg_switch_wal() IS NOT NULL;")
        if i == 3:
            script.append(
                "BEGIN; INSERT INTO t VALUES (-1); PREPARE TRANSACTION 'g1'; COMMIT PREPARED 'g1';"
            )
    script.append("SELECT (extract(epoch FROM now()) * 1000000)::bigint, 0;")
    rows = [line.split("|") for line in server.psql("\n".join(script)).splitlines() if "|" in line]
    assert len(rows) == N_TXNS + 1
    starts = [pg_time_to_datetime(int(us) - 946_684_800_000_000) for us, _ in rows]
    xids = [int(x) for _, x in rows[:N_TXNS]]
    end = parse_lsn(server.psql("SELECT pg_current_wal_insert_lsn()"))
    wal = tmp_path / "wal"
    wal.mkdir()
    for path in server.wal_dir.iterdir():
        try:
            _, segno, _ = parse_segment_file_name(path.name, SEG)
        except InvalidArgument:
            continue
        if start // SEG <= segno <= end // SEG:
            shutil.copyfile(path, wal / path.name)

    records = read_all_records(wal, start)
    assert records and records[-1].end_lsn >= end - 8192
    index = LsnIndex(tmp_path / "idx", SEG)
    for r in records:
        index.observe(r)

    # Commit times: every commit record, with its own xact_time, in WAL order.
    expected = []
    for r in records:
        if r.rmgr_id == RM_XACT_ID and (r.info & XLOG_XACT_OPMASK) in (
            XLOG_XACT_COMMIT,
            XLOG_XACT_COMMIT_PREPARED,
        ):
            parsed = decode_main(r)
            assert isinstance(parsed, XactCommit)
            expected.append((r.end_lsn, pg_time_to_datetime(parsed.xact_time)))
    assert index.commits() == expected
    assert any(r.info & XLOG_XACT_OPMASK == XLOG_XACT_COMMIT_PREPARED for r in records)
    commit_of = {r.xid: r.end_lsn for r in records if r.rmgr_id == RM_XACT_ID}
    for i in range(N_TXNS):
        mine = commit_of[xids[i]]
        after = index.lsn_for_time(starts[i + 1])
        assert after is not None and after >= mine  # committed before the next one began
        before = index.lsn_for_time(starts[i])
        assert before is None or before < mine  # not yet committed when it began
    first_time, _ = index.bounds() or ((T0, 0), (T0, 0))
    assert index.lsn_for_time(first_time[0] - timedelta(microseconds=1)) is None

    # snap() is exact at random LSNs, at every boundary and next to it.
    ends = [r.end_lsn for r in records]
    read_wal = archive_reader(wal, SEG)
    rng = random.Random(7)
    probes = [rng.randrange(ends[0], ends[-1] + 1) for _ in range(300)]
    probes += [e + d for e in rng.sample(ends, min(100, len(ends))) for d in (-1, 0, 1)]
    probes += [e for e in ends if e % SEG == 0]  # ends of XLOG_SWITCH records
    for lsn in probes:
        if lsn < ends[0]:
            continue
        want = ends[bisect.bisect_right(ends, lsn) - 1]
        assert index.snap(lsn, read_wal) == want, lsn
    assert len(index.boundaries()) >= 3

    # Durable and idempotent across a re-ingest.
    index.flush()
    again = LsnIndex(tmp_path / "idx", SEG)
    assert again.commits() == expected and again.boundaries() == index.boundaries()
    size = (tmp_path / "idx" / INDEX_FILE).stat().st_size
    for r in records:
        again.observe(r)
    again.flush()
    assert (tmp_path / "idx" / INDEX_FILE).stat().st_size == size


def test_observe_all_in_c_equals_observe_per_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`_walingest.index_entries` (LsnIndex.observe_all's C loop) against observe per record:
    commits (times going back and forth, prepared ones), aborts, sparse other records, a
    stretch already known (re-ingest), and a commit without its xact_time, which raises."""
    require_c_extension(native.walingest, "pageserver.ingest._walingest")
    rng = random.Random(5)
    base = datetime(2026, 1, 1, tzinfo=UTC)
    records: list[DecodedRecord] = []
    end = 0x1000000
    for _ in range(20000):
        end += rng.choice((64, 200, 8192, 40000))
        kind = rng.random()
        if kind < 0.2:
            at = base + timedelta(seconds=rng.randint(-50, 500))
            info = rng.choice((XLOG_XACT_COMMIT, XLOG_XACT_COMMIT_PREPARED, 0x20))  # 0x20: ABORT
            records.append(rec(end, at=at, info=info))
        else:
            records.append(rec(end))
    reference, fast = LsnIndex(tmp_path / "ref", SEG), LsnIndex(tmp_path / "fast", SEG)
    with monkeypatch.context() as m:
        m.setattr(native, "walingest", None)
        for i in range(0, 12000, 700):
            reference.observe_all(records, i, min(i + 700, 12000))
    for record in records[:12000]:
        fast.observe(record)  # the per-record path: the reference of both loops
    assert reference.last_lsn == fast.last_lsn
    reference.flush()
    fast.flush()
    assert reference.path.read_bytes() == fast.path.read_bytes()
    reference = LsnIndex(tmp_path / "ref2", SEG)
    fast = LsnIndex(tmp_path / "fast2", SEG)
    for record in records:
        reference.observe(record)
    for i in range(0, len(records), 700):
        fast.observe_all(records, i, min(i + 700, len(records)))
        fast.observe_all(records, max(0, i - 300), i)  # known already: nothing
    reference.flush()
    fast.flush()
    assert fast.path.read_bytes() == reference.path.read_bytes()
    assert len(fast.path.read_bytes()) > 1000 * ENTRY_SIZE
    probe = base + timedelta(seconds=100)
    assert fast.lsn_for_time(probe) == reference.lsn_for_time(probe)
    short = DecodedRecord(end, end + 64, 64, 9, 0, XLOG_XACT_COMMIT, RM_XACT_ID, (), b"\0" * 4)
    with pytest.raises(CorruptData, match="xact_time"):
        fast.observe_all([records[-1], short], 0, 2)
