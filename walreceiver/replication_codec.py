"""PostgreSQL frontend/backend protocol v3, as much as a physical replication client needs.

Pure code over bytes: encoders return the bytes to send, `BackendParser` turns received bytes
into frozen message objects. Nothing here touches a socket, so every corner of the protocol
(truncation, bad lengths, odd payloads) is testable with bytes alone.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from proto.errors import ProtocolError

PROTOCOL_VERSION = 3 << 16  # 196608
# The largest backend message we accept. XLogData is at most 128 KiB of WAL; a timeline
# history file or an error message is far smaller. Anything bigger is a broken stream.
MAX_MESSAGE_SIZE = 64 * 1024 * 1024

# PostgreSQL timestamps count microseconds from 2000-01-01 00:00:00 UTC.
PG_EPOCH_OFFSET_US = 946_684_800 * 1_000_000

_HEADER = struct.Struct("!cI")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_I16 = struct.Struct("!h")
_XLOGDATA = struct.Struct("!QQq")
_KEEPALIVE = struct.Struct("!Qq?")
_STATUS = struct.Struct("!cQQQqB")
_FIELD = struct.Struct("!IhIhih")


# --------------------------------------------------------------------------------------------
# Backend messages


@dataclass(frozen=True, slots=True)
class AuthenticationOk:
    pass


@dataclass(frozen=True, slots=True)
class AuthenticationCleartextPassword:
    pass


@dataclass(frozen=True, slots=True)
class AuthenticationMD5Password:
    salt: bytes


@dataclass(frozen=True, slots=True)
class AuthenticationSASL:
    mechanisms: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AuthenticationSASLContinue:
    data: bytes


@dataclass(frozen=True, slots=True)
class AuthenticationSASLFinal:
    data: bytes


@dataclass(frozen=True, slots=True)
class AuthenticationOther:
    """A method we do not implement (Kerberos, GSS, SSPI...): reported, not guessed at."""

    code: int


@dataclass(frozen=True, slots=True)
class ParameterStatus:
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class BackendKeyData:
    pid: int
    secret: int


@dataclass(frozen=True, slots=True)
class ReadyForQuery:
    status: str  # 'I' idle, 'T' in transaction, 'E' failed transaction


@dataclass(frozen=True, slots=True)
class FieldDescription:
    name: str
    table_oid: int
    column: int
    type_oid: int
    type_size: int
    type_modifier: int
    format: int


@dataclass(frozen=True, slots=True)
class RowDescription:
    fields: tuple[FieldDescription, ...]


@dataclass(frozen=True, slots=True)
class DataRow:
    values: tuple[bytes | None, ...]


@dataclass(frozen=True, slots=True)
class CommandComplete:
    tag: str


@dataclass(frozen=True, slots=True)
class EmptyQueryResponse:
    pass


@dataclass(frozen=True, slots=True)
class NoticeFields:
    """The typed fields of an ErrorResponse/NoticeResponse (one-letter codes, see protocol docs)."""

    fields: Mapping[str, str]

    @property
    def severity(self) -> str:
        return self.fields.get("V") or self.fields.get("S", "")

    @property
    def sqlstate(self) -> str:
        return self.fields.get("C", "")

    @property
    def message(self) -> str:
        return self.fields.get("M", "")

    @property
    def detail(self) -> str | None:
        return self.fields.get("D")

    @property
    def hint(self) -> str | None:
        return self.fields.get("H")

    def describe(self) -> str:
        """One line for users: message, then detail and hint when the server gave them."""
        parts = [self.message or "(no message)"]
        if self.detail:
            parts.append(self.detail)
        if self.hint:
            parts.append(f"hint: {self.hint}")
        return "; ".join(parts)


@dataclass(frozen=True, slots=True)
class ErrorResponse(NoticeFields):
    pass


@dataclass(frozen=True, slots=True)
class NoticeResponse(NoticeFields):
    pass


@dataclass(frozen=True, slots=True)
class CopyBothResponse:
    format: int
    column_formats: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class CopyOutResponse:
    format: int
    column_formats: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class CopyData:
    data: bytes


@dataclass(frozen=True, slots=True)
class CopyDone:
    pass


@dataclass(frozen=True, slots=True)
class NegotiateProtocolVersion:
    newest_minor: int
    unrecognized: tuple[str, ...]


BackendMessage = (
    AuthenticationOk
    | AuthenticationCleartextPassword
    | AuthenticationMD5Password
    | AuthenticationSASL
    | AuthenticationSASLContinue
    | AuthenticationSASLFinal
    | AuthenticationOther
    | ParameterStatus
    | BackendKeyData
    | ReadyForQuery
    | RowDescription
    | DataRow
    | CommandComplete
    | EmptyQueryResponse
    | ErrorResponse
    | NoticeResponse
    | CopyBothResponse
    | CopyOutResponse
    | CopyData
    | CopyDone
    | NegotiateProtocolVersion
)


class _Body:
    """A cursor over one message body; every read is bounds-checked."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ProtocolError("message body is shorter than its fields")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def i32(self) -> int:
        return int(_I32.unpack(self.take(4))[0])

    def i16(self) -> int:
        return int(_I16.unpack(self.take(2))[0])

    def cstring(self) -> str:
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            raise ProtocolError("unterminated string in message body")
        raw = self.data[self.pos : end]
        self.pos = end + 1
        return raw.decode("utf-8", errors="replace")

    def rest(self) -> bytes:
        out = self.data[self.pos :]
        self.pos = len(self.data)
        return out

    def end(self) -> None:
        if self.pos != len(self.data):
            raise ProtocolError(f"{len(self.data) - self.pos} unexpected trailing bytes in message")


def _auth(body: _Body) -> BackendMessage:
    code = body.i32()
    msg: BackendMessage
    if code == 0:
        msg = AuthenticationOk()
    elif code == 3:
        msg = AuthenticationCleartextPassword()
    elif code == 5:
        msg = AuthenticationMD5Password(body.take(4))
    elif code == 10:
        mechs: list[str] = []
        while True:
            name = body.cstring()
            if not name:
                break
            mechs.append(name)
        msg = AuthenticationSASL(tuple(mechs))
    elif code == 11:
        msg = AuthenticationSASLContinue(body.rest())
    elif code == 12:
        msg = AuthenticationSASLFinal(body.rest())
    else:
        return AuthenticationOther(code)  # GSS continuation etc. carry data we do not read
    body.end()
    return msg


def _notice_fields(body: _Body) -> dict[str, str]:
    fields: dict[str, str] = {}
    while True:
        code = body.take(1)
        if code == b"\0":
            return fields
        fields[code.decode("latin-1")] = body.cstring()


def _copy_formats(body: _Body) -> tuple[int, tuple[int, ...]]:
    fmt = body.take(1)[0]
    n = body.i16()
    if n < 0:
        raise ProtocolError("negative column count in copy response")
    cols = tuple(body.i16() for _ in range(n))
    return fmt, cols


def _row_description(body: _Body) -> RowDescription:
    n = body.i16()
    if n < 0:
        raise ProtocolError("negative field count in RowDescription")
    fields = []
    for _ in range(n):
        name = body.cstring()
        t, c, o, s, m, f = _FIELD.unpack(body.take(_FIELD.size))
        fields.append(FieldDescription(name, t, c, o, s, m, f))
    return RowDescription(tuple(fields))


def _data_row(body: _Body) -> DataRow:
    n = body.i16()
    if n < 0:
        raise ProtocolError("negative column count in DataRow")
    values: list[bytes | None] = []
    for _ in range(n):
        size = body.i32()
        values.append(None if size == -1 else body.take(size))
    return DataRow(tuple(values))


def decode_backend_message(kind: bytes, payload: bytes) -> BackendMessage:
    """Decode one complete message body; malformed bodies raise ProtocolError."""
    body = _Body(payload)
    msg: BackendMessage
    if kind == b"d":
        return CopyData(payload)
    if kind == b"R":
        return _auth(body)
    if kind == b"S":
        msg = ParameterStatus(body.cstring(), body.cstring())
    elif kind == b"K":
        msg = BackendKeyData(body.i32(), body.i32())
    elif kind == b"Z":
        msg = ReadyForQuery(body.take(1).decode("latin-1"))
    elif kind == b"T":
        msg = _row_description(body)
    elif kind == b"D":
        msg = _data_row(body)
    elif kind == b"C":
        msg = CommandComplete(body.cstring())
    elif kind == b"I":
        msg = EmptyQueryResponse()
    elif kind == b"E":
        msg = ErrorResponse(_notice_fields(body))
    elif kind == b"N":
        msg = NoticeResponse(_notice_fields(body))
    elif kind == b"W":
        msg = CopyBothResponse(*_copy_formats(body))
    elif kind == b"H":
        msg = CopyOutResponse(*_copy_formats(body))
    elif kind == b"c":
        msg = CopyDone()
    elif kind == b"v":
        minor = body.i32()
        count = body.i32()
        if count < 0:
            raise ProtocolError("negative option count in NegotiateProtocolVersion")
        msg = NegotiateProtocolVersion(minor, tuple(body.cstring() for _ in range(count)))
    else:
        raise ProtocolError(
            f"unexpected message type {kind!r} from the server; is this a PostgreSQL server?"
        )
    body.end()
    return msg


class BackendParser:
    """Incremental splitter of the backend byte stream: feed bytes, take whole messages.

    Consumed bytes are dropped lazily (an offset, compacted when it passes half the buffer),
    so a buffer holding many messages is not re-copied once per message.
    """

    __slots__ = ("_buf", "_pos", "max_size")

    def __init__(self, max_size: int = MAX_MESSAGE_SIZE) -> None:
        self._buf = bytearray()
        self._pos = 0
        self.max_size = max_size

    def feed(self, data: bytes) -> None:
        if self._pos and self._pos * 2 >= len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def next_header(self) -> tuple[bytes, int] | None:
        """(type, body length) of the next message once its 5 header bytes are here."""
        if len(self._buf) - self._pos < 5:
            return None
        kind, length = _HEADER.unpack_from(self._buf, self._pos)
        if length < 4:
            raise ProtocolError(f"invalid message length {length} in message type {kind!r}")
        if length - 4 > self.max_size:
            raise ProtocolError(
                f"message type {kind!r} claims {length} bytes, more than the "
                f"{self.max_size} allowed; the stream is corrupt or not PostgreSQL"
            )
        return kind, length - 4

    def message_ready(self) -> bool:
        """True when a whole message is buffered (next_message will return it)."""
        header = self.next_header()
        return header is not None and len(self._buf) >= self._pos + 5 + header[1]

    def next_message(self) -> BackendMessage | None:
        """The next complete message, or None when more bytes are needed."""
        header = self.next_header()
        if header is None:
            return None
        kind, size = header
        start = self._pos + 5
        if len(self._buf) < start + size:
            return None
        with memoryview(self._buf) as view:  # one copy out of the buffer, not two
            payload = bytes(view[start : start + size])
        self._pos = start + size
        return decode_backend_message(kind, payload)

    def __iter__(self) -> Iterator[BackendMessage]:
        while (msg := self.next_message()) is not None:
            yield msg


# --------------------------------------------------------------------------------------------
# Frontend messages


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + _U32.pack(len(body) + 4) + body


def _cstr(text: str) -> bytes:
    raw = text.encode("utf-8")
    if b"\0" in raw:
        raise ProtocolError(f"string {text!r} contains a NUL byte and cannot be sent")
    return raw + b"\0"


def startup_message(params: Mapping[str, str]) -> bytes:
    """StartupMessage; pass replication='true' for a physical replication connection."""
    body = _U32.pack(PROTOCOL_VERSION)
    body += b"".join(_cstr(k) + _cstr(v) for k, v in params.items()) + b"\0"
    return _U32.pack(len(body) + 4) + body


def password_message(password: bytes) -> bytes:
    """PasswordMessage for cleartext and md5 (the password or md5 hash, NUL-terminated)."""
    return _message(b"p", password + b"\0")


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return _message(b"p", _cstr(mechanism) + _I32.pack(len(data)) + data)


def sasl_response(data: bytes) -> bytes:
    return _message(b"p", data)


def query_message(sql: str) -> bytes:
    return _message(b"Q", _cstr(sql))


def copy_data_message(data: bytes) -> bytes:
    return _message(b"d", data)


def copy_done_message() -> bytes:
    return b"c\0\0\0\4"


def terminate_message() -> bytes:
    return b"X\0\0\0\4"


# --------------------------------------------------------------------------------------------
# Replication payloads carried in CopyData


@dataclass(frozen=True, slots=True)
class XLogData:
    """WAL bytes starting at data_start; wal_end is the server's end of WAL when it was sent."""

    data_start: int
    wal_end: int
    send_time: int
    data: bytes | memoryview

    @property
    def data_end(self) -> int:
        return self.data_start + len(self.data)


@dataclass(frozen=True, slots=True)
class PrimaryKeepalive:
    wal_end: int
    send_time: int
    reply_requested: bool


ReplicationMessage = XLogData | PrimaryKeepalive


def decode_replication_message(payload: bytes) -> ReplicationMessage:
    """Decode the payload of a CopyData received in physical streaming ('w' or 'k')."""
    if not payload:
        raise ProtocolError("empty CopyData in replication stream")
    kind = payload[0]
    if kind == 0x77:  # 'w'
        if len(payload) < 1 + _XLOGDATA.size:
            raise ProtocolError("XLogData message shorter than its 25-byte header")
        start, end, when = _XLOGDATA.unpack_from(payload, 1)
        # A view, not a copy: the payload was just copied out of the socket buffer.
        return XLogData(start, end, when, memoryview(payload)[1 + _XLOGDATA.size :])
    if kind == 0x6B:  # 'k'
        if len(payload) != 1 + _KEEPALIVE.size:
            raise ProtocolError(f"keepalive message of {len(payload)} bytes, expected 18")
        wal_end, when, reply = _KEEPALIVE.unpack_from(payload, 1)
        return PrimaryKeepalive(wal_end, when, reply)
    raise ProtocolError(f"unknown replication message type {payload[:1]!r} in CopyData")


def standby_status_update(
    write: int, flush: int, apply: int, clock_us: int, reply_requested: bool = False
) -> bytes:
    """A complete CopyData('r' ...) message: positions the server may act on (slot, sync rep)."""
    return copy_data_message(_STATUS.pack(b"r", write, flush, apply, clock_us, reply_requested))


def pg_now_us(unix_time: float) -> int:
    """A Unix time as PostgreSQL's microseconds since 2000-01-01."""
    return int(unix_time * 1_000_000) - PG_EPOCH_OFFSET_US
