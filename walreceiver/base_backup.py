"""A base backup of any running PostgreSQL 15 server, over our own replication client.

`run_base_backup(params, sink)` logs in (the connection's authentication policy applies:
SCRAM only unless the caller allowed more), refuses a server that is not PostgreSQL 15,
creates a temporary physical slot that reserves WAL, then runs

    BASE_BACKUP (LABEL '...', PROGRESS, CHECKPOINT 'fast', WAL, WAIT false, MANIFEST 'no',
                 TABLESPACE_MAP, TARGET 'client')

and hands each archive (one per tablespace, the main data directory last) to the sink as it
arrives: the sink gets the archive's name and tablespace and an async iterator of its bytes,
and the connection is read only as fast as the sink takes them, so memory stays bounded
whatever the database size.

Why fetched WAL plus a temporary slot is as safe as `pg_basebackup -X stream`: a backup is
only consistent with the WAL from its start position (the checkpoint's redo point) to its end
position. `-X stream` receives that WAL on a second connection while the files are copied,
through a temporary slot, so the server cannot recycle a segment before it was received. Here
the server appends the same segments (pg_wal/ members, with their archive_status .done files)
to the main archive after the files (the WAL option, "fetch" mode). Fetch alone can fail on a
busy server: a checkpoint during a long backup may remove a segment before the end, and the
backup fails with "requested WAL segment ... has already been removed". The temporary slot,
created with RESERVE_WAL in the same session before BASE_BACKUP, pins WAL from the latest
checkpoint's redo point (at or before the backup's start, which a newer checkpoint makes) until
the session ends, exactly as -X stream's slot pins it until it is streamed: the WAL the backup
needs is guaranteed to be there. What differs is cost, not safety: the server keeps the
backup's WAL in pg_wal until the end of the backup (past max_slot_wal_keep_size the slot is
invalidated, and then the backup fails with that error rather than being incomplete), and
the WAL arrives after the files. The slot belongs to the session, so it goes away however the
backup ends, even if this process is killed.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from pg15.lsn import format_lsn
from proto.errors import CorruptData, InvalidArgument, ProtocolError, Unavailable
from walreceiver.receiver import ConnParams
from walreceiver.replication import (
    ConnectionLost,
    ReplicationConnection,
    ServerError,
    connect,
)
from walreceiver.replication_codec import (
    ArchiveData,
    ArchiveEnd,
    ArchiveStart,
    BackupEnded,
    BackupFinished,
    BackupStarted,
    BackupTablespaces,
    BaseBackupEvent,
    ManifestData,
    ManifestStart,
    ProgressReport,
    TablespaceInfo,
)

E = TypeVar("E", bound=BaseBackupEvent)

SUPPORTED_MAJOR = 15
DATA_CORRUPTED = "XX001"  # basebackup.c's "checksum verification failure during base backup"
PROGRESS_STEP = 1 << 20  # call on_progress at least every MiB (the server's 'p' is 1/s at most)


class UnsupportedServer(InvalidArgument):
    """The server is not PostgreSQL 15 (the version the page format and redo are for)."""


class BaseBackupTruncated(Unavailable):
    """The connection ended before the server finished the backup: nothing of it is usable."""


class SourceDataCorrupted(CorruptData, ServerError):
    """Pages of the source failed checksum verification (reported after all data was sent)."""


@dataclass(frozen=True, slots=True)
class BaseBackupOptions:
    label: str = "pg-neon base backup"
    fast_checkpoint: bool = True
    """Ask for an immediate checkpoint (else the backup waits for a spread one)."""
    temporary_slot: bool = True
    """Pin the backup's WAL with a temporary slot (see the module docstring); needs a free
    max_replication_slots entry."""
    keep_slot: str | None = None
    """Pin the WAL with this permanent physical slot instead, created (RESERVE_WAL) before the
    backup in the same session, or reused when it exists; it stays after the backup, so a
    follower streaming from it misses no WAL after the backup's end (`neon pg attach`)."""
    verify_checksums: bool = True
    tablespace_map: bool = True
    """Describe tablespaces in a tablespace_map file, not pg_tblspc symlinks (as pg_basebackup
    -F tar): archives then hold only regular files and directories."""
    connect_timeout: float = 30.0


@dataclass(frozen=True, slots=True)
class BackupArchive:
    """One archive handed to the sink: a tar stream of one tablespace."""

    name: str
    tablespace_location: str | None
    """None for the main data directory (base.tar, which also holds the WAL)."""
    tablespace_oid: int | None


@dataclass(frozen=True, slots=True)
class BaseBackupProgress:
    bytes_done: int
    bytes_total: int | None
    """The server's estimate of the archives (PROGRESS); the WAL comes on top, so bytes_done
    can pass it near the end."""
    archive: str


@dataclass(frozen=True, slots=True)
class BaseBackupResult:
    system_identifier: int
    server_version: str
    start_lsn: int
    start_timeline: int
    end_lsn: int
    end_timeline: int
    """Recovery from the backup is consistent once it has replayed WAL up to end_lsn."""
    tablespaces: tuple[TablespaceInfo, ...]
    archives: tuple[ArchiveEnd, ...]
    slot: str | None
    """The slot that pinned the WAL: a temporary one (gone with the session) or `keep_slot`."""

    @property
    def bytes_received(self) -> int:
        return sum(a.size for a in self.archives)


BackupSink = Callable[[BackupArchive, AsyncIterator[bytes | memoryview]], Awaitable[None]]
"""Awaited once per archive with its bytes; it should consume them all (the rest is skipped)."""
ProgressCallback = Callable[[BaseBackupProgress], None]


def server_major_version(conn: ReplicationConnection) -> int:
    """The major version from the server_version the server reported at startup."""
    version = conn.server_params.get("server_version")
    match = re.match(r"\s*(\d+)", version or "")
    if match is None:
        raise UnsupportedServer(
            f"the server at {conn.where} reported no usable server_version ({version!r}); "
            "is it PostgreSQL?"
        )
    return int(match.group(1))


def quote_literal(text: str) -> str:
    """A replication-grammar string literal ('' doubles a quote; no backslash escapes)."""
    if "\0" in text:
        raise InvalidArgument(f"{text!r} contains a NUL byte")
    return "'" + text.replace("'", "''") + "'"


def base_backup_command_options(options: BaseBackupOptions) -> str:
    """The option list of PostgreSQL 15's BASE_BACKUP for a fetch-mode backup to us."""
    parts = [
        f"LABEL {quote_literal(options.label)}",
        "PROGRESS",
        f"CHECKPOINT '{'fast' if options.fast_checkpoint else 'spread'}'",
        "WAL",
        "WAIT false",  # the WAL is in the archive: no need to wait for archive_command
        "MANIFEST 'no'",
        "TARGET 'client'",
    ]
    if options.tablespace_map:
        parts.append("TABLESPACE_MAP")
    if not options.verify_checksums:
        parts.append("VERIFY_CHECKSUMS false")
    return ", ".join(parts)


def temporary_slot_name() -> str:
    return f"pg_neon_basebackup_{os.getpid()}_{secrets.token_hex(4)}"


async def run_base_backup(
    params: ConnParams,
    sink: BackupSink,
    *,
    options: BaseBackupOptions = BaseBackupOptions(),
    on_progress: ProgressCallback | None = None,
) -> BaseBackupResult:
    """Take a base backup of the server at `params`, streaming each archive to `sink`.

    Raises Unavailable (cannot connect), AuthFailed (ServerAuthFailed for a wrong password,
    NoReplicationPrivilege for a user without REPLICATION), UnsupportedServer (not
    PostgreSQL 15), ServerError subclasses for errors the server reports (before or during
    the copy, or after it: SourceDataCorrupted for a checksum failure, reported once all
    data was sent), BaseBackupTruncated when the connection
    ends mid-backup, ProtocolError for a malformed stream, and whatever the sink raises. On
    any error the connection is dropped, which makes the server abort the backup and drop
    the slot; what the sink already received must then be discarded.
    """
    conn = await connect(
        params.host,
        params.port,
        params.user,
        params.password,
        params.application_name,
        timeout=options.connect_timeout,
        auth_methods=params.auth_methods,
        socket_dir=params.socket_dir,
    )
    try:
        result = await _BackupRun(conn, sink, options, on_progress).run()
    except BaseException:
        conn.abort()
        await conn.close()
        raise
    await conn.close()
    return result


class _BackupRun:
    """One backup over one connection: the events of BASE_BACKUP dispatched to the sink."""

    def __init__(
        self,
        conn: ReplicationConnection,
        sink: BackupSink,
        options: BaseBackupOptions,
        on_progress: ProgressCallback | None,
    ) -> None:
        self.conn = conn
        self.sink = sink
        self.options = options
        self.on_progress = on_progress
        self.events: AsyncIterator[BaseBackupEvent] | None = None
        self.tablespaces: tuple[TablespaceInfo, ...] = ()
        self.total: int | None = None
        self.done = 0
        self.reported = 0
        self.archive = "(before the first archive)"
        self.archives: list[ArchiveEnd] = []

    async def run(self) -> BaseBackupResult:
        conn = self.conn
        major = server_major_version(conn)
        version = conn.server_params.get("server_version", "")
        if major != SUPPORTED_MAJOR:
            raise UnsupportedServer(
                f"the server at {conn.where} is PostgreSQL {version}; pg-neon imports only "
                f"from PostgreSQL {SUPPORTED_MAJOR}"
            )
        identity = await conn.identify_system()
        slot = None
        if self.options.keep_slot is not None:
            slot = self.options.keep_slot
            held = await conn.read_replication_slot(slot)
            if held is None:
                await conn.create_physical_slot(slot)
            elif held.slot_type != "physical" or held.restart_lsn is None:
                raise InvalidArgument(
                    f"replication slot {slot!r} on {conn.where} is not a physical slot holding "
                    "WAL (a logical slot, or one created without RESERVE_WAL and never used); "
                    "drop it or name another one with --slot"
                )
        elif self.options.temporary_slot:
            slot = temporary_slot_name()
            await conn.create_physical_slot(slot, temporary=True)
        self.events = conn.base_backup(base_backup_command_options(self.options))
        start = await self._expect(BackupStarted)
        self.tablespaces = (await self._expect(BackupTablespaces)).tablespaces
        self.total = BackupTablespaces(self.tablespaces).total_bytes
        oids = {t.location: t.oid for t in self.tablespaces}
        while True:
            event = await self._next()
            if isinstance(event, ArchiveStart):
                self.archive = event.name
                archive = BackupArchive(
                    event.name, event.tablespace_location, oids.get(event.tablespace_location)
                )
                chunks = self._archive_chunks()
                await self.sink(archive, chunks)
                async for _ in chunks:  # whatever the sink left of its archive
                    pass
                self._progress(force=True)
            elif isinstance(event, ArchiveData):  # the sink closed its iterator early
                self.done += len(event.data)
            elif isinstance(event, ArchiveEnd):
                self.archives.append(event)
            elif isinstance(event, BackupEnded):
                end = event
                break
            elif not isinstance(event, ProgressReport | ManifestStart | ManifestData):
                raise ProtocolError(f"unexpected {type(event).__name__} in the base backup")
        await self._expect(BackupFinished)  # a checksum failure is reported only here
        if (end.timeline, end.lsn) < (start.timeline, start.lsn):
            raise ProtocolError(
                f"the backup ends at {format_lsn(end.lsn)} on timeline {end.timeline}, "
                f"before its start {format_lsn(start.lsn)} on timeline {start.timeline}"
            )
        return BaseBackupResult(
            system_identifier=identity.systemid,
            server_version=version,
            start_lsn=start.lsn,
            start_timeline=start.timeline,
            end_lsn=end.lsn,
            end_timeline=end.timeline,
            tablespaces=self.tablespaces,
            archives=tuple(self.archives),
            slot=slot,
        )

    def _where(self) -> str:
        return f"during the base backup, in {self.archive} after {self.done} bytes"

    async def _next(self) -> BaseBackupEvent:
        assert self.events is not None
        try:
            return await anext(self.events)
        except StopAsyncIteration:
            raise ProtocolError("the base backup ended without its final messages") from None
        except ConnectionLost as exc:
            raise BaseBackupTruncated(
                f"{exc} ({self._where()}): the backup is incomplete and unusable; run it again"
            ) from None
        except ServerError as exc:
            if exc.sqlstate == DATA_CORRUPTED:
                raise SourceDataCorrupted(
                    f"{exc}: the source server's data files fail their checksums (its log names "
                    "them); the backup is refused. Repair the source, or back up without "
                    "checksum verification to copy the damage as it is",
                    exc.response,
                ) from None
            raise type(exc)(f"{exc} ({self._where()})", exc.response) from None

    async def _expect(self, kind: type[E]) -> E:
        while True:
            event = await self._next()
            if isinstance(event, kind):
                return event
            if not isinstance(event, ProgressReport):
                raise ProtocolError(
                    f"expected {kind.__name__} in the base backup, got {type(event).__name__}"
                )

    async def _archive_chunks(self) -> AsyncIterator[bytes | memoryview]:
        while True:
            event = await self._next()
            if isinstance(event, ArchiveData):
                self.done += len(event.data)
                self._progress()
                yield event.data
            elif isinstance(event, ArchiveEnd):
                self.archives.append(event)
                return
            elif not isinstance(event, ProgressReport):
                raise ProtocolError(f"unexpected {type(event).__name__} inside an archive")

    def _progress(self, force: bool = False) -> None:
        if self.on_progress is None:
            return
        if force or self.done - self.reported >= PROGRESS_STEP:
            self.reported = self.done
            self.on_progress(BaseBackupProgress(self.done, self.total, self.archive))


__all__ = [
    "BackupArchive",
    "BackupSink",
    "BaseBackupOptions",
    "BaseBackupProgress",
    "BaseBackupResult",
    "BaseBackupTruncated",
    "ProgressCallback",
    "SourceDataCorrupted",
    "UnsupportedServer",
    "run_base_backup",
]
