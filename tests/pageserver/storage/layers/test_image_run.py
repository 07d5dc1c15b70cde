"""ImageRunWriter: sorted keys become adjacent image layers tiling the keyspace at one LSN, cut
at the target size; a key out of order is refused and nothing written stays behind."""

from __future__ import annotations

import errno
import itertools
import os
import random
import subprocess
from pathlib import Path

import pytest

from pageserver.storage.keys import KEY_MAX, KEY_MIN, Key, make_key
from pageserver.storage.layers.image import ImageRunWriter
from pageserver.storage.settings import StoreSettings
from pageserver.storage.timeline_store import TimelineStore
from pg15.constants import BLCKSZ
from proto.errors import InvalidArgument


def key(i: int) -> Key:
    return make_key(0, 1663, 5, 1000, 0, i)


def test_run_tiles_the_keyspace_and_reads_back(tmp_path: Path) -> None:
    store = TimelineStore(tmp_path / "store", StoreSettings(image_layer_target_size=4 * BLCKSZ))
    try:
        timeline = store.create_timeline()
        run = ImageRunWriter(timeline.directory, 100, timeline.settings, timeline.cache)
        for i in range(10):
            run.add(key(i), bytes([i]) * BLCKSZ)
        layers = run.finish()
        assert len(layers) == 3  # 4 + 4 + 2 pages
        assert layers[0].name.key_range.start == KEY_MIN
        assert layers[-1].name.key_range.end == KEY_MAX
        for before, after in itertools.pairwise(layers):
            assert before.name.key_range.end == after.name.key_range.start
        assert [x.name.key_range.start for x in layers[1:]] == [key(4), key(8)]
        for i in range(10):
            [holder] = [x for x in layers if key(i) in x.name.key_range]
            assert holder.get(key(i)) == bytes([i]) * BLCKSZ
        assert layers[1].get(key(100)) is None
    finally:
        store.close()


def test_unsorted_keys_are_refused_and_leave_no_file(tmp_path: Path) -> None:
    store = TimelineStore(tmp_path / "store", StoreSettings(image_layer_target_size=4 * BLCKSZ))
    try:
        timeline = store.create_timeline()
        before = sorted(os.listdir(timeline.directory))
        run = ImageRunWriter(timeline.directory, 100, timeline.settings, timeline.cache)
        for i in range(10):  # two finished layers, a third being written
            run.add(key(i), bytes([i]) * BLCKSZ)
        assert run.layers_cut == 2
        with pytest.raises(InvalidArgument, match="sorted"):
            run.add(key(3), bytes(BLCKSZ))
        assert sorted(os.listdir(timeline.directory)) == before
    finally:
        store.close()


def test_a_full_disk_mid_run_leaves_no_layer(tmp_path: Path) -> None:
    """Layers are published (fsync, rename) on another thread while the next is written: a
    run that fills its filesystem fails with ENOSPC, whichever thread hits it, and its abort
    removes the layers already published as well as the one being written."""
    where = tmp_path / "small"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(where)], check=True)
    try:
        store = TimelineStore(where / "store", StoreSettings(image_layer_target_size=4 * BLCKSZ))
        try:
            timeline = store.create_timeline()
            before = sorted(os.listdir(timeline.directory))
            run = ImageRunWriter(timeline.directory, 100, timeline.settings, timeline.cache)
            rng = random.Random(7)
            with pytest.raises(OSError) as failed:
                for i in range(1000):  # incompressible pages: 8 MiB, the disk holds 512 KiB
                    run.add(key(i), rng.randbytes(BLCKSZ))
                run.finish()
            assert failed.value.errno == errno.ENOSPC
            assert run.layers_cut >= 2  # some layers were published before the disk filled
            run.abort()
            assert sorted(os.listdir(timeline.directory)) == before
        finally:
            store.close()
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
