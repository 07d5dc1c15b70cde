"""Typed protocol messages and their msgpack payloads.

A payload is a msgpack array: a type tag, then the fields in declaration order. Decoding checks
the tag, the arity and every field's type, so code past this module can trust a message's
annotations. Pure code over values: no I/O.

Conversation (ids are chosen by the client, unique per connection, >= 1):

    client -> Hello                     server -> HelloOk, or Error(id=0) and close
    client -> Request                   server -> Response | Error            (plain call)
    client -> Request                   server -> StreamData* StreamEnd | Error (download)
    client -> Request StreamData* StreamEnd
                                        server -> Response | Error            (upload)

StreamData is sent as raw frames (frames.RAW_FLAG: the bytes without msgpack), which decode
to it like any other message.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from proto.errors import NeonError, ProtocolError, error_from_code
from proto.frames import DEFAULT_MAX_FRAME_SIZE, STREAM_DATA_TAG, encode_frame

PROTOCOL_VERSION = 2
"""2: stream data may come as raw frames (frames.RAW_FLAG); a peer of version 1 is refused at
the hello with both versions named."""
CONNECTION_ID = 0
"""`Error.id` for errors about the connection itself (hello, malformed input), not a request."""

_MAX_UINT64 = 2**64 - 1


@dataclass(frozen=True, slots=True)
class Hello:
    """First message from the client: protocol version and credentials."""

    TAG: ClassVar[str] = "hello"
    protocol_version: int
    token: str | None = field(repr=False)
    client_name: str


@dataclass(frozen=True, slots=True)
class HelloOk:
    TAG: ClassVar[str] = "hello_ok"
    protocol_version: int
    server_name: str


@dataclass(frozen=True, slots=True)
class Request:
    TAG: ClassVar[str] = "request"
    id: int
    method: str
    params: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Response:
    TAG: ClassVar[str] = "response"
    id: int
    result: Any


@dataclass(frozen=True, slots=True)
class Error:
    """A failed request (or, with id CONNECTION_ID, a refused or broken connection)."""

    TAG: ClassVar[str] = "error"
    id: int
    code: str
    message: str

    @classmethod
    def from_exception(cls, id: int, exc: NeonError) -> Error:
        return cls(id, exc.code, exc.message)

    def to_exception(self) -> NeonError:
        return error_from_code(self.code, self.message)


@dataclass(frozen=True, slots=True)
class StreamData:
    """One chunk of a byte stream (download: server to client; upload: client to server)."""

    TAG: ClassVar[str] = STREAM_DATA_TAG
    id: int
    data: bytes = field(repr=False)  # a MiB in an error message helps nobody


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """End of a byte stream; from the server it carries the handler's result."""

    TAG: ClassVar[str] = "stream_end"
    id: int
    result: Any


Message = Hello | HelloOk | Request | Response | Error | StreamData | StreamEnd

_Check = Callable[[object], bool]


def _check_for(hint: Any) -> tuple[_Check, str]:
    """A validator and a human description for one field annotation."""
    if hint is Any:
        return (lambda v: True), "any value"
    if hint is int:
        return (
            lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= _MAX_UINT64
        ), "a non-negative integer"
    if hint in (str, bytes):
        return (lambda v: isinstance(v, hint)), hint.__name__
    if typing.get_origin(hint) is dict:
        return (lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v)), (
            "a map with string keys"
        )
    if isinstance(hint, types.UnionType):
        parts = [_check_for(a) for a in typing.get_args(hint)]
        return (lambda v: any(check(v) for check, _ in parts)), " or ".join(d for _, d in parts)
    if hint is type(None):
        return (lambda v: v is None), "nil"
    raise TypeError(f"no wire validator for annotation {hint!r}")


_MESSAGE_TYPES: tuple[type[Message], ...] = (
    Hello,
    HelloOk,
    Request,
    Response,
    Error,
    StreamData,
    StreamEnd,
)


def _schema(cls: type[Message]) -> list[tuple[str, _Check, str]]:
    """(name, validator, description) per field, in wire order, from the annotations."""
    hints = typing.get_type_hints(cls)
    return [(f.name, *_check_for(hints[f.name])) for f in fields(cls)]


_SCHEMAS: dict[str, tuple[type[Message], list[tuple[str, _Check, str]]]] = {
    cls.TAG: (cls, _schema(cls)) for cls in _MESSAGE_TYPES
}


def encode_payload(msg: Message) -> list[Any]:
    """The msgpack value for a message: [tag, *fields]."""
    return [msg.TAG, *(getattr(msg, f.name) for f in fields(msg))]


def decode_payload(payload: object) -> Message:
    """Validate and build a message from a decoded msgpack value."""
    if not isinstance(payload, list) or not payload or not isinstance(payload[0], str):
        raise ProtocolError("malformed message: expected an array starting with a type tag")
    tag, *values = payload
    schema = _SCHEMAS.get(tag)
    if schema is None:
        raise ProtocolError(f"malformed message: unknown message type {tag[:40]!r}")
    cls, specs = schema
    if len(values) != len(specs):
        raise ProtocolError(
            f"malformed {tag} message: expected {len(specs)} fields, got {len(values)}"
        )
    for (name, check, desc), value in zip(specs, values, strict=True):
        if not check(value):
            raise ProtocolError(
                f"malformed {tag} message: field {name!r} must be {desc}, "
                f"got {type(value).__name__}"
            )
    return cls(*values)


def encode_message(msg: Message, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> bytes:
    """A complete frame, ready to write."""
    return encode_frame(encode_payload(msg), max_frame_size=max_frame_size)
