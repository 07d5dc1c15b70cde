"""The transaction records (commit, abort, two-phase) of a node's history around a point:
what a PITR slider shows next to a chosen LSN, each row an extraction point.

Read from the node's archived WAL with the WAL decoder, located by the LSN index's record
boundary samples (pageserver/ingest/lsn_index.py). Why not from the index alone: its fixed
32-byte entries keep a commit's end LSN and time but no XID, and no abort or PREPARE record
at all; widening them would need a format version the file does not have, and a rebuild of
every existing index from WAL that may be gone. The archive holds exactly the WAL an
extraction needs (GC keeps it from each PITR window's start: `collect_garbage`), so every
extractable point can be listed; below that, nothing is (`scanned_from` says where reading
began).

Kinds (PostgreSQL 15 src/include/access/xact.h, XLOG_XACT_* in xl_info & XLOG_XACT_OPMASK):
COMMIT and ABORT carry the transaction's XID as the record's xl_xid (RecordTransactionCommit
and RecordTransactionAbort, src/backend/access/transam/xact.c, write none without an XID);
COMMIT_PREPARED and ABORT_PREPARED are written by the session that finishes the prepared
transaction, so its XID is the record's xl_xact_twophase (XACT_XINFO_HAS_TWOPHASE); PREPARE's
main data is the TwoPhaseFileHeader (src/backend/access/transam/twophase.c) with the XID and
prepared_at. Times are TimestampTz: xact_time, or prepared_at for PREPARE.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from pageserver.history.node_store import NodeStore
from pageserver.ingest.lsn_index import LsnIndex, ReadWal, archive_reader, pg_time_to_datetime
from pg15.constants import RM_XACT_ID
from pg15.lsn import segment_start
from pg15.records import decode_record
from pg15.rmgr import xact
from pg15.xlog_reader import RawRecord, WalReader
from proto.errors import InvalidArgument, NotFound
from walreceiver.archive import WalArchive

KINDS = {
    xact.XLOG_XACT_COMMIT: "commit",
    xact.XLOG_XACT_ABORT: "abort",
    xact.XLOG_XACT_PREPARE: "prepare",
    xact.XLOG_XACT_COMMIT_PREPARED: "commit prepared",
    xact.XLOG_XACT_ABORT_PREPARED: "abort prepared",
}
DEFAULT_LIMIT = 10
MAX_LIMIT = 1000
SCAN_BUDGET = 64 * 1024 * 1024
"""Bytes of WAL one listing decodes at most (both sides together): a point inside a large
transaction with no commit near it stops here instead of reading the whole archive."""
READ_CHUNK = 1024 * 1024
FIRST_STEP = 256 * 1024
"""How far back the first step before a point reads; each next step reads twice as far."""
_XL_RMID = 17
"""Offset of xl_rmid in XLogRecord (src/include/access/xlogrecord.h)."""


@dataclass(frozen=True, slots=True)
class XactRecord:
    lsn: int
    """Where the record starts."""
    end_lsn: int
    """Where it ends: an extraction at this LSN is the state just after it."""
    xid: int
    kind: str
    """commit, abort, prepare, commit prepared or abort prepared."""
    time: datetime
    gid: str | None = None
    """A PREPARE's GID; COMMIT/ABORT PREPARED carry it only at wal_level=logical
    (XACT_XINFO_HAS_GID, XactLogCommitRecord in xact.c)."""


@dataclass(frozen=True, slots=True)
class XactListing:
    point: int
    before: tuple[XactRecord, ...]
    """The last records ending at or before `point`, oldest first."""
    after: tuple[XactRecord, ...]
    """The first records ending after `point`, oldest first."""
    scanned_from: int
    """The WAL read starts here: records before it were not looked at (WAL not archived
    any more, or the scan budget)."""
    scanned_to: int


def xact_record(raw: RawRecord) -> XactRecord | None:
    """The row of a transaction-finishing record (or PREPARE); None for any other record."""
    if raw.data[_XL_RMID] != RM_XACT_ID:
        return None
    record = decode_record(raw)
    kind = KINDS.get(record.info & xact.XLOG_XACT_OPMASK)
    if kind is None:
        return None  # assignment, invalidations
    body = xact.decode(record.info, record.main_data)
    if isinstance(body, xact.XactPrepare):
        return XactRecord(
            raw.lsn, raw.end_lsn, body.xid, kind, pg_time_to_datetime(body.prepared_at), body.gid
        )
    assert isinstance(body, xact.XactFinish)
    xid = body.two_phase_xid if body.two_phase_xid is not None else record.xid
    return XactRecord(
        raw.lsn, raw.end_lsn, xid, kind, pg_time_to_datetime(body.xact_time), body.gid
    )


class _Scanner:
    """Decodes WAL ranges that start at known record boundaries, within one byte budget."""

    def __init__(self, read_wal: ReadWal, segment_size: int, pg_timeline: int) -> None:
        self.read_wal = read_wal
        self.segment_size = segment_size
        self.pg_timeline = pg_timeline
        self.budget = SCAN_BUDGET

    def scan(
        self,
        start: int,
        prev: int | None,
        stop: int,
        enough: Callable[[list[XactRecord]], bool] = lambda rows: False,
    ) -> tuple[list[XactRecord], int]:
        """The rows of the records ending in (start, stop], and where reading ended (`stop`,
        or earlier: end of the archived WAL, the budget, or `enough(rows)`)."""
        reader = WalReader(start, self.segment_size, self.pg_timeline, prev_lsn=prev)
        rows: list[XactRecord] = []
        pos = done = start
        while pos < stop and self.budget > 0:
            want = min(stop - pos, READ_CHUNK, self.budget)
            data = self.read_wal(pos, pos + want)
            if not data:
                break
            self.budget -= len(data)
            reader.feed(data)
            pos += len(data)
            for raw in reader.records():
                if raw.end_lsn > stop:
                    return rows, done
                done = raw.end_lsn
                row = xact_record(raw)
                if row is not None:
                    rows.append(row)
                    if enough(rows):
                        return rows, done
            if reader.end_of_wal is not None or len(data) < want:
                break
        return rows, done


def xacts_around(
    index: LsnIndex,
    read_wal: ReadWal,
    *,
    segment_size: int,
    pg_timeline: int,
    point: int,
    limit: int,
    first: int,
    tip: int,
) -> XactListing:
    """Up to `limit` transaction records ending at or before `point` and up to `limit` after
    it, from the WAL in [first, tip] (`first`: where the archive starts; `tip`: the last
    ingested record's end)."""
    point = min(max(point, first), tip)
    scanner = _Scanner(read_wal, segment_size, pg_timeline)
    start, prev = _sample(index, point, first)
    rows, scanned_to = scanner.scan(
        start, prev, tip, lambda rows: sum(r.end_lsn > point for r in rows) >= limit
    )
    before = [r for r in rows if r.end_lsn <= point]
    after = [r for r in rows if r.end_lsn > point][:limit]
    step = FIRST_STEP
    while len(before) < limit and start > first and scanner.budget > 0:
        older, older_prev = _sample(index, max(start - step, first), first)
        if older >= start:
            break
        more, reached = scanner.scan(older, older_prev, start)
        if reached < start:  # that WAL is not all there (or the budget ran out)
            break
        before = more + before
        start, step = older, step * 2
    return XactListing(point, tuple(before[-limit:]), tuple(after), start, scanned_to)


def _sample(index: LsnIndex, lsn: int, first: int) -> tuple[int, int | None]:
    """The index's record boundary at or below `lsn` whose WAL is archived (at or above
    `first`), else the first one above `first`; as (LSN, start of the record ending there)."""
    end, start = index.sample_at_or_below(lsn)
    if end >= first:
        return end, start
    found = index.sample_at_or_above(first)
    return found if found is not None else (end, start)


def node_xacts(
    store: NodeStore, *, lsn: int | None, at: datetime | None, limit: int
) -> XactListing:
    """The transaction records around `lsn` (or the time `at`, mapped to an LSN as
    `pitr extract-snapshot --time` maps it; default: the last ingested record) on the node's
    current timeline."""
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidArgument(f"the limit must be 1..{MAX_LIMIT}, not {limit}")
    state = store.state
    if state is None:
        raise NotFound(f"node {store.node_id} has no page history yet")
    tip = store.timeline.last_record_lsn
    archived = WalArchive(store.wal_dir, state.wal_segment_size).segments()
    first = max(
        state.start_lsn,
        min((segment_start(s.segno, state.wal_segment_size) for s in archived), default=tip),
    )
    if at is not None:
        found = store.index.lsn_for_time(at)
        point = first if found is None else found  # before the first commit: the start
    else:
        point = tip if lsn is None else lsn
    return xacts_around(
        store.index,
        archive_reader(store.wal_dir, state.wal_segment_size),
        segment_size=state.wal_segment_size,
        pg_timeline=state.pg_timeline,
        point=point,
        limit=limit,
        first=min(first, tip),
        tip=tip,
    )
