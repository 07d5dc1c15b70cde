"""The read path against a brute-force model: random puts, reads, key scans, freezes, flushes,
L0 compactions, image layers, branches and crash-reopens (hypothesis state machine), plus
unit tests of the layer map's lookups."""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pageserver.storage import keys as K
from pageserver.storage.compaction import compact, compact_level0, create_image_layers
from pageserver.storage.layers.blocks import BlockCache
from pageserver.storage.layers.image import ImageLayerWriter
from pageserver.storage.layers.layer_map import LayerMap
from pageserver.storage.settings import StoreSettings
from pageserver.storage.timeline import FutureLsn, Timeline
from pageserver.storage.timeline_store import TimelineStore
from pageserver.storage.values import TOMBSTONE, Image, ReconstructData, Tombstone, Value, WalDelta

KEYS = [
    K.DB_DIR_KEY,
    K.relmap_file_key(1663, 5),
    K.rel_block_key(1663, 5, 16384, 0, 0),
    K.rel_block_key(1663, 5, 16384, 0, 1),
    K.rel_block_key(1663, 5, 16384, 1, 0),
    K.rel_size_key(1663, 5, 16384, 0),
    K.rel_block_key(1663, 5, 16390, 0, 0),
    K.rel_block_key(1663, 6, 16384, 0, 0),
    K.slru_block_key(K.SlruKind.CLOG, 0, 0),
    K.CHECKPOINT_KEY,
]
RANGES = [
    K.FULL_KEYSPACE,
    K.database_range(1663, 5),
    K.relation_range(1663, 5, 16384),
    K.fork_blocks_range(1663, 5, 16384, 0),
    K.RELATION_KEYSPACE,
]
TINY = StoreSettings(
    checkpoint_distance=600,
    compaction_threshold=3,
    compaction_target_size=250,
    image_creation_threshold=2,
    image_layer_target_size=3 * 8192,
    block_size=128,
    block_cache_bytes=4096,
)


@pytest.fixture(autouse=True)
def _no_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    """The model simulates crashes by dropping in-memory state; fsync only costs time here
    (real fsync ordering is covered in test_timeline_store)."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)


def fold(rd: ReconstructData) -> bytes | None:
    """A toy, order-sensitive redo: what a page would be after applying the chain."""
    if rd.is_empty:
        return None
    page = rd.image[1] if rd.image is not None else b""
    for _, delta in rd.deltas:
        base = b"init" if delta.will_init else page
        page = hashlib.blake2b(base + delta.record, digest_size=8).digest()
    return page


def materialize(key: K.Key, lsn: int, rd: ReconstructData) -> bytes | None:
    return fold(rd)


def ends_chain(value: Value) -> bool:
    return not (isinstance(value, WalDelta) and not value.will_init)


@dataclass
class ModelTimeline:
    ancestor: str | None
    ancestor_lsn: int
    last_record_lsn: int
    versions: list[tuple[K.Key, int, Value]] = field(default_factory=list)


class Model:
    def __init__(self) -> None:
        self.timelines: dict[str, ModelTimeline] = {}

    def read(self, tid: str, key: K.Key, lsn: int) -> ReconstructData:
        newest_first: list[tuple[int, Value]] = []
        current: str | None = tid
        while current is not None:
            tl = self.timelines[current]
            own = [(v_lsn, v) for k, v_lsn, v in tl.versions if k == key and v_lsn <= lsn]
            for v_lsn, v in reversed(own):
                newest_first.append((v_lsn, v))
                if ends_chain(v):
                    return self._to_rd(newest_first)
            lsn = min(lsn, tl.ancestor_lsn)
            current = tl.ancestor
        return self._to_rd(newest_first)

    @staticmethod
    def _to_rd(newest_first: list[tuple[int, Value]]) -> ReconstructData:
        image = None
        deltas: list[tuple[int, WalDelta]] = []
        if newest_first and ends_chain(newest_first[-1][1]):
            base_lsn, base = newest_first[-1]
            if isinstance(base, Image):
                image = (base_lsn, base.data)
                newest_first = newest_first[:-1]
            elif isinstance(base, Tombstone):
                newest_first = newest_first[:-1]
        for v_lsn, v in reversed(newest_first):
            assert isinstance(v, WalDelta)
            deltas.append((v_lsn, v))
        return ReconstructData(image, tuple(deltas))

    def keys(self, tid: str, key_range: K.KeyRange, lsn: int) -> list[K.Key]:
        out = []
        for key in sorted(KEYS):
            if key not in key_range:
                continue
            newest = self._newest(tid, key, lsn)
            if newest is not None and not isinstance(newest, Tombstone):
                out.append(key)
        return out

    def _newest(self, tid: str, key: K.Key, lsn: int) -> Value | None:
        current: str | None = tid
        while current is not None:
            tl = self.timelines[current]
            own = [v for k, v_lsn, v in tl.versions if k == key and v_lsn <= lsn]
            if own:
                return own[-1]
            lsn = min(lsn, tl.ancestor_lsn)
            current = tl.ancestor
        return None


values = st.one_of(
    st.binary(max_size=40).map(Image),
    st.builds(WalDelta, st.binary(min_size=1, max_size=30), st.booleans()),
    st.builds(WalDelta, st.binary(min_size=1, max_size=30), st.just(False)),
    st.just(TOMBSTONE),
)

IDX = st.integers(0, 4)
records = st.tuples(
    st.integers(1, 3), st.lists(st.tuples(st.sampled_from(KEYS), values), min_size=1, max_size=4)
)


def check_delta_invariant(layer_map: LayerMap) -> None:
    """Delta layers whose key ranges overlap have disjoint LSN ranges."""
    for a, b in itertools.combinations(layer_map.deltas, 2):
        if a.key_range.overlaps(b.key_range):
            assert a.lsn_end <= b.lsn_start or b.lsn_end <= a.lsn_start, (a, b)


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="layer-map-model-"))
        self.store = TimelineStore(self.root, TINY)
        self.model = Model()
        self.ids: list[str] = []
        self.images_made = False

    @initialize(records=st.lists(records, min_size=2, max_size=8))
    def create_root(self, records: list[tuple[int, list[tuple[K.Key, Value]]]]) -> None:
        self.store.create_timeline("a0")
        self.model.timelines["a0"] = ModelTimeline(None, 0, 0)
        self.ids.append("a0")
        self.ingest(0, records)

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def pick(self, i: int) -> tuple[str, Timeline, ModelTimeline]:
        tid = self.ids[i % len(self.ids)]
        return tid, self.store.get(tid), self.model.timelines[tid]

    @rule(i=IDX, records=st.lists(records, min_size=1, max_size=5))
    def ingest(self, i: int, records: list[tuple[int, list[tuple[K.Key, Value]]]]) -> None:
        _, tl, mtl = self.pick(i)
        for gap, puts in records:
            lsn = tl.last_record_lsn + gap
            tl.put_batch([(key, lsn, value) for key, value in puts])
            mtl.versions.extend((key, lsn, value) for key, value in puts)
            tl.advance_last_record_lsn(lsn, tl.last_record_lsn)
            mtl.last_record_lsn = lsn

    def check_reads(self, tid: str, lsn: int) -> None:
        tl = self.store.get(tid)
        for key in KEYS:
            got = tl.get_reconstruct_data(key, lsn)
            want = self.model.read(tid, key, lsn)
            assert fold(got) == fold(want), (tid, K.describe(key), lsn, got, want)
            if not self.images_made:
                assert got == want, (tid, K.describe(key), lsn)

    @rule(i=IDX, back=st.integers(0, 12))
    def read(self, i: int, back: int) -> None:
        tid, _, mtl = self.pick(i)
        self.check_reads(tid, max(0, mtl.last_record_lsn - back))

    @rule(i=IDX, rng=st.sampled_from(RANGES), back=st.integers(0, 12))
    def scan(self, i: int, rng: K.KeyRange, back: int) -> None:
        tid, tl, mtl = self.pick(i)
        lsn = max(0, mtl.last_record_lsn - back)
        assert tl.get_keys(rng, lsn) == self.model.keys(tid, rng, lsn)

    @rule(i=IDX)
    def read_future(self, i: int) -> None:
        _, tl, mtl = self.pick(i)
        with pytest.raises(FutureLsn):
            tl.get_reconstruct_data(KEYS[0], mtl.last_record_lsn + 1)

    @rule(i=IDX)
    def freeze(self, i: int) -> None:
        self.pick(i)[1].freeze()

    @rule(i=IDX)
    def flush(self, i: int) -> None:
        self.pick(i)[1].flush_frozen_layers()

    @rule(i=IDX)
    def freeze_and_flush(self, i: int) -> None:
        _, tl, _ = self.pick(i)
        tl.freeze_and_flush()
        assert tl.disk_consistent_lsn == tl.last_record_lsn
        assert not tl.needs_flush

    @rule(i=IDX, force=st.booleans())
    def compact_l0(self, i: int, force: bool) -> None:
        compact_level0(self.pick(i)[1], force=force)

    @rule(i=IDX, force=st.booleans())
    def images(self, i: int, force: bool) -> None:
        if create_image_layers(self.pick(i)[1], materialize, force=force):
            self.images_made = True

    @rule(i=IDX)
    def compact_all(self, i: int) -> None:
        if compact(self.pick(i)[1], materialize).images_written:
            self.images_made = True

    @precondition(lambda self: len(self.ids) < 5)
    @rule(i=IDX, back=st.integers(0, 8))
    def branch(self, i: int, back: int) -> None:
        tid, tl, mtl = self.pick(i)
        at = max(mtl.ancestor_lsn, mtl.last_record_lsn - back)
        new_id = f"b{len(self.ids)}"
        child = self.store.branch(tid, at, new_id)
        assert child.last_record_lsn == at == child.ancestor_lsn
        assert tl.disk_consistent_lsn >= at
        self.model.timelines[new_id] = ModelTimeline(tid, at, at)
        self.ids.append(new_id)

    @rule()
    def crash_and_reopen(self) -> None:
        durable = {tid: self.store.get(tid).disk_consistent_lsn for tid in self.ids}
        self.store.close()
        self.store = TimelineStore(self.root, TINY)
        assert self.store.list_timelines() == sorted(self.ids)
        for tid, dcl in durable.items():
            tl = self.store.get(tid)
            assert tl.last_record_lsn == tl.disk_consistent_lsn == dcl
            mtl = self.model.timelines[tid]
            mtl.versions = [v for v in mtl.versions if v[1] <= dcl]
            mtl.last_record_lsn = dcl

    @invariant()
    def lsns_layers_and_reads_are_consistent(self) -> None:
        for tid in self.ids:
            tl = self.store.get(tid)
            assert tl.ancestor_lsn <= tl.disk_consistent_lsn <= tl.last_record_lsn
            check_delta_invariant(tl.layer_map())
            # Hypothesis rarely chains the right rules, so every step checks the tips and
            # a point just above the branch (where reads cross to the ancestor).
            self.check_reads(tid, tl.last_record_lsn)
            self.check_reads(tid, (tl.ancestor_lsn + tl.last_record_lsn) // 2)


TestStoreModel = StoreMachine.TestCase
TestStoreModel.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# --- unit tests of the lookups ----------------------------------------------------------------


def _image(tmp: Path, rng: K.KeyRange, lsn: int, cache: BlockCache) -> ImageLayerWriter:
    return ImageLayerWriter(tmp, rng, lsn, TINY)


def test_newest_image_and_covering(tmp_path: Path) -> None:
    cache = BlockCache(1 << 16)
    rel = K.relation_range(1663, 5, 16384)
    db = K.database_range(1663, 5)
    old = _image(tmp_path, db, 10, cache).finish(cache)
    new = _image(tmp_path, rel, 20, cache).finish(cache)
    lm = LayerMap.build([old, new])
    inside = K.rel_block_key(1663, 5, 16384, 0, 3)
    elsewhere = K.rel_block_key(1663, 5, 99999, 0, 3)
    assert lm.newest_image(inside, 25) is new
    assert lm.newest_image(inside, 19) is old
    assert lm.newest_image(inside, 9) is None
    assert lm.newest_image(elsewhere, 25) is old
    assert lm.newest_image_covering(db, 25) is old
    assert lm.newest_image_covering(rel, 25) is new
    assert lm.replace(remove=[new]).images == (old,)


def test_an_image_layer_hides_absent_keys(tmp_path: Path) -> None:
    """A key inside an image layer's range but not in it does not exist at or above it."""
    store = TimelineStore(tmp_path, TINY)
    tl = store.create_timeline("aa")
    kept, dropped = KEYS[2], KEYS[3]
    tl.put_batch([(kept, 5, Image(b"k")), (dropped, 5, Image(b"d"))])
    tl.advance_last_record_lsn(5, None)
    tl.freeze_and_flush()

    def drop_one(key: K.Key, lsn: int, rd: ReconstructData) -> bytes | None:
        raise AssertionError("only whole images here")

    writer = ImageLayerWriter(tl.directory, K.FULL_KEYSPACE, 5, TINY)
    writer.add(kept, b"k")
    tl.replace_layers(add=[writer.finish(store.cache)], remove=[])
    assert tl.get_reconstruct_data(dropped, 5).is_empty
    assert tl.get_reconstruct_data(kept, 5) == ReconstructData((5, b"k"), ())
    assert tl.get_keys(K.FULL_KEYSPACE, 5) == [kept]
    tl.put(dropped, 7, WalDelta(b"r", False))
    tl.advance_last_record_lsn(7, 5)
    assert tl.get_reconstruct_data(dropped, 7) == ReconstructData(None, ((7, WalDelta(b"r")),))
    assert tl.get_keys(K.FULL_KEYSPACE, 7) == [kept, dropped]
    assert create_image_layers(tl, drop_one) == 0
    store.close()
