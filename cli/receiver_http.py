"""A `neon snapshot recv --http`: `PUT /NAME.neon?token=TOKEN` (what `neon snapshot push
--to http://...` sends) answered by a `Receiver`.

The token comes from the query or an `Authorization: Bearer` header. Answers: 201 once the
snapshot is imported; 401 for a missing, wrong or used token; 412 when a snapshot of that
name exists; 400 for a stream that does not check out; 507 when the disk is full; each with
the reason as one line of plain text (the pushing side shows it). HEAD answers whether the
name is taken; `GET /neon-index.json` (with the token) lists the snapshots held here as an
http store's index does (cli/transport/http.py), each described by its manifest, so that a
push sends a delta on one of them (that answer and the 201 say `X-Neon-Index: live`: the
pusher writes no index here, nor GETs it with the token the PUT used up); no snapshot is
served for reading. `GET /.partial/NAME.neon` answers what a cut push of that file left
here (its size and block digests, cli/receiver_partials.py), and a PUT with
`X-Neon-Resume-At: N` sends the bytes from N on: the kept ones go first. `X-Neon-Tar-Total`
is the tar size the pusher's daemon announced: the progress bar's total (none: bytes and
rate, as from an older pusher or a plain `curl -T`).
"""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import ClientPayloadError, web

from cli.receiver import Received, Receiver
from cli.transport.base import CHUNK
from cli.transport.http import INDEX_NAME, LIVE_INDEX, PARTIAL_PATH, RESUME_AT, TAR_TOTAL
from proto.errors import (
    AlreadyExists,
    AuthFailed,
    InvalidArgument,
    NeonError,
    NoSpace,
    NotFound,
    ProtocolError,
)

_STATUS: list[tuple[type[NeonError], int]] = [
    (AuthFailed, 401),
    (AlreadyExists, 412),
    (NotFound, 404),
    (NoSpace, 507),
]


def receiver_app(receiver: Receiver, on_received: Callable[[Received], None]) -> web.Application:
    async def put(request: web.Request) -> web.Response:
        token = _token(request)
        receiver.authenticate(token)  # first: nothing else is looked at without the token
        resume_at = resume_offset(request.headers.get(RESUME_AT))
        tar_total = byte_header(request.headers.get(TAR_TOTAL), TAR_TOTAL)
        received = await receiver.receive(
            request.match_info["name"], _body(request), token, resume_at, tar_total
        )
        on_received(received)
        text = f"received snapshot {received.snapshot.name}\n"
        return web.Response(status=201, text=text, headers={LIVE_INDEX: "live"})

    async def head(request: web.Request) -> web.Response:
        receiver.authenticate(_token(request))
        found = await receiver.stat(request.match_info["name"])
        return web.Response(status=404 if found is None else 200)

    async def index(request: web.Request) -> web.Response:
        receiver.authenticate(_token(request))
        listed = [info.to_wire() for info in await receiver.list()]
        return web.json_response(listed, headers={LIVE_INDEX: "live"})

    async def partial(request: web.Request) -> web.Response:
        receiver.authenticate(_token(request))
        found = await receiver.partial(request.match_info["name"])
        return web.json_response({"size": found.size, "digests": list(found.digests)})

    app = web.Application(middlewares=[_errors])
    app.router.add_get(f"/{PARTIAL_PATH}{{name}}", partial, allow_head=False)
    app.router.add_get(f"/{INDEX_NAME}", index, allow_head=False)
    app.router.add_put("/{name}", put)
    app.router.add_route("HEAD", "/{name}", head)
    return app


def resume_offset(header: str | None) -> int:
    """The byte a PUT's `X-Neon-Resume-At` resumes from (none: 0)."""
    return byte_header(header, RESUME_AT) or 0


def byte_header(header: str | None, name: str) -> int | None:
    """The byte count a PUT's header `name` holds (none: None); InvalidArgument for
    anything but ASCII digits (`str.isdigit` takes '²', which `int` refuses)."""
    if header is None:
        return None
    if not (header.isascii() and header.isdecimal()):
        raise InvalidArgument(f"{name} must be a byte count, not {header[:40]!r}")
    return int(header)


def _token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        return header.removeprefix("Bearer ").strip()
    return request.query.get("token")


async def _body(request: web.Request) -> AsyncIterator[bytes]:
    """The PUT's body; a connection lost midway is a cut upload (ProtocolError, as over
    neon://), whose bytes the receiver keeps for the push run again."""
    try:
        async for chunk in request.content.iter_chunked(CHUNK):
            yield chunk
    except (ConnectionError, ClientPayloadError) as exc:
        raise ProtocolError(f"the upload was cut: {exc or type(exc).__name__}") from None


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """A refusal is a status and its reason in one line of text."""
    try:
        return await handler(request)
    except NeonError as exc:
        status = next((code for kind, code in _STATUS if isinstance(exc, kind)), 400)
        return web.Response(status=status, text=exc.message + "\n")
    except OSError as exc:
        status = 507 if exc.errno == errno.ENOSPC else 500
        return web.Response(status=status, text=f"{exc.strerror or exc}\n")
