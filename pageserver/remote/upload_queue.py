"""One round of the upload queue: objects, then the index naming them, then deletions.

Neon's rules (pageserver/src/tenant/upload_queue.rs, remote_timeline_client.rs), as this
queue applies them:

- uploads of objects run in parallel, at most `parallel` at once;
- the index is uploaded only after every upload before it succeeded (an index never names
  an object that is not complete in the bucket), and never two at once;
- an object is deleted only after an index that no longer names it is in the bucket (a
  reader of the index in the bucket finds every object it names).

Each request is retried with exponential backoff (BACKOFF_BASE doubling up to BACKOFF_MAX)
until it succeeds or the queue is stopped, its error kept as `last_error` meanwhile (a
missing bucket or refused credentials stay visible in `pg show`/`storage show` while the
pageserver keeps working locally). A file that vanished or changed before its upload (GC,
compaction) aborts the round: the next round plans again from the manifest.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from pageserver.remote.objects import ObjectStore
from proto.errors import Conflict, NeonError

log = logging.getLogger(__name__)

DEFAULT_PARALLEL = 4
BACKOFF_BASE = 0.2
BACKOFF_MAX = 10.0


class RoundAborted(NeonError):
    """The local state changed under the round (a file removed or rewritten): plan again."""


class QueueStopped(NeonError):
    """The queue was stopped while a request was being retried."""


@dataclass(frozen=True, slots=True)
class Upload:
    path: str
    """The object's path inside the history (for messages)."""
    key: str
    size: int
    sha256: str
    read: Callable[[], bytes]
    """The bytes to upload; FileNotFoundError when the file is gone."""


@dataclass(slots=True)
class QueueStatus:
    """What the queue is doing (read by the API; written by the queue's thread only)."""

    pending_objects: int = 0
    pending_bytes: int = 0
    uploaded_objects_total: int = 0
    uploaded_bytes_total: int = 0
    deleted_objects_total: int = 0
    retries_total: int = 0
    last_error: str | None = None
    last_error_at: float | None = None


class UploadQueue:
    def __init__(
        self, store: ObjectStore, *, parallel: int = DEFAULT_PARALLEL,
        stopped: Callable[[], bool] = lambda: False,
    ) -> None:  # fmt: skip
        self.store = store
        self.parallel = max(1, parallel)
        self.status = QueueStatus()
        self._stopped = stopped

    async def _retrying(self, what: str, request: Callable[[], Awaitable[object]]) -> None:
        delay = BACKOFF_BASE
        while True:
            if self._stopped():
                raise QueueStopped(f"stopped while trying to {what}")
            try:
                await request()
                return
            except (NeonError, OSError) as exc:
                if isinstance(exc, RoundAborted | FileNotFoundError | Conflict):
                    raise  # plan again, or (Conflict: the lease lost) stop: waiting cures none
                self.status.retries_total += 1
                self.status.last_error = f"{what}: {exc}"
                self.status.last_error_at = time.time()
                log.warning("remote: cannot %s (retry in %.1fs): %s", what, delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)

    async def _upload(self, item: Upload, slots: asyncio.Semaphore) -> None:
        async with slots:
            try:
                body = await asyncio.to_thread(item.read)
            except FileNotFoundError:
                raise RoundAborted(f"{item.path} was removed before its upload") from None
            if len(body) != item.size or hashlib.sha256(body).hexdigest() != item.sha256:
                raise RoundAborted(f"{item.path} changed before its upload")
            await self._retrying(f"upload {item.path}", lambda: self.store.put(item.key, body))
            self.status.pending_objects -= 1
            self.status.pending_bytes -= item.size
            self.status.uploaded_objects_total += 1
            self.status.uploaded_bytes_total += item.size

    async def run_round(
        self,
        uploads: Sequence[Upload],
        write_index: Callable[[], Awaitable[object]],
        deletions: Sequence[str],
    ) -> None:
        """Upload `uploads` (in parallel), then the index (`write_index`: the fenced put,
        pageserver/remote/index_fence.py; retried as a whole), then delete `deletions`."""
        self.status.pending_objects = len(uploads)
        self.status.pending_bytes = sum(u.size for u in uploads)
        slots = asyncio.Semaphore(self.parallel)
        tasks = [asyncio.ensure_future(self._upload(u, slots)) for u in uploads]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        # Every object the index names is complete in the bucket: now the index.
        await self._retrying("upload the index", write_index)
        self.status.last_error = None
        # The index in the bucket names none of these any more: now they may go.
        for key in deletions:
            await self._retrying(f"delete {key}", lambda k=key: self.store.delete(k))  # type: ignore[misc]
            self.status.deleted_objects_total += 1
