"""Transaction rmgr (1): commit, abort, prepare, the two-phase finishers, assignment."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TypeVar

from pg15.records import RelFileNode
from pg15.rmgr.fields import MainDataError, array, cstring, relfilenodes, unpack

XLOG_XACT_COMMIT = 0x00
XLOG_XACT_PREPARE = 0x10
XLOG_XACT_ABORT = 0x20
XLOG_XACT_COMMIT_PREPARED = 0x30
XLOG_XACT_ABORT_PREPARED = 0x40
XLOG_XACT_ASSIGNMENT = 0x50
XLOG_XACT_INVALIDATIONS = 0x60
XLOG_XACT_OPMASK = 0x70
XLOG_XACT_HAS_INFO = 0x80

XACT_XINFO_HAS_DBINFO = 1 << 0
XACT_XINFO_HAS_SUBXACTS = 1 << 1
XACT_XINFO_HAS_RELFILENODES = 1 << 2
XACT_XINFO_HAS_INVALS = 1 << 3
XACT_XINFO_HAS_TWOPHASE = 1 << 4
XACT_XINFO_HAS_ORIGIN = 1 << 5
XACT_XINFO_HAS_AE_LOCKS = 1 << 6
XACT_XINFO_HAS_GID = 1 << 7
XACT_XINFO_HAS_DROPPED_STATS = 1 << 8
XACT_COMPLETION_APPLY_FEEDBACK = 1 << 29
XACT_COMPLETION_UPDATE_RELCACHE_FILE = 1 << 30
XACT_COMPLETION_FORCE_SYNC_COMMIT = 1 << 31

INVALIDATION_MESSAGE_SIZE = 16
_I64 = struct.Struct("<q")
_I32 = struct.Struct("<i")
_U32 = struct.Struct("<I")
_DBINFO = struct.Struct("<II")
_ORIGIN = struct.Struct("<Qq")
_PREPARE = struct.Struct("<IIIIqIiiiiii?xHQq")
_ASSIGNMENT = struct.Struct("<Ii")


@dataclass(frozen=True, slots=True)
class DroppedStats:
    """A pgstat entry dropped at commit/abort (xl_xact_stats_item)."""

    kind: int
    db_oid: int
    obj_oid: int


@dataclass(frozen=True, slots=True)
class XactFinish:
    """Fields shared by commit and abort records (see ParseCommitRecord/ParseAbortRecord).

    `rels` are dropped by the record: at commit the relations the transaction deleted, at
    abort those it created. `two_phase_xid` is set for COMMIT_PREPARED / ABORT_PREPARED.
    """

    xact_time: int
    xinfo: int
    db_id: int
    ts_id: int
    subxacts: tuple[int, ...]
    rels: tuple[RelFileNode, ...]
    dropped_stats: tuple[DroppedStats, ...]
    invalidations: bytes
    two_phase_xid: int | None
    gid: str | None
    origin_lsn: int | None
    origin_timestamp: int | None

    @property
    def n_invalidations(self) -> int:
        return len(self.invalidations) // INVALIDATION_MESSAGE_SIZE


@dataclass(frozen=True, slots=True)
class XactCommit(XactFinish):
    pass


@dataclass(frozen=True, slots=True)
class XactAbort(XactFinish):
    pass


@dataclass(frozen=True, slots=True)
class XactPrepare:
    """The two-phase state image; `state` is the whole main data (pg_twophase file body)."""

    xid: int
    database: int
    prepared_at: int
    owner: int
    gid: str
    subxacts: tuple[int, ...]
    commit_rels: tuple[RelFileNode, ...]
    abort_rels: tuple[RelFileNode, ...]
    commit_stats: tuple[DroppedStats, ...]
    abort_stats: tuple[DroppedStats, ...]
    n_invalidations: int
    init_file_inval: bool
    origin_lsn: int
    origin_timestamp: int
    state: bytes


@dataclass(frozen=True, slots=True)
class XactAssignment:
    xtop: int
    subxacts: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class XactInvalidations:
    invalidations: bytes


_Finish = TypeVar("_Finish", XactCommit, XactAbort)

XactMain = XactCommit | XactAbort | XactPrepare | XactAssignment | XactInvalidations


def _stats(data: bytes, offset: int, count: int, what: str) -> tuple[DroppedStats, ...]:
    flat = array("I", data, offset, 3 * count, what)
    return tuple(DroppedStats(*flat[i : i + 3]) for i in range(0, len(flat), 3))


def _maxalign(n: int) -> int:
    return (n + 7) & ~7


def _decode_finish(cls: type[_Finish], info: int, data: bytes, what: str) -> _Finish:
    """Walk the optional parts in their fixed order; every part is present iff its bit is."""
    (xact_time,) = unpack(_I64, data, 0, what)
    pos = 8
    xinfo = 0
    if info & XLOG_XACT_HAS_INFO:
        (xinfo,) = unpack(_U32, data, pos, what)
        pos += 4
    db_id = ts_id = 0
    if xinfo & XACT_XINFO_HAS_DBINFO:
        db_id, ts_id = unpack(_DBINFO, data, pos, what)
        pos += 8
    subxacts: tuple[int, ...] = ()
    if xinfo & XACT_XINFO_HAS_SUBXACTS:
        (n,) = unpack(_I32, data, pos, what)
        subxacts = array("I", data, pos + 4, n, what)
        pos += 4 + 4 * n
    rels: tuple[RelFileNode, ...] = ()
    if xinfo & XACT_XINFO_HAS_RELFILENODES:
        (n,) = unpack(_I32, data, pos, what)
        rels = relfilenodes(data, pos + 4, n, what)
        pos += 4 + 12 * n
    stats: tuple[DroppedStats, ...] = ()
    if xinfo & XACT_XINFO_HAS_DROPPED_STATS:
        (n,) = unpack(_I32, data, pos, what)
        stats = _stats(data, pos + 4, n, what)
        pos += 4 + 12 * n
    invals = b""
    if xinfo & XACT_XINFO_HAS_INVALS and info & XLOG_XACT_OPMASK in (
        XLOG_XACT_COMMIT,
        XLOG_XACT_COMMIT_PREPARED,
    ):
        (n,) = unpack(_I32, data, pos, what)
        size = INVALIDATION_MESSAGE_SIZE * n
        if n < 0 or len(data) < pos + 4 + size:
            raise MainDataError(f"{what}: {n} invalidation messages do not fit")
        invals = data[pos + 4 : pos + 4 + size]
        pos += 4 + size
    two_phase_xid = None
    gid = None
    if xinfo & XACT_XINFO_HAS_TWOPHASE:
        (two_phase_xid,) = unpack(_U32, data, pos, what)
        pos += 4
        if xinfo & XACT_XINFO_HAS_GID:
            gid, pos = cstring(data, pos, what)
    origin_lsn = origin_ts = None
    if xinfo & XACT_XINFO_HAS_ORIGIN:
        origin_lsn, origin_ts = unpack(_ORIGIN, data, pos, what)
    return cls(
        xact_time,
        xinfo,
        db_id,
        ts_id,
        subxacts,
        rels,
        stats,
        invals,
        two_phase_xid,
        gid,
        origin_lsn,
        origin_ts,
    )


def _decode_prepare(data: bytes) -> XactPrepare:
    what = "PREPARE"
    (
        _magic,
        _total_len,
        xid,
        database,
        prepared_at,
        owner,
        nsubxacts,
        ncommitrels,
        nabortrels,
        ncommitstats,
        nabortstats,
        ninvalmsgs,
        initfileinval,
        gidlen,
        origin_lsn,
        origin_ts,
    ) = unpack(_PREPARE, data, 0, what)
    pos = _maxalign(_PREPARE.size)
    gid = data[pos : pos + gidlen].split(b"\0", 1)[0].decode("utf-8", "replace")
    pos += _maxalign(gidlen)
    subxacts = array("I", data, pos, nsubxacts, what)
    pos += _maxalign(4 * nsubxacts)
    commit_rels = relfilenodes(data, pos, ncommitrels, what)
    pos += _maxalign(12 * ncommitrels)
    abort_rels = relfilenodes(data, pos, nabortrels, what)
    pos += _maxalign(12 * nabortrels)
    commit_stats = _stats(data, pos, ncommitstats, what)
    pos += _maxalign(12 * ncommitstats)
    abort_stats = _stats(data, pos, nabortstats, what)
    return XactPrepare(
        xid,
        database,
        prepared_at,
        owner,
        gid,
        subxacts,
        commit_rels,
        abort_rels,
        commit_stats,
        abort_stats,
        ninvalmsgs,
        initfileinval,
        origin_lsn,
        origin_ts,
        data,
    )


def decode(info: int, data: bytes) -> XactMain:
    op = info & XLOG_XACT_OPMASK
    if op in (XLOG_XACT_COMMIT, XLOG_XACT_COMMIT_PREPARED):
        return _decode_finish(XactCommit, info, data, "COMMIT")
    if op in (XLOG_XACT_ABORT, XLOG_XACT_ABORT_PREPARED):
        return _decode_finish(XactAbort, info, data, "ABORT")
    if op == XLOG_XACT_PREPARE:
        return _decode_prepare(data)
    if op == XLOG_XACT_ASSIGNMENT:
        xtop, n = unpack(_ASSIGNMENT, data, 0, "ASSIGNMENT")
        return XactAssignment(xtop, array("I", data, 8, n, "ASSIGNMENT"))
    if op == XLOG_XACT_INVALIDATIONS:
        (n,) = unpack(_I32, data, 0, "INVALIDATIONS")
        size = INVALIDATION_MESSAGE_SIZE * n
        if n < 0 or len(data) < 4 + size:
            raise MainDataError(f"INVALIDATIONS: {n} messages do not fit")
        return XactInvalidations(data[4 : 4 + size])
    raise MainDataError(f"unknown Transaction record info {info:#04x}")
