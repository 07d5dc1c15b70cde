"""GetPage@LSN: rebuild any key of the data-directory keyspace at any LSN, and read metadata.

This module owns the *value formats* that ingest (`pageserver.ingest.walingest`) and import
(`pageserver.ingest.import_datadir`) write, so reading and writing agree in one place:

==============================  ===========================================================
key                              value
==============================  ===========================================================
relation / SLRU page             Image: the 8192-byte page; or WalDelta whose record is
                                 ``u64 LE start LSN`` + the XLogRecord bytes (the key's LSN
                                 is the record's end LSN, so the record re-decodes exactly)
relation size, SLRU segment      Image: ``u32 LE`` number of blocks (Tombstone: dropped)
database directory               Image: msgpack list of ``[spc, db]`` (``[1664, 0]`` = the
                                 shared catalogs in ``global/``)
relation directory of a db       Image: msgpack list of ``[relfilenode, fork]``
SLRU directory                   Image: msgpack list of segment numbers
two-phase directory              Image: msgpack list of xids
two-phase state file             Image: the pg_twophase/%08X file bytes (state + CRC32C)
relmap file                      Image: the 512-byte pg_filenode.map
checkpoint                       Image: the 88-byte CheckPoint struct (pg15.rmgr.xlog)
pg_control                       Image: the 8192-byte file as imported
node metadata                    Image: msgpack dict (system_identifier, pg_version, ...)
==============================  ===========================================================

How a delta is applied depends on the key (the record is the same for all keys it touches):

* relation page that is one of the record's block references: `redo_block` (native redo);
* visibility-map page of a Heap/Heap2 record that does not reference it: the VM bit clears
  the record's flags imply (`vm_changes`); of an SMGR TRUNCATE: the tail bits are cleared;
* CLOG page: the commit/abort status of the record's xid and subxacts on that page;
* multixact offsets/members page: the CREATE_ID offsets/members on that page.

Everything here is a pure function of (timeline, key, lsn) and safe to call from worker
threads; a small LRU cache keeps recently redone pages.
"""

from __future__ import annotations

import hashlib
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from typing import Any

import msgpack

from pageserver.redo import redo_block
from pageserver.redo.clog import (
    TRANSACTION_STATUS_ABORTED,
    TRANSACTION_STATUS_COMMITTED,
    clog_page,
    clog_set_status,
)
from pageserver.redo.multixact import (
    multixact_apply_members,
    multixact_apply_offsets,
)
from pageserver.redo.page import BLCKSZ, SIZE_OF_PAGE_HEADER, page_is_new
from pageserver.redo.visibilitymap import (
    HEAPBLOCKS_PER_BYTE,
    HEAPBLOCKS_PER_PAGE,
    vm_changes,
    vm_clear,
)
from pageserver.storage.keys import (
    CHECKPOINT_KEY,
    CONTROLFILE_KEY,
    DB_DIR_KEY,
    NODE_METADATA_KEY,
    TWOPHASE_DIR_KEY,
    TWOPHASE_FILES_RANGE,
    Key,
    SlruKind,
    describe,
    parse_rel_block_key,
    parse_slru_block_key,
    parse_twophase_file_key,
    rel_block_key,
    rel_dir_key,
    rel_size_key,
    relmap_file_key,
    slru_block_key,
    slru_dir_key,
    slru_segment_size_key,
)
from pageserver.storage.timeline import Timeline
from pageserver.storage.values import ReconstructData, WalDelta
from pg15.lsn import format_lsn
from pg15.records import (
    VISIBILITYMAP_FORKNUM,
    DecodedRecord,
    RelFileNode,
    decode_record_bytes,
)
from pg15.rmgr import decode_main
from pg15.rmgr.multixact import MultiXactCreate
from pg15.rmgr.smgr import SMGR_TRUNCATE_VM, SmgrTruncate
from pg15.rmgr.xact import (
    XLOG_XACT_ABORT_PREPARED,
    XLOG_XACT_COMMIT_PREPARED,
    XLOG_XACT_OPMASK,
    XactAbort,
    XactCommit,
)
from pg15.rmgr.xlog import CheckPoint
from pg15.rmgr_names import RM_SMGR_ID, RM_XACT_ID
from proto.errors import CorruptData, NotFound

SLRU_PAGES_PER_SEGMENT = 32
GLOBALTABLESPACE_OID = 1664
DEFAULTTABLESPACE_OID = 1663
ZERO_PAGE = bytes(BLCKSZ)

_U32 = struct.Struct("<I")
_DELTA_HEAD = struct.Struct("<Q")


class ReconstructError(CorruptData):
    """A key's history cannot be replayed into a page (no base version, foreign record...)."""


# --- value formats ----------------------------------------------------------------------------


def encode_delta(start_lsn: int, record_bytes: bytes) -> bytes:
    """The WalDelta payload: the record's start LSN, then its XLogRecord bytes."""
    return _DELTA_HEAD.pack(start_lsn) + record_bytes


def decode_delta(end_lsn: int, delta: WalDelta) -> DecodedRecord:
    """Re-decode a delta stored at `end_lsn` (the LSN of its put)."""
    if len(delta.record) < _DELTA_HEAD.size:
        raise CorruptData(f"WAL delta at {format_lsn(end_lsn)} is truncated")
    (start,) = _DELTA_HEAD.unpack_from(delta.record, 0)
    return decode_record_bytes(delta.record[_DELTA_HEAD.size :], start, end_lsn)


def encode_u32(n: int) -> bytes:
    return _U32.pack(n)


def decode_u32(data: bytes, what: str) -> int:
    if len(data) != 4:
        raise CorruptData(f"{what}: expected a 4-byte block count, got {len(data)} bytes")
    return int(_U32.unpack(data)[0])


def encode_pairs(pairs: Iterable[tuple[int, int]]) -> bytes:
    return bytes(msgpack.packb(sorted([a, b] for a, b in pairs)))


def decode_pairs(data: bytes, what: str) -> set[tuple[int, int]]:
    try:
        items = msgpack.unpackb(data)
        return {(int(a), int(b)) for a, b in items}
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise CorruptData(f"{what} is corrupt: {exc}") from None


def encode_ints(values: Iterable[int]) -> bytes:
    return bytes(msgpack.packb(sorted(values)))


def decode_ints(data: bytes, what: str) -> set[int]:
    try:
        return {int(v) for v in msgpack.unpackb(data)}
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise CorruptData(f"{what} is corrupt: {exc}") from None


def encode_metadata(meta: dict[str, Any]) -> bytes:
    return bytes(msgpack.packb(meta))


def slru_location(pageno: int) -> tuple[int, int]:
    """(segment number, block within the segment) of an SLRU page number."""
    return pageno // SLRU_PAGES_PER_SEGMENT, pageno % SLRU_PAGES_PER_SEGMENT


# --- redo of one key --------------------------------------------------------------------------


def vm_truncate_page(page: bytearray, heap_nblocks: int) -> None:
    """visibilitymap_prepare_truncate on the last kept VM page: clear the bits of heap blocks
    >= heap_nblocks (the page LSN is unchanged, as on a stock primary without wal_log_hints)."""
    if page_is_new(page):
        return
    rem = heap_nblocks % HEAPBLOCKS_PER_PAGE
    byte = SIZE_OF_PAGE_HEADER + rem // HEAPBLOCKS_PER_BYTE
    offset = (rem % HEAPBLOCKS_PER_BYTE) * 2
    page[byte] &= (1 << offset) - 1
    page[byte + 1 :] = bytes(BLCKSZ - byte - 1)


def xact_clog_change(record: DecodedRecord) -> tuple[list[int], int] | None:
    """(xids, status) a Transaction record sets in CLOG, or None for other records."""
    if record.rmgr_id != RM_XACT_ID:
        return None
    parsed = decode_main(record)
    if not isinstance(parsed, XactCommit | XactAbort):
        return None
    op = record.info & XLOG_XACT_OPMASK
    if op in (XLOG_XACT_COMMIT_PREPARED, XLOG_XACT_ABORT_PREPARED):
        top = parsed.two_phase_xid if parsed.two_phase_xid is not None else record.xid
    else:
        top = record.xid
    xids = [top, *parsed.subxacts] if top else list(parsed.subxacts)
    status = (
        TRANSACTION_STATUS_COMMITTED
        if isinstance(parsed, XactCommit)
        else TRANSACTION_STATUS_ABORTED
    )
    return xids, status


def _apply_rel_delta(key: Key, page: bytes | None, record: DecodedRecord) -> bytes:
    blk = parse_rel_block_key(key)
    assert blk is not None
    rnode = RelFileNode(blk.spc, blk.db, blk.rel)
    for ref in record.blocks:
        if ref.rnode == rnode and ref.fork == blk.fork and ref.blkno == blk.blkno:
            return redo_block(record, ref.block_id, page)
    if blk.fork == VISIBILITYMAP_FORKNUM:
        work = bytearray(page if page is not None else ZERO_PAGE)
        changes = [c for c in vm_changes(record) if c.rnode == rnode and c.vm_blkno == blk.blkno]
        if changes:
            for change in changes:
                vm_clear(work, change.heap_blkno, change.flags)
            return bytes(work)
        if record.rmgr_id == RM_SMGR_ID:
            parsed = decode_main(record)
            if isinstance(parsed, SmgrTruncate) and parsed.flags & SMGR_TRUNCATE_VM:
                vm_truncate_page(work, parsed.blkno)
                return bytes(work)
    raise ReconstructError(
        f"{describe(key)}: the {record.rmgr_name} {record.type_name} record at "
        f"{format_lsn(record.lsn)} does not change this page"
    )


def _apply_slru_delta(key: Key, kind: SlruKind, page: bytes | None, rec: DecodedRecord) -> bytes:
    loc = parse_slru_block_key(key)
    assert loc is not None
    pageno = loc[1] * SLRU_PAGES_PER_SEGMENT + loc[2]
    work = bytearray(page if page is not None else ZERO_PAGE)
    if kind == SlruKind.CLOG:
        change = xact_clog_change(rec)
        if change is not None:
            xids, status = change
            clog_set_status(work, [x for x in xids if clog_page(x) == pageno], status)
            return bytes(work)
    else:
        parsed = decode_main(rec)
        if isinstance(parsed, MultiXactCreate):
            if kind == SlruKind.MULTIXACT_OFFSETS:
                multixact_apply_offsets(work, pageno, parsed.mid, parsed.moff, len(parsed.members))
            else:
                multixact_apply_members(work, pageno, parsed.moff, parsed.members)
            return bytes(work)
    raise ReconstructError(
        f"{describe(key)}: the {rec.rmgr_name} {rec.type_name} record at "
        f"{format_lsn(rec.lsn)} does not change this page"
    )


def reconstruct(key: Key, lsn: int, data: ReconstructData) -> bytes | None:
    """The value of `key` at `lsn` from its reconstruct data; None if it has none.

    This is the `Materialize` callback of `pageserver.storage.compaction`. A chain without a base
    (no image, first delta not will_init) starts from a zero page for SLRU and visibility-map
    pages (PostgreSQL reads missing ones as zeros during recovery) and is an error otherwise.
    """
    if data.is_empty:
        return None
    if not data.deltas:
        assert data.image is not None
        return data.image[1]
    ident = _chain_ident(key, lsn, data)
    cached = _CACHE.get(ident)
    if cached is not None:
        return cached
    slru = parse_slru_block_key(key)
    rel = None if slru is not None else parse_rel_block_key(key)
    if slru is None and rel is None:
        raise ReconstructError(f"{describe(key)} has WAL deltas but is not a page key")
    page: bytes | None = data.image[1] if data.image is not None else None
    first_lsn, first = data.deltas[0]
    if page is None and not first.will_init:
        if slru is not None or (rel is not None and rel.fork == VISIBILITYMAP_FORKNUM):
            page = ZERO_PAGE
        else:
            start = decode_delta(first_lsn, first)
            raise ReconstructError(
                f"cannot rebuild {describe(key)} at {format_lsn(lsn)}: no page image or "
                f"initializing record before the {start.rmgr_name} {start.type_name} record "
                f"at {format_lsn(start.lsn)}"
            )
    for end_lsn, delta in data.deltas:
        record = decode_delta(end_lsn, delta)
        if delta.will_init:
            page = None
        if slru is not None:
            page = _apply_slru_delta(key, slru[0], page, record)
        else:
            page = _apply_rel_delta(key, page, record)
    assert page is not None
    _CACHE.put(ident, page)
    return page


def _chain_ident(key: Key, lsn: int, data: ReconstructData) -> bytes:
    """A digest of everything the result depends on, so that the cache can never serve a
    page of another timeline (branches reuse LSNs with different history)."""
    h = hashlib.blake2b(key, digest_size=20)
    h.update(_DELTA_HEAD.pack(lsn))
    if data.image is not None:
        h.update(_DELTA_HEAD.pack(data.image[0]))
        h.update(data.image[1])
    for end_lsn, delta in data.deltas:
        h.update(_DELTA_HEAD.pack(end_lsn))
        h.update(b"\x01" if delta.will_init else b"\x00")
        h.update(delta.record)
    return h.digest()


class _PageCache:
    """Recently redone pages: a thread-safe LRU of bounded size. Keyed by chain digest
    (`reconstruct`) or by `Timeline.version_ident` (`materialize`): either names exactly
    what the page depends on."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._items: OrderedDict[Hashable, bytes] = OrderedDict()

    def get(self, ident: Hashable) -> bytes | None:
        with self._lock:
            page = self._items.get(ident)
            if page is not None:
                self._items.move_to_end(ident)
            return page

    def put(self, ident: Hashable, page: bytes) -> None:
        with self._lock:
            self._items[ident] = page
            self._items.move_to_end(ident)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


_CACHE = _PageCache(1024)


# --- reads ------------------------------------------------------------------------------------


def _read_value(timeline: Timeline, key: Key, lsn: int) -> bytes | None:
    return reconstruct(key, lsn, timeline.get_reconstruct_data(key, lsn))


Reconstructor = Callable[[Key, int, ReconstructData], "bytes | None"]


def materialize(
    timeline: Timeline, key: Key, lsn: int, reconstructor: Reconstructor = reconstruct
) -> bytes:
    """GetPage@LSN for any key: the value at `lsn` (NotFound if the key has none).

    A relation or SLRU page that was never written but lies below its relation (segment)
    size reads as a zero page, like a hole in a PostgreSQL file. `reconstructor` lets the
    daemon run the redo of long chains in a process pool.
    """
    # A hot page is found in the cache by naming its newest version from the layer indexes,
    # without fetching (let alone hashing) the chain of deltas below it.
    ident = timeline.version_ident(key, lsn)
    if ident is not None:
        cached = _CACHE.get(ident)
        if cached is not None:
            return cached
    data = timeline.get_reconstruct_data(key, lsn)
    value = reconstructor(key, lsn, data)
    if value is not None:
        if ident is not None and data.deltas:
            _CACHE.put(ident, value)
        return value
    rel = parse_rel_block_key(key)
    if rel is not None:
        size = get_rel_size(timeline, rel.spc, rel.db, rel.rel, rel.fork, lsn)
        if size is not None and rel.blkno < size:
            return ZERO_PAGE
    slru = parse_slru_block_key(key)
    if slru is not None:
        size = get_slru_segment_size(timeline, slru[0], slru[1], lsn)
        if size is not None and slru[2] < size:
            return ZERO_PAGE
    raise NotFound(f"{describe(key)} does not exist at {format_lsn(lsn)}")


def get_rel_page(
    timeline: Timeline, spc: int, db: int, rel: int, fork: int, blkno: int, lsn: int
) -> bytes:
    return materialize(timeline, rel_block_key(spc, db, rel, fork, blkno), lsn)


def get_rel_size(
    timeline: Timeline, spc: int, db: int, rel: int, fork: int, lsn: int
) -> int | None:
    """Blocks of one fork at `lsn`; None if the fork does not exist."""
    key = rel_size_key(spc, db, rel, fork)
    raw = _read_value(timeline, key, lsn)
    return None if raw is None else decode_u32(raw, describe(key))


def list_dbs(timeline: Timeline, lsn: int) -> list[tuple[int, int]]:
    """(spc, db) of every database, ``(1664, 0)`` standing for the shared catalogs."""
    raw = _read_value(timeline, DB_DIR_KEY, lsn)
    return [] if raw is None else sorted(decode_pairs(raw, "database directory"))


def list_rels(timeline: Timeline, spc: int, db: int, lsn: int) -> list[tuple[int, int]]:
    """(relfilenode, fork) of every relation fork of a database."""
    key = rel_dir_key(spc, db)
    raw = _read_value(timeline, key, lsn)
    return [] if raw is None else sorted(decode_pairs(raw, describe(key)))


def get_relmap(timeline: Timeline, spc: int, db: int, lsn: int) -> bytes | None:
    """The pg_filenode.map of a database (spc 1664, db 0: global/), None if absent."""
    return _read_value(timeline, relmap_file_key(spc, db), lsn)


def list_slru_segments(timeline: Timeline, kind: SlruKind, lsn: int) -> list[int]:
    raw = _read_value(timeline, slru_dir_key(kind), lsn)
    return [] if raw is None else sorted(decode_ints(raw, f"{kind.directory} directory"))


def get_slru_segment_size(timeline: Timeline, kind: SlruKind, segno: int, lsn: int) -> int | None:
    key = slru_segment_size_key(kind, segno)
    raw = _read_value(timeline, key, lsn)
    return None if raw is None else decode_u32(raw, describe(key))


def get_slru_page(timeline: Timeline, kind: SlruKind, segno: int, blkno: int, lsn: int) -> bytes:
    return materialize(timeline, slru_block_key(kind, segno, blkno), lsn)


def get_checkpoint(timeline: Timeline, lsn: int) -> CheckPoint | None:
    raw = _read_value(timeline, CHECKPOINT_KEY, lsn)
    return None if raw is None else CheckPoint.unpack(raw)


def get_control_file(timeline: Timeline, lsn: int) -> bytes | None:
    return _read_value(timeline, CONTROLFILE_KEY, lsn)


def get_node_metadata(timeline: Timeline, lsn: int) -> dict[str, Any]:
    raw = _read_value(timeline, NODE_METADATA_KEY, lsn)
    if raw is None:
        return {}
    try:
        meta = msgpack.unpackb(raw)
    except (ValueError, msgpack.UnpackException) as exc:
        raise CorruptData(f"node metadata is corrupt: {exc}") from None
    if not isinstance(meta, dict):
        raise CorruptData("node metadata is not a map")
    return meta


def list_twophase_xids(timeline: Timeline, lsn: int) -> list[int]:
    raw = _read_value(timeline, TWOPHASE_DIR_KEY, lsn)
    return [] if raw is None else sorted(decode_ints(raw, "two-phase directory"))


def get_twophase_files(timeline: Timeline, lsn: int) -> dict[int, bytes]:
    """xid -> the pg_twophase/%08X file of every transaction prepared at `lsn`."""
    files: dict[int, bytes] = {}
    for key in timeline.get_keys(TWOPHASE_FILES_RANGE, lsn):
        xid = parse_twophase_file_key(key)
        raw = _read_value(timeline, key, lsn)
        if xid is not None and raw is not None:
            files[xid] = raw
    return files
