"""The index's fence (pageserver/remote/index_fence.py) on both object stores: S3 (moto's server
on loopback) and a remote pageserver's blob service (a real ProtoServer on loopback).

The races are made deterministic by a hook on the stale writer's store, run inside its index
PUT, after its lease check passed and before the PUT goes out: there the new owner takes the
lease over and uploads its index, as a pageserver on another machine would at that moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest

from pageserver.remote import lease as leases
from pageserver.remote import uploader as uploader_module
from pageserver.remote.index import INDEX_NAME, RemoteIndex, RemoteObject, decode_index
from pageserver.remote.index_fence import FencedIndex, IndexChanged
from pageserver.remote.local_objects import key_generation, object_key
from pageserver.remote.object_service import blob_handlers
from pageserver.remote.objects import ObjectStore, PreconditionFailed, open_bucket
from pageserver.remote.proto_objects import PAGESERVER_NAME
from pageserver.remote.settings import RemoteSettings
from pageserver.remote.uploader import AreaUploader
from pageserver.storage.values import WalDelta
from proto.errors import Conflict, Unavailable
from proto.server import Handler, ProtoServer, RequestContext
from tests.pageserver.remote import test_proto_objects as proto_test
from tests.pageserver.remote.test_remote_history import (
    make_node,
    page,
    upload_round,
    uploader,
    wait_for,
)
from tests.s3d import ACCESS_KEY, REGION, SECRET_KEY, MotoS3, moto_s3

PREFIX = "hist/pitr/area"
INDEX = f"{PREFIX}/{INDEX_NAME}"
LEASE = f"{PREFIX}/{leases.LEASE_NAME}"

Hook = Callable[[str, bytes], Awaitable[None]]


@pytest.fixture(scope="module")
def s3() -> Iterator[MotoS3]:
    with moto_s3() as server:
        yield server


@contextlib.contextmanager
def blob_server(root: Path, handlers: dict[str, Handler] | None = None) -> Iterator[int]:
    """A remote pageserver's blob service in a thread of its own (its own event loop, as a
    daemon's): the uploaders under test run their loops in their threads. `handlers`: other
    methods than blob_handlers(root)'s (an older version's)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="blob-server", daemon=True)
    thread.start()

    async def start() -> ProtoServer:
        server = ProtoServer(
            handlers or blob_handlers(root), token=proto_test.TOKEN,
            server_name=f"{PAGESERVER_NAME} test",
        )  # fmt: skip
        await server.start("127.0.0.1", 0)
        return server

    server = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield server.port
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture(params=["s3", "remote"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RemoteSettings]:
    """An s3 storage (a fresh bucket) or a remote one (a fresh blob service), prefix 'hist'."""
    if request.param == "s3":
        s3: MotoS3 = request.getfixturevalue("s3")
        secret = tmp_path / "secret"
        secret.write_text(SECRET_KEY)
        yield RemoteSettings(
            "s3tank", s3.new_bucket(), "hist", s3.endpoint, REGION, ACCESS_KEY, str(secret)
        )
        return
    with blob_server(tmp_path / "objects") as port:
        yield replace(proto_test.settings(tmp_path, port), prefix="hist")


def run(settings: RemoteSettings, work: Callable[[ObjectStore], Awaitable[Any]]) -> Any:
    async def go() -> Any:
        async with open_bucket(settings) as bucket:
            return await work(bucket)

    return asyncio.run(go())


def bucket_index(settings: RemoteSettings) -> RemoteIndex:
    async def read(bucket: ObjectStore) -> bytes:
        return await bucket.get(INDEX)

    return decode_index(run(settings, read), INDEX)


def hook_store(
    monkeypatch: pytest.MonkeyPatch, *, put: Hook | None = None,
    listing: Callable[[], Awaitable[None]] | None = None,
) -> None:  # fmt: skip
    """The uploaders' stores run `put(key, body)` inside each PUT before it goes out, and
    `listing()` before each listing of keys (the sweep's)."""
    real_open = uploader_module.open_bucket

    def hooked(settings: RemoteSettings) -> ObjectStore:
        store = real_open(settings)
        real_put, real_list = store.put, store.list_keys

        async def hooked_put(key: str, body: bytes, **conditions: Any) -> Any:
            if put is not None:
                await put(key, body)
            return await real_put(key, body, **conditions)

        async def hooked_list(prefix: str) -> AsyncIterator[tuple[str, int]]:
            if listing is not None:
                await listing()
            async for entry in real_list(prefix):
                yield entry

        # The instance's methods, not the class's: only the uploaders' stores are hooked.
        setattr(store, "put", hooked_put)  # noqa: B010
        setattr(store, "list_keys", hooked_list)  # noqa: B010
        return store

    monkeypatch.setattr(uploader_module, "open_bucket", hooked)


def grow(store: Any, lsn: int) -> None:
    """New history at `lsn`: a layer flushed, so the uploader has a round to run."""
    timeline = store.timeline
    timeline.put_batch([(page(b), lsn, WalDelta(b"d")) for b in range(2)])
    timeline.advance_last_record_lsn(lsn, None)
    timeline.freeze_and_flush()


def test_conditional_puts_name_the_version(settings: RemoteSettings) -> None:
    async def work(bucket: ObjectStore) -> None:
        first = await bucket.put(INDEX, b"one", if_absent=True)
        assert await bucket.get_tagged(INDEX) == (b"one", first)
        with pytest.raises(PreconditionFailed):
            await bucket.put(INDEX, b"two", if_absent=True)
        second = await bucket.put(INDEX, b"two", if_match=first)
        assert second != first and await bucket.get_tagged(INDEX) == (b"two", second)
        with pytest.raises(PreconditionFailed):  # replaced since that version
            await bucket.put(INDEX, b"three", if_match=first)
        assert await bucket.get(INDEX) == b"two"
        await bucket.delete(INDEX)
        with pytest.raises(PreconditionFailed):  # gone since that version
            await bucket.put(INDEX, b"four", if_match=second)
        assert await bucket.get_tagged(INDEX) is None

    run(settings, work)


def test_an_older_remote_pageserver_that_ignores_if_match_is_refused(tmp_path: Path) -> None:
    """Review M2: a remote pageserver older than the fence ignores `if_match` and writes, so a
    conditional index write there fences nothing. The first conditional write asks first
    (a probe with a version no object has): such a server is refused in one clear error,
    the index unchanged, no probe left. Fails where the write went through unchecked."""
    root = tmp_path / "objects"
    newer = blob_handlers(root)

    async def older_put(ctx: RequestContext) -> Any:  # before the fence: if_match unknown
        ctx.params.pop("if_match", None)
        return await newer["blob.put"](ctx)

    with blob_server(root, {**newer, "blob.put": older_put}) as port:
        settings = replace(proto_test.settings(tmp_path, port), prefix="hist")

        async def work(bucket: ObjectStore) -> None:
            first = await bucket.put(INDEX, b"one")
            with pytest.raises(Conflict, match="does not check If-Match"):
                await bucket.put(INDEX, b"two", if_match=first)
            assert await bucket.get(INDEX) == b"one"
            assert [key async for key, _ in bucket.list_keys(PREFIX)] == [INDEX]

        run(settings, work)


def test_a_stale_writer_past_its_lease_check_never_replaces_the_new_owners_index(
    settings: RemoteSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_node(tmp_path / "pagestore")
    taken: list[str] = []

    async def takeover_meanwhile(key: str, body: bytes) -> None:
        if key == INDEX and armed.is_set() and not taken:
            taken.append(await new_owner_takes_over(settings))

    armed = threading.Event()
    hook_store(monkeypatch, put=takeover_meanwhile)
    stale = uploader(settings, store, owner="first")
    stale.start()
    try:
        assert stale.wait_uploaded(0x200, 20)
        armed.set()
        grow(store, 0x300)
        stale.poke()
        wait_for(lambda: stale.status().last_error is not None or stale.status().remote_lsn > 0x200)
        assert len(taken) == 1
        assert bucket_index(settings).generation == 2  # the new owner's, not replaced
        error = str(stale.status().last_error)
        assert "written by another pageserver" in error and "uploads stopped" in error
        assert stale.fatal is not None
        assert stale.status().remote_lsn == 0x200  # its index never landed
    finally:
        stale.stop()
    assert bucket_index(settings).disk_consistent_lsn == 0x200
    assert_the_new_index_whole(settings)


def test_a_put_whose_answer_was_lost_is_recognized_as_ours_when_retried(
    settings: RemoteSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_node(tmp_path / "pagestore")
    lost: list[bytes] = []

    async def answer_lost(key: str, body: bytes) -> None:
        if key == INDEX and len(lost) < 2 and body not in lost:
            # The PUT reaches the bucket; its answer does not reach us.
            async with open_bucket(settings) as other:
                await other.put(key, body)
            lost.append(body)
            raise Unavailable("the connection dropped before the answer")

    hook_store(monkeypatch, put=answer_lost)
    up = uploader(settings, store, owner="me")
    up.start()
    try:
        # The first index (If-None-Match: *, none was there) and the next (If-Match).
        assert up.wait_uploaded(0x200, 20)
        first = bucket_index(settings)
        grow(store, 0x300)
        up.poke()
        assert up.wait_uploaded(0x300, 20)
        status = up.status()
        assert len(lost) == 2 and status.retries_total >= 2
        assert up.fatal is None and status.last_error is None
        second = bucket_index(settings)
        assert second.disk_consistent_lsn == 0x300
    finally:
        up.stop()
    # Each object's key names the generation that uploaded it; one the index had keeps its key.
    assert {key_generation(o.key) for o in second.objects.values()} == {1}
    segment = "wal/000000010000000000000000"
    assert second.objects[segment].key == first.objects[segment].key
    assert len(set(second.objects) - set(first.objects)) == 1  # the new layer


async def new_owner_takes_over(settings: RemoteSettings) -> str:
    """Another pageserver takes the area over, uploads an object of its own and an index
    naming it (the old one's with it); the new object's key."""
    async with open_bucket(settings) as other:  # another machine's pageserver
        mine = await leases.acquire(other, LEASE, "second", "area", takeover=True)
        current = decode_index(await other.get(INDEX), INDEX)
        data = b"the new owner's"
        sha = hashlib.sha256(data).hexdigest()
        path = "wal/000000010000000000000002"
        key = object_key(path, sha, mine.generation)
        await other.put(f"{PREFIX}/{key}", data)
        objects = {**current.objects, path: RemoteObject(key, len(data), sha)}
        index = replace(current, generation=mine.generation, objects=objects)
        await other.put(INDEX, index.encode())
        return key


def assert_the_new_index_whole(settings: RemoteSettings) -> None:
    async def check(bucket: ObjectStore) -> None:
        index = decode_index(await bucket.get(INDEX), INDEX)
        assert index.generation == 2
        for obj in index.objects.values():
            assert hashlib.sha256(await bucket.get(f"{PREFIX}/{obj.key}")).hexdigest() == obj.sha256

    run(settings, check)


def stale_uploader(store: Any, settings: RemoteSettings) -> AreaUploader:
    """The first pageserver's uploader, one upload at a time (its order is the plan's)."""
    area = asdict(store.history.pitr.get("area"))
    return AreaUploader(settings, area, "pgdata1", lambda: store, "first", parallel=1)


def test_a_stale_writers_sweep_after_an_aborted_round_stops_at_the_lease(
    settings: RemoteSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_node(tmp_path / "pagestore")
    theirs: list[str] = []
    new_layers: list[str] = []

    async def takeover_then_gc(key: str, body: bytes) -> None:
        if not new_layers or theirs or not any(name in key for name in new_layers):
            return
        theirs.append(await new_owner_takes_over(settings))
        # Meanwhile GC removes the next layer this round was to upload: the round aborts,
        # and the stale writer would sweep the orphans before planning again.
        timeline = store.timeline
        for layer in list(timeline.layer_map().layers()):
            if layer.name.file_name in new_layers and layer.name.file_name not in key:
                timeline.replace_layers([], [layer])

    hook_store(monkeypatch, put=takeover_then_gc)
    stale = stale_uploader(store, settings)
    stale.start()
    try:
        assert stale.wait_uploaded(0x200, 20)
        before = {layer.name.file_name for layer in store.timeline.layer_map().layers()}
        grow(store, 0x300)
        grow(store, 0x400)
        new_layers.extend(
            layer.name.file_name
            for layer in store.timeline.layer_map().layers()
            if layer.name.file_name not in before
        )
        assert len(new_layers) == 2
        stale.poke()
        wait_for(lambda: stale.status().last_error is not None or stale.swept_total > 0)
        assert len(theirs) == 1 and stale.swept_total == 0
        assert "written by another pageserver" in str(stale.status().last_error)
    finally:
        stale.stop()
    assert_the_new_index_whole(settings)


def indexed_with_an_orphan(
    settings: RemoteSettings, tmp_path: Path, data: bytes
) -> tuple[Any, str]:
    """A node whose first pageserver uploaded a round (its index of generation 1), and an
    object of that generation the index does not name: (the node's store, its key)."""
    store = make_node(tmp_path / "pagestore")
    upload_round(settings, store, owner="first")
    orphan = f"{PREFIX}/{object_key('wal/000000010000000000000009', '0' * 64, 1)}"
    run(settings, lambda bucket: bucket.put(orphan, data))
    return store, orphan


def test_a_sweep_overtaken_by_a_takeover_leaves_the_new_generations_objects(
    settings: RemoteSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _orphan = indexed_with_an_orphan(settings, tmp_path, b"left by a killed round")
    theirs: list[str] = []

    async def takeover_after_the_check() -> None:
        if not theirs:
            theirs.append(await new_owner_takes_over(settings))

    # Restarted, the first sweeps at its start: the lease is still its own when it checks,
    # then taken over before it lists the keys.
    hook_store(monkeypatch, listing=takeover_after_the_check)
    stale = stale_uploader(store, settings)
    stale.start()
    try:
        wait_for(lambda: stale.swept_total > 0)
        grow(store, 0x300)  # its next index: refused
        stale.poke()
        wait_for(lambda: stale.status().last_error is not None)
        assert len(theirs) == 1 and stale.swept_total == 1  # its own generation's orphan only
        assert "written by another pageserver" in str(stale.status().last_error)
    finally:
        stale.stop()
    assert_the_new_index_whole(settings)


def test_a_new_owner_sweeps_nothing_before_its_own_index_is_in(
    settings: RemoteSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review H1 (session 25): after a takeover, a stale writer's index PUT past its lease
    check may still land on the version the new owner read, naming objects of its round the
    new owner took for orphans. So the new owner sweeps nothing before its own index is in
    (its If-Match refuses every such PUT from then on). Fails where it swept at its start:
    the stale round's object was gone when the new owner's first index went out."""
    store, in_flight = indexed_with_an_orphan(
        settings, tmp_path, b"the stale round's, its index unsent"
    )
    run(settings, lambda bucket: leases.acquire(bucket, LEASE, "second", "area", takeover=True))
    seen: list[bool] = []

    async def at_the_first_index(key: str, body: bytes) -> None:
        if key == INDEX and not seen:
            async with open_bucket(settings) as bucket:
                seen.append(await bucket.get_if_exists(in_flight) is not None)

    hook_store(monkeypatch, put=at_the_first_index)
    area = asdict(store.history.pitr.get("area"))
    new = AreaUploader(settings, area, "pgdata1", lambda: store, "second", parallel=1)
    new.start()
    try:
        wait_for(lambda: bool(seen) or new.fatal is not None)
        assert seen == [True], new.fatal
        wait_for(lambda: new.swept_total > 0)  # swept once its own index is in
    finally:
        new.stop()
    assert run(settings, lambda bucket: bucket.get_if_exists(in_flight)) is None
    assert decode_index(run(settings, lambda bucket: bucket.get(INDEX)), INDEX).generation == 2


def index(generation: int, lsn: str) -> bytes:
    """An index body of `generation` at disk_consistent_lsn `lsn` (one timeline, no objects)."""
    timelines = {"aa": {"disk_consistent_lsn": lsn}}
    return RemoteIndex(
        generation, {}, "n1", "pgdata1", {"timeline_id": "aa"}, timelines, {},
    ).encode()  # fmt: skip


def test_what_a_refused_index_put_finds_decides_it(settings: RemoteSettings) -> None:
    async def work(bucket: ObjectStore) -> None:
        old = await leases.acquire(bucket, LEASE, "first", "area")
        await bucket.put(INDEX, index(1, "0/100"))
        mine = await leases.acquire(bucket, LEASE, "second", "area", takeover=True)
        fence = FencedIndex(bucket, PREFIX, mine, "area")
        assert (await fence.read()) is not None
        # A stale writer of generation 1 got in before our first index: planned again
        # from its index (what to upload and delete is decided against it), then ours.
        await bucket.put(INDEX, index(1, "0/180"))
        with pytest.raises(IndexChanged) as changed:
            await fence.write(index(2, "0/200"))
        assert changed.value.found is not None and changed.value.found.generation == 1
        await fence.write(index(2, "0/200"))
        assert await bucket.get(INDEX) == index(2, "0/200")
        # The index gone: planned again from nothing, then created (If-None-Match: *).
        await bucket.delete(INDEX)
        with pytest.raises(IndexChanged) as changed:
            await fence.write(index(2, "0/300"))
        assert changed.value.found is None
        await fence.write(index(2, "0/300"))
        # An index of a higher generation is never replaced.
        await bucket.put(INDEX, index(3, "0/400"))
        with pytest.raises(leases.LeaseLost, match="generation 3"):
            await fence.write(index(2, "0/500"))
        assert await bucket.get(INDEX) == index(3, "0/400")
        # The stale writer's fence: its lease check refuses it first.
        stale = FencedIndex(bucket, PREFIX, old, "area")
        with pytest.raises(leases.LeaseLost, match="written by another pageserver"):
            await stale.write(index(1, "0/600"))

    run(settings, work)


def test_an_index_of_our_own_generation_from_another_uploader_is_planned_again(
    settings: RemoteSettings,
) -> None:
    """Review L1 (session 25): two uploaders of one pageserver hold one lease (an earlier
    uploader of the area, stopped, whose PUT in flight lands after the next one read the
    index). Its index is of our generation but not our bytes: nothing was taken over, so
    the round is planned again from it, then ours is written. Fails where that was a fatal
    LeaseLost ("replaced by another writer of generation 1 (ours 1)")."""

    async def work(bucket: ObjectStore) -> None:
        lease = await leases.acquire(bucket, LEASE, "me", "area")
        earlier = FencedIndex(bucket, PREFIX, lease, "area")
        later = FencedIndex(bucket, PREFIX, lease, "area")
        assert await earlier.read() is None and await later.read() is None
        await earlier.write(index(1, "0/100"))  # the late PUT lands after `later` read
        with pytest.raises(IndexChanged, match="another uploader of this pageserver") as changed:
            await later.write(index(1, "0/200"))
        found = changed.value.found
        assert found is not None and found.generation == 1
        assert found.timelines["aa"]["disk_consistent_lsn"] == "0/100"
        await later.write(index(1, "0/200"))  # planned again from it: written
        assert await bucket.get(INDEX) == index(1, "0/200")
        assert (await bucket.get(LEASE)) == lease.encode()  # the lease untouched

    run(settings, work)
