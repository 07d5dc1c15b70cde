"""The layer file format shared by delta and image layers, and the decompressed-block cache.

A layer file is immutable and self-checking::

    header   fixed size: magic, format version, kind, key range, LSN range, counts,
             index position/size/CRC, total file size, CRC-32C of the header itself
    blocks   zstd-compressed runs of encoded values, in (key, LSN) order
    index    block table   n_blocks   x (offset u64, compressed len u32, raw len u32, crc u32)
             key table     n_keys     x (key 18s, first version u32)        sorted, bisectable
             version table n_versions x (lsn u64, tag u8, block u32, offset u32, length u32)
                           in format version 1; in format version 2 (narrow entries)
                           n_versions x (lsn - header lsn_start u32, tag u8, block u16,
                           offset u32, length u16)

Format versions 3 and 4 are versions 1 and 2 whose value blocks after the first are each
compressed with the first block's content as their zstd dictionary (a raw-content prefix: the
frame may copy from it as if it came first). Image layers are written so, in blocks of eight
pages (settings.image_block_size), because their pages are read scattered (GetPage, a delta
push's pages, a checkout's) and each read decompresses its whole block: alone, small blocks
compress worse and decompress slower than 15-page ones; with the first block as dictionary
they compress better. The image layers of a 1 GiB pgbench node rewritten so (zstd level 2):
0.0506 of their raw bytes in 8-page blocks, against 0.0537 in 15-page blocks without it; in a
test of 4-page blocks, 1400 scattered pages decompressed in 21 ms with the dictionary, 34 ms
without, 81 ms in 15-page blocks. A reader decompresses the first block once per open file
(`LayerFile._decompressor_of`) and keeps it (8 pages and zstd's digest of them, ~90 KiB,
outside block_cache_bytes) until the file is closed; a damaged first block fails every read
of the blocks after it (LayerCorrupt naming the file), not only its own pages'.

A writer writes format version 2 unless an entry does not fit it (an LSN 4 GiB above the
layer's start, a block number or a value length above 65535), then version 1: the version
table was about 40% of an L1 file of hot pages (21 bytes a version, against 13). L0 layers
keep version 1 (the C L0 merge reads them; they are rewritten by the next merge), and so
does a layer starting above LSN 2^64 - 2^32 (a narrow file's LSNs, its start plus a u32,
must fit 64 bits: one that says otherwise is refused on open). Readers read the four versions
and refuse any other, naming it (so does an older pg-neon meeting a version 3 or 4 file).

Open checks the header CRC, the recorded file size (truncation) and the index CRC; a read
checks the CRC of the block it decompresses. Any mismatch raises LayerCorrupt naming the file,
so a damaged file yields an error, never wrong data. Value tags are copied into the version
table so chain walks and key scans never decompress what they skip.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import struct
import threading
import uuid
import weakref
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import crc32c
import zstandard

from durable_files import fsync_dir, temp_path
from pageserver.storage.keys import KEY_SIZE, Key, KeyRange, describe
from pageserver.storage.layers import native as _native
from pageserver.storage.values import TAG_IMAGE, Image, Tombstone, Value, WalDelta, encode_value
from proto.errors import CorruptData, InvalidArgument

MAGIC = b"PNLY"
FORMAT_VERSION = 1
"""The layout with ">QBIII" version entries."""
FORMAT_NARROW = 2
"""The layout with narrow ">IBHIH" version entries (LSNs above the header's lsn_start)."""
FORMAT_DICT = 3
"""Version 1 with the first block as the others' zstd dictionary."""
FORMAT_NARROW_DICT = 4
"""Version 2 with the first block as the others' zstd dictionary."""
READABLE_VERSIONS = (FORMAT_VERSION, FORMAT_NARROW, FORMAT_DICT, FORMAT_NARROW_DICT)
KIND_DELTA = 1
KIND_IMAGE = 2

_HEADER = struct.Struct(">4sHBx18s18sQQIIIQQIQ")
_HEADER_CRC = struct.Struct(">I")
HEADER_SIZE = _HEADER.size + _HEADER_CRC.size
_BLOCK_ENTRY = struct.Struct(">QIII")
_KEY_ENTRY = struct.Struct(">18sI")
_VERSION_ENTRY = struct.Struct(">QBIII")
_VERSION_LSN_TAG = struct.Struct(">QB")
_VERSION_LSN = struct.Struct(">Q")
_VERSION_BLOCK = struct.Struct(">I")
_NARROW_ENTRY = struct.Struct(">IBHIH")
_NARROW_LSN_TAG = struct.Struct(">IB")
_NARROW_LSN = struct.Struct(">I")
_NARROW_MAX = 0xFFFF
_NARROW_BASE_MAX = (1 << 64) - 1 - 0xFFFFFFFF
"""The highest lsn_start of a narrow file: any stored LSN (lsn_start + a u32) fits 64 bits."""
_BLOCK_END = struct.Struct(">Q")


class LayerCorrupt(CorruptData):
    """A layer file failed validation; the message names the file and what is wrong."""

    def __init__(self, path: Path, what: str) -> None:
        super().__init__(f"layer file {path} is corrupt: {what}")
        self.path = path


@dataclass(frozen=True, slots=True)
class LayerHeader:
    kind: int
    key_range: KeyRange
    lsn_start: int
    lsn_end: int
    n_keys: int
    n_versions: int
    n_blocks: int
    index_offset: int
    index_size: int
    index_crc: int
    file_size: int
    version: int = FORMAT_VERSION

    def pack(self) -> bytes:
        body = _HEADER.pack(
            MAGIC,
            self.version,
            self.kind,
            self.key_range.start,
            self.key_range.end,
            self.lsn_start,
            self.lsn_end,
            self.n_keys,
            self.n_versions,
            self.n_blocks,
            self.index_offset,
            self.index_size,
            self.index_crc,
            self.file_size,
        )
        return body + _HEADER_CRC.pack(crc32c.crc32c(body))


def _parse_header(path: Path, raw: bytes) -> LayerHeader:
    if len(raw) < HEADER_SIZE:
        raise LayerCorrupt(path, f"truncated: {len(raw)} bytes, shorter than its header")
    body = raw[: _HEADER.size]
    (stored_crc,) = _HEADER_CRC.unpack_from(raw, _HEADER.size)
    if body[:4] != MAGIC:
        raise LayerCorrupt(path, "bad magic: not a layer file")
    if crc32c.crc32c(body) != stored_crc:
        raise LayerCorrupt(path, "header checksum mismatch")
    (_, version, kind, kstart, kend, lstart, lend, nk, nv, nb, ioff, isize, icrc, fsize) = (
        _HEADER.unpack(body)
    )
    if version not in READABLE_VERSIONS:
        raise LayerCorrupt(
            path,
            f"format version {version} is not supported; this pg-neon reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))} (upgrade pg-neon to read this file)",
        )
    if kind not in (KIND_DELTA, KIND_IMAGE) or kstart > kend or lstart >= lend:
        raise LayerCorrupt(path, "inconsistent header")
    return LayerHeader(
        kind,
        KeyRange(Key(kstart), Key(kend)),
        lstart,
        lend,
        nk,
        nv,
        nb,
        ioff,
        isize,
        icrc,
        fsize,
        version,
    )


class BlockCache:
    """A size-bounded LRU of decompressed blocks, shared by the layers of a store.

    Thread-safe: readers on a pool hit it concurrently.
    """

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity = capacity_bytes
        self._lock = threading.Lock()
        self._blocks: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._size = 0
        self.hits = 0
        self.misses = 0

    def get(self, file_id: int, block: int) -> bytes | None:
        with self._lock:
            data = self._blocks.get((file_id, block))
            if data is None:
                self.misses += 1
                return None
            self._blocks.move_to_end((file_id, block))
            self.hits += 1
            return data

    def put(self, file_id: int, block: int, data: bytes) -> None:
        if len(data) > self.capacity:
            return
        with self._lock:
            old = self._blocks.pop((file_id, block), None)
            if old is not None:
                self._size -= len(old)
            self._blocks[(file_id, block)] = data
            self._size += len(data)
            while self._size > self.capacity:
                _, evicted = self._blocks.popitem(last=False)
                self._size -= len(evicted)

    @property
    def size(self) -> int:
        return self._size


_file_ids = itertools.count(1)
_tls = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    d: zstandard.ZstdDecompressor | None = getattr(_tls, "zstd", None)
    if d is None:
        d = zstandard.ZstdDecompressor()
        _tls.zstd = d
    return d


DICT_DECOMPRESSORS = 8
"""Decompressors with a file's dictionary a thread keeps (the files it read last)."""


def _dict_decompressor(
    file_id: int, dictionary: zstandard.ZstdCompressionDict
) -> zstandard.ZstdDecompressor:
    """This thread's decompressor of a file's dictionary blocks (a decompressor is used by
    one thread at a time; one holds its file's dictionary, digested once)."""
    kept: OrderedDict[int, zstandard.ZstdDecompressor] | None = getattr(_tls, "zstd_dict", None)
    if kept is None:
        kept = _tls.zstd_dict = OrderedDict()
    d = kept.get(file_id)
    if d is None:
        d = kept[file_id] = zstandard.ZstdDecompressor(dict_data=dictionary)
        while len(kept) > DICT_DECOMPRESSORS:
            kept.popitem(last=False)
    else:
        kept.move_to_end(file_id)
    return d


def raw_content_dictionary(content: bytes) -> zstandard.ZstdCompressionDict:
    """A block's content as the zstd dictionary of the blocks after it."""
    return zstandard.ZstdCompressionDict(content, dict_type=zstandard.DICT_TYPE_RAWCONTENT)


_EMPTY_FRAME = zstandard.ZstdCompressor().compress(b"")
"""Decompressed once with a new dictionary, under its file's lock: python-zstandard digests
a dictionary on its first use without a lock, and threads racing to it leak their copies."""


FAULT_AROUND = 64 * 1024
"""Linux maps this much (fault_around_bytes, aligned) around a faulting page of a file map."""

VersionRead = tuple[int, int, bytes]
"""(LSN, tag, encoded value) of one version read from a layer file."""


@dataclass(frozen=True, slots=True)
class VersionEntry:
    """One version as the index records it: where its encoded value lives."""

    lsn: int
    tag: int
    block: int
    offset: int
    length: int


_NO_UPPER = 2**64 - 1
"""`_blockpack.newest_of_keys`' upto when only `above` bounds the versions."""


class LayerFile:
    """A validated, memory-mapped layer file. Immutable, so reads are safe from any thread."""

    def __init__(self, path: Path, cache: BlockCache) -> None:
        self.path = path
        self._cache = cache
        self._id = next(_file_ids)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < HEADER_SIZE:
                    raise LayerCorrupt(path, f"truncated: {size} bytes, shorter than its header")
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError as exc:
            raise LayerCorrupt(path, "file is missing") from exc
        self.header = h = _parse_header(path, self._map[:HEADER_SIZE])
        if h.file_size != size:
            raise LayerCorrupt(path, f"size is {size} bytes, the header says {h.file_size}")
        self.narrow = h.version in (FORMAT_NARROW, FORMAT_NARROW_DICT)
        """Narrow version entries (format versions 2, 4): LSNs are stored above _lsn_base."""
        self.dictionary = h.version in (FORMAT_DICT, FORMAT_NARROW_DICT)
        """Blocks after the first compressed with the first's content as their dictionary."""
        self._zstd_dict: zstandard.ZstdCompressionDict | None = None
        self._dict_lock = threading.Lock()
        if self.narrow and h.lsn_start > _NARROW_BASE_MAX:
            # Its LSNs would pass 2^64: the C readers would wrap them, Python's overflow.
            raise LayerCorrupt(path, f"narrow version entries above LSN {h.lsn_start:X}")
        self._vsize = _NARROW_ENTRY.size if self.narrow else _VERSION_ENTRY.size
        self._lsn_base = h.lsn_start if self.narrow else 0
        self._ventry = _NARROW_ENTRY if self.narrow else _VERSION_ENTRY
        self._vlsn = _NARROW_LSN if self.narrow else _VERSION_LSN
        self._vlsn_tag = _NARROW_LSN_TAG if self.narrow else _VERSION_LSN_TAG
        expected_index = (
            h.n_blocks * _BLOCK_ENTRY.size + h.n_keys * _KEY_ENTRY.size + h.n_versions * self._vsize
        )
        if h.index_size != expected_index or h.index_offset + h.index_size != size:
            raise LayerCorrupt(path, "index bounds do not match the header counts")
        if crc32c.crc32c(self._map[h.index_offset : h.index_offset + h.index_size]) != (
            h.index_crc
        ):
            raise LayerCorrupt(path, "index checksum mismatch")
        self._blocks_at = h.index_offset
        self._keys_at = self._blocks_at + h.n_blocks * _BLOCK_ENTRY.size
        self._versions_at = self._keys_at + h.n_keys * _KEY_ENTRY.size
        self._key_index: tuple[bytes, array[int]] | None = None
        self._ahead: dict[int, tuple[Future[list[bytes | LayerCorrupt]], int]] = {}
        """Blocks being decompressed on the pool for `read_block` (`prefetch`)."""
        self.raw_bytes = self._check_index()
        """Uncompressed bytes of every value block: what reading the whole file decompresses."""
        self.prefetch_batch = max(1, PREFETCH_BYTES * h.n_blocks // max(self.raw_bytes, 1))
        """Blocks a prefetch task decompresses: ~PREFETCH_BYTES of this file's blocks (an
        image layer's are smaller than a delta layer's)."""
        self._release(0, h.file_size)  # the header and the index, read by the checks

    def _check_index(self) -> int:
        """Structural sanity of the index, so later reads can trust offsets and orderings;
        the blocks' uncompressed size."""
        h = self.header
        prev_end = HEADER_SIZE
        raw = 0
        for b in range(h.n_blocks):
            off, clen, ulen, _ = _BLOCK_ENTRY.unpack_from(
                self._map, self._blocks_at + b * _BLOCK_ENTRY.size
            )
            if off != prev_end:
                raise LayerCorrupt(self.path, f"block {b} is not where the index says")
            prev_end = off + clen
            raw += ulen
        if prev_end != h.index_offset:
            raise LayerCorrupt(self.path, "blocks do not end where the index starts")
        if h.n_keys:
            first = self.key_at(0)
            last = self.key_at(h.n_keys - 1)
            if first < h.key_range.start or last >= h.key_range.end:
                raise LayerCorrupt(self.path, "keys outside the layer's key range")
        return raw

    @property
    def n_keys(self) -> int:
        return self.header.n_keys

    def close(self) -> None:
        self._map.close()

    def release_index(self) -> None:
        """Unmap the index's pages (see _release): after an L0 merge walked all of it and at
        the end of a compaction pass; a GetPage needs a few pages of it again."""
        self._release(self._blocks_at, self.header.file_size)

    def _release_versions_of(self, first: int, stop: int) -> None:
        """Unmap the version entries of keys number first..stop: what a scan of those keys
        read (the rest of the index stays mapped for the next range's scan)."""
        firsts = self._keys()[1]
        self._release(
            self._versions_at + firsts[first] * self._vsize,
            self._versions_at + firsts[stop] * self._vsize,
        )

    def _release(self, start: int, end: int) -> None:
        """Unmap from this process the pages of [start, end) just copied out (they stay in
        the kernel's page cache; a later read faults them in again). A block read copies the
        block, so without this the mapped pages of every block ever read, gigabytes over a
        store's life, would count in the pageserver's RSS (RssFile) while its files are
        open. MADV_DONTNEED on a shared read-only file mapping only drops the page table
        entries: a thread reading a neighbouring block on the same page faults it back in.
        The range is widened to the kernel's fault-around windows (FAULT_AROUND): a fault
        maps the window's other pages too, before `start` and after `end`."""
        lo = start - start % FAULT_AROUND
        hi = min(end + (-end) % FAULT_AROUND, self.header.file_size)
        if hi > lo:
            # ValueError: closed meanwhile (the layer was removed), nothing is mapped
            with contextlib.suppress(ValueError):
                self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    # --- index access ---------------------------------------------------------------------

    def _keys(self) -> tuple[bytes, array[int]]:
        """The key table, parsed once: (keys packed back to back, first version of each key
        plus n_versions at the end). The version bounds are checked here, once."""
        index = self._key_index
        if index is None:
            h = self.header
            table = self._map[self._keys_at : self._keys_at + h.n_keys * _KEY_ENTRY.size]
            split = (
                _native.blockpack.key_table if _native.blockpack is not None else key_table_python
            )
            keys, packed_firsts, bad = split(table, h.n_keys, h.n_versions)
            if bad >= 0:
                raise LayerCorrupt(self.path, f"version bounds of key {bad} out of range")
            firsts = array("Q")
            firsts.frombytes(packed_firsts)
            index = self._key_index = (keys, firsts)
            self._release(self._keys_at, self._versions_at)  # copied out: kept as bytes
        return index

    def key_at(self, i: int) -> Key:
        keys = self._keys()[0]
        return Key(keys[i * KEY_SIZE : (i + 1) * KEY_SIZE])

    def versions_of(self, i: int) -> range:
        """Indexes into the version table of the versions of key number i (LSN order)."""
        firsts = self._keys()[1]
        return range(firsts[i], firsts[i + 1])

    def version(self, v: int) -> VersionEntry:
        return VersionEntry(*self.version_tuple(v))

    def version_tuple(self, v: int) -> tuple[int, int, int, int, int]:
        """(lsn, tag, block, offset, length) of version v, without building an object."""
        lsn, tag, block, offset, length = self._ventry.unpack_from(
            self._map, self._versions_at + v * self._vsize
        )
        return lsn + self._lsn_base, tag, block, offset, length

    def version_lsn(self, v: int) -> int:
        lsn = self._vlsn.unpack_from(self._map, self._versions_at + v * self._vsize)[0]
        return int(lsn) + self._lsn_base

    def last_at_or_below(self, versions: range, lsn: int) -> int:
        """Index of the newest version in `versions` with LSN <= lsn, or versions.start - 1."""
        lo, hi = versions.start, versions.stop
        m, at, size, unpack = self._map, self._versions_at, self._vsize, self._vlsn
        lsn -= self._lsn_base  # as stored
        if hi > lo and unpack.unpack_from(m, at + (hi - 1) * size)[0] <= lsn:
            return hi - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if unpack.unpack_from(m, at + mid * size)[0] <= lsn:
                lo = mid + 1
            else:
                hi = mid
        return lo - 1

    def lower_bound(self, key: bytes) -> int:
        """Index of the first key >= `key` (in C when the extension is built)."""
        keys = self._keys()[0]
        if _native.blockpack is not None:
            return _native.blockpack.lower_bound(keys, KEY_SIZE, key)
        return lower_bound_python(keys, self.header.n_keys, key)

    def newest_of_keys(
        self, start: int, end_key: bytes, upto: int | None = None, above: int | None = None
    ) -> Iterator[tuple[Key, int, int]]:
        """(key, LSN, tag) of the newest version (at or below `upto`, if given; keys with none
        are left out) of keys number start.. below end_key (the loop in C when the extension
        is built: key scans of whole layers, such as image creation's listing of every key,
        walk it for every key of every layer, and a basebackup's plan walks a layer spanning
        its LSN with `upto`: 0.3-0.4 s of Python per pgbench database before). `above`: only
        the keys whose newest version is above it (written in the window (above, upto]: a
        diff's question, which of a layer's ~45k keys of a 1 GiB node 1% changed answers
        with a few thousand, the rest no longer made into tuples and dropped)."""
        keys, firsts = self._keys()
        if _native.blockpack is not None:
            bound: list[int] = []
            if upto is not None or above is not None:
                bound.append(_NO_UPPER if upto is None else upto)
            if above is not None:
                bound.append(above)
            if upto is not None and (upto < 0 or (above is not None and upto <= above)):
                found: list[tuple[Key, int, int]] = []  # no LSN is negative; an empty window
            else:
                found = _native.blockpack.newest_of_keys(
                    keys, firsts, self._map, self._versions_at, start, end_key,
                    self.narrow, self._lsn_base, *bound,
                )  # fmt: skip
            self._release_versions_of(start, max(start, self.lower_bound(end_key)))
            return iter(found)
        return self.newest_of_keys_python(start, end_key, upto, above)

    def newest_of_keys_python(
        self, start: int, end_key: bytes, upto: int | None = None, above: int | None = None
    ) -> Iterator[tuple[Key, int, int]]:
        """The reference of `_blockpack.newest_of_keys` (see newest_of_keys)."""
        keys, firsts = self._keys()
        m, at, size, unpack = self._map, self._versions_at, self._vsize, self._vlsn_tag
        base = self._lsn_base
        for i in range(start, self.header.n_keys):
            key = keys[i * KEY_SIZE : (i + 1) * KEY_SIZE]
            if key >= end_key:
                break
            versions = range(firsts[i], firsts[i + 1])
            last = versions.stop - 1 if upto is None else self.last_at_or_below(versions, upto)
            if last >= versions.start:
                lsn, tag = unpack.unpack_from(m, at + last * size)
                if above is None or lsn + base > above:
                    yield Key(key), lsn + base, tag

    def key_versions_raw(
        self, i: int, floor: int = -1, lsn: int | None = None
    ) -> tuple[bytes, int, int]:
        """The version entries of key number i in format version 1's layout (21 bytes each,
        see the module docstring; a narrow table's are widened) with LSNs in (floor, lsn]
        (lsn None: no upper bound), and the first and last block they reference (-1, -2 if
        none): for the C chain redo, which reads them itself (`_redo.rebuild_page`). The
        bounds spare the reader the blocks of versions it would skip: an L1 layer spans
        hundreds of MiB of WAL, a read at a random LSN needs its versions up to that LSN
        only, and those above the key's image not at all."""
        versions = self.versions_of(i)
        start, stop = versions.start, versions.stop
        if floor >= 0:
            start = self.last_at_or_below(versions, floor) + 1
        if lsn is not None:
            stop = self.last_at_or_below(versions, lsn) + 1
        if start >= stop:
            return b"", -1, -2
        at, size = self._versions_at, self._vsize
        raw = self._map[at + start * size : at + stop * size]
        if self.narrow:
            raw = widen_versions(raw, self._lsn_base)
            size = _VERSION_ENTRY.size
        first = _VERSION_BLOCK.unpack_from(raw, 9)[0]
        last = _VERSION_BLOCK.unpack_from(raw, len(raw) - size + 9)[0]
        return raw, first, last

    def read_block(self, b: int) -> bytes:
        """Block b decompressed and checked, bypassing the cache (bulk reads); taken from the
        pool if it was prefetched, or from this thread's few blocks read last
        (`_RecentBlocks`). Its compressed pages are unmapped with those of the blocks read
        after it (`_BulkReleases`)."""
        recent = _recent_blocks()
        held = recent.get(self._id, b)
        if held is not None:
            return held
        ahead = self._ahead.pop(b, None)
        if ahead is not None:
            batch, i = ahead
            with contextlib.suppress(CancelledError):  # dropped by another reader meanwhile
                made = batch.result()[i]
                if isinstance(made, LayerCorrupt):
                    raise made  # as when read here
                recent.put(self._id, b, made)
                return made
        block = self._block(b, use_cache=False, release=False)
        off, clen, _, _ = _BLOCK_ENTRY.unpack_from(
            self._map, self._blocks_at + b * _BLOCK_ENTRY.size
        )
        _bulk_releases.add(self, off, off + clen)
        recent.put(self._id, b, block)
        return block

    def blocks_of(self, key_range: KeyRange) -> range:
        """The value blocks holding the newest versions of key_range's keys (an image
        layer's values: one version per key), from the index."""
        firsts = self._keys()[1]
        lo, hi = self.lower_bound(key_range.start), self.lower_bound(key_range.end)
        if hi <= lo or firsts[hi] <= firsts[lo]:
            return range(0)
        first = self.version_tuple(firsts[lo + 1] - 1)[2]
        last = self.version_tuple(firsts[hi] - 1)[2]
        return range(min(first, last), max(first, last) + 1)

    def version_blocks_of(self, key_range: KeyRange, floor: int, upto: int) -> range:
        """The value blocks from the first version in (floor, upto] of key_range's keys to
        the last one (index only; the edge keys found within _EDGE_KEYS of each end): what a
        bulk rebuild of the range reads of a delta layer, about (the keys between may have
        versions it skips)."""
        firsts = self._keys()[1]
        lo, hi = self.lower_bound(key_range.start), self.lower_bound(key_range.end)
        first_v = last_v = -1
        for i in range(lo, min(hi, lo + _EDGE_KEYS)):
            v = self.last_at_or_below(range(firsts[i], firsts[i + 1]), floor) + 1
            if v < firsts[i + 1] and self.version_lsn(v) <= upto:
                first_v = v
                break
        for i in range(hi - 1, max(lo, hi - _EDGE_KEYS) - 1, -1):
            v = self.last_at_or_below(range(firsts[i], firsts[i + 1]), upto)
            if v >= firsts[i] and self.version_lsn(v) > floor:
                last_v = v
                break
        if first_v < 0 or last_v < first_v:
            return range(0)
        return range(self.version_tuple(first_v)[2], self.version_tuple(last_v)[2] + 1)

    def prefetch(self, blocks: range) -> list[int]:
        """Start decompressing `blocks` on the process's decompression threads (zstd releases
        the GIL), about PREFETCH_BYTES a task, for `read_block` to take: a bulk reader
        scanning a layer's blocks in order then finds them ready, decompressed on the other
        cores while it worked on the ones before (a 1 GiB basebackup's producer spent half
        its time in zstd). Returns those it started: the caller drops the ones it did not
        read (`drop_prefetched`), so memory stays what it asked for."""
        pool = decompression_pool()
        ahead = self._ahead
        wanted = range(max(blocks.start, 0), min(blocks.stop, self.header.n_blocks))
        started = [b for b in wanted if b not in ahead]
        for at in range(0, len(started), self.prefetch_batch):
            batch = started[at : at + self.prefetch_batch]
            task = pool.submit(self._decompressed, batch)
            for i, b in enumerate(batch):
                ahead[b] = (task, i)
        return started

    def _decompressed(self, blocks: list[int]) -> list[bytes | LayerCorrupt]:
        """Each block decompressed and checked, or the error reading it raises; their
        compressed pages unmapped in one call: one per block, from the pool's threads while
        the reader runs on another core, each made the kernel flush that core's TLB too
        (the tar maker's system time grew 0.3-0.5 s -> 0.6-0.8 s with prefetch)."""
        out: list[bytes | LayerCorrupt] = []
        for b in blocks:
            try:
                out.append(self._block(b, use_cache=False, release=False))
            except LayerCorrupt as exc:
                out.append(exc)
        entry, size = _BLOCK_ENTRY, _BLOCK_ENTRY.size
        lo = entry.unpack_from(self._map, self._blocks_at + blocks[0] * size)[0]
        off, clen, _, _ = entry.unpack_from(self._map, self._blocks_at + blocks[-1] * size)
        self._release(lo, off + clen)
        return out

    def drop_prefetched(self, blocks: list[int]) -> None:
        """Forget those of `blocks` not read yet (a task none of whose blocks was read is
        cancelled if it has not started)."""
        ahead = self._ahead
        for b in blocks:
            held = ahead.pop(b, None)
            if held is not None:
                held[0].cancel()  # a task another reader also waits on is running or done

    def raw_bytes_in(self, key_range: KeyRange) -> int:
        """About the uncompressed bytes of the versions of key_range (the file's share of
        versions in the range times its raw size; index only): what reading those keys
        decompresses, for image creation's policy."""
        n = self.header.n_versions
        if n == 0:
            return 0
        firsts = self._keys()[1]
        lo, hi = self.lower_bound(key_range.start), self.lower_bound(key_range.end)
        return self.raw_bytes * (firsts[hi] - firsts[lo]) // n

    def find_key(self, key: bytes) -> int | None:
        i = self.lower_bound(key)
        if i < self.header.n_keys and self.key_at(i) == key:
            return i
        return None

    # --- values ---------------------------------------------------------------------------

    def _block(self, b: int, *, use_cache: bool = True, release: bool = True) -> bytes:
        """Block b decompressed and checked; `release`: its compressed pages unmapped after
        (see _release; a caller reading several blocks may unmap them at once)."""
        if use_cache:
            cached = self._cache.get(self._id, b)
            if cached is not None:
                return cached
        if not 0 <= b < self.header.n_blocks:
            raise LayerCorrupt(self.path, f"reference to block {b} out of range")
        off, clen, ulen, crc = _BLOCK_ENTRY.unpack_from(
            self._map, self._blocks_at + b * _BLOCK_ENTRY.size
        )
        raw = self._map[off : off + clen]
        if release:
            self._release(off, off + clen)
        if len(raw) != clen or crc32c.crc32c(raw) != crc:
            raise LayerCorrupt(self.path, f"checksum mismatch in value block {b}")
        try:
            data = self._decompressor_of(b).decompress(raw, max_output_size=ulen)
        except zstandard.ZstdError as exc:
            raise LayerCorrupt(self.path, f"value block {b} does not decompress") from exc
        if len(data) != ulen:
            raise LayerCorrupt(self.path, f"value block {b} has the wrong size")
        if use_cache:
            self._cache.put(self._id, b, data)
        return data

    def _decompressor_of(self, b: int) -> zstandard.ZstdDecompressor:
        if not self.dictionary or b == 0:
            return _decompressor()
        dictionary = self._zstd_dict
        if dictionary is None:
            with self._dict_lock:
                dictionary = self._zstd_dict
                if dictionary is None:
                    first = self._block(0, use_cache=False)
                    dictionary = raw_content_dictionary(bytes(first))
                    _dict_decompressor(self._id, dictionary).decompress(_EMPTY_FRAME)
                    self._zstd_dict = dictionary
        return _dict_decompressor(self._id, dictionary)

    def read_encoded(self, entry: VersionEntry) -> bytes:
        return self.read_value(entry.tag, entry.block, entry.offset, entry.length)

    def chain_newest_first(self, versions: range, lsn: int, floor: int) -> Iterator[VersionRead]:
        """(LSN, tag, encoded value) of the versions in `versions` with floor < LSN <= lsn,
        newest first: a chain walk. A key's versions sit in few blocks, so each block is
        looked up in the cache once per walk, not once per version."""
        v = self.last_at_or_below(versions, lsn)
        block_no, block = -1, b""
        while v >= versions.start:
            entry_lsn, tag, b, offset, length = self.version_tuple(v)
            if entry_lsn <= floor:
                return
            if b != block_no:
                block_no, block = b, self._block(b)
            yield entry_lsn, tag, self._value_in(block, b, tag, offset, length)
            v -= 1

    def _value_in(self, block: bytes, block_no: int, tag: int, offset: int, length: int) -> bytes:
        end = offset + length
        if end > len(block) or length == 0 or block[offset] != tag:
            raise LayerCorrupt(self.path, f"value reference into block {block_no} is invalid")
        return block[offset:end]

    def read_value(self, tag: int, block_no: int, offset: int, length: int) -> bytes:
        """The encoded value a version entry points at (through the block cache)."""
        return self._value_in(self._block(block_no), block_no, tag, offset, length)

    def iter_newest(self, key_range: KeyRange) -> Iterator[tuple[Key, int, bytes]]:
        """(key, tag, payload) of the newest version of every key of key_range in file order,
        the payload without its tag byte: a bulk scan of an image layer (a basebackup) at one
        index entry and one slice per key, bypassing the cache like iter_key_groups."""
        keys, firsts = self._keys()
        m, at, size = self._map, self._versions_at, self._vsize
        unpack = self._ventry.unpack_from
        block_no, block = -1, b""
        first, stop = self.lower_bound(key_range.start), self.lower_bound(key_range.end)
        for i in range(first, stop):
            last = firsts[i + 1] - 1
            if last < firsts[i]:
                raise LayerCorrupt(self.path, f"key {i} has no version")
            _lsn, tag, b, offset, length = unpack(m, at + last * size)
            if b != block_no:
                block_no, block = b, self.read_block(b)
            end = offset + length
            if end > len(block) or length == 0 or block[offset] != tag:
                raise LayerCorrupt(self.path, f"value reference into block {b} is invalid")
            yield Key(keys[i * KEY_SIZE : (i + 1) * KEY_SIZE]), tag, block[offset + 1 : end]
        self._release_versions_of(first, stop)

    def merge_input(self) -> MergeInput:
        """This file as an input of the C L0 merge (`_blockpack.Merge`): its key table, its
        map with where the version table starts, and `read_block` (each block decompressed
        and checked, bypassing the cache like iter_key_groups). Format version 1 only: the
        merge reads L0 layers, which keep it (compaction merges narrow inputs in Python)."""
        if self.narrow:
            raise InvalidArgument(f"{self.path}: the C merge reads format version 1 only")
        keys, firsts = self._keys()
        return keys, firsts, self._map, self._versions_at, self.read_block

    def run_input(self, start: bytes, lsn_end: int, *, native: bool = False) -> RunInput:
        """This file as a layer of the C bulk rebuild (`_redo.rebuild_run`), walking from the
        first key >= start: its key table, its map with where the version table starts and its
        format, `lsn_end` (the layer's), `read_block` and the walk's state (see _redo.pyi).

        `native`: its blocks are read in C (`_redo.c` run_read_native: the block entry, the
        CRC-32C, this thread's decompressor, the length, then the compressed pages unmapped
        in spans as `_BulkReleases` does) instead of through read_block, whose bookkeeping
        (the thread's recent blocks, the prefetch, the spans) cost a scattered read a fifth
        of its time. For reads of scattered keys, which rarely meet a block twice; the
        thread calling rebuild_run must be this one (the decompressors are its own)."""
        keys, firsts = self._keys()
        state: list[object] = [self.lower_bound(start), -1, None]
        base: _RunLayer = (
            keys, firsts, self._map, self._versions_at, self.narrow, self._lsn_base, lsn_end,
            self.read_block, state,
        )  # fmt: skip
        if not native:
            return base
        return (
            *base, self._blocks_at, self.header.n_blocks, _decompressor().decompress,
            self._decompressor_of if self.dictionary else None, self._ahead,
            FAULT_AROUND, RELEASE_SPAN,
        )  # fmt: skip

    def iter_encoded(self) -> Iterator[tuple[Key, int, bytes]]:
        """Every (key, LSN, encoded value) in file order, bypassing the cache (a sequential
        scan by compaction must not evict the blocks readers use)."""
        for key, versions in self.iter_key_groups():
            for lsn, encoded in versions:
                yield key, lsn, encoded

    def iter_key_groups(
        self, key_range: KeyRange | None = None
    ) -> Iterator[tuple[Key, list[tuple[int, bytes]]]]:
        """(key, [(LSN, encoded value), ...] in LSN order) for every key in file order (of
        `key_range` only, if given), bypassing the cache like iter_encoded."""
        keys, firsts = self._keys()
        m, at, size, base = self._map, self._versions_at, self._vsize, self._lsn_base
        unpack = self._ventry.unpack_from
        block_no, block = -1, b""
        first, stop = 0, self.header.n_keys
        if key_range is not None:
            first, stop = self.lower_bound(key_range.start), self.lower_bound(key_range.end)
        for i in range(first, stop):
            group: list[tuple[int, bytes]] = []
            for v in range(firsts[i], firsts[i + 1]):
                lsn, tag, b, offset, length = unpack(m, at + v * size)
                if b != block_no:
                    block_no, block = b, self._block(b, use_cache=False)
                group.append((lsn + base, self._value_in(block, b, tag, offset, length)))
            yield Key(keys[i * KEY_SIZE : (i + 1) * KEY_SIZE]), group
        self._release_versions_of(first, stop)


MergeInput = tuple[bytes, "array[int]", mmap.mmap, int, Callable[[int], bytes]]
"""A layer file as the C L0 merge reads it (LayerFile.merge_input)."""

_RunLayer = tuple[
    bytes, "array[int]", mmap.mmap, int, bool, int, int, Callable[[int], bytes], list[object]
]
_NativeReads = tuple[int, int, Callable[..., bytes], Callable[[int], Any] | None, dict[int, Any]]
RunInput = _RunLayer | tuple[*_RunLayer, *_NativeReads, int, int]
"""A layer file as the C bulk rebuild reads it (LayerFile.run_input; _redo.pyi): with its
native block reads' fields after the walk's state, or without them."""

MERGE_MAX_KEYS = 1024
"""Keys one call of the C merge adds before its caller checks whether it is cancelled (the
Python loop checks per key; 1024 keys are a few milliseconds)."""
MERGE_MAX_BLOCKS = 16
"""Blocks one call of the C merge cuts before they go to the compression pool (two of its
batches: the pool compresses while the merge goes on)."""
_MERGE_ERRORS = 3
"""`_blockpack.Merge.run`'s statuses from 3 are errors (see `add_merged`); below, it stopped
before a key: none left, the layer reached its target size, or it added its share."""


class MergeSource(Protocol):
    """What LayerFileWriter.add_merged takes: `_blockpack.Merge` (see `_blockpack.c`)."""

    def run(
        self, buf: bytearray, entries: bytearray, keys_out: list[bytes], limit: int,
        block_no: int, n_versions: int, lsn_lo: int, lsn_hi: int, target: int,
        added_before: int, max_keys: int, max_blocks: int, cut: list[bytes], /,
    ) -> tuple[int, int, int, bytes | None, int, bytes | None, int, int, int]: ...  # fmt: skip


VersionList = list[tuple[int, bytes]] | list[tuple[int, Value]]
"""One key's versions in LSN order, encoded or as Value objects."""


Packed = tuple[Any, bytes, bytes, bytes, int, int, int, int]
"""(values, block ends, keys, version entries, keys, versions, value bytes, last LSN) of a
`pack`: the values are bytes, or a read-only buffer whose memory the next pack reuses
(`_inmem.Packed`, read through a memoryview)."""


class PackSource(Protocol):
    """What LayerFileWriter.add_packed takes: `_inmem.Arena` (see `_inmem.c` for `pack`)."""

    def pack(self, block_size: int, lsn_lo: int, lsn_hi: int) -> Packed: ...


class PackStream(Protocol):
    """A pack filled a few blocks at a time (`_inmem.MergePacker`): the blocks `fill`
    reports are final, so they compress while the next ones are packed."""

    def fill(self, blocks: int) -> tuple[bytes, bool]: ...

    def data(self) -> Any: ...

    def result(self) -> Packed: ...


class StreamSource(Protocol):
    """What LayerFileWriter.add_packed_stream takes (compaction's merged pieces)."""

    def stream(self, block_size: int, lsn_lo: int, lsn_hi: int) -> PackStream: ...


_PACKED, _BLOCK_FULL, _LSN_OUTSIDE, _LSN_DECREASING, _NOT_A_VALUE = range(5)

Buffer = bytes | bytearray | memoryview
_VALUE_TYPES = (Image, WalDelta, Tombstone)


def _encoded(value: bytes | Value) -> bytes:
    return value if isinstance(value, bytes) else encode_value(value)


def pack_images_python(
    prefix: bytes, first: int, data: Buffer, offsets: list[int], i: int, size: int,
    keys: list[bytes], buf: bytearray, limit: int, block_no: int, entries: bytearray, n: int,
    lsn: int,
) -> tuple[int, int]:  # fmt: skip
    """The reference of `_blockpack.pack_images` (LayerFileWriter.add_images' loop): the
    images from offsets[i] on into the open block `buf`, their key and version entries into
    `keys` and `entries` (version indexes from `n`); (next, _PACKED) once all are in,
    (next, _BLOCK_FULL) when offsets[next]'s image does not fit in the non-empty block."""
    view = memoryview(data).cast("B")
    pack_key, pack_version = _KEY_ENTRY.pack, _VERSION_ENTRY.pack
    tag = bytes((TAG_IMAGE,))
    while i < len(offsets):
        o = offsets[i]
        if buf and len(buf) + size + 1 > limit:
            return i, _BLOCK_FULL
        keys.append(pack_key(prefix + (first + o // size).to_bytes(4), n))
        entries += pack_version(lsn, TAG_IMAGE, block_no, len(buf), size + 1)
        buf += tag
        buf += view[o : o + size]
        n += 1
        i += 1
    return i, _PACKED


_KEYS_OUT_OF_ORDER = 2
"""pack_values' status for keys[next] not above the key before it."""


def pack_values_python(
    keys: list[Key], values: list[bytes | None], i: int, tag: int, lsn: int,
    keys_out: list[bytes], buf: bytearray, limit: int, block_no: int, entries: bytearray,
    n: int,
) -> tuple[int, int, int, int]:  # fmt: skip
    """The reference of `_blockpack.pack_values` (LayerFileWriter.add_values' loop): from
    keys[i] on, each value that is not None, encoded as `tag` and its bytes, into the open
    block `buf`, its key and version entries into `keys_out` and `entries` (version indexes
    from `n`); (next, status, bytes added, index of the last key given a value or -1) with
    status _PACKED once all are in, _BLOCK_FULL when values[next] does not fit in the
    non-empty block, _KEYS_OUT_OF_ORDER when keys[next] is not above the key before it."""
    pack_key, pack_version = _KEY_ENTRY.pack, _VERSION_ENTRY.pack
    tag_byte = bytes((tag,))
    added, last, status = 0, -1, _PACKED
    while i < len(keys):
        key, value = keys[i], values[i]
        if i > 0 and keys[i - 1] >= key:
            status = _KEYS_OUT_OF_ORDER
            break
        if value is not None:
            size = len(value) + 1
            if buf and len(buf) + size > limit:
                status = _BLOCK_FULL
                break
            keys_out.append(pack_key(key, n))
            entries += pack_version(lsn, tag, block_no, len(buf), size)
            buf += tag_byte
            buf += value
            n += 1
            added += size
            last = i
        i += 1
    return i, status, added, last


def _pack_versions(
    versions: VersionList,
    start: int,
    buf: bytearray,
    limit: int,
    block_no: int,
    entries: bytearray,
    lsn_lo: int,
    lsn_hi: int,
    prev: int,
    value_types: tuple[type, ...],
) -> tuple[int, int, int, int]:
    """LayerFileWriter.add_key's loop, the reference of `_blockpack.pack_versions` (its module
    comment says what the arguments and the four results are)."""
    added = 0
    for i in range(start, len(versions)):
        lsn, value = versions[i]
        if not lsn_lo <= lsn < lsn_hi:
            return i, added, prev, _LSN_OUTSIDE
        if lsn < prev:
            return i, added, prev, _LSN_DECREASING
        if not isinstance(value, bytes | Image | WalDelta | Tombstone) or value == b"":
            return i, added, prev, _NOT_A_VALUE
        encoded = _encoded(value)
        size = len(encoded)
        if buf and len(buf) + size > limit:
            return i, added, prev, _BLOCK_FULL
        entries += _VERSION_ENTRY.pack(lsn, encoded[0], block_no, len(buf), size)
        buf += encoded
        added += size
        prev = lsn
    return len(versions), added, prev, _PACKED


def key_table_python(table: bytes, n_keys: int, n_versions: int) -> tuple[bytes, bytes, int]:
    """A layer's key table (n_keys x ">18sI") split into its keys back to back and the first
    version of each key plus n_versions at the end (array("Q") bytes, native order), with
    the first key whose version bounds are out of range (-1 if none): the reference of
    `_blockpack.key_table`."""
    entries = list(_KEY_ENTRY.iter_unpack(table))
    keys = b"".join([k for k, _ in entries])
    firsts = array("Q", [f for _, f in entries])
    firsts.append(n_versions)
    prev = 0
    for i, first in enumerate(firsts):
        if first < prev or first > n_versions:
            return keys, firsts.tobytes(), i
        prev = first
    if n_keys and firsts[0] != 0:
        return keys, firsts.tobytes(), 0
    return keys, firsts.tobytes(), -1


def narrow_versions_python(entries: bytes | bytearray, lsn_base: int) -> bytes | None:
    """Format version 1's version entries in version 2's narrow layout, or None if one does
    not fit it: the reference of `_blockpack.narrow_versions`."""
    out = bytearray()
    pack = _NARROW_ENTRY.pack
    for lsn, tag, block, offset, length in _VERSION_ENTRY.iter_unpack(entries):
        delta = lsn - lsn_base
        if not 0 <= delta <= 0xFFFFFFFF or block > _NARROW_MAX or length > _NARROW_MAX:
            return None
        out += pack(delta, tag, block, offset, length)
    return bytes(out)


def widen_versions_python(raw: bytes, lsn_base: int) -> bytes:
    """The inverse of narrow_versions_python: the reference of `_blockpack.widen_versions`."""
    pack = _VERSION_ENTRY.pack
    return b"".join(
        [pack(lsn_base + d, t, b, o, n) for d, t, b, o, n in _NARROW_ENTRY.iter_unpack(raw)]
    )


def narrow_versions(entries: bytes | bytearray, lsn_base: int) -> bytes | None:
    if _native.blockpack is not None:
        narrowed: bytes | None = _native.blockpack.narrow_versions(entries, lsn_base)
        return narrowed
    return narrow_versions_python(entries, lsn_base)


def widen_versions(raw: bytes, lsn_base: int) -> bytes:
    if _native.blockpack is not None:
        widened: bytes = _native.blockpack.widen_versions(raw, lsn_base)
        return widened
    return widen_versions_python(raw, lsn_base)


def lower_bound_python(keys: bytes, n_keys: int, key: bytes) -> int:
    """Index of the first of the `n_keys` keys packed in `keys` that is >= `key`: the
    reference of `_blockpack.lower_bound`."""
    lo, hi = 0, n_keys
    while lo < hi:
        mid = (lo + hi) // 2
        if keys[mid * KEY_SIZE : (mid + 1) * KEY_SIZE] < key:
            lo = mid + 1
        else:
            hi = mid
    return lo


CompressedBlock = tuple[bytes, int, int]
"""(zstd frame, uncompressed length, CRC-32C of the frame) of one value block."""

COMPRESS_BATCH = 8
"""Blocks one task of the compression pool compresses (~256 KiB): a task costs tens of
microseconds of Python, small against the zstd time of 8 blocks (~1 ms)."""
PACK_STEP_BLOCKS = 2 * COMPRESS_BATCH
"""Blocks a streamed pack (`add_packed_stream`) cuts a step: each step's blocks go to the
zstd pool as the next are packed (the C call and its GIL release ~10 us a step)."""
COMPRESS_IN_FLIGHT = 4
"""Tasks a writer has queued before it waits for its oldest: memory stays about
(COMPRESS_IN_FLIGHT + 1) x COMPRESS_BATCH blocks per writer."""

_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def compression_pool() -> ThreadPoolExecutor:
    """The process's zstd threads, shared by every layer writer. zstd releases the GIL, so
    the blocks of a layer compress on every core while its writer makes the next ones
    (compression was most of a flush and of image creation on one thread)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            workers = max(1, min(4, os.cpu_count() or 1))
            _pool = ThreadPoolExecutor(workers, thread_name_prefix="layer-zstd")
        return _pool


RELEASE_SPAN = 256 * 1024
"""Compressed bytes of a file's blocks read in order by bulk readers (`read_block`) that
are unmapped in one madvise: one call per block was 6% of a 1 GiB extraction's tar maker
(~0.06 s, each call a page-table walk and a TLB flush). 0: each block at once."""
RELEASE_FILES = 16
"""Files whose read blocks may wait to be unmapped at once: with RELEASE_SPAN, the bound on
what bulk reads leave mapped (4 MiB) when they stop or move to other files."""


class _BulkReleases:
    """The spans of compressed bytes bulk readers copied out and not yet unmapped, one per
    file: a span grows while the blocks read follow each other and is unmapped once it
    reaches RELEASE_SPAN, when a block elsewhere in the file is read, or when more than
    RELEASE_FILES files hold one (the oldest). Files are held weakly: a layer compaction or
    gc removed is unmapped (its disk space freed) when its last user drops it, as without
    spans; a dead file's span has nothing left to unmap, and its id may be a new file's."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: OrderedDict[int, tuple[weakref.ref[LayerFile], int, int]] = OrderedDict()

    def add(self, file: LayerFile, start: int, end: int) -> None:
        done: list[tuple[weakref.ref[LayerFile], int, int]] = []
        with self._lock:
            held = self._spans.pop(id(file), None)
            if held is not None and held[0]() is file:
                _, lo, hi = held
                if lo <= start <= hi + FAULT_AROUND:
                    start, end = lo, max(hi, end)
                else:
                    done.append(held)
            ref = weakref.ref(file)
            if end - start >= RELEASE_SPAN:
                done.append((ref, start, end))
            else:
                self._spans[id(file)] = (ref, start, end)
                if len(self._spans) > RELEASE_FILES:
                    done.append(self._spans.popitem(last=False)[1])
        _release_spans(done)

    def flush(self) -> None:
        """Unmap every span held (tests; a reader that wants nothing left mapped)."""
        with self._lock:
            done = list(self._spans.values())
            self._spans.clear()
        _release_spans(done)


def _release_spans(spans: list[tuple[weakref.ref[LayerFile], int, int]]) -> None:
    """Unmap the spans of the files still alive (outside the lock: a syscall each)."""
    for ref, lo, hi in spans:
        file = ref()
        if file is not None:
            file._release(lo, hi)


_bulk_releases = _BulkReleases()


RECENT_BLOCKS = 8
"""Blocks a thread's bulk reads keep after reading them (`_RecentBlocks`)."""


class _RecentBlocks:
    """The last RECENT_BLOCKS blocks one thread's bulk reads decompressed, by (file id,
    block). A basebackup scans each fork's keys on its own (`iter_newest`, and the bulk
    rebuild's walk per run of keys), and a block holding the pages of several small forks,
    or the end of one run and the start of the next, was decompressed once per scan: 884
    of 9352 decompressions of a 1 GiB basebackup, some blocks 6-7 times. Per thread, so
    nothing is shared or locked; at most 1 MiB of 128 KiB blocks, freed with the thread."""

    def __init__(self) -> None:
        self._blocks: OrderedDict[tuple[int, int], bytes] = OrderedDict()

    def get(self, file_id: int, b: int) -> bytes | None:
        return self._blocks.get((file_id, b))

    def put(self, file_id: int, b: int, block: bytes) -> None:
        self._blocks[file_id, b] = block
        while len(self._blocks) > RECENT_BLOCKS:
            self._blocks.popitem(last=False)


def _recent_blocks() -> _RecentBlocks:
    recent: _RecentBlocks | None = getattr(_tls, "recent_blocks", None)
    if recent is None:
        recent = _tls.recent_blocks = _RecentBlocks()
    return recent


_unzstd_pool: ThreadPoolExecutor | None = None
PREFETCH_BYTES = 1 << 20
"""Uncompressed bytes one decompression task decompresses (8 delta blocks, 15 image blocks):
each task takes the GIL to start and to end, and one per block made the reader wait for it
(4 s of CPU in a 1 GiB extraction's producer against 3.5 s read in line, py-spy)."""
_EDGE_KEYS = 64
"""Keys `version_blocks_of` looks at from each end of a range for one with a version in
the window (the span is a prefetch hint: not found, nothing is prefetched)."""


def decompression_pool() -> ThreadPoolExecutor:
    """The process's threads decompressing blocks ahead of bulk readers (`prefetch`), apart
    from the compression pool: a basebackup's blocks do not queue behind a flush's."""
    global _unzstd_pool
    with _pool_lock:
        if _unzstd_pool is None:
            workers = max(1, min(4, os.cpu_count() or 1))
            _unzstd_pool = ThreadPoolExecutor(workers, thread_name_prefix="layer-unzstd")
        return _unzstd_pool


def _forget_pool() -> None:
    """A forked child has none of the parent's threads: it starts pools of its own (and a
    lock of the spans held no parent thread may be holding)."""
    global _pool, _unzstd_pool, _pool_lock, _bulk_releases
    _pool, _unzstd_pool, _pool_lock = None, None, threading.Lock()
    _bulk_releases = _BulkReleases()


os.register_at_fork(after_in_child=_forget_pool)


def compress_blocks(
    level: int,
    raws: list[Buffer],
    dictionary: zstandard.ZstdCompressionDict | None = None,
    plain_first: bool = False,
) -> list[CompressedBlock]:
    """The blocks compressed (one zstd frame each, as `ZstdCompressor(level).compress`
    makes it: the same bytes on any thread, so a layer's file does not depend on which
    thread compressed what: resume and dedup compare files byte for byte).

    All in one call that releases the GIL once (`multi_compress_to_buffer`): `compress`
    released it per block, and a thread that gives the GIL up waits for it again until the
    holder is made to drop it (sys.getswitchinterval, 5 ms): beside the decode thread of
    a catch-up, which holds it all the time it runs, each block waited up to that long
    (bench/README `ingest`, session 22).

    `dictionary`: the blocks compressed with it, but for the first if `plain_first` (a file's
    first block, whose content the dictionary is)."""
    compressors: dict[int, zstandard.ZstdCompressor] | None = getattr(_tls, "zstd_c", None)
    if compressors is None:
        compressors = _tls.zstd_c = {}
    zc = compressors.get(level)
    if zc is None:
        zc = compressors[level] = zstandard.ZstdCompressor(level=level)
    frames: list[bytes] = []
    rest = list(raws)
    if dictionary is not None:
        if plain_first and rest:
            frames.append(zc.compress(rest.pop(0)))
        kept: tuple[Any, zstandard.ZstdCompressor] | None = getattr(_tls, "zstd_c_dict", None)
        if kept is None or kept[0] is not dictionary:
            kept = _tls.zstd_c_dict = (
                dictionary,
                zstandard.ZstdCompressor(level=level, dict_data=dictionary),
            )
        zc = kept[1]
    if not rest or any(len(raw) == 0 for raw in rest):
        frames += [zc.compress(raw) for raw in rest]  # the batch call refuses empty inputs
    else:
        batch = zc.multi_compress_to_buffer(rest)
        frames += [batch[i].tobytes() for i in range(len(rest))]
    return [(comp, len(raw), crc32c.crc32c(comp)) for raw, comp in zip(raws, frames, strict=True)]


class LayerFileWriter:
    """Streams sorted (key, LSN, encoded value) into a new layer file, then publishes it.

    The file appears under its final name only once complete and fsynced (temp name, fsync,
    rename, directory fsync), so a crash never leaves a half-written layer under a real name.
    """

    def __init__(
        self,
        directory: Path,
        kind: int,
        lsn_start: int,
        lsn_end: int,
        *,
        block_size: int,
        zstd_level: int,
        narrow: bool = True,
        dictionary: bool = False,
    ) -> None:
        """narrow: write format version 2 if every version entry fits it (False: version 1,
        for L0 layers, which the C merge reads). dictionary: the first block's content is
        the others' zstd dictionary (versions 3 and 4)."""
        if lsn_start >= lsn_end:
            raise InvalidArgument(f"empty LSN range [{lsn_start:X}, {lsn_end:X}) for a layer")
        self._dir = directory
        self._kind = kind
        self._lsn_start = lsn_start
        self._lsn_end = lsn_end
        self._block_size = block_size
        self._zstd_level = zstd_level
        self._narrow = narrow
        self._dictionary = dictionary
        self._zstd_dict: zstandard.ZstdCompressionDict | None = None
        """The first block's content, once cut, when `dictionary`."""
        self._tmp = temp_path(directory / f".writing-{uuid.uuid4().hex}")
        # A FAULT_AROUND buffer: compressed blocks (~16 KiB of L1 deltas) reach the system a
        # few at a time, each write releasing the GIL and waiting to take it back (see
        # compress_blocks), in writes no larger than a read maps at once (larger writes
        # made larger page-cache folios, which a read maps whole: test_mapped_pages). Closed
        # in finish/abort.
        self._file: BinaryIO = open(self._tmp, "wb", buffering=FAULT_AROUND)  # noqa: SIM115
        self._file.write(b"\0" * HEADER_SIZE)
        self._offset = HEADER_SIZE
        self._buf = bytearray()
        self._blocks: list[bytes] = []
        self._n_blocks = 0
        """Blocks cut so far: those in _blocks (written), _batch and _in_flight (compressing)."""
        self._batch: list[Buffer] = []
        self._in_flight: deque[Future[list[CompressedBlock]]] = deque()
        self._keys: list[bytes] = []
        self._versions = bytearray()
        self._n_versions = 0
        self._last: tuple[bytes, int] | None = None
        self.uncompressed_bytes = 0

    def add(self, key: Key, lsn: int, encoded: bytes) -> None:
        if not self._lsn_start <= lsn < self._lsn_end:
            raise InvalidArgument(f"LSN {lsn:X} outside the layer's LSN range")
        last = self._last
        if last is None or key != last[0]:
            if last is not None and key < last[0]:
                raise InvalidArgument("layer values must be added in key order")
            self._keys.append(_KEY_ENTRY.pack(key, self._n_versions))
        elif lsn < last[1]:
            raise InvalidArgument(f"versions of {describe(key)} must be added in LSN order")
        self._last = (key, lsn)
        if self._buf and len(self._buf) + len(encoded) > self._block_size:
            self._flush_block()
        self._versions += _VERSION_ENTRY.pack(
            lsn, encoded[0], self._n_blocks, len(self._buf), len(encoded)
        )
        self._n_versions += 1
        self._buf += encoded
        self.uncompressed_bytes += len(encoded)

    def add_images(
        self, prefix: bytes, first: int, data: Buffer, offsets: list[int], lsn: int, size: int
    ) -> None:
        """Add images of `size` bytes, `data[o : o + size]` for each offset `o`, as the values
        at `lsn` of keys `prefix` + the u32 block `first + o // size`, ascending: what `add`
        of each would write (the same file), in one call per chunk of a relation file, not
        several per page (an import's per-page Python was most of its CPU). `data`: any
        buffer (a view of a decompressed frame is copied once, into the block); the loop runs
        in C (`_blockpack.pack_images`) when it is built."""
        if not offsets:
            return
        if not self._lsn_start <= lsn < self._lsn_end:
            raise InvalidArgument(f"LSN {lsn:X} outside the layer's LSN range")
        last = self._last
        if last is not None and prefix + (first + offsets[0] // size).to_bytes(4) <= last[0]:
            raise InvalidArgument("layer values must be added in key order")
        native = _native.blockpack
        pack = native.pack_images if native is not None else pack_images_python
        i = 0
        while True:
            at = i
            i, status = pack(
                prefix, first, data, offsets, i, size, self._keys, self._buf, self._block_size,
                self._n_blocks, self._versions, self._n_versions, lsn,
            )  # fmt: skip
            self._n_versions += i - at
            if status == _PACKED:
                break
            self._flush_block()
        self.uncompressed_bytes += len(offsets) * (size + 1)
        self._last = (Key(prefix + (first + offsets[-1] // size).to_bytes(4)), lsn)

    def add_values(
        self, keys: list[Key], values: list[bytes | None], lsn: int, tag: int
    ) -> Key | None:
        """`add(keys[k], lsn, tag + values[k])` for each k whose value is not None (keys
        ascending, above the last one added), in one call, not one per value: image
        creation's per-page add was a tenth of its CPU. The loop runs in C
        (`_blockpack.pack_values`) when it is built. Returns the last key added (None: none)."""
        if not keys:
            return None
        if not self._lsn_start <= lsn < self._lsn_end:
            raise InvalidArgument(f"LSN {lsn:X} outside the layer's LSN range")
        last = self._last
        if last is not None and keys[0] <= last[0]:
            raise InvalidArgument("layer values must be added in key order")
        native = _native.blockpack
        pack = native.pack_values if native is not None else pack_values_python
        i, added_key = 0, -1
        while True:
            before = len(self._keys)  # a key entry per value: keys are unique
            i, status, added, at = pack(
                keys, values, i, tag, lsn, self._keys, self._buf, self._block_size,
                self._n_blocks, self._versions, self._n_versions,
            )  # fmt: skip
            self._n_versions += len(self._keys) - before
            self.uncompressed_bytes += added
            if at >= 0:
                added_key = at
            if status == _BLOCK_FULL:
                self._flush_block()
                continue
            break
        if added_key >= 0:
            self._last = (keys[added_key], lsn)
        if status == _KEYS_OUT_OF_ORDER:
            raise InvalidArgument("layer values must be added in key order")
        return keys[added_key] if added_key >= 0 else None

    def add_key(self, key: Key, versions: VersionList) -> None:
        """Add every version of one key (LSN order, LSNs not decreasing), a key above the
        last one added: the same as `add` per version, with the checks done once per key.

        Values may be encoded (bytes) or Value objects (encoded here, as encode_value does);
        the per-version loop runs in C (`_blockpack.c`) when it is built.
        """
        if not versions:
            return
        last = self._last
        if last is not None and key <= last[0]:
            if key == last[0]:
                for lsn, value in versions:
                    self.add(key, lsn, _encoded(value))
                return
            raise InvalidArgument("layer values must be added in key order")
        self._keys.append(_KEY_ENTRY.pack(key, self._n_versions))
        pack = _native.blockpack.pack_versions if _native.blockpack is not None else _pack_versions
        i, prev = 0, self._lsn_start
        while True:
            i, added, prev, status = pack(
                versions, i, self._buf, self._block_size, self._n_blocks, self._versions,
                self._lsn_start, self._lsn_end, prev, _VALUE_TYPES,
            )  # fmt: skip
            self.uncompressed_bytes += added
            if status == _PACKED:
                break
            if status == _BLOCK_FULL:
                self._flush_block()
                continue
            lsn = versions[i][0]
            if status == _LSN_OUTSIDE:
                raise InvalidArgument(f"LSN {lsn:X} outside the layer's LSN range")
            if status == _LSN_DECREASING:
                raise InvalidArgument(f"versions of {describe(key)} must be added in LSN order")
            raise InvalidArgument(f"version {i} of {describe(key)} is not a storable value")
        self._n_versions += len(versions)
        self._last = (key, prev)

    def add_packed(self, source: PackSource) -> None:
        """Add every version `source` holds (an in-memory layer's arena, `_inmem.c`), laid out
        by its `pack` as add_key lays out its keys in order, into this empty writer: the same
        file as add_key per key, with the per-version work done in C."""
        self._check_empty()
        packed = source.pack(self._block_size, self._lsn_start, self._lsn_end)
        self._write_blocks(memoryview(packed[0]), packed[1], 0)
        self._take_packed(packed)

    def add_packed_stream(self, source: StreamSource) -> None:
        """add_packed of a pack made a few blocks at a time: each step's blocks go to the
        zstd pool before the next step is packed (the pool idled while a whole L1 piece was
        packed on the flusher); the same file."""
        self._check_empty()
        stream = source.stream(self._block_size, self._lsn_start, self._lsn_end)
        view, start, done = memoryview(stream.data()), 0, False
        while not done:
            ends, done = stream.fill(PACK_STEP_BLOCKS)
            start = self._write_blocks(view, ends, start)
        self._take_packed(stream.result())

    def _check_empty(self) -> None:
        if self._keys or self._buf or self._n_blocks:
            raise InvalidArgument("packed versions go into an empty layer writer")

    def _write_blocks(self, view: memoryview, ends: bytes, start: int) -> int:
        """The blocks of a pack's `view` ending at `ends` (">Q" each) from `start`; the
        last end."""
        for (end,) in _BLOCK_END.iter_unpack(ends):
            self._write_block(view[start:end])
            start = end
        return start

    def _take_packed(self, packed: Packed) -> None:
        """The key and version tables of a pack whose blocks are written."""
        _, _, keys, versions, n_keys, n_versions, added, last_lsn = packed
        size = _KEY_ENTRY.size
        self._keys = [keys[i * size : (i + 1) * size] for i in range(n_keys)]
        self._versions += versions
        self._n_versions = n_versions
        self.uncompressed_bytes += added
        if n_keys:
            self._last = (keys[(n_keys - 1) * size : (n_keys - 1) * size + KEY_SIZE], last_lsn)

    def add_merged(self, merge: MergeSource, target: int, paths: list[Path]) -> int:
        """Add the next key of the C L0 merge and those after it, stopping before a key once
        the layer holds `target` uncompressed bytes, or after MERGE_MAX_KEYS keys: what
        add_key of each merged key writes (the same file; compaction's Python merge is the
        reference). `paths`: the merge's input files (for errors). Returns the merge's status
        (0: no key left, 1: the target reached, 2: more to come)."""
        cut: list[bytes] = []
        status, versions, added, last_key, last_lsn, key, bad_input, bad_block, bad_lsn = (
            merge.run(
                self._buf, self._versions, self._keys, self._block_size, self._n_blocks,
                self._n_versions, self._lsn_start, self._lsn_end, target,
                self.uncompressed_bytes, MERGE_MAX_KEYS, MERGE_MAX_BLOCKS, cut,
            )
        )  # fmt: skip
        for raw in cut:
            self._write_block(raw)
        self._n_versions += versions
        self.uncompressed_bytes += added
        if last_key is not None:
            self._last = (last_key, last_lsn)
        if status < _MERGE_ERRORS:
            return status
        what = describe(Key(key)) if key is not None else "a key"
        if status == 3:
            raise InvalidArgument(f"LSN {bad_lsn:X} outside the layer's LSN range")
        if status == 4:
            raise InvalidArgument(f"versions of {what} must be added in LSN order")
        if status == 5:
            raise LayerCorrupt(
                paths[bad_input], f"value reference into block {bad_block} is invalid"
            )
        raise InvalidArgument("layer values must be added in key order")

    def cut_block(self) -> None:
        """End the open block here (if it holds anything) once the first block is cut: the
        values added next begin a block of their own (ImageLayerWriter keeps small values
        apart from pages). The first block is left to fill: with `dictionary` it is the
        dictionary of every other block."""
        if self._buf and self._n_blocks > 0:
            self._flush_block()

    def _flush_block(self) -> None:
        """Cut the open block: its buffer itself goes to the pool (a copy of every block was
        a copy of the whole layer) and a new one opens."""
        full, self._buf = self._buf, bytearray()
        self._write_block(full)

    def _write_block(self, raw: Buffer) -> None:
        """Cut block number _n_blocks (`raw` must not change: it is compressed later, on
        the pool); blocks reach the file in order, whatever order they compress in."""
        if self._dictionary and self._n_blocks == 0:
            self._zstd_dict = raw_content_dictionary(bytes(raw))
            # zstd's level 0 is its default, 3 (precompute_compress refuses 0)
            self._zstd_dict.precompute_compress(level=self._zstd_level or 3)
        self._batch.append(raw)
        self._n_blocks += 1
        if len(self._batch) >= COMPRESS_BATCH:
            self._submit_batch()

    def _submit_batch(self) -> None:
        if self._batch:
            pool = compression_pool()
            first = self._n_blocks == len(self._batch)
            task = pool.submit(
                compress_blocks, self._zstd_level, self._batch, self._zstd_dict, first
            )
            self._in_flight.append(task)
            self._batch = []
        while len(self._in_flight) > COMPRESS_IN_FLIGHT:
            self._write_compressed(self._in_flight.popleft().result())

    def _drain(self) -> None:
        """Every block cut so far compressed and written."""
        self._submit_batch()
        while self._in_flight:
            self._write_compressed(self._in_flight.popleft().result())

    def _write_compressed(self, blocks: list[CompressedBlock]) -> None:
        for comp, raw_len, crc in blocks:
            self._file.write(comp)
            self._blocks.append(_BLOCK_ENTRY.pack(self._offset, len(comp), raw_len, crc))
            self._offset += len(comp)

    @property
    def n_versions(self) -> int:
        return self._n_versions

    @property
    def first_key(self) -> Key | None:
        return Key(self._keys[0][:KEY_SIZE]) if self._keys else None

    @property
    def last_key(self) -> Key | None:
        return Key(self._last[0]) if self._last else None

    def finish(self, key_range: KeyRange, file_name: str) -> Path:
        """Write the index and header, fsync, publish as `file_name` and return its path.

        The key range is given at the end because a compaction output learns where it stops
        only when it stops; it must hold every key added.
        """
        self.seal(key_range)
        return self.publish(file_name)

    def seal(self, key_range: KeyRange) -> None:
        """Write the index and header: the file is complete, not yet durable nor visible
        (`publish` does that, possibly on another thread while the next layer is written)."""
        try:
            first, last = self.first_key, self.last_key
            if first is not None and (first not in key_range or last not in key_range):
                raise InvalidArgument(f"key range {key_range} does not hold the layer's keys")
            if self._buf:
                self._flush_block()
            self._drain()
            versions: bytes | bytearray = self._versions
            version = FORMAT_VERSION
            if self._narrow and self._lsn_start <= _NARROW_BASE_MAX:
                narrowed = narrow_versions(versions, self._lsn_start)
                if narrowed is not None:
                    versions, version = narrowed, FORMAT_NARROW
            if self._zstd_dict is not None:
                version = FORMAT_NARROW_DICT if version == FORMAT_NARROW else FORMAT_DICT
            index = b"".join((b"".join(self._blocks), b"".join(self._keys), versions))
            self._file.write(index)
            header = LayerHeader(
                self._kind,
                key_range,
                self._lsn_start,
                self._lsn_end,
                len(self._keys),
                self._n_versions,
                len(self._blocks),
                self._offset,
                len(index),
                crc32c.crc32c(index),
                self._offset + len(index),
                version,
            )
            self._file.seek(0)
            self._file.write(header.pack())
            self._file.flush()
        except BaseException:
            self.abort()
            raise

    def publish(self, file_name: str) -> Path:
        """fsync the sealed file, rename it to `file_name`, fsync the directory; its path."""
        try:
            os.fsync(self._file.fileno())
            self._file.close()
            path = self._dir / file_name
            os.replace(self._tmp, path)
            fsync_dir(self._dir)
        except BaseException:
            self.abort()
            raise
        return path

    def abort(self) -> None:
        for future in self._in_flight:
            future.cancel()  # a running one ends on its own; its result is dropped
        self._in_flight.clear()
        self._batch = []
        if not self._file.closed:
            self._file.close()
        self._tmp.unlink(missing_ok=True)
