"""The walreceiver as a supervised child process (pageserver/follow/receiver_process.py), against a
real PostgreSQL: progress reporting, the password kept out of argv, no orphan when the parent
goes away, one receiver per archive, clear failures."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest

from pageserver.follow.receiver_process import ReceiverFailed, ReceiverProcess
from pageserver.pid_file import pid_alive
from pg15.lsn import parse_lsn
from pg15.pg_control import read_control_file
from tests.pgtest import PASSWORD, PgTestCluster
from tests.walreceiver.test_replication import params, wait_for
from walreceiver.receiver import PAUSED, ConnParams, ReceiverState

pytestmark = pytest.mark.slow


async def stop(task: asyncio.Task[str]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, ReceiverFailed):
        await task


async def test_streams_reports_and_stops(pg_cluster: PgTestCluster, tmp_path: Path) -> None:
    server = pg_cluster.create({"wal_keep_size": "1GB"})
    seen: list[tuple[str, int, int]] = []
    rp = ReceiverProcess(
        params(server),
        "rp",
        tmp_path / "wal",
        on_progress=lambda r: seen.append((r.state.value, r.timeline, r.flushed_lsn)),
    )
    task = asyncio.create_task(rp.run())
    try:
        server.psql("CREATE TABLE t AS SELECT generate_series(1, 50000) g")
        target = parse_lsn(server.psql("SELECT pg_current_wal_flush_lsn()"))
        await wait_for(lambda: rp.flushed_lsn >= target, what="WAL flushed by the child")
        assert rp.state == ReceiverState.STREAMING and rp.timeline == 1
        assert rp.segment_size == 16 << 20
        pid = rp.pid
        assert pid is not None and pid_alive(pid)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert PASSWORD.encode() not in f.read()  # the password came on stdin
        assert [s for s in seen if s[0] == "streaming"], seen
    finally:
        await stop(task)
    assert rp.state == ReceiverState.STOPPED
    assert not pid_alive(pid)
    assert any(p.name.endswith(".partial") for p in (tmp_path / "wal").iterdir())


async def test_child_exits_when_its_parent_goes_away(
    pg_cluster: PgTestCluster, tmp_path: Path
) -> None:
    """A SIGKILLed pageserver closes the child's stdin; the child must not stream on."""
    server = pg_cluster.create()
    rp = ReceiverProcess(params(server), "orphan", tmp_path / "wal", on_progress=lambda r: None)
    task = asyncio.create_task(rp.run())
    try:
        await wait_for(lambda: rp.state == ReceiverState.STREAMING, what="streaming")
        pid = rp.pid
        assert pid is not None
        proc = rp._proc
        assert proc is not None and proc.stdin is not None
        proc.stdin.close()  # what the kernel does for a dead parent
        deadline = time.monotonic() + 15
        while pid_alive(pid):
            assert time.monotonic() < deadline, "receiver outlived its parent's pipe"
            await asyncio.sleep(0.05)
    finally:
        await stop(task)


async def test_one_receiver_per_archive(pg_cluster: PgTestCluster, tmp_path: Path) -> None:
    server = pg_cluster.create({"wal_keep_size": "1GB"})
    first = ReceiverProcess(params(server), "a1", tmp_path / "wal", on_progress=lambda r: None)
    second = ReceiverProcess(params(server), "a1", tmp_path / "wal", on_progress=lambda r: None)
    t1 = asyncio.create_task(first.run())
    t2: asyncio.Task[str] | None = None
    try:
        await wait_for(lambda: first.state == ReceiverState.STREAMING, what="first streaming")
        t2 = asyncio.create_task(second.run())
        await asyncio.sleep(2)
        assert second.state != ReceiverState.STREAMING  # waiting for the archive's lock
        await stop(t1)
        await wait_for(lambda: second.state == ReceiverState.STREAMING, what="second takes over")
    finally:
        await stop(t1)
        if t2 is not None:
            await stop(t2)


async def test_wrong_password_is_a_clear_failure(pg_cluster: PgTestCluster, tmp_path: Path) -> None:
    server = pg_cluster.create()
    good = params(server)
    bad = ConnParams(good.host, good.port, good.user, "wrong")
    rp = ReceiverProcess(bad, "pw", tmp_path / "wal", on_progress=lambda r: None)
    with pytest.raises(ReceiverFailed, match="password authentication failed"):
        await asyncio.wait_for(rp.run(), 60)
    assert rp.state == ReceiverState.FAILED
    assert rp.pid is not None and not pid_alive(rp.pid)


async def test_finish_stream_takes_the_last_wal_then_connects_no_more(
    pg_cluster: PgTestCluster, tmp_path: Path
) -> None:
    """What `pg stop` asks (node.pause): the stream in progress receives the stopping
    server's shutdown checkpoint, then the child exits instead of reconnecting."""
    server = pg_cluster.create()
    rp = ReceiverProcess(params(server), "fin", tmp_path / "wal", on_progress=lambda r: None)
    task = asyncio.create_task(rp.run())
    try:
        await wait_for(lambda: rp.state == ReceiverState.STREAMING, what="streaming")
        pid = rp.pid
        assert pid is not None
        rp.finish_stream()
        server.psql("CREATE TABLE t AS SELECT generate_series(1, 10000) g")
        await asyncio.to_thread(server.stop, "fast")
        assert await asyncio.wait_for(task, 30) == PAUSED
        checkpoint = read_control_file(server.datadir).checkpoint_lsn
        assert rp.flushed_lsn > checkpoint, "the shutdown checkpoint was not received"
        assert not rp.running and not pid_alive(pid)
    finally:
        await stop(task)


async def test_finish_stream_while_starting_still_takes_the_last_wal(
    pg_cluster: PgTestCluster, tmp_path: Path
) -> None:
    """A pause that comes while the child is starting (a node stopped right after `pg start`,
    the receiver's interpreter still loading on a busy box): the child still connects and
    takes the server's WAL up to its shutdown checkpoint, then exits. It used to be stopped
    at once: nothing was received, and a checkout waited 30 s for the shutdown checkpoint,
    then named HEAD{i} without the node's last writes."""
    server = pg_cluster.create()
    rp = ReceiverProcess(params(server), "early", tmp_path / "wal", on_progress=lambda r: None)
    task = asyncio.create_task(rp.run())
    try:
        deadline = time.monotonic() + 30
        while not rp.running:  # created; its interpreter takes far longer to report
            assert time.monotonic() < deadline and not task.done()
            await asyncio.sleep(0.001)
        assert not rp._ready
        rp.finish_stream()
        await wait_for(lambda: rp.state == ReceiverState.STREAMING, 30, "the child to connect")
        server.psql("CREATE TABLE t AS SELECT generate_series(1, 10000) g")
        await asyncio.to_thread(server.stop, "fast")
        assert await asyncio.wait_for(task, 30) == PAUSED
        checkpoint = read_control_file(server.datadir).checkpoint_lsn
        assert rp.flushed_lsn > checkpoint, "the shutdown checkpoint was not received"
    finally:
        await stop(task)


async def test_wait_connected_returns_once_streaming_or_failed(
    pg_cluster: PgTestCluster, tmp_path: Path
) -> None:
    """NodeFollower.pause's wait: from a child being started until it streams; at once when
    no child runs; bounded when it cannot connect (nothing listens: it backs off)."""
    server = pg_cluster.create()
    rp = ReceiverProcess(params(server), "wc", tmp_path / "wal", on_progress=lambda r: None)
    await asyncio.wait_for(rp.wait_connected(30), 1)  # no child: nothing to wait for
    task = asyncio.create_task(rp.run())
    try:
        await asyncio.sleep(0)  # run() began: the child is being created, not there yet
        assert rp.state == ReceiverState.CONNECTING and not rp.running
        await rp.wait_connected(60)
        assert rp.state == ReceiverState.STREAMING
    finally:
        await stop(task)
    down = ConnParams("127.0.0.1", 1, "u", "p")
    rp = ReceiverProcess(down, "wd", tmp_path / "wal2", on_progress=lambda r: None)
    task = asyncio.create_task(rp.run())
    try:
        while not rp.running:
            await asyncio.sleep(0.001)
        await asyncio.wait_for(rp.wait_connected(60), 30)  # refused: backing off, not waiting
        assert rp.state == ReceiverState.BACKOFF
    finally:
        await stop(task)


async def test_finish_stream_while_starting_or_backing_off(tmp_path: Path) -> None:
    """Nothing listens on the port: whenever the pause comes, run() returns PAUSED at once
    (not after a reconnect backoff) and no connection is tried afterwards."""
    down = ConnParams("127.0.0.1", 1, "u", "p")
    rp = ReceiverProcess(down, "down", tmp_path / "wal", on_progress=lambda r: None)
    task = asyncio.create_task(rp.run())
    await asyncio.sleep(0)  # the child is being started
    rp.finish_stream()
    assert await asyncio.wait_for(task, 30) == PAUSED
    rp = ReceiverProcess(down, "down", tmp_path / "wal", on_progress=lambda r: None)
    task = asyncio.create_task(rp.run())
    try:
        await wait_for(lambda: rp.state == ReceiverState.BACKOFF, what="backing off")
        start = time.monotonic()
        rp.finish_stream()
        # The child tries once more: a pause's wait_connected waits for that try.
        assert rp.state == ReceiverState.CONNECTING
        assert await asyncio.wait_for(task, 30) == PAUSED
        assert time.monotonic() - start < 3
    finally:
        await stop(task)


async def test_idle_follower_does_not_spin(tmp_path: Path) -> None:
    """A follower whose node is down (and whose store has no history yet) must sleep, not
    busy-wait for the first WAL: a spinning decode thread starves the whole pageserver."""
    from pageserver.api.metrics import Metrics
    from pageserver.follow.followed_nodes import FollowedNode
    from pageserver.follow.node_follower import NodeFollower
    from pageserver.history.node_store import NodeStore, StorageHistory

    node = FollowedNode("idle", "127.0.0.1", 1, "u", "p")  # nothing listens on port 1
    follower = NodeFollower(node, NodeStore(StorageHistory(tmp_path / "h"), "idle"), Metrics())
    follower.start()
    try:
        await asyncio.sleep(0.5)
        cpu0, t0 = time.process_time(), time.monotonic()
        await asyncio.sleep(2)
        busy = (time.process_time() - cpu0) / (time.monotonic() - t0)
        assert busy < 0.2, f"the pageserver side used {busy:.0%} of a core while idle"
    finally:
        await follower.stop()


class _Unstartable(ReceiverProcess):
    """A child whose program does not exist: the spawn itself fails (ENOENT)."""

    def _argv(self) -> list[str]:
        return [str(Path("/nonexistent") / "walreceiver-missing")]


async def test_failed_spawn_is_not_left_connecting(tmp_path: Path) -> None:
    """A child that could not be created (no such program here; EAGAIN, EMFILE in the field)
    leaves the receiver FAILED, not CONNECTING: a pause then returns at once instead of
    waiting its whole bound for a stream nothing will open (and the status does not say
    connecting). Fails on 1fadcea: still CONNECTING, wait_connected waits out its timeout."""
    down = ConnParams("127.0.0.1", 1, "u", "p")
    rp = _Unstartable(down, "ns", tmp_path / "wal", on_progress=lambda r: None)
    with pytest.raises(ReceiverFailed, match="not started"):
        await rp.run()
    assert rp.state == ReceiverState.FAILED and not rp.running
    await asyncio.wait_for(rp.wait_connected(30), 2)
