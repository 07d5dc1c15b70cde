"""The tar of a delta `.neon` file: a basebackup whose relation forks carry only the pages
written since a parent snapshot (format: snapfile/delta.py, docs/snapshot-format.md).

Which pages: every block key with a version between the parent's state and the snapshot's,
on either side of where their histories meet (`keys_changed`, from layer indexes, as
`snapshot diff --stat` finds its candidates), plus every block past the fork's size at the
parent (an extension). Pages are read at the snapshot; a page that was written but ended up
the same is sent anyway (a few bytes more, never a wrong page). Everything but relation forks
is the basebackup's own member, so the tar is the basebackup's, fork members aside, and the
whole snapshot's tar size is known without building it (`full_tar_bytes`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from typing import cast

from pageserver.basebackup.sources import TimelineSource
from pageserver.basebackup.tar_stream import Piece, tar_file, tar_header, tar_member
from pageserver.history.snapshot_diff import ReadPoint, keys_changed
from pageserver.reconstruct.range_rebuild import RUN_KEYS, PageFill, rebuild_keys
from pageserver.reconstruct.reads import get_rel_size
from pageserver.reconstruct.value_format import ZERO_PAGE
from pageserver.redo.native import redo as native_redo
from pageserver.storage.keys import Key, fork_blocks_range, keys_fields, rel_block_key
from pageserver.storage.timeline import Timeline
from pg15.constants import BLCKSZ, DEFAULTTABLESPACE_OID, GLOBALTABLESPACE_OID, RELSEG_SIZE
from pg15.datadir_layout import relation_file_name
from proto.errors import CorruptData
from snapfile.delta import (
    BLOCK_NUMBER,
    delta_member_name,
    fork_header,
    fork_member_size,
    fork_sizes_member,
    pack_fork_sizes,
    record_size,
)

_LISTED_SPACES = (DEFAULTTABLESPACE_OID, GLOBALTABLESPACE_OID)
"""Where `fork_sizes` lists forks (global/, base/N/: what the applier reads such a list in);
a tablespace's come as a member each."""
_SIZE_MARKER = 0xFFFFFFFF
_BATCH_PAGES = 32
_REBUILD_KEYS = 4096
"""Keys rebuilt per call: a bounded key list for a fork sent whole (created in the window)."""

Fork = tuple[int, int, int, int]


def _padded(size: int) -> int:
    return size + (-size % 512)


class DeltaForks:
    """`ForkContent` of tar_stream for a delta from `parent` to `source`'s state."""

    def __init__(
        self,
        source: TimelineSource,
        parent: ReadPoint,
        keys: Iterable[Key] | None = None,
        whole_copies: bool = False,
        prepared: Mapping[Key, bytes] | None = None,
    ) -> None:
        """`keys`: the relation keys that may differ (default `keys_changed`); `whole_copies`:
        a fork written from another fork's content (an unlogged relation's main fork, from its
        init fork) is sent whole, for a parent that is a live data directory rather than a
        basebackup (pageserver/basebackup/checkout_delta.py); `prepared`: pages at `source`'s
        point rebuilt ahead (pageserver/basebackup/prepared_pages.py), taken instead of
        rebuilt."""
        self.source = source
        self.parent = parent
        self.whole_copies = whole_copies
        self.prepared = prepared
        self.prepared_used = 0
        """Pages taken from `prepared`."""
        if keys is None:
            keys = keys_changed(parent, ReadPoint(source.timeline, source.lsn))
        self.changed, self.resized = fork_keys(keys)
        """`resized`: forks whose size key may differ: any other is as long at the parent as
        here (a fork's size is its size key's value, which only a version in the windows
        changes)."""
        self.fork_sizes = False
        """Set by a checkout's tar (BasebackupRequest.fork_sizes): the forks of a database
        directory with no page go into one `FORK_SIZES` member (`directory_end`), not a
        member each."""
        self._sizes: dict[str, list[tuple[str, int]]] = {}
        """The forks with no page not yet sent, by directory."""
        self.delta_tar_bytes = 0
        """Tar bytes of the fork members written so far."""
        self.whole_tar_bytes = 0
        """Tar bytes the forks' segment files would have taken in a whole basebackup."""
        self.pages = 0

    def full_tar_bytes(self, tar_bytes: int) -> int:
        """The whole snapshot's tar size, given this delta's."""
        return tar_bytes - self.delta_tar_bytes + self.whole_tar_bytes

    def fork_members(
        self, path: str, spc: int, db: int, rel: int, fork: int, nblocks: int, mtime: int
    ) -> Iterator[Piece]:
        if self.whole_copies and path != relation_file_name(spc, db, rel, fork):
            before = 0
        elif (spc, db, rel, fork) in self.resized:
            before = get_rel_size(self.parent.timeline, spc, db, rel, fork, self.parent.lsn) or 0
        else:  # one read of the page store less per fork: most forks of a delta are unchanged
            before = nblocks
        grown_from = min(before, nblocks)
        written = sorted(b for b in self.changed.get((spc, db, rel, fork), ()) if b < grown_from)
        pages = len(written) + nblocks - grown_from
        size = fork_member_size(pages)
        name = delta_member_name(path)
        for segno in range(max(1, -(-nblocks // RELSEG_SIZE))):
            seg_size = min(nblocks - segno * RELSEG_SIZE, RELSEG_SIZE) * BLCKSZ
            seg_name = path + (f".{segno}" if segno else "")
            self.whole_tar_bytes += tar_header_size(seg_name, seg_size, mtime) + seg_size
        self.pages += pages
        if not pages and self.fork_sizes and spc in _LISTED_SPACES:
            directory, file_name = path.rsplit("/", 1)
            self._sizes.setdefault(directory, []).append((file_name, nblocks))
            return
        self.delta_tar_bytes += tar_header_size(name, size, mtime) + _padded(size)
        if not pages:  # most forks of a delta: one chunk, not a header, records and padding
            yield tar_header(name, size, mtime) + fork_header(nblocks) + bytes(_padded(size) - size)
            return
        runs = [
            *_runs(written),
            *([(grown_from, nblocks - grown_from)] if pages > len(written) else []),
        ]
        yield from tar_member(name, size, self._records(nblocks, spc, db, rel, fork, runs), mtime)

    def directory_end(self, directory: str, mtime: int) -> Iterator[bytes]:
        """After the forks of `directory`: the `FORK_SIZES` member of those with no page."""
        forks = self._sizes.pop(directory, None)
        if not forks:
            return
        data = pack_fork_sizes(forks)
        name = fork_sizes_member(directory)
        self.delta_tar_bytes += tar_header_size(name, len(data), mtime) + _padded(len(data))
        yield from tar_file(name, len(data), [data], mtime)

    def sparse_member(self, name: str, size: int, stored: int, mtime: int) -> None:
        """A sparse member's `stored` bytes stand for a regular member of `size` in the
        whole snapshot's tar (`full_tar_bytes`)."""
        self.delta_tar_bytes += stored
        self.whole_tar_bytes += tar_header_size(name, size, mtime) + _padded(size)

    def _records(
        self, nblocks: int, spc: int, db: int, rel: int, fork: int, runs: list[tuple[int, int]]
    ) -> Iterator[bytes]:
        yield fork_header(nblocks)
        source = self.source
        if self.prepared is None and source.bulk and PageFill.usable(source.timeline):
            blocks = [b for first, count in runs for b in range(first, first + count)]
            yield from filled_records(source.timeline, source.lsn, (spc, db, rel, fork), blocks)
            return
        batch: list[bytes] = []
        for blkno, page in self._pages(spc, db, rel, fork, runs):
            if len(page) != BLCKSZ:
                raise _short_page((spc, db, rel, fork), blkno)
            batch += (BLOCK_NUMBER.pack(blkno), page)
            if len(batch) >= 2 * _BATCH_PAGES:
                yield b"".join(batch)
                batch = []
        if batch:
            yield b"".join(batch)

    def _pages(
        self, spc: int, db: int, rel: int, fork: int, runs: list[tuple[int, int]]
    ) -> Iterator[tuple[int, bytes]]:
        """(block, page at the snapshot) of every block of `runs`, in order.

        A delta's pages are the ones written since the parent: nearly all need redo, so they
        are rebuilt in bulk from the layer files at once (range_rebuild, which gives every
        key's value, image-held or not). `rel_pages` first plans a read of the whole
        database (`Timeline.plan_range_read` walks every version above its image layers:
        a quarter of the page server's CPU for a 1% delta of a pgbench database, py-spy),
        which only pays off for a whole basebackup. Without the C redo (NEON_PURE_PYTHON)
        or for the per-key reference source (`bulk=False`), `rel_pages` as before. Pages
        rebuilt ahead (`prepared`) are taken as they are; the rest are rebuilt."""
        source = self.source
        if not source.bulk or native_redo is None:
            for first, count in runs:
                yield from enumerate(source.rel_pages(spc, db, rel, fork, first, count), first)
            return
        blocks = [b for first, count in runs for b in range(first, first + count)]
        prepared = self.prepared
        if prepared is not None:
            found = {b: prepared.get(rel_block_key(spc, db, rel, fork, b)) for b in blocks}
            missing = [b for b, page in found.items() if page is None]
            rebuilt = rebuilt_pages(source.timeline, source.lsn, spc, db, rel, fork, missing)
            self.prepared_used += len(blocks) - len(missing)
            for blkno, page in found.items():
                yield blkno, next(rebuilt) if page is None else page
            return
        pages = rebuilt_pages(source.timeline, source.lsn, spc, db, rel, fork, blocks)
        yield from zip(blocks, pages, strict=True)


def fork_keys(keys: Iterable[Key]) -> tuple[dict[Fork, set[int]], set[Fork]]:
    """The relation keys among `keys` by fork: the blocks of each, and the forks whose size
    key is among them."""
    changed: dict[Fork, set[int]] = defaultdict(set)
    resized: set[Fork] = set()
    for _kind, spc, db, rel, fork, blkno in keys_fields(keys):
        if rel == 0:
            continue
        if blkno == _SIZE_MARKER:
            resized.add((spc, db, rel, fork))
        else:
            changed[(spc, db, rel, fork)].add(blkno)
    return changed, resized


def filled_records(timeline: Timeline, lsn: int, fork: Fork, blocks: list[int]) -> Iterator[bytes]:
    """The records (block number, page at (timeline, lsn)) of `blocks` (sorted) of `fork`,
    RUN_KEYS a chunk, each page written in place by the bulk rebuild's C walk
    (`range_rebuild.PageFill`; `PageFill.usable(timeline)` must be true), at its record's
    end: where `rebuilt_pages` made a bytes object of every page and handed it through five
    generator steps before the records' join copied it, a tenth of a 1% delta's tar thread;
    and where pages written into a buffer of their own were joined with their block numbers
    after, a copy of every page and a list of two parts a page (py-spy of bench.exchange's
    delta made in-process: a quarter of the records' time, a sixth of the tar's)."""
    spc, db, rel, forknum = fork
    span = fork_blocks_range(spc, db, rel, forknum)
    fill = PageFill(timeline, lsn, timeline.persistent_view(span, lsn), span)
    record = record_size()
    for at in range(0, len(blocks), RUN_KEYS):
        piece = blocks[at : at + RUN_KEYS]
        records = bytearray(len(piece) * record)
        for i, blkno in enumerate(piece):
            BLOCK_NUMBER.pack_into(records, i * record, blkno)
        keys = [rel_block_key(spc, db, rel, forknum, b) for b in piece]
        for i, value in fill.into(keys, records, record):  # the pages the walk left: here
            page = ZERO_PAGE if value is None else value  # absent: a hole
            if len(page) != BLCKSZ:
                raise _short_page(fork, piece[i])
            records[(i + 1) * record - BLCKSZ : (i + 1) * record] = page
        yield cast(bytes, records)  # a bytearray: len and buffer, as AlignedChunks' views


def _short_page(fork: Fork, blkno: int) -> CorruptData:
    spc, db, rel, forknum = fork
    return CorruptData(f"relation {spc}/{db}/{rel} fork {forknum} block {blkno}: short page")


def rebuilt_pages(
    timeline: Timeline, lsn: int, spc: int, db: int, rel: int, fork: int, blocks: list[int]
) -> Iterator[bytes]:
    """The page at (timeline, lsn) of each of `blocks` (sorted; a hole: zeros), rebuilt in
    bulk from the layer files (range_rebuild), `_REBUILD_KEYS` at a time."""
    if not blocks:
        return
    view = timeline.persistent_view(fork_blocks_range(spc, db, rel, fork), lsn)
    for at in range(0, len(blocks), _REBUILD_KEYS):
        keys = [rel_block_key(spc, db, rel, fork, b) for b in blocks[at : at + _REBUILD_KEYS]]
        for value in rebuild_keys(timeline, lsn, view, keys, scattered=True):
            yield ZERO_PAGE if value is None else value  # absent: a hole


_USTAR_HEADER = 512
_USTAR_NAME = 100
_USTAR_NUMBER = 8**11
"""A ustar header holds a name of up to 100 ASCII characters and sizes and times below 8**11
(12-byte octal fields); tarfile's PAX format adds an extended header only beyond those."""


def tar_header_size(name: str, size: int, mtime: int) -> int:
    """len(tar_header(name, size, mtime)), without building it where it is one ustar block
    (every relation file's name and size): counted for every fork of every delta."""
    fits = 0 <= size < _USTAR_NUMBER and 0 <= mtime < _USTAR_NUMBER
    if fits and name.isascii() and len(name) <= _USTAR_NAME:
        return _USTAR_HEADER
    return len(tar_header(name, size, mtime))


def _runs(blocks: list[int]) -> Iterator[tuple[int, int]]:
    """(first, count) of each run of consecutive block numbers (sorted input)."""
    first = prev = None
    for b in blocks:
        if prev is not None and b == prev + 1:
            prev = b
            continue
        if first is not None and prev is not None:
            yield first, prev - first + 1
        first = prev = b
    if first is not None and prev is not None:
        yield first, prev - first + 1
