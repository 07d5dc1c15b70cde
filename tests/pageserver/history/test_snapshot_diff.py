"""diff_stat on a real page store built in process: pages written, rewritten identically,
truncated, created; image layers written by compaction inside the window (which make every
key a candidate); a branch whose LSNs overlap its parent's; unrelated histories."""

from __future__ import annotations

import itertools
import os
import random
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from pageserver.basebackup.checkout_delta import checkout_keys
from pageserver.history import snapshot_diff
from pageserver.history.snapshot_diff import (
    DifferentHistories,
    ReadPoint,
    RelationDiff,
    diff_stat,
    keys_changed,
    not_fully_logged,
    plan_diff,
)
from pageserver.reconstruct.apply_delta import reconstruct
from pageserver.reconstruct.value_format import encode_u32
from pageserver.redo.native import redo as native_redo
from pageserver.storage import compaction
from pageserver.storage import keys as K
from pageserver.storage.compaction import compact_level0, create_image_layers
from pageserver.storage.manifest import EmptySpan, read_manifest
from pageserver.storage.settings import StoreSettings
from pageserver.storage.timeline import MAX_EMPTY_SPANS, Timeline, WrittenKeys, merge_gaps
from pageserver.storage.timeline_store import TimelineStore
from pageserver.storage.values import TOMBSTONE, Image, ReconstructData, Value
from pg15.checkpoint import CheckPoint
from pg15.constants import BLCKSZ
from tests.native_ext import require_c_extension

SETTINGS = StoreSettings(
    checkpoint_distance=1 << 20,
    compaction_threshold=3,
    compaction_target_size=1 << 20,
    image_creation_threshold=1,
    image_layer_target_size=1 << 20,
    block_size=8192,
    block_cache_bytes=1 << 20,
)
SPC, DB = 1663, 5


@pytest.fixture(autouse=True)
def _no_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "fsync", lambda fd: None)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TimelineStore]:
    s = TimelineStore(tmp_path / "store", SETTINGS)
    yield s
    s.close()


def page(lsn: int, fill: int) -> Image:
    """A relation page whose pd_lsn is `lsn`."""
    return Image(struct.pack("<II", lsn >> 32, lsn & 0xFFFFFFFF) + bytes([fill]) * (BLCKSZ - 8))


def block(rel: int, blkno: int) -> K.Key:
    return K.rel_block_key(SPC, DB, rel, 0, blkno)


def size(rel: int, n: int) -> tuple[K.Key, Value]:
    return K.rel_size_key(SPC, DB, rel, 0), Image(encode_u32(n))


def record(tl: Timeline, lsn: int, *puts: tuple[K.Key, Value]) -> None:
    tl.put_batch([(key, lsn, value) for key, value in puts])
    tl.advance_last_record_lsn(lsn, tl.last_record_lsn)


def changed(relations: Iterable[RelationDiff]) -> dict[int, tuple[str, int]]:
    return {r.relfilenode: (r.change, r.pages_changed) for r in relations}


def build(store: TimelineStore) -> tuple[Timeline, ReadPoint, ReadPoint]:
    tl = store.create_timeline()
    record(
        tl, 8,
        size(16384, 4), *((block(16384, b), page(8, b)) for b in range(4)),
        size(16385, 2), *((block(16385, b), page(8, 10 + b)) for b in range(2)),
    )  # fmt: skip
    record(tl, 16, (block(16384, 0), page(16, 0)))
    a = ReadPoint(tl, 16)
    tl.freeze_and_flush()
    record(tl, 24, (block(16384, 1), page(24, 99)))
    record(tl, 32, (block(16384, 2), page(8, 2)))  # written again, bytes unchanged
    record(tl, 40, size(16385, 1), (block(16385, 1), TOMBSTONE))
    record(tl, 48, size(16386, 3), *((block(16386, b), page(48, 50)) for b in range(3)))
    tl.freeze_and_flush()
    # Image layers at 48 hold every key: each becomes a candidate, confirmed by reading.
    assert create_image_layers(tl, reconstruct, force=True) > 0
    record(tl, 56, (block(16384, 3), page(56, 7)))
    return tl, a, ReadPoint(tl, 56)


def test_pages_that_differ_per_relation(store: TimelineStore) -> None:
    tl, a, b = build(store)
    written = tl.keys_written(K.RELATION_KEYSPACE, 16, 56)
    assert written.logged >= {block(16384, 1), block(16384, 3), block(16385, 1)}
    # Held by the image layers only, their WAL versions all there: unchanged, not candidates
    # (not even listed: the image layers are not read where the spans log the whole window).
    assert not written.imaged & {block(16384, 0), block(16385, 0)}
    assert written.fully_logged(block(16384, 0), 16, 56)
    assert written.unsure_ranges(K.RELATION_KEYSPACE, 16, 56) == []
    stat = diff_stat(a, b)
    assert changed(stat.relations) == {
        16384: ("modified", 2),  # blocks 1 and 3; block 2 was rewritten identically
        16385: ("truncated", 1),
        16386: ("created", 3),
    }
    assert stat.pages_changed == 6 and stat.bytes_changed == 6 * BLCKSZ
    assert stat.common_lsn == 16
    (r,) = [r for r in stat.relations if r.relfilenode == 16385]
    assert r.forks == (("main", 2, 1, 1),) and r.name is None and r.database == "(database 5)"
    back = diff_stat(b, a)
    assert changed(back.relations) == {
        16384: ("modified", 2),
        16385: ("modified", 1),
        16386: ("dropped", 3),
    }
    assert diff_stat(a, a).relations == ()


def test_image_layers_over_removed_wal_versions(store: TimelineStore) -> None:
    """GC removed the WAL versions of the window below the image layers: the keys they hold
    are compared by reading (block 1's only version there is now its image)."""
    tl, a, b = build(store)
    (gone,) = [d for d in tl.layer_map().deltas if d.lsn_start == 17]
    tl.replace_layers(add=[], remove=[gone])
    written = tl.keys_written(K.RELATION_KEYSPACE, 16, 56)
    assert block(16384, 1) in written.imaged
    assert not written.fully_logged(block(16384, 1), 16, 56)
    assert changed(diff_stat(a, b).relations) == {
        16384: ("modified", 2),
        16385: ("truncated", 1),
        16386: ("created", 3),
    }
    # A delta .neon reads such keys at both ends: block 1 changed, block 0 did not, and
    # relation 16386's blocks exist at B only (no value at A: the per-key read decides).
    changed_keys = keys_changed(a, b)
    assert block(16384, 1) in changed_keys and block(16384, 0) not in changed_keys
    assert {block(16386, b) for b in range(3)} <= changed_keys


def _merged_window(store: TimelineStore) -> tuple[Timeline, list[K.Key]]:
    """A timeline whose window (12, 40] holds an L0 merge of DB 5's block alone and an image
    layer at 32 that holds `others` too (another database's keys, below DB 5's), written by
    compaction: the keys no WAL touched in the window."""
    others = [K.rel_block_key(SPC, 1, 16384, 0, b) for b in range(40)]  # below DB 5's keys
    record(
        tl := store.create_timeline(), 8,
        *((other, page(8, b)) for b, other in enumerate(others)),
        size(16384, 1), (block(16384, 0), page(8, 0)),
    )  # fmt: skip
    tl.freeze_and_flush()
    checkpoint = CheckPoint(12, 1, 1, True, *[0] * 12)  # a checkout's hints start at 12
    record(tl, 12, (block(16384, 0), page(12, 5)), (K.CHECKPOINT_KEY, Image(checkpoint.pack())))
    tl.freeze_and_flush()
    assert compact_level0(tl, force=True) == (2, 1)  # up to LSN 12, `others` among its keys
    for n, lsn in enumerate((16, 24, 32)):
        record(tl, lsn, (block(16384, 0), page(lsn, n)))
        tl.freeze_and_flush()
    assert compact_level0(tl) == (3, 1)  # the window's: DB 5's block alone
    assert create_image_layers(tl, reconstruct, force=True) > 0  # at 32: holds `others` too
    record(tl, 40, (block(16384, 0), page(40, 9)))
    return tl, others


def _reads_one_by_one(monkeypatch: pytest.MonkeyPatch) -> list[K.Key]:
    read: list[K.Key] = []
    per_key = Timeline.get_reconstruct_data

    def counted(timeline: Timeline, key: K.Key, lsn: int) -> ReconstructData:
        read.append(key)
        return per_key(timeline, key, lsn)

    monkeypatch.setattr(Timeline, "get_reconstruct_data", counted)
    return read


def test_keys_an_l0_merge_left_out_are_known_unchanged(
    store: TimelineStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An L0 merge in the window writes L1 files spanning the keys its L0 files held; the
    L0 files spanned every key, so where the L1 files hold none no WAL version lies
    (`EmptySpan`, kept in the manifest): a key there that an image layer written in the
    window holds did not change, known from the indexes. Before, such keys were read at both
    ends for every delta push and checkout (~40 ms of a 1% delta push's pageserver, the
    catalogs of a pgbench database after the load's compaction). GC removing an L1 file
    uncovers its own keys only: they are candidates again, read at both ends."""
    require_c_extension(native_redo, "pageserver.redo._redo")
    tl, others = _merged_window(store)
    window = tl.keys_written(K.RELATION_KEYSPACE, 12, 40)
    assert window.fully_logged(others[0], 12, 40) and not set(others) & window.imaged
    assert window.unsure_ranges(K.RELATION_KEYSPACE, 12, 40) == []
    bulk_reads: list[list[K.Key]] = []
    bulk = snapshot_diff._bulk

    def counted_bulk(point: ReadPoint, keys: list[K.Key]) -> Iterator[bytes | None]:
        bulk_reads.append(keys)
        return bulk(point, keys)

    monkeypatch.setattr(snapshot_diff, "_bulk", counted_bulk)
    read_one_by_one = _reads_one_by_one(monkeypatch)
    assert keys_changed(ReadPoint(tl, 12), ReadPoint(tl, 40)) == {block(16384, 0)}
    assert checkout_keys(ReadPoint(tl, 40), ReadPoint(tl, 12)) == ({block(16384, 0)}, 12)
    assert bulk_reads == [] and not set(read_one_by_one) & set(others)
    # The spans outlive a reopening (the manifest keeps them).
    (reopened,) = [
        Timeline.open(tl.directory, None, SETTINGS, tl.cache, read_manifest(tl.directory))
    ]
    try:
        again = reopened.keys_written(K.RELATION_KEYSPACE, 12, 32)
        assert again.fully_logged(others[0], 12, 32) and not set(others) & again.imaged
    finally:
        reopened.close()
    # GC removes the window's L1 file: its key is a candidate again, the others are not.
    (merged,) = [d for d in tl.layer_map().deltas if (d.lsn_start, d.lsn_end) == (13, 33)]
    tl.replace_layers(add=[], remove=[merged])
    window = tl.keys_written(K.RELATION_KEYSPACE, 12, 40)
    assert not window.fully_logged(block(16384, 0), 12, 40)
    assert window.fully_logged(others[0], 12, 40) and not set(others) & window.imaged


def test_keys_an_l0_merge_did_not_span_are_sent_only_when_changed(
    store: TimelineStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the spans do not say (a store whose merges kept no `EmptySpan`, as before
    they were kept, or spans dropped past MAX_EMPTY_SPANS), a key outside a merge's L1
    files that an image layer written in the window holds is a candidate. A delta .neon
    (keys_changed) reads it at both ends and leaves it out (before, another database's
    whole catalog went into a delta: bigger than the snapshot), rebuilding those keys in
    bulk: read one by one (the per-key path), the ~2500 catalog keys of a pgbench database
    were over half of a 1% delta push's pageserver CPU. A checkout's delta (checkout_keys)
    reads them too: it carried them, ~1900 unchanged catalog pages beside a 1% change's
    2692."""
    require_c_extension(native_redo, "pageserver.redo._redo")
    monkeypatch.setattr(compaction, "merge_gaps", lambda outputs: ())
    tl, others = _merged_window(store)
    window = tl.keys_written(K.RELATION_KEYSPACE, 12, 40)
    assert set(others) <= window.imaged and not window.fully_logged(others[0], 12, 40)
    read_one_by_one = _reads_one_by_one(monkeypatch)
    assert keys_changed(ReadPoint(tl, 12), ReadPoint(tl, 40)) == {block(16384, 0)}
    # A checkout's delta from the state at 40 back to 12 reads them too (it carried them).
    assert checkout_keys(ReadPoint(tl, 40), ReadPoint(tl, 12)) == ({block(16384, 0)}, 12)
    assert not set(read_one_by_one) & set(others)


def test_merge_gaps_and_their_bound(store: TimelineStore) -> None:
    """A merge's gaps: below its first file, between files that do not touch, above its
    last; nothing for files of different LSN ranges (not one merge's). The timeline keeps
    the newest MAX_EMPTY_SPANS."""
    tl = store.create_timeline()
    for lsn in (8, 16):
        record(tl, lsn, (block(16384, 0), page(lsn, 1)), (block(16390, 0), page(lsn, 2)))
        tl.freeze_and_flush()
    assert compact_level0(tl, force=True) == (2, 1)
    (l1,) = tl.layer_map().deltas
    gaps = merge_gaps([l1])
    assert [(g.key_range, g.lsn_start, g.lsn_end) for g in gaps] == [
        (K.KeyRange(K.FULL_KEYSPACE.start, block(16384, 0)), l1.lsn_start, l1.lsn_end),
        (K.KeyRange(l1.key_range.end, K.FULL_KEYSPACE.end), l1.lsn_start, l1.lsn_end),
    ]
    assert l1.key_range.end == K.key_successor(block(16390, 0))
    assert read_manifest(tl.directory).empty_spans == gaps
    spans = [EmptySpan(K.KeyRange(block(16384, 1), block(16384, 2)), n, n + 1) for n in range(200)]
    tl.replace_layers(add=[], remove=[], empty=spans)
    assert read_manifest(tl.directory).empty_spans == tuple(spans[-MAX_EMPTY_SPANS:])


def test_branch_with_overlapping_lsns(store: TimelineStore) -> None:
    tl, a, b = build(store)
    child = store.branch(tl.timeline_id, 16)
    record(child, 24, (block(16384, 1), page(24, 99)), (block(16384, 0), page(24, 5)))
    other = ReadPoint(child, 24)
    plan = plan_diff(b, other)
    assert plan.common_lsn == 16
    assert [(t.timeline_id, lo, hi) for t, lo, hi in plan.windows_b] == [
        (child.timeline_id, 16, 24)
    ]
    # Block 1 has the same bytes at the same LSN on both branches: not a difference.
    assert changed(diff_stat(b, other).relations) == {
        16384: ("modified", 2),  # block 0 (child), block 3 (parent)
        16385: ("modified", 1),
        16386: ("dropped", 3),
    }
    assert changed(diff_stat(a, other).relations) == {16384: ("modified", 2)}


def test_unrelated_histories_are_refused(store: TimelineStore) -> None:
    _tl, a, _b = build(store)
    other = store.create_timeline()
    record(other, 8, size(16384, 1), (block(16384, 0), page(8, 0)))
    with pytest.raises(DifferentHistories, match="no history in common"):
        diff_stat(a, ReadPoint(other, 8))


def test_not_fully_logged_decides_per_stretch_as_per_key() -> None:
    """The keys `not_fully_logged` keeps are those `fully_logged` says no to, key by key:
    spans over random stretches of keys (bounds included as keys) and LSN windows with gaps,
    overlaps and the whole keyspace."""
    rng = random.Random(7)

    def key(blkno: int) -> K.Key:
        return K.rel_block_key(1663, 5, 16384 + blkno // 20, 0, blkno % 20)  # in key order

    for _ in range(200):
        spans: list[tuple[K.KeyRange, int, int]] = []
        for _ in range(rng.randint(0, 8)):
            a, b = sorted(rng.sample(range(60), 2))
            start = rng.randint(0, 90)
            spans.append((K.KeyRange(key(a), key(b)), start, start + rng.randint(1, 40)))
        if rng.random() < 0.3:
            start = rng.randint(0, 90)
            spans.append((K.FULL_KEYSPACE, start, start + rng.randint(1, 40)))
        imaged = {key(rng.randrange(60)) for _ in range(rng.randint(0, 40))}
        imaged |= {r.start for r, _s, _e in spans if r != K.FULL_KEYSPACE}
        written = WrittenKeys(set(), imaged, tuple(spans))
        above = rng.randint(0, 60)
        upto = above + rng.randint(1, 50)
        expected = {k for k in imaged if not written.fully_logged(k, above, upto)}
        assert set(not_fully_logged(written, above, upto)) == expected
        # The ranges keys_written reads image layers over hold exactly those keys, sorted,
        # disjoint and merged (no two touch), inside the range asked for.
        part = K.KeyRange(key(rng.randrange(30)), key(30 + rng.randrange(30)))
        ranges = written.unsure_ranges(part, above, upto)
        inside = {k for k in imaged if k in part}
        assert {k for k in inside if any(k in r for r in ranges)} == expected & inside
        assert all(part.start <= r.start < r.end <= part.end for r in ranges)
        assert all(a.end < b.start for a, b in itertools.pairwise(ranges))
