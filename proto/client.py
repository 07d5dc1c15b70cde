"""Thin asyncio client: connect + hello, then one request at a time.

A connection carries one request at a time (the server handles them sequentially anyway);
open several clients for parallelism. If a request is abandoned midway (cancelled, or a
download left unfinished) the connection can no longer be trusted and is closed.
"""

from __future__ import annotations

import asyncio
import ssl as ssl_
from collections.abc import AsyncIterable
from typing import Any

from proto.connection import READ_BUFFER, MessageStream
from proto.errors import AuthFailed, Conflict, InvalidArgument, ProtocolError, Unavailable
from proto.frames import DEFAULT_MAX_FRAME_SIZE
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

DEFAULT_CONNECT_TIMEOUT = 10.0
PAGESERVER = "the pageserver"
PAGESERVER_HINT = "is it running? (`neon pageserver start` starts the local one)"


def tls_context(ca_file: str | None) -> ssl_.SSLContext:
    """A client context verifying the server's certificate and host name, against `ca_file`
    (the certificate the user gave, e.g. a self-signed one) or else the system's CAs."""
    try:
        return ssl_.create_default_context(cafile=ca_file)
    except (OSError, ssl_.SSLError) as exc:
        raise InvalidArgument(f"cannot load the CA file {ca_file}: {exc}") from None


class ProtoClient:
    """A connection to a pageserver (or another server of the protocol: `peer` names it in
    messages); build it with `await ProtoClient.connect(...)`."""

    def __init__(
        self, stream: MessageStream, *, address: str, server_name: str, peer: str = PAGESERVER
    ) -> None:
        self._stream = stream
        self.address = address
        self.peer = peer
        self.server_name = server_name
        self._next_id = 1
        self._busy = False
        self._in_sync = True
        self._closed = False

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        token: str | None = None,
        client_name: str = "neon-cli",
        timeout: float = DEFAULT_CONNECT_TIMEOUT,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        peer: str = PAGESERVER,
        hint: str = PAGESERVER_HINT,
        ssl: ssl_.SSLContext | None = None,
    ) -> ProtoClient:
        """Connect and authenticate; `timeout` bounds the TCP connect and the hello. `peer`
        names the server in messages, `hint` says what to check when it cannot be reached.
        With `ssl` the connection is TLS, the server's certificate checked by that context
        (against `host` when it checks host names) before the hello sends the token."""
        address = f"{host}:{port}"
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=ssl, limit=READ_BUFFER
                )
        except TimeoutError:
            raise Unavailable(
                f"timed out after {timeout:g} s connecting to {peer} at {address}"
            ) from None
        except ssl_.SSLCertVerificationError as exc:
            raise AuthFailed(
                f"{peer} at {address} presented a certificate that does not verify: "
                f"{exc.verify_message or exc}; give the CA that signed it (-c ca=PATH)"
            ) from None
        except ssl_.SSLError as exc:
            raise Unavailable(
                f"TLS with {peer} at {address} failed: {exc.reason or exc} (does it serve "
                "TLS? a pageserver does with --tls-cert/--tls-key)"
            ) from None
        except OSError as exc:
            raise Unavailable(
                f"cannot connect to {peer} at {address}: {exc.strerror or exc}; {hint}"
            ) from exc
        stream = MessageStream(reader, writer, max_frame_size=max_frame_size)
        try:
            async with asyncio.timeout(timeout):
                await stream.send(Hello(PROTOCOL_VERSION, token, client_name))
                reply = await stream.recv()
        except TimeoutError:
            stream.abort()
            raise Unavailable(
                f"the server at {address} did not answer the hello within {timeout:g} s "
                "(is it a pg-neon pageserver?)"
            ) from None
        except BaseException:
            stream.abort()
            raise
        if isinstance(reply, HelloOk) and reply.protocol_version == PROTOCOL_VERSION:
            return cls(stream, address=address, server_name=reply.server_name, peer=peer)
        await stream.close()
        if isinstance(reply, Error):
            err = reply.to_exception()
            raise type(err)(f"{peer} at {address} refused the connection: {err}")
        if reply is None:
            raise Unavailable(
                f"the server at {address} closed the connection during the hello (a pageserver "
                "serving TLS does so to a plain connection: attach the storage with -c tls=on)"
            )
        raise ProtocolError(f"the server at {address} answered the hello with {reply!r}")

    async def __aenter__(self) -> ProtoClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._stream.close()

    async def call(self, method: str, /, **params: Any) -> Any:
        """Run one plain request and return its result (or raise the server's typed error)."""
        rid = await self._start(method, params)
        try:
            reply = await self._recv(rid)
            if isinstance(reply, StreamData):
                raise ProtocolError(f"{method!r} returns a byte stream: use download()")
            if not isinstance(reply, Response):
                raise ProtocolError(f"unexpected {reply.TAG} message in reply to {method!r}")
            return reply.result
        finally:
            await self._finish()

    def download(self, method: str, /, **params: Any) -> Download:
        """A byte stream produced by the server; iterate it, then read `.result`."""
        return Download(self, method, params)

    async def upload(self, method: str, chunks: AsyncIterable[bytes], /, **params: Any) -> Any:
        """Send a request followed by `chunks`; return the server's result.

        If the server answers before the upload is complete (normally with an error), the rest
        of `chunks` is not read. If iterating `chunks` fails, the connection is closed so the
        server never mistakes a partial upload for a complete one.
        """
        rid = await self._start(method, params)
        sender = asyncio.create_task(self._send_chunks(rid, chunks))
        receiver = asyncio.create_task(self._recv(rid))
        try:
            await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
            if not receiver.done():
                sender.result()  # the whole upload was sent, or raise why it was not
            elif not sender.done():
                # The server answered before the end of the upload (normally an error): stop
                # reading `chunks` and end the stream so the connection stays in sync.
                answered, self._in_sync = self._in_sync, False
                await _cancel(sender)
                await self._stream.send(StreamEnd(rid, None))
                self._in_sync = answered
            reply = await receiver
            if not isinstance(reply, Response):
                raise ProtocolError(f"unexpected {reply.TAG} message in reply to {method!r}")
            return reply.result
        finally:
            await _cancel(sender)
            await _cancel(receiver)
            await self._finish()

    async def _send_chunks(self, rid: int, chunks: AsyncIterable[bytes]) -> None:
        async for chunk in chunks:
            await self._stream.send_data(rid, chunk)
        await self._stream.send(StreamEnd(rid, None))

    async def _start(self, method: str, params: dict[str, Any]) -> int:
        """Claim the connection and send a request; encoding errors leave it usable."""
        if self._closed or self._stream.failed:
            raise Unavailable(f"the connection to {self.peer} at {self.address} is closed")
        if self._busy:
            raise Conflict(
                f"the connection to {self.address} is busy with another request "
                "(one request at a time per client)"
            )
        rid = self._next_id
        frame = self._stream.encode(Request(rid, method, params))
        self._next_id += 1
        self._busy = True
        self._in_sync = False
        try:
            await self._stream.write_frame(frame)
        except BaseException:
            await self._finish()
            raise
        return rid

    async def _recv(self, rid: int) -> Response | StreamData | StreamEnd:
        """Next message for request `rid`; a typed Error from the server is raised."""
        reply = await self._stream.recv()
        if reply is None:
            raise Unavailable(f"{self.peer} at {self.address} closed the connection")
        if isinstance(reply, Error) and reply.id in (rid, CONNECTION_ID):
            self._in_sync = reply.id == rid
            raise reply.to_exception()
        if not isinstance(reply, Response | StreamData | StreamEnd) or reply.id != rid:
            raise ProtocolError(f"unexpected {reply!r} from {self.address} (expected id {rid})")
        self._in_sync = not isinstance(reply, StreamData)
        return reply

    async def _finish(self) -> None:
        """Release the connection; close it if the request ended midway."""
        self._busy = False
        if not self._in_sync:
            await self.close()


class Download:
    """Async iterator over a download's chunks; `result` holds the handler's result afterwards.

    Use `async with client.download(...) as stream:` so a download abandoned midway closes the
    connection (it cannot be resynchronized).
    """

    def __init__(self, client: ProtoClient, method: str, params: dict[str, Any]) -> None:
        self._client = client
        self._method = method
        self._params = params
        self._rid: int | None = None
        self._done = False
        self._result: Any = None

    @property
    def result(self) -> Any:
        if not self._done:
            raise RuntimeError("the download is not finished: iterate it to the end first")
        return self._result

    def __aiter__(self) -> Download:
        return self

    async def __anext__(self) -> bytes:
        if self._done:
            raise StopAsyncIteration
        if self._rid is None:
            self._rid = await self._client._start(self._method, self._params)
        try:
            reply = await self._client._recv(self._rid)
        except BaseException:
            await self._end()
            raise
        if isinstance(reply, StreamData):
            return reply.data
        self._result = reply.result
        await self._end()
        raise StopAsyncIteration

    async def _end(self) -> None:
        self._done = True
        await self._client._finish()

    async def aclose(self) -> None:
        """Abandon the download if unfinished (closing the connection)."""
        if self._rid is not None and not self._done:
            await self._end()
        self._done = True

    async def read(self) -> bytes:
        """All remaining bytes at once (for small downloads)."""
        return b"".join([chunk async for chunk in self])

    async def __aenter__(self) -> Download:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


async def _cancel(task: asyncio.Task[Any]) -> None:
    """Cancel and reap a helper task without swallowing our own cancellation."""
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled():
        task.exception()  # retrieved: its error was already handled or is irrelevant


def call_sync(
    host: str,
    port: int,
    method: str,
    /,
    *,
    token: str | None = None,
    timeout: float = DEFAULT_CONNECT_TIMEOUT,
    **params: Any,
) -> Any:
    """One call from synchronous code (the click CLI): connect, call, close."""

    async def run() -> Any:
        async with await ProtoClient.connect(host, port, token=token, timeout=timeout) as client:
            return await client.call(method, **params)

    return asyncio.run(run())
