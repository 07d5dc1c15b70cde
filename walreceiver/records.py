"""Generic decoding of one PostgreSQL 15 WAL record: header, block references, images, main data.

`decode_record(raw)` turns a `RawRecord` (from `walreceiver.xlog_reader`) into a
`DecodedRecord`; rmgr-specific meaning of `main_data` lives in `walreceiver.rmgr`, image
restoration in `walreceiver.fpi`. The layout follows DecodeXLogRecord in xlogreader.c: block
headers in increasing id order, then the origin / top-level xid / main-data headers, then the
payloads (each block's image, then its data; finally the main data).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from proto.errors import CorruptData
from walreceiver.lsn import format_lsn
from walreceiver.rmgr_names import record_type_name, rmgr_name
from walreceiver.xlog_reader import RECORD_HEADER_SIZE, RawRecord

BLCKSZ = 8192
XLR_MAX_BLOCK_ID = 32
XLR_BLOCK_ID_DATA_SHORT = 255
XLR_BLOCK_ID_DATA_LONG = 254
XLR_BLOCK_ID_ORIGIN = 253
XLR_BLOCK_ID_TOPLEVEL_XID = 252
XLR_INFO_MASK = 0x0F
XLR_RMGR_INFO_MASK = 0xF0
XLR_SPECIAL_REL_UPDATE = 0x01
XLR_CHECK_CONSISTENCY = 0x02

BKPBLOCK_FORK_MASK = 0x0F
BKPBLOCK_HAS_IMAGE = 0x10
BKPBLOCK_HAS_DATA = 0x20
BKPBLOCK_WILL_INIT = 0x40
BKPBLOCK_SAME_REL = 0x80

BKPIMAGE_HAS_HOLE = 0x01
BKPIMAGE_APPLY = 0x02
BKPIMAGE_COMPRESS_PGLZ = 0x04
BKPIMAGE_COMPRESS_LZ4 = 0x08
BKPIMAGE_COMPRESS_ZSTD = 0x10
BKPIMAGE_COMPRESSED = BKPIMAGE_COMPRESS_PGLZ | BKPIMAGE_COMPRESS_LZ4 | BKPIMAGE_COMPRESS_ZSTD

MAIN_FORKNUM = 0
FSM_FORKNUM = 1
VISIBILITYMAP_FORKNUM = 2
INIT_FORKNUM = 3
FORK_NAMES = ("main", "fsm", "vm", "init")

_RECORD_HEADER = struct.Struct("<IIQBBxxI")
_BLOCK_HEADER = struct.Struct("<BBH")
_IMAGE_HEADER = struct.Struct("<HHB")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_RELFILENODE = struct.Struct("<III")


class RecordDecodeError(CorruptData):
    """A record whose CRC matched but whose body is inconsistent."""


@dataclass(frozen=True, slots=True)
class RelFileNode:
    """Physical relation identity: tablespace, database and relfilenode OIDs."""

    spc: int
    db: int
    rel: int

    def __str__(self) -> str:
        return f"{self.spc}/{self.db}/{self.rel}"


@dataclass(frozen=True, slots=True)
class BlockImage:
    """A full-page image as stored: hole removed and maybe compressed (see walreceiver.fpi)."""

    data: bytes
    hole_offset: int
    hole_length: int
    bimg_info: int

    @property
    def apply(self) -> bool:
        """True if redo must restore it; False if it exists only for wal_consistency_checking."""
        return bool(self.bimg_info & BKPIMAGE_APPLY)

    @property
    def compression(self) -> str | None:
        info = self.bimg_info
        if info & BKPIMAGE_COMPRESS_PGLZ:
            return "pglz"
        if info & BKPIMAGE_COMPRESS_LZ4:
            return "lz4"
        if info & BKPIMAGE_COMPRESS_ZSTD:
            return "zstd"
        return None


@dataclass(frozen=True, slots=True)
class BlockRef:
    """One block reference of a record: which page, its flags, image and rmgr payload."""

    block_id: int
    rnode: RelFileNode
    fork: int
    blkno: int
    fork_flags: int
    image: BlockImage | None
    data: bytes

    @property
    def has_image(self) -> bool:
        return self.image is not None

    @property
    def apply_image(self) -> bool:
        return self.image is not None and self.image.apply

    @property
    def has_data(self) -> bool:
        return bool(self.fork_flags & BKPBLOCK_HAS_DATA)

    @property
    def will_init(self) -> bool:
        return bool(self.fork_flags & BKPBLOCK_WILL_INIT)

    @property
    def fork_name(self) -> str:
        return FORK_NAMES[self.fork] if self.fork < len(FORK_NAMES) else str(self.fork)


@dataclass(frozen=True, slots=True)
class DecodedRecord:
    """A WAL record split into its parts; `info` is the whole xl_info byte."""

    lsn: int
    end_lsn: int
    tot_len: int
    xid: int
    prev: int
    info: int
    rmgr_id: int
    blocks: tuple[BlockRef, ...]
    main_data: bytes
    origin: int | None = None
    toplevel_xid: int | None = None

    @property
    def rmgr_info(self) -> int:
        """The rmgr-owned high nibble of xl_info (opcode and flags)."""
        return self.info & XLR_RMGR_INFO_MASK

    @property
    def rmgr_name(self) -> str:
        return rmgr_name(self.rmgr_id)

    @property
    def type_name(self) -> str:
        return record_type_name(self.rmgr_id, self.info)

    @property
    def fpi_len(self) -> int:
        return sum(len(b.image.data) for b in self.blocks if b.image is not None)

    @property
    def rec_len(self) -> int:
        """pg_waldump's `rec` length: the record without its page images."""
        return self.tot_len - self.fpi_len

    @property
    def check_consistency(self) -> bool:
        return bool(self.info & XLR_CHECK_CONSISTENCY)

    def block(self, block_id: int) -> BlockRef | None:
        for ref in self.blocks:
            if ref.block_id == block_id:
                return ref
        return None


def decode_record(raw: RawRecord) -> DecodedRecord:
    """Decode a CRC-checked record; RecordDecodeError if its body is inconsistent."""
    return decode_record_bytes(raw.data, raw.lsn, raw.end_lsn)


def decode_record_bytes(data: bytes, lsn: int = 0, end_lsn: int = 0) -> DecodedRecord:
    """Decode record bytes (XLogRecord header included); see DecodeXLogRecord."""
    fail = partial(_fail, lsn)
    if len(data) < RECORD_HEADER_SIZE:
        raise fail(f"record of {len(data)} bytes is shorter than its header")
    tot_len, xid, prev, info, rmid, _crc = _RECORD_HEADER.unpack_from(data, 0)
    if tot_len != len(data):
        raise fail(f"xl_tot_len {tot_len} but {len(data)} bytes")

    # Pass 1: headers. Each pending block is (id, fork_flags, data_len, image header, rnode,
    # blkno); payload lengths are summed and checked against what the record holds.
    pos = RECORD_HEADER_SIZE
    end = tot_len
    pending: list[tuple[int, int, int, tuple[int, int, int, int] | None, RelFileNode, int]] = []
    payload = 0
    main_len = 0
    origin: int | None = None
    toplevel: int | None = None
    last_rnode: RelFileNode | None = None
    max_block_id = -1
    try:
        while end - pos > payload:
            block_id = data[pos]
            if block_id == XLR_BLOCK_ID_DATA_SHORT:
                main_len = data[pos + 1]
                pos += 2
                payload += main_len
                break
            if block_id == XLR_BLOCK_ID_DATA_LONG:
                (main_len,) = _U32.unpack_from(data, pos + 1)
                pos += 5
                payload += main_len
                break
            if block_id == XLR_BLOCK_ID_ORIGIN:
                (origin,) = _U16.unpack_from(data, pos + 1)
                pos += 3
                continue
            if block_id == XLR_BLOCK_ID_TOPLEVEL_XID:
                (toplevel,) = _U32.unpack_from(data, pos + 1)
                pos += 5
                continue
            if block_id > XLR_MAX_BLOCK_ID:
                raise fail(f"invalid block_id {block_id}")
            if block_id <= max_block_id:
                raise fail(f"out-of-order block_id {block_id}")
            max_block_id = block_id
            _, fork_flags, data_len = _BLOCK_HEADER.unpack_from(data, pos)
            pos += 4
            has_data = fork_flags & BKPBLOCK_HAS_DATA
            if has_data and data_len == 0:
                raise fail(f"BKPBLOCK_HAS_DATA set, but no data included (block {block_id})")
            if not has_data and data_len != 0:
                raise fail(f"BKPBLOCK_HAS_DATA not set, but data length is {data_len}")
            payload += data_len
            image_header: tuple[int, int, int, int] | None = None
            if fork_flags & BKPBLOCK_HAS_IMAGE:
                bimg_len, hole_offset, bimg_info = _IMAGE_HEADER.unpack_from(data, pos)
                pos += 5
                compressed = bimg_info & BKPIMAGE_COMPRESSED
                if compressed:
                    if bimg_info & BKPIMAGE_HAS_HOLE:
                        (hole_length,) = _U16.unpack_from(data, pos)
                        pos += 2
                    else:
                        hole_length = 0
                else:
                    hole_length = BLCKSZ - bimg_len
                _check_image(fail, bimg_len, hole_offset, hole_length, bimg_info)
                payload += bimg_len
                image_header = (bimg_len, hole_offset, hole_length, bimg_info)
            if fork_flags & BKPBLOCK_SAME_REL:
                if last_rnode is None:
                    raise fail("BKPBLOCK_SAME_REL set but no previous rel")
                rnode = last_rnode
            else:
                rnode = RelFileNode(*_RELFILENODE.unpack_from(data, pos))
                pos += 12
                last_rnode = rnode
            (blkno,) = _U32.unpack_from(data, pos)
            pos += 4
            pending.append((block_id, fork_flags, data_len, image_header, rnode, blkno))
    except (struct.error, IndexError) as exc:
        raise fail("record headers run past the end of the record") from exc
    if pos + payload != end:
        raise fail(f"payload lengths ({payload}) do not match the record ({end - pos} left)")

    # Pass 2: payloads, in block order, then the main data.
    blocks = []
    for block_id, fork_flags, data_len, image_header, rnode, blkno in pending:
        image = None
        if image_header is not None:
            bimg_len, hole_offset, hole_length, bimg_info = image_header
            image = BlockImage(data[pos : pos + bimg_len], hole_offset, hole_length, bimg_info)
            pos += bimg_len
        block_data = data[pos : pos + data_len]
        pos += data_len
        blocks.append(
            BlockRef(
                block_id,
                rnode,
                fork_flags & BKPBLOCK_FORK_MASK,
                blkno,
                fork_flags,
                image,
                block_data,
            )
        )
    main_data = data[pos : pos + main_len]
    return DecodedRecord(
        lsn, end_lsn, tot_len, xid, prev, info, rmid, tuple(blocks), main_data, origin, toplevel
    )


def _fail(lsn: int, what: str) -> RecordDecodeError:
    return RecordDecodeError(f"invalid WAL record at {format_lsn(lsn)}: {what}")


def _check_image(
    fail: Callable[[str], RecordDecodeError],
    bimg_len: int,
    hole_offset: int,
    hole_length: int,
    bimg_info: int,
) -> None:
    """The cross-checks xlogreader applies to an image header."""
    problem = None
    has_hole = bimg_info & BKPIMAGE_HAS_HOLE
    compressed = bimg_info & BKPIMAGE_COMPRESSED
    if has_hole and (hole_offset == 0 or hole_length == 0 or bimg_len == BLCKSZ):
        problem = "BKPIMAGE_HAS_HOLE set, but hole offset/length/image length inconsistent"
    elif not has_hole and (hole_offset != 0 or hole_length != 0):
        problem = "BKPIMAGE_HAS_HOLE not set, but hole offset or length is not zero"
    elif compressed and bimg_len == BLCKSZ:
        problem = "BKPIMAGE_COMPRESSED set, but block image length is 8192"
    elif not has_hole and not compressed and bimg_len != BLCKSZ:
        problem = f"neither hole nor compression, but block image length is {bimg_len}"
    elif hole_offset + hole_length > BLCKSZ:
        problem = "image hole extends past the page"
    if problem is not None:
        raise fail(problem)
