"""A pageserver as another pageserver's bucket: the `blob.*` proto methods that keep objects
under ``<workdir>/objects/`` (issue 13 item 3, a remote storage holding PITR history).

The calling pageserver's uploader and mirror (pageserver/remote/uploader.py, mirror.py) use
the same five operations as on S3 (put, get, head, delete, list), through
pageserver/remote/proto_objects.py, so the history kept here has the bucket's layout, index,
checksums, ordering and lease: nothing of it is interpreted on this side but the names of
the objects that may be written conditionally (below). Each object is written crash-safe (a
temporary name, fsync, rename: durable_files), so a reader sees it whole or not at all, as
with S3. Conditional puts are checked and written under one lock: with
`if_absent` (the lease's If-None-Match: *) refused with AlreadyExists when the object exists,
with `if_match` (the index's fence: pageserver/remote/index_fence.py) refused with Conflict
unless the object's bytes still hash to that ETag (`etag`, the SHA-256 of the bytes).
Only an index or a lease object (and a client's fence probe beside one:
proto_objects._check_fence) is written conditionally: no version is kept beside an object, so
checking one hashes the stored bytes under the lock, and a condition on a layer would let any
token holder stall every area's index and lease writes while a large object is read
(review L2, session 25). Any other key with a condition is refused before anything is read.

Keys are relative paths: components that are empty, `.`, `..`, hidden (temporary files start
with a dot nowhere, but a key may not name one) or contain NUL are refused, so no key leaves
the directory.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path
from typing import Any

from durable_files import TEMP_SUFFIX, write_chunks_durably
from pageserver.remote.index import INDEX_NAME
from pageserver.remote.lease import LEASE_NAME
from proto.errors import AlreadyExists, Conflict, InvalidArgument, NotFound
from proto.server import Handler, RequestContext

OBJECTS_DIR = "objects"
CHUNK = 1 << 20
FENCE_PROBE = ".fence-probe"
"""The suffix of the key a client probes the fence with, beside an index's."""
VERSIONED = (INDEX_NAME, LEASE_NAME)
"""The objects written conditionally: the only ones whose version is ever checked."""


def _key(ctx: RequestContext, name: str = "key", *, prefix: bool = False) -> str:
    key = ctx.params.get(name)
    if not isinstance(key, str):
        raise InvalidArgument(f"{ctx.method} needs a {name}")
    parts = key.rstrip("/").split("/") if prefix else key.split("/")
    if prefix and key in ("", "/"):
        return ""
    if any(p in ("", ".", "..") or p.startswith(".") or "\0" in p for p in parts) or (
        key.endswith(TEMP_SUFFIX)
    ):
        raise InvalidArgument(f"invalid object key {key!r}")
    return key


def _conditions(ctx: RequestContext, key: str) -> tuple[bool, str | None]:
    """A put's (if_absent, if_match), refused for an object whose version is never kept."""
    if_absent, if_match = bool(ctx.params.get("if_absent")), ctx.params.get("if_match")
    if if_match is not None and not isinstance(if_match, str):
        raise InvalidArgument("blob.put: if_match is an ETag (a SHA-256 in hex)")
    name = key.rpartition("/")[2].removesuffix(FENCE_PROBE)
    if (if_absent or if_match is not None) and name not in VERSIONED:
        raise InvalidArgument(
            f"blob.put: object {key} cannot be written conditionally: only an index or a "
            f"lease ({', '.join(VERSIONED)}) is"
        )
    return if_absent, if_match


def etag(body: bytes) -> str:
    """An object's version, as S3's ETag names one: here the SHA-256 of its bytes."""
    return hashlib.sha256(body).hexdigest()


def _etag_of(path: Path) -> str | None:
    try:
        return etag(path.read_bytes())
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def blob_handlers(root: Path) -> dict[str, Handler]:
    """The `blob.*` methods over the objects under `root` (made on the first put)."""
    put_lock = asyncio.Lock()

    def path(key: str) -> Path:
        return root / key

    async def put(ctx: RequestContext) -> Any:
        key = _key(ctx)
        if_absent, if_match = _conditions(ctx, key)
        body = b"".join([chunk async for chunk in ctx.upload()])
        target = path(key)

        def write() -> int:
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            return write_chunks_durably(target, (body,))

        if if_absent or if_match is not None:
            async with put_lock:
                if if_absent and target.exists():
                    raise AlreadyExists(f"object {key} exists already")
                if if_match is not None and await asyncio.to_thread(_etag_of, target) != if_match:
                    raise Conflict(f"object {key} is not the version If-Match names")
                return await asyncio.to_thread(write)
        return await asyncio.to_thread(write)

    async def get(ctx: RequestContext) -> Any:
        """The object, or `length` bytes of it from `offset` (a ranged GET)."""
        key = _key(ctx)
        offset, length = ctx.params.get("offset", 0), ctx.params.get("length")
        if (
            not isinstance(offset, int)
            or offset < 0
            or not (length is None or (isinstance(length, int) and length >= 0))
        ):
            raise InvalidArgument("blob.get: offset and length are byte counts")
        try:
            f = open(path(key), "rb")  # noqa: SIM115 (read chunk by chunk below)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"no object {key}") from None
        left = length
        with f:
            f.seek(offset)
            while left is None or left > 0:
                want = CHUNK if left is None else min(CHUNK, left)
                chunk = await asyncio.to_thread(f.read, want)
                if not chunk:
                    break
                await ctx.send(chunk)
                if left is not None:
                    left -= len(chunk)
        return None

    async def size(ctx: RequestContext) -> Any:
        target = path(_key(ctx))
        return target.stat().st_size if target.is_file() else None

    async def delete(ctx: RequestContext) -> Any:
        target = path(_key(ctx))
        await asyncio.to_thread(target.unlink, missing_ok=True)
        return None

    async def list_dirs(ctx: RequestContext) -> Any:
        directory = path(_key(ctx, "prefix", prefix=True))
        if not directory.is_dir():
            return []
        return sorted(p.name for p in directory.iterdir() if p.is_dir())

    async def list_keys(ctx: RequestContext) -> Any:
        prefix = _key(ctx, "prefix", prefix=True)

        def walk() -> list[list[Any]]:
            found = []
            for dirpath, _dirs, files in os.walk(path(prefix)):
                for name in files:
                    if name.endswith(TEMP_SUFFIX):
                        continue
                    full = Path(dirpath) / name
                    found.append([str(full.relative_to(root)), full.stat().st_size])
            return sorted(found)

        return await asyncio.to_thread(walk)

    return {
        "blob.put": put,
        "blob.get": get,
        "blob.size": size,
        "blob.delete": delete,
        "blob.list_dirs": list_dirs,
        "blob.list_keys": list_keys,
    }
