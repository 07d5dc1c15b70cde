"""A checkout target's pages rebuilt ahead of the checkout's delta (issue 10 item 3).

`pg checkout` names its target when it starts (`SnapshotShowRequest.checkout_node`), then
spends ~0.3 s starting, checking and stopping PostgreSQL before it asks for the delta, whose
critical path was mostly the target's pages rebuilt (zstd of a 128 KiB image block per
scattered page). Those pages never change: meanwhile the daemon plans the keys written since
the node's and the target's histories met, up to the node's current LSN (the keys the delta's
plan will find, but for those written during the stop), and rebuilds the target's pages of
them here. The delta (delta_tar.DeltaForks) takes the pages it finds and rebuilds the rest.

Nothing else can be served from an entry:

* it is keyed by `PagePoint` (timeline id, LSN), where a read at (timeline, LSN) resolves to:
  a timeline's own versions all lie above its ancestor LSN (`Timeline.put_batch` takes a put
  only above the last record LSN, which starts there), so a read on a branch at its branch
  point is its ancestor's read there. The delta's source (the node's new branch at its branch
  point) finds the target's entry; a branch or another timeline at the same LSN has another
  id (uuid4, never reused); an entry is only taken for its own point;
* a page at an LSN its timeline has ingested never changes (puts go above the last record
  LSN only): an entry is prepared only at an ingested LSN (a snapshot named before a restart
  may lie ahead of its re-ingesting timeline: refused);
* a snapshot deleted and re-created under the same name: entries are keyed by the point, not
  the name; a new snapshot at another point misses, one at the same point has the same pages;
* gc: the prepare reads through one persistent view of the layer files taken while the target
  snapshot (which keeps its LSN's versions from gc) exists, and a layer file gc removes stays
  readable through a view holding it; an entry lives `prepared_pages_seconds` at most, far
  less than a gc interval, and a point gc has moved past cannot be branched at again.

The entry is dropped when the delta takes it, when it expires, or when the bound
(`prepared_pages_bytes`, all entries together) is reached: the prepare then stops and what it
rebuilt is used. A failed, slow or refused prepare only means fewer cached pages: the delta
rebuilds whatever it does not find, as without a cache. The cache knows only a target
(timeline, LSN) and a key set: an incremental push's delta could take it as well.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from pageserver.basebackup.delta_tar import fork_keys, rebuilt_pages
from pageserver.storage.keys import Key, rel_block_key
from pageserver.storage.timeline import Timeline

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PagePoint:
    """Where pages are read: the timeline that holds them and the LSN."""

    timeline_id: str
    lsn: int


def page_point(timeline: Timeline, lsn: int) -> PagePoint:
    """The point a read at (timeline, lsn) resolves to: down the ancestry while lsn is a
    branch point (a timeline holds nothing of its own there; see the module)."""
    while timeline.ancestor is not None and lsn <= timeline.ancestor_lsn:
        timeline = timeline.ancestor
    return PagePoint(timeline.timeline_id, lsn)


@dataclass(slots=True, eq=False)
class _Entry:
    point: PagePoint
    expires: float
    pages: dict[Key, bytes] = field(default_factory=dict)
    closed: threading.Event = field(default_factory=threading.Event)
    """Set once taken, expired or dropped: no page is added after it."""


class PreparedPages:
    """The daemon's prepared pages by point, bounded in bytes and seconds. Thread-safe: a
    prepare adds pages on its thread while a delta may take the entry on another."""

    def __init__(
        self, max_bytes: int, seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_bytes = max_bytes
        self.seconds = seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[PagePoint, _Entry] = {}
        self._bytes = 0
        self._preparing = threading.Lock()
        """One prepare at a time: a second one for another target is not started."""

    @property
    def held_bytes(self) -> int:
        """The bytes of pages held now."""
        with self._lock:
            self._expire()
            return self._bytes

    def begin(self, point: PagePoint) -> _Entry | None:
        """A new entry for `point`; None where caching is off or one exists (being prepared,
        or prepared and not taken yet: its pages are the same)."""
        with self._lock:
            self._expire()
            if self.max_bytes <= 0 or self.seconds <= 0 or point in self._entries:
                return None
            entry = _Entry(point, self._clock() + self.seconds)
            self._entries[point] = entry
            return entry

    def put(self, entry: _Entry, key: Key, page: bytes) -> bool:
        """Add a page; False (the prepare stops) once the entry is closed or the bound is met."""
        with self._lock:
            self._expire()
            if entry.closed.is_set():
                return False
            if self._bytes + len(page) > self.max_bytes:
                log.info("prepared pages: bound of %d bytes reached", self.max_bytes)
                return False
            if key not in entry.pages:
                entry.pages[key] = page
                self._bytes += len(page)
            return True

    def take(self, point: PagePoint) -> dict[Key, bytes]:
        """The pages prepared at `point` (none if nothing is): the entry is dropped and a
        prepare still adding to it stops."""
        with self._lock:
            self._expire()
            entry = self._entries.get(point)
            if entry is None:
                return {}
            self._drop(entry)
            return entry.pages

    def drop(self, entry: _Entry) -> None:
        with self._lock:
            if self._entries.get(entry.point) is entry:
                self._drop(entry)

    def wait_taken(self, entry: _Entry) -> None:
        """Hold the prepare's thread until its entry is taken or expires, then drop it (an
        entry nobody takes is not kept past its expiry until the next call)."""
        entry.closed.wait(max(0.0, entry.expires - self._clock()))
        self.drop(entry)

    def _expire(self) -> None:
        now = self._clock()
        for entry in [e for e in self._entries.values() if e.expires <= now]:
            self._drop(entry)

    def _drop(self, entry: _Entry) -> None:
        del self._entries[entry.point]
        entry.closed.set()
        self._bytes -= sum(map(len, entry.pages.values()))


def prepare(cache: PreparedPages, target: Timeline, lsn: int, keys: Iterable[Key]) -> _Entry | None:
    """Rebuild the pages at (target, lsn) of the relation block keys among `keys` into a new
    entry of `cache`, fork by fork in key order (the delta's), until done, taken or bounded;
    the entry (None where none was begun: caching off, one there, another prepare running).
    The caller holds it with `wait_taken`. `lsn` must be ingested on `target` (see the
    module). Never raises: the delta rebuilds what is missing."""
    point = page_point(target, lsn)
    if not cache._preparing.acquire(blocking=False):
        return None
    try:
        entry = cache.begin(point)
        if entry is None:
            return None
        try:
            _rebuild_into(cache, entry, target, lsn, keys)
        except Exception:  # a failed prepare costs nothing but its pages
            log.exception("preparing the pages at %s failed", point)
        return entry
    finally:
        cache._preparing.release()


def _rebuild_into(
    cache: PreparedPages, entry: _Entry, target: Timeline, lsn: int, keys: Iterable[Key]
) -> None:
    changed, _resized = fork_keys(keys)
    for (spc, db, rel, fork), written in sorted(changed.items()):
        blocks = sorted(written)
        pages = rebuilt_pages(target, lsn, spc, db, rel, fork, blocks)
        for blkno, page in zip(blocks, pages, strict=True):
            if not cache.put(entry, rel_block_key(spc, db, rel, fork, blkno), page):
                return


def prepare_checkout(cache: PreparedPages, current: Timeline, target: Timeline, lsn: int) -> None:
    """A checkout from `current`'s latest state to (target, lsn): plan the keys its delta will
    carry (checkout_delta.checkout_keys, up to the LSN ingested now), rebuild the target's
    pages of them, hold them until taken or expired. Run on a thread of its own, as
    foreground work (compaction pauses for it: a user waits for what it makes). Never raises."""
    from pageserver.basebackup.checkout_delta import checkout_keys
    from pageserver.history.flusher import FOREGROUND
    from pageserver.history.snapshot_diff import ReadPoint

    with FOREGROUND.held():
        try:
            now = ReadPoint(current, current.last_record_lsn)
            keys, _redo = checkout_keys(now, ReadPoint(target, lsn))
        except Exception:
            log.exception("planning the pages of a checkout to %s failed", page_point(target, lsn))
            return
        entry = prepare(cache, target, lsn, keys)
    if entry is not None:
        cache.wait_taken(entry)
