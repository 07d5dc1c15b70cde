"""The remote history against a real S3 endpoint (moto's server on loopback): upload order,
checksums, deletions after the index, the lease, attach and verified download."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from pageserver.history.node_store import NodeState, NodeStore, StorageHistory
from pageserver.history.pitr import new_area
from pageserver.ingest.lsn_index import INDEX_FILE, LsnIndex
from pageserver.remote.index import INDEX_NAME, ChecksumMismatch, IndexTooNew, decode_index
from pageserver.remote.lease import LeaseLost
from pageserver.remote.manager import RemoteHistories
from pageserver.remote.mirror import MirrorArea
from pageserver.remote.objects import ObjectStore
from pageserver.remote.settings import RemoteSettings
from pageserver.remote.upload_queue import QueueStopped, RoundAborted, Upload, UploadQueue
from pageserver.remote.uploader import AreaUploader
from pageserver.remote.wal_blocks import BLOCK, decode_sums
from pageserver.storage import keys as K
from pageserver.storage.layers.blocks import LayerCorrupt
from pageserver.storage.layers.evicted import EVICTED_SUFFIX, EvictedLayer
from pageserver.storage.manifest import read_manifest
from pageserver.storage.settings import StoreSettings
from pageserver.storage.values import Image, WalDelta
from proto.errors import Conflict, CorruptData, NeonError, Unavailable
from tests.s3d import ACCESS_KEY, REGION, SECRET_KEY, MotoS3, moto_s3

SMALL = StoreSettings(
    checkpoint_distance=4096, compaction_threshold=100, compaction_target_size=512,
    image_creation_threshold=100, image_layer_target_size=8 * 8192, block_size=1024,
)  # fmt: skip
SEG = 16 * 1024 * 1024


@pytest.fixture(scope="module")
def s3() -> Iterator[MotoS3]:
    with moto_s3() as server:
        yield server


@pytest.fixture
def settings(s3: MotoS3, tmp_path: Path) -> RemoteSettings:
    secret = tmp_path / "secret"
    secret.write_text(SECRET_KEY)
    return RemoteSettings(
        "s3tank", s3.new_bucket(), "hist", s3.endpoint, REGION, ACCESS_KEY, str(secret)
    )


def page(blk: int) -> K.Key:
    return K.rel_block_key(1663, 5, 16384, 0, blk)


def make_node(root: Path) -> NodeStore:
    """A node's history with two flushed layers, an LSN index file and archived WAL."""
    history = StorageHistory(root, SMALL)
    timeline = history.timelines.create_timeline("aa")
    for lsn in (0x100, 0x200):
        timeline.put_batch([(page(b), lsn, Image(bytes([b, lsn >> 8]) * 100)) for b in range(8)])
        timeline.advance_last_record_lsn(lsn, None)
        timeline.freeze_and_flush()
    state = NodeState("aa", 0x100, SEG)
    (root / "nodes").mkdir()
    (root / "nodes" / "n1.json").write_text(json.dumps(asdict(state)))
    wal = root / "wal" / "n1" / "aa"
    wal.mkdir(parents=True)
    (wal / "000000010000000000000000").write_bytes(b"w" * 5000)
    (wal / "000000010000000000000001.partial").write_bytes(b"p" * 300)
    index = LsnIndex(root / "lsn_index" / "aa", SEG)
    index.add_boundary(0x100)
    index.flush()
    history.pitr.add(new_area("area", "n1", "inf", "inf"))
    return NodeStore(history, "n1")


def uploader(
    settings: RemoteSettings, store: NodeStore, owner: str = "me", name: str = "area"
) -> AreaUploader:
    """The uploader of the node's area, under `name` in the bucket."""
    area = {**asdict(store.history.pitr.get("area")), "name": name}
    return AreaUploader(settings, area, "pgdata1", lambda: store, owner, parallel=3)


def upload_round(
    settings: RemoteSettings, store: NodeStore, owner: str = "me", name: str = "area"
) -> None:
    """Run an uploader until the node's history up to 0x200 is in the bucket, then stop it."""
    up = uploader(settings, store, owner, name)
    up.start()
    try:
        assert up.wait_uploaded(0x200, 20)
    finally:
        up.stop()


def bucket_keys(s3: MotoS3, settings: RemoteSettings) -> set[str]:
    """The keys the bucket lists (no object read: one deleted meanwhile is no error)."""
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=settings.bucket)
    return {entry["Key"] for page in pages for entry in page.get("Contents", [])}


def bucket_objects(s3: MotoS3, settings: RemoteSettings) -> dict[str, bytes]:
    client = s3.client()
    return {
        key: client.get_object(Bucket=settings.bucket, Key=key)["Body"].read()
        for key in sorted(bucket_keys(s3, settings))
    }


def named_key(s3: MotoS3, settings: RemoteSettings, area: str, path: str) -> str:
    """The bucket key of the object the area's index names for `path` now."""
    raw = s3.client().get_object(Bucket=settings.bucket, Key=f"hist/pitr/{area}/{INDEX_NAME}")
    return f"hist/pitr/{area}/{decode_index(raw['Body'].read(), 'index').objects[path].key}"


def assert_index_consistent(s3: MotoS3, settings: RemoteSettings) -> dict[str, bytes]:
    """The bucket's index names only objects that are there, whole, with its checksums."""
    objects = bucket_objects(s3, settings)
    index = decode_index(objects[f"hist/pitr/area/{INDEX_NAME}"], "index")
    for path, obj in index.objects.items():
        body = objects[f"hist/pitr/area/{obj.key}"]
        assert len(body) == obj.size and hashlib.sha256(body).hexdigest() == obj.sha256, path
    return objects


def wait_for(condition: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_history_reaches_the_bucket_and_gc_deletes_after_the_index(
    s3: MotoS3, settings: RemoteSettings, tmp_path: Path
) -> None:
    store = make_node(tmp_path / "pagestore")
    up = uploader(settings, store)
    up.start()
    try:
        assert up.wait_uploaded(0x200, 20)
        objects = assert_index_consistent(s3, settings)
        index = decode_index(objects["hist/pitr/area/index.json"], "index")
        paths = set(index.objects)
        layers = {p for p in paths if p.startswith("timelines/aa/")}
        assert len(layers) == 2
        assert {"wal/000000010000000000000000", "wal/000000010000000000000001.partial"} <= paths
        assert index.pgdata == "pgdata1" and index.generation == 1
        assert index.disk_consistent_lsn == 0x200
        status = up.status()
        assert status.remote_lsn == 0x200 and status.lag_bytes == 0
        assert status.pending_objects == 0 and status.last_error is None

        # GC drops a layer: the next index no longer names it, then its object goes.
        timeline = store.timeline
        old = next(iter(timeline.layer_map().layers()))
        timeline.put_batch([(page(b), 0x300, WalDelta(b"d")) for b in range(2)])
        timeline.advance_last_record_lsn(0x300, None)
        timeline.freeze_and_flush()
        timeline.replace_layers([], [old])
        up.poke()
        assert up.wait_uploaded(0x300, 20)
        wait_for(lambda: up.status().pending_objects == 0)
        time.sleep(0.3)
        objects = assert_index_consistent(s3, settings)
        index = decode_index(objects["hist/pitr/area/index.json"], "index")
        assert f"timelines/aa/{old.name.file_name}" not in index.objects
        assert not any(old.name.file_name in key for key in objects)
    finally:
        up.stop()


def test_a_second_writer_is_refused_by_the_lease(
    s3: MotoS3, settings: RemoteSettings, tmp_path: Path
) -> None:
    store = make_node(tmp_path / "pagestore")
    first = uploader(settings, store, owner="first")
    first.start()
    try:
        assert first.wait_uploaded(0x200, 20)
    finally:
        first.stop()
    second = uploader(settings, store, owner="second")
    second.start()
    try:
        wait_for(lambda: second.status().last_error is not None)
        assert "written by another pageserver" in str(second.status().last_error)
        assert second.remote is None  # never read, never written
    finally:
        second.stop()
    # A writer whose lease was taken over stops before its next index.
    from pageserver.remote import lease

    async def takeover() -> None:
        async with ObjectStore(settings) as bucket:
            await lease.acquire(bucket, "hist/pitr/area/lease.json", "second", "x", takeover=True)
            with pytest.raises(Conflict):
                await lease.acquire(bucket, "hist/pitr/area/lease.json", "first", "x")
            mine = lease.Lease("first", 1)
            with pytest.raises(LeaseLost, match="another pageserver"):
                await lease.check(bucket, "hist/pitr/area/lease.json", mine, "x")

    asyncio.run(takeover())


def test_an_index_never_names_an_incomplete_upload(s3: MotoS3, settings: RemoteSettings) -> None:
    def gone() -> bytes:
        raise FileNotFoundError("removed by GC")

    good = Upload("a", "hist/x/a", 3, hashlib.sha256(b"abc").hexdigest(), lambda: b"abc")
    bad = Upload("b", "hist/x/b", 3, hashlib.sha256(b"abc").hexdigest(), gone)
    changed = Upload("c", "hist/x/c", 3, hashlib.sha256(b"abc").hexdigest(), lambda: b"abd")

    async def never() -> None:
        raise AssertionError("the index must not be uploaded")

    async def run(uploads: list[Upload], bucket_settings: RemoteSettings) -> None:
        async with ObjectStore(bucket_settings) as bucket:
            queue = UploadQueue(bucket)
            await queue.run_round(uploads, never, [])

    for uploads in ([good, bad], [changed, good]):
        with pytest.raises(RoundAborted):
            asyncio.run(run(uploads, settings))
    assert "hist/x/index.json" not in bucket_objects(s3, settings)
    # A missing bucket: retried with backoff, the error kept, no index, until stopped.
    missing = RemoteSettings(**{**asdict(settings), "bucket": "no-such-bucket-here"})

    async def run_missing() -> str | None:
        async with ObjectStore(missing) as bucket:
            started = time.monotonic()
            queue = UploadQueue(bucket, stopped=lambda: time.monotonic() - started > 1.5)
            with pytest.raises(QueueStopped):
                await queue.run_round([good], never, [])
            assert queue.status.retries_total >= 2
            return queue.status.last_error

    error = asyncio.run(run_missing())
    assert error is not None and "NoSuchBucket" in error


def test_attach_reads_the_history_and_refuses_a_corrupt_object(
    s3: MotoS3, settings: RemoteSettings, tmp_path: Path
) -> None:
    store = make_node(tmp_path / "pagestore")
    upload_round(settings, store)
    mirror = MirrorArea(settings, "area", tmp_path / "mirror" / "pagestore")
    index = mirror.refresh()
    assert index.node_id == "n1" and index.area["name"] == "area"
    history = StorageHistory(mirror.root, SMALL)
    assert history.pitr.get("area").node_id == "n1"
    # At 0x100 only the first layer is needed; at 0x200 both.
    first = mirror.needed_layers(0x100)
    assert len(first) == 1 and len(mirror.needed_layers(0x200)) == 2
    assert mirror.prepare(0x100) > 0
    timeline = StorageHistory(mirror.root, SMALL).timelines.get("aa")
    assert len(list(timeline.layer_map().layers())) == 1
    data = timeline.get_reconstruct_data(page(3), 0x100)
    assert data.image == (0x100, bytes([3, 1]) * 100)

    # A corrupted object is refused at download, named, and not kept.
    (path, obj), = (
        (p, o) for p, o in mirror.needed_layers(0x200).items() if p not in first
    )  # fmt: skip
    client = s3.client()
    key = f"hist/pitr/area/{obj.key}"
    body = client.get_object(Bucket=settings.bucket, Key=key)["Body"].read()
    client.put_object(Bucket=settings.bucket, Key=key, Body=body[:-1] + bytes([body[-1] ^ 1]))
    with pytest.raises(ChecksumMismatch, match=key):
        mirror.prepare(0x200)
    assert not (mirror.root / path).exists()
    client.put_object(Bucket=settings.bucket, Key=key, Body=body)
    # The layer, then the WAL from the LSN index's boundary (0x100) through 0x200: the
    # segment's block sums (one block: 52 bytes) and its one (5000-byte) block.
    assert mirror.prepare(0x200) == len(body) + 52 + 5000
    assert mirror.wal_reader()(0x100, 0x200) == b"w" * 0x100
    assert mirror.prepare(0x200) == 0
    timeline = StorageHistory(mirror.root, SMALL).timelines.get("aa")
    assert timeline.get_reconstruct_data(page(3), 0x200).image == (0x200, bytes([3, 2]) * 100)

    # An index written by a newer format is refused with what to do.
    raw = json.loads(
        client.get_object(Bucket=settings.bucket, Key="hist/pitr/area/index.json")["Body"].read()
    )
    raw["format"] = 99
    client.put_object(
        Bucket=settings.bucket, Key="hist/pitr/area/index.json", Body=json.dumps(raw).encode()
    )
    with pytest.raises(IndexTooNew, match="format 99"):
        mirror.refresh()


def test_only_the_wal_blocks_an_extraction_reads_come_down_verified(
    s3: MotoS3, settings: RemoteSettings, tmp_path: Path
) -> None:
    store = make_node(tmp_path / "pagestore")
    wal = os.urandom(3 * BLOCK + 1000)
    (store.wal_dir / "000000010000000000000000").write_bytes(wal)
    upload_round(settings, store)
    index = assert_index_consistent(s3, settings)
    sums = decode_sums(
        next(b for k, b in index.items() if "/wal_sums/000000010000000000000000~" in k), "sums"
    )
    assert sums.size == len(wal) and len(sums.digests) == 4
    # From the boundary at 0x100 through 0x100 + 70000: blocks 0 and 1 of the segment only.
    lsn = 0x100 + 70000
    mirror = MirrorArea(settings, "area", tmp_path / "mirror" / "pagestore")
    mirror.refresh()
    layers = sum(o.size for o in mirror.needed_layers(lsn, 0x100).values())
    assert mirror.prepare(lsn) == layers + len(sums.encode()) + 2 * BLOCK
    read = mirror.wal_reader()
    assert read(0x100, lsn) == wal[0x100:lsn]
    assert read(2 * BLOCK - 10, 3 * BLOCK) == wal[2 * BLOCK - 10 : 2 * BLOCK]  # stops short
    # A block that does not match its digest is refused (and not kept) by a fresh mirror.
    client = s3.client()
    [key] = [k for k in index if "/objects/wal/000000010000000000000000~" in k]
    bad = bytearray(wal)
    bad[BLOCK + 5] ^= 1
    client.put_object(Bucket=settings.bucket, Key=key, Body=bytes(bad))
    fresh = MirrorArea(settings, "area", tmp_path / "fresh" / "pagestore")
    fresh.refresh()
    with pytest.raises(CorruptData, match=r"block 1 \(bytes 65536\.\.131072\)"):
        fresh.prepare(lsn)
    assert fresh.wal_reader()(0x100, lsn) in (b"", wal[0x100:BLOCK])  # block 0 if it was done
    assert not list(fresh.root.glob("wal_blocks/*/00001"))
    # The snapshot's own LSN is a record end: only layers, no WAL.
    assert fresh.prepare(0x200, exact=True) == 0  # the layers came down in the failed try
    assert fresh.wal_reader()(BLOCK, lsn) == b""


def test_uploaded_layers_are_evicted_and_fetched_back_verified(
    s3: MotoS3, settings: RemoteSettings, tmp_path: Path
) -> None:
    root = tmp_path / "pagestore"
    store = make_node(root)
    timeline = store.history.timelines.get("aa")

    def reads() -> list[bytes | None]:
        return [
            timeline.get_reconstruct_data(page(b), lsn).image[1]  # type: ignore[index]
            for b in range(8)
            for lsn in (0x100, 0x200)
        ]

    expected = reads()
    files = sorted(p for p in (root / "timelines" / "aa").iterdir() if "__" in p.name)
    files = [p for p in files if not p.name.endswith(EVICTED_SUFFIX)]
    assert len(files) == 2
    up = uploader(replace(settings, local_cache=1), store)  # 1 byte: every uploaded layer goes
    up.start()
    try:
        assert up.wait_uploaded(0x200, 20)
        wait_for(lambda: not any(p.exists() for p in files))
        layers = timeline.layer_map().layers()
        assert all(isinstance(x, EvictedLayer) and not x.resident for x in layers)
        assert all(p.with_name(p.name + EVICTED_SUFFIX).exists() for p in files)
        index = assert_index_consistent(s3, settings)  # still names both layers
        assert len([k for k in index if "/objects/timelines/aa/" in k]) == 2
        # Reads fetch the layers back, verified: the same pages.
        assert reads() == expected
        assert all(p.exists() for p in files) and up.cache.fetches_total == 2
        assert up.cache.status().resident_bytes == sum(p.stat().st_size for p in files)
        assert up.cache.enforce() == sum(e.size for e in read_manifest(files[0].parent).layers)
        assert not any(p.exists() for p in files) and up.cache.status().evicted_layers == 2
        # A corrupted object in the bucket is refused, not kept, and no page is read from it.
        client = s3.client()
        [key] = [k for k in index if "/objects/timelines/aa/" in k and "0000000000000101-" in k]
        body = index[key]
        client.put_object(Bucket=settings.bucket, Key=key, Body=body[:-1] + bytes([body[-1] ^ 1]))
        with pytest.raises(ChecksumMismatch, match=key):
            timeline.get_reconstruct_data(page(3), 0x200)
        assert not files[1].exists() and not list(files[1].parent.glob("*.tmp*"))
        client.put_object(Bucket=settings.bucket, Key=key, Body=body)
        assert reads() == expected
        up.cache.enforce()
    finally:
        up.stop()
    # Reopened (a restart), the history knows its evicted layers: not "missing", and read only
    # through a fetcher (a detached storage refuses the read, naming the layer).
    store.history.close()
    reopened = StorageHistory(root, SMALL).timelines.get("aa")
    with pytest.raises(LayerCorrupt, match="evicted, and no remote storage"):
        reopened.get_reconstruct_data(page(3), 0x200)
    again = uploader(settings, NodeStore(StorageHistory(root, SMALL), "n1"))
    again.cache.register()
    try:
        assert reopened.get_reconstruct_data(page(3), 0x200).image == (0x200, bytes([3, 2]) * 100)
        # The area destroyed: every evicted layer comes back first, and the markers go.
        assert again.cache.fetch_all() > 0
        assert all(p.exists() for p in files)
        assert not list(root.glob(f"timelines/*/*{EVICTED_SUFFIX}"))
    finally:
        again.cache.unregister()


def test_a_second_area_uploads_layers_the_first_evicted_and_reads_through_either(
    s3: MotoS3, settings: RemoteSettings, tmp_path: Path
) -> None:
    root = tmp_path / "pagestore"
    store = make_node(root)
    timeline = store.history.timelines.get("aa")
    expected = timeline.get_reconstruct_data(page(5), 0x200).image
    first = uploader(replace(settings, local_cache=1), store)
    first.start()
    try:
        assert first.wait_uploaded(0x200, 20)
        wait_for(lambda: first.cache.status().evicted_layers == 2)
        second = uploader(replace(settings, prefix="other"), store)  # another bucket prefix
        second.start()
        try:
            assert second.wait_uploaded(0x200, 20)  # it fetched them through the first
            first.stop()  # the first area goes: the second's bucket serves the reads
            for layer in timeline.layer_map().layers():
                assert isinstance(layer, EvictedLayer) and not layer.resident
                layer.path.unlink()  # fetched back for the second's upload: gone again
            assert timeline.get_reconstruct_data(page(5), 0x200).image == expected
            assert second.cache.fetches_total >= 1 and first.cache.fetches_total == 2
        finally:
            second.stop()
    finally:
        first.stop()
    other = replace(settings, prefix="other")
    index = decode_index(bucket_objects(s3, other)["other/pitr/area/index.json"], "index")
    assert len([p for p in index.objects if p.startswith("timelines/")]) == 2


def test_attaching_again_finds_the_areas_created_since(
    s3: MotoS3, settings: RemoteSettings, tmp_path: Path
) -> None:
    store = make_node(tmp_path / "pagestore")
    upload_round(settings, store)
    (tmp_path / "elsewhere").mkdir()
    histories = RemoteHistories(tmp_path / "elsewhere")
    assert histories.attach(settings) == ["area"]
    upload_round(settings, store, name="later")
    # Called again (snapshot list -s S): one LIST; only the new area is read and attached.
    assert histories.attach(settings) == ["later"]
    assert sorted(histories.mirrors) == ["area", "later"]


def test_orphans_of_a_killed_round_are_swept_and_nothing_the_index_names(
    s3: MotoS3, settings: RemoteSettings, tmp_path: Path
) -> None:
    store = make_node(tmp_path / "pagestore")
    upload_round(settings, store)
    named = assert_index_consistent(s3, settings)
    # What a round killed after its uploads (before its index) leaves: objects no index names.
    client = s3.client()
    orphans = [
        "hist/pitr/area/objects/timelines/aa/000000000000000000000000000000000000-FFFFFFFFFFFFFFFF"
        "FFFFFFFFFFFFFFFFFFFF__0000000000000201-0000000000000301~0123456789abcdef",
        "hist/pitr/area/objects/wal/000000010000000000000001.partial~fedcba9876543210",
    ]
    for key in orphans:
        client.put_object(Bucket=settings.bucket, Key=key, Body=b"left by a killed round")
    other = "hist/pitr/another/objects/wal/000000010000000000000000~0000000000000000"
    client.put_object(Bucket=settings.bucket, Key=other, Body=b"another area's")
    again = uploader(settings, store)
    again.start()
    try:
        wait_for(lambda: again.swept_total == len(orphans))
    finally:
        again.stop()
    left = assert_index_consistent(s3, settings)
    assert set(left) == set(named) | {other}  # the index, the lease, what it names: all kept


class RecordingStore(ObjectStore):
    """The real client, noting the order of its writes."""

    def __init__(self, settings: RemoteSettings) -> None:
        super().__init__(settings)
        self.calls: list[tuple[str, str]] = []

    async def put(
        self, key: str, body: bytes, *, if_absent: bool = False, if_match: str | None = None
    ) -> str:
        version = await super().put(key, body, if_absent=if_absent, if_match=if_match)
        self.calls.append(("put", key))
        return version

    async def delete(self, key: str) -> None:
        self.calls.append(("delete", key))
        await super().delete(key)


def test_objects_then_the_index_then_deletions(s3: MotoS3, settings: RemoteSettings) -> None:
    def body(i: int) -> bytes:
        return bytes([i]) * (1000 + i)

    async def run() -> list[tuple[str, str]]:
        async with RecordingStore(settings) as bucket:
            queue = UploadQueue(bucket, parallel=2)
            uploads = [
                Upload(
                    f"o{i}",
                    f"hist/x/o{i}",
                    len(body(i)),
                    hashlib.sha256(body(i)).hexdigest(),
                    lambda i=i: body(i),
                )
                for i in range(6)
            ]
            await queue.run_round(uploads[:3], lambda: bucket.put("hist/x/index.json", b"1"), [])
            await queue.run_round(
                uploads[3:],
                lambda: bucket.put("hist/x/index.json", b"2"),
                ["hist/x/o0", "hist/x/o1"],
            )
            assert queue.status.pending_objects == 0 and queue.status.deleted_objects_total == 2
            return bucket.calls  # type: ignore[attr-defined, no-any-return]

    calls = asyncio.run(run())
    index_at = [i for i, c in enumerate(calls) if c == ("put", "hist/x/index.json")]
    assert len(index_at) == 2
    first, second = index_at
    assert {k for _op, k in calls[:first]} == {"hist/x/o0", "hist/x/o1", "hist/x/o2"}
    assert {k for _op, k in calls[first + 1 : second]} == {"hist/x/o3", "hist/x/o4", "hist/x/o5"}
    assert calls[second + 1 :] == [("delete", "hist/x/o0"), ("delete", "hist/x/o1")]
    left = set(bucket_objects(s3, settings))
    assert left == {"hist/x/index.json", "hist/x/o2", "hist/x/o3", "hist/x/o4", "hist/x/o5"}


def test_a_reader_of_a_live_area_follows_the_writer_across_its_rounds(
    s3: MotoS3, settings: RemoteSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer deletes what its new index no longer names as soon as that index is in the
    bucket, so a reader may find gone an object the index it read names (the LSN index, a
    partial segment: replaced each round). It reads the index again and goes on from there,
    in an attach and in an extraction's downloads; an object gone while the index still names
    it is refused as damage, naming it."""
    monkeypatch.setattr("pageserver.remote.uploader.WAL_REFRESH", 0.1)  # a round for WAL alone
    store = make_node(tmp_path / "pagestore")
    partial = store.wal_dir / "000000010000000000000001.partial"
    up = uploader(settings, store)
    up.start()

    def named(path: str) -> str:
        return named_key(s3, settings, "area", path)

    def next_round(n: int) -> None:
        """The writer's next round: a longer partial segment, a new LSN index sample; done
        once its deletions are."""
        old = {p: named(p) for p in (f"lsn_index/{INDEX_FILE}", "wal/" + partial.name)}
        partial.write_bytes(b"p" * (300 + 100 * n))
        lsn_index = LsnIndex(store.history.root / "lsn_index" / "aa", SEG)
        lsn_index.add_boundary(0x200 + n)
        lsn_index.flush()
        up.poke()
        wait_for(lambda: all(named(p) != key for p, key in old.items()))
        wait_for(lambda: not set(old.values()) & bucket_keys(s3, settings))

    try:
        assert up.wait_uploaded(0x200, 20)
        mirror = MirrorArea(settings, "area", tmp_path / "mirror" / "pagestore")
        read_index = mirror._read_index
        reads: list[int] = []

        async def read_then_a_round() -> tuple[bytes, object]:
            found = await read_index()
            reads.append(len(reads))
            if len(reads) == 1:  # the writer's round between the index and its objects
                next_round(1)
            return found

        monkeypatch.setattr(mirror, "_read_index", read_then_a_round)
        index = mirror.refresh()
        assert len(reads) == 2
        key = f"hist/pitr/area/{index.objects[f'lsn_index/{INDEX_FILE}'].key}"
        assert key == named(f"lsn_index/{INDEX_FILE}")
        kept, ours = (
            root / "lsn_index" / "aa" / INDEX_FILE for root in (mirror.root, store.history.root)
        )
        assert kept.read_bytes() == ours.read_bytes()

        # An extraction reading the partial segment the index read last names, replaced since.
        next_round(2)
        lsn = SEG + 450
        assert mirror.prepare(lsn) > 0 and len(reads) == 3
        assert mirror.wal_reader()(SEG, lsn) == b"p" * 450

        # Rewritten under every read: given up, saying so.
        monkeypatch.setattr("pageserver.remote.mirror.REREADS", 2)
        rounds = iter(range(4, 10))

        async def always_a_round() -> tuple[bytes, object]:
            found = await read_index()
            next_round(next(rounds))
            return found

        monkeypatch.setattr(mirror, "_read_index", always_a_round)
        next_round(3)  # an index the mirror has not read yet
        with pytest.raises(Unavailable, match=r"rewritten while it was read, 2 times in a row"):
            mirror.refresh()
    finally:
        up.stop()

    # Gone while the index still names it: damage, named.
    key = named(f"lsn_index/{INDEX_FILE}")
    s3.client().delete_object(Bucket=settings.bucket, Key=key)
    fresh = MirrorArea(settings, "area", tmp_path / "fresh" / "pagestore")
    with pytest.raises(CorruptData, match=rf"{key}: no such object, though the index .* names"):
        fresh.refresh()


def test_an_area_that_cannot_be_read_is_not_attached_and_the_others_are(
    s3: MotoS3, settings: RemoteSettings, tmp_path: Path
) -> None:
    """One damaged area of a bucket (an object its index names is gone) is not attached and
    leaves nothing behind (it would come back as attached at the next start); the bucket's
    other areas are; the error names the area, and the service says it after attaching them."""
    store = make_node(tmp_path / "pagestore")
    for name in ("good", "bad"):
        upload_round(settings, store, name=name)
    key = named_key(s3, settings, "bad", f"lsn_index/{INDEX_FILE}")
    s3.client().delete_object(Bucket=settings.bucket, Key=key)

    (tmp_path / "elsewhere").mkdir()
    histories = RemoteHistories(tmp_path / "elsewhere")
    failed: dict[str, NeonError] = {}
    assert histories.attach(settings, failed) == ["good"]
    assert list(failed) == ["bad"] and isinstance(failed["bad"], CorruptData)
    assert key in str(failed["bad"])
    assert sorted(histories.mirrors) == ["good"]
    mirrors = tmp_path / "elsewhere"
    assert not [p for p in mirrors.rglob("*") if "/bad/" in str(p) or p.name == "bad"]
    # Without `failed`, the error itself; a restarted pageserver knows only the good area.
    again = RemoteHistories(tmp_path / "elsewhere")
    assert sorted(again.mirrors) == ["good"]
    with pytest.raises(CorruptData, match="names it"):
        again.attach(settings)
