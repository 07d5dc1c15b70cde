"""Following one PostgreSQL node: its WalReceiver, the WAL archive, and the record decoder.

The receiver streams the node's slot into `<workdir>/nodes/<id>/wal`. Every durable chunk is
queued to a decode thread (so the event loop keeps serving while a backlog is decoded) that
feeds a WalReader, decodes each record and hands it to `on_record` (the pagestore ingest).
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pageserver.followed_nodes import FollowedNode
from pageserver.metrics import Metrics
from proto.errors import NeonError
from walreceiver.lsn import DEFAULT_SEGMENT_SIZE, format_lsn
from walreceiver.receiver import ConnParams, WalChunk, WalReceiver
from walreceiver.records import DecodedRecord, decode_record
from walreceiver.xlog_reader import WalReader

log = logging.getLogger(__name__)

RecordHook = Callable[[DecodedRecord], None]
FAILED_RETRY_SECONDS = 10.0
ENDED_RETRY_SECONDS = 1.0
DECODE_QUEUE_CHUNKS = 64


def archive_dir(workdir: Path, node_id: str) -> Path:
    return workdir / "nodes" / node_id / "wal"


class NodeFollower:
    def __init__(
        self,
        node: FollowedNode,
        workdir: Path,
        metrics: Metrics,
        on_record: RecordHook | None = None,
    ) -> None:
        self.node = node
        self.metrics = metrics
        self.on_record = on_record
        self.receiver = WalReceiver(
            ConnParams(
                node.host,
                node.port,
                node.user,
                node.password,
                application_name=f"neon-pageserver-{node.node_id}",
            ),
            node.slot,
            archive_dir(workdir, node.node_id),
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

    # life cycle

    def start(self) -> None:
        if self._task is not None:
            return
        self._loop = asyncio.get_running_loop()
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
        while True:
            chunk = self._chunks.get()
            if chunk is None:
                return
            if self.decode_error is None:
                self._decode(chunk)
            loop = self._loop
            if loop is not None and not loop.is_closed():
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self._progress.set)

    def _decode(self, chunk: WalChunk) -> None:
        if self.reader is None:
            archive = self.receiver.archive
            segment_size = archive.segment_size if archive is not None else DEFAULT_SEGMENT_SIZE
            self.reader = WalReader(chunk.start_lsn, segment_size, timeline=chunk.timeline)
        reader = self.reader
        reader.timeline = chunk.timeline
        reader.feed(chunk.data)
        count = 0
        try:
            for raw in reader.records():
                record = decode_record(raw)
                if self.on_record is not None:
                    self.on_record(record)
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
