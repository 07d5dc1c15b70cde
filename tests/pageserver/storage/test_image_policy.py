"""Image creation's policy: a partition whose versions above its images outweigh what the
images hold of it gets an image layer before image_creation_threshold layers pile up (a bulk
load under older images), and an L1 layer merged across an image's LSN does not make its
partition due again at every pass; a pass writes images at a named LSN below its own too
(a snapshot's) where due there."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pageserver.config import store_settings_from
from pageserver.storage import keys as K
from pageserver.storage.compaction import compact, compact_level0, create_image_layers
from pageserver.storage.settings import StoreSettings
from pageserver.storage.timeline import Timeline
from pageserver.storage.timeline_store import TimelineStore
from pageserver.storage.values import Image, ReconstructData, WalDelta
from proto.errors import InvalidArgument

SETTINGS = StoreSettings(
    checkpoint_distance=1 << 30,  # flushes are explicit
    compaction_threshold=10,
    image_creation_threshold=3,
    image_layer_target_size=16 * 8192,  # 16 pages a partition; a quarter is 4 pages
    block_size=8192,
)


def page(blk: int) -> K.Key:
    return K.rel_block_key(1663, 5, 16384, 0, blk)


def redo(key: K.Key, lsn: int, rd: ReconstructData) -> bytes:
    """A page: the newest record (every record here initializes its page)."""
    return rd.deltas[-1][1].record


def load(tl: Timeline, lsn: int, blocks: range, fill: int) -> None:
    """One record per block (8 KiB each), initializing it, ending at `lsn`, then a flush:
    one L0 layer."""
    tl.put_batch([(page(b), lsn, WalDelta(bytes([fill]) * 8192, True)) for b in blocks])
    tl.advance_last_record_lsn(lsn, tl.last_record_lsn)
    tl.freeze_and_flush()


def imported(tl: Timeline) -> None:
    """4 pages as an import writes them (images at 0x10), and image layers over them."""
    tl.put_batch([(page(b), 0x10, Image(bytes([1]) * 8192)) for b in range(4)])
    tl.advance_last_record_lsn(0x10, None)
    tl.freeze_and_flush()
    assert create_image_layers(tl, redo, force=True) > 0


def images_over(tl: Timeline, blocks: range, lsn: int) -> bool:
    whole = K.KeyRange(page(blocks.start), page(blocks.stop))
    images, covered = tl.layer_map().images_over(whole, lsn)
    return covered and all(image.lsn == lsn for image in images)


def test_a_bulk_load_under_old_images_gets_images_from_one_layer(tmp_path: Path) -> None:
    store = TimelineStore(tmp_path / "store", SETTINGS)
    try:
        tl = store.create_timeline()
        imported(tl)
        load(tl, 0x80000, range(4, 64), fill=2)  # the load: 60 pages the images do not hold
        # One layer above the images: below image_creation_threshold.
        assert len(tl.layer_map().deltas_overlapping(K.FULL_KEYSPACE, 0x10, 0x80000)) == 1
        assert create_image_layers(tl, redo) == 4  # every partition of the load
        assert images_over(tl, range(64), 0x80000)
        assert tl.get_reconstruct_data(page(40), 0x80000).deltas == ()
        # A small change later: its bytes do not outweigh the images.
        load(tl, 0x82000, range(5, 6), fill=3)
        assert create_image_layers(tl, redo) == 0
    finally:
        store.close()


def test_an_l1_layer_across_an_image_lsn_is_weighed_by_its_share_above(tmp_path: Path) -> None:
    store = TimelineStore(tmp_path / "store", SETTINGS)
    try:
        tl = store.create_timeline()
        imported(tl)
        load(tl, 0x80000, range(4, 64), fill=2)
        assert create_image_layers(tl, redo) == 4
        # A little more WAL (LSNs advance as WAL is written: the load's 480 KiB took
        # 0x80000), then the L0 layers merge: the L1 layer holds the load's versions (below
        # the images) and the new one.
        load(tl, 0x83000, range(8, 9), fill=3)
        assert compact_level0(tl, force=True)[0] == 3
        (l1,) = tl.layer_map().deltas_overlapping(K.FULL_KEYSPACE, 0x80000, 0x83000)
        assert l1.lsn_start < 0x80000 < l1.lsn_end  # it straddles the images' LSN
        assert create_image_layers(tl, redo) == 0
    finally:
        store.close()


def test_a_pass_writes_images_at_a_snapshots_lsn_below_its_own(tmp_path: Path) -> None:
    """A snapshot named right after a bulk load, then a small change: the pass after both
    (asked for the snapshot's LSN) writes its images there, where they serve reads at the
    snapshot and every later one, and none at its own LSN (the change is not due); without
    the point its images at its own LSN served no read at the snapshot."""
    store = TimelineStore(tmp_path / "store", SETTINGS)
    try:
        tl = store.create_timeline()
        imported(tl)
        load(tl, 0x80000, range(4, 64), fill=2)  # the load; the snapshot at its end
        load(tl, 0x82000, range(5, 6), fill=3)  # the change after it
        result = compact(tl, redo, image_lsns=lambda: [0x80000, 0x90000])  # 0x90000: not ingested
        assert result.imaged_at == (0x80000, 0x82000)
        assert result.images_written == 4
        assert images_over(tl, range(64), 0x80000)
        assert {image.lsn for image in tl.layer_map().images} == {0x10, 0x80000}
        at_snapshot = tl.get_reconstruct_data(page(5), 0x80000)
        assert at_snapshot.deltas == () and at_snapshot.image == (0x80000, bytes([2]) * 8192)
        assert tl.get_reconstruct_data(page(40), 0x82000).deltas == ()
        after = tl.get_reconstruct_data(page(5), 0x82000)
        assert after.image is None or after.image[0] == 0x80000
        assert after.deltas[-1][1].record == bytes([3]) * 8192
        assert compact(tl, redo, image_lsns=lambda: [0x80000]).images_written == 0
    finally:
        store.close()


def test_the_ratio_is_an_integer_setting_like_the_others() -> None:
    """The daemon sets it as it sets every storage setting (`--store-setting NAME=VALUE`,
    integers); zero or less is refused."""
    assert (
        store_settings_from(["image_creation_delta_percent=50"], {}).image_creation_delta_percent
        == 50
    )
    with pytest.raises(InvalidArgument, match="image_creation_delta_percent must be positive"):
        StoreSettings(image_creation_delta_percent=0)


def changed_after_images(tl: Timeline) -> None:
    """Two partitions of 16 pages imaged at 0x80000; then 5 pages of the first (31% of its
    keys) written up to 0x82000 and one of the second (6%) up to 0x84000, and the three L0
    layers merged: one L1 layer holding the load under the images and both changes."""
    load(tl, 0x80000, range(32), fill=2)
    assert create_image_layers(tl, redo, force=True) == 2
    load(tl, 0x82000, range(5), fill=3)
    load(tl, 0x84000, range(16, 17), fill=4)
    assert compact_level0(tl, force=True)[0] == 3


def test_a_snapshot_point_images_a_partition_a_tenth_of_whose_keys_changed(
    tmp_path: Path,
) -> None:
    """At a snapshot's LSN a partition where snapshot_image_pages_percent of the keys were
    written since its images gets an image there (reads at the snapshot: its delta push, a
    checkout back to it), counted exactly from the index where the regular rule's bytes are
    the L1 layer's LSN share above the images; one changed less does not, nor does the same
    change at a pass's own LSN (the regular rules only)."""
    settings = dataclasses.replace(SETTINGS, snapshot_image_pages_percent=10)
    store = TimelineStore(tmp_path / "store", settings)
    try:
        tl = store.create_timeline()
        changed_after_images(tl)
        result = compact(tl, redo, image_lsns=lambda: [0x82000])
        assert result.imaged_at == (0x82000, 0x84000)
        assert result.images_written == 1
        assert images_over(tl, range(16), 0x82000)
        assert not images_over(tl, range(16, 32), 0x82000)
        assert tl.get_reconstruct_data(page(3), 0x82000).image == (0x82000, bytes([3]) * 8192)
        assert tl.get_reconstruct_data(page(3), 0x82000).deltas == ()
        # 1 key of 16 (6%) written since its image: nothing, at a snapshot's LSN too.
        assert compact(tl, redo, image_lsns=lambda: [0x84000]).images_written == 0
    finally:
        store.close()
    store = TimelineStore(tmp_path / "store2", settings)
    try:
        tl = store.create_timeline()
        changed_after_images(tl)
        assert compact(tl, redo).images_written == 0  # no snapshot: the regular rules only
    finally:
        store.close()


def test_the_snapshot_percentage_is_a_setting() -> None:
    assert (
        store_settings_from(["snapshot_image_pages_percent=60"], {}).snapshot_image_pages_percent
        == 60
    )
    with pytest.raises(InvalidArgument, match="snapshot_image_pages_percent must be positive"):
        StoreSettings(snapshot_image_pages_percent=0)
