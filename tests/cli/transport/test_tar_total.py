"""A push tells the receiving side the tar size its daemon announced (`expect_tar`), for the
receiver's progress bar: over neon:// as `object.write`'s `tar_total`, over http as the PUT's
`X-Neon-Tar-Total`; a resumed write too (its request opens at the first differing block).
The request waits for the first chunk (the total comes before it), and without a total
nothing is added (an older receiver, a plain server see what they saw before). Against
real servers on 127.0.0.1 that record what they were sent."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from cli.transport import parse_location
from cli.transport.base import Location
from cli.transport.blocking import BlockingWriter
from cli.transport.http import PARTIAL_PATH, RESUME_AT, TAR_TOTAL
from cli.transport.resume import RESUME_BLOCK
from proto.server import ProtoServer, RequestContext

DATA = bytes(range(256)) * (RESUME_BLOCK // 256 * 2 + 40)  # two blocks and a bit
NAME = "x.neon"


@dataclass
class Seen:
    """What a recording server was sent: each write's params or headers, and body."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    kept: int = 0
    """The prefix of DATA it says it holds of a cut push (its `partial` answer)."""

    def partial(self) -> dict[str, Any]:
        blocks = [DATA[i : i + RESUME_BLOCK] for i in range(0, self.kept, RESUME_BLOCK)]
        return {"size": self.kept, "digests": [hashlib.sha256(b).hexdigest() for b in blocks]}


async def neon_server(seen: Seen) -> ProtoServer:
    async def write(ctx: RequestContext) -> Any:
        seen.requests.append(dict(ctx.params))
        seen.bodies.append(b"".join([chunk async for chunk in ctx.upload()]))
        return {}

    async def partial(ctx: RequestContext) -> Any:
        return seen.partial()

    server = ProtoServer(
        {"object.write": write, "object.partial": partial}, token="t", server_name="recorder"
    )
    await server.start("127.0.0.1", 0)
    return server


async def http_server(seen: Seen) -> web.AppRunner:
    async def put(request: web.Request) -> web.Response:
        seen.requests.append(dict(request.headers))
        seen.bodies.append(await request.read())
        return web.Response(status=201)

    async def partial(request: web.Request) -> web.Response:
        return web.json_response(seen.partial())

    app = web.Application(client_max_size=1 << 30)
    app.router.add_get(f"/{PARTIAL_PATH}{{name}}", partial)
    app.router.add_put("/{name}", put)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


async def serving(scheme: str, seen: Seen) -> tuple[Location, Callable[[], Any]]:
    """The location of NAME at a recording server of `scheme`, and what stops it."""
    if scheme == "neon":
        server = await neon_server(seen)
        return parse_location(f"neon://127.0.0.1:{server.port}/{NAME}?token=t"), server.close
    runner = await http_server(seen)
    port = runner.addresses[0][1]
    return parse_location(f"http://127.0.0.1:{port}/{NAME}?token=t"), runner.cleanup


def total_sent(scheme: str, request: dict[str, Any]) -> int | None:
    if scheme == "neon":
        return request.get("tar_total")
    return int(request[TAR_TOTAL]) if TAR_TOTAL in request else None


async def push(location: Location, total: int | None, *, resumable: bool) -> None:
    """DATA through the writer a push opens, told `total` before its first byte."""
    store = location.store
    opening = store.open_resumable if resumable else store.open_write
    async with await opening(NAME, overwrite=False) as writer:
        if total is not None:
            writer.expect_tar(total)
        for start in range(0, len(DATA), 1 << 20):
            await writer.write(DATA[start : start + (1 << 20)])


@pytest.mark.parametrize("scheme", ["neon", "http"])
async def test_the_total_goes_with_the_upload_request(scheme: str) -> None:
    seen = Seen()
    location, stop = await serving(scheme, seen)
    try:
        await push(location, 987654321, resumable=False)
        await push(location, None, resumable=False)
    finally:
        await stop()
    assert [total_sent(scheme, r) for r in seen.requests] == [987654321, None]
    assert seen.bodies == [DATA, DATA]


@pytest.mark.parametrize("scheme", ["neon", "http"])
async def test_a_resumed_write_sends_the_total_with_its_later_request(scheme: str) -> None:
    """The far side holds DATA's first block: the request opens at the second, with the
    total (the receiver's bar counts the kept block too)."""
    seen = Seen(kept=RESUME_BLOCK)
    location, stop = await serving(scheme, seen)
    try:
        await push(location, 5555, resumable=True)
    finally:
        await stop()
    [request] = seen.requests
    resumed = request.get("resume_at") if scheme == "neon" else int(request[RESUME_AT])
    assert (resumed, total_sent(scheme, request)) == (RESUME_BLOCK, 5555)
    assert seen.bodies == [DATA[RESUME_BLOCK:]]


@pytest.mark.parametrize("scheme", ["neon", "http"])
async def test_no_request_before_the_first_chunk(scheme: str) -> None:
    """Opened, the writer has sent nothing (the daemon's total may still come); an abort
    before any chunk sends nothing and lets its connection go."""
    seen = Seen()
    location, stop = await serving(scheme, seen)
    try:
        writer = await location.store.open_write(NAME, overwrite=False)
        await asyncio.sleep(0.2)
        assert seen.requests == []
        await writer.abort()
        async with await location.store.open_write(NAME, overwrite=False) as empty:
            empty.expect_tar(0)
    finally:
        await stop()
    assert [total_sent(scheme, r) for r in seen.requests] == [0]
    assert seen.bodies == [b""]


def test_a_blocking_writer_hands_the_total_to_its_first_write() -> None:
    """push's BlockingWriter, opened with a total coming, is told it on the daemon's thread
    before the first write (on another thread): the request carries it. Opened without,
    its request goes at once (the receiver readies itself while the file is made)."""
    seen = Seen()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    try:
        location, stop = asyncio.run_coroutine_threadsafe(serving("neon", seen), loop).result()
        with BlockingWriter(location, overwrite=False, resume=True, deferred=True) as out:
            out.open(total_coming=True)
            told = threading.Thread(target=out.expect_tar, args=(4242,))
            told.start()
            told.join()
            out.write(DATA)
        # No total coming (a delta pushed with no bar): the request goes at the open.
        with BlockingWriter(location, overwrite=False, resume=True) as out:
            deadline = time.monotonic() + 30
            while len(seen.requests) < 2:
                assert time.monotonic() < deadline, "no request before the first write"
                time.sleep(0.01)
            out.write(DATA)
        asyncio.run_coroutine_threadsafe(stop(), loop).result()
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
    assert [total_sent("neon", r) for r in seen.requests] == [4242, None]
    assert seen.bodies == [DATA, DATA]
