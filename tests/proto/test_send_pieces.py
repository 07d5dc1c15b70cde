"""MessageStream.send_pieces over a real socket pair with uvloop (the daemon's loop), whose
writelines keeps the parts it cannot send yet as they are."""

from __future__ import annotations

import asyncio
import socket

import uvloop

from proto.connection import MessageStream
from proto.frames import RAW_HEADER

FILL = 8 << 20
"""More than a socket pair buffers: the frame after it waits in the transport."""


async def _send_then_change(piece_of: bytearray, view: memoryview) -> bytes:
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=ours)
    stream = MessageStream(reader, writer)
    try:
        writer.write(b"\0" * FILL)
        sending = asyncio.ensure_future(stream.send_pieces(7, [view]))
        await asyncio.sleep(0.05)  # the frame is queued, not sent
        piece_of[:] = b"B" * len(piece_of)
        loop = asyncio.get_running_loop()
        got = bytearray()
        while len(got) < FILL + RAW_HEADER.size + len(piece_of):
            got += await loop.sock_recv(theirs, 1 << 20)
        await sending
        return bytes(got[FILL + RAW_HEADER.size :])
    finally:
        writer.close()
        theirs.close()


def test_a_read_only_view_of_a_mutable_buffer_is_sent_as_it_was() -> None:
    """A read-only view of a bytearray can still change before the transport writes it: it
    is copied as a bytearray is (only bytes go as they are)."""
    data = bytearray(b"A" * 4096)
    sent = uvloop.run(_send_then_change(data, memoryview(data).toreadonly()))
    assert sent == b"A" * 4096
