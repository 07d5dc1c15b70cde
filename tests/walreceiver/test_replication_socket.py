"""The replication connection's reader returns what the server sent before it reset the
connection, then the error (walreceiver/replication_socket.py): a terminated walsender's
ErrorResponse arrives just before the reset its exit causes. Each case runs on asyncio's
loop and on uvloop's, which the walreceiver child runs on (walreceiver/receiver.py)."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from walreceiver.replication_socket import open_streams


async def read_until_reset(reader: asyncio.StreamReader) -> bytes:
    """Everything read before the read that raises ConnectionResetError (an EOF fails)."""
    got = b""
    with pytest.raises(ConnectionResetError):
        while True:
            data = await reader.read(1 << 16)
            assert data, "an EOF instead of the reset"
            got += data
    return got


async def _bytes_sent_before_a_reset_are_read_before_the_error() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"the server's last words")
        await writer.drain()
        sock = writer.get_extra_info("socket")
        # l_onoff=1, l_linger=0: close() sends RST at once (as unread data in the
        # backend's receive queue makes its kernel do).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await open_streams("127.0.0.1", port, None, 1 << 16)
        await asyncio.sleep(0.3)  # the bytes and the reset have both arrived and been handled
        assert await read_until_reset(reader) == b"the server's last words"
        writer.close()
    finally:
        server.close()
        await server.wait_closed()


async def _a_clean_close_is_an_eof() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"bye")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await open_streams("127.0.0.1", port, None, 1 << 16)
        await asyncio.sleep(0.2)
        assert await reader.read(100) == b"bye"
        assert await reader.read(100) == b""
        writer.close()
    finally:
        server.close()
        await server.wait_closed()


async def _bytes_before_a_reset_are_read_when_a_write_meets_the_reset_first() -> None:
    """Our status update is written after the reset arrived and before the transport read
    what came ahead of it: the failed write closes the transport; the bytes are read still.
    The server is a thread and the client's loop is held (time.sleep) while the bytes and
    the reset arrive, so the write comes first for certain."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    connected = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        connected.wait(10)  # reset before the client's connect completed, it fails the connect
        conn.sendall(b"the server's last words")
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()  # RST

    server = threading.Thread(target=serve)
    server.start()
    try:
        reader, writer = await open_streams("127.0.0.1", port, None, 1 << 16)
        connected.set()
        server.join(10)  # the loop is held: the bytes and the reset arrive unread
        time.sleep(0.3)
        writer.write(b"a status update")  # fails on the reset: the transport closes
        assert await read_until_reset(reader) == b"the server's last words"
        writer.close()
    finally:
        server.join(10)
        listener.close()


LOOPS = {"asyncio": asyncio.run, "uvloop": uvloop.run}
CASES = {
    "reset after bytes": _bytes_sent_before_a_reset_are_read_before_the_error,
    "clean close": _a_clean_close_is_an_eof,
    "write meets the reset": _bytes_before_a_reset_are_read_when_a_write_meets_the_reset_first,
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("loop", LOOPS)
def test_reader(loop: str, case: str) -> None:
    run: Callable[[Coroutine[Any, Any, None]], None] = LOOPS[loop]
    run(CASES[case]())
