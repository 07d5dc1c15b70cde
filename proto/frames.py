"""Frame codec: a 4-byte big-endian length, then that many bytes of msgpack.

Pure code over bytes (no I/O), so both asyncio helpers and tests share one implementation. The
length is checked against a maximum before anything is buffered, so a peer cannot make us
allocate more than one frame's worth of memory.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from proto.errors import ProtocolError

DEFAULT_MAX_FRAME_SIZE = 16 * 1024 * 1024
HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size


def encode_frame(payload: Any, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> bytes:
    """Pack one msgpack value into a frame; refuse what the peer would reject as oversize."""
    try:
        body = msgpack.packb(payload, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError(f"cannot encode value for the wire: {exc}") from exc
    if len(body) > max_frame_size:
        raise ProtocolError(
            f"frame of {len(body)} bytes exceeds the maximum frame size of {max_frame_size} bytes"
        )
    return HEADER.pack(len(body)) + body


def decode_frame_body(body: bytes | bytearray | memoryview) -> Any:
    """Unpack exactly one msgpack value; trailing bytes or bad encoding are protocol errors."""
    if not body:
        raise ProtocolError("malformed frame: empty payload")
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises many unrelated types for bad input
        raise ProtocolError(f"malformed frame: invalid msgpack payload ({exc})") from exc


class FrameDecoder:
    """Incremental decoder: feed arbitrary byte chunks, get back every completed frame's value.

    Buffers at most one header or one (length-checked) frame body, never more. After a
    ProtocolError the stream cannot be resynchronized, so every later feed raises too.
    """

    def __init__(self, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        if max_frame_size < 1:
            raise ValueError("max_frame_size must be positive")
        self.max_frame_size = max_frame_size
        self._buf = bytearray()
        self._body_len: int | None = None  # None while reading a header
        self._failed: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame (0 means the stream is at a frame boundary)."""
        return len(self._buf) + (HEADER_SIZE if self._body_len is not None else 0)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Any]:
        """Consume `data`; return the values of all frames it completes, in order."""
        if self._failed is not None:
            raise ProtocolError(f"stream already failed: {self._failed}")
        try:
            return self._feed(memoryview(data).cast("B"))
        except ProtocolError as exc:
            self._failed = exc
            self._buf = bytearray()
            raise

    def _feed(self, view: memoryview) -> list[Any]:
        out: list[Any] = []
        while view:
            need = (HEADER_SIZE if self._body_len is None else self._body_len) - len(self._buf)
            self._buf += view[:need]
            view = view[need:]
            if self._body_len is None:
                if len(self._buf) < HEADER_SIZE:
                    break
                (length,) = HEADER.unpack(self._buf)
                if length == 0:
                    raise ProtocolError("malformed frame: zero length")
                if length > self.max_frame_size:
                    raise ProtocolError(
                        f"frame of {length} bytes exceeds the maximum frame size of "
                        f"{self.max_frame_size} bytes (corrupt stream or not a pg-neon peer?)"
                    )
                self._body_len = length
                self._buf = bytearray()
            elif len(self._buf) == self._body_len:
                out.append(decode_frame_body(self._buf))
                self._body_len = None
                self._buf = bytearray()
        return out
