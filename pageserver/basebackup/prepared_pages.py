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

The delta takes the entry (nothing else finds it then; its pages are freed with the delta);
an entry nobody takes is dropped when it expires. The prepare and the delta share the work
fork by fork: the delta takes a fork the prepare has rebuilt, waits for one it is rebuilding
(`WAIT_SECONDS` at most), and takes over one it has not begun (the prepare skips it). At the
bound (`prepared_pages_bytes`, the untaken entries together) the prepare stops: the delta
rebuilds the rest. A failed, slow or refused prepare only means fewer cached pages: the delta
rebuilds whatever it does not find, as without a cache. The cache knows only a target
(timeline, LSN) and a key set: an incremental push's delta could take it as well.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from pageserver.basebackup.checkout_delta import checkout_keys
from pageserver.basebackup.delta_tar import Fork, fork_keys, rebuilt_pages
from pageserver.history.flusher import FOREGROUND
from pageserver.history.snapshot_diff import ReadPoint
from pageserver.storage.keys import Key, keys_fields, rel_block_key
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


_RUNNING, _DONE, _CLAIMED = 1, 2, 3
"""A fork's state in an entry: the prepare rebuilds it, its pages are in, or the delta took it
over (the prepare skips it, or drops what it made of it)."""
WAIT_SECONDS = 1.0
"""At most this long the delta waits for a fork the prepare is rebuilding (it began earlier:
it normally ends sooner than the delta's own rebuild would); then the delta rebuilds it."""


@dataclass(slots=True, eq=False)
class _Entry:
    """The pages prepared at one point, and where the prepare stands in each fork."""

    point: PagePoint
    expires: float
    pages: dict[Key, bytes] = field(default_factory=dict)
    forks: dict[Fork, int] = field(default_factory=dict)
    bytes: int = 0
    """Of `pages`, counted in the cache's bound (a taken entry's are the delta's)."""
    taken: bool = False
    closed: threading.Event = field(default_factory=threading.Event)
    """Set once expired or dropped untaken: the prepare stops."""
    done: bool = False
    """The prepare rebuilt every fork it meant to (else it is running, stopped or failed)."""


class PreparedPages:
    """The daemon's prepared pages by point, bounded in bytes and seconds. Thread-safe: a
    prepare adds a fork's pages on its thread while a delta takes them on another; the two
    share the forks (`start_fork`, `TakenPages`), so no fork is rebuilt twice."""

    def __init__(
        self, max_bytes: int, seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_bytes = max_bytes
        self.seconds = seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._entries: dict[PagePoint, _Entry] = {}
        self._bytes = 0
        self._preparing = threading.Lock()
        """One prepare at a time: a second one for another target is not started."""

    @property
    def held_bytes(self) -> int:
        """The bytes of pages held for a delta to take."""
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

    def start_fork(self, entry: _Entry, fork: Fork) -> bool:
        """The prepare begins `fork`; False where it should not (the entry dropped, the fork
        taken over by the delta)."""
        with self._lock:
            self._expire()
            if entry.closed.is_set() or fork in entry.forks:
                return False
            entry.forks[fork] = _RUNNING
            return True

    def finish_fork(self, entry: _Entry, fork: Fork, pages: dict[Key, bytes]) -> bool:
        """The prepare's pages of `fork`; False (the prepare stops) once the entry is dropped
        or the bound would be passed (the fork is then left to the delta). A taken entry
        counts alone against the bound: it is the delta's memory, freed with the delta."""
        with self._changed:
            self._expire()
            if entry.closed.is_set():
                return False
            size = sum(map(len, pages.values()))
            fits = (entry.bytes if entry.taken else self._bytes) + size <= self.max_bytes
            if entry.forks.get(fork) == _RUNNING and fits:
                entry.pages.update(pages)
                entry.bytes += size
                if not entry.taken:
                    self._bytes += size
                entry.forks[fork] = _DONE
            else:
                entry.forks[fork] = _CLAIMED
            self._changed.notify_all()
            if not fits:
                log.info("prepared pages: bound of %d bytes reached", self.max_bytes)
            return fits

    def leave(self, entry: _Entry) -> None:
        """The prepare ends (done, stopped or failed): a fork it was rebuilding is the
        delta's, which stops waiting for it."""
        with self._changed:
            for fork, state in entry.forks.items():
                if state == _RUNNING:
                    entry.forks[fork] = _CLAIMED
            self._changed.notify_all()

    def take(self, point: PagePoint) -> TakenPages | None:
        """The pages prepared at `point`, if any, for the delta: nothing else finds them any
        more, they leave the bound (the delta holds them while it runs) and the prepare goes
        on with the forks the delta has not reached."""
        with self._lock:
            self._expire()
            entry = self._entries.pop(point, None)
            if entry is None:
                return None
            entry.taken = True
            self._bytes -= entry.bytes
            log.info(
                "prepared pages at %s: %d ready when taken (%s)", point, len(entry.pages),
                "complete" if entry.done else "the prepare goes on",
            )  # fmt: skip
            return TakenPages(self, entry)

    def fork_pages(
        self, entry: _Entry, fork: Fork, wait: float = WAIT_SECONDS
    ) -> Mapping[Key, bytes]:
        """The prepared pages the delta may take for `fork` (a mapping by key, holding other
        forks' too): the fork's once the prepare has rebuilt it, waited for (up to `wait`
        seconds) while it does; else none, and the prepare leaves the fork alone."""
        with self._changed:
            if entry.forks.get(fork) == _RUNNING:
                self._changed.wait_for(lambda: entry.forks.get(fork) != _RUNNING, wait)
            if entry.forks.get(fork) == _DONE:
                return entry.pages
            entry.forks[fork] = _CLAIMED
            return {}

    def wait_taken(self, entry: _Entry) -> None:
        """Hold the prepare's thread until its entry is taken or expires (then it is dropped:
        not kept past its expiry until the next call)."""
        while not entry.taken and not entry.closed.wait(min(0.05, self.seconds)):
            with self._lock:
                self._expire()

    def _expire(self) -> None:
        now = self._clock()
        for entry in [e for e in self._entries.values() if e.expires <= now]:
            del self._entries[entry.point]
            entry.closed.set()
            self._bytes -= entry.bytes


class TakenPages(Mapping[Key, bytes]):
    """A taken entry's pages by key, as the delta reads them: a key of a fork the prepare is
    rebuilding waits for it (`PreparedPages.fork_pages`); a fork it has not begun is the
    delta's (a miss, and the prepare skips it)."""

    __slots__ = ("_cache", "_entry")

    def __init__(self, cache: PreparedPages, entry: _Entry) -> None:
        self._cache = cache
        self._entry = entry

    def __getitem__(self, key: Key) -> bytes:
        _kind, spc, db, rel, fork, _blkno = keys_fields((key,))[0]
        return self._cache.fork_pages(self._entry, (spc, db, rel, fork))[key]

    def __iter__(self) -> Iterator[Key]:
        return iter(list(self._entry.pages))

    def __len__(self) -> int:
        return len(self._entry.pages)


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
            entry.done = _rebuild_into(cache, entry, target, lsn, keys)
        except Exception:  # a failed prepare costs nothing but its pages
            log.exception("preparing the pages at %s failed", point)
        finally:
            cache.leave(entry)
        return entry
    finally:
        cache._preparing.release()


def _rebuild_into(
    cache: PreparedPages, entry: _Entry, target: Timeline, lsn: int, keys: Iterable[Key]
) -> bool:
    """Rebuild the forks of `keys`, one at a time, those the delta has not taken over."""
    changed, _resized = fork_keys(keys)
    for fork, written in sorted(changed.items()):
        if not cache.start_fork(entry, fork):
            if entry.closed.is_set():
                return False
            continue
        blocks = sorted(written)
        pages = rebuilt_pages(target, lsn, *fork, blocks)
        made = {rel_block_key(*fork, b): page for b, page in zip(blocks, pages, strict=True)}
        if not cache.finish_fork(entry, fork, made):
            return False
    return True


def prepare_checkout(cache: PreparedPages, current: Timeline, target: Timeline, lsn: int) -> None:
    """A checkout from `current`'s latest state to (target, lsn): plan the keys its delta will
    carry (checkout_delta.checkout_keys, up to the LSN ingested now), rebuild the target's
    pages of them, hold them until taken or expired. Run on a thread of its own, as
    foreground work (compaction pauses for it: a user waits for what it makes). Never raises."""
    with FOREGROUND.held():
        t0 = time.monotonic()
        try:
            now = ReadPoint(current, current.last_record_lsn)
            keys, _redo = checkout_keys(now, ReadPoint(target, lsn))
        except Exception:
            log.exception("planning the pages of a checkout to %s failed", page_point(target, lsn))
            return
        t1 = time.monotonic()
        entry = prepare(cache, target, lsn, keys)
    if entry is not None:
        log.info(
            "prepared %d pages at %s (%s): plan %.0f ms, rebuild %.0f ms", len(entry.pages),
            entry.point, "complete" if entry.done else "stopped", (t1 - t0) * 1000,
            (time.monotonic() - t1) * 1000,
        )  # fmt: skip
        cache.wait_taken(entry)
