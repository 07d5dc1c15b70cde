"""The WAL receiver: a replication slot, streamed into the durable archive, forever.

`WalReceiver.run()` connects, makes sure the slot exists, resumes where the archive's durable
data ends (else at the slot's restart point, else at the server's current position), streams
into the archive, reports write/flush positions (flush only after fsync), follows timeline
switches, and reconnects with exponential backoff when the connection drops. It returns when
the server ends the stream (shutdown after its final WAL was confirmed); the caller decides
whether to run it again. Cancel the task to stop it.

Archive I/O runs on one dedicated worker thread: calls are serialized there, and an fsync
never stalls the event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import faulthandler
import fcntl
import json
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import ParamSpec, TypeVar

from durable_files import PRIVATE_UMASK
from pg15.lsn import format_lsn, lsn_segno, segment_start
from proto.aio import wait_event
from proto.errors import Conflict, CorruptData, NeonError, Unavailable
from walreceiver.archive import WalArchive
from walreceiver.replication import (
    ReplicationConnection,
    ReplicationStream,
    SlotAlreadyExists,
    SlotNotFound,
    connect,
)
from walreceiver.replication_auth import SCRAM_ONLY, AuthMethod, parse_auth_methods
from walreceiver.replication_codec import XLogData

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

SERVER_ENDED = "server ended stream"
PAUSED = "paused"
"""Why run() returned after finish_stream(): the owner wants no new connection."""


@dataclass(frozen=True, slots=True)
class ConnParams:
    host: str
    port: int
    user: str
    password: str | None = None
    application_name: str = "pg-neon-walreceiver"
    auth_methods: frozenset[AuthMethod] = SCRAM_ONLY
    """The authentication methods answered (replication_auth); others fail unanswered."""
    socket_dir: str | None = None
    """Connect through the unix socket there (not host) when given."""


@dataclass(frozen=True, slots=True)
class WalChunk:
    """Contiguous WAL, durable in the archive, handed to `on_flushed` in stream order."""

    timeline: int
    start_lsn: int
    data: bytes | memoryview

    @property
    def end_lsn(self) -> int:
        return self.start_lsn + len(self.data)


class ReceiverState(enum.Enum):
    IDLE = "idle"
    CONNECTING = "connecting"
    STREAMING = "streaming"
    BACKOFF = "backoff"
    ENDED = "ended"  # the server ended the stream cleanly
    STOPPED = "stopped"  # cancelled by the owner
    FAILED = "failed"  # a non-retryable error; see last_error


def is_retryable(err: BaseException) -> bool:
    """Connection trouble and a slot still held by our previous (dead) session are transient.

    Archive I/O errors (a failed fsync above all) are not: the data may be lost, so we stop.
    """
    return isinstance(err, Unavailable | Conflict)


class WalReceiver:
    """Streams a slot into a WAL archive; see the module docstring for the life cycle.

    `on_flushed(chunk)` is awaited with WAL in stream order once it is fsynced in the archive:
    each byte once per WalReceiver (resumes and reconnects do not repeat it), contiguous
    across timeline switches (after a switch the chunks carry the new timeline). It runs in
    the receiving task, so a slow hook slows streaming (back-pressure, not unbounded memory).
    `received_lsn` is the end of WAL written to the archive in the current session,
    `flushed_lsn` the end of what is durable there (and reported to the server as flushed).
    """

    def __init__(
        self,
        params: ConnParams,
        slot: str,
        archive_dir: Path,
        *,
        create_slot: bool = False,
        status_interval: float = 1.0,
        on_flushed: Callable[[WalChunk], Awaitable[None]] | None = None,
        on_progress: Callable[[WalReceiver], None] | None = None,
        lock_archive: bool = False,
        min_backoff: float = 0.2,
        max_backoff: float = 30.0,
    ) -> None:
        self.params = params
        self.slot = slot
        self.archive_dir = Path(archive_dir)
        self.create_slot = create_slot
        self.status_interval = status_interval
        self.on_flushed = on_flushed
        self.on_progress = on_progress
        self.lock_archive = lock_archive
        self._lock_fd: int | None = None
        self._retry_now = asyncio.Event()
        self._finishing = False
        self._last_tries = 0
        """Connections still to try once finishing (finish_stream)."""
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self._state = ReceiverState.IDLE
        self.timeline = 0
        self.received_lsn = 0
        self.flushed_lsn = 0
        self.last_error: BaseException | None = None
        self.end_reason: str | None = None
        self.archive: WalArchive | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[WalChunk] = deque()
        self._queued_end: int | None = None  # end of WAL already handed (or queued) to the hook
        self._delivered_end: int | None = None
        self._deliver_lock = asyncio.Lock()
        self._stream: ReplicationStream | None = None

    @property
    def state(self) -> ReceiverState:
        return self._state

    @state.setter
    def state(self, value: ReceiverState) -> None:
        self._state = value
        if self.on_progress is not None:
            self.on_progress(self)

    def retry_now(self) -> None:
        """Skip the current reconnect backoff (the server was just started)."""
        self._retry_now.set()

    def finish_stream(self) -> None:
        """Connect no more: a stream in progress (or being opened) runs to its end (a server
        that is shutting down sends its last WAL first), then run() returns PAUSED instead of
        reconnecting. A receiver waiting out a reconnect backoff (or not yet started) tries
        once more, at once: the server may well be up, about to be stopped, and a server
        shutting down takes no new replication connection, so its last WAL (the shutdown
        checkpoint a checkout waits for) would reach us only at its next start."""
        if not self._finishing:
            self._last_tries = (
                1 if self._state in (ReceiverState.IDLE, ReceiverState.BACKOFF) else 0
            )
        self._finishing = True
        self._retry_now.set()

    async def _backoff(self, seconds: float) -> None:
        self._retry_now.clear()
        await wait_event(self._retry_now, seconds)

    async def _io(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wal-archive")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    # -- life cycle -----------------------------------------------------------------------

    async def run(self) -> str:
        """Stream until the server ends the stream (returns the reason) or a fatal error."""
        backoff = self.min_backoff
        try:
            while True:
                if self._finishing:
                    if self._last_tries <= 0:
                        self.end_reason = PAUSED
                        self.state = ReceiverState.ENDED
                        return PAUSED
                    self._last_tries -= 1
                self.state = ReceiverState.CONNECTING
                try:
                    reason = await self._session()
                except Exception as exc:
                    self.last_error = exc
                    if not is_retryable(exc):
                        self.state = ReceiverState.FAILED
                        raise
                else:
                    self.state = ReceiverState.ENDED
                    self.end_reason = reason
                    return reason
                if self.state == ReceiverState.STREAMING:
                    backoff = self.min_backoff  # we got somewhere: start backing off afresh
                if self._finishing:  # no reconnecting: the loop's top returns
                    log.warning(
                        "%s; not reconnecting: the stream was asked to finish", self.last_error
                    )
                    continue
                self.state = ReceiverState.BACKOFF
                log.warning("%s; reconnecting in %.1fs", self.last_error, backoff)
                await self._backoff(backoff)
                backoff = min(backoff * 2, self.max_backoff)
        except asyncio.CancelledError:
            self.state = ReceiverState.STOPPED
            raise
        finally:
            await self._close_archive()

    async def _close_archive(self) -> None:
        """Close the archive, then give up its lock: a supervised receiver reports that it
        ended after this, and the pageserver may write the archive from then on (a stopped
        node's WAL tail, pageserver/follow/wal_tail.py), without waiting for the process's
        exit."""
        if self.archive is not None:
            archive, self.archive = self.archive, None
            with contextlib.suppress(Exception):
                await asyncio.shield(self._io(archive.close))
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- one connection -------------------------------------------------------------------

    async def _session(self) -> str:
        p = self.params
        conn = await connect(
            p.host,
            p.port,
            p.user,
            p.password,
            p.application_name,
            auth_methods=p.auth_methods,
            socket_dir=p.socket_dir,
        )
        try:
            if self.archive is None:
                seg_size = await conn.wal_segment_size()
                if self.lock_archive and self._lock_fd is None:
                    self._lock_fd = await lock_archive_dir(self.archive_dir)
                self.archive = await self._io(WalArchive, self.archive_dir, seg_size)
            await self._check_system(conn, self.archive)
            timeline, lsn = await self._start_point(conn, self.archive)
            while True:
                await self._io(self.archive.begin, timeline, lsn)
                # begin() fsynced everything before `lsn`: hand the hook what it has not seen
                # of that. Bytes past `lsn` were truncated and will come again; the hook must
                # not see them twice.
                self.timeline = timeline
                await self._flushed(lsn)
                self._pending.clear()
                self._queued_end = self._delivered_end
                self.flushed_lsn = lsn
                log.info("streaming from %s on timeline %d", format_lsn(lsn), timeline)
                stream = await conn.start_replication(
                    self.slot,
                    lsn,
                    timeline,
                    status_interval=self.status_interval,
                    on_reply_requested=self._flush,
                )
                await self._stream_into_archive(stream)
                if stream.next_timeline is None:
                    return SERVER_ENDED
                timeline, switch = stream.next_timeline
                history = await conn.timeline_history(timeline)
                await self._io(self.archive.write_history, history.filename, history.content)
                log.info("timeline %d starts at %s", timeline, format_lsn(switch))
                # Like pg_receivewal: restart at the segment start, on the new timeline.
                seg = self.archive.segment_size
                lsn = segment_start(lsn_segno(switch, seg), seg)
        finally:
            self._stream = None
            await conn.close()

    async def _check_system(self, conn: ReplicationConnection, archive: WalArchive) -> None:
        ours = await self._io(archive.system_identifier)
        theirs = (await conn.identify_system()).systemid
        if ours is not None and ours != theirs:
            raise CorruptData(
                f"the WAL archive {archive.directory} belongs to database system {ours}, but "
                f"{conn.where} is system {theirs}; use a separate archive directory per server"
            )

    async def _start_point(
        self, conn: ReplicationConnection, archive: WalArchive
    ) -> tuple[int, int]:
        slot = await conn.read_replication_slot(self.slot)
        if slot is None:
            if not self.create_slot:
                raise SlotNotFound(
                    f"replication slot {self.slot!r} does not exist on {conn.where}; create it "
                    "or let the receiver create it (--create-slot)"
                )
            with contextlib.suppress(SlotAlreadyExists):
                await conn.create_physical_slot(self.slot)
            slot = await conn.read_replication_slot(self.slot)
        resume = await self._io(archive.resume)
        if resume is not None:
            return resume
        seg = archive.segment_size
        if slot is not None and slot.restart_lsn is not None:
            tli = slot.restart_tli or (await conn.identify_system()).timeline
            return tli, segment_start(lsn_segno(slot.restart_lsn, seg), seg)
        ident = await conn.identify_system()
        return ident.timeline, segment_start(lsn_segno(ident.xlogpos, seg), seg)

    async def _stream_into_archive(self, stream: ReplicationStream) -> None:
        assert self.archive is not None
        archive = self.archive
        self._stream = stream
        stream.update(write=archive.written_lsn, flush=archive.flushed_lsn)
        flusher = asyncio.create_task(self._flush_timer(stream))
        # A failed fsync must stop streaming now, not when the next message arrives.
        flusher.add_done_callback(lambda t: None if t.cancelled() else stream.conn.abort())
        self.state = ReceiverState.STREAMING
        try:
            async for batch in stream.batches():
                await self._io(_write_batch, archive, batch)
                end = batch[-1].data_end
                self.received_lsn = end
                stream.update(write=end)
                if self.on_flushed is not None:
                    data = batch[0].data if len(batch) == 1 else b"".join(m.data for m in batch)
                    self._queue(WalChunk(archive.timeline, batch[0].data_start, data))
                if not stream.conn.message_ready():
                    # Caught up with the server: make it durable and hand it on now, as
                    # PostgreSQL's walreceiver does when no more data is ready (XLogWalRcvFlush,
                    # src/backend/replication/walreceiver.c), not at the next status tick: a
                    # snapshot or checkout waiting for the last records waited up to 1 s.
                    await self._flush()
                elif archive.flushed_lsn > self.flushed_lsn:  # a segment just completed
                    await self._flushed(archive.flushed_lsn)
        except NeonError:
            failure = flusher.exception() if flusher.done() and not flusher.cancelled() else None
            if failure is not None:
                raise failure from None
            raise
        finally:
            flusher.cancel()
            with contextlib.suppress(BaseException):
                await flusher
        await self._flush()

    def _queue(self, chunk: WalChunk) -> None:
        """Queue a chunk for the hook, minus any prefix it already has (after a resume)."""
        done = self._queued_end
        if done is not None and chunk.start_lsn < done:
            if chunk.end_lsn <= done:
                return
            chunk = WalChunk(chunk.timeline, done, chunk.data[done - chunk.start_lsn :])
        self._pending.append(chunk)
        self._queued_end = chunk.end_lsn

    async def _flush_timer(self, stream: ReplicationStream) -> None:
        while True:
            await asyncio.sleep(self.status_interval)
            await self._flush()
            with contextlib.suppress(NeonError):  # connection trouble: the reader reports it
                await stream.send_status()

    async def _flush(self) -> None:
        """fsync the archive, then let the server and the hook know."""
        if self.archive is not None:
            await self._flushed(await self._io(self.archive.flush))

    async def _flushed(self, lsn: int) -> None:
        self.flushed_lsn = max(self.flushed_lsn, lsn)
        if self._stream is not None:
            self._stream.update(flush=lsn)
        if self.on_progress is not None:
            self.on_progress(self)
        if self.on_flushed is None:
            return
        async with self._deliver_lock:
            while self._pending and self._pending[0].start_lsn < lsn:
                chunk = self._pending.popleft()
                if chunk.end_lsn > lsn:  # deliver the durable part, keep the rest
                    cut = lsn - chunk.start_lsn
                    self._pending.appendleft(WalChunk(chunk.timeline, lsn, chunk.data[cut:]))
                    chunk = WalChunk(chunk.timeline, chunk.start_lsn, chunk.data[:cut])
                await self.on_flushed(chunk)
                self._delivered_end = chunk.end_lsn


def _write_batch(archive: WalArchive, batch: list[XLogData]) -> None:
    """Archive consecutive XLogData messages (one trip to the archive thread for all)."""
    for msg in batch:
        archive.write(msg.data_start, msg.data)


# --------------------------------------------------------------------------------------------
# Entry point: `python -m walreceiver.receiver ...` (tests run it as a killable process)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Stream a PostgreSQL replication slot into a WAL dir")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=5432)
    ap.add_argument(
        "--socket-dir", help="connect through the server's unix socket in this directory"
    )
    ap.add_argument(
        "--auth-method",
        action="append",
        choices=[m.value for m in AuthMethod],
        help="an authentication method to answer (repeat for several; default: scram-sha-256 "
        "only, so a cleartext or md5 request never gets the password)",
    )
    ap.add_argument("--user", required=True)
    ap.add_argument("--password-file", type=Path)
    ap.add_argument("--slot", required=True)
    ap.add_argument("--archive", type=Path, required=True)
    ap.add_argument("--create-slot", action="store_true")
    ap.add_argument("--status-interval", type=float, default=1.0)
    ap.add_argument("--max-backoff", type=float, default=30.0)
    ap.add_argument("--application-name", default="pg-neon-walreceiver")
    ap.add_argument(
        "--supervised",
        action="store_true",
        help="run under the pageserver (pageserver/follow/receiver_process.py): the password "
        "is the first line of stdin, the receiver stops when stdin closes (its parent died), "
        "progress goes to stdout as JSON lines, SIGUSR1 skips a reconnect backoff, SIGUSR2 "
        "finishes the current stream without reconnecting, and a lock file keeps a second "
        "receiver off the same archive",
    )
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap.parse_args(argv)


LOCK_FILE = ".receiver.lock"
LOCK_WAIT_SECONDS = 30.0


def open_archive_lock(directory: Path) -> int:
    """The descriptor of the archive's lock file, for `try_archive_lock`: how the archive is
    locked, by its receiver and by the pageserver appending a stopped node's WAL tail
    (pageserver/follow/wal_tail.py)."""
    return os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)


def try_archive_lock(fd: int) -> bool:
    """Take the exclusive lock of `open_archive_lock`'s descriptor, if no one holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


async def lock_archive_dir(directory: Path) -> int:
    """An exclusive lock on the archive, held for the life of this process (the fd stays
    open); a receiver of a killed parent may still be finishing, so wait for it."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = open_archive_lock(directory)
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while not try_archive_lock(fd):
        if time.monotonic() > deadline:
            os.close(fd)
            raise Conflict(
                f"another walreceiver holds {directory / LOCK_FILE} for more than "
                f"{LOCK_WAIT_SECONDS:.0f}s"
            )
        await asyncio.sleep(0.1)
    return fd


def progress_event(r: WalReceiver) -> dict[str, object]:
    """What a supervised receiver reports (one JSON object per line on stdout)."""
    return {
        "state": r.state.value,
        "timeline": r.timeline,
        "received": r.received_lsn,
        "flushed": r.flushed_lsn,
        # A supervisor calls a full archive writable again once WAL is durable up to this.
        "attempted": r.archive.attempted_lsn if r.archive is not None else 0,
        "segment_size": r.archive.segment_size if r.archive is not None else 0,
        "error": str(r.last_error) if r.last_error is not None else None,
        # The supervisor tells a full or read-only archive (it waits for room) from the rest.
        "errno": error_errno(r.last_error),
    }


def error_errno(exc: BaseException | None) -> int | None:
    """The errno of an OSError (a full or read-only archive's), else None."""
    return exc.errno if isinstance(exc, OSError) else None


def _read_line(fd: int) -> str:
    """One line from a raw fd, byte by byte (nothing after it is consumed)."""
    out = bytearray()
    while (byte := os.read(fd, 1)) and byte != b"\n":
        out += byte
    return out.decode()


def _emit(event: dict[str, object]) -> None:
    try:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # The parent is gone; the stdin watcher stops us. Nothing more can be reported.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


async def _main(args: argparse.Namespace) -> str:
    password = None
    if args.password_file:
        password = args.password_file.read_text().rstrip("\r\n")
    if args.supervised:
        password = _read_line(0).rstrip("\r\n") or None
    receiver = WalReceiver(
        ConnParams(
            args.host,
            args.port,
            args.user,
            password,
            args.application_name,
            auth_methods=parse_auth_methods(args.auth_method or [AuthMethod.SCRAM_SHA_256]),
            socket_dir=args.socket_dir,
        ),
        args.slot,
        args.archive,
        create_slot=args.create_slot,
        status_interval=args.status_interval,
        max_backoff=args.max_backoff,
        on_progress=(lambda r: _emit(progress_event(r))) if args.supervised else None,
        lock_archive=args.supervised,
    )
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        if task is not None:
            loop.add_signal_handler(sig, task.cancel)
    if args.supervised:
        loop.add_signal_handler(signal.SIGUSR1, receiver.retry_now)
        loop.add_signal_handler(signal.SIGUSR2, receiver.finish_stream)

        def watch_parent() -> None:
            # The raw fd, not sys.stdin: a daemon thread blocked inside the buffered reader
            # would hold its lock at interpreter shutdown.
            with contextlib.suppress(OSError):
                while os.read(0, 4096):
                    pass  # EOF: the parent closed the pipe or died
            if task is not None:
                loop.call_soon_threadsafe(task.cancel)

        threading.Thread(target=watch_parent, name="watch-parent", daemon=True).start()
    try:
        return await receiver.run()
    except asyncio.CancelledError:
        return "stopped"


def main(argv: list[str] | None = None) -> int:
    os.umask(PRIVATE_UMASK)  # the WAL archive is readable by us only
    args = _parse_args(argv)
    faulthandler.enable()
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="walreceiver: %(message)s",
        stream=sys.stderr,
    )
    try:
        import uvloop

        runner: Callable[..., str] = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        reason = runner(_main(args))
    except (NeonError, OSError) as exc:
        print(f"walreceiver: error: {exc}", file=sys.stderr)
        if args.supervised:
            _emit({"failed": str(exc), "errno": error_errno(exc)})
        return 1
    if args.supervised:
        _emit({"ended": reason})
    else:
        print(f"walreceiver: {reason}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
