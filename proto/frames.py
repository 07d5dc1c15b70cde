"""Frame codec: a 4-byte big-endian length, then that many bytes of msgpack; or, with the
length's top bit set (RAW_FLAG), a raw stream-data frame: an 8-byte big-endian stream id, then
the data bytes as they are (decoded to a StreamData message's payload).

Pure code over bytes (no I/O), so both asyncio helpers and tests share one implementation. The
length is checked against a maximum before anything is buffered, so a peer cannot make us
allocate more than one frame's worth of memory (raw frames included: their length is
checked the same way); a server lowers that maximum to
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
RAW_FLAG = 0x8000_0000
"""Set in a frame's length: the frame is raw stream data. A checkout's delta is hundreds of MiB
of pages: framed through msgpack, every byte was copied by the packer, the frame's
concatenation and, on the other side, by the decoder's buffer and the unpacker (py-spy of the
newcomer's checkout); raw, the sender writes its buffers as they are (`writelines`) and the
receiver hands on what it read."""
RAW_HEADER = struct.Struct(">IQ")
"""A raw frame's length (RAW_FLAG set; the id's 8 bytes count) and its stream's id."""
STREAM_ID_SIZE = RAW_HEADER.size - HEADER_SIZE
STREAM_DATA_TAG = "stream_data"
"""The message tag of a raw frame's payload (messages.StreamData.TAG)."""


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


def raw_frame_header(id: int, size: int, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> bytes:
    """The first bytes of a raw frame of `size` data bytes for stream `id`; the data follow
    as they are."""
    length = STREAM_ID_SIZE + size
    if length > max_frame_size:
        raise ProtocolError(
            f"frame of {length} bytes exceeds the maximum frame size of {max_frame_size} bytes"
        )
    return RAW_HEADER.pack(RAW_FLAG | length, id)


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


_HEADER, _BODY, _RAW_ID, _RAW_DATA = range(4)
"""The part of a frame a FrameDecoder reads: its length, a msgpack body, a raw frame's stream
id, a raw frame's data."""
_STREAM_ID = struct.Struct(">Q")


class FrameDecoder:
    """Incremental decoder: feed arbitrary byte chunks, get back every completed frame's value.

    Buffers at most one header or one (length-checked) msgpack frame body, never more; a raw
    frame's data are not buffered at all: each fed piece of it comes back at once as the
    payload of a StreamData message (`[STREAM_DATA_TAG, id, bytes]`), the fed bytes object
    itself where the piece is all of it (`wanted` says how much to read for that). After a
    ProtocolError the stream cannot be resynchronized, so every later feed raises too.
    """

    def __init__(self, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        if not 0 < max_frame_size < RAW_FLAG:
            raise ValueError(f"max_frame_size must be positive and below {RAW_FLAG}")
        self.max_frame_size = max_frame_size
        """Checked at each frame header: lowering or raising it applies from the next frame."""
        self.limit_reason = ""
        """Why the limit is what it is, for the error message (e.g. " before the hello")."""
        self._buf = bytearray()
        self._part = _HEADER
        self._need = HEADER_SIZE  # bytes still to come of the current part
        self._taken = 0  # bytes of the current frame taken so far
        self._raw_length = 0  # a raw frame's length (its id included)
        self._raw_id = 0
        self._failed: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes taken of an incomplete frame (0 means the stream is at a frame boundary)."""
        return self._taken

    @property
    def wanted(self) -> int:
        """Bytes still to come of the current part of a frame (its header, its body, a raw
        frame's id or data): a reader that feeds at most this many at a time gets a raw
        frame's data back as the very bytes objects it fed."""
        return self._need

    def feed(self, data: bytes | bytearray | memoryview) -> list[Any]:
        """Consume `data`; return the values of all frames it completes, in order (and a
        payload per piece of raw frame data)."""
        if self._failed is not None:
            raise ProtocolError(f"stream already failed: {self._failed}")
        try:
            return self._feed(data, memoryview(data).cast("B"))
        except ProtocolError as exc:
            self._failed = exc
            self._buf = bytearray()
            self._taken = 0
            # A reader reading `wanted` bytes must not read zero and take the end of its
            # stream for a clean close: it reads on, and the next feed raises.
            self._need = HEADER_SIZE
            raise

    def _feed(self, data: bytes | bytearray | memoryview, view: memoryview) -> list[Any]:
        out: list[Any] = []
        start, end = 0, len(view)
        while start < end:
            n = min(end - start, self._need)
            self._taken += n
            if self._part == _RAW_DATA:
                # n == end: all of `data` (start is 0), handed on without a copy.
                piece = (
                    data if n == end and isinstance(data, bytes) else bytes(view[start : start + n])
                )
                out.append([STREAM_DATA_TAG, self._raw_id, piece])
                start += n
                self._need -= n
                if not self._need:
                    self._next_frame()
                continue
            if not self._buf and n == self._need:
                part: bytes | bytearray | memoryview = view[start : start + n]
            else:
                self._buf += view[start : start + n]
                part = self._buf
            start += n
            self._need -= n
            if not self._need:
                self._part_read(part, out)
        return out

    def _part_read(self, part: bytes | bytearray | memoryview, out: list[Any]) -> None:
        """The current part of a frame is complete: `part` holds it."""
        kind = self._part
        self._buf = bytearray()
        if kind == _BODY:
            out.append(decode_frame_body(part))
            self._next_frame()
        elif kind == _RAW_ID:
            (self._raw_id,) = _STREAM_ID.unpack(part)
            left = self._raw_length - STREAM_ID_SIZE
            if left:
                self._part, self._need = _RAW_DATA, left
            else:  # an empty piece still names its stream: checked like any other
                out.append([STREAM_DATA_TAG, self._raw_id, b""])
                self._next_frame()
        else:
            (length,) = HEADER.unpack(part)
            raw = bool(length & RAW_FLAG)
            length &= ~RAW_FLAG
            if length == 0 and not raw:
                raise ProtocolError("malformed frame: zero length")
            if length > self.max_frame_size:
                raise ProtocolError(
                    f"frame of {length} bytes exceeds the maximum frame size of "
                    f"{self.max_frame_size} bytes{self.limit_reason} (corrupt stream or "
                    "not a pg-neon peer?)"
                )
            if not raw:
                self._part, self._need = _BODY, length
            elif length < STREAM_ID_SIZE:
                raise ProtocolError(
                    f"malformed frame: a raw frame of {length} bytes is shorter than its stream id"
                )
            else:
                self._part, self._need, self._raw_length = _RAW_ID, STREAM_ID_SIZE, length

    def _next_frame(self) -> None:
        self._part, self._need, self._taken = _HEADER, HEADER_SIZE, 0
