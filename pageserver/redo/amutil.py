"""Shared plumbing of the index-AM redo modules (hash, GIN, GiST, SP-GiST, BRIN, generic).

Each AM module exposes `apply(record, block_id, page)`: the page state after `record` for one of
its blocks, given the previous state (`None` when the record initialises the block). The
dispatcher (`pageserver.redo.redo_block`) restores APPLY images and stamps pd_lsn; these helpers
cover what every AM needs around its own logic: finding the block reference, insisting on a
previous page, and reading offsets, item pointers and index tuples out of record payloads.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

from pageserver.redo.page import PageError
from pg15.records import BlockRef, DecodedRecord

INVALID_BLOCK = 0xFFFFFFFF
INDEX_SIZE_MASK = 0x1FFF

U16 = struct.Struct("<H")
U32 = struct.Struct("<I")
# ItemPointerData / BlockIdData: {bi_hi, bi_lo} then ip_posid, all uint16.
ITEM_POINTER = struct.Struct("<HHH")
BLOCK_ID = struct.Struct("<HH")


def block_ref(record: DecodedRecord, block_id: int) -> BlockRef:
    """The record's reference to `block_id`; PageError if the record has none."""
    for ref in record.blocks:
        if ref.block_id == block_id:
            return ref
    raise PageError(f"{record.type_name} at {record.lsn:X} has no block reference {block_id}")


def has_block(record: DecodedRecord, block_id: int) -> bool:
    return any(ref.block_id == block_id for ref in record.blocks)


def block_number(record: DecodedRecord, block_id: int) -> int:
    """XLogRecGetBlockTag's block number: redo often links pages by it."""
    return block_ref(record, block_id).blkno


def existing(page: bytearray | None, record: DecodedRecord, block_id: int) -> bytearray:
    """The previous page version, which redo of this block modifies in place."""
    if page is None:
        raise PageError(
            f"{record.type_name} at {record.lsn:X}: block {block_id} needs its previous version"
        )
    return page


def image_required(record: DecodedRecord, block_id: int) -> PageError:
    """Records whose redo is only a forced full-page image (restored by the dispatcher)."""
    return PageError(
        f"{record.type_name} at {record.lsn:X}: block {block_id} must carry a full-page image"
    )


def index_tuple_size(buf: bytes | bytearray | memoryview, off: int = 0) -> int:
    """IndexTupleSize: the low 13 bits of t_info (after the 6-byte t_tid)."""
    return U16.unpack_from(buf, off + 6)[0] & INDEX_SIZE_MASK


def index_tuples(buf: bytes | memoryview, start: int = 0) -> Iterator[memoryview]:
    """Consecutive, unaligned IndexTuples packed back to back in a payload."""
    view = memoryview(buf)
    pos = start
    end = len(view)
    while pos < end:
        size = index_tuple_size(view, pos)
        if size == 0 or pos + size > end:
            raise PageError(f"index tuple of size {size} at payload offset {pos} is truncated")
        yield view[pos : pos + size]
        pos += size


def offsets(buf: bytes | memoryview, start: int, count: int) -> tuple[int, ...]:
    """An OffsetNumber array from record data."""
    if count == 0:
        return ()
    if start + 2 * count > len(buf):
        raise PageError(f"offset array of {count} entries runs past the record data")
    return struct.unpack_from(f"<{count}H", buf, start)


def set_item_pointer(page: bytearray, off: int, blkno: int, posid: int) -> None:
    ITEM_POINTER.pack_into(page, off, blkno >> 16, blkno & 0xFFFF, posid)


def get_block_id(buf: bytes | bytearray | memoryview, off: int) -> int:
    hi, lo = BLOCK_ID.unpack_from(buf, off)
    return (hi << 16) | lo


def set_block_id(page: bytearray, off: int, blkno: int) -> None:
    BLOCK_ID.pack_into(page, off, blkno >> 16, blkno & 0xFFFF)


def unknown(record: DecodedRecord) -> PageError:
    """Error for an opcode this rmgr does not define (corrupt or newer WAL)."""
    return PageError(f"{record.rmgr_name}: unknown record info 0x{record.info:02X}")


def main_struct(layout: struct.Struct, record: DecodedRecord) -> tuple[Any, ...]:
    """The record's fixed-size main-data struct, unpacked; PageError if it is short."""
    data = record.main_data
    if len(data) < layout.size:
        raise PageError(f"{record.type_name}: main data of {len(data)} bytes is too short")
    return layout.unpack_from(data, 0)
