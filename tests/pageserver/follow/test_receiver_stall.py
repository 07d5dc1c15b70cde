"""A receiver whose archive write fails on a full storage stalls ingest from its report on,
and the stall lasts until the failed write's WAL is durable: the next receiver resumes
after the part of that write that reached the file and reports it flushed, which is no new
room. `pg show` said `ingest: ok` in both windows while nothing could be archived (the CI's
flaky test_full_storage_stalls_ingest_and_loses_nothing). The events are the child's own
(walreceiver.receiver.progress_event); the follower is not started."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from pageserver.api.metrics import Metrics
from pageserver.follow.followed_nodes import FollowedNode
from pageserver.follow.node_follower import NodeFollower
from pageserver.history.node_store import NodeStore, StorageHistory
from pg15.lsn import DEFAULT_SEGMENT_SIZE as SEG
from walreceiver.archive import WalArchive
from walreceiver.receiver import ReceiverState

X = 2 * SEG + (1 << 20)


def event(state: str, flushed: int, attempted: int, error: OSError | None = None) -> dict:
    return {
        "state": state,
        "timeline": 1,
        "received": flushed,
        "flushed": flushed,
        "attempted": attempted,
        "segment_size": SEG,
        "error": str(error) if error else None,
        "errno": error.errno if error else None,
    }


def follower(tmp_path: Path) -> NodeFollower:
    store = NodeStore(StorageHistory(tmp_path / "history"), "n")
    return NodeFollower(FollowedNode("n", "127.0.0.1", 1, "u", "p"), store, Metrics())


def test_a_full_archive_stalls_ingest_until_the_failed_writes_wal_is_durable(
    tmp_path: Path,
) -> None:
    f = follower(tmp_path)
    receiver = f.receiver
    receiver._apply(event("streaming", X, X))
    assert f.ingest_state == "ok"
    full = OSError(errno.ENOSPC, "No space left on device", "00000001.partial")
    receiver._apply(event("failed", X, X + 200_000, full))
    # Stalled at the report, before the child has exited.
    assert f.ingest_state == "stalled", f.status()
    assert "No space left on device" in str(f.ingest_error)
    # The next child: zeros until connected, then what the failed write left in the file.
    receiver._apply(event("connecting", 0, 0))
    assert f.ingest_state == "stalled"
    receiver._apply(event("streaming", X + 8192 * 12, X + 8192 * 12))
    assert f.ingest_state == "stalled", "resumed bytes are no new room"
    assert f.flushed_lsn == X + 8192 * 12  # the decoder may read them all the same
    # Room again: the failed write's WAL is durable (an idle node writes nothing more).
    receiver._apply(event("streaming", X + 200_000, X + 200_000))
    assert f.ingest_state == "ok"
    assert f.ingest_error is None


def test_a_failed_receiver_stalls_ingest_from_its_report(tmp_path: Path) -> None:
    f = follower(tmp_path)
    f.receiver._apply(event("streaming", X, X))
    broken = OSError(errno.EIO, "fsync failed: Input/output error", "00000001.partial")
    f.receiver._apply(event("failed", X, X + 100, broken))
    assert f.receiver.state == ReceiverState.FAILED
    assert f.ingest_state == "stalled"
    assert "Input/output error" in str(f.ingest_error)
    f.receiver._apply(event("streaming", X + 100, X + 100))
    assert f.ingest_state == "ok"  # not a full storage: WAL flowing again ends it


def test_the_archive_reports_the_end_of_a_write_that_failed(tmp_path: Path) -> None:
    """What `attempted` carries: the end of the write asked for, past written_lsn when the
    write failed (a descriptor that takes no bytes stands in for the full storage)."""
    archive = WalArchive(tmp_path, SEG)
    archive.begin(1, SEG)
    archive.write(SEG, b"\0" * 8192)
    assert archive.attempted_lsn == archive.written_lsn == SEG + 8192
    assert archive._fd is not None
    os.close(archive._fd)
    archive._fd = os.open("/dev/full", os.O_WRONLY)
    try:
        archive.write(SEG + 8192, b"\0" * 8192)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    else:
        raise AssertionError("a write to /dev/full succeeded")
    assert archive.written_lsn == SEG + 8192
    assert archive.attempted_lsn == SEG + 2 * 8192
