"""PostgreSQL frontend/backend protocol v3, as much as a physical replication client needs.

Pure code over bytes: encoders return the bytes to send, `BackendParser` turns received bytes
into frozen message objects. Nothing here touches a socket, so every corner of the protocol
(truncation, bad lengths, odd payloads) is testable with bytes alone.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from pg15.lsn import parse_lsn
from proto.errors import InvalidArgument, ProtocolError

PROTOCOL_VERSION = 3 << 16  # 196608
# The largest backend message we accept. XLogData is at most 128 KiB of WAL; a timeline
# history file or an error message is far smaller. Anything bigger is a broken stream.
MAX_MESSAGE_SIZE = 64 * 1024 * 1024

# PostgreSQL timestamps count microseconds from 2000-01-01 00:00:00 UTC.
PG_EPOCH_OFFSET_US = 946_684_800 * 1_000_000

_HEADER = struct.Struct("!cI")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_COPY_DATA, _ARCHIVE_DATA = ord("d"), ord("d")  # message type; BASE_BACKUP's data sub-type
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

    def archive_data_run(self, max_bytes: int) -> bytes | None:
        """The archive bytes of the whole BASE_BACKUP data messages at the head of the buffer
        (CopyData whose payload starts with `d`, what next_message and decode_backup_copy_data
        make ArchiveData of), joined, about `max_bytes` at most; None when the next message is
        not one. One copy and a few operations per message: a backup sends 32 KiB messages
        (basebackup_copy.c), 32768 per GiB, and each went through several objects."""
        buf, pos, end_of_data = self._buf, self._pos, len(self._buf)
        parts: list[memoryview] = []
        size = 0
        with memoryview(buf) as view:
            while size < max_bytes and end_of_data - pos >= 6:
                if buf[pos] != _COPY_DATA or buf[pos + 5] != _ARCHIVE_DATA:
                    break
                (length,) = _U32.unpack_from(buf, pos + 1)
                end = pos + 1 + length
                if length < 5 or length - 4 > self.max_size or end > end_of_data:
                    break  # next_message raises, or more bytes are needed
                parts.append(view[pos + 6 : end])
                size += end - pos - 6
                pos = end
            data = b"".join(parts) if parts else None
            for part in parts:
                part.release()
        self._pos = pos
        return data


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


# --------------------------------------------------------------------------------------------
# BASE_BACKUP (PostgreSQL 15, TARGET 'client')
#
# basebackup_copy.c's "copystream" sink: a result set with the start position (recptr, tli),
# a result set with the tablespaces (spcoid, spclocation, size in kB; the main data directory
# is the last row, all NULL but the size), then one COPY OUT for the whole backup whose
# CopyData payloads start with a type byte: 'n' a new archive (name, tablespace location, ''
# for the main one), 'd' data of the current archive (or of the manifest after 'm'), 'p'
# progress (uint64 bytes done), 'm' the manifest follows. Then CopyDone, a result set with the
# end position, CommandComplete "BASE_BACKUP" and ReadyForQuery. An archive ends where the
# next 'n' or 'm' or the CopyDone comes; its tar stream ends with two zero blocks.

TAR_BLOCK = 512
_TAR_END = bytes(2 * TAR_BLOCK)
_U64 = struct.Struct("!Q")


@dataclass(frozen=True, slots=True)
class BackupStarted:
    """The backup's start: the redo point of its checkpoint, and that point's timeline."""

    lsn: int
    timeline: int


@dataclass(frozen=True, slots=True)
class TablespaceInfo:
    """One row of the tablespace list: oid and location are None for the main directory."""

    oid: int | None
    location: str | None
    size_kb: int | None  # the server's estimate, only with the PROGRESS option


@dataclass(frozen=True, slots=True)
class BackupTablespaces:
    tablespaces: tuple[TablespaceInfo, ...]

    @property
    def total_bytes(self) -> int | None:
        """The estimated size of every archive (WAL not included); None without PROGRESS."""
        sizes = [t.size_kb for t in self.tablespaces]
        if any(s is None for s in sizes):
            return None
        return sum(s for s in sizes if s is not None) * 1024


@dataclass(frozen=True, slots=True)
class ArchiveStart:
    """CopyData 'n': the next archive; location None for the main data directory."""

    name: str
    tablespace_location: str | None


@dataclass(frozen=True, slots=True)
class BackupCopyChunk:
    """CopyData 'd': bytes of the current archive or manifest (a view of the message)."""

    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class ProgressReport:
    """CopyData 'p': archive bytes the server has sent so far (at most one a second)."""

    bytes_done: int


@dataclass(frozen=True, slots=True)
class ManifestStart:
    """CopyData 'm': the backup manifest follows (only when MANIFEST was asked for)."""


BackupCopyMessage = ArchiveStart | BackupCopyChunk | ProgressReport | ManifestStart


def decode_backup_copy_data(payload: bytes) -> BackupCopyMessage:
    """Decode one CopyData payload of BASE_BACKUP's copy stream (pg_basebackup's checks)."""
    if not payload:
        raise ProtocolError("empty CopyData in the base backup stream")
    kind = payload[:1]
    if kind == b"d":
        return BackupCopyChunk(memoryview(payload)[1:])
    body = _Body(payload)
    body.take(1)
    msg: BackupCopyMessage
    if kind == b"n":
        name, location = body.cstring(), body.cstring()
        if not name or name.startswith(".") or "/" in name or "\\" in name:
            raise ProtocolError(f"invalid archive name {name!r} in the base backup stream")
        msg = ArchiveStart(name, location or None)
    elif kind == b"p":
        msg = ProgressReport(int(_U64.unpack(body.take(8))[0]))
    elif kind == b"m":
        msg = ManifestStart()
    else:
        raise ProtocolError(f"unknown message type {kind!r} in the base backup stream")
    body.end()
    return msg


@dataclass(frozen=True, slots=True)
class ArchiveData:
    """Bytes of the current archive, in order."""

    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class ArchiveEnd:
    """The current archive is complete: `size` bytes, ending with the tar terminator."""

    name: str
    size: int


@dataclass(frozen=True, slots=True)
class ManifestData:
    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class BackupEnded:
    """The backup's end position: recovery must replay WAL up to here to be consistent."""

    lsn: int
    timeline: int


@dataclass(frozen=True, slots=True)
class BackupFinished:
    """CommandComplete and ReadyForQuery: the server finished the command without error."""


BaseBackupEvent = (
    BackupStarted
    | BackupTablespaces
    | ArchiveStart
    | ArchiveData
    | ArchiveEnd
    | ProgressReport
    | ManifestStart
    | ManifestData
    | BackupEnded
    | BackupFinished
    | ErrorResponse
)


def _lsn_text(text: str) -> int:
    try:
        return parse_lsn(text)
    except InvalidArgument:
        raise ProtocolError(f"invalid LSN {text!r} in the base backup stream") from None


def _int_text(value: bytes | None, what: str) -> int | None:
    if value is None:
        return None
    try:
        return int(value.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError(f"invalid {what} {value!r} in the base backup stream") from None


class BaseBackupReader:
    """The sequence of backend messages a BASE_BACKUP command answers, as typed events.

    Sans-I/O: `handle(msg)` takes each backend message after the command was sent and returns
    the events it completes. Anything out of order, an archive that is not a whole tar stream
    (an archive's end must be its two zero blocks), data outside an archive, or a tablespace
    location the list did not announce is a ProtocolError. An ErrorResponse is returned as an
    event (the backup failed, whatever came before it: a checksum failure is reported even
    after the end position); NoticeResponse and ParameterStatus are ignored.
    """

    def __init__(self) -> None:
        self._state = "start"
        self._columns = 0
        self._row: tuple[bytes | None, ...] | None = None
        self._tablespaces: list[TablespaceInfo] = []
        self._locations: set[str | None] = set()
        self._archive: ArchiveStart | None = None
        self._archive_size = 0
        self._tail = b""
        self._seen_main = False
        self._in_manifest = False
        self.failed = False

    @property
    def finished(self) -> bool:
        """True once the server reported success (BackupFinished) or an error."""
        return self._state in ("finished", "failed")

    def handle(self, msg: BackendMessage) -> list[BaseBackupEvent]:
        if isinstance(msg, NoticeResponse | ParameterStatus):
            return []
        if self.failed and isinstance(msg, ReadyForQuery):
            return []  # what follows an ErrorResponse
        if self.finished:
            raise ProtocolError(f"unexpected {type(msg).__name__} after the base backup ended")
        if isinstance(msg, ErrorResponse):
            self._state = "failed"
            self.failed = True
            return [msg]
        state = self._state
        if state == "copy":
            return self._copy(msg)
        if state in ("start", "tablespaces", "end"):
            return self._result_set(msg)
        if state == "copy_response" and isinstance(msg, CopyOutResponse):
            self._state = "copy"
            return []
        if state == "command_complete" and isinstance(msg, CommandComplete):
            self._state = "ready"
            return []
        if state == "ready" and isinstance(msg, ReadyForQuery):
            self._state = "finished"
            return [BackupFinished()]
        raise ProtocolError(f"unexpected {type(msg).__name__} in the base backup ({state})")

    def _result_set(self, msg: BackendMessage) -> list[BaseBackupEvent]:
        want = 3 if self._state == "tablespaces" else 2
        if isinstance(msg, RowDescription) and not self._columns:
            if len(msg.fields) != want:
                raise ProtocolError(
                    f"base backup {self._state} result has {len(msg.fields)} columns, "
                    f"expected {want}"
                )
            self._columns = want
            return []
        if isinstance(msg, DataRow) and self._columns:
            if len(msg.values) != want:
                raise ProtocolError(f"base backup {self._state} row has {len(msg.values)} values")
            if self._state == "tablespaces":
                self._tablespaces.append(self._tablespace(msg.values))
            elif self._row is not None:
                raise ProtocolError(f"base backup {self._state} result has more than one row")
            else:
                self._row = msg.values
            return []
        if isinstance(msg, CommandComplete) and self._columns:
            self._columns = 0
            return [self._finish_result_set()]
        raise ProtocolError(f"unexpected {type(msg).__name__} in the base backup ({self._state})")

    def _tablespace(self, values: tuple[bytes | None, ...]) -> TablespaceInfo:
        oid = _int_text(values[0], "tablespace oid")
        location = None if values[1] is None else values[1].decode("utf-8", errors="replace")
        if (oid is None) != (location is None) or location == "":
            raise ProtocolError("a tablespace row has an oid without a location or the reverse")
        if location in self._locations:
            raise ProtocolError(f"tablespace location {location!r} listed twice")
        self._locations.add(location)
        return TablespaceInfo(oid, location, _int_text(values[2], "tablespace size"))

    def _finish_result_set(self) -> BaseBackupEvent:
        if self._state == "tablespaces":
            if None not in self._locations:
                raise ProtocolError("the tablespace list has no row for the main data directory")
            self._state = "copy_response"
            return BackupTablespaces(tuple(self._tablespaces))
        row, self._row = self._row, None
        if row is None or row[0] is None or row[1] is None:
            raise ProtocolError(f"base backup {self._state} position is missing")
        lsn = _lsn_text(row[0].decode("ascii", errors="replace"))
        tli = _int_text(row[1], "timeline") or 0
        if self._state == "start":
            self._state = "tablespaces"
            return BackupStarted(lsn, tli)
        self._state = "command_complete"
        return BackupEnded(lsn, tli)

    def _copy(self, msg: BackendMessage) -> list[BaseBackupEvent]:
        if isinstance(msg, CopyDone):
            events = self._end_archive()
            if not self._seen_main:
                raise ProtocolError("the base backup stream ended without the main archive")
            self._state = "end"
            return events
        if not isinstance(msg, CopyData):
            raise ProtocolError(f"unexpected {type(msg).__name__} in the base backup stream")
        part = decode_backup_copy_data(msg.data)
        if isinstance(part, BackupCopyChunk):
            if self._in_manifest:
                return [ManifestData(part.data)]
            if self._archive is None:
                raise ProtocolError("archive data before any archive in the base backup stream")
            self._take(part.data)
            return [ArchiveData(part.data)]
        if isinstance(part, ProgressReport):
            return [part]
        if self._in_manifest:
            raise ProtocolError(f"{type(part).__name__} after the manifest in the base backup")
        events = self._end_archive()
        if isinstance(part, ManifestStart):
            self._in_manifest = True
            return [*events, part]
        if part.tablespace_location not in self._locations:
            raise ProtocolError(
                f"archive {part.name!r} is for tablespace location "
                f"{part.tablespace_location!r}, which the tablespace list did not announce"
            )
        if part.tablespace_location is None:
            if self._seen_main:
                raise ProtocolError("two archives of the main data directory")
            self._seen_main = True
        self._archive, self._archive_size, self._tail = part, 0, b""
        return [*events, part]

    @property
    def in_archive(self) -> bool:
        """Archive data may come now: ArchiveData of it is `archive_data`'s."""
        return self._state == "copy" and self._archive is not None and not self._in_manifest

    def archive_data(self, data: bytes) -> ArchiveData:
        """The bytes of data messages taken whole (BackendParser.archive_data_run) while
        `in_archive`: what `handle` of each message returns, as one event."""
        if not self.in_archive:
            raise ProtocolError("archive data outside an archive in the base backup stream")
        self._take(data)
        return ArchiveData(data)

    def _take(self, data: bytes | memoryview) -> None:
        self._archive_size += len(data)
        if len(data) >= len(_TAR_END):
            self._tail = bytes(data[-len(_TAR_END) :])
        else:
            self._tail = (self._tail + bytes(data))[-len(_TAR_END) :]

    def _end_archive(self) -> list[BaseBackupEvent]:
        archive, self._archive = self._archive, None
        if archive is None:
            return []
        if self._archive_size % TAR_BLOCK or self._tail != _TAR_END:
            raise ProtocolError(
                f"archive {archive.name!r} ended after {self._archive_size} bytes without the "
                "tar end-of-archive blocks"
            )
        return [ArchiveEnd(archive.name, self._archive_size)]
