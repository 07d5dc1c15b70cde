"""Bulk reads of relation pages, for basebackups: a fork's blocks in order, streamed from the
image layers that hold them, with only the pages that have newer versions going through the
per-key path (`materialize`: the chain walk and redo).

A GetPage-style read per block costs a layer-map walk, an index lookup per layer and a block
cache probe per page; a basebackup of an imported or freshly compacted database needs none of
that: `Timeline.plan_range_read` names, once per database, the image layers holding its keys
and the keys with versions above them, and each fork is then a sequential scan of those
layers' blocks (decompressed once each, outside the cache) merged with the slow keys.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from pageserver.reconstruct.apply_delta import reconstruct
from pageserver.reconstruct.range_rebuild import PageFill
from pageserver.reconstruct.value_format import ZERO_PAGE
from pageserver.storage.keys import (
    U32_MAX,
    Key,
    KeyRange,
    fork_blocks_range,
    rel_block_key,
)
from pageserver.storage.layers.blocks import LayerFile
from pageserver.storage.layers.layer_map import image_tiles
from pageserver.storage.timeline import PersistentView, RangeRead, Timeline

SlowValues = Callable[[list[Key]], Iterable["bytes | None"]]
"""The values of sorted keys at the read's LSN, in order (None: the key has none)."""

_RUN_BLOCKS = 2048
"""Blocks whose slow keys go to one `slow_values` call: a bounded list of keys."""


def _images_in(key_range: KeyRange, plan: RangeRead) -> Iterator[tuple[Key, bytes]]:
    for piece, image in image_tiles(key_range, plan.images):
        yield from image.scan(piece)


def rel_pages(
    timeline: Timeline,
    plan: RangeRead | None,
    spc: int,
    db: int,
    rel: int,
    fork: int,
    first: int,
    count: int,
    lsn: int,
    slow_values: SlowValues | None = None,
    view: PersistentView | None = None,
    read_ahead: bool | None = None,
) -> Iterator[bytes]:
    """Blocks first..first+count-1 of a fork at lsn, in order; `plan` is the timeline's plan
    for a key range holding them, at the same lsn (None: every key is a slow one). Equal to
    materialize() block by block.

    The slow keys' values come from `slow_values`, a run of blocks at a time (a bulk
    rebuild: `range_rebuild.rebuild_keys`), else key by key from the per-key path; `view`
    (the one `slow_values` reads) lets the delta blocks it reads be decompressed ahead.
    `read_ahead`: decompress blocks ahead on the pool (None: when a core is free,
    `spare_core`)."""
    last = first + count  # exclusive
    wanted = _blocks_range(spc, db, rel, fork, first, last)

    def run_keys(run: int) -> tuple[list[Key], KeyRange]:
        return _run_keys(wanted, last, run)

    runs = range(first, last, _RUN_BLOCKS)
    if plan is None:
        for run in runs:
            keys, _ = run_keys(run)
            yield from _pages(
                slow_values(keys) if slow_values is not None else per_key(timeline, keys, lsn)
            )
        return
    # With read_ahead, each run's blocks are decompressed on other threads while the run
    # before it is read (`LayerFile.prefetch`), and those it did not read are dropped after.
    slow_keys = plan.slow
    coming = run_keys(first) if runs else None
    prefetched: Prefetched = []
    if read_ahead is None:
        read_ahead = spare_core()
    if not read_ahead:
        coming = None  # nothing started: runs are read as they come
    ahead = _prefetch(coming, plan, slow_values is not None, view, lsn) if coming else []
    try:
        for run in runs:
            keys, run_range = run_keys(run) if coming is None else coming
            prefetched = ahead
            coming = None
            if read_ahead and run + _RUN_BLOCKS < last:
                coming = run_keys(run + _RUN_BLOCKS)
            ahead = _prefetch(coming, plan, slow_values is not None, view, lsn) if coming else []
            if slow_keys.isdisjoint(keys):
                # Every page from the images (an imported or compacted database's common
                # case): no per-key set lookup.
                yield from _merged(keys, _images_in(run_range, plan), iter(()), frozenset())
            elif slow_values is not None:
                # Rebuilt in bulk, the keys only images hold too: the rebuild decompresses
                # each image block of the run once, where a scan beside it decompressed them
                # again (a third of a 1 GiB extraction's zstd time after a pgbench run).
                yield from _pages(slow_values(keys))
            else:
                slow = [key for key in keys if key in slow_keys]
                stored = _images_in(run_range, plan)
                yield from _merged(keys, stored, per_key(timeline, slow, lsn), slow_keys)
            _drop(prefetched)
    finally:  # the consumer may stop early: nothing stays decompressed for nobody
        _drop(prefetched)
        _drop(ahead)


class Buffers(Protocol):
    """Where `rel_chunks` writes pages (tar_stream's AlignedChunks)."""

    def take(self, pages: int) -> memoryview | bytearray:
        """A writable buffer for that many pages (a basebackup's chunk), lent to the caller."""
        ...

    def release(self, chunk: object) -> None:
        """Take back a buffer from `take` (one never handed on: its fill failed)."""
        ...


Filled = tuple["memoryview | bytearray", int, list[tuple[int, "bytes | None"]]]
"""A chunk `rel_chunks` wrote: the buffer, its pages, and (i, value) of those it left to
the caller (None: the key has none, a hole; a value that is not a whole page)."""


@dataclass(frozen=True, slots=True)
class ForkSpan:
    """Blocks first..first+count-1 of one fork of a relation."""

    spc: int
    db: int
    rel: int
    fork: int
    first: int
    count: int


def rel_chunks(
    timeline: Timeline,
    span: ForkSpan,
    lsn: int,
    view: PersistentView,
    buffers: Buffers,
    per_chunk: int,
) -> Iterator[Filled] | None:
    """The blocks of `span` at lsn written into buffers `buffers` lends,
    per_chunk pages each (the last may have fewer), by the bulk rebuild's C walk
    (`range_rebuild.PageFill`, over `view`): every run of blocks as `rel_pages` rebuilds a
    run with a slow key, without a bytes object per page or a plan. None where that walk
    cannot (`PageFill.usable`): the caller reads `rel_pages`."""
    if not PageFill.usable(timeline):
        return None
    first, last = span.first, span.first + span.count
    wanted = _blocks_range(span.spc, span.db, span.rel, span.fork, first, last)

    def chunks() -> Iterator[Filled]:
        for run in range(first, last, _RUN_BLOCKS):
            keys, run_range = _run_keys(wanted, last, run)
            fill = PageFill(timeline, lsn, view, run_range)
            for at in range(0, len(keys), per_chunk):
                piece = keys[at : at + per_chunk]
                out = buffers.take(len(piece))
                try:
                    left = fill.into(piece, memoryview(out))
                except BaseException:
                    buffers.release(out)  # never handed on: nobody else gives it back
                    raise
                yield out, len(piece), left

    return chunks()


def _blocks_range(spc: int, db: int, rel: int, fork: int, first: int, last: int) -> KeyRange:
    """The keys of blocks first..last-1 of a fork (block U32_MAX is the fork's size key,
    past its pages)."""
    return KeyRange(
        rel_block_key(spc, db, rel, fork, first),
        rel_block_key(spc, db, rel, fork, last)
        if last < U32_MAX
        else fork_blocks_range(spc, db, rel, fork).end,
    )


def _run_keys(wanted: KeyRange, last: int, run: int) -> tuple[list[Key], KeyRange]:
    """The keys of blocks run..min(last, run + _RUN_BLOCKS)-1 of the fork whose blocks
    first..last-1 are `wanted`, and the key range of that run (its end `wanted`'s at the
    last run). Keys sort as their block numbers do: the block is the last, big-endian field
    (pageserver.storage.keys), after a prefix shared by the fork's keys."""
    prefix = wanted.start[:-4]
    stop = min(last, run + _RUN_BLOCKS)
    keys = [Key(prefix + b.to_bytes(4, "big")) for b in range(run, stop)]
    end = wanted.end if stop == last else Key(prefix + stop.to_bytes(4, "big"))
    return keys, KeyRange(keys[0], end)


Prefetched = list[tuple[LayerFile, list[int]]]


def spare_core() -> bool:
    """Whether a core is free for the decompression pool (the 1-minute load average at least
    one below the core count). Ahead on a busy box it only adds thread hand-offs: on this
    2-core box at load 4-6 a 1 GiB extraction's tar maker took 0.2-0.4 s more CPU with it and
    no less time (3.2-4.3 s with, 2.7-3.3 s without, 3 rounds each, interleaved)."""
    cpus = os.cpu_count() or 1
    return cpus > 1 and os.getloadavg()[0] <= cpus - 1


def _prefetch(
    run: tuple[list[Key], KeyRange],
    plan: RangeRead,
    bulk: bool,
    view: PersistentView | None,
    lsn: int,
) -> Prefetched:
    """Start decompressing the image blocks a run reads in bulk (an image scan, or the bulk
    rebuild's image cursors: not the per-key path, which reads through the block cache),
    and for a bulk rebuild the blocks of the delta layers above each piece's image up to
    lsn (its delta cursors read them in file order: ~2300 blocks in line in a 1 GiB
    extraction after a pgbench run, a third of the tar maker's time)."""
    keys, run_range = run
    slow = not plan.slow.isdisjoint(keys)
    if not bulk and slow:
        return []
    started: Prefetched = []
    for piece, image in image_tiles(run_range, plan.images):
        started.append((image.file, image.file.prefetch(image.file.blocks_of(piece))))
        if slow and view is not None:
            for delta in view.layer_map.deltas_overlapping(piece, image.lsn, lsn):
                blocks = delta.file.version_blocks_of(piece, image.lsn, lsn)
                started.append((delta.file, delta.file.prefetch(blocks)))
    return started


def _drop(prefetched: Prefetched) -> None:
    for file, blocks in prefetched:
        file.drop_prefetched(blocks)


def _pages(values: Iterable[bytes | None]) -> Iterator[bytes]:
    return (ZERO_PAGE if page is None else page for page in values)  # absent: a hole


def _merged(
    keys: list[Key],
    stored: Iterator[tuple[Key, bytes]],
    rebuilt: Iterable[bytes | None],
    slow: frozenset[Key],
) -> Iterator[bytes]:
    """The pages of `keys` (in order): the rebuilt values of the slow ones, in order, and
    the others from the images' (key, page) pairs in key order; absent: a hole."""
    rebuilt_values = iter(rebuilt)
    held = next(stored, None)
    for key in keys:
        while held is not None and held[0] < key:
            held = next(stored, None)
        if key in slow:
            page = next(rebuilt_values)
        elif held is not None and held[0] == key:
            page = held[1]
        else:
            page = None
        yield ZERO_PAGE if page is None else page


def per_key(timeline: Timeline, keys: list[Key], lsn: int) -> Iterator[bytes | None]:
    """`SlowValues` through the per-key path (`get_reconstruct_data` + `reconstruct`)."""
    return (reconstruct(key, lsn, timeline.get_reconstruct_data(key, lsn)) for key in keys)
