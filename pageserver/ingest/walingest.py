"""WAL ingest: turn every decoded record into puts on a timeline (after Neon's walingest.rs).

Each record's values are put at its **end LSN** in one `put_batch`, then
`advance_last_record_lsn(end_lsn, start_lsn)` publishes them: a read at L sees exactly the
records whose end LSN is <= L. Value formats are defined in
`pageserver.reconstruct.value_format`.

What a record becomes (stock PostgreSQL 15; the cases of Neon's walingest.rs, each following
the rmgr's redo routine in PostgreSQL's src/backend, e.g. xact_redo in access/transam/xact.c):

* every block reference: an Image when the block carries a page image, either a real
  full-page write (APPLY) or a wal_consistency_checking image (no APPLY): both are the page
  after the record, stored with pd_lsn = end LSN (unless the page is new); otherwise a
  WalDelta holding the record (will_init from WILL_INIT or the rmgr's `always_init`). An
  XLOG FPI_FOR_HINT without an image changes nothing. Block refs create the relation fork
  if needed (XLogReadBufferExtended does) and extend its size to blkno + 1.
* Heap/Heap2 records whose flags clear visibility-map bits: a WalDelta (the same record) on
  the VM page of each affected heap block; materialization applies `vm_changes`.
* SMGR CREATE: relation fork in the directory, size 0. SMGR TRUNCATE: main fork size; FSM
  size via fsm_logical_to_physical with the partial last FSM page zeroed (FSM is advisory);
  VM size, with the tail bits of the last kept VM page cleared by a WalDelta. Blocks beyond a
  new size get Tombstones, so a later re-extension never resurrects stale pages.
* Transaction COMMIT/ABORT (+PREPARED): a WalDelta on each CLOG page holding one of the xids
  (top-level and subtransactions); materialization sets the 2-bit statuses. Relations in the
  record are dropped (all forks: out of the directory, size and blocks tombstoned).
  PREPARE stores the pg_twophase file (main data + CRC32C); *_PREPARED removes it.
* CLOG ZEROPAGE, MultiXact ZERO_OFF/ZERO_MEM: zero page Images, segment size and SLRU dir.
  CREATE_ID: WalDeltas on the offsets and members pages it writes; nextMulti/Offset.
  CLOG/MultiXact TRUNCATE: oldestXid/oldestMulti in the checkpoint (old segments are kept:
  PostgreSQL deletes them itself at its next truncation).
* RELMAP UPDATE: the relmap file; the database enters the db directory.
* DBASE CREATE_FILE_COPY: every key of the source database, read at the previous record's
  LSN through materialization, is copied as an Image. CREATE_WAL_LOG: the database enters the
  db directory (its contents arrive as SMGR CREATE + FPI + RELMAP records). DROP: out of the
  directory, every key of the database tombstoned.
* Checkpoint counters (nextXid rounded up to a multiple of 1024 like Neon, epoch-aware;
  nextOid from NEXTOID and shutdown checkpoints; nextMulti/Offset; oldestXid/Multi; the
  oldestActiveXid of RUNNING_XACTS; checkpoint records merged as PostgreSQL's xlog_redo does)
  are one Image on CHECKPOINT_KEY, written at most once per record when they change.
* Tablespace CREATE: the tablespace enters the tablespace map with its location ("" for an
  in-place one), which nothing else records (tblspc_redo, src/backend/commands/tablespace.c).
  DROP: out of the map, and every database directory left in it goes (DROP TABLESPACE needs
  it empty of relations; destroy_tablespace_directories removes the empty directories).
* Anything else (Standby locks, ...): no metadata effect; block refs of any rmgr, even an
  unknown one, are handled as above (redo decides at materialization, refusing clearly
  what it cannot replay).

Directories (databases, relations per database, SLRU segments, two-phase xids), sizes and
the checkpoint are cached in memory and written back only when a record changes them; the
cache is loaded from the timeline at its last_record_lsn, so a restarted ingest is correct.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import replace

import crc32c

from pageserver.ingest import native as _native
from pageserver.reconstruct.apply_delta import reconstruct, xact_clog_change
from pageserver.reconstruct.reads import (
    get_checkpoint,
    get_rel_size,
    get_slru_segment_size,
    get_tablespaces,
    list_dbs,
    list_rels,
    list_slru_segments,
    list_twophase_xids,
)
from pageserver.reconstruct.value_format import (
    ZERO_PAGE,
    encode_delta,
    encode_ints,
    encode_pairs,
    encode_tablespaces,
    encode_u32,
    slru_location,
)
from pageserver.redo import REDO_BY_RMGR
from pageserver.redo.clog import clog_page
from pageserver.redo.multixact import multixact_member_pages, multixact_offset_pages
from pageserver.redo.page import page_is_new, set_lsn
from pageserver.redo.visibilitymap import HEAPBLOCKS_PER_PAGE, vm_block, vm_changes
from pageserver.storage.keys import (
    CHECKPOINT_KEY,
    DB_DIR_KEY,
    TABLESPACE_MAP_KEY,
    TWOPHASE_DIR_KEY,
    Key,
    SlruKind,
    database_range,
    key_fields,
    make_key,
    rel_block_key,
    rel_dir_key,
    rel_size_key,
    relmap_file_key,
    slru_block_key,
    slru_dir_key,
    slru_segment_size_key,
    twophase_file_key,
)
from pageserver.storage.layers import native as _layers_native
from pageserver.storage.timeline import Timeline
from pageserver.storage.values import TOMBSTONE, Image, Value, WalDelta
from pg15.constants import (
    FIRST_NORMAL_OBJECT_ID,
    FIRST_NORMAL_XID,
    FSM_FORKNUM,
    MAIN_FORKNUM,
    N_FORKS,
    RM_CLOG_ID,
    RM_DBASE_ID,
    RM_MULTIXACT_ID,
    RM_RELMAP_ID,
    RM_SMGR_ID,
    RM_STANDBY_ID,
    RM_TBLSPC_ID,
    RM_XACT_ID,
    RM_XLOG_ID,
    VISIBILITYMAP_FORKNUM,
)
from pg15.fpi import restore_page
from pg15.records import (
    BKPBLOCK_FORK_MASK,
    BKPBLOCK_HAS_DATA,
    BKPBLOCK_SAME_REL,
    BKPBLOCK_WILL_INIT,
    DecodedRecord,
    RelFileNode,
)
from pg15.rmgr.clog import ClogTruncate, ClogZeroPage
from pg15.rmgr.dbase import DbaseCreateFileCopy, DbaseCreateWalLog, DbaseDrop
from pg15.rmgr.main_data import decode_main
from pg15.rmgr.multixact import MultiXactCreate, MultiXactTruncate, MultiXactZeroPage
from pg15.rmgr.relmap import RelmapUpdate
from pg15.rmgr.smgr import (
    SMGR_TRUNCATE_FSM,
    SMGR_TRUNCATE_HEAP,
    SMGR_TRUNCATE_VM,
    SmgrCreate,
    SmgrTruncate,
)
from pg15.rmgr.standby import RunningXacts
from pg15.rmgr.tblspc import TblspcCreate, TblspcDrop
from pg15.rmgr.xact import (
    XLOG_XACT_ABORT_PREPARED,
    XLOG_XACT_COMMIT_PREPARED,
    XLOG_XACT_OPMASK,
    XactAbort,
    XactCommit,
    XactPrepare,
)
from pg15.rmgr.xlog import (
    XLOG_FPI_FOR_HINT,
    CheckPoint,
    XlogCheckpoint,
    XlogNextOid,
)
from pg15.xlog_reader import RawRecord, record_crc

XID_CHECKPOINT_INTERVAL = 1024
"""nextXid is kept rounded up to this (Neon's choice: far fewer checkpoint writes; it never
crosses a CLOG page except at its boundary, which TrimCLOG does not read)."""

# freespace.c: SlotsPerFSMPage = BLCKSZ - MAXALIGN(page header) - 4 - (BLCKSZ / 2 - 1).
FSM_SLOTS_PER_PAGE = 8192 - 24 - 4 - (8192 // 2 - 1)
FSM_TREE_DEPTH = 3

_RECORD_HEADER = struct.Struct("<IIQBBxxI")
_BLOCK_HEADER = struct.Struct("<BBH")
_RELFILENODE = struct.Struct("<III")
_U32 = struct.Struct("<I")

EMPTY_CHECKPOINT = CheckPoint(
    redo=0,
    this_timeline=1,
    prev_timeline=1,
    full_page_writes=True,
    next_full_xid=FIRST_NORMAL_XID,
    next_oid=FIRST_NORMAL_OBJECT_ID,
    next_multi=1,
    next_multi_offset=0,
    oldest_xid=FIRST_NORMAL_XID,
    oldest_xid_db=0,
    oldest_multi=1,
    oldest_multi_db=0,
    time=0,
    oldest_commit_ts_xid=0,
    newest_commit_ts_xid=0,
    oldest_active_xid=0,
)
"""The counters of a timeline that was never imported (tests); import sets real ones."""


def encode_record(record: DecodedRecord) -> bytes:
    """The record as XLogRecord bytes *without its page images* (with a valid CRC).

    Images are never needed by a stored delta: a block that carries one is stored as an Image,
    and redo of one block never looks at another block's image. Dropping them keeps
    wal_consistency_checking WAL (an image on almost every block) cheap to store.
    """
    headers = bytearray()
    payload = bytearray()
    last: RelFileNode | None = None
    for ref in record.blocks:
        flags = ref.fork_flags & (BKPBLOCK_FORK_MASK | BKPBLOCK_WILL_INIT)
        if ref.data:
            flags |= BKPBLOCK_HAS_DATA
        same = ref.rnode == last
        if same:
            flags |= BKPBLOCK_SAME_REL
        headers += _BLOCK_HEADER.pack(ref.block_id, flags, len(ref.data))
        if not same:
            headers += _RELFILENODE.pack(ref.rnode.spc, ref.rnode.db, ref.rnode.rel)
            last = ref.rnode
        headers += _U32.pack(ref.blkno)
        payload += ref.data
    if record.origin is not None:
        headers += struct.pack("<BH", 253, record.origin)
    if record.toplevel_xid is not None:
        headers += struct.pack("<BI", 252, record.toplevel_xid)
    main = record.main_data
    if main:
        if len(main) <= 255:
            headers += struct.pack("<BB", 255, len(main))
        else:
            headers += struct.pack("<BI", 254, len(main))
    body = bytes(headers) + bytes(payload) + main
    head = _RECORD_HEADER.pack(
        _RECORD_HEADER.size + len(body), record.xid, record.prev, record.info, record.rmgr_id, 0
    )
    crc = record_crc(head + body)
    return head[:20] + _U32.pack(crc) + body


def page_after_image(record: DecodedRecord, block_id: int) -> bytes:
    """The page a block's image shows, stamped with the record's end LSN (unless new)."""
    ref = record.block(block_id)
    assert ref is not None and ref.image is not None
    page = bytearray(restore_page(ref.image))
    if not page_is_new(page):
        set_lsn(page, record.end_lsn)
    return bytes(page)


def fsm_logical_to_physical(logpageno: int) -> int:
    """freespace.c fsm_logical_to_physical for a bottom-level (leaf) FSM page."""
    leafno = logpageno
    pages = 0
    for _ in range(FSM_TREE_DEPTH):
        pages += leafno + 1
        leafno //= FSM_SLOTS_PER_PAGE
    return pages - 1


def _precedes(a: int, b: int) -> bool:
    """Modulo-2^32 comparison of xids / multixact ids / offsets (TransactionIdPrecedes)."""
    diff = (a - b) & 0xFFFFFFFF
    return diff >= 0x80000000


def _full_xid_at_least(current: int, xid: int) -> int:
    """The FullTransactionId nextXid must be to cover `xid` (rounded), or `current`."""
    new = ((xid + XID_CHECKPOINT_INTERVAL) & ~(XID_CHECKPOINT_INTERVAL - 1)) & 0xFFFFFFFF
    new = max(new, FIRST_NORMAL_XID)
    old = current & 0xFFFFFFFF
    if new == old or _precedes(new, old):
        return current
    epoch = current >> 32
    if new < old:
        epoch += 1
    return (epoch << 32) | new


class WalIngest:
    """Ingest of one timeline's WAL; not thread-safe (one ingest task per timeline)."""

    def __init__(self, timeline: Timeline) -> None:
        self.timeline = timeline
        self._load()

    # --- cached metadata ---------------------------------------------------------------------

    def _load(self) -> None:
        """(Re)load the metadata cache from the timeline at its last record LSN."""
        tl, lsn = self.timeline, self.timeline.last_record_lsn
        self._dbs: set[tuple[int, int]] = set(list_dbs(tl, lsn))
        self._rels: dict[tuple[int, int], set[tuple[int, int]]] = {}
        self._sizes: dict[tuple[int, int, int, int], int | None] = {}
        self._slru_dirs: dict[SlruKind, set[int]] = {
            kind: set(list_slru_segments(tl, kind, lsn)) for kind in SlruKind
        }
        self._slru_sizes: dict[tuple[SlruKind, int], int | None] = {}
        self._twophase: set[int] = set(list_twophase_xids(tl, lsn))
        self._tablespaces: dict[int, str] = get_tablespaces(tl, lsn)
        self._checkpoint: CheckPoint = get_checkpoint(tl, lsn) or EMPTY_CHECKPOINT
        self._reset_record()

    def _reset_record(self) -> None:
        self._puts: dict[Key, Value] = {}
        self._dirty_dbs = False
        self._dirty_rels: set[tuple[int, int]] = set()
        self._dirty_slru: set[SlruKind] = set()
        self._dirty_twophase = False
        self._dirty_tablespaces = False
        self._dirty_checkpoint = False
        self._payload: bytes | None = None

    @property
    def checkpoint(self) -> CheckPoint:
        """The tracked checkpoint counters as of the last ingested record."""
        return self._checkpoint

    def _rel_dir(self, spc: int, db: int) -> set[tuple[int, int]]:
        rels = self._rels.get((spc, db))
        if rels is None:
            rels = set(list_rels(self.timeline, spc, db, self.timeline.last_record_lsn))
            self._rels[(spc, db)] = rels
        return rels

    def _size(self, spc: int, db: int, rel: int, fork: int) -> int | None:
        ident = (spc, db, rel, fork)
        if ident not in self._sizes:
            self._sizes[ident] = get_rel_size(
                self.timeline, spc, db, rel, fork, self.timeline.last_record_lsn
            )
        return self._sizes[ident]

    def _set_size(self, spc: int, db: int, rel: int, fork: int, nblocks: int) -> None:
        self._sizes[(spc, db, rel, fork)] = nblocks
        self._puts[rel_size_key(spc, db, rel, fork)] = Image(encode_u32(nblocks))

    def _slru_size(self, kind: SlruKind, segno: int) -> int | None:
        ident = (kind, segno)
        if ident not in self._slru_sizes:
            self._slru_sizes[ident] = get_slru_segment_size(
                self.timeline, kind, segno, self.timeline.last_record_lsn
            )
        return self._slru_sizes[ident]

    # --- the entry point ---------------------------------------------------------------------

    def ingest_record(self, record: DecodedRecord, raw: bytes | None = None) -> bool:
        """Put one record's effects at its end LSN and publish them.

        `raw` is the record's XLogRecord bytes if the caller has them (saves re-encoding).
        Returns False, doing nothing, for a record the timeline already has (end LSN <=
        last_record_lsn): the caller may feed WAL from a segment start after an import or
        a restart.
        """
        if record.end_lsn <= self.timeline.last_record_lsn:
            return False
        self._reset_record()
        self._raw = raw
        self._record = record
        try:
            self._ingest(record)
            items = [(key, record.end_lsn, value) for key, value in self._puts.items()]
            items.extend((key, record.end_lsn, value) for key, value in self._metadata_puts())
            if items:
                self.timeline.put_batch(items)
        except BaseException:
            self._load()  # the cache may hold changes of the failed record
            raise
        finally:
            self._raw = None
        self.timeline.advance_last_record_lsn(record.end_lsn, record.lsn)
        return True

    def ingest_native(
        self, records: list[DecodedRecord], raws: list[bytes | None], start: int
    ) -> int:
        """Ingest records[start:] through the C fast path while it takes them; returns the
        index of the first record it left (to `ingest_record`), len(records) if none.

        The C code (pageserver/ingest/_walingest.c) does what ingest_record does for Heap,
        Heap2, Btree and XLOG full-page-image records whose relation forks are in the caches
        and for plain commits and aborts whose CLOG segments are, putting whole records
        into the open layer at once (Timeline.put_records); `raws` are the records' XLogRecord
        bytes (None where unknown: the record goes to Python).
        """
        native = _native.walingest
        if native is None or start >= len(records):
            return start
        return self._native_run(lambda ctx: native.ingest_run(records, raws, start, ctx), start)

    def ingest_native_raw(self, batch: list[RawRecord], start: int) -> int:
        """`ingest_native` on records not decoded yet (the reader's RawRecords): the C code
        lays each record out itself (pg15/walrecord.h, the C decoder's own code) and makes no
        Python object for the records it takes; the caller decodes the one it stops at."""
        native = _native.walingest
        if native is None or start >= len(batch):
            return start
        return self._native_run(lambda ctx: native.ingest_raw_run(batch, start, ctx), start)

    def _native_run(
        self, run: Callable[[tuple[object, ...]], tuple[int, int, int, int | None, int | None]],
        start: int,
    ) -> int:  # fmt: skip
        """One C run into the open layer (Timeline.put_records) with the caches as its
        context; returns the index of the first record it left."""
        if _layers_native.inmem is None:
            return start
        arena_type = _layers_native.inmem.Arena
        next_xid = self._checkpoint.next_full_xid & 0xFFFFFFFF
        reached = start

        def append(
            versions: object, last_record_lsn: int, budget: int
        ) -> tuple[int, int, int | None, int | None]:
            nonlocal reached
            if not isinstance(versions, arena_type):
                return 0, 0, None, None  # the reference layer (no arena): Python ingests
            context = (
                versions,
                self._dbs,
                self._rels,
                self._sizes,
                last_record_lsn,
                budget,
                next_xid,
                self._slru_dirs[SlruKind.CLOG],
                self._slru_sizes,
                SlruKind.CLOG,
            )
            reached, size, count, end, prev = run(context)
            return size, count, end, prev

        self.timeline.put_records(append)
        return reached

    def _metadata_puts(self) -> list[tuple[Key, Value]]:
        out: list[tuple[Key, Value]] = []
        if self._dirty_dbs:
            out.append((DB_DIR_KEY, Image(encode_pairs(self._dbs))))
        for spc, db in sorted(self._dirty_rels):
            if (spc, db) in self._dbs:
                out.append((rel_dir_key(spc, db), Image(encode_pairs(self._rel_dir(spc, db)))))
        for kind in sorted(self._dirty_slru):
            out.append((slru_dir_key(kind), Image(encode_ints(self._slru_dirs[kind]))))
        if self._dirty_twophase:
            out.append((TWOPHASE_DIR_KEY, Image(encode_ints(self._twophase))))
        if self._dirty_tablespaces:
            out.append((TABLESPACE_MAP_KEY, Image(encode_tablespaces(self._tablespaces))))
        if self._dirty_checkpoint:
            out.append((CHECKPOINT_KEY, Image(self._checkpoint.pack())))
        return out

    def _delta(self, will_init: bool = False) -> WalDelta:
        if self._payload is None:
            record = self._record
            raw = self._raw
            if raw is None or any(ref.image is not None for ref in record.blocks):
                raw = encode_record(record)
            self._payload = encode_delta(record.lsn, raw)
        return WalDelta(self._payload, will_init)

    def _ingest(self, record: DecodedRecord) -> None:
        self._ingest_blocks(record)
        self._note_xid(record.xid)
        rmid = record.rmgr_id
        if rmid == RM_XACT_ID:
            self._ingest_xact(record)
        elif rmid in (
            RM_XLOG_ID,
            RM_SMGR_ID,
            RM_CLOG_ID,
            RM_DBASE_ID,
            RM_MULTIXACT_ID,
            RM_RELMAP_ID,
            RM_STANDBY_ID,
            RM_TBLSPC_ID,
        ):
            self._ingest_metadata(record, decode_main(record))

    # --- pages -------------------------------------------------------------------------------

    def _ingest_blocks(self, record: DecodedRecord) -> None:
        entry = REDO_BY_RMGR.get(record.rmgr_id)
        hint_only = record.rmgr_id == RM_XLOG_ID and record.info & 0xF0 == XLOG_FPI_FOR_HINT
        for ref in record.blocks:
            rn = ref.rnode
            value: Value
            if ref.image is not None:
                value = Image(page_after_image(record, ref.block_id))
            elif hint_only:
                continue
            else:
                will_init = ref.will_init or (
                    entry is not None and entry.always_init(record, ref.block_id)
                )
                value = self._delta(will_init)
            self._puts[rel_block_key(rn.spc, rn.db, rn.rel, ref.fork, ref.blkno)] = value
            self._extend(rn, ref.fork, ref.blkno + 1)
        for change in vm_changes(record):
            rn = change.rnode
            key = rel_block_key(rn.spc, rn.db, rn.rel, VISIBILITYMAP_FORKNUM, change.vm_blkno)
            if key not in self._puts:
                self._puts[key] = self._delta()
            self._extend(rn, VISIBILITYMAP_FORKNUM, change.vm_blkno + 1)

    def _ensure_db(self, spc: int, db: int) -> None:
        if (spc, db) not in self._dbs:
            self._dbs.add((spc, db))
            self._dirty_dbs = True
            self._rels.setdefault((spc, db), set())
            self._dirty_rels.add((spc, db))

    def _ensure_rel(self, spc: int, db: int, rel: int, fork: int) -> None:
        """smgrcreate(isRedo): the fork exists afterwards, empty if it is new."""
        self._ensure_db(spc, db)
        rels = self._rel_dir(spc, db)
        if (rel, fork) not in rels:
            rels.add((rel, fork))
            self._dirty_rels.add((spc, db))
            if self._size(spc, db, rel, fork) is None:
                self._set_size(spc, db, rel, fork, 0)

    def _extend(self, rn: RelFileNode, fork: int, nblocks: int) -> None:
        self._ensure_rel(rn.spc, rn.db, rn.rel, fork)
        current = self._size(rn.spc, rn.db, rn.rel, fork) or 0
        if nblocks > current:
            self._set_size(rn.spc, rn.db, rn.rel, fork, nblocks)

    def _shrink(self, spc: int, db: int, rel: int, fork: int, nblocks: int) -> None:
        """Truncate a fork to nblocks (never extends, as mdtruncate in recovery)."""
        current = self._size(spc, db, rel, fork)
        if current is None or nblocks >= current:
            return
        for blkno in range(nblocks, current):
            self._puts[rel_block_key(spc, db, rel, fork, blkno)] = TOMBSTONE
        self._set_size(spc, db, rel, fork, nblocks)

    def _drop_rel(self, rn: RelFileNode) -> None:
        """Remove every fork of a relation: directory entry, size and pages."""
        rels = self._rel_dir(rn.spc, rn.db) if (rn.spc, rn.db) in self._dbs else set()
        for fork in range(N_FORKS):
            if (rn.rel, fork) in rels:
                rels.discard((rn.rel, fork))
                self._dirty_rels.add((rn.spc, rn.db))
            size = self._size(rn.spc, rn.db, rn.rel, fork)
            if size is None:
                continue
            for blkno in range(size):
                self._puts[rel_block_key(rn.spc, rn.db, rn.rel, fork, blkno)] = TOMBSTONE
            self._puts[rel_size_key(rn.spc, rn.db, rn.rel, fork)] = TOMBSTONE
            self._sizes[(rn.spc, rn.db, rn.rel, fork)] = None

    def _truncate(self, t: SmgrTruncate) -> None:
        """smgr_redo for XLOG_SMGR_TRUNCATE (with the FSM/VM prepare-truncate steps)."""
        spc, db, rel = t.rnode.spc, t.rnode.db, t.rnode.rel
        rels = self._rel_dir(spc, db) if (spc, db) in self._dbs else set()
        if t.flags & SMGR_TRUNCATE_HEAP:
            self._ensure_rel(spc, db, rel, MAIN_FORKNUM)
            self._shrink(spc, db, rel, MAIN_FORKNUM, t.blkno)
        fsm_size = self._size(spc, db, rel, FSM_FORKNUM)
        if t.flags & SMGR_TRUNCATE_FSM and (rel, FSM_FORKNUM) in rels and fsm_size is not None:
            logpage, slot = divmod(t.blkno, FSM_SLOTS_PER_PAGE)
            physical = fsm_logical_to_physical(logpage)
            if slot > 0:
                if physical < fsm_size:
                    # fsm_truncate_avail clears the tail slots; a zero FSM page is always
                    # safe (it only forgets free space) and keeps this pure metadata.
                    self._puts[rel_block_key(spc, db, rel, FSM_FORKNUM, physical)] = Image(
                        ZERO_PAGE
                    )
                physical += 1
            self._shrink(spc, db, rel, FSM_FORKNUM, physical)
        vm_size = self._size(spc, db, rel, VISIBILITYMAP_FORKNUM)
        if (
            t.flags & SMGR_TRUNCATE_VM
            and (rel, VISIBILITYMAP_FORKNUM) in rels
            and vm_size is not None
        ):
            vm_blkno = vm_block(t.blkno)
            if t.blkno % HEAPBLOCKS_PER_PAGE:
                if vm_blkno >= vm_size:
                    return  # the map is already smaller: nothing to clear or cut
                key = rel_block_key(spc, db, rel, VISIBILITYMAP_FORKNUM, vm_blkno)
                self._puts[key] = self._delta()
                vm_blkno += 1
            self._shrink(spc, db, rel, VISIBILITYMAP_FORKNUM, vm_blkno)

    # --- SLRUs -------------------------------------------------------------------------------

    def _touch_slru(self, kind: SlruKind, pageno: int) -> Key:
        """The page's key; its segment enters the directory and covers it (file extension)."""
        segno, blkno = slru_location(pageno)
        if segno not in self._slru_dirs[kind]:
            self._slru_dirs[kind].add(segno)
            self._dirty_slru.add(kind)
        size = self._slru_size(kind, segno) or 0
        if blkno + 1 > size:
            self._slru_sizes[(kind, segno)] = blkno + 1
            self._puts[slru_segment_size_key(kind, segno)] = Image(encode_u32(blkno + 1))
        return slru_block_key(kind, segno, blkno)

    def _zero_slru_page(self, kind: SlruKind, pageno: int) -> None:
        self._puts[self._touch_slru(kind, pageno)] = Image(ZERO_PAGE)

    def _delta_on_slru(self, kind: SlruKind, pageno: int) -> None:
        key = self._touch_slru(kind, pageno)
        if key not in self._puts:
            self._puts[key] = self._delta()

    # --- transactions ------------------------------------------------------------------------

    def _ingest_xact(self, record: DecodedRecord) -> None:
        parsed = decode_main(record)
        if isinstance(parsed, XactCommit | XactAbort):
            change = xact_clog_change(record)
            assert change is not None
            xids, _status = change
            for pageno in sorted({clog_page(xid) for xid in xids}):
                self._delta_on_slru(SlruKind.CLOG, pageno)
            for xid in xids:
                self._note_xid(xid)
            for rn in parsed.rels:
                self._drop_rel(rn)
            op = record.info & XLOG_XACT_OPMASK
            if op in (XLOG_XACT_COMMIT_PREPARED, XLOG_XACT_ABORT_PREPARED) and xids:
                self._remove_twophase(xids[0])
        elif isinstance(parsed, XactPrepare):
            state = parsed.state
            self._puts[twophase_file_key(parsed.xid)] = Image(
                state + _U32.pack(crc32c.crc32c(state))
            )
            if parsed.xid not in self._twophase:
                self._twophase.add(parsed.xid)
                self._dirty_twophase = True
            self._note_xid(parsed.xid)
            for xid in parsed.subxacts:
                self._note_xid(xid)

    def _remove_twophase(self, xid: int) -> None:
        if xid in self._twophase:
            self._twophase.discard(xid)
            self._dirty_twophase = True
            self._puts[twophase_file_key(xid)] = TOMBSTONE

    # --- checkpoint counters -----------------------------------------------------------------

    def _set_checkpoint(self, cp: CheckPoint) -> None:
        if cp != self._checkpoint:
            self._checkpoint = cp
            self._dirty_checkpoint = True

    def _note_xid(self, xid: int) -> None:
        """AdvanceNextFullTransactionIdPastXid, rounded (see XID_CHECKPOINT_INTERVAL)."""
        if xid < FIRST_NORMAL_XID:
            return
        cp = self._checkpoint
        full = _full_xid_at_least(cp.next_full_xid, xid)
        if full != cp.next_full_xid:
            self._set_checkpoint(replace(cp, next_full_xid=full))

    def _merge_checkpoint(self, rec: XlogCheckpoint) -> None:
        """xlog_redo for checkpoint records: a shutdown one sets the counters, an online one
        only advances them (nextOid is tracked by NEXTOID records)."""
        ours, theirs = self._checkpoint, rec.checkpoint
        next_full_xid = max(ours.next_full_xid, theirs.next_full_xid)
        if rec.shutdown:
            merged = replace(theirs, next_full_xid=next_full_xid)
        else:
            next_multi, next_offset = ours.next_multi, ours.next_multi_offset
            if _precedes(next_multi, theirs.next_multi):
                next_multi = theirs.next_multi
            if _precedes(next_offset, theirs.next_multi_offset):
                next_offset = theirs.next_multi_offset
            oldest_multi, oldest_multi_db = ours.oldest_multi, ours.oldest_multi_db
            if _precedes(oldest_multi, theirs.oldest_multi):
                oldest_multi, oldest_multi_db = theirs.oldest_multi, theirs.oldest_multi_db
            oldest_xid, oldest_xid_db = ours.oldest_xid, ours.oldest_xid_db
            if _precedes(oldest_xid, theirs.oldest_xid):
                oldest_xid, oldest_xid_db = theirs.oldest_xid, theirs.oldest_xid_db
            merged = replace(
                theirs,
                next_full_xid=next_full_xid,
                next_oid=ours.next_oid,
                next_multi=next_multi,
                next_multi_offset=next_offset,
                oldest_multi=oldest_multi,
                oldest_multi_db=oldest_multi_db,
                oldest_xid=oldest_xid,
                oldest_xid_db=oldest_xid_db,
            )
        self._checkpoint = merged
        self._dirty_checkpoint = True  # a trace of every checkpoint record, even unchanged

    # --- metadata records --------------------------------------------------------------------

    def _ingest_metadata(self, record: DecodedRecord, parsed: object) -> None:
        if isinstance(parsed, SmgrCreate):
            rn = parsed.rnode
            self._ensure_rel(rn.spc, rn.db, rn.rel, parsed.fork)
        elif isinstance(parsed, SmgrTruncate):
            self._truncate(parsed)
        elif isinstance(parsed, ClogZeroPage):
            self._zero_slru_page(SlruKind.CLOG, parsed.pageno)
        elif isinstance(parsed, ClogTruncate):
            self._set_checkpoint(
                replace(
                    self._checkpoint,
                    oldest_xid=parsed.oldest_xact,
                    oldest_xid_db=parsed.oldest_xact_db,
                )
            )
        elif isinstance(parsed, MultiXactZeroPage):
            kind = SlruKind.MULTIXACT_MEMBERS if parsed.members else SlruKind.MULTIXACT_OFFSETS
            self._zero_slru_page(kind, parsed.pageno)
        elif isinstance(parsed, MultiXactCreate):
            self._ingest_multixact_create(parsed)
        elif isinstance(parsed, MultiXactTruncate):
            self._set_checkpoint(
                replace(
                    self._checkpoint,
                    oldest_multi=parsed.end_trunc_off,
                    oldest_multi_db=parsed.oldest_multi_db,
                )
            )
        elif isinstance(parsed, RelmapUpdate):
            self._puts[relmap_file_key(parsed.ts_id, parsed.db_id)] = Image(parsed.data)
            self._ensure_db(parsed.ts_id, parsed.db_id)
        elif isinstance(parsed, DbaseCreateFileCopy):
            self._create_database_copy(parsed)
        elif isinstance(parsed, DbaseCreateWalLog):
            self._ensure_db(parsed.tablespace_id, parsed.db_id)
        elif isinstance(parsed, DbaseDrop):
            for spc in parsed.tablespace_ids:
                self._drop_database(spc, parsed.db_id)
        elif isinstance(parsed, TblspcCreate):
            self._tablespaces[parsed.ts_id] = parsed.location
            self._dirty_tablespaces = True
        elif isinstance(parsed, TblspcDrop):
            self._drop_tablespace(parsed.ts_id)
        elif isinstance(parsed, XlogNextOid):
            self._set_checkpoint(replace(self._checkpoint, next_oid=parsed.next_oid))
        elif isinstance(parsed, XlogCheckpoint):
            self._merge_checkpoint(parsed)
        elif isinstance(parsed, RunningXacts):
            self._set_checkpoint(
                replace(self._checkpoint, oldest_active_xid=parsed.oldest_running_xid)
            )

    def _ingest_multixact_create(self, parsed: MultiXactCreate) -> None:
        for pageno in multixact_offset_pages(parsed.mid):
            self._delta_on_slru(SlruKind.MULTIXACT_OFFSETS, pageno)
        for pageno in multixact_member_pages(parsed.moff, len(parsed.members)):
            self._delta_on_slru(SlruKind.MULTIXACT_MEMBERS, pageno)
        cp = self._checkpoint
        next_multi = (parsed.mid + 1) & 0xFFFFFFFF
        next_offset = (parsed.moff + len(parsed.members)) & 0xFFFFFFFF
        if _precedes(cp.next_multi, next_multi):
            cp = replace(cp, next_multi=next_multi)
        if _precedes(cp.next_multi_offset, next_offset):
            cp = replace(cp, next_multi_offset=next_offset)
        self._set_checkpoint(cp)
        for member in parsed.members:
            self._note_xid(member.xid)

    def _create_database_copy(self, parsed: DbaseCreateFileCopy) -> None:
        """CREATE DATABASE ... STRATEGY file_copy: copy the source's keys as Images."""
        spc, db = parsed.tablespace_id, parsed.db_id
        src_spc, src_db = parsed.src_tablespace_id, parsed.src_db_id
        lsn = self.timeline.last_record_lsn
        for key in self.timeline.get_keys(database_range(src_spc, src_db), lsn):
            value = reconstruct(key, lsn, self.timeline.get_reconstruct_data(key, lsn))
            if value is None:
                continue
            f = key_fields(key)
            self._puts[make_key(f.field1, spc, db, f.field4, f.field5, f.field6)] = Image(value)
        if (src_spc, src_db) in self._dbs:
            self._rels[(spc, db)] = set(self._rel_dir(src_spc, src_db))
        else:
            self._rels[(spc, db)] = set()
        self._dirty_rels.add((spc, db))
        for ident in [i for i in self._sizes if i[:2] == (spc, db)]:
            del self._sizes[ident]  # re-read after this record is published
        if (spc, db) not in self._dbs:
            self._dbs.add((spc, db))
            self._dirty_dbs = True

    def _drop_tablespace(self, spc: int) -> None:
        if self._tablespaces.pop(spc, None) is not None:
            self._dirty_tablespaces = True
        for dspc, db in sorted(self._dbs):
            if dspc == spc:
                self._drop_database(spc, db)

    def _drop_database(self, spc: int, db: int) -> None:
        lsn = self.timeline.last_record_lsn
        for key in self.timeline.get_keys(database_range(spc, db), lsn):
            self._puts[key] = TOMBSTONE
        if (spc, db) in self._dbs:
            self._dbs.discard((spc, db))
            self._dirty_dbs = True
        self._rels.pop((spc, db), None)
        self._dirty_rels.discard((spc, db))
        for ident in [i for i in self._sizes if i[:2] == (spc, db)]:
            del self._sizes[ident]
