"""Frame codec: a 4-byte big-endian length, then that many bytes of msgpack.

Pure code over bytes (no I/O), so both asyncio helpers and tests share one implementation. The
length is checked against a maximum before anything is buffered, so a peer cannot make us
allocate more than one frame's worth of memory; a server lowers that maximum to
PRE_AUTH_MAX_FRAME_SIZE until the peer's hello is verified. Decoding is bounded by the frame
too: msgpack's limits are tied to the body's size, so every value costs at least one byte of
the frame and a frame of N bytes becomes at most N Python objects (tens of bytes each), nesting
stops at msgpack's unpack stack (MAX_NESTING) and extension types are refused.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from proto.errors import ProtocolError

DEFAULT_MAX_FRAME_SIZE = 16 * 1024 * 1024
PRE_AUTH_MAX_FRAME_SIZE = 4 * 1024
"""The largest frame accepted before the hello is verified (a hello is about 100 bytes): an
unauthenticated peer costs the server a few KiB, whatever it sends."""
MAX_NESTING = 1024
"""Containers deeper than this are refused (msgpack's C unpacker has this stack depth)."""
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
    size = len(body)
    try:
        return msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            max_str_len=size,
            max_bin_len=size,
            max_array_len=size,  # every element takes at least one byte
            max_map_len=size // 2,  # every entry at least two
            max_ext_len=0,  # the protocol has no extension types
        )
    except msgpack.StackError:
        raise ProtocolError(
            f"malformed frame: values nested more than {MAX_NESTING} levels deep"
        ) from None
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
        """Checked at each frame header: lowering or raising it applies from the next frame."""
        self.limit_reason = ""
        """Why the limit is what it is, for the error message (e.g. " before the hello")."""
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
                        f"{self.max_frame_size} bytes{self.limit_reason} (corrupt stream or "
                        "not a pg-neon peer?)"
                    )
                self._body_len = length
                self._buf = bytearray()
            elif len(self._buf) == self._body_len:
                out.append(decode_frame_body(self._buf))
                self._body_len = None
                self._buf = bytearray()
        return out
