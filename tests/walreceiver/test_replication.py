"""The replication client, WAL archive and receiver against real PostgreSQL 15 servers."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from cli.pgbin import pg_binary, popen_kwargs
from pg15.lsn import lsn_segno, parse_lsn, parse_segment_file_name, segment_file_name
from pg15.pg_control import read_control_file
from proto.errors import AuthFailed
from tests.pgtest import PASSWORD, SUPERUSER, PgTestCluster, PgTestServer
from walreceiver.archive import WalArchive
from walreceiver.receiver import (
    PAUSED,
    SERVER_ENDED,
    ConnParams,
    ReceiverState,
    WalChunk,
    WalReceiver,
)
from walreceiver.replication import (
    ReplicationConnection,
    ReplicationStream,
    ServerUnavailable,
    SlotAlreadyExists,
    SlotNotFound,
    WalRemoved,
    connect,
)
from walreceiver.replication_auth import ANY_METHOD, TRUST_OR_SCRAM

pytestmark = pytest.mark.slow

SEG = 16 * 1024 * 1024
KEEP = {"wal_keep_size": "4GB", "checkpoint_timeout": "1h", "max_wal_size": "4GB"}
AUTH_USERS = {
    "trust": "trust",
    "password": "password",
    "md5": "md5",
    "scram-sha-256": "scram-sha-256",
}
ROLE_PASSWORD = "role-pw"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def primary(pg_cluster_module: PgTestCluster) -> PgTestServer:
    server = pg_cluster_module.create(KEEP)
    sql = []
    for method in AUTH_USERS:
        role = f"u_{method.replace('-', '_')}"
        enc = "md5" if method == "md5" else "scram-sha-256"
        sql.append(
            f"SET password_encryption = '{enc}'; "
            f"CREATE ROLE {role} LOGIN REPLICATION PASSWORD '{ROLE_PASSWORD}';"
        )
    server.psql("\n".join(sql))
    with open(server.datadir / "pg_hba.conf", "a") as f:
        for method in AUTH_USERS:
            f.write(f"host replication u_{method.replace('-', '_')} 127.0.0.1/32 {method}\n")
        f.write("local replication all trust\n")  # as a managed node's private socket
    server.psql("select pg_reload_conf()")
    server.run("pgbench", "-i", "-s", "2", "-q", "postgres")
    return server


async def conn_to(server: PgTestServer, password: str | None = PASSWORD) -> ReplicationConnection:
    return await connect("127.0.0.1", server.port, SUPERUSER, password, "test")


def params(server: PgTestServer) -> ConnParams:
    return ConnParams("127.0.0.1", server.port, SUPERUSER, PASSWORD)


async def wait_for(cond: Callable[[], bool], timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def switch_wal(server: PgTestServer) -> int:
    """Force a segment switch; return the segno of the segment that was completed."""
    lsn = parse_lsn(server.psql("select pg_switch_wal()"))
    return lsn_segno(lsn - 1, SEG)


def assert_segments_identical(archive: Path, server: PgTestServer, timeline: int = 1) -> int:
    """Every complete archived segment equals the server's file; return how many compared."""
    compared = 0
    prefix = f"{timeline:08X}"
    for path in sorted(archive.iterdir()):
        name = path.name
        if len(name) != 24 or not name.startswith(prefix):
            continue
        theirs = server.wal_dir / name
        if not theirs.exists():
            continue
        assert path.read_bytes() == theirs.read_bytes(), f"segment {name} differs"
        compared += 1
    return compared


def drop_slot_when_inactive(server: PgTestServer, name: str) -> bool:
    """Drop the slot once its walsender is gone; True when it no longer exists."""
    where = f"from pg_replication_slots where slot_name = '{name}'"
    server.psql(f"select pg_drop_replication_slot(slot_name) {where} and not active")
    return server.psql(f"select count(*) {where}") == "0"


def run_pgbench(server: PgTestServer, seconds: int) -> subprocess.Popen[str]:
    env = {"PGHOST": str(server.sockdir), "PGPORT": str(server.port), "PGUSER": SUPERUSER}
    return subprocess.Popen(  # type: ignore[call-overload]
        [pg_binary("pgbench"), "-c", "2", "-T", str(seconds), "-n", "postgres"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        **popen_kwargs(env),
    )


async def run_receiver(
    receiver: WalReceiver,
) -> tuple[asyncio.Task[str], Callable[[], Awaitable[None]]]:
    task = asyncio.create_task(receiver.run())

    async def stop() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task

    return task, stop


# -- connection, auth, commands ------------------------------------------------------------


@pytest.mark.parametrize("method", list(AUTH_USERS))
async def test_auth_methods(primary: PgTestServer, method: str) -> None:
    role = f"u_{method.replace('-', '_')}"
    password = None if method == "trust" else ROLE_PASSWORD
    conn = await connect(
        "127.0.0.1", primary.port, role, password, "auth-test", auth_methods=ANY_METHOD
    )
    try:
        ident = await conn.identify_system()
        assert ident.timeline == 1
    finally:
        await conn.close()


@pytest.mark.parametrize("method", ["password", "md5", "scram-sha-256"])
async def test_wrong_password_is_a_clear_auth_error(primary: PgTestServer, method: str) -> None:
    role = f"u_{method.replace('-', '_')}"
    with pytest.raises(AuthFailed, match="password authentication failed"):
        await connect(
            "127.0.0.1", primary.port, role, "wrong", "auth-test", auth_methods=ANY_METHOD
        )
    with pytest.raises(AuthFailed, match="no password was given"):
        await connect("127.0.0.1", primary.port, role, None, "auth-test", auth_methods=ANY_METHOD)


@pytest.mark.parametrize("method", ["trust", "password", "md5"])
async def test_only_scram_is_answered_by_default(primary: PgTestServer, method: str) -> None:
    role = f"u_{method.replace('-', '_')}"
    with pytest.raises(AuthFailed, match="refusing"):
        await connect("127.0.0.1", primary.port, role, ROLE_PASSWORD, "auth-test")


async def test_connect_through_the_unix_socket(primary: PgTestServer) -> None:
    """pgtest's pg_hba trusts its private socket directory, as a managed node's does."""
    with pytest.raises(AuthFailed, match="without authentication"):
        await connect("127.0.0.1", primary.port, SUPERUSER, None, socket_dir=str(primary.sockdir))
    conn = await connect(
        "unused",
        primary.port,
        SUPERUSER,
        None,
        auth_methods=TRUST_OR_SCRAM,
        socket_dir=str(primary.sockdir),
    )
    try:
        assert conn.where == f"{primary.sockdir}/.s.PGSQL.{primary.port}"
        assert (await conn.identify_system()).timeline == 1
    finally:
        await conn.close()


async def test_identify_system_and_show(primary: PgTestServer) -> None:
    conn = await conn_to(primary)
    try:
        ident = await conn.identify_system()
        sysid = int(primary.psql("select system_identifier from pg_control_system()"))
        assert ident.systemid == sysid
        assert ident.timeline == 1 and ident.dbname is None
        assert ident.xlogpos <= parse_lsn(primary.psql("select pg_current_wal_flush_lsn()"))
        assert await conn.show("wal_segment_size") == "16MB"
        assert await conn.wal_segment_size() == SEG
        assert conn.server_params["server_version"].startswith("15")
    finally:
        await conn.close()


async def test_slot_create_read_drop(primary: PgTestServer) -> None:
    conn = await conn_to(primary)
    try:
        assert await conn.read_replication_slot("t_slot") is None
        await conn.create_physical_slot("t_slot")
        info = await conn.read_replication_slot("t_slot")
        assert info is not None and info.slot_type == "physical"
        assert info.restart_lsn and info.restart_tli == 1
        with pytest.raises(SlotAlreadyExists, match="already exists"):
            await conn.create_physical_slot("t_slot")
        await conn.drop_slot("t_slot")
        assert await conn.read_replication_slot("t_slot") is None
        with pytest.raises(SlotNotFound, match="does not exist"):
            await conn.drop_slot("t_slot")
        with pytest.raises(SlotNotFound, match="does not exist"):
            await conn.start_replication("no_such_slot", 0x1000000, 1)
        # The connection is still usable after those errors.
        assert (await conn.identify_system()).timeline == 1
    finally:
        await conn.close()


async def test_error_after_copyboth_when_walsender_is_terminated(primary: PgTestServer) -> None:
    """The walsender is terminated once it has sent what was flushed when streaming began: its
    ErrorResponse then goes out at once. Terminated while our receive window was full, the
    message would wait in its kernel's send queue, which the reset its exit sends (our unread
    status updates) discards: only "Connection reset by peer" would arrive (a product
    receiver reconnects either way)."""
    conn = await conn_to(primary)
    try:
        await conn.create_physical_slot("term_slot")
        info = await conn.read_replication_slot("term_slot")
        assert info is not None and info.restart_lsn is not None
        start = info.restart_lsn - info.restart_lsn % SEG
        flushed = parse_lsn(primary.psql("select pg_current_wal_flush_lsn()"))
        stream = await conn.start_replication("term_slot", start, 1, status_interval=0.2)
        assert stream.copying
        got = 0
        terminated = False
        with pytest.raises(ServerUnavailable, match="administrator command"):
            async for chunk in stream:
                got += len(chunk.data)
                if chunk.data_start + len(chunk.data) >= flushed and not terminated:
                    terminated = True
                    primary.psql(
                        "select pg_terminate_backend(pid) from pg_stat_replication "
                        "where application_name = 'test'"
                    )
        assert got > 0
    finally:
        await conn.close()
    await wait_for(lambda: drop_slot_when_inactive(primary, "term_slot"), what="slot drop")
    conn = await conn_to(primary)
    try:
        with pytest.raises(SlotNotFound):
            await conn.start_replication("term_slot", start, 1)
    finally:
        await conn.close()


async def test_error_after_copyboth_when_wal_was_removed(pg_cluster: PgTestCluster) -> None:
    server = pg_cluster.create({"min_wal_size": "32MB", "max_wal_size": "32MB"})
    first = server.psql("select pg_walfile_name(pg_current_wal_lsn())")
    for _ in range(4):
        server.psql("create table if not exists t(x int); insert into t values (1);")
        server.psql("select pg_switch_wal(); checkpoint;")
    assert not (server.wal_dir / first).exists()
    _, segno, _ = parse_segment_file_name(first, SEG)
    conn = await conn_to(server)
    try:
        stream = await conn.start_replication(None, segno * SEG, 1)
        assert stream.copying  # the error comes after CopyBothResponse
        with pytest.raises(WalRemoved, match="has already been removed"):
            async for _chunk in stream:
                pass
    finally:
        await conn.close()


# -- streaming into the archive ------------------------------------------------------------


async def test_stream_pgbench_into_archive_byte_identical(
    primary: PgTestServer, tmp_path: Path
) -> None:
    chunks: list[WalChunk] = []

    async def hook(chunk: WalChunk) -> None:
        chunks.append(chunk)

    receiver = WalReceiver(
        params(primary), "inproc", tmp_path, create_slot=True, status_interval=0.3, on_flushed=hook
    )
    task, stop = await run_receiver(receiver)
    try:
        await wait_for(lambda: receiver.flushed_lsn > 0, what="streaming start")
        bench = asyncio.create_task(
            asyncio.to_thread(primary.run, "pgbench", "-c", "2", "-T", "3", "-n", "postgres")
        )
        await asyncio.sleep(1.2)
        # Kill our walsender mid-load: the receiver reconnects with backoff and resumes.
        primary.psql(
            "select pg_terminate_backend(active_pid) from pg_replication_slots "
            "where slot_name = 'inproc'"
        )
        assert (await bench).returncode == 0
        done = switch_wal(primary)
        name = segment_file_name(1, done, SEG)
        await wait_for(lambda: (tmp_path / name).exists(), what=f"segment {name}")
        # The slot follows our flush position.
        await wait_for(
            lambda: (
                parse_lsn(
                    primary.psql(
                        "select restart_lsn from pg_replication_slots where slot_name='inproc'"
                    )
                )
                >= (done + 1) * SEG
            ),
            what="slot restart_lsn to advance",
        )
        assert not task.done()
        assert isinstance(receiver.last_error, ServerUnavailable)
        assert receiver.state is ReceiverState.STREAMING
    finally:
        await stop()
    assert receiver.state is ReceiverState.STOPPED
    assert assert_segments_identical(tmp_path, primary) >= 1
    # The hook saw contiguous, durable WAL equal to the archive.
    assert chunks
    for a, b in itertools.pairwise(chunks):
        assert a.end_lsn == b.start_lsn
    first = chunks[0].start_lsn
    assert first % SEG == 0
    seg_path = tmp_path / segment_file_name(1, lsn_segno(first, SEG), SEG)
    head = b"".join(c.data for c in chunks)[:SEG]
    assert seg_path.read_bytes()[: len(head)] == head
    # Restarting on the same archive resumes where it ended; no WAL is lost or repeated.
    archive = WalArchive(tmp_path, SEG)
    resume = archive.resume()
    assert resume is not None and resume[1] <= receiver.flushed_lsn


async def test_sigkill_receiver_process_mid_pgbench(primary: PgTestServer, tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    pwfile = tmp_path / "pw"
    pwfile.write_text(PASSWORD + "\n")
    cmd = [
        sys.executable, "-m", "walreceiver.receiver", "--host", "127.0.0.1",
        "--port", str(primary.port), "--user", SUPERUSER, "--password-file", str(pwfile),
        "--slot", "killme", "--archive", str(archive), "--create-slot",
        "--status-interval", "0.2", "-v",
    ]  # fmt: skip

    def spawn() -> subprocess.Popen[bytes]:
        return subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE)

    procs: list[subprocess.Popen[bytes]] = []
    bench = run_pgbench(primary, 6)
    try:
        for delay in (1.5, 1.5):
            proc = spawn()
            procs.append(proc)
            await asyncio.sleep(delay)
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        procs.append(spawn())
        await asyncio.to_thread(bench.wait, 60)
        assert bench.returncode == 0, bench.stderr.read() if bench.stderr else ""
        done = switch_wal(primary)
        name = segment_file_name(1, done, SEG)
        await wait_for(lambda: (archive / name).exists(), what=f"segment {name}")
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
        for proc in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
    logs = [p.stderr.read().decode() if p.stderr else "" for p in procs]
    print("\n---\n".join(logs))
    assert procs[-1].returncode == 0, logs[-1]
    complete = [p for p in archive.iterdir() if len(p.name) == 24]
    assert assert_segments_identical(archive, primary) == len(complete) >= 2
    # Segments are contiguous from the first one (nothing lost in between).
    segnos = sorted(parse_segment_file_name(p.name, SEG)[1] for p in complete)
    assert segnos == list(range(segnos[0], segnos[0] + len(segnos)))


async def test_server_shutdown_ends_stream_cleanly(
    pg_cluster: PgTestCluster, tmp_path: Path
) -> None:
    server = pg_cluster.create()
    receiver = WalReceiver(params(server), "s", tmp_path, create_slot=True, status_interval=0.3)
    task = asyncio.create_task(receiver.run())
    try:
        await wait_for(lambda: receiver.flushed_lsn > 0, what="streaming start")
        server.psql("create table t as select generate_series(1, 10000) x")
        await asyncio.to_thread(server.stop, "fast")
        reason = await asyncio.wait_for(task, 30)
    finally:
        if not task.done():
            task.cancel()
    assert reason == SERVER_ENDED
    assert receiver.end_reason == SERVER_ENDED
    ctl = server.run("pg_controldata", "-D", str(server.datadir)).stdout
    line = next(ln for ln in ctl.splitlines() if ln.startswith("Latest checkpoint location:"))
    checkpoint = parse_lsn(line.split(":", 1)[1])
    # Everything up to and including the shutdown checkpoint record is durable here.
    assert receiver.flushed_lsn > checkpoint
    seg = lsn_segno(checkpoint, SEG)
    ours = (tmp_path / (segment_file_name(1, seg, SEG) + ".partial")).read_bytes()
    theirs = (server.wal_dir / segment_file_name(1, seg, SEG)).read_bytes()
    assert len(ours) > checkpoint % SEG and theirs.startswith(ours)


# -- timelines ---------------------------------------------------------------------------------


async def test_follow_timeline_switch_on_promotion(
    pg_cluster: PgTestCluster, tmp_path: Path
) -> None:
    upstream = pg_cluster.create(KEEP)
    standby = pg_cluster.create_standby(upstream)
    receiver = WalReceiver(params(standby), "casc", tmp_path, create_slot=True, status_interval=0.3)
    task, stop = await run_receiver(receiver)
    try:
        upstream.psql("create table t as select generate_series(1, 50000) x")
        target = parse_lsn(upstream.psql("select pg_current_wal_flush_lsn()"))
        await wait_for(lambda: receiver.flushed_lsn >= target, what="standby WAL streamed")
        standby.psql("select pg_promote()")
        await wait_for(lambda: receiver.timeline == 2, what="timeline 2")
        standby.psql("insert into t select generate_series(1, 50000)")
        done = switch_wal(standby)
        name = segment_file_name(2, done, SEG)
        await wait_for(lambda: (tmp_path / name).exists(), what=f"segment {name}")
        assert not task.done()
    finally:
        await stop()
    history = (tmp_path / "00000002.history").read_bytes()
    assert history == (standby.wal_dir / "00000002.history").read_bytes()
    assert assert_segments_identical(tmp_path, standby, timeline=2) >= 1
    switchpoint = parse_lsn(history.decode().split("\t")[1].strip())

    # Asking for timeline 1 exactly at its end: a result set, no COPY mode.
    conn = await conn_to(standby)
    try:
        stream = await conn.start_replication(None, switchpoint, 1)
        assert not stream.copying
        assert stream.next_timeline == (2, switchpoint)
        assert (await conn.timeline_history(2)).content == history
        # Asking for timeline 1 before its end streams up to the switch, then hands over.
        start = switchpoint - switchpoint % SEG
        stream = await conn.start_replication(None, start, 1)
        end = start
        async for chunk in stream:
            assert chunk.data_start == end
            end = chunk.data_end
        assert end >= switchpoint
        assert stream.next_timeline == (2, switchpoint)
        assert (await conn.identify_system()).timeline == 2
    finally:
        await conn.close()


# -- batching against a scripted walsender -------------------------------------------------------


async def test_batch_is_handed_over_before_answering_a_keepalive() -> None:
    """walsender's shutdown (WalSndDone): the last XLogData and a reply-requested keepalive
    arrive together, and the server ends the stream only once a reply reports everything
    flushed. The batch must reach the consumer before the keepalive is answered, else the
    reply is stale every time and the stream never ends."""
    import struct

    start, payload = 0x1000000, b"x" * 5000
    end = start + len(payload)

    def copy_data(body: bytes) -> bytes:
        return b"d" + struct.pack("!I", len(body) + 4) + body

    async def walsender(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        xlog = b"w" + struct.pack("!QQq", start, end, 0) + payload
        writer.write(copy_data(xlog) + copy_data(b"k" + struct.pack("!Qq?", end, 0, True)))
        while True:
            kind, length = struct.unpack("!cI", await reader.readexactly(5))
            body = await reader.readexactly(length - 4)
            if kind == b"d" and body[:1] == b"r":
                flush = struct.unpack("!Q", body[9:17])[0]
                if flush >= end:
                    writer.write(b"C" + struct.pack("!I", 11) + b"COPY 0\0")
                    await writer.drain()
                    return
                writer.write(copy_data(b"k" + struct.pack("!Qq?", end, 0, True)))

    server = await asyncio.start_server(walsender, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        conn = ReplicationConnection(reader, writer, f"127.0.0.1:{port}")
        stream = ReplicationStream(conn, 1, start, status_interval=60, on_reply_requested=None)
        stream.copying = True
        got = b""

        async def consume() -> None:
            nonlocal got
            async for batch in stream.batches():
                got += b"".join(m.data for m in batch)
                stream.update(write=batch[-1].data_end, flush=batch[-1].data_end)

        await asyncio.wait_for(consume(), 10)
        assert got == payload and stream.server_ended
        writer.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_finish_stream_during_a_backoff_tries_once_more(
    pg_cluster: PgTestCluster, tmp_path: Path
) -> None:
    """A pause that comes while the receiver waits out a reconnect backoff (the server was
    not up at its last try, and is now, about to be stopped): it connects once more, at once,
    and takes the server's WAL up to its shutdown checkpoint. It used to end without trying,
    and the stopping server's last WAL reached nobody (a checkout waits 30 s for it, then is
    refused)."""
    server = pg_cluster.create(start=False)
    receiver = WalReceiver(
        params(server), "fin", tmp_path, create_slot=True, status_interval=0.3, min_backoff=60
    )
    task, stop = await run_receiver(receiver)
    try:
        await wait_for(lambda: receiver.state is ReceiverState.BACKOFF, what="a backoff")
        await asyncio.to_thread(server.start)
        receiver.finish_stream()
        await wait_for(lambda: receiver.state is ReceiverState.STREAMING, 30, "the last try")
        server.psql("CREATE TABLE t AS SELECT generate_series(1, 10000) g")
        await asyncio.to_thread(server.stop, "fast")
        # Either means no reconnecting. PAUSED: the last try's connection broke at the
        # shutdown rather than ended (once, in the CI run at 2c570c2; the receiver now logs
        # why): what the pause needs is the shutdown checkpoint, checked next.
        ended = await asyncio.wait_for(task, 30)
        assert ended in (SERVER_ENDED, PAUSED), f"{ended}: {receiver.last_error!r}"
        checkpoint = read_control_file(server.datadir).checkpoint_lsn
        assert receiver.flushed_lsn > checkpoint, "the shutdown checkpoint was not received"
    finally:
        await stop()
