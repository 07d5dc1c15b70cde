"""Redo of one key: its value at an LSN from the newest image and the WAL deltas above it.

How a delta is applied depends on the key (the record is the same for all keys it touches):

* relation page that is one of the record's block references: `redo_block` (native redo);
* visibility-map page of a Heap/Heap2 record that does not reference it: the VM bit clears
  the record's flags imply (`vm_changes`); of an SMGR TRUNCATE: the tail bits are cleared;
* CLOG page: the commit/abort status of the record's xid and subxacts on that page;
* multixact offsets/members page: the CREATE_ID offsets/members on that page.

Everything here is a pure function of (key, lsn, reconstruct data), safe to call from worker
threads and processes (`pageserver.reconstruct.redo_pool`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from pageserver.reconstruct.page_cache import PAGE_CACHE
from pageserver.reconstruct.value_format import DELTA_HEAD, ZERO_PAGE, decode_delta
from pageserver.redo import redo_block
from pageserver.redo.clog import (
    TRANSACTION_STATUS_ABORTED,
    TRANSACTION_STATUS_COMMITTED,
    clog_page,
    clog_set_status,
)
from pageserver.redo.multixact import multixact_apply_members, multixact_apply_offsets
from pageserver.redo.page import SIZE_OF_PAGE_HEADER, page_is_new
from pageserver.redo.visibilitymap import (
    HEAPBLOCKS_PER_BYTE,
    HEAPBLOCKS_PER_PAGE,
    vm_changes,
    vm_clear,
)
from pageserver.storage.keys import (
    Key,
    RelBlock,
    SlruKind,
    describe,
    parse_rel_block_key,
    parse_slru_block_key,
)
from pageserver.storage.values import ReconstructData, WalDelta
from pg15.constants import (
    BLCKSZ,
    RM_SMGR_ID,
    RM_XACT_ID,
    SLRU_PAGES_PER_SEGMENT,
    VISIBILITYMAP_FORKNUM,
)
from pg15.lsn import format_lsn
from pg15.records import DecodedRecord, RelFileNode
from pg15.rmgr.main_data import decode_main
from pg15.rmgr.multixact import MultiXactCreate
from pg15.rmgr.smgr import SMGR_TRUNCATE_VM, SmgrTruncate
from pg15.rmgr.xact import (
    XLOG_XACT_ABORT_PREPARED,
    XLOG_XACT_COMMIT_PREPARED,
    XLOG_XACT_OPMASK,
    XactAbort,
    XactCommit,
)
from proto.errors import CorruptData


class ReconstructError(CorruptData):
    """A key's history cannot be replayed into a page (no base version, foreign record...)."""


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


def _apply_rel_delta(
    key: Key, blk: RelBlock, rnode: RelFileNode, page: bytes | None, record: DecodedRecord
) -> bytes:
    """Redo of `record` on page `key` (`blk`, `rnode`: the key parsed, once per chain)."""
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


def reconstruct(key: Key, lsn: int, data: ReconstructData, *, cached: bool = True) -> bytes | None:
    """The value of `key` at `lsn` from its reconstruct data; None if it has none.

    This is the `Materialize` callback of `pageserver.storage.compaction`. A chain without a base
    (no image, first delta not will_init) starts from a zero page for SLRU and visibility-map
    pages (PostgreSQL reads missing ones as zeros during recovery) and is an error otherwise.
    `cached`: looked up in and added to PAGE_CACHE by the chain's digest; a bulk rebuild of
    many keys passes False (see `reconstruct_uncached`).
    """
    if data.is_empty:
        return None
    if not data.deltas:
        assert data.image is not None
        return data.image[1]
    ident = _chain_ident(key, lsn, data) if cached else None
    if ident is not None:
        hit = PAGE_CACHE.get(ident)
        if hit is not None:
            return hit
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
    page = _apply_deltas(key, slru, rel, page, data.deltas)
    if ident is not None:
        PAGE_CACHE.put(ident, page)
    return page


def reconstruct_uncached(key: Key, lsn: int, data: ReconstructData) -> bytes | None:
    """`reconstruct` without the page cache: for the per-key path of a bulk rebuild (a
    delta's or a basebackup's keys that an in-memory layer holds). Each of its keys is
    rebuilt once, so a lookup never hits, and its puts only evict GetPage's hot pages (the
    cache holds 1024); the chain's digest (blake2b over every version's bytes) was half of
    that path's CPU: 41 of 81 ms in the first incremental push after `snapshot create`
    (~1400 keys in the open layer; py-spy of the daemon, session 25)."""
    return reconstruct(key, lsn, data, cached=False)


def _apply_deltas(
    key: Key,
    slru: tuple[SlruKind, int, int] | None,
    rel: RelBlock | None,
    page: bytes | None,
    deltas: Iterable[tuple[int, WalDelta]],
) -> bytes:
    """Redo of `deltas` (oldest first) over `page`, key parsed as `slru` or `rel`."""
    rnode = RelFileNode(rel.spc, rel.db, rel.rel) if rel is not None else None
    for end_lsn, delta in deltas:
        record = decode_delta(end_lsn, delta)
        if delta.will_init:
            page = None
        if slru is not None:
            page = _apply_slru_delta(key, slru[0], page, record)
        else:
            assert rel is not None and rnode is not None
            page = _apply_rel_delta(key, rel, rnode, page, record)
    assert page is not None
    return page


def continue_chain(key: Key, page: bytes | None, deltas: list[tuple[int, WalDelta]]) -> bytes:
    """The rest of a chain the C redo handed back (`_redo.rebuild_page`): `deltas` redone over
    `page` exactly as `reconstruct` does from that point (page None: before a will_init delta).
    """
    slru = parse_slru_block_key(key)
    rel = None if slru is not None else parse_rel_block_key(key)
    if slru is None and rel is None:
        raise ReconstructError(f"{describe(key)} has WAL deltas but is not a page key")
    return _apply_deltas(key, slru, rel, page, deltas)


def _chain_ident(key: Key, lsn: int, data: ReconstructData) -> bytes:
    """A digest of everything the result depends on, so that the cache can never serve a
    page of another timeline (branches reuse LSNs with different history)."""
    h = hashlib.blake2b(key, digest_size=20)
    h.update(DELTA_HEAD.pack(lsn))
    if data.image is not None:
        h.update(DELTA_HEAD.pack(data.image[0]))
        h.update(data.image[1])
    for end_lsn, delta in data.deltas:
        h.update(DELTA_HEAD.pack(end_lsn))
        h.update(b"\x01" if delta.will_init else b"\x00")
        h.update(delta.record)
    return h.digest()
