"""Hand-built WAL records for the redo unit tests."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pg15.records import (
    BKPBLOCK_HAS_DATA,
    BKPBLOCK_HAS_IMAGE,
    BKPBLOCK_WILL_INIT,
    BlockImage,
    BlockRef,
    DecodedRecord,
    RelFileNode,
)

REL = RelFileNode(1663, 5, 16384)
LSN = 0x1000000
END_LSN = 0x1000040


@dataclass(frozen=True)
class Blk:
    """One block reference to build: id, block number, data, flags."""

    block_id: int
    blkno: int
    data: bytes = b""
    will_init: bool = False
    fork: int = 0
    image: BlockImage | None = None


def record(
    rmgr_id: int,
    info: int,
    main: bytes,
    blocks: Sequence[Blk],
    *,
    xid: int = 700,
    lsn: int = LSN,
    end_lsn: int = END_LSN,
) -> DecodedRecord:
    refs = []
    for b in blocks:
        flags = b.fork
        if b.data:
            flags |= BKPBLOCK_HAS_DATA
        if b.will_init:
            flags |= BKPBLOCK_WILL_INIT
        if b.image is not None:
            flags |= BKPBLOCK_HAS_IMAGE
        refs.append(BlockRef(b.block_id, REL, b.fork, b.blkno, flags, b.image, b.data))
    return DecodedRecord(lsn, end_lsn, 0, xid, 0, info, rmgr_id, tuple(refs), main)
