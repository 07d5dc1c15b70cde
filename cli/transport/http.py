"""`http(s)://HOST[:PORT]/PATH`: objects are URLs of a web server that accepts PUT (a `neon
snapshot recv --http`, a WebDAV or object store endpoint, an S3 presigned URL).

Read: a streamed GET; from an offset with `Range: bytes=N-` (a server that ignores it sends
the whole object and the first N bytes are skipped). A connection cut mid-body is a
`StreamCut`, so `read_object` resumes where it stopped. Write: a streamed PUT (chunked: the
size of a `.neon` file is known only at its end) with `If-None-Match: *` unless overwriting,
so a server that honours it never replaces an object; the object exists once the server
answered 2xx to the complete body. An aborted upload closes the connection mid-body: a server
must not keep an incomplete body (aiohttp, S3, WebDAV servers do not). A push that knows the
tar's size sends it as `X-Neon-Tar-Total` (a receiver's progress bar; others ignore it).

A presigned URL (a query signing it for one request: S3's `X-Amz-Signature` or `Signature`,
GCS's `X-Goog-Signature`, Azure's `sig`) is written with its size instead (`SizedWriter`):
S3 refuses a chunked PutObject (501 NotImplemented), and a signature covers one object, so
such a store is never listed and keeps no index.

Listing: plain HTTP has none, so the store keeps one, the object `neon-index.json` beside the
objects (`INDEX_NAME`): a JSON list of `{"name", "size"}`, the wire form of a neon://
receiver's `object.list` (`ObjectInfo.to_wire`), which a write adds its object to once the
server took it (a GET, then a PUT of the whole list: two pushes at once may lose one entry,
which makes the next push on it whole, nothing worse) and a delete removes. `list` reads it
(none: an empty store), and the pusher then reads the manifest at the head of each `.neon`
file listed, as over s3 and file. A `neon snapshot recv --http` answers the same GET itself
(with `X-Neon-Index: live` and each snapshot described by its manifest), and is not written
to.

Resumable write: a `neon snapshot recv --http` keeps what a cut push of a whole file sent
(cli/receiver_partials.py) and answers `GET .partial/NAME` with its size and block digests;
the pusher compares the stream it makes again with them (cli/transport/resume.py) and PUTs
the bytes from the first block that differs with `X-Neon-Resume-At`. Any other server has
no such answer (a 404: `NAME` holds no `/`), and gets the whole file.

Credentials in the URL (`https://user:password@host/...`) are sent as basic auth and masked
in every message; a query string (a presigned URL's signature, a receiver's token) is masked
too and sent with every request, and such a URL may be signed for one method, so `stat` does
not try a HEAD with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import IO, TYPE_CHECKING
from urllib.parse import parse_qsl, quote, unquote, urlsplit, urlunsplit

from cli.storages import mask_url
from cli.transport.base import (
    CHUNK,
    Location,
    ObjectInfo,
    ObjectReader,
    ObjectWriter,
    QueuedUploadWriter,
    Store,
    StreamCut,
    already_exists,
    check_object_name,
)
from cli.transport.resume import NO_PARTIAL, Partial, RemoteAppender, ResumingWriter
from proto.errors import (
    AuthFailed,
    CorruptData,
    InvalidArgument,
    NeonError,
    NoSpace,
    NotFound,
    Unavailable,
)

if TYPE_CHECKING:
    import aiohttp

URL_FORM = "http(s)://HOST[:PORT]/PATH"
CONNECT_TIMEOUT, READ_TIMEOUT = 30, 300  # seconds; no limit on a whole transfer
_REASON_BYTES = 500
INDEX_NAME = "neon-index.json"
"""The store's own listing, beside its objects (not a `.neon` file, never a snapshot)."""
INDEX_LIMIT = 16 * 1024 * 1024
"""The most bytes an index is read to (~100k described snapshots): a longer answer at its
name is not one (a misconfigured server's download), and is not held in memory."""
LIVE_INDEX = "X-Neon-Index"
"""The header with which a server says it answers the index itself (`live`): not written."""
PARTIAL_PATH = ".partial/"
"""Where a receiver answers what it kept of a cut push of a file (`.partial/NAME`)."""
RESUME_AT = "X-Neon-Resume-At"
"""The header of a resumed PUT: the bytes before it are the receiver's kept ones."""
TAR_TOTAL = "X-Neon-Tar-Total"
"""The header of a PUT whose tar size the pusher knows: a receiver's progress bar's total
(any other server ignores it)."""
SIGNATURE_PARAMS = frozenset({"x-amz-signature", "signature", "x-goog-signature", "sig"})


def parse_location(url: str) -> Location:
    shown = _shown(url)
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 (validates it)
    except ValueError:
        raise InvalidArgument(f"invalid URL {shown}: bad port; expected {URL_FORM}") from None
    if not parts.hostname:
        raise InvalidArgument(f"invalid URL {shown}: no host; expected {URL_FORM}")
    if parts.fragment:
        raise InvalidArgument(f"invalid URL {shown}: it has a fragment")
    head, _, last = parts.path.rpartition("/")
    base = urlunsplit((parts.scheme.lower(), parts.netloc, head + "/", "", ""))
    store = HttpStore(base, parts.query)
    if not last:
        return Location(store, None)
    return Location(store, check_object_name(unquote(last), shown))


def signed(query: str) -> bool:
    """Whether a URL's query signs it for one request (a presigned URL)."""
    pairs = parse_qsl(query, keep_blank_values=True)
    return any(key.lower() in SIGNATURE_PARAMS for key, _ in pairs)


def _shown(url: str) -> str:
    """`url` fit for messages: its password and its query (a signature) masked."""
    bare, sep, _query = mask_url(url).partition("?")
    return f"{bare}?****" if sep else bare


def _timeout() -> aiohttp.ClientTimeout:
    import aiohttp

    return aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT, sock_read=READ_TIMEOUT)


def status_error(status: int, url: str, method: str, reason: str = "") -> NeonError:
    """One line for an HTTP answer that is not success; `reason` is the server's own text
    (a `neon snapshot recv --http` says why it refused), when it sent one."""
    why = f": {reason}" if reason else ""
    if status in (401, 403):
        why = why or "; check the URL's credentials"
        return AuthFailed(f"{url}: the server refused access (HTTP {status}){why}")
    if status == 404:
        return NotFound(f"{url}: no such file on the server (HTTP 404){why}")
    if status == 412:
        return already_exists(url)
    if status == 411 or (status == 501 and "Transfer-Encoding" in reason):
        return InvalidArgument(
            f"{url}: the server refuses a streamed (chunked) upload (HTTP {status}), as S3 "
            "does; a presigned URL (X-Amz-Signature=...) is sent with its size, or push to "
            "s3://BUCKET/KEY"
        )
    if status in (405, 501):
        return InvalidArgument(f"{url}: the server does not accept {method} (HTTP {status})")
    if status == 507:
        return NoSpace(f"{url}: the server has no space left (HTTP 507){why}")
    if status in (400, 422) and reason:
        return InvalidArgument(f"{url}: the server refused the {method} (HTTP {status}){why}")
    return Unavailable(f"{url}: the server answered {method} with HTTP {status}{why}")


async def _reason(response: aiohttp.ClientResponse) -> str:
    """The first line of a short plain-text answer body (a server's reason), else ''; of a
    501, S3's XML naming the header it does not implement (`Transfer-Encoding`: chunked)."""
    kind = response.headers.get("Content-Type", "")
    if not kind.startswith("text/plain") and not (response.status == 501 and "xml" in kind):
        return ""
    try:
        text = (await response.content.read(_REASON_BYTES)).decode("utf-8", "replace")
    except Exception:  # the reason is a courtesy: the status alone still says enough
        return ""
    if response.status == 501 and "<Header>Transfer-Encoding</Header>" in text:
        return "Transfer-Encoding is not implemented"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return "".join(c for c in first if c.isprintable())


async def _bounded_body(response: aiohttp.ClientResponse, limit: int, shown: str) -> bytes:
    """The whole body, unless it is over `limit` bytes (CorruptData, read no further)."""
    too_long = CorruptData(f"{shown} is not an index of .neon files: over {limit} bytes")
    if (response.content_length or 0) > limit:
        raise too_long
    body = bytearray()
    async for chunk in response.content.iter_chunked(CHUNK):
        body += chunk
        if len(body) > limit:
            raise too_long
    return bytes(body)


def _client_error(exc: BaseException, url: str, doing: str) -> Unavailable:
    import aiohttp  # loaded already: the error came from it

    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        why = getattr(exc.certificate_error, "verify_message", None) or exc.certificate_error
        return Unavailable(
            f"cannot {doing} {url}: the certificate of {exc.host} is not trusted ({why}); set "
            "SSL_CERT_FILE to a file holding the certificate of the authority that signed it"
        )
    reason = str(exc) or type(exc).__name__
    return Unavailable(f"cannot {doing} {url}: {reason}")


Listing = list[ObjectInfo]


class HttpStore(Store):
    guess_delta = False

    def __init__(self, base: str, query: str) -> None:
        self._base, self._query = base, query
        self.url = _shown(base)
        self._signed = signed(query)
        self._live = False
        """The server answered the index itself (a receiver): a write does not ask again."""

    def _real_url(self, name: str) -> str:
        check_object_name(name, self.url)
        return self._index_url(quote(name))

    def _index_url(self, path: str = INDEX_NAME) -> str:
        return self._base + path + (f"?{self._query}" if self._query else "")

    def object_url(self, name: str) -> str:
        return _shown(self._real_url(name))

    async def stat(self, name: str) -> ObjectInfo | None:
        import aiohttp

        if self._query:
            return None  # signed for one method: a HEAD would be refused
        url = self._real_url(name)
        shown = self.object_url(name)
        try:
            async with (
                aiohttp.ClientSession(timeout=_timeout()) as session,
                session.head(url, allow_redirects=True) as response,
            ):
                if response.status == 404:
                    return None
                if response.status in (405, 501):
                    return None  # cannot tell; the PUT's If-None-Match still protects
                if response.status != 200:
                    raise status_error(response.status, shown, "HEAD")
                return ObjectInfo(name, response.content_length or 0)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _client_error(exc, shown, "reach") from None

    async def list(self) -> list[ObjectInfo]:
        """The objects the index lists; InvalidArgument (no listing: a push sends the whole
        file) when the server answers something else at its name (a catch-all page)."""
        try:
            found, _live = await self._read_index()
        except CorruptData as exc:
            raise InvalidArgument(f"cannot list the files: {exc.message}") from None
        return found

    async def _read_index(self) -> tuple[Listing, bool]:
        """The objects the index lists (none when there is no index yet) and whether the
        server answers it itself (a receiver: it is not written)."""
        import aiohttp

        if self._signed:
            raise InvalidArgument(f"{self.url}: a presigned URL names one object; it lists none")
        shown = _shown(self._index_url())
        try:
            async with (
                aiohttp.ClientSession(timeout=_timeout()) as session,
                session.get(self._index_url()) as response,
            ):
                if response.status == 404:
                    return [], False
                if response.status != 200:  # no index to be had: a whole push, no delta
                    error = status_error(response.status, shown, "GET", await _reason(response))
                    raise InvalidArgument(f"cannot list the files: {error.message}")
                listed = await _bounded_body(response, INDEX_LIMIT, shown)
                live = self._live = response.headers.get(LIVE_INDEX) == "live"
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _client_error(exc, shown, "download") from None
        try:
            items = json.loads(listed)
            if not isinstance(items, list):
                raise ValueError("not a list")
            return [ObjectInfo.from_wire(item, shown) for item in items], live
        except (ValueError, NeonError) as exc:
            raise CorruptData(f"{shown} is not an index of .neon files: {exc}") from None

    async def _update_index(self, name: str, size: int | None) -> None:
        """Put object `name` (`size` bytes; None: removed) in the index, unless the server
        answers the index itself or the URL is signed for one object."""
        if self._signed or self._live:
            return
        listed, live = await self._read_index()
        if live:
            return
        kept = [item for item in listed if item.name != name]
        if size is not None:
            kept.append(ObjectInfo(name, size))
        body = json.dumps([item.to_wire() for item in sorted(kept, key=lambda i: i.name)])
        await _put(self._index_url(), _shown(self._index_url()), body.encode(), {})

    async def open_write(self, name: str, *, overwrite: bool) -> ObjectWriter:
        url, shown = self._real_url(name), self.object_url(name)
        indexed = functools.partial(self._update_index, name) if name != INDEX_NAME else None
        if self._signed:
            return SizedWriter(url, shown, overwrite)
        return HttpWriter(url, shown, overwrite, indexed)

    async def open_resumable(self, name: str, *, overwrite: bool) -> ObjectWriter:
        if self._signed:
            return await self.open_write(name, overwrite=overwrite)
        partial = await self._partial(name)
        if partial == NO_PARTIAL:
            return await self.open_write(name, overwrite=overwrite)
        url, shown = self._real_url(name), self.object_url(name)
        indexed = functools.partial(self._update_index, name)

        async def write_from(resume_at: int) -> ObjectWriter:
            return HttpWriter(url, shown, overwrite, indexed, resume_at)

        return ResumingWriter(partial, RemoteAppender(write_from))

    async def _partial(self, name: str) -> Partial:
        """What a receiver kept of a cut push of `name`; NO_PARTIAL from any other server."""
        import aiohttp

        url = self._index_url(PARTIAL_PATH + quote(check_object_name(name, self.url)))
        try:
            async with (
                aiohttp.ClientSession(timeout=_timeout()) as session,
                session.get(url) as response,
            ):
                if response.status != 200 or response.content_type != "application/json":
                    return NO_PARTIAL
                found = await response.json()
                return Partial(found["size"], tuple(found["digests"]))
        except (aiohttp.ClientError, TimeoutError, ValueError, TypeError, KeyError):
            return NO_PARTIAL  # the write that follows says what is wrong with the server

    async def open_read(self, name: str, offset: int = 0) -> ObjectReader:
        import aiohttp

        url = self._real_url(name)
        shown = self.object_url(name)
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        session = aiohttp.ClientSession(timeout=_timeout())
        try:
            response = await session.get(url, headers=headers)
            reader = HttpReader(session, response, shown, offset)
        except (aiohttp.ClientError, TimeoutError) as exc:
            await session.close()
            raise _client_error(exc, shown, "download") from None
        except BaseException:
            await session.close()
            raise
        return reader

    async def delete(self, name: str) -> None:
        import aiohttp

        url = self._real_url(name)
        shown = self.object_url(name)
        try:
            async with (
                aiohttp.ClientSession(timeout=_timeout()) as session,
                session.delete(url) as response,
            ):
                if response.status not in (200, 202, 204):
                    raise status_error(response.status, shown, "DELETE")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _client_error(exc, shown, "reach") from None
        await self._update_index(name, None)


Body = bytes | AsyncIterator[bytes]


async def _put(url: str, shown: str, body: Body, headers: dict[str, str]) -> bool:
    """One PUT of `body`; raises the server's refusal as one line. Whether the server's
    answer says it keeps the index itself (a receiver: `X-Neon-Index: live`)."""
    import aiohttp

    headers = {"Content-Type": "application/octet-stream", **headers}
    try:
        async with (
            aiohttp.ClientSession(timeout=_timeout()) as session,
            session.put(url, data=body, headers=headers) as response,
        ):
            if response.status not in (200, 201, 204):
                raise status_error(response.status, shown, "PUT", await _reason(response))
            return response.headers.get(LIVE_INDEX) == "live"
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise _client_error(exc, shown, "upload to") from None


def _condition(overwrite: bool) -> dict[str, str]:
    return {} if overwrite else {"If-None-Match": "*"}


Indexed = Callable[[int | None], Awaitable[None]]


class HttpWriter(QueuedUploadWriter):
    """A PUT whose body is fed by `write`; `commit` ends the body and awaits the answer,
    then puts the object in the store's index (`indexed`), unless the answer said the server
    keeps it (a receiver, whose one-time token the PUT used up: a GET with it is refused)."""

    def __init__(
        self, url: str, shown: str, overwrite: bool, indexed: Indexed | None, resume_at: int = 0
    ) -> None:
        self._url, self._overwrite, self._indexed = url, overwrite, indexed
        self._headers = _condition(overwrite)
        if resume_at:
            self._headers[RESUME_AT] = str(resume_at)
        self._live = False
        super().__init__(shown)

    async def _upload(self, body: AsyncIterator[bytes]) -> None:
        headers = self._headers
        if self.tar_total is not None:
            headers = {**headers, TAR_TOTAL: str(self.tar_total)}
        self._live = await _put(self._url, self._shown, body, headers)

    async def commit(self) -> None:
        await super().commit()
        if self._indexed is not None and not self._live:
            # The object is there: an index not updated only makes the next push on it whole.
            with contextlib.suppress(NeonError):
                await self._indexed(self.bytes_written)


class SizedWriter(ObjectWriter):
    """A PUT with a Content-Length, for a presigned URL (S3 refuses a chunked PutObject):
    the bytes go to an unnamed temporary file (gone with the process, however it ends) and
    `commit` sends it. A spool rather than a first pass counting the bytes: the `.neon`
    stream is the same at every export, but counting it is the pageserver making the whole
    file twice (its CPU and the push's wall, twice over), where the spool writes and reads
    the file's bytes once on the local disk (mostly in the page cache); the cost is the
    file's size in the temp directory while the push runs."""

    def __init__(self, url: str, shown: str, overwrite: bool) -> None:
        super().__init__()
        self._url, self._shown, self._overwrite = url, shown, overwrite
        # Closed by commit or abort (the writer's block): no `with` can span the calls.
        self._file: IO[bytes] = tempfile.TemporaryFile(prefix="neon-put-")  # noqa: SIM115

    async def write(self, data: bytes) -> None:
        await asyncio.to_thread(self._file.write, data)
        self.bytes_written += len(data)

    async def _body(self) -> AsyncIterator[bytes]:
        await asyncio.to_thread(self._file.seek, 0)
        while chunk := await asyncio.to_thread(self._file.read, CHUNK):
            yield chunk

    async def commit(self) -> None:
        headers = {**_condition(self._overwrite), "Content-Length": str(self.bytes_written)}
        try:
            await _put(self._url, self._shown, self._body(), headers)
        finally:
            self._file.close()

    async def abort(self) -> None:
        self._file.close()


class HttpReader(ObjectReader):
    def __init__(
        self, session: aiohttp.ClientSession, response: aiohttp.ClientResponse, shown: str,
        offset: int,
    ) -> None:  # fmt: skip
        self._session, self._response, self._shown = session, response, shown
        status = response.status
        self._skip = 0
        self._empty = False
        if status == 206:
            start, total = _content_range(response.headers.get("Content-Range", ""))
            if start != offset:
                raise Unavailable(f"{shown}: the server sent bytes from {start}, not {offset}")
            self.size = total
        elif status == 200:
            self._skip = offset  # the server ignored the Range header
            self.size = response.content_length
        elif status == 416 and _unsatisfied_total(response.headers.get("Content-Range")) == offset:
            self.size = offset  # from the very end: nothing left
            self._empty = True
        else:
            raise status_error(status, shown, "GET")
        self._offset = offset

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        import aiohttp

        done = self._offset - self._skip
        if self._empty:
            return
        try:
            async for chunk in self._response.content.iter_chunked(CHUNK):
                done += len(chunk)
                if self._skip:
                    drop = min(self._skip, len(chunk))
                    chunk, self._skip = chunk[drop:], self._skip - drop
                    if not chunk:
                        continue
                yield chunk
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as exc:
            raise StreamCut(f"{self._shown}: the download was cut after {done} bytes") from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _client_error(exc, self._shown, "download") from None
        if self.size is not None and done < self.size:
            raise StreamCut(f"{self._shown}: the download ended after {done} of {self.size} bytes")

    async def close(self) -> None:
        self._response.release()
        await self._session.close()


def _content_range(value: str) -> tuple[int | None, int | None]:
    """(first byte, total) of `bytes FIRST-LAST/TOTAL` (total None when '*')."""
    unit, _, spec = value.partition(" ")
    span, _, total = spec.partition("/")
    first = span.partition("-")[0]
    if unit != "bytes" or not first.isdigit():
        return None, None
    return int(first), int(total) if total.isdigit() else None


def _unsatisfied_total(value: str | None) -> int | None:
    """The total of a 416 answer's `bytes */TOTAL`."""
    if not value or not value.startswith("bytes */"):
        return None
    total = value.removeprefix("bytes */")
    return int(total) if total.isdigit() else None
