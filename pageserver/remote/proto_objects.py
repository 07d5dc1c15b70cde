"""The bucket operations of pageserver/remote/objects.py against another pageserver's
`blob.*` methods (pageserver/remote/object_service.py): a remote storage
(`neon storage attach -t remote -c url=neon://HOST:PORT -c token=...`) holds a PITR area's
history exactly as an s3 storage does.

Why objects and not the WAL: the uploader already ships what a PITR area needs (layer files,
archived WAL segments, the LSN index, then the index naming them with their SHA-256, under a
lease) with the ordering that keeps the far side consistent at every moment; making the far
side an object store reuses all of it, and the mirror's on-demand, verified download for
attaching the history elsewhere. The remote pageserver keeps the bytes and interprets none.

Each operation borrows a connection from a small pool (a proto connection carries one request
at a time; the upload queue runs several at once) and returns it when the request ended in
step; connection failures are Unavailable, so the queue retries them with its backoff.
An object's ETag here is the SHA-256 of its bytes (object_service.etag), which both sides
compute: a conditional put (`if_match`) is checked by the remote pageserver under its lock.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

from pageserver.remote.object_service import FENCE_PROBE, etag
from pageserver.remote.objects import NoSuchObject, ObjectStore, PreconditionFailed
from pageserver.remote.settings import RemoteSettings
from proto.client import Download, ProtoClient, tls_context
from proto.errors import (
    AlreadyExists,
    Conflict,
    InvalidArgument,
    NeonError,
    NotFound,
    ProtocolError,
)

CHUNK = 1 << 20
PAGESERVER_NAME = "pg-neon pageserver"
"""How a pageserver names itself in its hello (pageserver/daemon.py)."""
PEER = "the remote pageserver"
HINT = "is the pageserver of the storage's url running, and is the url right?"


class ProtoObjectStore(ObjectStore):
    """The `ObjectStore` interface over proto; open it with `async with`."""

    def __init__(self, settings: RemoteSettings) -> None:
        super().__init__(settings)
        parts = urlsplit(settings.endpoint or "")
        if not parts.hostname or parts.port is None:
            raise InvalidArgument(f"invalid remote pageserver url {settings.endpoint!r}")
        self._host, self._port = parts.hostname, parts.port
        self._idle: list[ProtoClient] = []
        self._ssl = tls_context(settings.ca_file) if settings.tls else None
        self._fence_checked = False

    async def __aenter__(self) -> ProtoObjectStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        while self._idle:
            await self._idle.pop().close()

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[ProtoClient]:
        client = self._idle.pop() if self._idle else None
        if client is None:
            client = await ProtoClient.connect(
                self._host, self._port, token=self.settings.secret(),
                client_name="pageserver remote storage", peer=PEER, hint=HINT, ssl=self._ssl,
            )  # fmt: skip
            if not client.server_name.startswith(PAGESERVER_NAME):
                await client.close()
                raise InvalidArgument(
                    f"{self.settings.url} is a {client.server_name}, not a pageserver: it "
                    "holds snapshots (push, pull), not PITR history"
                )
        try:
            yield client
        except BaseException:
            await client.close()
            raise
        self._idle.append(client)

    async def _call(self, method: str, **params: Any) -> Any:
        async with self._connection() as client:
            return await client.call(method, **params)

    async def _upload(self, key: str, body: bytes, **params: Any) -> None:
        """`blob.put` of `body` under `key`, CHUNK bytes a frame."""

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(body), CHUNK):
                yield body[start : start + CHUNK]

        async with self._connection() as client:
            await client.upload("blob.put", chunks(), key=key, **params)

    async def put(
        self, key: str, body: bytes, *, if_absent: bool = False, if_match: str | None = None
    ) -> str:
        condition: dict[str, Any] = {"if_absent": if_absent}
        if if_match is not None:
            condition["if_match"] = if_match
        if if_match is not None and not self._fence_checked:
            await self._check_fence(key)
        try:
            await self._upload(key, body, **condition)
        except AlreadyExists as exc:
            raise PreconditionFailed(f"{self.settings.url}/{key} exists already") from exc
        except Conflict as exc:
            raise PreconditionFailed(f"{self.settings.url}/{key}: {exc}") from exc
        return etag(body)

    async def _check_fence(self, key: str) -> None:
        """Whether the remote pageserver checks `if_match`, asked once before the first
        conditional write (review M2): one older than the fence ignores it and writes, so the
        index put after a takeover could replace a newer owner's. A probe beside `key` with
        a version no object has: refused (Conflict) by a server that checks; written by an
        older one, which is then removed, and Conflict raised (the uploads stop, the status
        says why: waiting cures nothing)."""
        probe = f"{key}{FENCE_PROBE}"
        try:
            await self._upload(
                probe, b"a conditional write no object can satisfy", if_match="0" * 64
            )
        except Conflict:
            self._fence_checked = True
            return
        with contextlib.suppress(NeonError):
            await self.delete(probe)
        raise Conflict(
            f"the remote pageserver at {self.settings.url} does not check If-Match (an older "
            "version): it could not keep a stale writer from replacing this history's index; "
            "upgrade it (uploads of this history stop until then)"
        )

    async def get_tagged(self, key: str) -> tuple[bytes, str] | None:
        body = await self.get_if_exists(key)
        return None if body is None else (body, etag(body))

    async def get(self, key: str) -> bytes:
        async with self._blob(key) as download:
            return await download.read()

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        async with self._blob(key, offset=start, length=end - start) as download:
            data = await download.read()
        if len(data) > end - start:  # a pageserver that sends whole objects only
            raise ProtocolError(f"{PEER} answered a ranged blob.get with the whole object")
        return data

    @asynccontextmanager
    async def _blob(self, key: str, **span: int) -> AsyncIterator[Download]:
        """A blob.get's download (of `span`: offset, length). A key the remote pageserver
        does not hold (its NotFound: pageserver/remote/object_service.py) is the same
        NoSuchObject as an S3 bucket's NoSuchKey, which a reader of an area its writer is
        rewriting takes as "read the index again" (pageserver/remote/mirror.py)."""
        try:
            async with (
                self._connection() as client,
                client.download("blob.get", key=key, **span) as download,
            ):
                yield download
        except NoSuchObject:
            raise
        except NotFound as exc:
            raise NoSuchObject(exc.message) from None

    async def size(self, key: str) -> int | None:
        found = await self._call("blob.size", key=key)
        if found is not None and not isinstance(found, int):
            raise ProtocolError(f"{PEER} answered blob.size with {found!r:.80}")
        return found

    async def delete(self, key: str) -> None:
        await self._call("blob.delete", key=key)

    async def list_dirs(self, prefix: str) -> list[str]:
        found = await self._call("blob.list_dirs", prefix=prefix)
        if not isinstance(found, list) or not all(isinstance(n, str) for n in found):
            raise ProtocolError(f"{PEER} answered blob.list_dirs with {found!r:.80}")
        return found

    async def list_keys(self, prefix: str) -> AsyncIterator[tuple[str, int]]:
        for key, size in await self._call("blob.list_keys", prefix=prefix):
            yield str(key), int(size)

    async def get_if_exists(self, key: str) -> bytes | None:
        try:
            return await self.get(key)
        except NotFound:
            return None
