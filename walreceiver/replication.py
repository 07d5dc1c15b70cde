"""A physical replication connection to PostgreSQL over asyncio streams.

All protocol decisions live in `replication_codec` and `replication_auth`; this module only
moves bytes and sequences the replication commands (IDENTIFY_SYSTEM, slots, TIMELINE_HISTORY,
START_REPLICATION) the way walsender.c expects them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from pg15.lsn import format_lsn, parse_lsn
from proto.aio import within
from proto.errors import (
    AlreadyExists,
    AuthFailed,
    Conflict,
    NeonError,
    NotFound,
    ProtocolError,
    Unavailable,
)
from walreceiver.replication_auth import SCRAM_ONLY, Authenticator, AuthMethod
from walreceiver.replication_codec import (
    AuthenticationCleartextPassword,
    AuthenticationMD5Password,
    AuthenticationOk,
    AuthenticationOther,
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    BackendKeyData,
    BackendMessage,
    BackendParser,
    BackupFinished,
    BaseBackupEvent,
    BaseBackupReader,
    CommandComplete,
    CopyBothResponse,
    CopyData,
    CopyDone,
    CopyOutResponse,
    DataRow,
    EmptyQueryResponse,
    ErrorResponse,
    NegotiateProtocolVersion,
    NoticeResponse,
    ParameterStatus,
    PrimaryKeepalive,
    ReadyForQuery,
    RowDescription,
    XLogData,
    copy_done_message,
    decode_replication_message,
    pg_now_us,
    query_message,
    standby_status_update,
    startup_message,
    terminate_message,
)
from walreceiver.replication_socket import open_streams

log = logging.getLogger(__name__)

READ_SIZE = 1 << 20  # one big read can carry several 128 KiB XLogData messages
STREAM_LIMIT = 4 << 20  # the transport keeps reading until 2x this is buffered
BATCH_BYTES = 4 << 20  # XLogData handed over at once (ReplicationStream.batches)
ARCHIVE_RUN_BYTES = 256 << 10  # BASE_BACKUP data handed over at once (8 of its messages)
_AUTH_TYPES = (
    AuthenticationOk,
    AuthenticationCleartextPassword,
    AuthenticationMD5Password,
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    AuthenticationOther,
)


# --------------------------------------------------------------------------------------------
# Errors


class ServerError(NeonError):
    """An ErrorResponse from PostgreSQL; `response` keeps every field (SQLSTATE, detail...)."""

    code = "server_error"

    def __init__(self, message: str, response: ErrorResponse | None = None) -> None:
        super().__init__(message)
        self.response = response

    @property
    def sqlstate(self) -> str:
        return self.response.sqlstate if self.response else ""


class SlotNotFound(NotFound, ServerError):
    pass


class SlotAlreadyExists(AlreadyExists, ServerError):
    pass


class SlotInUse(Conflict, ServerError):
    pass


class WalRemoved(NotFound, ServerError):
    pass


class ServerUnavailable(Unavailable, ServerError):
    """The server is shutting down, starting up, full, or terminated our session: retryable."""


class ServerAuthFailed(AuthFailed, ServerError):
    pass


class NoReplicationPrivilege(AuthFailed, ServerError):
    """The user logged in but may not replicate (neither superuser nor REPLICATION)."""


class ConnectionLost(Unavailable):
    pass


def server_error(where: str, err: ErrorResponse) -> ServerError:
    """Map an ErrorResponse onto a typed error whose message says what to do about it."""
    state, text = err.sqlstate, err.describe()
    msg = f"PostgreSQL at {where}: {text}"
    if state == "42704" and "replication slot" in err.message:
        return SlotNotFound(msg + " (create it, e.g. with --create-slot)", err)
    if state == "42710":
        return SlotAlreadyExists(msg, err)
    if state == "55006":
        return SlotInUse(msg + " (another receiver is streaming from this slot)", err)
    if state == "58P01" and "already been removed" in err.message:
        return WalRemoved(
            msg + " (the server no longer has this WAL: stream through a replication slot so "
            "it keeps WAL until received, or start again from the server's current position)",
            err,
        )
    if state.startswith("28"):
        return ServerAuthFailed(msg + " (check the user, password and pg_hba.conf)", err)
    if state == "42501" and "replication role" in err.message:
        return NoReplicationPrivilege(
            msg + " (the user needs the REPLICATION attribute: ALTER ROLE ... REPLICATION)", err
        )
    if state in ("57P01", "57P02", "57P03", "53300") or state.startswith("08"):
        return ServerUnavailable(msg, err)
    return ServerError(msg, err)


# --------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True, slots=True)
class QueryResult:
    columns: tuple[str, ...]
    rows: tuple[tuple[bytes | None, ...], ...]
    tag: str

    def text(self, row: int, column: int) -> str | None:
        value = self.rows[row][column]
        return None if value is None else value.decode("utf-8")


@dataclass(frozen=True, slots=True)
class SystemIdentity:
    systemid: int
    timeline: int
    xlogpos: int
    dbname: str | None


@dataclass(frozen=True, slots=True)
class SlotInfo:
    slot_type: str
    restart_lsn: int | None
    restart_tli: int | None


@dataclass(frozen=True, slots=True)
class TimelineHistory:
    filename: str
    content: bytes


_SIZE_RE = re.compile(r"^\s*(\d+)\s*(B|kB|MB|GB|TB)?\s*$")
_UNITS = {None: 1, "B": 1, "kB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}


def parse_size_setting(text: str) -> int:
    """A size GUC as SHOW prints it (`16MB`) in bytes."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ProtocolError(f"cannot parse size setting {text!r}")
    return int(m.group(1)) * _UNITS[m.group(2)]


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# --------------------------------------------------------------------------------------------
# Connection


class ReplicationConnection:
    """One replication=true session. Use `connect()`; close with `close()`."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, where: str
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._parser = BackendParser()
        self.where = where
        self.server_params: dict[str, str] = {}
        self.backend_pid: int | None = None
        self.broken = False

    # -- bytes in, bytes out -------------------------------------------------------------

    def message_ready(self) -> bool:
        """True when a whole message is already buffered (the next _recv will not wait)."""
        return self._parser.message_ready()

    async def _recv(self) -> BackendMessage:
        """The next message; notices and parameter changes are absorbed here."""
        while True:
            msg = self._parser.next_message()
            if msg is None:
                try:
                    data = await self._reader.read(READ_SIZE)
                except OSError as exc:
                    self.broken = True
                    raise ConnectionLost(
                        f"connection to PostgreSQL at {self.where} failed: {exc}"
                    ) from None
                if not data:
                    self.broken = True
                    raise ConnectionLost(
                        f"PostgreSQL at {self.where} closed the connection unexpectedly"
                    )
                self._parser.feed(data)
                continue
            if isinstance(msg, NoticeResponse):
                log.info("server notice: %s", msg.describe())
            elif isinstance(msg, ParameterStatus):
                self.server_params[msg.name] = msg.value
            else:
                return msg

    def _send(self, data: bytes) -> None:
        if self._writer.is_closing():
            raise ConnectionLost(f"connection to PostgreSQL at {self.where} is closed")
        self._writer.write(data)

    async def _send_flush(self, data: bytes) -> None:
        self._send(data)
        try:
            await self._writer.drain()
        except OSError as exc:
            self.broken = True
            raise ConnectionLost(
                f"connection to PostgreSQL at {self.where} failed: {exc}"
            ) from None

    # -- startup -------------------------------------------------------------------------

    async def _startup(
        self,
        user: str,
        password: str | None,
        application_name: str,
        auth_methods: frozenset[AuthMethod] = SCRAM_ONLY,
    ) -> None:
        params = {
            "user": user,
            "database": "replication",
            "replication": "true",
            "application_name": application_name,
        }
        await self._send_flush(startup_message(params))
        auth = Authenticator(user, password, allowed=auth_methods, where=self.where)
        while True:
            msg = await self._recv()
            if isinstance(msg, _AUTH_TYPES):
                reply = auth.handle(msg)
                if reply is not None:
                    await self._send_flush(reply)
            elif isinstance(msg, ErrorResponse):
                raise server_error(self.where, msg)
            elif isinstance(msg, BackendKeyData):
                self.backend_pid = msg.pid
            elif isinstance(msg, NegotiateProtocolVersion):
                continue
            elif isinstance(msg, ReadyForQuery):
                if not auth.done:
                    raise ProtocolError(f"PostgreSQL at {self.where} skipped authentication")
                return
            else:
                raise ProtocolError(f"unexpected {type(msg).__name__} during connection startup")

    # -- simple queries -------------------------------------------------------------------

    async def query(self, sql: str) -> QueryResult:
        """Run one command; return its (last) result set. Errors raise after ReadyForQuery."""
        await self._send_flush(query_message(sql))
        return await self._collect_result()

    async def _collect_result(self, first: BackendMessage | None = None) -> QueryResult:
        columns: tuple[str, ...] = ()
        rows: list[tuple[bytes | None, ...]] = []
        tag = ""
        error: ErrorResponse | None = None
        msg = first if first is not None else await self._recv()
        while True:
            if isinstance(msg, RowDescription):
                columns = tuple(f.name for f in msg.fields)
                rows = []
            elif isinstance(msg, DataRow):
                rows.append(msg.values)
            elif isinstance(msg, CommandComplete):
                tag = msg.tag
            elif isinstance(msg, ErrorResponse):
                error = msg
            elif isinstance(msg, ReadyForQuery):
                break
            elif not isinstance(msg, EmptyQueryResponse):
                raise ProtocolError(f"unexpected {type(msg).__name__} in a query result")
            msg = await self._recv()
        if error is not None:
            raise server_error(self.where, error)
        return QueryResult(columns, tuple(rows), tag)

    async def identify_system(self) -> SystemIdentity:
        res = await self.query("IDENTIFY_SYSTEM")
        if len(res.rows) != 1 or len(res.rows[0]) < 4:
            raise ProtocolError("IDENTIFY_SYSTEM returned an unexpected result shape")
        return SystemIdentity(
            systemid=int(res.text(0, 0) or 0),
            timeline=int(res.text(0, 1) or 0),
            xlogpos=parse_lsn(res.text(0, 2) or ""),
            dbname=res.text(0, 3),
        )

    async def show(self, param: str) -> str:
        res = await self.query(f"SHOW {param}")
        value = res.text(0, 0) if res.rows else None
        if value is None:
            raise ProtocolError(f"SHOW {param} returned no value")
        return value

    async def wal_segment_size(self) -> int:
        return parse_size_setting(await self.show("wal_segment_size"))

    async def create_physical_slot(self, name: str, *, temporary: bool = False) -> None:
        """Create a physical slot that reserves WAL from now (see read_replication_slot).

        A temporary slot belongs to this session: the server drops it when the session ends,
        however it ends, so nothing is left holding WAL on the server."""
        kind = " TEMPORARY" if temporary else ""
        await self.query(f"CREATE_REPLICATION_SLOT {quote_ident(name)}{kind} PHYSICAL RESERVE_WAL")

    async def read_replication_slot(self, name: str) -> SlotInfo | None:
        """READ_REPLICATION_SLOT (v15): None when no such slot exists."""
        res = await self.query(f"READ_REPLICATION_SLOT {quote_ident(name)}")
        if not res.rows or res.rows[0][0] is None:
            return None
        restart = res.text(0, 1)
        tli = res.text(0, 2)
        return SlotInfo(
            slot_type=res.text(0, 0) or "",
            restart_lsn=parse_lsn(restart) if restart else None,
            restart_tli=int(tli) if tli else None,
        )

    async def drop_slot(self, name: str, wait: bool = False) -> None:
        await self.query(f"DROP_REPLICATION_SLOT {quote_ident(name)}{' WAIT' if wait else ''}")

    async def timeline_history(self, timeline: int) -> TimelineHistory:
        res = await self.query(f"TIMELINE_HISTORY {int(timeline)}")
        if len(res.rows) != 1 or len(res.rows[0]) != 2 or res.rows[0][1] is None:
            raise ProtocolError("TIMELINE_HISTORY returned an unexpected result shape")
        return TimelineHistory(res.text(0, 0) or "", res.rows[0][1])

    async def base_backup(self, options: str) -> AsyncIterator[BaseBackupEvent]:
        """Run `BASE_BACKUP (options)` and yield its events in order until BackupFinished.

        The messages are sequenced by replication_codec.BaseBackupReader; an error the server
        reports raises (typed, see server_error) after everything before it was yielded. The
        copy stream is read only as fast as the consumer takes events (bounded memory)."""
        await self._send_flush(query_message(f"BASE_BACKUP ({options})"))
        reader = BaseBackupReader()
        while True:
            if (
                reader.in_archive
                and (run := self._parser.archive_data_run(ARCHIVE_RUN_BYTES)) is not None
            ):
                yield reader.archive_data(run)  # the messages read so far, as one event
                continue
            for event in reader.handle(await self._recv()):
                if isinstance(event, ErrorResponse):
                    raise server_error(self.where, event)
                yield event
                if isinstance(event, BackupFinished):
                    return

    async def start_replication(
        self,
        slot: str | None,
        start_lsn: int,
        timeline: int,
        *,
        status_interval: float = 10.0,
        on_reply_requested: Callable[[], Awaitable[None]] | None = None,
    ) -> ReplicationStream:
        """Send START_REPLICATION; the returned stream yields XLogData until the stream ends."""
        slot_clause = f"SLOT {quote_ident(slot)} " if slot else ""
        sql = f"START_REPLICATION {slot_clause}PHYSICAL {format_lsn(start_lsn)} TIMELINE {timeline}"
        await self._send_flush(query_message(sql))
        stream = ReplicationStream(self, timeline, start_lsn, status_interval, on_reply_requested)
        msg = await self._recv()
        if isinstance(msg, CopyBothResponse):
            stream.copying = True
        elif isinstance(msg, RowDescription | ErrorResponse | CommandComplete):
            # Nothing to stream: the timeline is historic and we asked for its very end.
            await stream.read_end_result(msg)
        else:
            raise ProtocolError(f"unexpected {type(msg).__name__} in reply to START_REPLICATION")
        return stream

    def abort(self) -> None:
        """Drop the connection at once; a pending read then ends with ConnectionLost."""
        self.broken = True
        self._writer.transport.abort()

    async def close(self) -> None:
        if not self._writer.is_closing():
            with contextlib.suppress(Exception):
                self._writer.write(terminate_message())
            self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()


def socket_path(socket_dir: str, port: int) -> str:
    """Where PostgreSQL listening on `port` puts its unix socket in `socket_dir`."""
    return f"{socket_dir}/.s.PGSQL.{port}"


async def connect(
    host: str,
    port: int,
    user: str,
    password: str | None = None,
    application_name: str = "pg-neon",
    *,
    timeout: float = 30.0,
    auth_methods: frozenset[AuthMethod] = SCRAM_ONLY,
    socket_dir: str | None = None,
) -> ReplicationConnection:
    """Open and authenticate a physical replication connection: over the unix socket in
    `socket_dir` when given (a directory only the server's OS user can write, so nobody else
    can listen there), else over TCP to host:port. `auth_methods` are the authentication
    methods answered; any other request fails before a password byte is sent."""
    where = f"{host}:{port}" if socket_dir is None else socket_path(socket_dir, port)
    try:
        unix_path = None if socket_dir is None else where
        opening = open_streams(host, port, unix_path, STREAM_LIMIT)
        reader, writer = await within(opening, timeout)
    except (OSError, TimeoutError) as exc:
        raise Unavailable(
            f"cannot connect to PostgreSQL at {where}: {exc or 'timed out'}; is it running "
            "and listening there?"
        ) from None
    conn = ReplicationConnection(reader, writer, where)
    try:
        await within(conn._startup(user, password, application_name, auth_methods), timeout)
    except TimeoutError:
        await conn.close()
        raise Unavailable(f"PostgreSQL at {where} did not finish the login in {timeout}s") from None
    except BaseException:
        await conn.close()
        raise
    return conn


# --------------------------------------------------------------------------------------------
# Streaming


class ReplicationStream:
    """One START_REPLICATION exchange: iterate for XLogData chunks.

    Standby status updates go out from a timer task every `status_interval` seconds and right
    away when a keepalive asks for a reply (after `on_reply_requested`, which lets the owner
    fsync first so the flush position it reports is true). When iteration stops, either
    `next_timeline` says where the next timeline starts (the connection is idle again and can
    start replication on it), or `server_ended` says the server finished streaming (shutdown).
    """

    def __init__(
        self,
        conn: ReplicationConnection,
        timeline: int,
        start_lsn: int,
        status_interval: float,
        on_reply_requested: Callable[[], Awaitable[None]] | None,
    ) -> None:
        self.conn = conn
        self.timeline = timeline
        self.start_lsn = start_lsn
        self.status_interval = status_interval
        self.on_reply_requested = on_reply_requested
        self.write_lsn = 0
        self.flush_lsn = 0
        self.server_wal_end = 0
        self.copying = False
        self.next_timeline: tuple[int, int] | None = None
        self.server_ended = False
        self._sent_copy_done = False

    def update(self, write: int | None = None, flush: int | None = None) -> None:
        """Record positions for the next status update (flush only after an fsync)."""
        if write is not None:
            self.write_lsn = max(self.write_lsn, write)
        if flush is not None:
            self.flush_lsn = max(self.flush_lsn, flush)

    async def send_status(self, reply_requested: bool = False) -> None:
        if not self.copying or self._sent_copy_done:
            return
        msg = standby_status_update(
            self.write_lsn, self.flush_lsn, 0, pg_now_us(time.time()), reply_requested
        )
        await self.conn._send_flush(msg)

    async def _status_timer(self) -> None:
        while True:
            await asyncio.sleep(self.status_interval)
            await self.send_status()

    def __aiter__(self) -> AsyncIterator[XLogData]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[XLogData]:
        async for batch in self.batches():
            for rep in batch:
                yield rep

    async def batches(self, max_bytes: int = BATCH_BYTES) -> AsyncIterator[list[XLogData]]:
        """The XLogData messages in lists: those already received (up to `max_bytes`) come at
        once, so the consumer pays its per-chunk costs per list, not per 128 KiB message.

        A list is handed over before anything else is acted on (a keepalive that wants a
        reply, the end of the stream, an error), so what the consumer writes and reports is
        never behind what the server waits for."""
        if not self.copying:
            return
        timer = asyncio.create_task(self._status_timer())
        batch: list[XLogData] = []
        size = 0
        try:
            while True:
                if batch and (size >= max_bytes or not self.conn.message_ready()):
                    yield batch
                    batch, size = [], 0
                msg = await self.conn._recv()
                keepalive = None
                if isinstance(msg, CopyData):
                    rep = decode_replication_message(msg.data)
                    if isinstance(rep, XLogData):
                        self.server_wal_end = rep.wal_end
                        batch.append(rep)
                        size += len(rep.data)
                        continue
                    keepalive = rep
                if batch:
                    yield batch
                    batch, size = [], 0
                if keepalive is not None:
                    await self._keepalive(keepalive)
                elif isinstance(msg, CopyDone):
                    # End of a historic timeline: acknowledge, then the result set follows.
                    if not self._sent_copy_done:
                        self._sent_copy_done = True
                        await self.conn._send_flush(copy_done_message())
                    self.copying = False
                    await self.read_end_result(await self.conn._recv())
                    return
                elif isinstance(msg, CommandComplete):
                    # walsender's WalSndDone: all WAL sent and confirmed; the server exits.
                    self.copying = False
                    self.server_ended = True
                    self.conn.broken = True
                    return
                elif isinstance(msg, ErrorResponse):
                    self.copying = False
                    self.conn.broken = True
                    raise server_error(self.conn.where, msg)
                else:
                    raise ProtocolError(f"unexpected {type(msg).__name__} while streaming WAL")
        except NeonError:
            if batch:  # what arrived before a broken connection is still good WAL
                yield batch
            raise
        finally:
            timer.cancel()
            with contextlib.suppress(BaseException):
                await timer

    async def _keepalive(self, msg: PrimaryKeepalive) -> None:
        self.server_wal_end = max(self.server_wal_end, msg.wal_end)
        if msg.reply_requested:
            if self.on_reply_requested is not None:
                await self.on_reply_requested()
            await self.send_status()

    async def read_end_result(self, first: BackendMessage) -> None:
        """The (next_tli, next_tli_startpos) result set that ends a historic timeline."""
        if isinstance(first, CopyOutResponse):
            raise ProtocolError("unexpected CopyOutResponse after START_REPLICATION")
        res = await self.conn._collect_result(first)
        if res.rows:
            if len(res.rows[0]) != 2:
                raise ProtocolError("end-of-timeline result set has an unexpected shape")
            tli = int(res.text(0, 0) or 0)
            pos = parse_lsn(res.text(0, 1) or "")
            if tli <= self.timeline:
                raise ProtocolError(
                    f"server switched from timeline {self.timeline} to older timeline {tli}"
                )
            self.next_timeline = (tli, pos)
