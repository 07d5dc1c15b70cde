"""The lease object: only one pageserver writes a history in the bucket.

``<area prefix>/lease.json`` holds ``{"owner": <pageserver id>, "generation": N}``. The first
writer creates it with a conditional put (If-None-Match: *), so of two pageservers creating
it at once one is refused; a pageserver that finds another owner's lease is refused with the
owner's name. A takeover (by another pageserver, after a disaster) replaces the lease only if
it is still the version it read (If-Match), so each generation has one owner. Like Neon's
generations, the number grows with every takeover and is written into each index.

The lease alone does not fence the old writer: it reads the lease (`check`) before each
index upload, but a takeover may land between that read and the PUT. The fence is the
index's own conditional PUT (pageserver/remote/index_fence.py): a writer replaces the index
only if it is still the version it last read or wrote, and a refusal is resolved by reading
the lease (LeaseLost when it is no longer ours) and the index: a stale writer never replaces
the index of the new one.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from durable_files import write_file_durably
from pageserver.remote.objects import ObjectStore, PreconditionFailed
from proto.errors import Conflict, CorruptData

LEASE_NAME = "lease.json"


class LeaseLost(Conflict):
    """Another pageserver holds the lease now."""


@dataclass(frozen=True, slots=True)
class Lease:
    owner: str
    generation: int
    host: str = ""
    taken_at: float = 0.0

    def encode(self) -> bytes:
        doc = {
            "owner": self.owner, "generation": self.generation, "host": self.host,
            "taken_at": self.taken_at,
        }  # fmt: skip
        return json.dumps(doc).encode()


def pageserver_id(workdir: Path) -> str:
    """This pageserver's identity, made once and kept in its work directory."""
    path = workdir / "pageserver_id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        ident = uuid.uuid4().hex
        write_file_durably(path, ident.encode())
        return ident


def _decode(raw: bytes, where: str) -> Lease:
    try:
        doc = json.loads(raw)
        return Lease(
            str(doc["owner"]), int(doc["generation"]), str(doc.get("host", "")),
            float(doc.get("taken_at", 0.0)),
        )  # fmt: skip
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptData(f"lease {where} is corrupt: {exc!r}") from None


async def read_lease(store: ObjectStore, key: str) -> Lease | None:
    raw = await store.get_if_exists(key)
    return None if raw is None else _decode(raw, key)


def _refusal(lease: Lease, what: str) -> Conflict:
    return Conflict(
        f"{what} is written by another pageserver ({lease.owner[:12]} on "
        f"{lease.host or 'an unknown host'}, generation {lease.generation}); "
        "only one pageserver may write a history: attach it read-only instead, or, if "
        "that pageserver is gone for good, take it over with `neon pitr create AREA --pg "
        "NODE --storage STORAGE --takeover` (the area then holds this node's history)"
    )


async def acquire(
    store: ObjectStore, key: str, owner: str, what: str, *, takeover: bool = False
) -> Lease:
    """Take the lease (or keep ours): refused when another pageserver holds it."""
    for _ in range(3):
        found = await store.get_tagged(key)
        current, version = (None, None) if found is None else (_decode(found[0], key), found[1])
        if current is not None and current.owner == owner:
            return current
        if current is not None and not takeover:
            raise _refusal(current, what)
        mine = Lease(
            owner, (current.generation if current else 0) + 1, socket.gethostname(), time.time()
        )
        try:
            await store.put(key, mine.encode(), if_absent=current is None, if_match=version)
        except PreconditionFailed:
            continue  # created or taken meanwhile: look at whose it is
        return mine
    raise Conflict(f"cannot take the lease of {what}: it keeps changing")


async def check(store: ObjectStore, key: str, mine: Lease, what: str) -> None:
    """Still ours? (before every index upload)"""
    current = await read_lease(store, key)
    if current is None or current.owner != mine.owner or current.generation != mine.generation:
        if current is None:
            raise LeaseLost(f"the lease of {what} is gone from the bucket; uploads stopped")
        raise LeaseLost(str(_refusal(current, what)) + "; uploads stopped")
