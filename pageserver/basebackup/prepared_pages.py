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
* gc: the prepare reads each fork through a persistent view of the layer files taken while
  the target snapshot (which keeps its LSN's versions from gc) exists, and a layer file gc
  removes stays readable through a view holding it; an entry lives `prepared_pages_seconds`
  at most, far less than a gc interval, and a point gc has moved past cannot be branched at
  again.

The entry is made before the keys are planned (a delta arriving meanwhile finds it). The
delta takes the entry once its own checks passed (nothing else finds it then; its pages are
freed with the delta, which closes it when it ends or gives up: the prepare stops); an entry
nobody takes is dropped when it expires. A take during the plan closes the entry: the delta
rebuilds everything itself. The prepare (PREPARE_THREADS threads taking the chunks of the
forks, begun in key order) and the delta share the work fork by fork: the delta takes a
fork the prepare has rebuilt, waits for one it is rebuilding (`WAIT_SECONDS` at most: then
both may rebuild it, the prepare's pages dropped), and takes over one it has not begun (the
prepare skips it). Only the blocks the target's fork has are rebuilt (a fork absent there,
or a block past its end, is not in the delta). At the bound (`prepared_pages_bytes`, the
untaken entries together with the forks they are rebuilding; a taken entry is the delta's
memory, outside it but bounded alone by the same size) a fork whose pages would pass it is
not rebuilt (never made whole to be dropped: the memory is the bound's) and the prepare goes
on with the next; the delta rebuilds what is left.

A failed, slow or refused prepare only means fewer cached pages: the delta
rebuilds whatever it does not find, as without a cache. The cache knows only a target
(timeline, LSN) and a key set: an incremental push's delta could take it as well.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

from pageserver.basebackup.checkout_delta import checkout_keys
from pageserver.basebackup.delta_tar import Fork, fork_keys, rebuilt_pages
from pageserver.history.flusher import FOREGROUND
from pageserver.history.snapshot_diff import ReadPoint
from pageserver.reconstruct.reads import get_rel_size
from pageserver.storage.keys import Key, keys_fields, rel_block_key
from pageserver.storage.timeline import Timeline
from pg15.constants import BLCKSZ

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


_RUNNING, _DONE, _CLAIMED, _READ = 1, 2, 3, 4
"""A fork's state in an entry: the prepare rebuilds it, its pages are in, the delta took it
over (the prepare skips it, or drops what it made of it), or the delta read its pages (a
later pass adds none: the delta rebuilds those it did not find)."""
FOLLOW_SECONDS = 5.0
"""How long after its first plan the prepare follows the node's ingest (the change the node
made just before the checkout, its shutdown checkpoint), planning again as it advances."""
FOLLOW_POLL = 0.005
"""Seconds between two looks at the node's ingested LSN while the prepare follows it."""
PREPARE_THREADS = 2
"""Threads that rebuild a prepare's forks at once (see `_rebuild_into`)."""
CHUNK_PAGES = 64
"""Blocks of a fork a prepare's thread rebuilds at a time (see `_rebuild_into`): a 1%
checkout's primary key took twice its heap's CPU, rebuilt on one thread while the other,
done with the heap, had nothing left."""
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
    reserved: dict[Fork, int] = field(default_factory=dict)
    """The bytes of the forks being rebuilt (`start_fork`), counted in the bound as well:
    several are rebuilt at once (PREPARE_THREADS), each within the bound when it began."""
    taken: bool = False
    planned: bool = False
    """The prepare knows its keys (forks are begun only then)."""
    closed: threading.Event = field(default_factory=threading.Event)
    """Set once expired untaken, taken during the plan, or closed by the delta that took it
    (ended or gave up): the prepare stops."""
    done: bool = False
    """The prepare rebuilt every fork it meant to (else it is running, stopped or failed)."""
    ended: threading.Event = field(default_factory=threading.Event)
    """Set once the prepare left the entry (done, stopped or failed)."""

    @property
    def held(self) -> int:
        """What it counts in a bound: its pages and the forks it is rebuilding."""
        return self.bytes + sum(self.reserved.values())


class PreparedPages:
    """The daemon's prepared pages by point, the untaken ones bounded together in bytes, each
    entry in seconds (a taken entry is its delta's memory: bounded alone). Thread-safe: a
    prepare adds a fork's pages on its thread while a delta takes them on another; the two
    share the forks (`start_fork`, `TakenPages`): a fork is rebuilt twice only where the
    delta stopped waiting for it (`WAIT_SECONDS`)."""

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
        """Of the untaken entries: their pages and the forks they are rebuilding."""
        self._preparing = threading.Lock()
        """One prepare at a time: a second one for another target is not started."""
        self.prepares_ended = 0
        """Prepares that left their entry (done, stopped or failed): a metric."""

    @property
    def enabled(self) -> bool:
        """Whether anything can be prepared (a bound and a lifetime above 0)."""
        return self.max_bytes > 0 and self.seconds > 0

    @property
    def held_bytes(self) -> int:
        """The bytes of pages held for a delta to take (and of forks being rebuilt)."""
        with self._lock:
            self._expire()
            return self._bytes

    def begin(self, point: PagePoint) -> _Entry | None:
        """A new entry for `point`; None where caching is off or one exists (being prepared,
        or prepared and not taken yet: its pages are the same)."""
        with self._lock:
            self._expire()
            if not self.enabled or point in self._entries:
                return None
            entry = _Entry(point, self._clock() + self.seconds)
            self._entries[point] = entry
            return entry

    def start_fork(self, entry: _Entry, fork: Fork, nbytes: int = 0) -> bool:
        """The prepare begins `fork` (or adds pages to it, rebuilt and not read by the delta
        yet: a later pass), whose pages will take `nbytes`; False where it should not: the
        entry dropped, the fork taken over or read by the delta, or its pages would pass the
        bound (left to the delta, which rebuilds them as it streams them: made here whole,
        a newcomer's checkout rebuilt ~320 MiB of pgbench_accounts' pages at once only for
        finish_fork to drop them, the pageserver's peak RSS 310 -> 540-610 MiB)."""
        with self._lock:
            self._expire()
            if entry.closed.is_set() or entry.forks.get(fork, _DONE) != _DONE:
                return False
            if not self._fits(entry, nbytes):
                return False
            entry.forks[fork] = _RUNNING
            entry.reserved[fork] = nbytes
            if not entry.taken:
                self._bytes += nbytes
            return True

    def _unreserve(self, entry: _Entry, fork: Fork) -> None:
        """The fork's bytes reserved by `start_fork` given back (under the lock)."""
        nbytes = entry.reserved.pop(fork, 0)
        if not entry.taken:
            self._bytes -= nbytes

    def abandon_fork(self, entry: _Entry, fork: Fork) -> None:
        """The prepare's rebuild of `fork` failed: the delta's at once (it does not wait for
        a fork nobody rebuilds while the prepare's other thread ends its own)."""
        with self._changed:
            if entry.forks.get(fork) == _RUNNING:
                entry.forks[fork] = _CLAIMED
            self._unreserve(entry, fork)
            self._changed.notify_all()

    def finish_fork(self, entry: _Entry, fork: Fork, pages: dict[Key, bytes]) -> bool:
        """The prepare's pages of `fork`; False (the prepare stops) once the entry is dropped
        or the bound would be passed (the fork is then left to the delta). A taken entry
        counts alone against the bound: it is the delta's memory, freed with the delta."""
        with self._changed:
            self._expire()
            self._unreserve(entry, fork)
            if entry.closed.is_set():
                return False
            size = sum(map(len, pages.values()))
            fits = self._fits(entry, size)
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

    def _fits(self, entry: _Entry, nbytes: int) -> bool:
        """Whether `nbytes` more pages of `entry` stay within the bound (under the lock)."""
        return (entry.held if entry.taken else self._bytes) + nbytes <= self.max_bytes

    def planned(self, entry: _Entry) -> bool:
        """The prepare knows its keys; False (it stops) where the entry was closed meanwhile
        (taken during the plan, or expired)."""
        with self._lock:
            self._expire()
            entry.planned = not entry.closed.is_set()
            return entry.planned

    def leave(self, entry: _Entry) -> None:
        """The prepare ends (done, stopped or failed): a fork it was rebuilding is the
        delta's, which stops waiting for it; an entry never planned is dropped."""
        with self._changed:
            for fork, state in entry.forks.items():
                if state == _RUNNING:
                    entry.forks[fork] = _CLAIMED
                    self._unreserve(entry, fork)
            if not entry.planned and self._entries.get(entry.point) is entry:
                del self._entries[entry.point]
                entry.closed.set()
            self.prepares_ended += 1
            entry.ended.set()
            self._changed.notify_all()

    def close(self, entry: _Entry) -> None:
        """The delta that took `entry` ended or gave up: the prepare stops, nobody waits."""
        with self._changed:
            entry.closed.set()
            self._changed.notify_all()

    @contextmanager
    def reserved(self, point: PagePoint) -> Iterator[_Entry | None]:
        """A new entry for `point` (see `begin`) held by this prepare, the only one running
        (None where another runs), made before the plan so that a delta finds it; left on
        exit (`leave`)."""
        if not self._preparing.acquire(blocking=False):
            yield None
            return
        try:
            entry = self.begin(point)
            if entry is None:
                yield None
                return
            try:
                yield entry
            finally:
                self.leave(entry)
        finally:
            self._preparing.release()

    def take(self, point: PagePoint) -> TakenPages | None:
        """The pages prepared at `point`, if any, for the delta: nothing else finds them any
        more, they leave the bound (the delta holds them while it runs, and closes them when
        it ends: `TakenPages.close`) and the prepare goes on with the forks the delta has not
        reached; taken during the plan, the entry is closed (the delta rebuilds alone)."""
        with self._lock:
            self._expire()
            entry = self._entries.pop(point, None)
            if entry is None:
                return None
            entry.taken = True  # its pages and reservations count alone from now on
            self._bytes -= entry.held
            if not entry.planned:  # the delta planned sooner: it rebuilds every fork
                entry.closed.set()
            log.info(
                "prepared pages at %s: %d ready when taken (%s)", point, len(entry.pages),
                "complete" if entry.done else "the prepare goes on",
            )  # fmt: skip
            return TakenPages(self, entry)

    def fork_pages(
        self, entry: _Entry, fork: Fork, wait: float | None = None
    ) -> Mapping[Key, bytes]:
        """The prepared pages the delta may take for `fork` (a mapping by key, holding other
        forks' too): the fork's once the prepare has rebuilt it, waited for (up to `wait`
        seconds, default `WAIT_SECONDS` read now) while it does; else none, and the prepare
        leaves the fork alone."""
        with self._changed:
            if entry.forks.get(fork) == _RUNNING and not entry.closed.is_set():
                self._changed.wait_for(
                    lambda: entry.forks.get(fork) != _RUNNING or entry.closed.is_set(),
                    WAIT_SECONDS if wait is None else wait,
                )
            if entry.forks.get(fork) in (_DONE, _READ):
                entry.forks[fork] = _READ  # no later pass adds to it now
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
            self._bytes -= entry.held
            entry.reserved.clear()  # its forks being rebuilt are dropped when they end


class TakenPages(Mapping[Key, bytes]):
    """A taken entry's pages by key, as the delta reads them: a key of a fork the prepare is
    rebuilding waits for it (`PreparedPages.fork_pages`); a fork it has not begun is the
    delta's (a miss, and the prepare skips it)."""

    __slots__ = ("_cache", "_entry")

    def __init__(self, cache: PreparedPages, entry: _Entry) -> None:
        self._cache = cache
        self._entry = entry

    def close(self) -> None:
        """The delta ended or gave up: the prepare stops rebuilding for it."""
        self._cache.close(self._entry)

    def __getitem__(self, key: Key) -> bytes:
        _kind, spc, db, rel, fork, _blkno = keys_fields((key,))[0]
        return self._cache.fork_pages(self._entry, (spc, db, rel, fork))[key]

    def __iter__(self) -> Iterator[Key]:
        return iter(list(self._entry.pages))

    def __len__(self) -> int:
        return len(self._entry.pages)


def prepare(
    cache: PreparedPages,
    target: Timeline,
    lsn: int,
    keys: Iterable[Key] | Callable[[], Iterable[Key]],
    follow: Callable[[_Entry], Iterable[Key] | None] | None = None,
) -> _Entry | None:
    """Rebuild the pages at (target, lsn) of the relation block keys among `keys` (or those a
    plan gives, called once the entry is made) into a new entry of `cache`, fork by fork in
    key order (the delta's; PREPARE_THREADS at once), until done, bounded, expired or closed
    (taken during the plan, or the delta that took it ended); then, with `follow`, the keys
    among those it gives (called after each pass, with the entry) not prepared yet, until it
    gives None. Returns the entry (None where none was begun: caching off, one there, another
    prepare running). The caller holds it with `wait_taken`. `lsn` must be ingested on
    `target` (see the module). Never raises: the delta rebuilds what is missing."""
    point = page_point(target, lsn)
    with cache.reserved(point) as entry:
        if entry is None:
            return None
        try:
            planned = set(keys()) if callable(keys) else keys
            if cache.planned(entry):
                entry.done = _rebuild_into(cache, entry, target, lsn, planned)
                while follow is not None and not entry.closed.is_set():
                    more = follow(entry)
                    if more is None:
                        break
                    entry.done = _rebuild_into(cache, entry, target, lsn, more) and entry.done
        except Exception:  # a failed prepare costs nothing but its pages
            log.exception("preparing the pages at %s failed", point)
        return entry


@dataclass(slots=True, eq=False)
class _Begun:
    """A fork `_rebuild_into` began: its chunks not rebuilt yet, the pages made of the others,
    and whether a chunk failed (its fork is the delta's then)."""

    fork: Fork
    left: int
    pages: dict[Key, bytes] = field(default_factory=dict)
    failed: bool = False


def _rebuild_into(
    cache: PreparedPages, entry: _Entry, target: Timeline, lsn: int, keys: Iterable[Key]
) -> bool:
    """Rebuild the forks of `keys`, those the delta has not taken over, each only in the
    blocks the fork has at (target, lsn) and not prepared yet (a later pass): one absent
    there, or a block past its end, is not in the delta (DeltaForks.fork_members) and would
    only take up the bound. Forks are begun in key order (the delta's), each cut into chunks
    of CHUNK_PAGES blocks that PREPARE_THREADS threads, this one and helpers, take in order:
    a rebuild is mostly zstd, which releases the GIL, and a 1% checkout's pages are two
    forks of about equal size (pgbench_accounts and its primary key), rebuilt one after the
    other on one core while the other waited for PostgreSQL's stop; a fork's pages go in
    (`finish_fork`) once its last chunk is rebuilt. True where every fork was rebuilt."""
    changed, _resized = fork_keys(keys)
    forks = iter(sorted(changed.items()))
    lock = threading.Lock()
    every = [True]
    stop = threading.Event()
    chunks: deque[tuple[_Begun, list[int]]] = deque()
    """The chunks of the forks begun, in key order."""

    def next_fork() -> tuple[Fork, list[int]] | None:
        """The next fork to rebuild, begun: in key order (one at a time under `lock`, so a
        bound that holds one fork of two holds the first, as with one thread); None at the
        end, or once the entry is closed."""
        for fork, written in forks:
            if stop.is_set():
                return None
            if entry.forks.get(fork, _DONE) != _DONE:
                every[0] = every[0] and fork in entry.forks  # taken over or read
                continue
            size = get_rel_size(target, *fork, lsn) or 0
            blocks = sorted(
                b for b in written if b < size and rel_block_key(*fork, b) not in entry.pages
            )
            if not blocks:
                continue
            if cache.start_fork(entry, fork, len(blocks) * BLCKSZ):
                return fork, blocks
            if entry.closed.is_set():
                every[0] = False  # under `lock`, as give_up
                stop.set()
                return None
            every[0] = every[0] and fork in entry.forks  # taken over; absent: the bound
        return None

    def take() -> tuple[_Begun, list[int]] | None:
        """The next chunk to rebuild (of the fork begun last, else of the next one begun
        now); None at the end, or once stopped or the entry closed (a fork whose chunks are
        left then stays the prepare's until it leaves the entry: nobody waits on a closed
        one)."""
        with lock:
            while not stop.is_set():
                if chunks and entry.closed.is_set():
                    every[0] = False
                    stop.set()
                    return None
                while chunks:
                    job, blocks = chunks.popleft()
                    if not job.failed:
                        return job, blocks
                started = next_fork()
                if started is None:
                    return None
                fork, blocks = started
                parts = [blocks[at : at + CHUNK_PAGES] for at in range(0, len(blocks), CHUNK_PAGES)]
                job = _Begun(fork, len(parts))
                chunks.extend((job, part) for part in parts)
            return None

    def give_up() -> None:
        with lock:
            every[0] = False
            stop.set()

    def work() -> None:
        while (chunk := take()) is not None:
            job, blocks = chunk
            fork = job.fork
            try:
                pages = rebuilt_pages(target, lsn, *fork, blocks)
                made = {
                    rel_block_key(*fork, b): page for b, page in zip(blocks, pages, strict=True)
                }
            except BaseException:
                with lock:
                    job.failed = True
                cache.abandon_fork(entry, fork)
                raise
            with lock:
                if job.failed:
                    continue
                job.pages.update(made)
                job.left -= 1
                if job.left:
                    continue
            if not cache.finish_fork(entry, fork, job.pages):
                give_up()
                return

    failed: list[BaseException] = []

    def helper() -> None:
        try:
            work()
        except BaseException as exc:  # raised on the calling thread, as its own would be
            failed.append(exc)
            stop.set()

    planned = sum(-(-len(written) // CHUNK_PAGES) for written in changed.values())
    helpers = [
        threading.Thread(target=helper, name=f"prepare-pages-{i + 1}", daemon=True)
        for i in range(min(PREPARE_THREADS, planned) - 1)
    ]
    for thread in helpers:
        thread.start()
    try:
        work()
    finally:
        stop.set()
        for thread in helpers:
            thread.join()
    if failed:
        raise failed[0]
    return every[0]


def prepare_checkout(cache: PreparedPages, current: Timeline, target: Timeline, lsn: int) -> None:
    """A checkout from `current`'s latest state to (target, lsn): make the entry, plan the
    keys its delta will carry (checkout_delta.checkout_keys, up to the LSN ingested now),
    rebuild the target's pages of them, then follow the node's ingest (`FOLLOW_SECONDS` at
    most): the checkout comes right after writes the node's receiver may not have ingested
    yet (bench.checkout's first plan held 825 of the delta's 1368 keys at load 12, the delta
    then rebuilt the rest itself, after the stop), so each time the ingested LSN moves the
    keys are planned again and those not prepared rebuilt, until the delta has taken the
    entry after the last of them. Holds the pages until taken or expired. Run on a thread of
    its own, as foreground work (compaction pauses for it: a user waits for what it makes).
    Never raises."""
    times: list[float] = []
    upto = [0]
    """The node's ingested LSN the last plan went up to."""

    def plan() -> set[Key]:
        times.append(time.monotonic())
        upto[0] = current.last_record_lsn
        keys, _redo = checkout_keys(ReadPoint(current, upto[0]), ReadPoint(target, lsn))
        if len(times) == 1:
            times.append(time.monotonic())
        return keys

    def follow(entry: _Entry) -> set[Key] | None:
        """The keys planned again once the node ingested more; None once the delta has taken
        the entry and nothing came since the last plan, or past `FOLLOW_SECONDS`."""
        while time.monotonic() < times[0] + FOLLOW_SECONDS:
            taken = entry.taken  # read first: the delta plans before it takes
            if current.last_record_lsn > upto[0]:
                return plan()
            if taken or entry.closed.wait(FOLLOW_POLL):
                return None
        return None

    with FOREGROUND.held():
        entry = prepare(cache, target, lsn, plan, follow)
    if entry is not None:
        end = time.monotonic()
        plan_ms, rebuild_ms = (
            ((times[1] - times[0]) * 1000, (end - times[1]) * 1000) if len(times) >= 2 else (0, 0)
        )
        log.info(
            "prepared %d pages at %s (%s): plan %.0f ms, rebuild and follow %.0f ms "
            "(%d plans)", len(entry.pages), entry.point,
            "complete" if entry.done else "stopped", plan_ms, rebuild_ms, len(times) - 1,
        )  # fmt: skip
        cache.wait_taken(entry)
