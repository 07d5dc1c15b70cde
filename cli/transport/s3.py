"""`s3://BUCKET/PREFIX/NAME`: objects are keys of an S3 bucket (AWS or any S3-compatible
service), reached with aiobotocore.

Credentials and endpoint come from where every AWS tool reads them: AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY (AWS_SESSION_TOKEN, AWS_PROFILE, ~/.aws/...), AWS_REGION or
AWS_DEFAULT_REGION (us-east-1 when neither is set), and AWS_ENDPOINT_URL or
AWS_ENDPOINT_URL_S3 for an S3-compatible service; `use_settings` overrides them for this
process (`--endpoint-url`, an attached s3 storage's options and secret), without putting a
secret in the environment of the processes it starts. Keys are written as in the URL (no
percent-decoding, as `aws s3 cp` does).

Write: a multipart upload with PARTS_IN_FLIGHT parts of PART_SIZE uploading at once (memory
stays bounded by about their sum); the object appears only at CompleteMultipartUpload, and an
abort calls AbortMultipartUpload. An object smaller than one part is one PutObject. Parts grow
after every PART_GROWTH_EVERY parts (S3 allows 10,000 parts per object). Without `overwrite`
the pusher's HEAD refuses an existing object before anything is sent, and the final request
carries `If-None-Match: *`, so a service that honours it (AWS since 2024, MinIO, moto) never
replaces an object written meanwhile; one that ignores it leaves a race between the HEAD and
the completion. A killed writer leaves a pending multipart upload, which is invisible and
which a bucket's AbortIncompleteMultipartUpload lifecycle rule removes.

Resumable write (`open_resumable`): an error or a cancellation leaves the multipart upload
pending too, and the next resumable write of the key finds it again (ListMultipartUploads,
ListParts): as the regenerated stream is cut into the same parts, a part the upload holds
with the same size and MD5 (its ETag) is not sent again, any other is uploaded over it. The
upload whose first part matches is the one continued (a first part differs: another stream,
whose upload is aborted); the other pending uploads of the key are aborted. Parts are
compared whole, so a part in flight when the writer died is sent again. Part sizes follow
PART_SIZE (`NEON_S3_PART_SIZE`, at least 5 MiB on S3), which must be the same on the re-run.

Read: GetObject with `Range: bytes=N-` from an offset; a cut body is a `StreamCut`, so
`read_object` resumes where it stopped. List: ListObjectsV2 of the keys directly under the
prefix (as a directory lists its files).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar
from urllib.parse import urlsplit

from cli.storages import mask_url, validate_s3_bucket
from cli.transport.base import (
    CHUNK,
    HeadReader,
    Location,
    ObjectInfo,
    ObjectReader,
    ObjectWriter,
    Store,
    StreamCut,
    already_exists,
    check_object_name,
)
from cli.transport.s3_heads import HeadCache
from proto.errors import AuthFailed, InvalidArgument, NeonError, NotFound, Unavailable

URL_FORM = "s3://BUCKET/[PREFIX/]NAME"
DEFAULT_REGION = "us-east-1"
CONTENT_TYPE = "application/octet-stream"
PART_SIZE = int(os.environ.get("NEON_S3_PART_SIZE") or 16 * 1024 * 1024)
PARTS_IN_FLIGHT = 8
PART_GROWTH_EVERY = 1000  # parts; then the part size doubles (16 MiB x 1000 = 16 GiB first)
MAX_PART_SIZE = 5 * 1024**3  # S3's limit
CONNECT_TIMEOUT, READ_TIMEOUT = 30, 300  # seconds

_AUTH_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
    "AllAccessDisabled",
    "403",
}


def parse_location(url: str) -> Location:
    """`s3://BUCKET`, `s3://BUCKET/PREFIX/` (a directory) or `s3://BUCKET/PREFIX/NAME`."""
    shown = mask_url(url)
    bucket, _, path = url[len("s3://") :].partition("/")
    if "@" in bucket or ":" in bucket:
        raise InvalidArgument(
            f"invalid s3 URL {shown}: it takes no credentials or port; set AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY and AWS_ENDPOINT_URL (or --endpoint-url) instead"
        )
    if not bucket:
        raise InvalidArgument(f"invalid s3 URL {shown}: no bucket; expected {URL_FORM}")
    if any(c in url for c in "\0\r\n"):
        raise InvalidArgument(f"invalid s3 URL {shown!r}: it has a control character")
    try:
        validate_s3_bucket(bucket)
    except InvalidArgument as exc:
        raise InvalidArgument(f"invalid s3 URL {shown}: {exc}") from None
    if "//" in f"/{path}":
        raise InvalidArgument(f"invalid s3 URL {shown}: an empty path segment ('//')")
    head, _, last = path.rpartition("/")
    store = S3Store(bucket, f"{head}/" if head else "")
    if not last:
        return Location(store, None)
    return Location(store, check_object_name(last, shown))


def check_endpoint_url(url: str) -> str:
    """An S3 endpoint is http(s)://HOST[:PORT] (the `--endpoint-url` of push and pull)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (validates it)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidArgument(f"invalid --endpoint-url {url!r}: expected http(s)://HOST[:PORT]")
    if parts.password is not None:
        raise InvalidArgument(
            "--endpoint-url takes no password: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        )
    return url


@dataclass(frozen=True, slots=True)
class S3Settings:
    """Where and as whom this process reaches S3; None: from the AWS environment."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)


_settings = S3Settings()


def use_settings(settings: S3Settings) -> None:
    """Reach S3 so in this process from now on (every thread: a push writes from one)."""
    global _settings
    _settings = settings


def use_endpoint_url(url: str) -> None:
    """Send this process's S3 requests to `url` (`--endpoint-url`)."""
    use_settings(replace(_settings, endpoint_url=check_endpoint_url(url)))


def _region() -> str:
    return (
        _settings.region
        or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
        or DEFAULT_REGION
    )


@contextlib.contextmanager
def _s3_errors(shown: str, bucket: str, doing: str) -> Iterator[None]:
    """botocore's and aiohttp's exceptions as one line naming the URL and the fix."""
    import aiohttp
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    try:
        yield
    except ClientError as exc:
        raise _client_error(exc, shown, bucket, doing) from None
    except NoCredentialsError:
        raise AuthFailed(
            f"cannot {doing} {shown}: no AWS credentials; set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
        ) from None
    except (BotoCoreError, aiohttp.ClientError, TimeoutError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise Unavailable(f"cannot {doing} {shown}: {reason}") from None


def _client_error(exc: Any, shown: str, bucket: str, doing: str) -> NeonError:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code == "NoSuchBucket":
        return NotFound(
            f"cannot {doing} {shown}: S3 bucket {bucket} does not exist (NoSuchBucket); "
            "check the URL and AWS_ENDPOINT_URL"
        )
    if code in _AUTH_CODES or status == 403:
        return AuthFailed(
            f"cannot {doing} {shown}: S3 refused access ({code or 'HTTP 403'}); check "
            "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and the bucket's policy"
        )
    if code in ("NoSuchKey", "404") or status == 404:
        return NotFound(f"{shown}: no such object in S3")
    if code in ("PreconditionFailed", "412") or status == 412:
        return already_exists(shown)
    message = " ".join(str(error.get("Message", "")).split())
    return Unavailable(f"cannot {doing} {shown}: S3 answered {code or status} {message}".rstrip())


def _missing(exc: BaseException) -> bool:
    """A HEAD's 404: no such key (a HEAD cannot tell a missing bucket; later calls do)."""
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return False
    code = str(exc.response.get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound")


def _endpoint(given: str | None) -> str | None:
    """The endpoint a client talks to: the one given, else the one botocore takes from the
    environment (AWS_ENDPOINT_URL_S3, then AWS_ENDPOINT_URL, unless configured endpoints are
    ignored); None: AWS's own for the region."""
    if given is None and not _session().get_config_variable("ignore_configured_endpoint_urls"):
        return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return given


def _http_endpoint(given: str | None) -> str | None:
    """The endpoint (`_endpoint`) when it is plain http://. A client builds a TLS context for
    its connections (the CA bundle loaded and parsed, ~45 ms of CPU) even where it makes
    none."""
    url = _endpoint(given)
    if url is None or not url.lower().startswith("http://"):
        return None
    if _proxied(url):
        return None  # botocore gives the proxy's connection the endpoint's verify setting
    return url


def _proxied(url: str) -> bool:
    """Whether a proxy from the environment (HTTP_PROXY and the like, as botocore reads
    them) would carry requests to `url`: an https proxy's certificate must still be checked."""
    from urllib.parse import urlsplit
    from urllib.request import getproxies, proxy_bypass

    proxies = getproxies()
    if not (proxies.get("http") or proxies.get("all")):
        return False
    host = urlsplit(url).hostname or ""
    return not proxy_bypass(host)


_SESSIONS: dict[tuple[tuple[str, str], ...], Any] = {}


def _session() -> Any:
    """This process's aiobotocore session (one per AWS environment, which a session reads
    once): a session loads botocore's S3 model and resolves credentials the first time only,
    and a new one per request cost 0.15-0.2 s each (a push or pull makes 4 to 6 requests
    of their own)."""
    from aiobotocore.session import get_session

    key = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    session = _SESSIONS.get(key)
    if session is None:
        session = _SESSIONS[key] = get_session()
        session.register_component("data_loader", _shared_loader(session))
    return session


_LOADERS: dict[object, Any] = {}
"""This process's loaders by botocore's data path (AWS_DATA_PATH): every session of the
process reads its models through one, which keeps each model parsed once (a session of
its own per AWS environment, and the warm server's children, which find S3's models loaded
by `preload_models`)."""

S3_MODELS = ("service-2", "endpoint-rule-set-1", "paginators-1")
"""S3's models an S3 client and a push's listing load (with botocore's shared data
below)."""
SHARED_DATA = ("sdk-default-configuration", "partitions", "_retry", "endpoints")


def _shared_loader(session: Any) -> Any:
    path = session.get_config_variable("data_path")
    loader = _LOADERS.get(path)
    if loader is None:
        loader = _LOADERS[path] = _data_loader(session)
    return loader


def preload_models() -> None:
    """Parse what an S3 client loads into this process's loader for the default data path:
    the warm server does so before it forks, so that a warm command's first client costs
    ~5-25 ms of CPU instead of ~40-70 ms (~35 ms of JSON parsing)."""
    from aiobotocore.session import get_session

    loader = _shared_loader(get_session())
    for name in SHARED_DATA:
        loader.load_data(name)
    for type_name in S3_MODELS:
        loader.load_service_model("s3", type_name)


def _data_loader(session: Any) -> Any:
    """botocore's loader of `session` (AWS_DATA_PATH as botocore reads it) that finds a model
    in its service's own directory: botocore's checks the name against a scan of every
    service's directory (~440 of them, once per model type: three for an S3 client, ~24 ms
    of a push's CPU, more than loading S3's model)."""
    from botocore.loaders import create_loader

    loader = create_loader(session.get_config_variable("data_path"))
    loader.__class__ = _service_loader_class()  # the same instance, one method overridden
    return loader


@functools.cache
def _service_loader_class() -> type:
    from botocore.exceptions import DataNotFoundError
    from botocore.loaders import Loader, instance_cache

    class ServiceLoader(Loader):
        @instance_cache
        def load_service_model(
            self, service_name: str, type_name: str, api_version: str | None = None
        ) -> Any:
            """botocore's steps after its scan (the version, the model, its extras), with
            the versions found in the service's own directory; botocore's whole method (its
            scan, its UnknownServiceError) where none or not the one given has the model.
            tests/cli/transport/test_s3.py checks the models equal botocore's."""
            try:
                versions = self.list_api_versions(service_name, type_name)
            except DataNotFoundError:
                versions = []
            version = api_version or max(versions, default=None)
            if version is None or version not in versions:
                return super().load_service_model(service_name, type_name, api_version)
            model = self.load_data(os.path.join(service_name, version, type_name))
            extras = self._find_extras(service_name, type_name, version)
            self._extras_processor.process(model, extras)
            return model

    return ServiceLoader


PROBE_FRESH = 10.0
"""Seconds a stat's probe serves the calls after it (a push makes them at once)."""
PROBE_HEADS = 64  # `.neon` objects whose head a probe reads, at most
HEAD_BYTES = 4096  # of each: its manifest (a few hundred bytes)

T = TypeVar("T")


async def _outcome(call: Awaitable[T]) -> T | BaseException:
    """`call`'s result, or its error (raised later, by the call it is kept for)."""
    try:
        return await call
    except Exception as exc:
        return exc


@dataclass(slots=True)
class _S3Probe:
    """What one stat asked at once: the object (None: none), the listing (or its error;
    None once used), its pending uploads (or their error) and `.neon` heads (size, bytes)."""

    name: str
    when: float
    found: ObjectInfo | None
    listing: list[ObjectInfo] | BaseException | None
    pending: list[PendingUpload] | BaseException
    heads: dict[str, tuple[int, bytes]]


class S3Store(Store):
    busy_opening = True

    def __init__(self, bucket: str, prefix: str) -> None:
        self.bucket, self.prefix = bucket, prefix
        self.url = f"s3://{bucket}/{prefix}"
        self._probe: _S3Probe | None = None
        self._stat_client: Any = None
        self._client_kept: tuple[AsyncExitStack, Any] | None = None
        """`stat_for_write`'s client and the stack that closes it, until a write takes it."""

    def object_url(self, name: str) -> str:
        return self.url + name

    def _key(self, name: str) -> str:
        return self.prefix + check_object_name(name, self.url)

    def client(self) -> Any:
        """An aiobotocore S3 client (an async context manager): `use_settings`'s endpoint,
        region and keys, the AWS environment for those not set."""
        from botocore.config import Config

        config = Config(
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=READ_TIMEOUT,
            retries={"max_attempts": 3, "mode": "standard"},
        )
        given = _settings
        options: dict[str, Any] = {}
        if given.access_key_id is not None and given.secret_access_key is not None:
            options["aws_access_key_id"] = given.access_key_id
            options["aws_secret_access_key"] = given.secret_access_key
        endpoint = given.endpoint_url
        plain = _http_endpoint(endpoint)
        if plain is not None:  # that very endpoint, where TLS has nothing to verify
            endpoint, options["verify"] = plain, False
        return _session().create_client(
            "s3", region_name=_region(), endpoint_url=endpoint, config=config, **options
        )

    async def _head(self, client: Any, name: str) -> ObjectInfo | None:
        try:
            answer = await client.head_object(Bucket=self.bucket, Key=self._key(name))
        except Exception as exc:
            if _missing(exc):
                return None
            raise
        return ObjectInfo(name, int(answer["ContentLength"]))

    async def stat(self, name: str) -> ObjectInfo | None:
        """The object's HEAD; at once, the listing, the head of each `.neon` object and the
        object's pending uploads, kept for the `list`, head reads and `open_resumable` that
        follow in a push (each used once; a request's error is raised by the call it serves,
        as that call would raise it): requests at once, not one round trip after the other."""
        async with AsyncExitStack() as stack:
            return await self._stat(stack, name)

    async def stat_for_write(self, name: str) -> ObjectInfo | None:
        """`stat`, its client kept for the `open_resumable` that follows (a push's one
        client: a second cost ~5 ms of CPU, its first request ~4 ms more, and a connection)."""
        await self.close()
        stack = AsyncExitStack()
        try:
            found = await self._stat(stack, name)
        except BaseException:
            await stack.aclose()
            raise
        self._client_kept = stack, self._stat_client
        return found

    async def close(self) -> None:
        kept, self._client_kept = self._client_kept, None
        if kept is not None:
            await kept[0].aclose()

    async def _stat(self, stack: AsyncExitStack, name: str) -> ObjectInfo | None:
        """`stat` with a client that `stack` closes (left in `_stat_client`)."""
        shown = self.object_url(name)
        with _s3_errors(shown, self.bucket, "reach"):
            client = self._stat_client = await stack.enter_async_context(self.client())
            head, listed, pending = await asyncio.gather(
                _outcome(self._head(client, name)),
                _outcome(self._listed(client)),
                _outcome(self._pending(client, self._key(name))),
            )
            if isinstance(head, BaseException):
                raise head
            found = head
            heads: dict[str, tuple[int, bytes]] = {}
            listing: list[ObjectInfo] | BaseException
            if isinstance(listed, BaseException):
                listing = listed
            else:
                listing = [info for info, _etag in listed]
                heads = await self._neon_heads(client, listed)
        self._probe = _S3Probe(name, time.monotonic(), found, listing, pending, heads)
        return found

    def _store_key(self) -> str:
        """This store among the heads remembered (s3_heads): endpoint, bucket, prefix."""
        return f"{_endpoint(_settings.endpoint_url) or f'aws:{_region()}'} {self.url}"

    async def _neon_heads(
        self, client: Any, listed: list[tuple[ObjectInfo, str | None]]
    ) -> dict[str, tuple[int, bytes]]:
        """The head of each `.neon` object of a listing (PROBE_HEADS at most): remembered
        (s3_heads), else read; an object whose head cannot be read is left out."""
        cache = HeadCache.of_store(self._store_key())
        neon = [entry for entry in listed if entry[0].name.endswith(".neon")][:PROBE_HEADS]
        heads: dict[str, tuple[int, bytes]] = {}
        reads: list[tuple[ObjectInfo, str | None]] = []
        for info, etag in neon:
            known = cache.get(info.name, info.size, etag)
            if known is None or len(known) != min(info.size, HEAD_BYTES):
                reads.append((info, etag))
            else:
                heads[info.name] = (info.size, known)
        got = await asyncio.gather(*(_outcome(self._head_bytes(client, o)) for o, _ in reads))
        for (info, etag), answer in zip(reads, got, strict=True):
            if isinstance(answer, BaseException):
                continue
            data, read_etag = answer
            heads[info.name] = (info.size, data)
            if read_etag == etag:  # the object listed is the one read
                cache.put(info.name, info.size, etag, data)
        cache.keep_only(info.name for info, _ in neon)
        cache.save()
        return heads

    def remember_head(self, name: str, size: int, etag: str | None, head: bytes) -> None:
        """An object this process wrote (S3Writer's commit): its head for the next probe.
        Never raises (the object is written: a push succeeded whatever the cache does)."""
        if not name.endswith(".neon"):
            return
        with contextlib.suppress(Exception):
            cache = HeadCache.of_store(self._store_key())
            cache.put(name, size, etag, head[:HEAD_BYTES])
            cache.save()

    def _kept(self, name: str | None = None) -> _S3Probe | None:
        """The last stat's probe while fresh (of `name`'s stat, when given)."""
        probe = self._probe
        if probe is None:
            return None
        if time.monotonic() - probe.when > PROBE_FRESH or (name is not None and probe.name != name):
            self._probe = None
            return None
        return probe

    async def _listing(self, client: Any) -> list[ObjectInfo]:
        return [info for info, _etag in await self._listed(client)]

    async def _listed(self, client: Any) -> list[tuple[ObjectInfo, str | None]]:
        """The objects directly under the prefix, each with its ETag (None: not given)."""
        found = []
        with _s3_errors(self.url, self.bucket, "list"):
            pages = client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix, Delimiter="/"
            )
            async for page in pages:
                for entry in page.get("Contents", []):
                    name = entry["Key"][len(self.prefix) :]
                    if name and not name.startswith("."):
                        etag = entry.get("ETag")
                        info = ObjectInfo(name, int(entry["Size"]))
                        found.append((info, etag if isinstance(etag, str) else None))
        return sorted(found, key=lambda entry: entry[0].name)

    async def _pending(self, client: Any, key: str) -> list[PendingUpload]:
        with _s3_errors(self.object_url(key[len(self.prefix) :]), self.bucket, "upload to"):
            return await pending_uploads(client, self.bucket, key)

    async def _head_bytes(self, client: Any, info: ObjectInfo) -> tuple[bytes, str | None]:
        """The object's first HEAD_BYTES and the ETag of the object they were read from."""
        if info.size == 0:
            return b"", None
        answer = await client.get_object(
            Bucket=self.bucket, Key=self._key(info.name), Range=f"bytes=0-{HEAD_BYTES - 1}"
        )
        async with answer["Body"] as body:
            data = bytes(await body.read())
        if len(data) != min(info.size, HEAD_BYTES):
            raise ValueError("not the head asked for (the object changed)")
        etag = answer.get("ETag")
        return data, etag if isinstance(etag, str) else None

    async def list(self) -> list[ObjectInfo]:
        probe = self._kept()
        if probe is not None and probe.listing is not None:
            listing, probe.listing = probe.listing, None
            if isinstance(listing, BaseException):
                raise listing
            return listing
        async with self.client() as client:
            return await self._listing(client)

    async def open_write(self, name: str, *, overwrite: bool) -> ObjectWriter:
        return await self._open_upload(name, overwrite, resumable=False)

    async def open_resumable(self, name: str, *, overwrite: bool) -> ObjectWriter:
        return await self._open_upload(name, overwrite, resumable=True)

    async def _open_upload(self, name: str, overwrite: bool, resumable: bool) -> S3Writer:
        shown = self.object_url(name)
        key = self._key(name)
        probe = self._kept(name) if resumable else None
        self._probe = None
        kept, self._client_kept = self._client_kept, None
        stack = AsyncExitStack() if kept is None else kept[0]
        with _s3_errors(shown, self.bucket, "upload to"):
            try:
                if kept is not None:  # the client of the stat just before (its loop's)
                    client = kept[1]
                else:
                    client = await stack.enter_async_context(self.client())
                if probe is not None:  # what the stat just before found
                    if not overwrite and probe.found is not None:
                        raise already_exists(shown)
                    if isinstance(probe.pending, BaseException):
                        raise probe.pending
                    pending = probe.pending
                else:
                    if not overwrite and await self._head(client, name) is not None:
                        raise already_exists(shown)
                    pending = await pending_uploads(client, self.bucket, key) if resumable else []
                upload_id = None
                if not pending and probe is None:
                    # Started now, so that a missing bucket or a refused write fails before
                    # the caller produces any data. After the stat of a push the bucket has
                    # answered already, and an object smaller than a part (a delta) needs no
                    # upload at all, one PutObject: then it starts with the first whole part.
                    answer = await client.create_multipart_upload(
                        Bucket=self.bucket, Key=key, ContentType=CONTENT_TYPE
                    )
                    upload_id = str(answer["UploadId"])
            except BaseException:
                await stack.aclose()
                raise
        writer = S3Writer(
            stack, client, self.bucket, key, upload_id, shown, overwrite, PART_SIZE,
            PARTS_IN_FLIGHT, resumable=resumable,
        )  # fmt: skip
        writer.pending = pending
        writer.committed = functools.partial(self.remember_head, name)
        return writer

    async def open_read(self, name: str, offset: int = 0) -> ObjectReader:
        key = self._key(name)
        shown = self.object_url(name)
        probe = self._kept()
        head = None if probe is None or offset != 0 else probe.heads.pop(name, None)
        if head is not None:  # the stat's probe read it: the rest only if asked for
            return HeadReader(self, name, *head)
        stack = AsyncExitStack()
        with _s3_errors(shown, self.bucket, "download"):
            try:
                client = await stack.enter_async_context(self.client())
                request = {"Bucket": self.bucket, "Key": key}
                if offset:
                    request["Range"] = f"bytes={offset}-"
                try:
                    answer = await client.get_object(**request)
                except Exception as exc:
                    info = await self._head(client, name) if _invalid_range(exc) else None
                    if info is not None and info.size == offset:  # from the very end
                        await stack.aclose()
                        return S3Reader(None, None, shown, offset, offset)
                    raise
                size = _total_size(answer, offset)
            except BaseException:
                await stack.aclose()
                raise
        return S3Reader(stack, answer["Body"], shown, offset, size)

    async def delete(self, name: str) -> None:
        shown = self.object_url(name)
        self._probe = None
        with _s3_errors(shown, self.bucket, "delete"):
            async with self.client() as client:
                # S3 answers a DELETE of a missing key with success: ask first (a racing
                # delete of the same key is not noticed).
                if await self._head(client, name) is None:
                    raise NotFound(f"{shown}: no such object in S3")
                await client.delete_object(Bucket=self.bucket, Key=self._key(name))


async def pending_uploads(client: Any, bucket: str, key: str) -> list[PendingUpload]:
    """The multipart uploads of `key` neither completed nor aborted, newest first, with
    their parts; none when the credentials may not list them."""
    from botocore.exceptions import ClientError

    found = []
    try:
        pages = client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=key)
        async for page in pages:
            for upload in page.get("Uploads", []):
                if upload["Key"] == key:
                    found.append((upload.get("Initiated"), str(upload["UploadId"])))
        found.sort(key=lambda u: (u[0] is not None, u[0]), reverse=True)
        uploads = []
        for _initiated, upload_id in found:
            parts: dict[int, tuple[int, str]] = {}
            listing = client.get_paginator("list_parts").paginate(
                Bucket=bucket, Key=key, UploadId=upload_id
            )
            async for page in listing:
                for part in page.get("Parts", []):
                    etag = str(part["ETag"]).strip('"')
                    parts[int(part["PartNumber"])] = (int(part["Size"]), etag)
            uploads.append(PendingUpload(upload_id, parts))
        return uploads
    except ClientError as exc:
        if str(exc.response.get("Error", {}).get("Code", "")) in _AUTH_CODES:
            return []  # not allowed to list them: start afresh
        raise


def _md5(body: bytes) -> str:
    """A part's ETag (unencrypted or SSE-S3 uploads): the MD5 of its bytes, in hex."""
    return hashlib.md5(body, usedforsecurity=False).hexdigest()


def _invalid_range(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in (
        "InvalidRange",
        "416",
    )


def _total_size(answer: dict[str, Any], offset: int) -> int:
    """The whole object's size: from `Content-Range: bytes A-B/TOTAL` of a ranged GET."""
    content_range = answer.get("ContentRange")
    if content_range:
        total = str(content_range).rpartition("/")[2]
        if total.isdigit():
            return int(total)
    return offset + int(answer["ContentLength"])


@dataclass(frozen=True, slots=True)
class PendingUpload:
    """A multipart upload an interrupted write left: its parts' sizes and ETags by number."""

    upload_id: str
    parts: dict[int, tuple[int, str]]


class S3Writer(ObjectWriter):
    """Buffers writes into parts of multipart upload `upload_id`; up to `parallel` parts
    upload at once (`write` waits for one to finish beyond that). An object smaller than
    one part is put whole at commit instead (and the upload aborted).

    `resumable`: an abort leaves the upload pending; `pending` (uploads an interrupted write
    left) are matched with the first part, and the chosen one's parts that match are not
    sent again (`upload_id` is None until then)."""

    def __init__(
        self, stack: AsyncExitStack, client: Any, bucket: str, key: str, upload_id: str | None,
        shown: str, overwrite: bool, part_size: int, parallel: int, resumable: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        self._stack, self._client, self._bucket, self._key = stack, client, bucket, key
        self._shown, self._overwrite = shown, overwrite
        self._part_size, self._parallel = part_size, parallel
        self._resumable = resumable
        self.pending: list[PendingUpload] = []
        self._held: dict[int, tuple[int, str]] = {}
        self._sent_parts = 0
        self._buffer = bytearray()
        self._upload_id: str | None = upload_id
        self._etags: dict[int, str] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._next_part = 1
        self._closed = False
        self._head = bytearray()
        """The object's first HEAD_BYTES, for `committed`."""
        self.committed: Callable[[int, str | None, bytes], None] | None = None
        """Told the object's size, ETag and head once it is committed."""

    def _size_of(self, number: int) -> int:
        growth = (number - 1) // PART_GROWTH_EVERY
        return min(self._part_size << min(growth, 20), MAX_PART_SIZE)

    def _errors(self) -> contextlib.AbstractContextManager[None]:
        return _s3_errors(self._shown, self._bucket, "upload to")

    def _condition(self) -> dict[str, str]:
        return {} if self._overwrite else {"IfNoneMatch": "*"}

    async def write(self, data: bytes) -> None:
        self._raise_failed()
        if len(self._head) < HEAD_BYTES:
            self._head += data[: HEAD_BYTES - len(self._head)]
        self._buffer += data
        self.bytes_written += len(data)
        while len(self._buffer) >= (size := self._size_of(self._next_part)):
            with memoryview(self._buffer) as view:
                part = bytes(view[:size])
            del self._buffer[:size]
            await self._start_part(part)

    def _raise_failed(self) -> None:
        for task in [t for t in self._tasks if t.done()]:
            self._tasks.discard(task)
            task.result()

    async def _start_part(self, body: bytes) -> None:
        number = self._next_part
        if number == 1 and self._upload_id is None:
            await self._choose_upload(body)
        held = self._held.get(number)
        if held is not None and held == (len(body), _md5(body)):
            self._next_part += 1
            self._etags[number] = f'"{held[1]}"'
            self.bytes_skipped += len(body)
            return
        while len(self._tasks) >= self._parallel:
            await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
            self._raise_failed()
        self._next_part += 1
        self._sent_parts += 1
        self._tasks.add(asyncio.ensure_future(self._upload_part(number, body)))

    async def _choose_upload(self, first: bytes) -> None:
        """Continue the pending upload whose first part is `first`, else start one; abort
        the others (interrupted writes of another stream, or older ones)."""
        digest = (len(first), _md5(first))
        chosen = next((u for u in self.pending if u.parts.get(1) == digest), None)
        await self._abort_pending(chosen)
        if chosen is not None:
            self._upload_id, self._held = chosen.upload_id, chosen.parts
            return
        with self._errors():
            answer = await self._client.create_multipart_upload(
                Bucket=self._bucket, Key=self._key, ContentType=CONTENT_TYPE
            )
        self._upload_id = str(answer["UploadId"])

    async def _abort_pending(self, keep: PendingUpload | None = None) -> None:
        for upload in self.pending:
            if upload is not keep:
                with contextlib.suppress(Exception):
                    await self._client.abort_multipart_upload(
                        Bucket=self._bucket, Key=self._key, UploadId=upload.upload_id
                    )
        self.pending = []

    async def _upload_part(self, number: int, body: bytes) -> None:
        with self._errors():
            answer = await self._client.upload_part(
                Bucket=self._bucket, Key=self._key, UploadId=self._upload_id,
                PartNumber=number, Body=body,
            )  # fmt: skip
        self._etags[number] = str(answer["ETag"])

    async def commit(self) -> None:
        try:
            if self._next_part == 1:  # smaller than one part
                with self._errors():
                    answer = await self._client.put_object(
                        Bucket=self._bucket, Key=self._key, Body=bytes(self._buffer),
                        ContentType=CONTENT_TYPE, **self._condition(),
                    )  # fmt: skip
                await self._abort_pending()
            else:
                if self._buffer:
                    await self._start_part(bytes(self._buffer))
                while self._tasks:
                    await asyncio.wait(self._tasks)
                    self._raise_failed()
                parts = [{"ETag": e, "PartNumber": n} for n, e in sorted(self._etags.items())]
                with self._errors():
                    answer = await self._client.complete_multipart_upload(
                        Bucket=self._bucket, Key=self._key, UploadId=self._upload_id,
                        MultipartUpload={"Parts": parts}, **self._condition(),
                    )  # fmt: skip
                self._upload_id = None  # completed: nothing to abort
        except BaseException:
            await self.abort()
            raise
        await self.abort()  # after a PutObject, the unused multipart upload; else a no-op
        etag = answer.get("ETag")
        if self.committed is not None:
            tag = etag if isinstance(etag, str) else None
            self.committed(self.bytes_written, tag, bytes(self._head))

    async def abort(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        keep = self._resumable and (self._sent_parts > 0 or self.bytes_skipped > 0)
        if keep:
            self._upload_id = None  # left pending for the next resumable write
        if self._upload_id is not None and not self._closed:
            with contextlib.suppress(Exception):
                await self._client.abort_multipart_upload(
                    Bucket=self._bucket, Key=self._key, UploadId=self._upload_id
                )
            self._upload_id = None
        await self._close()

    async def _close(self) -> None:
        if not self._closed:
            self._closed = True
            with contextlib.suppress(Exception):
                await self._stack.aclose()


class S3Reader(ObjectReader):
    def __init__(
        self, stack: AsyncExitStack | None, body: Any, shown: str, offset: int, size: int
    ) -> None:
        self._stack, self._body, self._shown, self._offset = stack, body, shown, offset
        self.size = size

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        import aiohttp
        from botocore.exceptions import IncompleteReadError, ResponseStreamingError

        done = self._offset
        if self._body is None:
            return
        try:
            while chunk := await self._body.read(CHUNK):
                done += len(chunk)
                yield chunk
        except (
            aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError,
            ResponseStreamingError, IncompleteReadError, TimeoutError,
        ) as exc:  # fmt: skip
            raise StreamCut(f"{self._shown}: the download was cut after {done} bytes") from exc
        if self.size is not None and done < self.size:
            raise StreamCut(f"{self._shown}: the download ended after {done} of {self.size} bytes")

    async def close(self) -> None:
        if self._body is not None:
            with contextlib.suppress(Exception):
                self._body.close()
        if self._stack is not None:
            await self._stack.aclose()
