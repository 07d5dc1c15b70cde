"""Generic decoding of one PostgreSQL 15 WAL record: header, block references, images, main data.

`decode_record(raw)` turns a `RawRecord` (from `pg15.xlog_reader`) into a
`DecodedRecord`; rmgr-specific meaning of `main_data` lives in `pg15.rmgr`, image
restoration in `pg15.fpi`. The layout follows DecodeXLogRecord in xlogreader.c: block
headers in increasing id order, then the origin / top-level xid / main-data headers, then the
payloads (each block's image, then its data; finally the main data).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from pg15.constants import BLCKSZ, FORK_NAMES
from pg15.lsn import format_lsn
from pg15.native import walscan
from pg15.rmgr_names import record_type_name, rmgr_name
from pg15.xlog_reader import RECORD_HEADER_SIZE, RawRecord
from proto.errors import CorruptData

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


class BlockImage(NamedTuple):
    """A full-page image as stored: hole removed and maybe compressed (see pg15.fpi)."""

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


class BlockRef(NamedTuple):
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


class DecodedRecord(NamedTuple):
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


# The decoder builds the (immutable, tuple-based) result types with tuple.__new__ directly,
# skipping the generated Python-level __new__: this is the hot path of WAL catch-up.
_new_tuple = tuple.__new__
_unpack_record_header = _RECORD_HEADER.unpack_from
_unpack_rnode_blkno = struct.Struct("<12sI").unpack_from
_unpack_u32 = _U32.unpack_from
_unpack_image_header = _IMAGE_HEADER.unpack_from
_unpack_relfilenode = _RELFILENODE.unpack
_NO_BLOCKS: tuple[BlockRef, ...] = ()
# A record with one plain block reference: the record header, then block id, fork flags, data
# length, relfilenode, block number; then the short main-data header (id 255, length).
_unpack_one_block = struct.Struct("<IIQBBxxIBBH12sIBB").unpack_from
_NO_BLOCK_PAYLOAD = RECORD_HEADER_SIZE + 2  # main data right after its short header
_ONE_BLOCK_MAIN = RECORD_HEADER_SIZE + 20  # where that main-data header sits
_ONE_BLOCK_PAYLOAD = RECORD_HEADER_SIZE + 22  # where the block's data starts
_IMAGE_OR_SAME_REL = BKPBLOCK_HAS_IMAGE | BKPBLOCK_SAME_REL

# Shared RelFileNode objects by their 12 raw bytes: a workload touches few relations, and
# looking one up is much cheaper than building it. Bounded: cleared when it grows too large.
_rnode_cache: dict[bytes, RelFileNode] = {}
_RNODE_CACHE_MAX = 4096


def _rnode_of(raw: bytes) -> RelFileNode:
    rnode = _rnode_cache.get(raw)
    if rnode is None:
        if len(_rnode_cache) >= _RNODE_CACHE_MAX:
            _rnode_cache.clear()
        rnode = _rnode_cache[raw] = RelFileNode(*_unpack_relfilenode(raw))
    return rnode


def decode_record_python(raw: RawRecord) -> DecodedRecord:
    """Decode a CRC-checked record; RecordDecodeError if its body is inconsistent.

    The reference implementation; `decode_record` is its C twin when that is built."""
    lsn, end_lsn, data = raw
    n = len(data)
    # Fast paths for the two shapes most records have; they produce exactly what the general
    # path below would, and leave every other shape (and every inconsistency) to it.
    if (
        n >= _ONE_BLOCK_PAYLOAD
        and data[RECORD_HEADER_SIZE] <= XLR_MAX_BLOCK_ID
        and not data[RECORD_HEADER_SIZE + 1] & _IMAGE_OR_SAME_REL
        and data[_ONE_BLOCK_MAIN] == XLR_BLOCK_ID_DATA_SHORT
    ):
        # One block reference with its own relation and no image, short main data: the
        # record header, the block header and the main-data header in one unpack.
        (
            tot_len,
            xid,
            prev,
            info,
            rmid,
            _crc,
            block_id,
            fork_flags,
            data_len,
            rnode_bytes,
            blkno,
            _,
            main_len,
        ) = _unpack_one_block(data, 0)
        main_at = _ONE_BLOCK_PAYLOAD + data_len
        if (
            tot_len == n
            and main_at + main_len == n
            and (data_len != 0) == (fork_flags & BKPBLOCK_HAS_DATA != 0)
        ):
            ref = _new_tuple(
                BlockRef,
                (
                    block_id,
                    _rnode_cache.get(rnode_bytes) or _rnode_of(rnode_bytes),
                    fork_flags & BKPBLOCK_FORK_MASK,
                    blkno,
                    fork_flags,
                    None,
                    data[_ONE_BLOCK_PAYLOAD:main_at],
                ),
            )
            return _new_tuple(
                DecodedRecord,
                (lsn, end_lsn, tot_len, xid, prev, info, rmid, (ref,), data[main_at:], None, None),
            )
    elif (
        n >= _NO_BLOCK_PAYLOAD
        and data[RECORD_HEADER_SIZE] == XLR_BLOCK_ID_DATA_SHORT
        and _NO_BLOCK_PAYLOAD + data[RECORD_HEADER_SIZE + 1] == n
    ):
        # No block references, short main data (commits, most standby/xlog records).
        tot_len, xid, prev, info, rmid, _crc = _unpack_record_header(data, 0)
        if tot_len == n:
            return _new_tuple(
                DecodedRecord,
                (
                    lsn,
                    end_lsn,
                    tot_len,
                    xid,
                    prev,
                    info,
                    rmid,
                    _NO_BLOCKS,
                    data[_NO_BLOCK_PAYLOAD:],
                    None,
                    None,
                ),
            )

    if n < RECORD_HEADER_SIZE:
        raise _fail(lsn, f"record of {n} bytes is shorter than its header")
    tot_len, xid, prev, info, rmid, _crc = _unpack_record_header(data, 0)
    if tot_len != n:
        raise _fail(lsn, f"xl_tot_len {tot_len} but {n} bytes")

    # Pass 1: headers. Each block is noted as (id, fork_flags, data_len, image header, rnode,
    # blkno); payload lengths are summed and checked against what the record holds.
    pos = RECORD_HEADER_SIZE
    heads: list[tuple[int, int, int, tuple[int, int, int, int] | None, RelFileNode, int]] = []
    payload = 0
    main_len = 0
    origin: int | None = None
    toplevel: int | None = None
    last_rnode: RelFileNode | None = None
    max_block_id = -1
    try:
        while n - pos > payload:
            block_id = data[pos]
            if block_id <= XLR_MAX_BLOCK_ID:
                if block_id <= max_block_id:
                    raise _fail(lsn, f"out-of-order block_id {block_id}")
                max_block_id = block_id
                fork_flags = data[pos + 1]
                data_len = data[pos + 2] | data[pos + 3] << 8
                if fork_flags & BKPBLOCK_HAS_DATA:
                    if not data_len:
                        raise _fail(
                            lsn, f"BKPBLOCK_HAS_DATA set, but no data included (block {block_id})"
                        )
                elif data_len:
                    raise _fail(lsn, f"BKPBLOCK_HAS_DATA not set, but data length is {data_len}")
                pos += 4
                payload += data_len
                image_header: tuple[int, int, int, int] | None = None
                if fork_flags & BKPBLOCK_HAS_IMAGE:
                    image_header, pos = _image_header(data, pos, lsn)
                    payload += image_header[0]
                if fork_flags & BKPBLOCK_SAME_REL:
                    if last_rnode is None:
                        raise _fail(lsn, "BKPBLOCK_SAME_REL set but no previous rel")
                    (blkno,) = _unpack_u32(data, pos)
                    pos += 4
                    heads.append((block_id, fork_flags, data_len, image_header, last_rnode, blkno))
                else:
                    rnode_bytes, blkno = _unpack_rnode_blkno(data, pos)
                    pos += 16
                    rnode = _rnode_cache.get(rnode_bytes) or _rnode_of(rnode_bytes)
                    last_rnode = rnode
                    heads.append((block_id, fork_flags, data_len, image_header, rnode, blkno))
                continue
            if block_id == XLR_BLOCK_ID_DATA_SHORT:
                main_len = data[pos + 1]
                pos += 2
                payload += main_len
                break
            if block_id == XLR_BLOCK_ID_DATA_LONG:
                (main_len,) = _unpack_u32(data, pos + 1)
                pos += 5
                payload += main_len
                break
            if block_id == XLR_BLOCK_ID_ORIGIN:
                origin = data[pos + 1] | data[pos + 2] << 8
                pos += 3
                continue
            if block_id == XLR_BLOCK_ID_TOPLEVEL_XID:
                (toplevel,) = _unpack_u32(data, pos + 1)
                pos += 5
                continue
            raise _fail(lsn, f"invalid block_id {block_id}")
    except (struct.error, IndexError) as exc:
        raise _fail(lsn, "record headers run past the end of the record") from exc
    if pos + payload != n:
        raise _fail(lsn, f"payload lengths ({payload}) do not match the record ({n - pos} left)")

    # Pass 2: payloads, in block order, then the main data.
    if heads:
        blocks = []
        for block_id, fork_flags, data_len, image_header, rnode, blkno in heads:
            image = None
            if image_header is not None:
                bimg_len, hole_offset, hole_length, bimg_info = image_header
                image = _new_tuple(
                    BlockImage, (data[pos : pos + bimg_len], hole_offset, hole_length, bimg_info)
                )
                pos += bimg_len
            end = pos + data_len
            blocks.append(
                _new_tuple(
                    BlockRef,
                    (
                        block_id,
                        rnode,
                        fork_flags & BKPBLOCK_FORK_MASK,
                        blkno,
                        fork_flags,
                        image,
                        data[pos:end],
                    ),
                )
            )
            pos = end
        block_refs: tuple[BlockRef, ...] = tuple(blocks)
    else:
        block_refs = _NO_BLOCKS
    return _new_tuple(
        DecodedRecord,
        (
            lsn,
            end_lsn,
            tot_len,
            xid,
            prev,
            info,
            rmid,
            block_refs,
            data[pos : pos + main_len],
            origin,
            toplevel,
        ),
    )


if walscan is not None:
    walscan.init_decoder(DecodedRecord, BlockRef, BlockImage, RelFileNode, decode_record_python)
    decode_record: Callable[[RawRecord], DecodedRecord] = walscan.decode_record
    decode_records: Callable[[list[RawRecord]], list[DecodedRecord]] = walscan.decode_records
else:
    decode_record = decode_record_python

    def decode_records(batch: list[RawRecord]) -> list[DecodedRecord]:
        """decode_record over a batch (WalReader.read_batch); the first bad one raises."""
        return [decode_record_python(raw) for raw in batch]


def decode_record_bytes(data: bytes, lsn: int = 0, end_lsn: int = 0) -> DecodedRecord:
    """Decode record bytes (XLogRecord header included); see DecodeXLogRecord."""
    return decode_record(RawRecord(lsn, end_lsn, data))


def _image_header(data: bytes, pos: int, lsn: int) -> tuple[tuple[int, int, int, int], int]:
    """The image header at `pos` as (bimg_len, hole_offset, hole_length, bimg_info), checked,
    and the offset just past it."""
    bimg_len, hole_offset, bimg_info = _unpack_image_header(data, pos)
    pos += 5
    if bimg_info & BKPIMAGE_COMPRESSED:
        if bimg_info & BKPIMAGE_HAS_HOLE:
            hole_length = data[pos] | data[pos + 1] << 8
            pos += 2
        else:
            hole_length = 0
    else:
        hole_length = BLCKSZ - bimg_len
    _check_image(lsn, bimg_len, hole_offset, hole_length, bimg_info)
    return (bimg_len, hole_offset, hole_length, bimg_info), pos


def _fail(lsn: int, what: str) -> RecordDecodeError:
    return RecordDecodeError(f"invalid WAL record at {format_lsn(lsn)}: {what}")


def _check_image(
    lsn: int,
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
    elif not compressed and bimg_len > BLCKSZ:
        problem = f"block image length {bimg_len} is larger than a page"
    elif compressed and bimg_len == BLCKSZ:
        problem = "BKPIMAGE_COMPRESSED set, but block image length is 8192"
    elif not has_hole and not compressed and bimg_len != BLCKSZ:
        problem = f"neither hole nor compression, but block image length is {bimg_len}"
    elif hole_offset + hole_length > BLCKSZ:
        problem = "image hole extends past the page"
    if problem is not None:
        raise _fail(lsn, problem)
