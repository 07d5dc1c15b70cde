"""The background uploader of one PITR area on an s3 storage (Neon's RemoteTimelineClient).

A thread with its own event loop. Whenever the node's history changed (a flush wrote a
manifest, GC removed files: `poke()`), and at least every POLL seconds, it compares what the
bucket's index names with what the local history holds (pageserver/remote/local_objects.py)
and runs one round of the upload queue: the missing objects, then the new index, then the
deletion of what the new index no longer names. A round that fails is run again, planned
anew; after a restart (even a SIGKILL) the first round starts from the index in the bucket,
so the uploads finish and what was already uploaded is not sent again. Objects no index names
(orphans of a killed or aborted round) are deleted before the first round and after an
aborted one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from pageserver.history.node_store import NodeStore
from pageserver.remote import lease as leases
from pageserver.remote.eviction import LayerCache
from pageserver.remote.index import RemoteIndex
from pageserver.remote.index_fence import FencedIndex, IndexChanged
from pageserver.remote.local_objects import OBJECTS, HashCache, key_generation, plan_index
from pageserver.remote.objects import ObjectStore, open_bucket
from pageserver.remote.settings import RemoteSettings
from pageserver.remote.upload_queue import DEFAULT_PARALLEL, QueueStopped, RoundAborted, UploadQueue
from pageserver.storage.manifest import MANIFEST_NAME, read_manifest
from proto.errors import NeonError

log = logging.getLogger(__name__)

POLL = 1.0
"""Seconds between looks at the local history without a poke."""
WAL_REFRESH = 15.0
"""A round only for WAL and LSN index growth (no new layers) at most this often: the
partial segment is uploaded whole each time."""
RETRY_ROUND = 2.0


def area_prefix(settings: RemoteSettings, area: str) -> str:
    return settings.key("pitr", area)


@dataclass(frozen=True, slots=True)
class UploadStatus:
    area: str
    storage: str
    node_id: str
    generation: int
    local_lsn: int
    """The node's durable page history (disk_consistent_lsn of its timeline)."""
    remote_lsn: int
    """The same in the bucket's index: extractable from the bucket alone."""
    lag_bytes: int
    """local_lsn - remote_lsn: WAL whose pages are not in the bucket yet."""
    pending_objects: int
    pending_bytes: int
    remote_bytes: int
    uploaded_bytes_total: int
    retries_total: int
    last_error: str | None
    last_upload_at: float | None
    cache_limit_bytes: int | None = None
    cache_resident_bytes: int = 0
    evicted_layers: int = 0
    fetched_bytes_total: int = 0


class AreaUploader:
    def __init__(
        self, settings: RemoteSettings, area: dict[str, Any], pgdata: str,
        store: Callable[[], NodeStore], owner: str, *, parallel: int = DEFAULT_PARALLEL,
    ) -> None:  # fmt: skip
        self.settings = settings
        self.area = area
        self.name = str(area["name"])
        self.pgdata = pgdata
        self._store = store
        self.owner = owner
        self.parallel = parallel
        self.prefix = area_prefix(settings, self.name)
        self.remote: RemoteIndex | None = None
        self._hashes = HashCache()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._queue: UploadQueue | None = None
        self._lease: leases.Lease | None = None
        self._last_round = 0.0
        self._last_upload_at: float | None = None
        self._error: str | None = None
        self.fatal: str | None = None
        """Why uploading stopped for good (the lease went to another pageserver)."""
        self._idle = threading.Event()
        self.swept_total = 0
        """Orphaned objects deleted from the bucket (pageserver/remote/uploader.py _sweep)."""
        self.cache = LayerCache(settings, self.prefix, store, lambda: self.remote, self._hashes)
        """Evicts uploaded layers beyond settings.local_cache; fetches them back when read."""

    @property
    def what(self) -> str:
        return f"PITR area {self.name!r} in {self.settings.url}"

    # --- control (any thread) --------------------------------------------------------------

    def start(self) -> None:
        self.cache.register()
        self._thread = threading.Thread(target=self._run, name=f"upload-{self.name}", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        """The local history changed: look now."""
        self._idle.clear()
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.cache.unregister()

    def wait_uploaded(self, lsn: int, timeout: float) -> bool:
        """Until the bucket's index reaches `lsn` (tests, `pitr sync`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.remote is not None and self.remote.disk_consistent_lsn >= lsn:
                return True
            self.poke()
            time.sleep(0.1)
        return False

    def status(self) -> UploadStatus:
        queue = self._queue
        local = 0
        with contextlib.suppress(NeonError):
            local = self._store().timeline.disk_consistent_lsn
        remote = self.remote.disk_consistent_lsn if self.remote is not None else 0
        cache = None
        with contextlib.suppress(NeonError, OSError):
            cache = self.cache.status()
        return UploadStatus(
            area=self.name,
            storage=self.settings.storage,
            node_id=str(self.area["node_id"]),
            generation=self._lease.generation if self._lease else 0,
            local_lsn=local,
            remote_lsn=remote,
            lag_bytes=max(0, local - remote),
            pending_objects=queue.status.pending_objects if queue else 0,
            pending_bytes=queue.status.pending_bytes if queue else 0,
            remote_bytes=self.remote.total_bytes if self.remote is not None else 0,
            uploaded_bytes_total=queue.status.uploaded_bytes_total if queue else 0,
            retries_total=queue.status.retries_total if queue else 0,
            last_error=self.fatal or (queue.status.last_error if queue else None) or self._error,
            last_upload_at=self._last_upload_at,
            cache_limit_bytes=self.settings.local_cache,
            cache_resident_bytes=cache.resident_bytes if cache else 0,
            evicted_layers=cache.evicted_layers if cache else 0,
            fetched_bytes_total=cache.fetched_bytes_total if cache else 0,
        )

    # --- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            log.exception("remote uploader of %s stopped", self.what)
            self.fatal = self.fatal or str(exc)

    async def _main(self) -> None:
        while not self._stop:
            try:
                async with open_bucket(self.settings) as bucket:
                    self._queue = UploadQueue(
                        bucket, parallel=self.parallel, stopped=lambda: self._stop
                    )
                    await self._serve(bucket)
                    return
            except leases.LeaseLost as exc:
                self.fatal = str(exc)
                log.error("%s", exc)
                return
            except QueueStopped:
                return
            except NeonError as exc:
                self._error = str(exc)
                log.warning("remote uploader of %s: %s", self.what, exc)
                await asyncio.to_thread(self._wake.wait, RETRY_ROUND)
                self._wake.clear()

    async def _serve(self, bucket: ObjectStore) -> None:
        key = f"{self.prefix}/{leases.LEASE_NAME}"
        self._lease = await leases.acquire(bucket, key, self.owner, self.what)
        fence = FencedIndex(bucket, self.prefix, self._lease, self.what)
        self.remote = await fence.read()
        self._error = None
        sweep_due = True  # a killed round of an earlier run may have left orphans
        # No sweep before this generation's own index is in the bucket: until then a stale
        # writer's index PUT, past its lease check, may still land (the version it read is
        # the one this writer read) and name objects of its generation the sweep would have
        # deleted as orphans (review H1, session 25). Once ours is written, its If-Match
        # refuses every such PUT.
        own_index = self.remote is not None and self.remote.generation == self._lease.generation
        while not self._stop:
            self._wake.clear()
            if sweep_due and own_index:
                await self._sweep(bucket)
                sweep_due = False
            try:
                ran = await self._round(bucket, fence)
            except (RoundAborted, FileNotFoundError) as exc:
                if isinstance(exc, IndexChanged):
                    self.remote = exc.found
                log.debug("remote: round of %s planned again: %s", self.name, exc)
                sweep_due = True  # what the aborted round uploaded may be needed no more
                continue
            own_index = own_index or ran  # a round that ran wrote this generation's index
            if not ran:
                self._idle.set()
                await asyncio.to_thread(self._wake.wait, POLL)

    async def _sweep(self, bucket: ObjectStore) -> None:
        """Delete the orphans: objects under the area's objects/ that the bucket's index does
        not name, left by a round killed (or aborted) after some uploads and before its index,
        or after its index and before its deletions. Run between rounds, with the lease: no
        upload of this area is in flight. Only those of this generation or an earlier one: a
        stale writer (its lease taken over since its check) never deletes what the new owner
        uploaded (pageserver/remote/local_objects.py)."""
        assert self._lease is not None
        await leases.check(bucket, f"{self.prefix}/{leases.LEASE_NAME}", self._lease, self.what)
        named = set() if self.remote is None else {
            f"{self.prefix}/{o.key}" for o in self.remote.objects.values()
        }  # fmt: skip
        mine = self._lease.generation
        orphans = [
            key async for key, _size in bucket.list_keys(f"{self.prefix}/{OBJECTS}/")
            if key not in named and key_generation(key) <= mine
        ]  # fmt: skip
        for key in orphans:
            await bucket.delete(key)
            self.swept_total += 1
        if orphans:
            log.info("remote: %s: deleted %d orphaned objects", self.what, len(orphans))

    def _layers_changed(self, store: NodeStore) -> bool:
        """Whether a manifest differs from the bucket's index (cheap: no hashing)."""
        if self.remote is None or store.state is None:
            return True
        if self.remote.timeline_id != store.state.timeline_id:
            return True
        root = store.history.root / "timelines"
        for timeline_id, body in self.remote.timelines.items():
            path = root / timeline_id
            if not (path / MANIFEST_NAME).exists():
                return True
            if read_manifest(path).to_json_body() != body:
                return True
        return False

    async def _round(self, bucket: ObjectStore, fence: FencedIndex) -> bool:
        store = self._store()
        if store.state is None:
            return False
        due = time.monotonic() - self._last_round >= WAL_REFRESH
        if not due and not await asyncio.to_thread(self._layers_changed, store):
            return False
        assert self._lease is not None and self._queue is not None
        index, objects = await asyncio.to_thread(
            plan_index, store, self.area, self.pgdata, self._lease.generation, self._hashes,
            self.remote,
        )  # fmt: skip
        self._last_round = time.monotonic()
        old = self.remote
        if old is not None and replace(old, uploaded_at=0.0) == index:
            return False
        have = set() if old is None else {o.key for o in old.objects.values()}
        uploads = [o.upload(self.prefix) for o in objects if o.key not in have]
        keep = {o.key for o in index.objects.values()}
        deletions = [] if old is None else sorted(
            f"{self.prefix}/{o.key}" for o in old.objects.values() if o.key not in keep
        )  # fmt: skip
        index = replace(index, uploaded_at=time.time())
        body = index.encode()
        await self._queue.run_round(uploads, lambda: fence.write(body), deletions)
        self.remote = index
        self._last_upload_at = time.time()
        try:
            await asyncio.to_thread(self.cache.enforce)
        except (NeonError, OSError) as exc:  # the uploads go on; the next round tries again
            log.warning("remote: local cache of %s: %s", self.what, exc)
        return True
