"""What a follower reports before its receiver has connected: a restarted pageserver re-reads
the archived WAL its layers do not hold yet, and may stop there on a damaged record while the
node is unreachable; its status must still say how far the archive is durable (the CLI's
`pg list` and `/metrics` compute the lag from it)."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import pytest

from pageserver.api.metrics import Metrics
from pageserver.follow.followed_nodes import FollowedNode
from pageserver.follow.node_follower import NodeFollower
from pageserver.history.node_store import NodeStore, StorageHistory
from pg15.lsn import DEFAULT_SEGMENT_SIZE as SEG
from pg15.lsn import segment_file_name
from pg15.pg_control import read_control_file
from pg15.xlog_reader import WalReader
from tests.pgtest import PgTestCluster

pytestmark = pytest.mark.slow


async def test_status_before_the_receiver_connects_shows_the_archive_end(
    pg_cluster: PgTestCluster, tmp_path: Path
) -> None:
    server = pg_cluster.create({"autovacuum": "off"}, start=False)
    base = tmp_path / "base"
    shutil.copytree(server.datadir, base)
    server.start()
    server.psql("CREATE TABLE t (a int, b text)")
    server.psql("INSERT INTO t SELECT g, repeat('x', 200) FROM generate_series(1, 2000) g")
    server.stop()

    store = NodeStore(StorageHistory(tmp_path / "history"), "n")
    store.import_datadir(base)
    start = read_control_file(base).checkpoint_lsn
    segment = segment_file_name(1, start // SEG, SEG)
    data = bytearray((server.wal_dir / segment).read_bytes())
    reader = WalReader(start, SEG, timeline=1)
    reader.feed(bytes(data[start % SEG :]))
    records = [r for batch in iter(reader.read_batch, []) for r in batch]
    assert len(records) > 100
    damaged = records[len(records) // 2]
    data[(damaged.lsn + 30) % SEG] ^= 0xFF  # inside the record: its CRC no longer matches
    store.wal_dir.mkdir(parents=True, exist_ok=True)
    (store.wal_dir / segment).write_bytes(bytes(data))  # a complete archived segment

    node = FollowedNode("n", "127.0.0.1", 1, "u", "p")  # nothing listens on port 1
    follower = NodeFollower(node, store, Metrics())
    follower.start()
    try:
        deadline = time.monotonic() + 30
        while follower.ingest_state != "failed":
            assert time.monotonic() < deadline, follower.status()
            await asyncio.sleep(0.05)
        status = follower.status()
        assert follower.receiver.flushed_lsn == 0  # the receiver never connected
        archive_end = (start // SEG + 1) * SEG
        assert status["flushed_lsn_int"] == archive_end, status
        ingested = status["ingested_lsn_int"]
        assert ingested is not None and ingested <= damaged.lsn < archive_end, status
        assert "CRC" in status["ingest_error"] or "checksum" in status["ingest_error"], status
    finally:
        await follower.stop()
        store.close()


async def test_status_before_the_receiver_connects_shows_the_nodes_timeline(
    pg_cluster: PgTestCluster, tmp_path: Path
) -> None:
    """After a checkout the node's new follower has no receiver connected yet (its child
    starts with the node): `pg show` said timeline 0 until it had, where the checkout test
    expects the new timeline at once (its e2e loop here failed on it under load)."""
    server = pg_cluster.create({"autovacuum": "off"}, start=False)
    store = NodeStore(StorageHistory(tmp_path / "history"), "n")
    store.import_datadir(server.datadir)
    state = store.state
    assert state is not None and state.pg_timeline == 1
    branch = store.timelines.branch(state.timeline_id, state.start_lsn)
    store.switch_to_branch(
        branch, decode_from=state.start_lsn, pg_timeline=2, segment_size=SEG, parent=None,
        checkout=True,
    )  # fmt: skip
    node = FollowedNode("n", "127.0.0.1", 1, "u", "p", paused=True)  # never connects
    follower = NodeFollower(node, store, Metrics())
    follower.start()
    try:
        await asyncio.sleep(0.2)
        assert follower.receiver.timeline == 0
        assert follower.status()["timeline"] == 2
    finally:
        await follower.stop()
        store.close()


async def test_a_record_the_layers_hold_counts_as_decoded(
    pg_cluster: PgTestCluster, tmp_path: Path
) -> None:
    """A restarted pageserver's follower of a stopped node decodes nothing when its layers
    hold all the node's WAL: waiting for the shutdown checkpoint to be decoded (pg checkout,
    pg stop) must end at once, not after its whole timeout."""
    server = pg_cluster.create({"autovacuum": "off"}, start=False)
    store = NodeStore(StorageHistory(tmp_path / "history"), "n")
    store.import_datadir(server.datadir)
    checkpoint = read_control_file(server.datadir).checkpoint_lsn
    assert store.timeline.last_record_lsn > checkpoint  # the shutdown checkpoint is held
    node = FollowedNode("n", "127.0.0.1", 1, "u", "p", paused=True)  # never connects
    follower = NodeFollower(node, store, Metrics())
    follower.start()
    try:
        started = time.monotonic()
        assert await follower.wait_decoded(checkpoint, 20) is True
        assert time.monotonic() - started < 5
        assert follower.decoded_lsn == 0  # nothing was decoded here
        assert await follower.wait_decoded(store.timeline.last_record_lsn, 0.5) is False
    finally:
        await follower.stop()
        store.close()
