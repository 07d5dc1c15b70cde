"""The index's fence: a stale pageserver never replaces the index of the one that took its
history over.

Reading the lease before an index upload is not enough on its own: between that read and the
PUT the new owner may take the lease and upload its index (and a PUT retried after a backoff
widens the window to the backoff). So every index upload is conditional on the version of the
index this writer last read or wrote: S3's If-Match with its ETag (If-None-Match: * when
there was none), a remote pageserver's the same on the SHA-256 of the bytes
(pageserver/remote/object_service.py). A takeover's first index replaces that version, so the
old writer's next PUT is refused (412), whatever its lease check saw before.

A refused PUT is resolved, never retried blindly:
- the lease is no longer ours: LeaseLost (uploads stop; the new owner is named);
- the index holds our own bytes: our earlier PUT landed and only its answer was lost (then
  retried): it is ours, at the version read back;
- an index of a higher generation: LeaseLost, never replaced;
- an older generation's (a stale writer whose PUT got in before our first index), one of
  our own generation that is not our bytes (the lease check just passed, so it is another
  uploader of this same pageserver: an earlier uploader of the area, stopped, whose PUT in
  flight landed late; nothing was taken over), or none: IndexChanged, the round is planned
  again from what is there (what it uploads and deletes is decided against the index in
  the bucket, never against one that is gone).
"""

from __future__ import annotations

from pageserver.remote import lease as leases
from pageserver.remote.index import INDEX_NAME, RemoteIndex, decode_index
from pageserver.remote.objects import ObjectStore, PreconditionFailed
from pageserver.remote.upload_queue import RoundAborted


class IndexChanged(RoundAborted):
    """An older generation's index replaced ours, or our own generation's of another
    uploader of this pageserver (or none is left): plan again from it."""

    def __init__(self, message: str, found: RemoteIndex | None) -> None:
        super().__init__(message)
        self.found = found


class FencedIndex:
    """One area's index in the bucket, as this writer last read or wrote it."""

    def __init__(self, store: ObjectStore, prefix: str, lease: leases.Lease, what: str) -> None:
        self.store = store
        self.key = f"{prefix}/{INDEX_NAME}"
        self.lease_key = f"{prefix}/{leases.LEASE_NAME}"
        self.lease = lease
        self.what = what
        self.version: str | None = None
        """The ETag of the index we last read or wrote; None: there was none."""

    async def read(self) -> RemoteIndex | None:
        """The bucket's index (its version kept for the next write); None if there is none."""
        found = await self.store.get_tagged(self.key)
        self.version = None if found is None else found[1]
        return None if found is None else decode_index(found[0], self.key)

    async def write(self, body: bytes) -> None:
        """Replace the index with `body` unless another writer wrote it since we last did:
        then LeaseLost or IndexChanged (see the module's doc)."""
        await leases.check(self.store, self.lease_key, self.lease, self.what)
        try:
            self.version = await self.store.put(
                self.key, body, if_absent=self.version is None, if_match=self.version
            )
            return
        except PreconditionFailed:
            pass
        await leases.check(self.store, self.lease_key, self.lease, self.what)
        found = await self.store.get_tagged(self.key)
        if found is not None and found[0] == body:
            self.version = found[1]  # our own PUT, whose answer was lost
            return
        self.version = None if found is None else found[1]
        if found is None:
            raise IndexChanged(f"the index of {self.what} is gone from the bucket", None)
        index = decode_index(found[0], self.key)
        if index.generation > self.lease.generation:
            raise leases.LeaseLost(
                f"the index of {self.what} was replaced by another writer of generation "
                f"{index.generation} (ours {self.lease.generation}); uploads stopped"
            )
        whose = (
            "another uploader of this pageserver"
            if index.generation == self.lease.generation
            else f"a writer of an older generation ({index.generation})"
        )
        raise IndexChanged(f"{whose} replaced the index of {self.what}", index)
