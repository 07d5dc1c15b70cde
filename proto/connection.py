"""Typed messages over one asyncio stream pair: the I/O edge shared by client and server.

All protocol logic stays in frames/messages; this only moves bytes, applies write backpressure
and turns socket failures into typed errors.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable
from contextlib import suppress
from typing import Any

from proto.errors import Unavailable
from proto.frames import DEFAULT_MAX_FRAME_SIZE, FrameDecoder, raw_frame_header
from proto.messages import Message, decode_payload, encode_message

READ_SIZE = 256 * 1024
READ_BUFFER = 1 << 20
"""The StreamReader's limit on a client's connection: asyncio stops reading the socket once
twice the limit is buffered. At its default (64 KiB) every 256 KiB read from the socket
paused and resumed the transport (two epoll_ctl calls and their Python each time: ~8 ms of a
1% checkout's 12 MB delta, py-spy), on the thread the delta's applier shares the
interpreter's lock with."""
STREAM_CHUNK_SIZE = 1024 * 1024
"""Larger byte strings are split so a frame never nears the limit and memory stays bounded."""
_STREAM_DATA_OVERHEAD = 64
_CLOSE_TIMEOUT = 2.0


class MessageStream:
    """Reads and writes whole messages; `failed` is set once the byte stream is out of sync.

    Cancellation does not desynchronize it: writes are whole frames, reads consume nothing
    until data arrives.

    After a failure (malformed input, EOF mid-frame, socket error) the only sensible thing left
    is to report the error if possible and close.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._decoder = FrameDecoder(max_frame_size=max_frame_size)
        self._pending: deque[Any] = deque()
        self.max_frame_size = max_frame_size
        self.chunk_size = max(1, min(STREAM_CHUNK_SIZE, max_frame_size - _STREAM_DATA_OVERHEAD))
        self.failed = False
        self.token: str | None = None
        """The token the peer authenticated with (set by the server once accepted)."""
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)

    @property
    def peer_closed(self) -> bool:
        """The peer closed its side and everything it sent was read (it wants no answer)."""
        return self._reader.at_eof()

    async def recv(self) -> Message | None:
        """The next message, or None on a clean end of stream (at a frame boundary)."""
        try:
            while not self._pending:
                try:
                    # No more than the frame's current part: a raw frame's data then
                    # come back from the decoder as the bytes read, not copied.
                    data = await self._reader.read(min(READ_SIZE, self._decoder.wanted))
                except OSError as exc:
                    raise Unavailable(f"connection to {self.peer} lost: {exc}") from exc
                if not data:
                    self.failed = True
                    if self._decoder.buffered:
                        # Nothing malformed was read: the peer stopped (a server shut
                        # down while its client did not read) or the network failed.
                        raise Unavailable(
                            f"connection to {self.peer} closed in the middle of a frame"
                        )
                    return None
                self._pending.extend(self._decoder.feed(data))
            return decode_payload(self._pending.popleft())
        except Exception:
            self.failed = True
            raise

    def limit_incoming(self, max_frame_size: int, reason: str = "") -> None:
        """Accept only frames up to `max_frame_size` from the next one on (`reason`, e.g.
        " before the hello is verified", goes into the error for a larger one)."""
        self._decoder.max_frame_size = max_frame_size
        self._decoder.limit_reason = reason

    def encode(self, msg: Message) -> bytes:
        """Encode before writing, so an unencodable message leaves the stream in sync."""
        return encode_message(msg, max_frame_size=self.max_frame_size)

    async def write_frame(self, *parts: bytes | memoryview) -> None:
        """Write a frame (in `parts`: one vectored write where the transport has it) and
        wait for the transport to drain below its high-water mark (backpressure)."""
        try:
            if self._writer.is_closing():
                raise Unavailable(f"connection to {self.peer} is closed")
            if len(parts) == 1:
                self._writer.write(parts[0])
            else:
                self._writer.writelines(parts)
            await self._writer.drain()
        except OSError as exc:
            self.failed = True
            raise Unavailable(f"connection to {self.peer} lost: {exc}") from exc

    async def send(self, msg: Message) -> None:
        await self.write_frame(self.encode(msg))

    async def send_data(self, id: int, data: bytes | bytearray | memoryview) -> None:
        """Send bytes as StreamData chunks of at most `chunk_size` bytes each."""
        await self.send_pieces(id, (data,))

    async def send_pieces(self, id: int, pieces: Iterable[bytes | bytearray | memoryview]) -> None:
        """Send the concatenation of `pieces` as raw StreamData frames of at most
        `chunk_size` bytes each, written as they are (`writelines`: a vectored write where
        the transport has one), not joined. Bytes objects (and views of them) are not
        copied; any other buffer is, read-only views included (a read-only view of a
        bytearray or an mmap can still change before the transport wrote it)."""
        frame: list[bytes | memoryview] = []
        held = 0
        for piece in pieces:
            view = memoryview(piece).cast("B")
            if not isinstance(view.obj, bytes):
                view = memoryview(bytes(view))
            while view:
                take = view[: self.chunk_size - held]
                frame.append(take)
                held += len(take)
                view = view[len(take) :]
                if held == self.chunk_size:
                    await self._write_raw(id, frame, held)
                    frame, held = [], 0
        if held:
            await self._write_raw(id, frame, held)

    async def _write_raw(self, id: int, frame: list[bytes | memoryview], size: int) -> None:
        header = raw_frame_header(id, size, max_frame_size=self.max_frame_size)
        await self.write_frame(header, *frame)

    async def close(self) -> None:
        """Flush and close; abort if the peer does not let us flush in time."""
        if not self._writer.is_closing():
            self._writer.close()
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                await self._writer.wait_closed()
        except (OSError, TimeoutError):
            self.abort()

    def abort(self) -> None:
        """Drop the connection at once, discarding unsent data."""
        self.failed = True
        with suppress(Exception):
            self._writer.transport.abort()
