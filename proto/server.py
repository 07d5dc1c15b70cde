"""Thin asyncio server: hello/auth, then dispatch of requests to async handlers.

Requests on one connection are handled one after another, in order (clients that want
parallelism open several connections); that keeps streams unambiguous and needs no
multiplexing. A connection whose bytes stop making sense gets an Error (when the socket still
allows it) and is closed; other connections are unaffected.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import logging
import ssl as ssl_
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import suppress
from typing import Any

from pageserver_api.errors import error_from_os
from proto.connection import MessageStream
from proto.errors import AuthFailed, InternalError, NeonError, NotFound, ProtocolError, Unavailable
from proto.frames import DEFAULT_MAX_FRAME_SIZE, PRE_AUTH_MAX_FRAME_SIZE
from proto.messages import (
    CONNECTION_ID,
    PROTOCOL_VERSION,
    Error,
    Hello,
    HelloOk,
    Request,
    Response,
    StreamData,
    StreamEnd,
)

log = logging.getLogger(__name__)

DEFAULT_HELLO_TIMEOUT = 10.0
DEFAULT_UPLOAD_IDLE_TIMEOUT = 300.0
"""An upload that sends nothing for this long is dropped: a sender that stalls without closing
its connection would otherwise hold the handler (a `recv` waiting for the rest of a snapshot,
its import open) for ever."""


class RequestContext:
    """What a handler sees of one request: its params and the byte streams in either direction."""

    def __init__(
        self,
        request: Request,
        stream: MessageStream,
        upload_idle_timeout: float = DEFAULT_UPLOAD_IDLE_TIMEOUT,
    ) -> None:
        self.request_id = request.id
        self.method = request.method
        self.params = request.params
        self.peer = stream.peer
        self.token = stream.token
        """The token the client's hello gave (already accepted by the server)."""
        self._stream = stream
        self.streamed = False
        """True once send() was used: the handler's result then ends the stream (StreamEnd)."""
        self.upload_ended = False
        self._upload_idle_timeout = upload_idle_timeout

    @property
    def client_left(self) -> bool:
        """The client closed the connection while the handler ran (e.g. its user pressed ^C):
        a long handler checks it before committing what nobody waits for any more."""
        return self._stream.peer_closed

    async def send(self, data: bytes | Sequence[bytes]) -> None:
        """Send download bytes to the client (or the concatenation of a sequence of them,
        not joined here: written as they are); waits while the client is slow to read."""
        self.streamed = True
        pieces = (data,) if isinstance(data, bytes | bytearray | memoryview) else data
        await self._stream.send_pieces(self.request_id, pieces)

    async def upload(self) -> AsyncIterator[bytes]:
        """The bytes the client uploads after its request, chunk by chunk, until its StreamEnd."""
        while not self.upload_ended:
            try:
                async with asyncio.timeout(self._upload_idle_timeout):
                    msg = await self._stream.recv()
            except Unavailable as exc:
                # The sender died mid-frame or reset the connection (a SIGKILL with unread
                # bytes in its socket sends an RST): a cut upload as much as a clean end is,
                # one error type for both, so that a receiver keeps what arrived either way.
                raise ProtocolError(
                    f"the upload of request {self.request_id} ({self.method}) was cut: "
                    f"{exc.message}"
                ) from None
            except TimeoutError:
                self._stream.failed = True  # a frame may still come: the connection is closed
                raise ProtocolError(
                    f"the upload of request {self.request_id} ({self.method}) stalled: nothing "
                    f"received for {self._upload_idle_timeout:g} s"
                ) from None
            if isinstance(msg, StreamData) and msg.id == self.request_id:
                yield msg.data
            elif isinstance(msg, StreamEnd) and msg.id == self.request_id:
                self.upload_ended = True
            else:
                self._stream.failed = True
                got = "end of connection" if msg is None else f"a {msg.TAG} message"
                raise ProtocolError(
                    f"expected upload data for request {self.request_id} ({self.method}), got {got}"
                )


Handler = Callable[[RequestContext], Awaitable[Any]]


def token_matches(expected: str, given: str | None) -> bool:
    """Constant-time comparison so response timing does not leak the token."""
    return given is not None and hmac.compare_digest(expected.encode(), given.encode())


Authenticate = Callable[[str | None], None]
"""Checks a hello's token; raises AuthFailed (with the reason) to refuse the connection."""


class ProtoServer:
    """Serves `handlers` (method name -> async handler(ctx) -> result) over TCP."""

    def __init__(
        self,
        handlers: Mapping[str, Handler],
        *,
        token: str | None,
        authenticate: Authenticate | None = None,
        server_name: str = "pageserver",
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        hello_timeout: float = DEFAULT_HELLO_TIMEOUT,
        upload_idle_timeout: float = DEFAULT_UPLOAD_IDLE_TIMEOUT,
    ) -> None:
        self._handlers = dict(handlers)
        self._token = token
        self._authenticate = authenticate
        """Replaces the fixed `token`'s check (a server whose tokens change, e.g. one-time)."""
        self.server_name = server_name
        self.max_frame_size = max_frame_size
        self.hello_timeout = hello_timeout
        self.upload_idle_timeout = upload_idle_timeout
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._closing = False
        self.host = ""
        self.port = 0

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, ssl: ssl_.SSLContext | None = None
    ) -> None:
        """Listen; with port 0 the OS picks a free port, readable afterwards as `self.port`;
        with `ssl`, TLS only (the handshake comes before the hello and its token)."""
        self._server = await asyncio.start_server(self._serve_connection, host, port, ssl=ssl)
        self.host, self.port = bound_address(self._server.sockets, host, port)
        log.info("%s listening on %s:%d", self.server_name, self.host, self.port)

    async def close(self) -> None:
        """Stop listening, cancel in-flight handlers and close every open connection."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> ProtoServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        stream = MessageStream(reader, writer, max_frame_size=self.max_frame_size)
        # Until its hello is verified a peer is a stranger: it may not make us buffer or
        # decode more than a hello needs.
        stream.limit_incoming(
            min(PRE_AUTH_MAX_FRAME_SIZE, self.max_frame_size), " before the hello is verified"
        )
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            if not self._closing and await self._handshake(stream):
                await self._serve_requests(stream)
        except NeonError as exc:
            # The peer misbehaved, failed authentication, or its socket died.
            log.info("closing connection from %s: %s", stream.peer, exc)
            await self._report(stream, Error.from_exception(CONNECTION_ID, exc))
        except asyncio.CancelledError:
            pass  # server shutdown: just close below
        except Exception:
            log.exception("connection from %s failed", stream.peer)
        finally:
            try:
                await stream.close()
            except asyncio.CancelledError:
                # Shut down while flushing: drop the connection. The task must not end
                # cancelled, or asyncio's stream callback prints the CancelledError as a
                # traceback (task.exception() raises it).
                stream.abort()
            self._connections.discard(task)

    async def _report(self, stream: MessageStream, error: Error) -> None:
        """Best effort: the socket may already be gone."""
        with suppress(NeonError):
            await stream.send(error)

    async def _handshake(self, stream: MessageStream) -> bool:
        """Check the hello; False if the peer left without one."""
        try:
            async with asyncio.timeout(self.hello_timeout):
                msg = await stream.recv()
        except TimeoutError:
            raise ProtocolError(f"no hello received within {self.hello_timeout:g} s") from None
        if msg is None:
            return False
        if not isinstance(msg, Hello):
            raise ProtocolError(f"expected a hello message first, got a {msg.TAG} message")
        if msg.protocol_version != PROTOCOL_VERSION:
            raise ProtocolError(
                f"protocol version mismatch: client speaks version {msg.protocol_version}, "
                f"{self.server_name} speaks version {PROTOCOL_VERSION}; upgrade the older side"
            )
        if self._authenticate is not None:
            self._authenticate(msg.token)
        elif self._token is not None and not token_matches(self._token, msg.token):
            raise AuthFailed(
                f"{self.server_name} requires a token and none was given"
                if msg.token is None
                else f"wrong token for {self.server_name}"
            )
        stream.token = msg.token
        stream.limit_incoming(self.max_frame_size)
        await stream.send(HelloOk(PROTOCOL_VERSION, self.server_name))
        log.debug("hello from %s (%s)", stream.peer, msg.client_name)
        return True

    async def _serve_requests(self, stream: MessageStream) -> None:
        unread_upload: int | None = None
        while (msg := await stream.recv()) is not None:
            if isinstance(msg, StreamData | StreamEnd) and msg.id == unread_upload:
                # The rest of an upload whose handler answered without reading it all.
                if isinstance(msg, StreamEnd):
                    unread_upload = None
                continue
            if not isinstance(msg, Request):
                raise ProtocolError(f"expected a request, got a {msg.TAG} message")
            ctx = RequestContext(msg, stream, self.upload_idle_timeout)
            frame = await self._dispatch(ctx, stream)
            await stream.write_frame(frame)
            unread_upload = None if ctx.upload_ended else msg.id

    async def _dispatch(self, ctx: RequestContext, stream: MessageStream) -> bytes:
        """Run the handler; return the encoded reply frame (result or error)."""
        reply: Response | StreamEnd | Error
        try:
            handler = self._handlers.get(ctx.method)
            if handler is None:
                raise NotFound(
                    f"{self.server_name} has no method {ctx.method!r} "
                    "(client and server versions differ?)"
                )
            result = await handler(ctx)
            reply = (StreamEnd if ctx.streamed else Response)(ctx.request_id, result)
        except NeonError as exc:
            if stream.failed:
                raise  # the connection itself broke: report and close
            reply = Error.from_exception(ctx.request_id, exc)
        except OSError as exc:
            if stream.failed:
                raise
            # A full or read-only filesystem is the operator's to fix, not a bug: say where.
            log.error("handler for %r failed: %s", ctx.method, exc)
            reply = Error.from_exception(ctx.request_id, error_from_os(exc))
        except Exception as exc:
            if stream.failed:
                raise
            log.exception("handler for %r failed", ctx.method)
            reply = Error(ctx.request_id, InternalError.code, _internal(ctx.method, exc))
        try:
            return stream.encode(reply)
        except ProtocolError as exc:
            log.error("result of %r cannot be sent: %s", ctx.method, exc)
            message = f"the result of {ctx.method!r} cannot be sent: {exc}"
            return stream.encode(Error(ctx.request_id, InternalError.code, message))


def bound_address(sockets: Sequence[Any], host: str, port: int) -> tuple[str, int]:
    """The address a server just started listens on. Two processes that bind one port with
    SO_REUSEADDR before either listens both bind; the second's listen() then fails with
    EADDRINUSE, which uvloop hands to the loop's exception handler, closing the socket, that
    `sockets` lists as None: the daemon died of an AttributeError instead of the OSError the
    CLI retries on another port (cli/pageserver_control.py). Raised here as that OSError."""
    if not sockets or any(sock is None for sock in sockets):
        raise OSError(errno.EADDRINUSE, f"address already in use: cannot listen on {host}:{port}")
    bound = sockets[0].getsockname()
    return str(bound[0]), int(bound[1])


def _internal(method: str, exc: BaseException) -> str:
    return f"internal error in {method!r}: {type(exc).__name__}: {exc} (see the server log)"
