"""prepared_pages: a checkout target's pages rebuilt ahead of its delta, taken by the delta.

The history (test_delta_tar._history): a timeline `tl` (the target at 16: relations 16384 of
40 blocks and 16385 of 3) and a branch `child` of it at 40 that wrote more (the node's state
before the checkout, HEAD at 64). The checkout's delta is read on a new branch of `tl` at 16
(the node's new timeline at its branch point), from HEAD.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, cast

import pytest

from pageserver.api import service
from pageserver.basebackup import delta_tar, prepared_pages
from pageserver.basebackup.checkout_delta import checkout_forks
from pageserver.basebackup.delta_tar import DeltaForks
from pageserver.basebackup.prepared_pages import (
    PagePoint,
    PreparedPages,
    _Entry,
    page_point,
    prepare,
    prepare_checkout,
)
from pageserver.basebackup.sources import TimelineSource
from pageserver.history.node_store import StorageHistory
from pageserver.history.snapshot_diff import ReadPoint, keys_changed
from pageserver.history.snapshots import Snapshot
from pageserver.reconstruct.reads import get_rel_size
from pageserver.reconstruct.value_format import ZERO_PAGE
from pageserver.redo.native import redo as native_redo
from pageserver.storage import keys as K
from pageserver.storage.timeline import Timeline
from pageserver.storage.timeline_store import TimelineStore
from pageserver.storage.values import Image
from pg15.checkpoint import CheckPoint
from pg15.constants import BLCKSZ
from tests.native_ext import require_c_extension
from tests.pageserver.basebackup.test_delta_tar import (
    _block,
    _history,
    _members,
    _page,
    _record,
    _size,
    store,
)

__all__ = ["store"]  # the fixture, imported for this module's tests

NBLOCKS = {16384: 40, 16385: 3}
"""The forks' sizes at the target (the delta's `nblocks`)."""
T = 16
"""The target's LSN."""
MiB = 1024 * 1024


def _checkout(store: TimelineStore) -> tuple[Timeline, Timeline, TimelineSource]:
    """(target timeline, HEAD's timeline, the delta's source: a new branch at the target)."""
    require_c_extension(native_redo, "pageserver.redo._redo")  # the delta's bulk path
    tl, child = _history(store, both_at_start=True)
    _record(child, 64, (K.rel_block_key(1663, 5, 16384, 0, 30), _page(64, 11)))
    return tl, child, TimelineSource(store.branch(tl.timeline_id, T), T)


def _delta(source: TimelineSource, head: ReadPoint, prepared: Any = None) -> DeltaForks:
    return DeltaForks(source, head, whole_copies=True, prepared=prepared)


def test_the_delta_with_prepared_pages_is_the_delta_without(store: TimelineStore) -> None:
    """Pages prepared at the target, taken by the delta on the node's new branch (the same
    point), give the same member bytes; the delta took them (a broken page shows)."""
    tl, child, source = _checkout(store)
    head = ReadPoint(child, 64)
    want = _members(_delta(source, head), NBLOCKS)
    cache = PreparedPages(MiB, 30)
    entry = prepare(cache, tl, T, keys_changed(head, ReadPoint(tl, T)))
    assert entry is not None and cache.held_bytes == len(entry.pages) * BLCKSZ > 0
    assert page_point(source.timeline, source.lsn) == PagePoint(tl.timeline_id, T)
    pages = cache.take(page_point(source.timeline, source.lsn))
    assert pages is not None
    assert cache.held_bytes == 0 and cache.take(entry.point) is None  # consumed
    delta = _delta(source, head, pages)
    assert _members(delta, NBLOCKS) == want
    assert delta.prepared_used == len(pages) > 10
    broken = dict.fromkeys(pages, bytes(BLCKSZ - 1) + b"x")
    assert _members(_delta(source, head, broken), NBLOCKS) != want


def test_keys_written_after_the_prepare_are_rebuilt(
    store: TimelineStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The prepare plans up to the node's LSN when it starts (56 here); what the node wrote
    after it (during its stop: block 30 at 64, which the target's side never wrote) is
    rebuilt by the delta, and the rest taken from the cache."""
    tl, child, source = _checkout(store)
    head = ReadPoint(child, 64)
    want = _members(_delta(source, head), NBLOCKS)
    cache = PreparedPages(MiB, 30)
    assert prepare(cache, tl, T, keys_changed(ReadPoint(child, 56), ReadPoint(tl, T)))
    pages = cache.take(PagePoint(tl.timeline_id, T))
    rebuilt: list[tuple[int, list[int]]] = []
    real = delta_tar.rebuilt_pages

    def spy(tl: Timeline, lsn: int, *fork_blocks: Any) -> Iterator[bytes]:
        rebuilt.append((fork_blocks[2], list(fork_blocks[4])))
        return real(tl, lsn, *fork_blocks)  # type: ignore[no-any-return]

    monkeypatch.setattr(delta_tar, "rebuilt_pages", spy)
    delta = _delta(source, head, pages)
    assert _members(delta, NBLOCKS) == want
    assert [(rel, blocks) for rel, blocks in rebuilt if blocks] == [(16384, [30])]
    assert delta.prepared_used == delta.pages - 1


def test_the_bound_stops_the_prepare_and_the_delta_rebuilds_the_rest(
    store: TimelineStore,
) -> None:
    """A bound that holds the first fork's pages only: the prepare leaves the second, which
    the delta rebuilds."""
    tl, child, source = _checkout(store)
    head = ReadPoint(child, 64)
    want = _members(_delta(source, head), NBLOCKS)
    keys = keys_changed(head, ReadPoint(tl, T))
    first = sum(1 for f in K.keys_fields(keys) if f[3] == 16384 and f[5] < NBLOCKS[16384])
    cache = PreparedPages(first * BLCKSZ + 100, 30)
    entry = prepare(cache, tl, T, keys)
    assert entry is not None and not entry.done
    assert len(entry.pages) == first and cache.held_bytes == first * BLCKSZ
    assert PreparedPages(0, 30).begin(entry.point) is None  # 0 bytes: no cache at all
    delta = _delta(source, head, cache.take(entry.point))
    assert _members(delta, NBLOCKS) == want and 0 < delta.prepared_used == first < delta.pages


def test_a_fork_past_the_bound_is_not_rebuilt_and_the_next_is(
    store: TimelineStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fork whose pages would pass the bound is left to the delta before it is rebuilt
    (made whole and then dropped, pgbench_accounts' pages took ~320 MiB of a newcomer's
    checkout), and the prepare goes on with a smaller one that fits."""
    tl, child, source = _checkout(store)
    head = ReadPoint(child, 64)
    want = _members(_delta(source, head), NBLOCKS)
    keys = keys_changed(head, ReadPoint(tl, T))
    fields = K.keys_fields(keys)
    first = sum(1 for f in fields if f[3] == 16384 and f[5] < NBLOCKS[16384])
    second = sum(1 for f in fields if f[3] == 16385 and f[5] < NBLOCKS[16385])
    assert first > second > 0
    rebuilt: list[int] = []
    real = prepared_pages.rebuilt_pages

    def spy(timeline: Timeline, lsn: int, *fork_blocks: Any) -> Iterator[bytes]:
        rebuilt.append(fork_blocks[2])  # the relation
        return real(timeline, lsn, *fork_blocks)

    monkeypatch.setattr(prepared_pages, "rebuilt_pages", spy)
    cache = PreparedPages(second * BLCKSZ, 30)
    entry = prepare(cache, tl, T, keys)
    assert entry is not None and not entry.done  # not every fork prepared
    assert rebuilt == [16385]  # 16384 never made
    assert len(entry.pages) == second and cache.held_bytes == second * BLCKSZ
    delta = _delta(source, head, cache.take(entry.point))
    assert _members(delta, NBLOCKS) == want and delta.prepared_used == second


def test_two_forks_are_rebuilt_at_once(
    store: TimelineStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The forks are shared by PREPARE_THREADS threads (a 1% checkout's two big forks were
    rebuilt one after the other): each fork's rebuild here waits until the other has begun,
    which one thread at a time never reaches (the prepare then fails and keeps nothing)."""
    assert prepared_pages.PREPARE_THREADS >= 2
    tl, child, source = _checkout(store)
    head = ReadPoint(child, 64)
    want = _members(_delta(source, head), NBLOCKS)
    both_begun = threading.Barrier(2, timeout=5)
    threads: dict[int, str] = {}
    real = prepared_pages.rebuilt_pages

    def meeting(timeline: Timeline, lsn: int, *fork_blocks: Any) -> Iterator[bytes]:
        threads[fork_blocks[2]] = threading.current_thread().name
        both_begun.wait()
        return real(timeline, lsn, *fork_blocks)

    monkeypatch.setattr(prepared_pages, "rebuilt_pages", meeting)
    cache = PreparedPages(MiB, 30)
    entry = prepare(cache, tl, T, keys_changed(head, ReadPoint(tl, T)))
    assert entry is not None and entry.done
    assert set(threads) == {16384, 16385} and len(set(threads.values())) == 2
    delta = _delta(source, head, cache.take(entry.point))
    assert _members(delta, NBLOCKS) == want and delta.prepared_used == delta.pages


def test_a_forks_chunks_are_shared_by_the_threads(
    store: TimelineStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fork is cut into CHUNK_PAGES chunks the threads take in order (a 1% checkout's
    primary key took twice its heap's CPU, on one thread while the other had nothing left):
    here each chunk of the bigger fork waits until another has begun, which one thread at a
    time never reaches; its pages go in whole, and the delta takes them."""
    monkeypatch.setattr(prepared_pages, "CHUNK_PAGES", 1)
    tl, child, source = _checkout(store)
    head = ReadPoint(child, 64)
    want = _members(_delta(source, head), NBLOCKS)
    keys = keys_changed(head, ReadPoint(tl, T))
    big = sorted(f[5] for f in K.keys_fields(keys) if f[3] == 16384 and f[5] < NBLOCKS[16384])
    assert len(big) >= 2
    two_begun = threading.Barrier(2, timeout=5)
    chunks: list[tuple[str, list[int]]] = []
    real = prepared_pages.rebuilt_pages

    def meeting(timeline: Timeline, lsn: int, *fork_blocks: Any) -> Iterator[bytes]:
        if fork_blocks[2] == 16384:
            chunks.append((threading.current_thread().name, list(fork_blocks[4])))
            if len(chunks) <= 2:
                two_begun.wait()
        return real(timeline, lsn, *fork_blocks)

    monkeypatch.setattr(prepared_pages, "rebuilt_pages", meeting)
    cache = PreparedPages(MiB, 30)
    entry = prepare(cache, tl, T, keys)
    assert entry is not None and entry.done
    assert sorted(b for _name, blocks in chunks for b in blocks) == big
    assert all(len(blocks) == 1 for _name, blocks in chunks)
    assert len({name for name, _blocks in chunks}) == 2
    assert entry.forks[FORK] == prepared_pages._DONE
    delta = _delta(source, head, cache.take(entry.point))
    assert _members(delta, NBLOCKS) == want and delta.prepared_used == delta.pages


def test_a_failed_chunk_gives_its_whole_fork_to_the_delta(
    store: TimelineStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One chunk's rebuild fails: its fork is the delta's (none of its chunks' pages kept,
    nobody waits for it), the prepare stops with the error, the delta rebuilds the rest."""
    monkeypatch.setattr(prepared_pages, "CHUNK_PAGES", 1)
    tl, child, source = _checkout(store)
    head = ReadPoint(child, 64)
    want = _members(_delta(source, head), NBLOCKS)
    real = prepared_pages.rebuilt_pages
    calls = [0]

    def failing(timeline: Timeline, lsn: int, *fork_blocks: Any) -> Iterator[bytes]:
        if fork_blocks[2] == 16384:
            calls[0] += 1
            if calls[0] == 2:
                raise OSError("a layer file went away")
        return real(timeline, lsn, *fork_blocks)

    monkeypatch.setattr(prepared_pages, "rebuilt_pages", failing)
    cache = PreparedPages(MiB, 30)
    entry = prepare(cache, tl, T, keys_changed(head, ReadPoint(tl, T)))
    assert entry is not None and not entry.done
    assert entry.forks[FORK] == prepared_pages._CLAIMED and entry.reserved == {}
    assert not any(K.keys_fields((key,))[0][3] == 16384 for key in entry.pages)
    delta = _delta(source, head, cache.take(entry.point))
    assert _members(delta, NBLOCKS) == want


def test_a_pass_stops_at_the_next_chunk_once_its_entry_is_closed(
    store: TimelineStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The entry closed (the delta that took it gave up) while a fork's chunks are queued:
    the pass rebuilds none of them after the one in hand, and says it did not do it all."""
    monkeypatch.setattr(prepared_pages, "CHUNK_PAGES", 1)
    monkeypatch.setattr(prepared_pages, "PREPARE_THREADS", 1)
    tl, child, _source = _checkout(store)
    real = prepared_pages.rebuilt_pages
    cache = PreparedPages(MiB, 30)
    entry = cache.begin(PagePoint(tl.timeline_id, T))
    assert entry is not None and cache.planned(entry)
    chunks: list[int] = []

    def closes(timeline: Timeline, lsn: int, *fork_blocks: Any) -> Iterator[bytes]:
        if fork_blocks[2] == 16384:
            chunks.extend(fork_blocks[4])
            cache.close(entry)
        return real(timeline, lsn, *fork_blocks)

    monkeypatch.setattr(prepared_pages, "rebuilt_pages", closes)
    keys = keys_changed(ReadPoint(child, 64), ReadPoint(tl, T))
    big = [f[5] for f in K.keys_fields(keys) if f[3] == 16384 and f[5] < NBLOCKS[16384]]
    assert len(big) >= 2
    assert not prepared_pages._rebuild_into(cache, entry, tl, T, keys)
    assert len(chunks) == 1


FORK = (1663, 5, 16384, 0)
OTHER = (1663, 5, 16385, 0)


def _key(blkno: int, rel: int = 16384) -> K.Key:
    return K.rel_block_key(1663, 5, rel, 0, blkno)


def test_entries_expire() -> None:
    now = [100.0]
    cache = PreparedPages(MiB, 30, clock=lambda: now[0])
    point = PagePoint("t", 40)
    entry = cache.begin(point)
    assert entry is not None and cache.begin(point) is None  # one entry a point
    assert cache.start_fork(entry, FORK)
    assert cache.finish_fork(entry, FORK, {_key(1): bytes(BLCKSZ)})
    assert cache.held_bytes == BLCKSZ
    now[0] += 30
    assert cache.held_bytes == 0 and cache.take(point) is None
    other = (1663, 5, 16385, 0)
    assert not cache.start_fork(entry, other)  # a prepare still running stops
    assert cache.begin(point) is not None  # prepared again


def test_an_unclaimed_entry_is_dropped_when_it_expires() -> None:
    """The prepare's thread holds its entry until taken or expired, then drops it."""
    cache = PreparedPages(MiB, 0.2)
    entry = cache.begin(PagePoint("t", 40))
    assert entry is not None and cache.start_fork(entry, FORK)
    assert cache.finish_fork(entry, FORK, {_key(1): bytes(BLCKSZ)})
    t0 = time.monotonic()
    cache.wait_taken(entry)
    assert 0.15 < time.monotonic() - t0 < 5 and entry.closed.is_set()
    assert cache._entries == {} and cache.held_bytes == 0


def test_the_delta_waits_for_a_fork_being_rebuilt_and_takes_over_the_others() -> None:
    """A fork the prepare is rebuilding: the delta waits for its pages (at most WAIT_SECONDS,
    then rebuilds it itself: what the prepare made of it is dropped); a fork it has not
    begun: the delta's (the prepare skips it)."""
    cache = PreparedPages(MiB, 30)
    entry = cache.begin(PagePoint("t", 40))
    assert entry is not None and cache.planned(entry) and cache.start_fork(entry, FORK)
    taken = cache.take(PagePoint("t", 40))
    assert taken is not None and len(taken) == 0
    page = b"p" * BLCKSZ
    finisher = threading.Timer(0.3, cache.finish_fork, (entry, FORK, {_key(1): page}))
    finisher.start()
    t0 = time.monotonic()
    assert taken.get(_key(1)) == page and time.monotonic() - t0 > 0.2
    assert taken.get(_key(2)) is None  # written after the prepare's plan: the delta's
    finisher.join()
    assert taken.get(_key(1, rel=16385)) is None
    assert not cache.start_fork(entry, (1663, 5, 16385, 0))  # taken over
    slow = (1663, 5, 16386, 0)
    assert cache.start_fork(entry, slow)
    t0 = time.monotonic()
    assert cache.fork_pages(entry, slow, wait=0.2) == {}
    assert 0.15 < time.monotonic() - t0 < 5
    assert cache.finish_fork(entry, slow, {_key(1, rel=16386): page})
    assert taken.get(_key(1, rel=16386)) is None  # dropped: the delta rebuilt it
    assert cache.held_bytes == 0  # taken: the delta's memory


def test_a_page_is_served_only_at_its_own_point(store: TimelineStore) -> None:
    """A branch that wrote past its branch point, the same LSN on another timeline, another
    LSN: none finds the target's entry."""
    tl, child, source = _checkout(store)
    cache = PreparedPages(MiB, 30)
    assert prepare(cache, tl, T, keys_changed(ReadPoint(child, 64), ReadPoint(tl, T)))
    other = store.create_timeline()
    _record(other, T, (K.rel_block_key(1663, 5, 16384, 0, 7), _page(T, 1)))
    for timeline, lsn in ((child, 56), (child, 48), (other, 40), (tl, 32), (tl, 48)):
        if lsn <= timeline.last_record_lsn:
            assert page_point(timeline, lsn) != PagePoint(tl.timeline_id, T)
            assert cache.take(page_point(timeline, lsn)) is None
    assert page_point(child, 40) == PagePoint(tl.timeline_id, 40)  # a branch at its start
    assert page_point(source.timeline, T) == PagePoint(tl.timeline_id, T)
    assert len(cache.take(page_point(source.timeline, T)) or ()) > 10


def test_a_failed_prepare_keeps_what_it_made_and_the_delta_rebuilds_the_rest(
    store: TimelineStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    tl, child, source = _checkout(store)
    head = ReadPoint(child, 64)
    want = _members(_delta(source, head), NBLOCKS)
    real = prepared_pages.rebuilt_pages

    def failing(*a: Any) -> Iterator[bytes]:
        pages = real(*a)
        yield next(pages)
        if a[4] == 16385:
            raise OSError("a layer file went away")
        yield from pages

    monkeypatch.setattr(prepared_pages, "rebuilt_pages", failing)
    cache = PreparedPages(MiB, 30)
    entry = prepare(cache, tl, T, keys_changed(head, ReadPoint(tl, T)))  # does not raise
    assert entry is not None and not entry.done and entry.forks
    first = len(entry.pages)
    assert all(K.keys_fields([k])[0][3] == 16384 for k in entry.pages)
    delta = _delta(source, head, cache.take(entry.point))
    assert _members(delta, NBLOCKS) == want and 10 < delta.prepared_used == first < delta.pages


def test_a_checkout_prepare_that_cannot_plan_does_nothing(store: TimelineStore) -> None:
    """Histories that never meet (another root timeline): no entry, no error."""
    tl, _child, _source = _checkout(store)
    other = store.create_timeline()
    _record(other, 8, (K.rel_block_key(1663, 5, 16384, 0, 7), _page(8, 1)))
    cache = PreparedPages(MiB, 0.1)
    prepare_checkout(cache, other, tl, T)
    assert cache.take(PagePoint(tl.timeline_id, T)) is None


def test_a_checkout_prepare_is_taken_while_it_waits(store: TimelineStore) -> None:
    """prepare_checkout plans the checkout's keys from the node's latest LSN (here HEAD's:
    every page of the delta), rebuilds, and its thread ends once the delta took the entry."""
    tl, child, source = _checkout(store)
    cache = PreparedPages(MiB, 30)
    thread = threading.Thread(target=prepare_checkout, args=(cache, child, tl, T))
    thread.start()
    entry = _entry_made(cache)
    assert entry.ended.wait(30) and entry.done  # 16384's and 16385's blocks
    pages = cache.take(page_point(source.timeline, source.lsn))
    assert pages is not None
    thread.join(5)
    assert not thread.is_alive()
    head = ReadPoint(child, 64)
    delta = checkout_forks(source, head, 0, pages)
    assert _members(delta, NBLOCKS) == _members(checkout_forks(source, head, 0), NBLOCKS)
    assert delta.prepared_used == delta.pages == len(pages) > 10


def test_a_checkout_prepare_follows_the_node_ingest(
    store: TimelineStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys the node ingests after the prepare's first plan (its last writes, still streaming
    when the checkout starts: bench.checkout's first plan held 825 of the delta's 1368 keys)
    are planned again and prepared before the delta takes the entry, so the delta rebuilds
    none itself (before: block 30, after the stop, on the critical path)."""
    require_c_extension(native_redo, "pageserver.redo._redo")  # the delta's bulk path
    tl = store.create_timeline()
    _record(tl, 8, _size(16384, 40), *((_block(16384, b), _page(8, b)) for b in range(40)))
    checkpoint = CheckPoint(T, 1, 1, True, *[0] * 12)  # the hints' window starts at T
    _record(tl, T, (K.CHECKPOINT_KEY, Image(checkpoint.pack())))
    child = store.branch(tl.timeline_id, T)
    _record(child, 24, (_block(16384, 5), _page(24, 1)))  # the node ingested up to 24
    source = TimelineSource(store.branch(tl.timeline_id, T), T)
    cache = PreparedPages(MiB, 30)
    thread = threading.Thread(target=prepare_checkout, args=(cache, child, tl, T))
    thread.start()
    try:
        entry = _entry_made(cache)

        def until(done: Any) -> bool:
            deadline = time.monotonic() + 10
            while not done():
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.005)
            return True

        first_pass = lambda: entry.planned and set(entry.forks.values()) == {2}  # noqa: E731
        assert until(first_pass) and set(entry.pages) == {_block(16384, 5)}
        _record(child, 32, (_block(16384, 30), _page(32, 2)))  # ingested after the plan
        assert until(lambda: _block(16384, 30) in entry.pages)
        pages = cache.take(page_point(source.timeline, source.lsn))
        assert pages is not None
        rebuilt: list[list[int]] = []
        real = delta_tar.rebuilt_pages

        def spy(tl: Timeline, lsn: int, *fork_blocks: Any) -> Iterator[bytes]:
            rebuilt.append(list(fork_blocks[4]))
            return real(tl, lsn, *fork_blocks)  # type: ignore[no-any-return]

        head, nblocks = ReadPoint(child, 32), {16384: 40}
        want = _members(checkout_forks(source, head, 0), nblocks)
        monkeypatch.setattr(delta_tar, "rebuilt_pages", spy)
        delta = checkout_forks(source, head, 0, pages)
        assert _members(delta, nblocks) == want
        assert not any(rebuilt) and delta.prepared_used == delta.pages == 2
    finally:
        thread.join(10)
    assert not thread.is_alive()


def test_a_fork_whose_rebuild_failed_is_the_deltas_at_once(
    store: TimelineStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One thread's rebuild fails while the other's goes on: the failed fork is given to
    the delta at once (and its bytes back to the bound), not when the prepare ends (the
    delta waited WAIT_SECONDS for a fork nobody rebuilt)."""
    tl, child, _source = _checkout(store)
    failed, go_on = threading.Event(), threading.Event()
    real = prepared_pages.rebuilt_pages

    def rebuild(timeline: Timeline, lsn: int, *fork_blocks: Any) -> Iterator[bytes]:
        if fork_blocks[2] == 16385:
            failed.set()
            raise OSError("a layer file went away")
        assert go_on.wait(30)
        return real(timeline, lsn, *fork_blocks)

    monkeypatch.setattr(prepared_pages, "rebuilt_pages", rebuild)
    cache = PreparedPages(MiB, 30)
    keys = keys_changed(ReadPoint(child, 64), ReadPoint(tl, T))
    thread = threading.Thread(target=prepare, args=(cache, tl, T, keys))
    thread.start()
    try:
        entry = _entry_made(cache)
        assert failed.wait(30)
        deadline = time.monotonic() + 5
        while entry.forks.get(OTHER) != prepared_pages._CLAIMED:
            assert time.monotonic() < deadline, "the failed fork is still the prepare's"
            time.sleep(0.01)
        assert entry.forks[FORK] == prepared_pages._RUNNING  # the other one goes on
        assert cache.held_bytes == entry.reserved[FORK] and OTHER not in entry.reserved
    finally:
        go_on.set()
        thread.join(30)
    assert not thread.is_alive() and not entry.done and entry.reserved == {}


def _fork_pages(fork: tuple[int, int, int, int], n: int) -> dict[K.Key, bytes]:
    return {K.rel_block_key(*fork, b): bytes(BLCKSZ) for b in range(n)}


def _reserving_cache() -> tuple[PreparedPages, list[float], _Entry]:
    """A cache of 10 pages, its clock, and a planned entry."""
    now = [0.0]
    cache = PreparedPages(10 * BLCKSZ, 30, lambda: now[0])
    entry = cache.begin(PagePoint("t", 1))
    assert entry is not None and cache.planned(entry)
    return cache, now, entry


def test_forks_being_rebuilt_count_in_the_bound_together() -> None:
    cache, _now, entry = _reserving_cache()
    assert cache.start_fork(entry, FORK, 6 * BLCKSZ) and cache.held_bytes == 6 * BLCKSZ
    assert not cache.start_fork(entry, OTHER, 6 * BLCKSZ)  # 12 pages would pass 10
    assert cache.start_fork(entry, OTHER, 4 * BLCKSZ)
    assert cache.finish_fork(entry, FORK, _fork_pages(FORK, 6))
    assert cache.held_bytes == 10 * BLCKSZ and entry.reserved == {OTHER: 4 * BLCKSZ}


def test_an_entry_taken_while_a_fork_is_rebuilt_takes_its_reservation_along() -> None:
    cache, _now, entry = _reserving_cache()
    assert cache.start_fork(entry, FORK, 6 * BLCKSZ)
    assert cache.take(entry.point) is not None and cache.held_bytes == 0
    assert cache.finish_fork(entry, FORK, _fork_pages(FORK, 6)) and cache.held_bytes == 0
    other = cache.begin(PagePoint("t", 2))
    assert other is not None and cache.planned(other)
    assert cache.start_fork(other, OTHER, 10 * BLCKSZ)  # the taken entry is outside it
    cache.leave(entry)
    assert cache.held_bytes == 10 * BLCKSZ


def test_an_entry_expired_or_left_while_a_fork_is_rebuilt_gives_its_bytes_back() -> None:
    cache, now, entry = _reserving_cache()
    assert cache.start_fork(entry, FORK, 6 * BLCKSZ)
    now[0] = 100  # expired
    assert cache.held_bytes == 0
    assert not cache.finish_fork(entry, FORK, _fork_pages(FORK, 6)) and cache.held_bytes == 0
    cache.leave(entry)
    assert cache.held_bytes == 0
    cache, _now, entry = _reserving_cache()
    assert cache.start_fork(entry, FORK, 6 * BLCKSZ)
    cache.leave(entry)  # the prepare failed in the fork: no finish_fork
    assert cache.held_bytes == 0 and entry.reserved == {}


def _entry_made(cache: PreparedPages) -> _Entry:
    """The entry a prepare on another thread makes first (before its plan)."""
    deadline = time.monotonic() + 30
    while not cache._entries:
        assert time.monotonic() < deadline, "no entry was made"
        time.sleep(0.01)
    (entry,) = cache._entries.values()
    return entry


def test_only_the_blocks_the_target_has_are_prepared(store: TimelineStore) -> None:
    """Planned from the node's side, the keys name blocks the target's fork does not have
    (16384 is 40 blocks long at the target, 44 at HEAD; 16385 does not exist there): the
    delta never asks for them, and as zero pages they only took up the bound."""
    require_c_extension(native_redo, "pageserver.redo._redo")
    tl, child = _history(store)  # 16385 made after the target
    assert get_rel_size(tl, *FORK, T) == 40 and get_rel_size(tl, 1663, 5, 16385, 0, T) is None
    cache = PreparedPages(MiB, 30)
    entry = prepare(cache, tl, T, keys_changed(ReadPoint(child, 56), ReadPoint(tl, T)))
    assert entry is not None and entry.done and entry.pages
    assert list(entry.forks) == [FORK]
    assert all(K.keys_fields([k])[0][5] < 40 for k in entry.pages)
    assert ZERO_PAGE not in entry.pages.values()
    assert cache.held_bytes == len(entry.pages) * BLCKSZ
    source = TimelineSource(store.branch(tl.timeline_id, T), T)
    head, nblocks = ReadPoint(child, 56), {16384: 40}
    delta = _delta(source, head, cache.take(entry.point))
    assert _members(delta, nblocks) == _members(_delta(source, head), nblocks)
    assert delta.prepared_used == len(entry.pages) == delta.pages


def test_a_delta_arriving_during_the_plan_finds_the_entry_and_rebuilds_alone(
    store: TimelineStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The entry is made before the plan: a delta taking it meanwhile (its own plan was
    quicker) gets it, the prepare then rebuilds nothing, drops nothing into the cache and
    its thread ends (not held for the entry's lifetime)."""
    tl, child, source = _checkout(store)
    planning, go_on = threading.Event(), threading.Event()
    real = prepared_pages.checkout_keys

    def slow_plan(*a: Any) -> Any:
        planning.set()
        assert go_on.wait(30)
        return real(*a)

    monkeypatch.setattr(prepared_pages, "checkout_keys", slow_plan)
    cache = PreparedPages(MiB, 30)
    thread = threading.Thread(target=prepare_checkout, args=(cache, child, tl, T))
    thread.start()
    try:
        assert planning.wait(30)
        pages = cache.take(page_point(source.timeline, source.lsn))
        assert pages is not None and len(pages) == 0
        assert not prepared_pages.prepare(cache, tl, 32, [])  # one prepare at a time
    finally:
        go_on.set()
        thread.join(30)
    assert not thread.is_alive()
    assert pages._entry.forks == {} and pages._entry.closed.is_set()
    assert cache.held_bytes == 0 and cache._entries == {}
    head = ReadPoint(child, 64)
    delta = checkout_forks(source, head, 0, pages)
    assert _members(delta, NBLOCKS) == _members(checkout_forks(source, head, 0), NBLOCKS)
    assert delta.prepared_used == 0


def test_a_delta_that_gives_up_stops_the_prepare(
    store: TimelineStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delta that took the entry and ended early (its checks failed, its client went
    away) closes it: the prepare rebuilds no further fork for nobody (one thread: two
    would have begun both forks before the close)."""
    monkeypatch.setattr(prepared_pages, "PREPARE_THREADS", 1)
    tl, child, _source = _checkout(store)
    rebuilding, go_on = threading.Event(), threading.Event()
    real = prepared_pages.rebuilt_pages

    def gated(*a: Any) -> Iterator[bytes]:
        rebuilding.set()
        assert go_on.wait(30)
        return real(*a)  # type: ignore[no-any-return]

    monkeypatch.setattr(prepared_pages, "rebuilt_pages", gated)
    cache = PreparedPages(MiB, 30)
    keys = keys_changed(ReadPoint(child, 64), ReadPoint(tl, T))
    done: list[_Entry | None] = []
    thread = threading.Thread(target=lambda: done.append(prepare(cache, tl, T, keys)))
    thread.start()
    try:
        assert rebuilding.wait(30)  # in its first fork
        pages = cache.take(PagePoint(tl.timeline_id, T))
        assert pages is not None
        pages.close()
    finally:
        go_on.set()
        thread.join(30)
    assert not thread.is_alive()
    entry = done[0]
    assert entry is not None and not entry.done and list(entry.forks) == [FORK]
    assert entry.pages == {}  # the first fork's pages dropped: nobody takes them


def test_the_wait_for_a_fork_is_read_when_the_delta_asks(monkeypatch: pytest.MonkeyPatch) -> None:
    """`WAIT_SECONDS` is read when the delta asks (a test or a tuning changes it)."""
    monkeypatch.setattr(prepared_pages, "WAIT_SECONDS", 0.0)
    cache = PreparedPages(MiB, 30)
    entry = cache.begin(PagePoint("t", 40))
    assert entry is not None and cache.planned(entry) and cache.start_fork(entry, FORK)
    taken = cache.take(PagePoint("t", 40))
    assert taken is not None
    finisher = threading.Timer(0.5, cache.finish_fork, (entry, FORK, {_key(1): b"p" * BLCKSZ}))
    finisher.start()
    try:
        assert taken.get(_key(1)) is None  # not waited for: the delta's own
    finally:
        finisher.join()
    assert taken.get(_key(1)) is None and not entry.pages


def test_a_failed_early_flush_leaves_the_pages_prepared(monkeypatch: pytest.MonkeyPatch) -> None:
    """`Pageserver.prepare_checkout` hands the node's ingested WAL to the flusher first; an
    error there other than NeonError/OSError (a bug) ended its thread before the pages were
    prepared: logged, and the pages are prepared all the same."""
    started = threading.Event()

    class Store:
        state = object()
        timeline = "current"

        def flush_ahead(self) -> None:
            raise RuntimeError("a bug in the early flush")

    history = SimpleNamespace(
        root="root", timelines=SimpleNamespace(get=lambda tid: SimpleNamespace(last_record_lsn=9))
    )
    Store.history = history  # type: ignore[attr-defined]
    daemon = SimpleNamespace(
        stores={"n": Store()},
        prepared_pages=SimpleNamespace(enabled=True),
        remote=SimpleNamespace(mirror_of_root=lambda root: None),
    )
    monkeypatch.setattr(service, "prepare_checkout", lambda *args: started.set())
    service.Pageserver.prepare_checkout(
        cast(service.Pageserver, daemon),
        "n",
        cast(StorageHistory, history),
        cast(Snapshot, SimpleNamespace(timeline_id="t", lsn=5)),
    )
    assert started.wait(10)
