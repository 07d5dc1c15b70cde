"""The page history of one followed node: its timelines, the current one, and ingest into it.

Layout under the node's store directory (inside the node's storage)::

    node_state.json          which timeline is current, the import LSN, the WAL segment size
    pagestore/timelines/...  the versioned store (pageserver/timeline_store.py)
    wal/                     the WAL archive the walreceiver writes

Durability: layers are flushed when the open layer is big or every FLUSH_INTERVAL seconds
of ingest; after a crash ingest resumes from the timeline's disk_consistent_lsn by replaying
the archived WAL from there (see NodeFollower).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pageserver.compaction import compact
from pageserver.import_datadir import import_datadir
from pageserver.page_reconstruct import reconstruct
from pageserver.pg_control import read_control_file
from pageserver.settings import DEFAULT_SETTINGS, StoreSettings
from pageserver.timeline import Timeline
from pageserver.timeline_store import TimelineStore
from pageserver.walingest import WalIngest
from proto.errors import Conflict, NotFound
from walreceiver.lsn import format_lsn
from walreceiver.records import DecodedRecord

log = logging.getLogger(__name__)

FLUSH_INTERVAL = 10.0
STATE_FILE = "node_state.json"


@dataclass(frozen=True, slots=True)
class NodeState:
    timeline_id: str
    import_lsn: int
    wal_segment_size: int


class NodeStore:
    """Thread-safety: ingest and flush run on the node's decode thread; reads from anywhere."""

    def __init__(self, root: Path, settings: StoreSettings = DEFAULT_SETTINGS) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.timelines = TimelineStore(root / "pagestore", settings)
        self._state = self._load_state()
        self._ingest: WalIngest | None = None
        self._last_flush = time.monotonic()
        self._lock = threading.Lock()

    @property
    def wal_dir(self) -> Path:
        return self.root / "wal"

    def _load_state(self) -> NodeState | None:
        path = self.root / STATE_FILE
        if not path.exists():
            return None
        raw = json.loads(path.read_text())
        return NodeState(**raw)

    def _save_state(self, state: NodeState) -> None:
        path = self.root / STATE_FILE
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(asdict(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self._state = state

    @property
    def state(self) -> NodeState | None:
        return self._state

    @property
    def timeline(self) -> Timeline:
        if self._state is None:
            raise NotFound(f"no page history in {self.root}: the node was never imported")
        return self.timelines.get(self._state.timeline_id)

    def has_history(self) -> bool:
        return self._state is not None

    def import_datadir(self, datadir: Path) -> int:
        """Import the node's cleanly shut-down data directory as its first timeline."""
        with self._lock:
            if self._state is not None:
                raise Conflict(
                    f"the page history in {self.root} already starts at "
                    f"{format_lsn(self._state.import_lsn)}; it is imported once"
                )
            timeline = self.timelines.create_timeline()
            lsn = import_datadir(timeline, datadir)
            timeline.freeze_and_flush()
            segment_size = read_control_file(datadir).wal_segment_size
            self._save_state(NodeState(timeline.timeline_id, lsn, segment_size))
            log.info(
                "imported %s at %s into timeline %s", datadir, format_lsn(lsn), timeline.timeline_id
            )
            return lsn

    # ingest (decode thread)

    def ingest(self, record: DecodedRecord, raw: bytes | None = None) -> None:
        """Ingest one record (records the history already holds are skipped)."""
        if self._state is None:
            return
        if self._ingest is None:
            self._ingest = WalIngest(self.timeline)
        self._ingest.ingest_record(record, raw)

    def maybe_flush(self) -> None:
        """Flush when the open layer is large, or periodically so the durable LSN advances."""
        if self._state is None:
            return
        timeline = self.timeline
        due = time.monotonic() - self._last_flush >= FLUSH_INTERVAL
        if timeline.needs_flush or (
            due and timeline.last_record_lsn > timeline.disk_consistent_lsn
        ):
            self.flush()

    def flush(self) -> None:
        if self._state is None:
            return
        timeline = self.timeline
        timeline.freeze_and_flush()
        self._last_flush = time.monotonic()
        result = compact(timeline, reconstruct)
        log.debug(
            "flushed %s to %s (%s)",
            timeline.timeline_id,
            format_lsn(timeline.disk_consistent_lsn),
            result,
        )

    def close(self) -> None:
        self.timelines.close()
