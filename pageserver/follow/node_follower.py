"""Following one PostgreSQL node: its walreceiver process, the WAL archive, and the decoder.

The receiver runs in a child process (pageserver/follow/receiver_process.py) that streams the
node's slot into its WAL archive, `<storage>/pagestore/wal/<node id>/<timeline id>`
(`NodeStore.wal_dir`), and reports how far that archive is durable. A decode thread reads
the archive from where the page history ends up to that point, decodes every record and
ingests it: receiving and decoding run on two cores, and after a restart the same
loop re-ingests what the durable layers do not hold yet. The follower outlives the node's
restarts: when the server ends the stream (it shut down), the follower starts a receiver again
after a pause, and `kick()` (on `pg start`) makes that happen at once. A node the CLI stopped
is `pause()`d instead: after its last WAL no connection is attempted (whoever holds its port
meanwhile hears nothing from us) until `resume()`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import itertools
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pageserver.api.metrics import Metrics
from pageserver.follow.followed_nodes import FollowedNode
from pageserver.follow.receiver_process import ReceiverProcess
from pageserver.follow.wal_tail import append_tail, locked_archive, pg_wal_bytes, valid_end
from pageserver.history.node_store import NodeStore
from pageserver.redo import REDO_BY_RMGR
from pg15.lsn import format_lsn
from pg15.records import DecodedRecord, decode_record, decode_records
from pg15.xlog_reader import RawRecord, WalReader
from proto.aio import wait_event, within
from proto.errors import Conflict, CorruptData, InvalidArgument, NeonError, Unavailable
from walreceiver.archive import WalArchive
from walreceiver.receiver import ConnParams, ReceiverState, WalChunk
from walreceiver.replication import connect
from walreceiver.replication_auth import SCRAM_ONLY, TRUST_OR_SCRAM, parse_auth_methods

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 20  # archived WAL read and decoded at a time (larger is no faster)
FAILED_RETRY_SECONDS = 10.0
ENDED_RETRY_SECONDS = 1.0
STALLED_RETRY_SECONDS = 2.0
PAUSE_CONNECT_WAIT = 15.0
"""Seconds a pause waits for a receiver being started to connect (NodeFollower.pause)."""
# Errors the operator fixes (free space, remount read-write): ingest waits and retries then.
STALL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})
RECEIVER_KILL_AFTER = 1.0
"""Seconds `take_tail` gives the receiver process to end on SIGTERM before it SIGKILLs it
(it ends in a few ms; one signalled between its fork and its exec lost the signal)."""
RECEIVER_EXIT_POLL = 0.002
"""How often `take_tail` looks whether the receiver process has given up the archive (a
few ms after it is told to end)."""


@dataclass(frozen=True, slots=True)
class _TailJob:
    """`take_tail`'s work for the decode thread, which owns the reader it starts from."""

    pg_wal: Path
    timeline: int
    """The node's timeline, from its pg_control: its segment files' names."""
    result: concurrent.futures.Future[int]


class NodeFollower:
    def __init__(
        self,
        node: FollowedNode,
        store: NodeStore,
        metrics: Metrics,
    ) -> None:
        self.node = node
        self.store = store
        self.metrics = metrics
        self.receiver = ReceiverProcess(
            ConnParams(
                node.host,
                node.port,
                node.user,
                node.password,
                application_name=f"neon-pageserver-{node.node_id}",
                # A managed node's pg_hba.conf trusts its private socket and asks for SCRAM
                # over TCP; nothing else is answered (see replication_auth).
                auth_methods=(
                    parse_auth_methods(node.auth_methods)
                    if node.auth_methods is not None
                    else TRUST_OR_SCRAM
                    if node.socket_dir
                    else SCRAM_ONLY
                ),
                socket_dir=node.socket_dir,
            ),
            node.slot,
            store.wal_dir,
            on_progress=self._on_progress,
            max_backoff=5.0,
        )
        self.reader: WalReader | None = None
        self.records = 0
        self.decode_error: str | None = None
        """Why decoding stopped for good (corrupt or missing WAL, a bug): it never resumes."""
        self.stall_error: str | None = None
        """Why ingest waits (its storage is full or read-only); it retries until it can write."""
        self.receive_error: str | None = None
        """Why the last receiver process failed; kept (across its retries) until WAL flows."""
        self._receive_stalled_at: int | None = None
        """The end of the receiver's archive write that failed on a full or read-only
        storage: the stall lasts until WAL is durable up to it (a resume after the part of
        that write that reached the file ends short of it)."""
        self.stream_ended = False
        self._decoded_lsn = 0
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._active = asyncio.Event()
        """Set while not paused: the receiver may connect."""
        if not node.paused:
            self._active.set()
        self._progress = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._decoder: threading.Thread | None = None
        self._warned_rmgrs: set[str] = set()
        # What the decode thread may read: the archive is durable up to (timeline, lsn).
        self._cond = threading.Condition()
        self._durable: tuple[int, int] = (0, 0)
        self._stream_start: int | None = None
        self._tail_job: _TailJob | None = None
        self._stopping = False
        self._closed = False
        """Set by stop(): the streaming task ends at its next turn, cancelled or not."""

    # life cycle

    def start(self) -> None:
        if self._task is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._closed = False
        if self.node.paused:  # stop() left it set
            self._active.clear()
        self._decoder = threading.Thread(
            target=self._decode_loop, name=f"decode-{self.node.node_id}", daemon=True
        )
        self._decoder.start()
        self._task = asyncio.create_task(self._run(), name=f"follow-{self.node.node_id}")

    async def stop(self) -> None:
        """End the streaming task and the decode thread. The task is cancelled, and told by
        a flag too: a `pg checkout` hung 120 s in `node_branch`, stop() in `await task` and
        the task in `_active.wait()` of a paused node, having lost its cancellation in
        `asyncio.wait_for` (see `proto.aio.wait_event`); the flag ends the loop at its next turn
        should a cancellation be lost anywhere else."""
        task, self._task = self._task, None
        if task is not None:
            self._closed = True
            self._active.set()
            self._wake.set()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        decoder, self._decoder = self._decoder, None
        if decoder is not None:
            with self._cond:
                self._stopping = True
                self._cond.notify_all()
            await asyncio.to_thread(decoder.join)

    async def server_wal_lsn(self) -> int:
        """The followed server's WAL flush position now (IDENTIFY_SYSTEM on a replication
        connection of its own, with the follower's credentials and authentication policy)."""
        p = self.receiver.params
        conn = await connect(
            p.host, p.port, p.user, p.password, f"{p.application_name} (position)",
            timeout=15.0, auth_methods=p.auth_methods, socket_dir=p.socket_dir,
        )  # fmt: skip
        try:
            return (await conn.identify_system()).xlogpos
        finally:
            await conn.close()

    def kick(self) -> None:
        """Reconnect now (the node was just started) instead of waiting out a backoff, and
        retry a stalled flush at once."""
        self._wake.set()
        self.receiver.retry_now()
        with self._cond:
            self._cond.notify_all()

    @property
    def ingest_state(self) -> str:
        """ok, stalled (retrying: storage full, receiver failed) or failed (decoding stopped)."""
        if self.decode_error is not None:
            return "failed"
        if self.stall_error is not None or self.receive_error is not None:
            return "stalled"
        return "ok"

    @property
    def ingest_error(self) -> str | None:
        """What stops ingest now, if anything (see ingest_state)."""
        if self.decode_error is not None:
            return self.decode_error
        if self.stall_error is not None:
            return self.stall_error
        if self.receive_error is not None:
            return f"receiving WAL failed: {self.receive_error}"
        return None

    def check_ingesting(self) -> None:
        """Raise the ingest error at once, for callers that would otherwise wait on ingest."""
        error = self.ingest_error
        if error is None:
            return
        cls = CorruptData if self.decode_error is not None else Unavailable
        raise cls(f"node {self.node.node_id}: WAL ingest {self.ingest_state}: {error}")

    async def pause(self, wal_tail: bool = False) -> None:
        """Connect no more until resume(): a stream in progress runs to its end (a node that
        is shutting down sends its last WAL first), then the receiver process exits. Returns
        once a receiver that was starting or connecting has connected (or failed to, or
        PAUSE_CONNECT_WAIT passed): the caller stops the node next, and a server shutting down
        takes no new replication connection, so its last WAL (the shutdown checkpoint a
        checkout waits for) would reach the pageserver only at its next start. With
        `wal_tail` the node's last WAL is taken from its pg_wal instead (`take_tail`): the
        receiver is ended now (a new one still connecting after a checkout's start took a
        checkout right after it 80-120 ms)."""
        self.node = replace(self.node, paused=True)
        self._active.clear()
        self.receiver.finish_stream()
        if wal_tail:
            self.receiver.stop_streaming()
            return
        await self.receiver.wait_connected(PAUSE_CONNECT_WAIT)

    def resume(self) -> None:
        """Follow the node again, at once (it was just started)."""
        self.node = replace(self.node, paused=False)
        self._active.set()
        self.kick()

    async def _run(self) -> None:
        while True:
            await self._active.wait()
            if self._closed:
                return
            if not self._active.is_set():  # paused again before this task resumed
                continue
            self._wake.clear()
            delay = ENDED_RETRY_SECONDS
            try:
                reason = await self.receiver.run()
                self.stream_ended = True
                log.info(
                    "node %s: %s at %s",
                    self.node.node_id,
                    reason,
                    format_lsn(self.receiver.flushed_lsn),
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a follower must survive any failure
                log.error("node %s: streaming failed: %s", self.node.node_id, exc)
                self.receive_error = str(exc)
                delay = FAILED_RETRY_SECONDS
            await wait_event(self._wake, delay)

    # decoding

    def _on_progress(self, receiver: ReceiverProcess) -> None:
        """The receiver reported: let the decoder read what became durable, and say what
        failed."""
        self._advance_durable(receiver)
        self._note_receiver_error(receiver)

    def _advance_durable(self, receiver: ReceiverProcess) -> None:
        timeline, lsn = receiver.timeline, receiver.flushed_lsn
        if not timeline or not lsn:
            return
        with self._cond:
            if self._stream_start is None:
                self._stream_start = lsn  # where the first receiver began (or resumed)
            old = self._durable_to(timeline, lsn)
        if old is None:
            return
        self.stream_ended = False
        if old:
            self.metrics.inc(
                "pageserver_wal_received_bytes_total", lsn - old, node=self.node.node_id
            )

    def _durable_to(self, timeline: int, lsn: int) -> int | None:
        """Under `_cond`: the archive is durable up to `lsn` on `timeline`, for the decoder
        to read; the end it had before, None if `lsn` is not past it (after a timeline
        switch the new timeline's segment fills from its start; until it passes what the
        old one had, the old files are the ones to read)."""
        old = self._durable[1]
        if lsn <= old:
            return None
        if self._receive_stalled_at is None or lsn >= self._receive_stalled_at:
            self.receive_error = None  # WAL flows again
            self._receive_stalled_at = None
        self._durable = (timeline, lsn)
        self._cond.notify_all()
        return old

    def _note_receiver_error(self, receiver: ReceiverProcess) -> None:
        """A receiver that reports a failure stalls ingest from that report on, not from
        when its process has exited (`_run`): that may take a while, and `ingest` said ok
        meanwhile while the archive could not be written."""
        if receiver.last_error is None:
            return
        if receiver.last_errno in STALL_ERRNOS:
            self.receive_error = str(receiver.last_error)
            # The failed write may have put part of its bytes in the archive: the next
            # receiver resumes after them and reports them flushed, which is no new room.
            self._receive_stalled_at = max(
                receiver.received_lsn,
                receiver.flushed_lsn,
                receiver.attempted_lsn,
                self._receive_stalled_at or 0,
            )
        elif receiver.state == ReceiverState.FAILED:
            self.receive_error = str(receiver.last_error)

    def _decode_loop(self) -> None:
        archive: WalArchive | None = None
        pos, prev = self._start_position()
        try:  # snapshots named before a restart whose image pass it cut short
            self.store.recall_image_points()
        except Exception:  # only images at risk: logged
            log.exception("node %s: image points not recalled", self.node.node_id)
        while True:
            with self._cond:
                while not self._stopping and self._nothing_to_read(pos) and not self._tail_due(pos):
                    self._cond.wait()
                job = self._due_tail_job(pos)
                if self._stopping:
                    return
                timeline, end = self._durable
                if job is None and pos is None:
                    pos = self._stream_start  # no page history: decode what streams from now
                    continue
            if job is not None:
                self._run_tail_job(job, pos, prev)
                continue
            assert pos is not None  # set above where no job was due
            try:
                if archive is None:
                    archive = WalArchive(self.store.wal_dir, self._segment_size())
                length = min(end - pos, archive.segment_size - pos % archive.segment_size)
                length = min(length, READ_CHUNK)
                tli, data = self._read_archived(archive, pos, length, timeline)
            except Exception as exc:
                self.decode_error = f"reading archived WAL failed: {exc}"
                log.error("node %s: %s", self.node.node_id, self.decode_error)
                continue
            self._decode(WalChunk(tli, pos, data), prev_lsn=prev)
            pos += length
            self._flush_store(backlog=end - pos)
            loop = self._loop
            if loop is not None and not loop.is_closed():
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self._progress.set)

    def _tail_due(self, pos: int | None) -> bool:
        """A tail job waits and the decoder has read all that is durable (or never will)."""
        if self._tail_job is None:
            return False
        return self.decode_error is not None or pos is None or pos >= self._durable[1]

    def _due_tail_job(self, pos: int | None) -> _TailJob | None:
        """The tail job to run now (called under `_cond`); one left at a stop fails."""
        job = self._tail_job
        if job is None or not (self._stopping or self._tail_due(pos)):
            return None
        self._tail_job = None
        if self._stopping:
            if job.result.set_running_or_notify_cancel():
                job.result.set_exception(Unavailable("the pageserver is stopping"))
            return None
        return job

    def _run_tail_job(self, job: _TailJob, pos: int | None, prev: int | None) -> None:
        """On the decode thread: the node's WAL tail into the archive (pageserver/follow/
        wal_tail.py), from where this thread's reader stands (`pos`, `prev`: where decoding
        starts, before a reader exists); the job's result is the end of the node's last
        valid record."""
        if not job.result.set_running_or_notify_cancel():
            return  # its waiter gave up (take_tail's deadline)
        try:
            if self.decode_error is not None:
                raise CorruptData(f"node {self.node.node_id}: {self.decode_error}")
            if pos is None:
                raise Unavailable(f"node {self.node.node_id} has no page history yet")
            point = self.reader.resume_point() if self.reader is not None else (pos, prev)
            if point is None:
                raise Unavailable(
                    f"node {self.node.node_id}: decoding has not reached a record boundary"
                )
            end = self._append_tail(job, *point)
        except BaseException as exc:
            job.result.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        else:
            job.result.set_result(end)

    def _append_tail(self, job: _TailJob, start: int, prev: int | None) -> int:
        """Scan the archive from `start` (where the decoder takes the stream up), then the
        node's pg_wal from the archive's end, to the end of the node's valid WAL; append
        what the archive lacks of it (durably, with what it held: a receiver ended by
        SIGTERM may have written more than it reported) and let the decoder read it.
        Returns that end: the end of the node's last whole record."""
        segment_size, timeline = self._segment_size(), job.timeline
        with locked_archive(self.store.wal_dir, segment_size) as archive:
            resumed = archive.resume()
            if resumed is None:  # a checkout's new timeline, its receiver never connected
                archived = start - start % segment_size
            elif resumed[0] != timeline:
                raise CorruptData(
                    f"node {self.node.node_id}: its WAL archive is on timeline {resumed[0]}, "
                    f"its pg_control on timeline {timeline}"
                )
            else:
                archived = resumed[1]
            reader = WalReader(
                start, segment_size, timeline, archive.system_identifier(), prev_lsn=prev
            )
            cut = max(start, archived)
            end = valid_end(
                reader,
                itertools.chain(
                    self._archived_bytes(archive, start, cut, timeline),
                    pg_wal_bytes(job.pg_wal, timeline, segment_size, cut),
                ),
            )
            durable = max(end or 0, archived)
            append_tail(archive, job.pg_wal, timeline, archived, durable)
        if durable > archived:
            log.info(
                "node %s: WAL %s..%s taken from %s",
                self.node.node_id,
                format_lsn(archived),
                format_lsn(durable),
                job.pg_wal,
            )
        with self._cond:
            self._durable_to(timeline, durable)
        return end if end is not None else start

    def _archived_bytes(
        self, archive: WalArchive, start: int, stop: int, timeline: int
    ) -> Iterator[tuple[int, bytes]]:
        lsn = start
        while lsn < stop:
            length = min(stop - lsn, archive.segment_size - lsn % archive.segment_size)
            _tli, data = self._read_archived(archive, lsn, min(length, READ_CHUNK), timeline)
            yield lsn, data
            lsn += len(data)

    def _nothing_to_read(self, pos: int | None) -> bool:
        if self.decode_error is not None:
            return True  # decoding stopped for good
        if pos is None:
            return self._stream_start is None  # no history: wait for the stream's start
        return self._durable[1] <= pos

    def _start_position(self) -> tuple[int | None, int | None]:
        """Where decoding resumes: the end of the durable page history (its archived WAL
        since then is re-ingested first), or None for a store with no history yet."""
        state = self.store.state
        if state is None:
            return None, None
        start = max(self.store.timeline.disk_consistent_lsn, state.decode_from or 0)
        resume = WalArchive(self.store.wal_dir, state.wal_segment_size).resume()
        if resume is not None and resume[1] > start:
            log.info(
                "node %s: re-ingesting archived WAL %s..%s",
                self.node.node_id,
                format_lsn(start),
                format_lsn(resume[1]),
            )
            with self._cond:
                self._durable = max(self._durable, resume, key=lambda d: d[1])
        if start == state.decode_from:
            return start, None  # a fresh branch: its first record is the one we wrote
        return start, self.store.timeline.prev_record_lsn

    def _segment_size(self) -> int:
        state = self.store.state
        if state is not None:
            return state.wal_segment_size
        if self.receiver.segment_size:
            return self.receiver.segment_size
        raise CorruptData("WAL segment size unknown: the receiver has not reported yet")

    @staticmethod
    def _read_archived(
        archive: WalArchive, lsn: int, length: int, max_timeline: int
    ) -> tuple[int, bytes]:
        """Bytes [lsn, lsn+length) of one segment, from the newest timeline up to
        `max_timeline` that has it; the receiver may be completing (renaming) that very
        segment meanwhile, so look it up afresh and retry."""
        segno = lsn // archive.segment_size
        for _attempt in range(3):
            segs = [
                s for s in archive.segments() if s.segno == segno and s.timeline <= max_timeline
            ]
            if not segs:
                break
            seg = segs[-1]  # the newest timeline, the complete file before the partial one
            try:
                with open(seg.path, "rb") as f:
                    f.seek(lsn % archive.segment_size)
                    data = f.read(length)
            except FileNotFoundError:
                continue
            if len(data) == length:
                return seg.timeline, data
        raise CorruptData(
            f"archived WAL for {format_lsn(lsn)}..{format_lsn(lsn + length)} is missing or "
            f"short in {archive.directory}"
        )

    def _flush_store(self, backlog: int = 0) -> None:
        """Flush when due (`backlog`: archived WAL not decoded yet, NodeStore.maybe_flush); on
        a full storage wait (nothing more is ingested meanwhile, the archive and the slot keep
        the WAL) and retry until it succeeds or we stop."""
        while True:
            try:
                self.store.maybe_flush(backlog)
            except OSError as exc:
                if exc.errno not in STALL_ERRNOS:
                    self.decode_error = f"flushing page history failed: {exc}"
                    log.exception("node %s: flush failed", self.node.node_id)
                    return
                if self.stall_error is None:
                    log.error("node %s: ingest stalled: %s", self.node.node_id, exc)
                where = exc.filename or self.store.history.root
                self.stall_error = (
                    f"cannot write the page history: {exc.strerror} ({where}); ingest "
                    "resumes by itself once there is room to write there"
                )
                with self._cond:
                    if self._stopping:
                        return
                    self._cond.wait(STALLED_RETRY_SECONDS)
                continue
            except Exception as exc:
                self.decode_error = f"flushing page history failed: {exc}"
                log.exception("node %s: flush failed", self.node.node_id)
                return
            if self.stall_error is not None:
                log.info("node %s: ingest resumed", self.node.node_id)
                self.stall_error = None
            return

    def _decode(self, chunk: WalChunk, prev_lsn: int | None = None) -> None:
        # The decode loop reads the archive contiguously from _start_position (which already
        # begins a branch at its decode_from), so every chunk continues the last one.
        if self.reader is None:
            self.reader = WalReader(
                chunk.start_lsn, self._segment_size(), timeline=chunk.timeline, prev_lsn=prev_lsn
            )
        reader = self.reader
        reader.timeline = chunk.timeline
        if chunk.start_lsn != reader.fed_lsn:
            self.decode_error = (
                f"WAL gap: decoded up to {format_lsn(reader.fed_lsn)}, next chunk starts "
                f"at {format_lsn(chunk.start_lsn)}"
            )
            log.error("node %s: %s", self.node.node_id, self.decode_error)
            return
        reader.feed(chunk.data)
        count = 0
        # A store with no history yet (never imported) ingests nothing: decode only.
        ingesting = self.store.state is not None
        redo_rmgrs = REDO_BY_RMGR
        try:
            while batch := reader.read_batch():
                if ingesting:
                    # Decode and ingest fused (C where it can): only the records it decodes
                    # in Python come back; those it takes all have redo.
                    try:
                        records, error = self.store.ingest_raw_batch(batch), None
                        count += len(batch)
                    except NeonError:
                        # a bad record: those before it are ingested; find where it is
                        records, error = _decode_batch(batch)
                        if error is None:
                            raise  # not a decoding error
                        if records:
                            self._decoded_lsn = records[-1].end_lsn
                        count += len(records)
                else:
                    records, error = _decode_batch(batch)
                    count += len(records)
                for record in records:
                    if record.blocks and record.rmgr_id not in redo_rmgrs:
                        self._warn_unreplayable(record.rmgr_name)
                if error is not None:
                    raise error
                self._decoded_lsn = batch[-1].end_lsn
        except NeonError as exc:
            self.decode_error = str(exc)
            log.error("node %s: decoding stopped: %s", self.node.node_id, exc)
        except Exception as exc:
            self.decode_error = f"internal error while decoding: {exc!r}"
            log.exception("node %s: decoding stopped", self.node.node_id)
        self.records += count
        self.metrics.inc("pageserver_wal_records_total", count, node=self.node.node_id)

    def _warn_unreplayable(self, rmgr: str) -> None:
        if rmgr not in self._warned_rmgrs:
            self._warned_rmgrs.add(rmgr)
            log.warning(
                "node %s writes %s records, which have no native redo: pages they change "
                "can only be rebuilt from images (run it with wal_consistency_checking=%s)",
                self.node.node_id,
                rmgr,
                rmgr.lower(),
            )

    @property
    def decoded_lsn(self) -> int:
        """End of the last record decoded (0 before any)."""
        return self._decoded_lsn

    async def take_tail(self, pg_wal: Path, timeline: int, timeout: float) -> tuple[int, bool]:
        """After the CLI stopped the paused node at once (no shutdown checkpoint, its
        walsender killed): bring its history to the end of the valid WAL in its `pg_wal`
        (pageserver/follow/wal_tail.py) and wait up to `timeout` seconds for it to be
        decoded. Returns (that end, whether it was decoded in time); (0, False) when the
        receiver process does not give up the archive in time (stopped, hung) or the tail
        is not taken in time (the decoder catching up first). `timeline`: the node's, from
        its pg_control."""
        if not self.node.paused:
            raise InvalidArgument(
                f"node {self.node.node_id} is followed: its WAL tail is taken only once the "
                "CLI has stopped it"
            )
        if self._decoder is None or not self._decoder.is_alive():
            raise Unavailable(f"node {self.node.node_id} is not being followed")
        if self.decode_error is not None or self.stall_error is not None:
            self.check_ingesting()  # a receiver's error is no matter: it is not needed
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self.receiver.stop_streaming()
        kill_at = loop.time() + RECEIVER_KILL_AFTER
        while not self.receiver.archive_released:
            if loop.time() >= kill_at:
                self.receiver.kill()
            if loop.time() >= deadline:
                log.warning(
                    "node %s: its walreceiver still writes the archive after %g s: its WAL "
                    "tail is not taken",
                    self.node.node_id,
                    timeout,
                )
                return 0, False
            await asyncio.sleep(RECEIVER_EXIT_POLL)
        job = _TailJob(pg_wal, timeline, concurrent.futures.Future())
        with self._cond:
            if self._tail_job is not None:
                raise Conflict(f"node {self.node.node_id}: its WAL tail is being taken already")
            self._tail_job = job
            self._cond.notify_all()
        try:
            end = await within(asyncio.wrap_future(job.result), deadline - loop.time())
        except TimeoutError:
            with self._cond:
                if self._tail_job is job:
                    self._tail_job = None  # never begun: the decoder was still catching up
            log.warning("node %s: its WAL tail not taken in %g s", self.node.node_id, timeout)
            return 0, False
        reached = await self.wait_decoded(end - 1, max(0.0, deadline - loop.time()))
        return end, reached

    async def wait_decoded(self, lsn: int, timeout: float) -> bool:
        """Wait until the record that starts at `lsn` has been decoded (by this follower, or
        ingested already: a restarted pageserver whose layers hold it decodes it no more, and
        a stopped node's `pg checkout` waited its whole 30 s for it); raise at once when
        ingest stopped on an error."""
        deadline = time.monotonic() + timeout
        while not self._decoded_past(lsn):
            self.check_ingesting()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._progress.clear()
            if self._decoded_past(lsn):
                break
            await wait_event(self._progress, min(remaining, 0.5))
        return True

    def _decoded_past(self, lsn: int) -> bool:
        if self._decoded_lsn > lsn:
            return True
        ingested, _durable = self.ingested_positions()
        return ingested is not None and ingested > lsn

    @property
    def flushed_lsn(self) -> int:
        """The end of the WAL durable in the archive: what the receiver flushed, or, before a
        restarted pageserver's receiver has connected, what the archive already held (the
        decoder re-reads that first; it may stop there on bad WAL without a receiver ever
        connecting)."""
        with self._cond:
            durable = self._durable[1]
        return max(self.receiver.flushed_lsn, durable)

    @property
    def timeline(self) -> int:
        """The PostgreSQL timeline of the node's WAL: the receiver's, or, before it has
        connected (a checkout's new follower, a restarted pageserver), the archive's newest,
        else the one the node's page history is on (0 only when nothing is known)."""
        if self.receiver.timeline:
            return self.receiver.timeline
        with self._cond:
            archived = self._durable[0]
        state = self.store.state
        return archived or (state.pg_timeline if state is not None else 0)

    def ingested_positions(self) -> tuple[int | None, int | None]:
        """(ingested, durable): the end of the last record in the page store (readable from
        now on) and of the last one flushed to layer files; None while it has no history."""
        if self.store.state is None:
            return None, None
        timeline = self.store.timeline
        return timeline.last_record_lsn, timeline.disk_consistent_lsn

    def status(self) -> dict[str, Any]:
        r = self.receiver
        ingested, durable = self.ingested_positions()
        flushed = self.flushed_lsn
        return {
            **self.node.public(),
            "state": "paused" if self.node.paused and not r.running else r.state.value,
            "timeline": self.timeline,
            "received_lsn": format_lsn(r.received_lsn) if r.received_lsn else None,
            "flushed_lsn": format_lsn(flushed) if flushed else None,
            "flushed_lsn_int": flushed,
            "decoded_lsn": format_lsn(self.decoded_lsn) if self.decoded_lsn else None,
            "ingested_lsn": format_lsn(ingested) if ingested is not None else None,
            "ingested_lsn_int": ingested,
            "durable_lsn": format_lsn(durable) if durable is not None else None,
            "records": self.records,
            "last_error": str(r.last_error) if r.last_error else None,
            "decode_error": self.decode_error,
            "ingest": self.ingest_state,
            "ingest_error": self.ingest_error,
            "stream_ended": self.stream_ended,
        }


def _decode_batch(batch: list[RawRecord]) -> tuple[list[DecodedRecord], NeonError | None]:
    """The decoded records of a batch; when one is bad, those before it and its error (they
    are still ingested, then the error stops decoding)."""
    try:
        return decode_records(batch), None
    except NeonError:
        records: list[DecodedRecord] = []
        for raw in batch:
            try:
                records.append(decode_record(raw))
            except NeonError as exc:
                return records, exc
        raise
