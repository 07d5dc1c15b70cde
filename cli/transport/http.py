"""`http(s)://HOST[:PORT]/PATH`: objects are URLs of a web server that accepts PUT (a `neon
snapshot recv --http`, a WebDAV or object store endpoint, an S3 presigned URL).

Read: a streamed GET; from an offset with `Range: bytes=N-` (a server that ignores it sends
the whole object and the first N bytes are skipped). A connection cut mid-body is a
`StreamCut`, so `read_object` resumes where it stopped. Write: a streamed PUT (chunked: the
size of a `.neon` file is known only at its end) with `If-None-Match: *` unless overwriting,
so a server that honours it never replaces an object; the object exists once the server
answered 2xx to the complete body. An aborted upload closes the connection mid-body: a server
must not keep an incomplete body (aiohttp, S3, WebDAV servers do not). No listing: plain HTTP
has none.

Credentials in the URL (`https://user:password@host/...`) are sent as basic auth and masked
in every message; a query string (a presigned URL's signature) is masked too, and such a URL
is signed for one method, so `stat` does not try a HEAD with it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote, urlsplit, urlunsplit

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
from proto.errors import AuthFailed, InvalidArgument, NeonError, NotFound, Unavailable

if TYPE_CHECKING:
    import aiohttp

URL_FORM = "http(s)://HOST[:PORT]/PATH"
CONNECT_TIMEOUT, READ_TIMEOUT = 30, 300  # seconds; no limit on a whole transfer
_REASON_BYTES = 500


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
    if status in (405, 501):
        return InvalidArgument(f"{url}: the server does not accept {method} (HTTP {status})")
    if status == 411:
        return InvalidArgument(
            f"{url}: the server wants the size before the upload (HTTP 411), which a streamed "
            "snapshot does not have; use a server that accepts chunked uploads"
        )
    if status == 507:
        return Unavailable(f"{url}: the server has no space left (HTTP 507){why}")
    if status in (400, 422) and reason:
        return InvalidArgument(f"{url}: the server refused the {method} (HTTP {status}){why}")
    return Unavailable(f"{url}: the server answered {method} with HTTP {status}{why}")


async def _reason(response: aiohttp.ClientResponse) -> str:
    """The first line of a short plain-text answer body (a server's reason), else ''."""
    if not response.headers.get("Content-Type", "").startswith("text/plain"):
        return ""
    try:
        text = (await response.content.read(_REASON_BYTES)).decode("utf-8", "replace")
    except Exception:  # the reason is a courtesy: the status alone still says enough
        return ""
    first = text.strip().splitlines()[0] if text.strip() else ""
    return "".join(c for c in first if c.isprintable())


def _client_error(exc: BaseException, url: str, doing: str) -> Unavailable:
    reason = str(exc) or type(exc).__name__
    return Unavailable(f"cannot {doing} {url}: {reason}")


class HttpStore(Store):
    guess_delta = False

    def __init__(self, base: str, query: str) -> None:
        self._base, self._query = base, query
        self.url = _shown(base)

    def _real_url(self, name: str) -> str:
        check_object_name(name, self.url)
        return self._base + quote(name) + (f"?{self._query}" if self._query else "")

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
        raise InvalidArgument(
            f"{self.url}: an http(s) server cannot list its files; give the URL of a .neon file"
        )

    async def open_write(self, name: str, *, overwrite: bool) -> ObjectWriter:
        return HttpWriter(self._real_url(name), self.object_url(name), overwrite)

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


class HttpWriter(QueuedUploadWriter):
    """A PUT whose body is fed by `write`; `commit` ends the body and awaits the answer."""

    def __init__(self, url: str, shown: str, overwrite: bool) -> None:
        self._url, self._overwrite = url, overwrite
        super().__init__(shown)

    async def _upload(self, body: AsyncIterator[bytes]) -> None:
        import aiohttp

        headers = {"Content-Type": "application/octet-stream"}
        if not self._overwrite:
            headers["If-None-Match"] = "*"
        try:
            async with (
                aiohttp.ClientSession(timeout=_timeout()) as session,
                session.put(self._url, data=body, headers=headers) as response,
            ):
                if response.status not in (200, 201, 204):
                    raise status_error(response.status, self._shown, "PUT", await _reason(response))
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _client_error(exc, self._shown, "upload to") from None


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
