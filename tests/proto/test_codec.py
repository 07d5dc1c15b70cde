"""Pure tests of the proto frame codec and message types: no sockets."""

from __future__ import annotations

import contextlib
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proto.errors import AuthFailed, NeonError, NotFound, ProtocolError
from proto.frames import (
    HEADER,
    HEADER_SIZE,
    RAW_FLAG,
    FrameDecoder,
    encode_frame,
    raw_frame_header,
)
from proto.messages import (
    PROTOCOL_VERSION,
    Error,
    Hello,
    HelloOk,
    Message,
    Request,
    Response,
    StreamData,
    StreamEnd,
    decode_payload,
    encode_message,
    encode_payload,
)

ALL_MESSAGES: list[Message] = [
    Hello(PROTOCOL_VERSION, "s3cret", "neon-cli"),
    Hello(PROTOCOL_VERSION, None, "neon-cli"),
    HelloOk(PROTOCOL_VERSION, "pageserver"),
    Request(1, "status", {}),
    Request(2**64 - 1, "snapshot.create", {"pg": "primary1", "tag": "v1", "lsn": 0x1_0000_0028}),
    Response(1, {"nested": [1, 2.5, None, True, b"\x00bytes", {"k": "v"}]}),
    Response(3, None),
    Error(4, "not_found", "no snapshot primary1@v1"),
    Error(0, "auth_failed", "wrong token"),
    StreamData(5, b"\x00" * 1000),
    StreamData(5, b""),
    StreamEnd(5, {"bytes": 1000}),
]


def roundtrip(msg: Message) -> Message:
    frames = FrameDecoder().feed(encode_message(msg))
    assert len(frames) == 1
    return decode_payload(frames[0])


@pytest.mark.parametrize("msg", ALL_MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(msg: Message) -> None:
    assert roundtrip(msg) == msg


def test_token_not_in_repr() -> None:
    assert "s3cret" not in repr(Hello(1, "s3cret", "x"))


def test_error_maps_to_typed_exceptions() -> None:
    err = Error.from_exception(7, NotFound("no such pg"))
    assert err == Error(7, "not_found", "no such pg")
    exc = roundtrip(err)
    assert isinstance(exc, Error)
    rebuilt = exc.to_exception()
    assert type(rebuilt) is NotFound and str(rebuilt) == "no such pg"
    assert type(Error(0, "auth_failed", "x").to_exception()) is AuthFailed
    assert type(Error(0, "from_the_future", "x").to_exception()) is NeonError


def test_frames_split_at_every_byte() -> None:
    stream = b"".join(encode_message(m) for m in ALL_MESSAGES)
    decoder = FrameDecoder()
    out: list[Any] = []
    for i in range(len(stream)):
        out.extend(decoder.feed(stream[i : i + 1]))
    assert [decode_payload(p) for p in out] == ALL_MESSAGES
    assert decoder.buffered == 0


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        ({"tag": "hello"}, "array starting with a type tag"),
        ([], "array starting with a type tag"),
        ([1, 2], "array starting with a type tag"),
        (["nope", 1], "unknown message type"),
        (["hello", 1, None], "expected 3 fields, got 2"),
        (["hello", True, None, "x"], "'protocol_version' must be a non-negative integer"),
        (["hello", -1, None, "x"], "'protocol_version' must be a non-negative integer"),
        (["hello", 1, 5, "x"], "'token' must be str or nil"),
        (["request", 1, "m", [1]], "'params' must be a map with string keys"),
        (["request", 1, "m", {b"k": 1}], "'params' must be a map with string keys"),
        (["stream_data", 1, "text"], "'data' must be bytes"),
        (["error", 1, "code", None], "'message' must be str"),
    ],
)
def test_wrong_shape_is_a_protocol_error(payload: Any, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode_payload(payload)


def test_oversize_length_rejected_from_the_header_alone() -> None:
    decoder = FrameDecoder(max_frame_size=1024)
    with pytest.raises(ProtocolError, match="exceeds the maximum frame size of 1024"):
        decoder.feed(struct.pack(">I", 1025))
    with pytest.raises(ProtocolError, match="already failed"):
        decoder.feed(b"\x00")


def test_a_failed_decoder_still_wants_bytes() -> None:
    """A reader reads `wanted` bytes: zero after a failure read as a clean end of stream
    (MessageStream.recv returned None after a ProtocolError)."""
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError, match="zero length"):
        decoder.feed(struct.pack(">I", 0))
    assert decoder.wanted > 0
    with pytest.raises(ProtocolError, match="already failed"):
        decoder.feed(b"\x00")


def test_encode_refuses_oversize_and_unencodable() -> None:
    with pytest.raises(ProtocolError, match="exceeds the maximum frame size"):
        encode_frame(b"x" * 2000, max_frame_size=1024)
    with pytest.raises(ProtocolError, match="cannot encode"):
        encode_frame({"x": object()})


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (b"\x00\x00\x00\x00", "zero length"),
        (b"\x00\x00\x00\x01\xc1", "invalid msgpack"),  # 0xc1 is never used
        (b"\x00\x00\x00\x02\x01\x02", "invalid msgpack"),  # trailing data
        (b"\x00\x00\x00\x01\x92", "invalid msgpack"),  # truncated array inside the frame
    ],
)
def test_malformed_frames(frame: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        FrameDecoder().feed(frame)


# -- property tests ----------------------------------------------------------------------------

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=50),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)
ids = st.integers(min_value=0, max_value=2**64 - 1)
params = st.dictionaries(st.text(max_size=10), msgpack_values, max_size=5)
messages = st.one_of(
    st.builds(Hello, ids, st.none() | st.text(), st.text()),
    st.builds(HelloOk, ids, st.text()),
    st.builds(Request, ids, st.text(), params),
    st.builds(Response, ids, msgpack_values),
    st.builds(Error, ids, st.text(), st.text()),
    st.builds(StreamData, ids, st.binary(max_size=2000)),
    st.builds(StreamEnd, ids, msgpack_values),
)


@given(st.lists(messages, max_size=5), st.data())
def test_random_messages_round_trip_in_random_pieces(msgs: list[Message], data: Any) -> None:
    stream = b"".join(encode_message(m) for m in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    decoder = FrameDecoder()
    out: list[Any] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        out.extend(decoder.feed(stream[start:end]))
    assert [decode_payload(p) for p in out] == msgs
    assert [encode_payload(decode_payload(p)) for p in out] == [encode_payload(m) for m in msgs]


MAX = 256


def feed_all(decoder: FrameDecoder, chunks: list[bytes]) -> None:
    """Feed until done or a ProtocolError; anything else escapes and fails the test."""
    for chunk in chunks:
        try:
            for payload in decoder.feed(chunk):
                with contextlib.suppress(ProtocolError):
                    decode_payload(payload)
        except ProtocolError:
            return
        assert decoder.buffered <= MAX


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=600), max_size=10))
def test_random_bytes_only_ever_raise_protocol_error(chunks: list[bytes]) -> None:
    feed_all(FrameDecoder(max_frame_size=MAX), chunks)


@settings(max_examples=300)
@given(msgpack_values, st.data())
def test_arbitrary_msgpack_frames_never_crash_and_truncations_stay_buffered(
    value: Any, data: Any
) -> None:
    body = msgpack.packb(value, use_bin_type=True)
    frame = struct.pack(">I", len(body)) + body
    cut = data.draw(st.integers(0, len(frame) - 1))
    decoder = FrameDecoder(max_frame_size=1 << 20)
    assert decoder.feed(frame[:cut]) == []
    assert decoder.buffered == cut
    payloads = decoder.feed(frame[cut:])
    assert payloads == [msgpack.unpackb(body, raw=False)]
    with contextlib.suppress(ProtocolError):
        decode_payload(payloads[0])
    # Garbage after a valid frame: still only ProtocolError.
    feed_all(decoder, [data.draw(st.binary(max_size=100))])


@given(st.integers(MAX + 1, RAW_FLAG - 1), st.booleans())
def test_any_oversize_length_fails_before_buffering(length: int, raw: bool) -> None:
    decoder = FrameDecoder(max_frame_size=MAX)
    with pytest.raises(ProtocolError, match="exceeds the maximum"):
        decoder.feed(struct.pack(">I", length | (RAW_FLAG if raw else 0)) + b"\x00" * 10)
    assert decoder.buffered == 0


def raw_frame(id: int, data: bytes) -> bytes:
    return raw_frame_header(id, len(data)) + data


def joined_stream_data(payloads: list[Any]) -> tuple[set[int], bytes]:
    """The ids and the concatenated data of StreamData payloads (a raw frame's data come
    back in pieces, as they were fed)."""
    msgs = [decode_payload(p) for p in payloads]
    assert all(isinstance(m, StreamData) for m in msgs)
    return {m.id for m in msgs}, b"".join(m.data for m in msgs if isinstance(m, StreamData))


@given(st.lists(st.binary(max_size=300), min_size=1, max_size=4), st.data())
def test_raw_frames_are_stream_data_in_any_pieces(datas: list[bytes], data: Any) -> None:
    stream = b"".join(raw_frame(5, d) for d in datas)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    decoder = FrameDecoder(max_frame_size=MAX + 8)
    out: list[Any] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        out.extend(decoder.feed(stream[start:end]))
    ids, joined = joined_stream_data(out)
    assert ids == {5} and joined == b"".join(datas)
    assert decoder.buffered == 0


def test_raw_frames_between_msgpack_frames_split_at_every_byte() -> None:
    msgs: list[Message] = [Request(1, "upload", {}), StreamEnd(1, None)]
    stream = (
        encode_message(msgs[0]) + raw_frame(1, b"abc") + raw_frame(1, b"") + encode_message(msgs[1])
    )
    decoder = FrameDecoder()
    out: list[Message] = []
    for i in range(len(stream)):
        out.extend(decode_payload(p) for p in decoder.feed(stream[i : i + 1]))
    assert out[0] == msgs[0] and out[-1] == msgs[1]
    assert b"".join(m.data for m in out[1:-1] if isinstance(m, StreamData)) == b"abc"
    assert {m.id for m in out[1:-1] if isinstance(m, StreamData)} == {1}
    assert out[-2] == StreamData(1, b"")  # an empty frame still names its stream
    assert decoder.buffered == 0


def test_raw_data_read_as_wanted_is_handed_on_without_a_copy() -> None:
    """A reader that feeds at most `wanted` bytes gets the very bytes objects back."""
    data = bytes(range(256)) * 40
    stream = raw_frame(3, data)
    decoder = FrameDecoder()
    pieces: list[bytes] = []
    at = 0
    while at < len(stream):
        chunk = stream[at : at + min(4096, decoder.wanted)]
        at += len(chunk)
        for payload in decoder.feed(chunk):
            assert payload[2] is chunk
            pieces.append(payload[2])
    assert b"".join(pieces) == data and len(pieces) == 3


def test_a_truncated_raw_frame_stays_incomplete() -> None:
    decoder = FrameDecoder()
    frame = raw_frame(2, b"x" * 100)
    assert decoder.feed(frame[:11]) == []
    assert decoder.buffered == 11
    assert len(decoder.feed(frame[11:50])) == 1
    assert decoder.buffered == 50  # nonzero: the stream ends in the middle of a frame


@pytest.mark.parametrize("length", [0, 1, 7])
def test_a_raw_frame_shorter_than_its_id_is_refused(length: int) -> None:
    with pytest.raises(ProtocolError, match="shorter than its stream id"):
        FrameDecoder().feed(HEADER.pack(RAW_FLAG | length) + b"\x00" * 8)


def test_a_raw_frame_larger_than_allowed_is_not_sent() -> None:
    with pytest.raises(ProtocolError, match="exceeds the maximum"):
        raw_frame_header(1, MAX - 7, max_frame_size=MAX)
    assert len(raw_frame_header(1, MAX - 8, max_frame_size=MAX)) == HEADER_SIZE + 8


def test_header_size() -> None:
    assert HEADER_SIZE == 4
