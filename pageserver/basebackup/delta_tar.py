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

import contextlib
import queue
import threading
from collections import defaultdict
from collections.abc import Iterable, Iterator
from itertools import chain, islice

from pageserver.basebackup.sources import TimelineSource
from pageserver.basebackup.tar_stream import tar_file, tar_header
from pageserver.history.snapshot_diff import ReadPoint, keys_changed
from pageserver.reconstruct.range_rebuild import RUN_KEYS, rebuild_keys
from pageserver.reconstruct.reads import get_rel_size
from pageserver.reconstruct.value_format import ZERO_PAGE
from pageserver.redo.native import redo as native_redo
from pageserver.storage.compaction import image_workers
from pageserver.storage.keys import Key, fork_blocks_range, keys_fields, rel_block_key
from pageserver.storage.timeline import PersistentView, Timeline
from pg15.constants import BLCKSZ, RELSEG_SIZE
from pg15.datadir_layout import relation_file_name
from proto.errors import CorruptData
from snapfile.delta import BLOCK_NUMBER, delta_member_name, fork_header, fork_member_size

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
    ) -> None:
        """`keys`: the relation keys that may differ (default `keys_changed`); `whole_copies`:
        a fork written from another fork's content (an unlogged relation's main fork, from its
        init fork) is sent whole, for a parent that is a live data directory rather than a
        basebackup (pageserver/basebackup/checkout_delta.py)."""
        self.source = source
        self.parent = parent
        self.whole_copies = whole_copies
        self.changed: dict[Fork, set[int]] = defaultdict(set)
        self.resized: set[Fork] = set()
        """Forks whose size key may differ: any other is as long at the parent as here (a
        fork's size is its size key's value, which only a version in the windows changes)."""
        if keys is None:
            keys = keys_changed(parent, ReadPoint(source.timeline, source.lsn))
        for _kind, spc, db, rel, fork, blkno in keys_fields(keys):
            if rel == 0:
                continue
            if blkno == _SIZE_MARKER:
                self.resized.add((spc, db, rel, fork))
            else:
                self.changed[(spc, db, rel, fork)].add(blkno)
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
    ) -> Iterator[bytes]:
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
        self.delta_tar_bytes += tar_header_size(name, size, mtime) + _padded(size)
        for segno in range(max(1, -(-nblocks // RELSEG_SIZE))):
            seg_size = min(nblocks - segno * RELSEG_SIZE, RELSEG_SIZE) * BLCKSZ
            seg_name = path + (f".{segno}" if segno else "")
            self.whole_tar_bytes += tar_header_size(seg_name, seg_size, mtime) + seg_size
        self.pages += pages
        runs = [
            *_runs(written),
            *([(grown_from, nblocks - grown_from)] if pages > len(written) else []),
        ]
        yield from tar_file(name, size, self._records(nblocks, spc, db, rel, fork, runs), mtime)

    def _records(
        self, nblocks: int, spc: int, db: int, rel: int, fork: int, runs: list[tuple[int, int]]
    ) -> Iterator[bytes]:
        yield fork_header(nblocks)
        batch: list[bytes] = []
        for blkno, page in self._pages(spc, db, rel, fork, runs):
            if len(page) != BLCKSZ:
                what = f"relation {spc}/{db}/{rel} fork {fork} block {blkno}"
                raise CorruptData(f"{what}: short page")
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
        or for the per-key reference source (`bulk=False`), `rel_pages` as before."""
        source = self.source
        if not source.bulk or native_redo is None:
            for first, count in runs:
                yield from enumerate(source.rel_pages(spc, db, rel, fork, first, count), first)
            return
        blocks = [b for first, count in runs for b in range(first, first + count)]
        if not blocks:
            return
        view = source.timeline.persistent_view(fork_blocks_range(spc, db, rel, fork), source.lsn)
        for at in range(0, len(blocks), _REBUILD_KEYS):
            part = blocks[at : at + _REBUILD_KEYS]
            keys = [rel_block_key(spc, db, rel, fork, b) for b in part]
            values = rebuilt_values(source.timeline, source.lsn, view, keys)
            for blkno, value in zip(part, values, strict=True):
                yield blkno, ZERO_PAGE if value is None else value  # absent: a hole


TWO_WAY_KEYS = 3 * RUN_KEYS
"""Keys of one rebuild from which it runs on two threads (`rebuilt_values`): a 1% checkout's
~1.4k scattered pages of one fork, not the few of most forks (a thread hop and a second walk
setup each)."""


def rebuilt_values(
    timeline: Timeline,
    lsn: int,
    view: PersistentView | None,
    keys: list[Key],
    workers: int | None = None,
) -> Iterator[bytes | None]:
    """`rebuild_keys`, on two threads when there are TWO_WAY_KEYS keys and a core is free
    (`compaction.image_workers`, unless `workers` says): the C walk redoes without the GIL
    and zstd decompresses without it, and a checkout's delta (one 128 KiB image block
    decompressed per scattered page, most of its CPU) kept one core busy while the CLI waited.

    The keys are dealt in runs of RUN_KEYS (one C walk call each) alternately to this thread
    and the other, each walking its sorted share in one `rebuild_keys`; the other's runs
    wait in a queue of two, so memory stays a few runs' pages, and the values come in key
    order. An error of either is raised where the keys' order reaches it, as on one thread."""
    if workers is None:
        workers = image_workers() if len(keys) >= TWO_WAY_KEYS else 1
    if workers < 2 or len(keys) <= RUN_KEYS:
        return rebuild_keys(timeline, lsn, view, keys)
    runs = [keys[at : at + RUN_KEYS] for at in range(0, len(keys), RUN_KEYS)]
    return _two_way(timeline, lsn, view, runs)


_Run = tuple[list["bytes | None"], BaseException | None]
"""The other thread's values of one run, and the error that ended it early."""


def _two_way(
    timeline: Timeline, lsn: int, view: PersistentView | None, runs: list[list[Key]]
) -> Iterator[bytes | None]:
    theirs: queue.Queue[_Run] = queue.Queue(2)
    stop = threading.Event()

    def other() -> None:
        got: list[bytes | None] = []
        try:
            values = rebuild_keys(timeline, lsn, view, list(chain.from_iterable(runs[1::2])))
            for run in runs[1::2]:
                if stop.is_set():
                    return
                got = []
                for _ in run:
                    got.append(next(values))
                theirs.put((got, None))
        except BaseException as e:  # handed to the reader, which raises it in key order
            theirs.put((got, e))

    # A thread of its own (~0.1 ms): a shared pool's thread could wait on another delta's
    # reader, itself waiting on its client.
    thread = threading.Thread(target=other, name="delta-rebuild", daemon=True)
    thread.start()
    try:
        mine = rebuild_keys(timeline, lsn, view, list(chain.from_iterable(runs[0::2])))
        for i, run in enumerate(runs):
            if i % 2 == 0:
                yield from islice(mine, len(run))
                continue
            values, error = theirs.get()
            yield from values
            if error is not None:
                raise error
    finally:
        stop.set()
        while thread.is_alive():  # unblock its put; it stops before its next run
            with contextlib.suppress(queue.Empty):
                theirs.get(timeout=0.01)


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
