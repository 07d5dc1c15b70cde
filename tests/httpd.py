"""A real aiohttp file server on 127.0.0.1 for tests: GET (with Range), HEAD, PUT, DELETE on
the files of one directory.

PUT streams the body into a hidden temporary file and renames it into place only once the
whole body arrived (a cut upload leaves nothing), answers 412 to `If-None-Match: *` when the
file exists, and 401 without the right basic auth when a password is set. `cut_gets` makes the
next GETs send part of the body and then drop the connection, as a failing network would.
`refuse_chunked` answers a chunked PUT as AWS S3 answers a chunked PutObject (501
NotImplemented naming the Transfer-Encoding header).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from tests.pgtest import free_port

S3_CHUNKED_REFUSAL = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>NotImplemented</Code><Message>A '
    "header you provided implies functionality that is not implemented</Message><Header>"
    "Transfer-Encoding</Header><RequestId>0</RequestId><HostId>0</HostId></Error>"
)
"""What AWS S3 answers a PutObject sent with `Transfer-Encoding: chunked`."""


@dataclass
class FileServer:
    root: Path
    port: int
    auth: tuple[str, str] | None = None
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    """(method, file name, Range header) of every request."""
    cut_gets: list[int] = field(default_factory=list)
    """Byte counts: each next GET sends that many bytes, then drops the connection."""
    refuse_puts: int | None = None
    """An HTTP status every PUT gets (after reading the body's first chunk)."""
    hold_puts: bool = False
    """PUTs stop reading after their first chunk (set `put_started`) until the client goes."""
    put_started: threading.Event = field(default_factory=threading.Event)
    refuse_chunked: bool = False
    """PUTs without a Content-Length (chunked) get S3's 501 NotImplemented."""
    put_lengths: list[str | None] = field(default_factory=list)
    """The Content-Length header of every PUT (None: chunked)."""
    live_index: bool = False
    """PUTs are answered with `X-Neon-Index: live`, as a `neon snapshot recv --http` does."""

    scheme: str = "http"
    """https when served with a certificate (`file_server(tls=...)`)."""

    @property
    def base(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def url(self, name: str, *, with_auth: bool = True) -> str:
        if self.auth is not None and with_auth:
            return f"{self.scheme}://{self.auth[0]}:{self.auth[1]}@127.0.0.1:{self.port}/{name}"
        return f"{self.base}/{name}"

    def _authorized(self, request: web.Request) -> bool:
        if self.auth is None:
            return True
        expected = base64.b64encode(f"{self.auth[0]}:{self.auth[1]}".encode()).decode()
        return request.headers.get("Authorization") == f"Basic {expected}"

    def _path(self, request: web.Request) -> Path:
        name = request.match_info["name"]
        if "/" in name or name.startswith("."):
            raise web.HTTPForbidden()
        return self.root / name

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = self._path(request)
        self.requests.append((request.method, path.name, request.headers.get("Range")))
        if not self._authorized(request):
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="t"'})
        if request.method == "PUT":
            return await self._put(request, path)
        if request.method == "DELETE":
            if not path.is_file():
                return web.Response(status=404)
            path.unlink()
            return web.Response(status=204)
        if not path.is_file():
            return web.Response(status=404)
        if request.method == "GET" and self.cut_gets:
            return await self._cut_get(request, path, self.cut_gets.pop(0))
        return web.FileResponse(path)  # GET and HEAD, with Range

    async def _put(self, request: web.Request, path: Path) -> web.StreamResponse:
        self.put_lengths.append(request.headers.get("Content-Length"))
        if self.refuse_chunked and "chunked" in request.headers.get("Transfer-Encoding", ""):
            return web.Response(status=501, text=S3_CHUNKED_REFUSAL, content_type="application/xml")
        if request.headers.get("If-None-Match") == "*" and path.exists():
            return web.Response(status=412)
        if self.refuse_puts is not None:
            await request.content.readany()
            return web.Response(status=self.refuse_puts)
        tmp = path.with_name(f".{path.name}.upload")
        try:
            with tmp.open("wb") as out:
                async for chunk in request.content.iter_chunked(1 << 20):
                    out.write(chunk)
                    self.put_started.set()
                    while (
                        self.hold_puts and request.transport and not request.transport.is_closing()
                    ):
                        await asyncio.sleep(0.02)
            if request.headers.get("If-None-Match") == "*" and path.exists():
                return web.Response(status=412)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return web.Response(status=201, headers={"X-Neon-Index": "live"} if self.live_index else {})

    async def _cut_get(self, request: web.Request, path: Path, after: int) -> web.StreamResponse:
        data = path.read_bytes()
        start = 0
        header = request.headers.get("Range")
        if header:
            start = int(header.removeprefix("bytes=").split("-")[0])
        response = web.StreamResponse(status=206 if header else 200)
        response.content_length = len(data) - start
        if header:
            response.headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        await response.prepare(request)
        await response.write(data[start : start + after])
        assert request.transport is not None
        request.transport.close()  # the network drops
        return response


def _client_gone(request: web.Request) -> bool:
    return request.transport is None or request.transport.is_closing()


async def _cancel_others() -> None:
    """End the handlers still lingering on cut connections before the loop closes."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@contextlib.contextmanager
def file_server(
    root: Path, auth: tuple[str, str] | None = None, tls: tuple[Path, Path] | None = None
) -> Iterator[FileServer]:
    """A FileServer on 127.0.0.1 serving `root`, in a thread of its own; stopped at exit.
    With `tls` (a certificate and its key: tests/tls.py), over https."""
    server = FileServer(root, free_port(), auth, scheme="http" if tls is None else "https")
    context = None
    if tls is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*tls)
    loop = asyncio.new_event_loop()
    app = web.Application(client_max_size=1 << 40)
    app.router.add_route("*", "/{name}", server.handle)
    # An answer sent before the body was read (a refusal) would keep its connection reading
    # the rest for 10 s (aiohttp's lingering), and the server's shutdown waits for it.
    runner = web.AppRunner(app, lingering_time=1.0)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", server.port, ssl_context=context)
    loop.run_until_complete(site.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=30)
        asyncio.run_coroutine_threadsafe(_cancel_others(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()
