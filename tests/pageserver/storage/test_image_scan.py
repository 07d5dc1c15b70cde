"""Image creation scans the key space a piece at a time (compaction._scan_pieces), checking
`cancelled` (which pauses for foreground work) between pieces: in one call the scan could
neither stop nor pause while a checkout's delta waited for the same process's GIL. The
partitions a piece settles are rebuilt while the rest is scanned."""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import pytest

from pageserver.storage import compaction
from pageserver.storage import keys as K
from pageserver.storage.compaction import (
    CompactionCancelled,
    create_image_layers,
    create_image_layers_at,
)
from pageserver.storage.settings import StoreSettings
from pageserver.storage.timeline import Timeline
from pageserver.storage.timeline_store import TimelineStore
from pageserver.storage.values import ReconstructData, Tombstone, WalDelta

SETTINGS = StoreSettings(
    checkpoint_distance=1 << 30,  # flushes are explicit
    compaction_threshold=10,
    image_creation_threshold=1,
    image_layer_target_size=16 * 8192,  # 16 pages a partition
    block_size=8192,
)


def page(blk: int) -> K.Key:
    return K.rel_block_key(1663, 5, 16384, 0, blk)


def redo(key: K.Key, lsn: int, rd: ReconstructData) -> bytes:
    return rd.deltas[-1][1].record


def load(tl: Timeline, lsn: int, blocks: range, fill: int) -> None:
    tl.put_batch([(page(b), lsn, WalDelta(bytes([fill]) * 8192, True)) for b in blocks])
    tl.advance_last_record_lsn(lsn, tl.last_record_lsn)
    tl.freeze_and_flush()


def layered(tmp_path: Path) -> tuple[TimelineStore, Timeline]:
    """A timeline with image layers over 16-page partitions of 200 pages, then a change of
    some of them and a dropped one (a tombstone) above: many layer boundaries."""
    store = TimelineStore(tmp_path / "store", SETTINGS)
    tl = store.create_timeline()
    load(tl, 0x10000, range(200), fill=1)
    assert create_image_layers(tl, redo, force=True) > 8
    load(tl, 0x20000, range(3, 190, 7), fill=2)
    tl.put_batch([(page(50), 0x30000, Tombstone())])
    tl.advance_last_record_lsn(0x30000, tl.last_record_lsn)
    tl.freeze_and_flush()
    return store, tl


def spy_get_keys(monkeypatch: pytest.MonkeyPatch) -> list[K.KeyRange]:
    """The ranges Timeline.get_keys is asked for (the real method answers)."""
    asked: list[K.KeyRange] = []
    real: Callable[[Timeline, K.KeyRange, int], list[K.Key]] = Timeline.get_keys

    def get_keys(self: Timeline, key_range: K.KeyRange, lsn: int) -> list[K.Key]:
        asked.append(key_range)
        return real(self, key_range, lsn)

    monkeypatch.setattr(Timeline, "get_keys", get_keys)
    return asked


def scanned(tl: Timeline, lsn: int) -> list[K.Key]:
    return [
        key for piece in compaction._scan_pieces(tl, tl.layer_map(), lsn, None) for key in piece
    ]


def test_the_pieces_hold_the_keys_of_the_whole_scan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, tl = layered(tmp_path)
    try:
        for lsn in (0x10000, 0x20000, 0x30000):
            whole = tl.get_keys(K.FULL_KEYSPACE, lsn)
            asked = spy_get_keys(monkeypatch)
            assert scanned(tl, lsn) == whole
            monkeypatch.undo()
            assert 2 < len(asked) <= compaction.SCAN_PIECES
            # The pieces tile the key space, in order.
            assert asked[0].start == K.KEY_MIN and asked[-1].end == K.KEY_MAX
            assert all(a.end == b.start for a, b in pairwise(asked))
        assert page(50) in tl.get_keys(K.FULL_KEYSPACE, 0x20000)
        assert page(50) not in scanned(tl, 0x30000)
    finally:
        store.close()


def test_image_creation_checks_between_pieces_of_its_key_scan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled after the first piece: the rest of the key space is not scanned (the old
    single scan read all of it before its next check) and nothing is written."""
    store, tl = layered(tmp_path)
    try:
        layers = set(map(id, tl.layer_map().layers()))
        asked = spy_get_keys(monkeypatch)
        checks = 0

        def cancelled() -> bool:
            nonlocal checks
            checks += 1
            return checks >= 2  # the check before the scan passes, the next one stops

        with (
            tl.compaction_lock,
            pytest.raises(CompactionCancelled),
        ):
            create_image_layers_at(tl, redo, 0x30000, force=True, cancelled=cancelled)
        assert len(asked) == 1 and asked[0] != K.FULL_KEYSPACE
        assert asked[0].start == K.KEY_MIN
        assert set(map(id, tl.layer_map().layers())) == layers
    finally:
        store.close()


def test_partitions_are_rebuilt_while_the_scan_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first partition is rebuilt before the scan's last piece (the whole scan ran alone
    before: 0.1 s of one core after a 600 MiB catch-up); the image layers are those of the
    partitions of the whole scan, in order, with the same pages."""
    store, tl = layered(tmp_path)
    try:
        whole = tl.get_keys(K.FULL_KEYSPACE, 0x30000)
        per = SETTINGS.image_layer_target_size // compaction.PAGE_SIZE_ESTIMATE
        expected = compaction._partitions(whole, per)
        asked = spy_get_keys(monkeypatch)
        order: list[str] = []
        write_image = compaction._write_image

        def writing(*args: object, **kwargs: object) -> object:
            order.append(f"image after {len(asked)} pieces")
            return write_image(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(compaction, "_write_image", writing)
        monkeypatch.setattr(compaction, "image_workers", lambda: 2)
        with tl.compaction_lock:
            written = create_image_layers_at(tl, redo, 0x30000, force=True)
        monkeypatch.undo()
        assert written == len(expected) == len(order) > 2
        assert order[0] != f"image after {len(asked)} pieces", order
        made = [x for x in tl.layer_map().images if x.lsn == 0x30000]
        assert [x.key_range for x in made] == [r for r, _ in expected]
        for key_range, keys in expected:
            assert tl.get_keys(key_range, 0x30000) == keys
        assert all(tl.get_reconstruct_data(k, 0x30000).image is not None for k in whole)
    finally:
        store.close()
