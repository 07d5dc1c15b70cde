"""The bucket as the remote client sees it: put, get (whole or a byte range), head, delete and
list of objects,
through aiobotocore, with S3's answers as the project's typed errors.

Objects here are small enough to hold in memory (layer files are bounded by the store's
checkpoint_distance and compaction target; WAL segments by their 16 MiB default), so each is
one PutObject or GetObject; retries and backoff are the upload queue's
(pageserver/remote/upload_queue.py), not botocore's (max_attempts 1), so a retry is counted
and its error reported.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

from pageserver.remote.settings import RemoteSettings
from proto.errors import AuthFailed, NeonError, NotFound, Unavailable

CONNECT_TIMEOUT, READ_TIMEOUT = 10, 120
DEFAULT_REGION = "us-east-1"
_AUTH_CODES = {
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
    "ExpiredToken", "AllAccessDisabled", "403",
}  # fmt: skip


class NoSuchObject(NotFound):
    """The bucket holds no object of that key (the bucket itself exists)."""


class PreconditionFailed(NeonError):
    """A conditional put found the object not as asked: there already (If-None-Match: *), or
    changed or gone since the version it names (If-Match)."""


def _error(exc: BaseException, settings: RemoteSettings, key: str, doing: str) -> NeonError:
    from botocore.exceptions import ClientError, NoCredentialsError

    where = f"s3://{settings.bucket}/{key}"
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            return NotFound(
                f"cannot {doing} {where}: bucket {settings.bucket} of storage "
                f"{settings.storage!r} does not exist (NoSuchBucket)"
            )
        if code in _AUTH_CODES or status == 403:
            return AuthFailed(
                f"cannot {doing} {where}: S3 refused access ({code or 'HTTP 403'}); check the "
                f"access key and secret of storage {settings.storage!r} and the bucket's policy"
            )
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            return NoSuchObject(f"{where}: no such object")
        if code in ("PreconditionFailed", "412") or status == 412:
            return PreconditionFailed(f"{where} is not the version the conditional put named")
        message = " ".join(str(error.get("Message", "")).split())
        return Unavailable(f"cannot {doing} {where}: S3 answered {code or status} {message}")
    if isinstance(exc, NoCredentialsError):
        return AuthFailed(
            f"cannot {doing} {where}: no AWS credentials for storage {settings.storage!r}"
        )
    reason = " ".join(str(exc).split()) or type(exc).__name__
    return Unavailable(f"cannot {doing} {where}: {reason}")


@contextlib.contextmanager
def _mapped(settings: RemoteSettings, key: str, doing: str) -> Any:
    import aiohttp
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (ClientError, BotoCoreError, aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise _error(exc, settings, key, doing) from None


class ObjectStore:
    """One aiobotocore client (open it with `async with`) for one s3 storage."""

    def __init__(self, settings: RemoteSettings) -> None:
        self.settings = settings
        self._stack: AsyncExitStack | None = None
        self._client: Any = None

    async def __aenter__(self) -> ObjectStore:
        from aiobotocore.session import get_session
        from botocore.config import Config

        s = self.settings
        keys = {}
        secret = s.secret()
        if s.access_key_id and secret:
            keys = {"aws_access_key_id": s.access_key_id, "aws_secret_access_key": secret}
        config = Config(
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=READ_TIMEOUT,
            retries={"max_attempts": 1, "mode": "standard"},
            max_pool_connections=32,
        )
        self._stack = AsyncExitStack()
        self._client = await self._stack.enter_async_context(
            get_session().create_client(
                "s3",
                region_name=s.region or DEFAULT_REGION,
                endpoint_url=s.endpoint or None,
                config=config,
                **keys,
            )
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._stack is not None:
            await self._stack.aclose()
        self._stack = self._client = None

    async def put(
        self, key: str, body: bytes, *, if_absent: bool = False, if_match: str | None = None
    ) -> str:
        """Write the object; return its ETag, the version a later `if_match` names.
        `if_absent`: only if there is no such object; `if_match`: only if it is still the
        version of that ETag (else PreconditionFailed, nothing written)."""
        extra = {"IfNoneMatch": "*"} if if_absent else {}
        if if_match is not None:
            extra["IfMatch"] = if_match
        try:
            with _mapped(self.settings, key, "upload to"):
                answer = await self._client.put_object(
                    Bucket=self.settings.bucket, Key=key, Body=body, **extra
                )
        except NoSuchObject as exc:  # If-Match on an object deleted since
            if if_match is None:
                raise
            raise PreconditionFailed(f"{exc} any more (If-Match)") from None
        return str(answer["ETag"])

    async def get(self, key: str) -> bytes:
        found = await self.get_tagged(key)
        if found is None:
            raise NoSuchObject(f"s3://{self.settings.bucket}/{key}: no such object")
        return found[0]

    async def get_tagged(self, key: str) -> tuple[bytes, str] | None:
        """The object and its ETag (one GetObject); None when there is no such object."""
        try:
            with _mapped(self.settings, key, "download"):
                answer = await self._client.get_object(Bucket=self.settings.bucket, Key=key)
                async with answer["Body"] as body:
                    return bytes(await body.read()), str(answer["ETag"])
        except NoSuchObject:
            return None

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of the object (one ranged GetObject); shorter where it ends."""
        with _mapped(self.settings, key, "download"):
            answer = await self._client.get_object(
                Bucket=self.settings.bucket, Key=key, Range=f"bytes={start}-{end - 1}"
            )
            async with answer["Body"] as body:
                return bytes(await body.read())

    async def get_if_exists(self, key: str) -> bytes | None:
        found = await self.get_tagged(key)
        return None if found is None else found[0]

    async def size(self, key: str) -> int | None:
        """The object's size; None when there is no such object."""
        from botocore.exceptions import ClientError

        with _mapped(self.settings, key, "reach"):
            try:
                answer = await self._client.head_object(Bucket=self.settings.bucket, Key=key)
            except ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code", "")) in ("404", "NoSuchKey"):
                    return None
                raise
            return int(answer["ContentLength"])

    async def delete(self, key: str) -> None:
        with _mapped(self.settings, key, "delete"):
            await self._client.delete_object(Bucket=self.settings.bucket, Key=key)

    async def list_dirs(self, prefix: str) -> list[str]:
        """The names of the 'directories' directly under `prefix` (one LIST, delimited)."""
        found: list[str] = []
        with _mapped(self.settings, prefix, "list"):
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.settings.bucket, Prefix=prefix, Delimiter="/"
            )
            async for page in pages:
                for entry in page.get("CommonPrefixes", []):
                    found.append(str(entry["Prefix"])[len(prefix) :].rstrip("/"))
        return sorted(found)

    async def list_keys(self, prefix: str) -> AsyncIterator[tuple[str, int]]:
        """Every key under `prefix` with its size (tests and orphan sweeps only)."""
        with _mapped(self.settings, prefix, "list"):
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.settings.bucket, Prefix=prefix
            )
            async for page in pages:
                for entry in page.get("Contents", []):
                    yield str(entry["Key"]), int(entry["Size"])


def open_bucket(settings: RemoteSettings) -> ObjectStore:
    """The object store of a storage: its S3 bucket, or for a remote storage the pageserver
    that keeps its objects (pageserver/remote/proto_objects.py)."""
    if settings.kind == "remote":
        from pageserver.remote.proto_objects import ProtoObjectStore

        return ProtoObjectStore(settings)
    return ObjectStore(settings)
