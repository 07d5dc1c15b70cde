"""`neon://HOST:PORT/[NAME][?token=TOKEN]`: the proto port of a `neon snapshot recv`, which
prints exactly such a URL (with a fresh one-time token) for the pusher to use.

The wire is pg-neon's own protocol (proto/: length-prefixed msgpack frames, a hello carrying
the token and the protocol version, then requests; an object is written as one upload
request whose chunks follow it as raw frames; both ends must speak the same version).
Methods: `object.stat`, `object.list`, `object.write` (upload), `object.read` (download from
an offset), `object.delete`, `object.partial`; a receiver answers what it can (it receives and
lists, it does not serve reads or deletes) with a typed error for the rest.

A push is resumable (`open_resumable`): a receiver keeps what a cut push of a whole file sent
(cli/receiver_partials.py) and `object.partial` answers its size and block digests; the
pusher compares the stream it makes again with them (cli/transport/resume.py) and uploads
from the first block that differs with `resume_at`, the receiver putting its kept bytes
before the upload's and verifying the whole as ever.

The token comes from the URL's `?token=` or, when the URL has none, from an attached remote
storage of that address (`use_token`, held in this process only) or the NEON_TOKEN
environment variable (so that it need not be on a command line). It is never shown: every
URL in a message is the bare `neon://HOST:PORT/NAME`.
"""

from __future__ import annotations

import functools
import os
import ssl
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from cli.transport.base import (
    Location,
    ObjectInfo,
    ObjectReader,
    ObjectWriter,
    QueuedUploadWriter,
    Store,
    StreamCut,
    check_object_name,
)
from cli.transport.resume import Partial, RemoteAppender, ResumingWriter
from proto.client import Download, ProtoClient
from proto.errors import (
    AlreadyExists,
    InvalidArgument,
    NoSpace,
    NotFound,
    ProtocolError,
    Unavailable,
)

URL_FORM = "neon://HOST:PORT/[NAME][?token=TOKEN]"
TOKEN_ENV = "NEON_TOKEN"
PEER = "the snapshot receiver"
HINT = "is `neon snapshot recv` running there? use the URL it printed"


_TOKENS: dict[tuple[str, int], str] = {}
_TLS: dict[tuple[str, int], ssl.SSLContext] = {}


def use_token(host: str, port: int, token: str) -> None:
    """The token for neon://HOST:PORT URLs without one, from here on in this process."""
    _TOKENS[(host, port)] = token


def keep_token(store: NeonStore) -> None:
    """`store`'s token (its URL's) for its address's URLs without one, from here on in this
    process: a URL shown (its token removed) and parsed again still reaches it."""
    host, port, token = store.address
    if token is not None:
        use_token(host, port, token)


def use_tls(host: str, port: int, context: ssl.SSLContext) -> None:
    """neon://HOST:PORT is reached over TLS with `context` (a remote storage attached with
    -c tls=on), from here on in this process."""
    _TLS[(host, port)] = context


def parse_location(url: str) -> Location:
    parts = urlsplit(url)
    shown = _shown(url)
    try:
        port = parts.port
    except ValueError:
        raise InvalidArgument(f"invalid URL {shown}: bad port; expected {URL_FORM}") from None
    if not parts.hostname or port is None:
        raise InvalidArgument(f"invalid URL {shown}: it needs a host and a port ({URL_FORM})")
    if parts.username is not None or parts.fragment:
        raise InvalidArgument(f"invalid URL {shown}: expected {URL_FORM}")
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - {"token"})
    if unknown or len(query.get("token", [])) > 1:
        raise InvalidArgument(f"invalid URL {shown}: only one ?token=... may follow the path")
    token = (
        query["token"][0]
        if "token" in query
        else _TOKENS.get((parts.hostname, port)) or os.environ.get(TOKEN_ENV) or None
    )
    path = unquote(parts.path).lstrip("/")
    store = NeonStore(parts.hostname, port, token, _TLS.get((parts.hostname, port)))
    if not path:
        return Location(store, None)
    return Location(store, check_object_name(path, shown))


def _shown(url: str) -> str:
    """`url` without its query (the token)."""
    return url.partition("?")[0]


class NeonStore(Store):
    def __init__(
        self, host: str, port: int, token: str | None, ssl: ssl.SSLContext | None = None
    ) -> None:
        self._host, self._port, self._token, self._ssl = host, port, token, ssl
        address = f"[{host}]" if ":" in host else host
        self.url = f"neon://{address}:{port}/"

    @property
    def address(self) -> tuple[str, int, str | None]:
        """Host, port and token (never shown)."""
        return self._host, self._port, self._token

    def object_url(self, name: str) -> str:
        return self.url + name

    async def _connect(self) -> ProtoClient:
        return await ProtoClient.connect(
            self._host, self._port, token=self._token, client_name="neon snapshot",
            peer=PEER, hint=HINT, ssl=self._ssl,
        )  # fmt: skip

    async def _call(self, method: str, **params: Any) -> Any:
        async with await self._connect() as client:
            return await client.call(method, **params)

    async def stat(self, name: str) -> ObjectInfo | None:
        found = await self._call("object.stat", name=check_object_name(name, self.url))
        return None if found is None else ObjectInfo.from_wire(found, self.url)

    async def list(self) -> list[ObjectInfo]:
        found = await self._call("object.list")
        if not isinstance(found, list):
            raise ProtocolError(f"{self.url} answered object.list with {type(found).__name__}")
        return [ObjectInfo.from_wire(item, self.url) for item in found]

    async def open_write(self, name: str, *, overwrite: bool) -> ObjectWriter:
        check_object_name(name, self.url)
        client = await self._connect()
        return NeonWriter(client, name, overwrite, self.object_url(name))

    async def open_resumable(self, name: str, *, overwrite: bool) -> ObjectWriter:
        check_object_name(name, self.url)
        try:
            found = await self._call("object.partial", name=name)
        except NotFound:  # a receiver of an older version: no partials
            return await self.open_write(name, overwrite=overwrite)
        try:
            partial = Partial(found["size"], tuple(found["digests"]))
        except (TypeError, KeyError, ValueError):
            raise ProtocolError(f"{self.url} described a partial file as {found!r:.80}") from None
        if partial.size == 0:  # nothing kept: the upload opens now, while the file is made
            return await self.open_write(name, overwrite=overwrite)
        resumed = RemoteAppender(functools.partial(self._write_from, name, overwrite))
        return ResumingWriter(partial, resumed)

    async def _write_from(self, name: str, overwrite: bool, resume_at: int) -> ObjectWriter:
        """A write of `name` from byte `resume_at` (the receiver holds those before)."""
        client = await self._connect()
        return NeonWriter(client, name, overwrite, self.object_url(name), resume_at)

    async def open_read(self, name: str, offset: int = 0) -> ObjectReader:
        check_object_name(name, self.url)
        client = await self._connect()
        download = client.download("object.read", name=name, offset=offset)
        return NeonReader(client, download, self.object_url(name), offset)

    async def delete(self, name: str) -> None:
        await self._call("object.delete", name=check_object_name(name, self.url))


class NeonWriter(QueuedUploadWriter):
    """One `object.write` upload (of the bytes from `resume_at` on: those before are the
    receiver's kept ones); it answers once it verified and kept it all. The tar's size,
    when known, goes as `tar_total` (its progress bar's total): a receiver that knows no
    such param ignores it (cli/receiver_proto.py reads the params it knows)."""

    def __init__(
        self, client: ProtoClient, name: str, overwrite: bool, shown: str, resume_at: int = 0
    ) -> None:
        self._client, self._name, self._overwrite = client, name, overwrite
        self._resume = {"resume_at": resume_at} if resume_at else {}
        self.result: Any = None
        super().__init__(shown)

    async def _upload(self, body: AsyncIterator[bytes]) -> None:
        total = {} if self.tar_total is None else {"tar_total": self.tar_total}
        try:
            self.result = await self._client.upload(
                "object.write", body, name=self._name, overwrite=self._overwrite,
                **self._resume, **total,
            )  # fmt: skip
        except AlreadyExists:
            raise AlreadyExists(
                f"{self._shown}: the receiver already has a snapshot of that name; push under "
                "another name or destroy it there first"
            ) from None
        except NoSpace as exc:  # the receiver's disk, not this side's: say whose
            raise NoSpace(f"{self._shown}: {exc.message}") from None
        finally:
            await self._client.close()

    async def _unsent(self) -> None:
        await self._client.close()


class NeonReader(ObjectReader):
    def __init__(self, client: ProtoClient, download: Download, shown: str, offset: int) -> None:
        self._client, self._download, self._shown = client, download, shown
        self._done = offset

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._download:
                self._done += len(chunk)
                yield chunk
        except Unavailable as exc:
            cut = f"{self._shown}: the download was cut after {self._done} bytes"
            raise StreamCut(cut) from exc

    async def close(self) -> None:
        await self._download.aclose()
        await self._client.close()
