"""Opening the replication connection's byte streams so that what the server sent before it
reset the connection is still read.

PostgreSQL ends a walsender it terminates (`pg_terminate_backend`, shutdown) with an
ErrorResponse, then exits; status updates we sent that it had not read make its kernel answer
with a reset (RST) instead of a FIN. Our kernel keeps the ErrorResponse readable, and the
transport reads it into the StreamReader's buffer, but asyncio's `StreamReader.read` raises a
recorded connection error before returning buffered bytes: the server's own reason ("terminating
connection due to administrator command") was lost behind "Connection reset by peer" whenever
both had arrived before the next read. And when our next status update meets the reset first,
the transport's failed write closes it before it has read the ErrorResponse at all: the bytes
the kernel still holds are read then (a socket that got a reset returns its queued data before
the error: tcp_recvmsg copies from the receive queue before it looks at sk_err).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator


class DataFirstReader(asyncio.StreamReader):
    """A StreamReader whose connection error comes after the bytes received before it."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit=limit)
        self.deferred_error: BaseException | None = None
        self.sock: socket.socket | None = None
        """The connection's socket, for the bytes a closing transport left unread."""

    def set_exception(self, exc: BaseException) -> None:
        # The transport calls this from connection_lost(exc), before it closes the socket:
        # take what the kernel still holds, end the stream like an EOF and keep the error
        # for the read that finds nothing left.
        self.deferred_error = exc
        for data in self._unread():
            self.feed_data(data)
        self.feed_eof()

    def _unread(self) -> Iterator[bytes]:
        if self.sock is None:
            return
        try:
            fd = os.dup(self.sock.fileno())
        except OSError:
            return
        with socket.socket(fileno=fd) as dup:
            dup.setblocking(False)
            while True:
                try:
                    data = dup.recv(1 << 16)
                except OSError:  # EAGAIN: nothing more; ECONNRESET: everything was read
                    return
                if not data:
                    return
                yield data

    async def read(self, n: int = -1) -> bytes:
        data = await super().read(n)
        if not data and n != 0 and self.deferred_error is not None:
            raise self.deferred_error
        return data


async def open_streams(
    host: str, port: int, unix_path: str | None, limit: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """asyncio.open_connection / open_unix_connection (`unix_path`), with a DataFirstReader."""
    loop = asyncio.get_running_loop()
    reader = DataFirstReader(limit)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    if unix_path is None:
        transport, _ = await loop.create_connection(lambda: protocol, host, port)
    else:
        transport, _ = await loop.create_unix_connection(lambda: protocol, unix_path)
    reader.sock = transport.get_extra_info("socket")
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)
