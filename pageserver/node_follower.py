"""Following one PostgreSQL node: its WalReceiver, the WAL archive, and the record decoder.

The receiver streams the node's slot into `<workdir>/nodes/<id>/wal`. Every durable chunk is
queued to a decode thread (so the event loop keeps serving while a backlog is decoded) that
feeds a WalReader, decodes each record and ingests it into the node's page history.
The follower outlives the node's restarts: when the server ends the stream (it shut down),
the follower reconnects with backoff, and `kick()` (on `pg start`) reconnects at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from typing import Any

from pageserver.followed_nodes import FollowedNode
from pageserver.metrics import Metrics
from pageserver.node_store import NodeStore
from pageserver.redo import REDO_BY_RMGR
from proto.errors import CorruptData, NeonError
from walreceiver.archive import WalArchive
from walreceiver.lsn import DEFAULT_SEGMENT_SIZE, format_lsn
from walreceiver.receiver import ConnParams, WalChunk, WalReceiver
from walreceiver.records import decode_record
from walreceiver.xlog_reader import WalReader

log = logging.getLogger(__name__)

REPLAY_CHUNK = 1 << 20
FAILED_RETRY_SECONDS = 10.0
ENDED_RETRY_SECONDS = 1.0
DECODE_QUEUE_CHUNKS = 64


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
        self.receiver = WalReceiver(
            ConnParams(
                node.host,
                node.port,
                node.user,
                node.password,
                application_name=f"neon-pageserver-{node.node_id}",
            ),
            node.slot,
            store.wal_dir,
            create_slot=True,
            on_flushed=self._on_wal,
            max_backoff=5.0,
        )
        self.reader: WalReader | None = None
        self.records = 0
        self.decode_error: str | None = None
        self.stream_ended = False
        self._decoded_lsn = 0
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._chunks: queue.Queue[WalChunk | None] = queue.Queue(DECODE_QUEUE_CHUNKS)
        self._decoder: threading.Thread | None = None
        self._replay: tuple[int, int, WalArchive] | None = None
        self._warned_rmgrs: set[str] = set()

    # life cycle

    def start(self) -> None:
        if self._task is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._queue_archive_replay()
        self._decoder = threading.Thread(
            target=self._decode_loop, name=f"decode-{self.node.node_id}", daemon=True
        )
        self._decoder.start()
        self._task = asyncio.create_task(self._run(), name=f"follow-{self.node.node_id}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        decoder, self._decoder = self._decoder, None
        if decoder is not None:
            await asyncio.to_thread(self._chunks.put, None)
            await asyncio.to_thread(decoder.join)

    def _queue_archive_replay(self) -> None:
        """After a restart, re-ingest the archived WAL the durable layers do not hold yet.

        The bytes from disk_consistent_lsn up to the archive's resume point go through the
        decode queue first; the receiver then streams from that resume point on, so the
        decoder sees one contiguous stream.
        """
        state = self.store.state
        if state is None:
            return
        start = max(self.store.timeline.disk_consistent_lsn, state.decode_from or 0)
        archive = WalArchive(self.store.wal_dir, state.wal_segment_size)
        resume = archive.resume()
        if resume is None or resume[1] <= start:
            return
        self._replay = (start, resume[1], archive)

    def _replay_archive(self) -> None:
        replay, self._replay = self._replay, None
        if replay is None:
            return
        start, end, archive = replay
        log.info(
            "node %s: re-ingesting archived WAL %s..%s",
            self.node.node_id,
            format_lsn(start),
            format_lsn(end),
        )
        prev = self.store.timeline.prev_record_lsn
        lsn = start
        while lsn < end and self.decode_error is None:
            offset = lsn % archive.segment_size
            length = min(end - lsn, archive.segment_size - offset, REPLAY_CHUNK)
            timeline, data = self._read_archived(archive, lsn, length)
            self._decode(WalChunk(timeline, lsn, data), prev_lsn=prev)
            lsn += length

    @staticmethod
    def _read_archived(archive: WalArchive, lsn: int, length: int) -> tuple[int, bytes]:
        """Bytes [lsn, lsn+length) of one segment; the receiver may be completing (renaming)
        that very segment meanwhile, so look it up afresh and retry once."""
        segno = lsn // archive.segment_size
        for _attempt in range(3):
            segs = [s for s in archive.segments() if s.segno == segno]
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
            f"short in {archive.directory}; cannot re-ingest"
        )

    def kick(self) -> None:
        """Reconnect now (the node was just started) instead of waiting out a backoff."""
        self._wake.set()

    async def _run(self) -> None:
        while True:
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
                delay = FAILED_RETRY_SECONDS
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    # decoding

    async def _on_wal(self, chunk: WalChunk) -> None:
        """Called with durable WAL in stream order; a full queue slows streaming down."""
        self.stream_ended = False
        self.metrics.inc(
            "pageserver_wal_received_bytes_total", len(chunk.data), node=self.node.node_id
        )
        try:
            self._chunks.put_nowait(chunk)
        except queue.Full:
            await asyncio.to_thread(self._chunks.put, chunk)

    def _decode_loop(self) -> None:
        try:
            self._replay_archive()
        except Exception as exc:
            self.decode_error = f"re-ingest of archived WAL failed: {exc}"
            log.exception("node %s: re-ingest failed", self.node.node_id)
        while True:
            chunk = self._chunks.get()
            if chunk is None:
                return
            if self.decode_error is None:
                self._decode(chunk)
                self._flush_store()
            loop = self._loop
            if loop is not None and not loop.is_closed():
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self._progress.set)

    def _flush_store(self) -> None:
        try:
            self.store.maybe_flush()
        except Exception as exc:
            self.decode_error = f"flushing page history failed: {exc}"
            log.exception("node %s: flush failed", self.node.node_id)

    def _decode(self, chunk: WalChunk, prev_lsn: int | None = None) -> None:
        if self.reader is None:
            state = self.store.state
            archive = self.receiver.archive
            segment_size = (
                state.wal_segment_size
                if state is not None
                else archive.segment_size
                if archive is not None
                else DEFAULT_SEGMENT_SIZE
            )
            start = chunk.start_lsn
            decode_from = state.decode_from if state is not None else None
            if decode_from is not None and decode_from > start:
                # A branch: the segment holds zeros before the checkpoint record we wrote.
                if chunk.end_lsn <= decode_from:
                    return
                chunk = WalChunk(chunk.timeline, decode_from, chunk.data[decode_from - start :])
                start, prev_lsn = decode_from, None
            self.reader = WalReader(start, segment_size, timeline=chunk.timeline, prev_lsn=prev_lsn)
        reader = self.reader
        reader.timeline = chunk.timeline
        data = chunk.data
        if chunk.start_lsn != reader.fed_lsn:
            skip = reader.fed_lsn - chunk.start_lsn
            if skip < 0:
                self.decode_error = (
                    f"WAL gap: decoded up to {format_lsn(reader.fed_lsn)}, next chunk starts "
                    f"at {format_lsn(chunk.start_lsn)}"
                )
                log.error("node %s: %s", self.node.node_id, self.decode_error)
                return
            data = data[skip:]  # already fed (archive replay overlapping the stream)
        reader.feed(data)
        count = 0
        decode = decode_record
        ingest = self.store.ingest
        redo_rmgrs = REDO_BY_RMGR
        try:
            for raw in reader.records():
                record = decode(raw)
                if record.blocks and record.rmgr_id not in redo_rmgrs:
                    self._warn_unreplayable(record.rmgr_name)
                ingest(record, raw.data)
                count += 1
                self._decoded_lsn = record.end_lsn
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

    async def wait_decoded(self, lsn: int, timeout: float) -> bool:
        """Wait until the record that starts at `lsn` has been decoded (or decoding failed)."""
        deadline = time.monotonic() + timeout
        while self._decoded_lsn <= lsn and self.decode_error is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._progress.clear()
            if self._decoded_lsn > lsn:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), min(remaining, 0.5))
        return self._decoded_lsn > lsn

    def status(self) -> dict[str, Any]:
        r = self.receiver
        return {
            **self.node.public(),
            "state": r.state.value,
            "timeline": r.timeline,
            "received_lsn": format_lsn(r.received_lsn) if r.received_lsn else None,
            "flushed_lsn": format_lsn(r.flushed_lsn) if r.flushed_lsn else None,
            "flushed_lsn_int": r.flushed_lsn,
            "decoded_lsn": format_lsn(self.decoded_lsn) if self.decoded_lsn else None,
            "records": self.records,
            "last_error": str(r.last_error) if r.last_error else None,
            "decode_error": self.decode_error,
            "stream_ended": self.stream_ended,
        }
