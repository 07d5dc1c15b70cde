"""Compaction publishes its outputs (fsync, rename, directory fsync) on a thread of its own
while it writes the next one (the L1 layers of an L0 merge, the image layers of a pass),
every one before the manifest naming them; a failed publication leaves nothing behind."""

from __future__ import annotations

import errno
import itertools
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from pageserver.reconstruct.apply_delta import reconstruct
from pageserver.storage import compaction
from pageserver.storage.layers.blocks import LayerFileWriter
from pageserver.storage.timeline import Timeline
from tests.pageserver.storage.layers.test_l0_merge import (  # noqa: F401 (fixtures)
    level0_store,
    opened,
    workload,
)


def test_outputs_are_published_off_the_compacting_thread_before_the_manifest(
    level0_store: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    events: list[tuple[str, str, str]] = []
    publish, replace = LayerFileWriter.publish, Timeline.replace_layers

    def publishing(self: LayerFileWriter, file_name: str) -> Path:
        path = publish(self, file_name)
        events.append(("published", file_name, threading.current_thread().name))
        return path

    def replacing(self: Timeline, *args: object, **kwargs: object) -> None:
        events.append(("manifest", "", threading.current_thread().name))
        replace(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(LayerFileWriter, "publish", publishing)
    monkeypatch.setattr(Timeline, "replace_layers", replacing)
    store = opened(level0_store, tmp_path, "s")
    try:
        timeline = store.timeline
        merged, written = compaction.compact_level0(timeline, force=True)
        assert merged > 10 and written > 5
        images = compaction.create_image_layers(timeline, reconstruct, force=True)
        assert images > 1
        names = {layer.name.file_name for layer in timeline.layer_map().layers()}
    finally:
        store.close()
        store.history.close()
    me = threading.current_thread().name
    assert [e[0] for e in events] == (
        ["published"] * written + ["manifest"] + ["published"] * images + ["manifest"]
    )
    published = [e for e in events if e[0] == "published"]
    assert all(thread != me for _, _, thread in published)
    assert {name for _, name, _ in published} <= names
    assert all(thread == me for kind, _, thread in events if kind == "manifest")


@pytest.mark.parametrize("stage", ["merge", "images"])
def test_a_failed_publication_leaves_no_file(
    level0_store: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    stage: str,
) -> None:
    """The second output's fsync fails (EIO): the pass raises it, the outputs published
    before are deleted, the failed one's temp file too, and the layers stay as they were."""
    store = opened(level0_store, tmp_path, stage)
    timeline = store.timeline
    try:
        if stage == "images":
            compaction.compact_level0(timeline, force=True)
        before = sorted(p.name for p in timeline.directory.iterdir())
        layers = sorted(x.name.file_name for x in timeline.layer_map().layers())
        real, calls = os.fsync, [0]

        def failing(fd: int) -> None:
            if threading.current_thread().name.startswith(("l1-publish", "image-publish")):
                calls[0] += 1
                if calls[0] == 3:  # the second file (a file and its directory each)
                    raise OSError(errno.EIO, "injected")
            real(fd)

        monkeypatch.setattr(os, "fsync", failing)
        with pytest.raises(OSError, match="injected"):
            if stage == "merge":
                compaction.compact_level0(timeline, force=True)
            else:
                compaction.create_image_layers(timeline, reconstruct, force=True)
        monkeypatch.setattr(os, "fsync", real)
        assert calls[0] >= 3
        assert sorted(p.name for p in timeline.directory.iterdir()) == before
        assert sorted(x.name.file_name for x in timeline.layer_map().layers()) == layers
    finally:
        store.close()
        store.history.close()


@pytest.mark.parametrize("second", ["sealed", "rebuilding"])
def test_a_failed_partition_ends_the_one_rebuilt_beside_it(
    level0_store: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    second: str,
) -> None:
    """Image partitions rebuilt two at once: the first fails (EIO) once the second is sealed,
    or while it is being rebuilt. The pass raises it, nothing is published, the sealed one's
    temp file is deleted and the layers stay as they were; one still being rebuilt is told to
    stop by its check (it ran to its end under the compaction lock), though the pass was
    given no cancel of its own."""
    store = opened(level0_store, tmp_path, second)
    timeline = store.timeline
    write_image = compaction._write_image
    second_there = threading.Event()
    told_to_stop: list[bool] = []
    calls = itertools.count()

    def failing(*args: Any, **kwargs: Any) -> Any:
        n = next(calls)
        if n == 0:
            assert second_there.wait(60), "the second partition was not rebuilt beside the first"
            raise OSError(errno.EIO, "injected")
        if n > 1 or second == "sealed":
            sealed = write_image(*args, **kwargs)
            second_there.set()
            return sealed
        second_there.set()
        check = args[6]  # _write_image's `cancelled`
        for _ in range(3000):
            if check():
                told_to_stop.append(True)
                raise compaction.CompactionCancelled("stopped by the test's check")
            threading.Event().wait(0.01)
        raise AssertionError("the partition beside a failed one was never told to stop")

    try:
        compaction.compact_level0(timeline, force=True)
        before = sorted(p.name for p in timeline.directory.iterdir())
        layers = sorted(x.name.file_name for x in timeline.layer_map().layers())
        monkeypatch.setattr(compaction, "_write_image", failing)
        monkeypatch.setattr(compaction, "image_workers", lambda: 2)
        with pytest.raises(OSError, match="injected"):
            compaction.create_image_layers(timeline, reconstruct, force=True)
        assert told_to_stop == ([True] if second == "rebuilding" else [])
        assert sorted(p.name for p in timeline.directory.iterdir()) == before
        assert sorted(x.name.file_name for x in timeline.layer_map().layers()) == layers
    finally:
        store.close()
        store.history.close()


QUIET = "0.50 0.40 0.30 2/150 99\n"
BUSY = "5.1 4.2 3.3 9/150 99\n"


@pytest.mark.parametrize(
    ("readings", "workers"),
    [
        ([QUIET, QUIET], compaction.IMAGE_WORKERS),
        ([BUSY, BUSY], 1),
        # a task runnable for a moment (the journal's commit after an fsync): a quiet box
        ([BUSY, QUIET, QUIET], compaction.IMAGE_WORKERS),
        ([QUIET, BUSY, QUIET], compaction.IMAGE_WORKERS),
        # a gap between two tasks of a busy box
        ([QUIET, BUSY, BUSY], 1),
        ([BUSY, QUIET, BUSY], 1),
    ],
)
def test_partitions_are_rebuilt_at_once_only_with_a_core_to_spare(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, readings: list[str], workers: int
) -> None:
    """Besides this process's running threads (this one), one task runnable on two cores:
    IMAGE_WORKERS threads; as many as cores or more: one (the threads contended for the GIL
    on a busy box); by the majority of IMAGE_WORKER_LOOKS readings (one reading took a task
    passing through it for a busy box, or a gap for a quiet one), no more readings than it
    takes; no /proc/loadavg: IMAGE_WORKERS."""
    fake = tmp_path / "loadavg"
    left = list(readings)
    real_open = open
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})  # the cores it may use

    def opening(path: str, *args: Any, **kwargs: Any) -> Any:
        if path != "/proc/loadavg":
            return real_open(path, *args, **kwargs)
        if not left:
            raise FileNotFoundError(path)
        fake.write_text(left.pop(0))  # each reading the next one
        return real_open(fake, *args, **kwargs)

    monkeypatch.setattr(compaction, "open", opening, raising=False)
    assert compaction.image_workers() == workers
    assert left == []  # every reading taken
    assert compaction.image_workers() == compaction.IMAGE_WORKERS


def test_a_worker_done_first_takes_the_next_partition(
    level0_store: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two partitions rebuilt at once, the first slow: the worker whose partition ends first
    takes the third while the first goes on (it waited for the oldest one before, idle: the
    final pass of a catch-up on two cores); the layers are the same, in partition order."""
    store = opened(level0_store, tmp_path, "first-done")
    timeline = store.timeline
    write_image = compaction._write_image
    third_started = threading.Event()
    started: list[int] = []
    lock = threading.Lock()

    def slow_first(*args: Any, **kwargs: Any) -> Any:
        with lock:
            n = len(started)
            started.append(n)
        if n == 0:
            assert third_started.wait(30), "the third partition waited for the first"
        elif n == 2:
            third_started.set()
        return write_image(*args, **kwargs)

    try:
        compaction.compact_level0(timeline, force=True)
        monkeypatch.setattr(compaction, "_write_image", slow_first)
        monkeypatch.setattr(compaction, "image_workers", lambda: 2)
        images = compaction.create_image_layers(timeline, reconstruct, force=True)
        assert images == len(started) >= 3
        made = [x for x in timeline.layer_map().images if x.lsn == timeline.disk_consistent_lsn]
        starts = [x.key_range.start for x in made]
        assert starts == sorted(starts)
    finally:
        store.close()
        store.history.close()
