"""Per-block SHA-256 of an archived WAL segment, so a reader can fetch part of it and still
verify every byte it uses.

An extraction at LSN X only needs the WAL from the LSN index's record boundary at or below X
through X (at most SAMPLE_DISTANCE, 256 KiB, plus one record: pageserver/ingest/lsn_index.py)
to snap X to a record end; downloading the whole 16 MiB segment for that was most of what a
cold extraction fetched beyond the snapshot's layers. The segment's SHA-256 in the index can
only check the whole object, so the uploader also uploads, for each segment, a small object
of the SHA-256 of each BLOCK-sized block (``wal_sums/<segment>``, itself named in the index
with its size and SHA-256): a reader downloads that, then ranged GETs of just the blocks it
needs, each checked against its digest before it is kept (pageserver/remote/mirror.py).

Format: MAGIC, then little-endian u32 block size and u64 segment object size, then one
32-byte digest per block (the last block may be short).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from proto.errors import CorruptData

BLOCK = 64 * 1024
"""16 MiB / 64 KiB = 256 digests: an 8 KiB sums object per segment, and at most 5 blocks
(320 KiB) for the 256 KiB between a boundary and the LSN."""
MAGIC = b"NEONWSUM"
_HEADER = struct.Struct("<8sIQ")
SUMS_DIR = "wal_sums"
"""Index paths ``wal_sums/<segment file name>``: beside, not under, ``wal/``, which older
readers take as segment files only."""


@dataclass(frozen=True, slots=True)
class BlockSums:
    block: int
    size: int
    digests: tuple[bytes, ...]

    def encode(self) -> bytes:
        return _HEADER.pack(MAGIC, self.block, self.size) + b"".join(self.digests)

    def span(self, n: int) -> tuple[int, int]:
        """Block n's [start, end) in the segment object."""
        start = n * self.block
        return start, min(self.size, start + self.block)

    def check(self, n: int, data: bytes, where: str) -> bytes:
        start, end = self.span(n)
        if len(data) != end - start or hashlib.sha256(data).digest() != self.digests[n]:
            raise CorruptData(
                f"block {n} (bytes {start}..{end}) of {where} does not match its SHA-256 in "
                "the segment's block sums; refused, not used"
            )
        return data


class BlockHasher:
    """Feeds a segment's bytes in order; the whole object's SHA-256 and the block sums, in
    one pass over the file."""

    def __init__(self, block: int = BLOCK) -> None:
        self.block = block
        self.whole = hashlib.sha256()
        self._current = hashlib.sha256()
        self._in_block = 0
        self._digests: list[bytes] = []
        self.size = 0

    def update(self, data: bytes) -> None:
        self.whole.update(data)
        self.size += len(data)
        view = memoryview(data)
        while view:
            take = min(len(view), self.block - self._in_block)
            self._current.update(view[:take])
            self._in_block += take
            view = view[take:]
            if self._in_block == self.block:
                self._digests.append(self._current.digest())
                self._current, self._in_block = hashlib.sha256(), 0

    def sums(self) -> BlockSums:
        digests = list(self._digests)
        if self._in_block:
            digests.append(self._current.digest())
        return BlockSums(self.block, self.size, tuple(digests))


def block_sums(data: bytes, block: int = BLOCK) -> BlockSums:
    hasher = BlockHasher(block)
    hasher.update(data)
    return hasher.sums()


def decode_sums(raw: bytes, where: str) -> BlockSums:
    if len(raw) < _HEADER.size:
        raise CorruptData(f"WAL block sums {where} are truncated")
    magic, block, size = _HEADER.unpack_from(raw)
    count = (size + block - 1) // block if block else -1
    if magic != MAGIC or block <= 0 or len(raw) != _HEADER.size + 32 * count:
        raise CorruptData(f"WAL block sums {where} are not pg-neon block sums")
    body = raw[_HEADER.size :]
    return BlockSums(block, size, tuple(body[i : i + 32] for i in range(0, len(body), 32)))
