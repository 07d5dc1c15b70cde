"""run_base_backup against a real PostgreSQL 15 server (initdb, not a neon node).

The backup is untarred and started with stock PostgreSQL, which recovers from the backup_label
and the WAL in the archive; its data must equal the source's (writes stopped meanwhile). The
errors a user can meet are checked for their type and message.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import tarfile
import tracemalloc
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from pathlib import Path

import pytest

from cli import postmaster
from datadir_files.pg_account import make_pg_dir
from datadir_files.untar import extract_basebackup
from pg15.lsn import parse_lsn
from proto.errors import AuthFailed, CorruptData, Unavailable
from tests.pgtest import PASSWORD, SUPERUSER, PgTestCluster, PgTestServer, free_port
from walreceiver.base_backup import (
    PROGRESS_STEP,
    BackupArchive,
    BaseBackupOptions,
    BaseBackupProgress,
    BaseBackupResult,
    BaseBackupTruncated,
    SourceDataCorrupted,
    UnsupportedServer,
    run_base_backup,
)
from walreceiver.receiver import ConnParams
from walreceiver.replication import (
    ARCHIVE_RUN_BYTES,
    NoReplicationPrivilege,
    ServerAuthFailed,
    ServerError,
    ServerUnavailable,
)
from walreceiver.replication_auth import TRUST_OR_SCRAM

pytestmark = pytest.mark.slow

PLAIN_USER = "no_replication"
PLAIN_PASSWORD = "plain-pw"
# Small data, but more than the socket buffers hold: a cut or an error lands mid-stream.
DATA_SQL = """
CREATE TABLE items (id int PRIMARY KEY, name text, payload text);
INSERT INTO items SELECT i, 'item ' || i, repeat(md5(i::text), 4) FROM generate_series(1, 40000) i;
CREATE INDEX items_name ON items (name);
CREATE TABLE notes AS SELECT i AS id, now()::date AS day FROM generate_series(1, 1000) i;
DELETE FROM items WHERE id % 7 = 0;
"""
CHECK_SQL = "SELECT count(*), sum(hashtext(name || payload)), max(id) FROM items"


@pytest.fixture(scope="module")
def source(pg_cluster_module: PgTestCluster) -> PgTestServer:
    server = pg_cluster_module.create({"checkpoint_timeout": "1h", "max_wal_size": "1GB"})
    server.psql(
        DATA_SQL + f"CREATE ROLE {PLAIN_USER} LOGIN PASSWORD '{PLAIN_PASSWORD}';"
        "CREATE DATABASE second; CHECKPOINT;"
    )
    server.psql("CREATE TABLE t2 AS SELECT generate_series(1, 500) AS x", dbname="second")
    with open(server.datadir / "pg_hba.conf", "a") as f:
        f.write(f"host replication {PLAIN_USER} 127.0.0.1/32 scram-sha-256\n")
    server.psql("SELECT pg_reload_conf()")
    return server


def params(server: PgTestServer, user: str = SUPERUSER, password: str = PASSWORD) -> ConnParams:
    return ConnParams("127.0.0.1", server.port, user, password, "test-basebackup")


class DirectorySink:
    """Writes each archive to `<dir>/<name>`, as it arrives; notes when data first came."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.archives: list[BackupArchive] = []
        self.sizes: dict[str, int] = {}
        self.first_chunk = asyncio.Event()

    async def __call__(
        self, archive: BackupArchive, chunks: AsyncIterator[bytes | memoryview]
    ) -> None:
        self.archives.append(archive)
        self.sizes[archive.name] = 0
        with open(self.directory / archive.name, "wb") as f:
            async for chunk in chunks:
                f.write(chunk)
                self.sizes[archive.name] += len(chunk)
                self.first_chunk.set()


def backup_slots(server: PgTestServer) -> list[str]:
    out = server.psql(
        "SELECT slot_name || ' ' || temporary || ' ' || active || ' ' || restart_lsn "
        "FROM pg_replication_slots WHERE slot_name LIKE 'pg_neon_basebackup_%'"
    )
    return out.splitlines()


def dump(server: PgTestServer, dbname: str) -> str:
    """pg_dump's output, comparable across servers (a fixed \\restrict key, 15.14+)."""
    return server.run("pg_dump", "--restrict-key=basebackuptest", "-d", dbname).stdout


async def test_backup_starts_with_stock_postgres_and_has_the_same_data(
    source: PgTestServer, pg_cluster: PgTestCluster, tmp_path: Path
) -> None:
    sink = DirectorySink(tmp_path)
    progress: list[BaseBackupProgress] = []
    slots_during: list[list[str]] = []

    async def watch_slot() -> None:
        await sink.first_chunk.wait()
        slots_during.append(backup_slots(source))

    watcher = asyncio.create_task(watch_slot())
    result = await run_base_backup(params(source), sink, on_progress=progress.append)
    await watcher

    # What came back: one main archive (no tablespaces), positions in order.
    assert [(a.name, a.tablespace_location, a.tablespace_oid) for a in sink.archives] == [
        ("base.tar", None, None)
    ]
    assert result.archives[0].name == "base.tar"
    assert result.archives[0].size == sink.sizes["base.tar"] == result.bytes_received
    assert (tmp_path / "base.tar").stat().st_size == result.bytes_received
    assert result.start_timeline == result.end_timeline == 1
    assert 0 < result.start_lsn <= result.end_lsn
    assert result.server_version.startswith("15")
    ident = source.psql("SELECT system_identifier FROM pg_control_system()")
    assert result.system_identifier == int(ident)

    # The WAL was pinned by our temporary slot while the files were copied, from at or before
    # the backup's start; the slot went away with the session.
    assert len(slots_during) == 1 and len(slots_during[0]) == 1, slots_during
    name, temporary, active, restart = slots_during[0][0].split()
    assert name == result.slot and temporary == "true" and active == "true"
    assert parse_lsn(restart) <= result.start_lsn
    assert backup_slots(source) == []

    # Progress: monotonic, at least every MiB, ending with everything received.
    done = [p.bytes_done for p in progress]
    assert done == sorted(done) and done[-1] == result.bytes_received
    step = PROGRESS_STEP + ARCHIVE_RUN_BYTES  # reported after a run that passes the step
    assert all(b - a <= step for a, b in zip([0, *done], done, strict=False))
    total = progress[0].bytes_total
    assert total is not None and total > 1 << 20

    # Stock PostgreSQL starts on it: crash recovery from backup_label with the included WAL.
    restored = pg_cluster.create_empty()
    with open(tmp_path / "base.tar", "rb") as f:
        extract_basebackup(f, restored.datadir)
    assert (restored.datadir / "backup_label").exists()
    wal = sorted(p.name for p in (restored.datadir / "pg_wal").iterdir() if len(p.name) == 24)
    assert wal, "the archive holds the WAL the backup needs"
    postmaster.write_config(restored.datadir, *restored.config())
    restored.start()
    assert restored.psql(CHECK_SQL) == source.psql(CHECK_SQL)
    for db in ("postgres", "second"):
        assert dump(restored, db) == dump(source, db), f"pg_dump of {db} differs"


async def test_wrong_password_is_an_auth_error(source: PgTestServer, tmp_path: Path) -> None:
    with pytest.raises(ServerAuthFailed, match="password authentication failed") as err:
        await run_base_backup(params(source, password="wrong"), DirectorySink(tmp_path))
    assert "wrong" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


async def test_user_without_replication_is_named(source: PgTestServer, tmp_path: Path) -> None:
    with pytest.raises(NoReplicationPrivilege, match="REPLICATION") as err:
        await run_base_backup(params(source, PLAIN_USER, PLAIN_PASSWORD), DirectorySink(tmp_path))
    assert isinstance(err.value, AuthFailed)
    assert "must be superuser or replication role" in str(err.value)


async def test_unreachable_server(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(Unavailable, match=f"cannot connect to PostgreSQL at 127.0.0.1:{port}"):
        await run_base_backup(
            ConnParams("127.0.0.1", port, SUPERUSER, PASSWORD), DirectorySink(tmp_path)
        )


async def test_md5_server_is_refused_unless_allowed(source: PgTestServer, tmp_path: Path) -> None:
    """The connection's authentication policy applies: SCRAM only unless asked otherwise."""
    with open(source.datadir / "pg_hba.conf") as f:
        original = f.read()
    with open(source.datadir / "pg_hba.conf", "w") as f:
        f.write(f"host replication {SUPERUSER} 127.0.0.1/32 password\n" + original)
    source.psql("SELECT pg_reload_conf()")
    try:
        with pytest.raises(AuthFailed, match="refusing to send it"):
            await run_base_backup(params(source), DirectorySink(tmp_path))
    finally:
        with open(source.datadir / "pg_hba.conf", "w") as f:
            f.write(original)
        source.psql("SELECT pg_reload_conf()")


# -- a server that is not PostgreSQL 15 ------------------------------------------------------


def backend(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


@contextlib.asynccontextmanager
async def fake_server(version: str) -> AsyncIterator[tuple[int, list[bytes]]]:
    """A server that lets anyone in (trust) and reports `version`; records what it was sent."""
    received: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        (length,) = struct.unpack("!I", await reader.readexactly(4))
        await reader.readexactly(length - 4)
        writer.write(
            backend(b"R", struct.pack("!i", 0))
            + backend(b"S", b"server_version\0" + version.encode() + b"\0")
            + backend(b"K", struct.pack("!ii", 1, 2))
            + backend(b"Z", b"I")
        )
        received.append(await reader.read())
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], received
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("version", ["14.11 (Debian 14.11-1)", "16.2", "9.6.24"])
async def test_server_that_is_not_postgresql_15_is_refused(version: str, tmp_path: Path) -> None:
    async with fake_server(version) as (port, received):
        conn = ConnParams("127.0.0.1", port, "u", "pw", auth_methods=TRUST_OR_SCRAM)
        with pytest.raises(UnsupportedServer, match=f"PostgreSQL {version.split()[0]}"):
            await run_base_backup(conn, DirectorySink(tmp_path))
        for _ in range(100):
            if received:
                break
            await asyncio.sleep(0.05)
    assert received in ([b""], [b"X\0\0\0\4"]), "no command is sent to such a server"


# -- broken streams ----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def cutting_proxy(target_port: int, limit: int) -> AsyncIterator[int]:
    """A loopback TCP proxy that forwards only `limit` bytes from the server, then hangs up."""

    async def pipe(
        src: asyncio.StreamReader, dst: asyncio.StreamWriter, budget: int | None
    ) -> None:
        while budget is None or budget > 0:
            data = await src.read(65536 if budget is None else min(65536, budget))
            if not data:
                break
            if budget is not None:
                budget -= len(data)
            dst.write(data)
            await dst.drain()

    async def serve(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", target_port)
        up = asyncio.create_task(pipe(client_r, server_w, None))
        with contextlib.suppress(OSError):
            await pipe(server_r, client_w, limit)
        up.cancel()
        for w in (client_w, server_w):
            w.transport.abort()

    proxy = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield proxy.sockets[0].getsockname()[1]
    finally:
        proxy.close()
        await proxy.wait_closed()


async def wait_until(cond: object, what: str, timeout: float = 30) -> None:
    assert callable(cond)
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def test_truncated_stream_is_a_typed_error_and_the_server_cleans_up(
    source: PgTestServer, tmp_path: Path
) -> None:
    sink = DirectorySink(tmp_path)
    async with cutting_proxy(source.port, 3 << 20) as port:
        conn = ConnParams("127.0.0.1", port, SUPERUSER, PASSWORD)
        with pytest.raises(BaseBackupTruncated, match=r"in base\.tar after") as err:
            await run_base_backup(conn, sink)
    assert "closed the connection unexpectedly" in str(err.value)
    assert "unusable" in str(err.value)
    assert 0 < sink.sizes["base.tar"] < 3 << 20
    # The server aborted the backup and dropped the temporary slot with the session.
    await wait_until(lambda: backup_slots(source) == [], "the temporary slot to go")
    progress = "SELECT count(*) FROM pg_stat_progress_basebackup"
    await wait_until(lambda: source.psql(progress) == "0", "the backup to be aborted")


@pytest.fixture
def unreadable_file(source: PgTestServer) -> Iterator[Path]:
    """A file in the data directory that PostgreSQL's OS user cannot read (root's, 0600)."""
    path = source.datadir / "zz_unreadable"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, b"secret")
    os.close(fd)
    try:
        yield path
    finally:
        path.unlink()


async def test_server_error_mid_stream_is_a_typed_error(
    source: PgTestServer, unreadable_file: Path, tmp_path: Path
) -> None:
    sink = DirectorySink(tmp_path)
    with pytest.raises(ServerError, match="Permission denied") as err:
        await run_base_backup(params(source), sink)
    assert type(err.value) is ServerError and err.value.sqlstate == "42501"
    assert unreadable_file.name in str(err.value)
    assert "during the base backup, in base.tar after" in str(err.value)
    assert sink.sizes["base.tar"] > 0, "the error came in the middle of the copy"
    await wait_until(lambda: backup_slots(source) == [], "the temporary slot to go")


@pytest.mark.parametrize("closes", [False, True])
async def test_without_temporary_slot_and_a_sink_that_stops_reading(
    source: PgTestServer, closes: bool
) -> None:
    """A sink may ignore an archive or close its iterator after a chunk: the rest is read and
    dropped, and the backup completes."""
    seen: list[str] = []

    async def lazy(archive: BackupArchive, chunks: AsyncIterator[bytes | memoryview]) -> None:
        seen.append(archive.name)
        if closes:
            assert isinstance(chunks, AsyncGenerator)
            await anext(chunks)
            await chunks.aclose()

    options = BaseBackupOptions(temporary_slot=False, label="it's a test")
    result: BaseBackupResult = await run_base_backup(params(source), lazy, options=options)
    assert seen == ["base.tar"] and result.slot is None
    assert result.archives[0].size > 1 << 20
    assert result.end_lsn >= result.start_lsn


async def test_memory_stays_bounded_whatever_the_backup_size(source: PgTestServer) -> None:
    """The connection is read only as fast as the sink takes bytes: a slow sink makes the
    server wait, it does not make us buffer the backup."""
    received = 0

    async def slow(archive: BackupArchive, chunks: AsyncIterator[bytes | memoryview]) -> None:
        nonlocal received
        async for chunk in chunks:
            received += len(chunk)
            if received % (4 << 20) < len(chunk):
                await asyncio.sleep(0.2)  # let the server fill every buffer there is

    tracemalloc.start()
    try:
        result = await run_base_backup(params(source), slow)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert received == result.bytes_received > 40 << 20
    assert peak < 20 << 20, f"peak {peak >> 20} MiB for a {received >> 20} MiB backup"


async def test_cancelled_backup_leaves_nothing_on_the_server(source: PgTestServer) -> None:
    """An interrupted import (SIGINT cancels the task): the server aborts the backup and drops
    the temporary slot at once."""
    started = asyncio.Event()

    async def stuck(archive: BackupArchive, chunks: AsyncIterator[bytes | memoryview]) -> None:
        async for _ in chunks:
            started.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(run_base_backup(params(source), stuck))
    await asyncio.wait_for(started.wait(), 60)
    assert len(backup_slots(source)) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_until(lambda: backup_slots(source) == [], "the temporary slot to go")
    progress = "SELECT count(*) FROM pg_stat_progress_basebackup"
    await wait_until(lambda: source.psql(progress) == "0", "the backup to be aborted")


async def test_tablespace_archives_restore_with_a_new_location(
    pg_cluster: PgTestCluster, tmp_path: Path
) -> None:
    """A tablespace comes as its own archive (named by its oid, with its location) before
    base.tar, whose tablespace_map says where it was; pointed elsewhere, it starts."""
    server = pg_cluster.create()
    location = server.root / "ts1"
    make_pg_dir(location)
    server.psql(
        f"CREATE TABLESPACE ts1 LOCATION '{location}';"
        "CREATE TABLE far (id int, t text) TABLESPACE ts1;"
        "INSERT INTO far SELECT i, md5(i::text) FROM generate_series(1, 20000) i;"
        "CREATE INDEX far_t ON far (t) TABLESPACE ts1; CHECKPOINT;"
    )
    oid = int(server.psql("SELECT oid FROM pg_tablespace WHERE spcname = 'ts1'"))
    sink = DirectorySink(tmp_path)
    result = await run_base_backup(params(server), sink)
    assert [(a.name, a.tablespace_location, a.tablespace_oid) for a in sink.archives] == [
        (f"{oid}.tar", str(location), oid),
        ("base.tar", None, None),
    ]
    assert [(t.oid, t.location) for t in result.tablespaces] == [(oid, str(location)), (None, None)]
    with tarfile.open(tmp_path / "base.tar") as tar:
        names = tar.getnames()
        assert not any(m.issym() for m in tar.getmembers()), "no pg_tblspc symlinks"
        tsmap = tar.extractfile("tablespace_map")
        assert tsmap is not None and tsmap.read().decode() == f"{oid} {location}\n"
    assert "pg_tblspc" in names

    restored = pg_cluster.create_empty()
    new_location = restored.root / "ts1-moved"
    with open(tmp_path / "base.tar", "rb") as f:
        extract_basebackup(f, restored.datadir)
    with open(tmp_path / f"{oid}.tar", "rb") as f:
        extract_basebackup(f, new_location)
    (restored.datadir / "tablespace_map").write_text(f"{oid} {new_location}\n")
    postmaster.write_config(restored.datadir, *restored.config())
    restored.start()
    check = "SELECT count(*), sum(hashtext(t)), pg_tablespace_location(" + str(oid) + ") FROM far"
    assert restored.psql(check) == server.psql(check).replace(str(location), str(new_location))
    assert dump(restored, "postgres") == dump(server, "postgres")


async def test_walsender_terminated_mid_backup(source: PgTestServer) -> None:
    """pg_terminate_backend on the walsender: its FATAL message reaches us only when its
    socket was writable (else it just closes), so the error is ServerUnavailable or
    BaseBackupTruncated; both are Unavailable (try again) and say where the backup was."""
    started = asyncio.Event()
    proceed = asyncio.Event()

    async def pausing(archive: BackupArchive, chunks: AsyncIterator[bytes | memoryview]) -> None:
        async for _ in chunks:
            started.set()
            await proceed.wait()

    task = asyncio.create_task(run_base_backup(params(source), pausing))
    await asyncio.wait_for(started.wait(), 60)
    killed = source.psql(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE backend_type = 'walsender' AND application_name = 'test-basebackup'"
    )
    assert killed == "1"
    proceed.set()
    with pytest.raises(Unavailable, match=r"during the base backup, in base\.tar after") as err:
        await task
    assert isinstance(err.value, ServerUnavailable | BaseBackupTruncated)
    await wait_until(lambda: backup_slots(source) == [], "the temporary slot to go")


async def test_checksum_failure_is_reported_after_the_data_and_refuses_the_backup(
    pg_cluster: PgTestCluster, tmp_path: Path
) -> None:
    """basebackup.c sends every archive and the end position, then the error: the backup must
    still fail (SourceDataCorrupted), unless verification was turned off."""
    server = pg_cluster.create()
    server.psql("CREATE TABLE damaged AS SELECT generate_series(1, 1000) AS x; CHECKPOINT;")
    relpath = server.datadir / server.psql("SELECT pg_relation_filepath('damaged')")
    server.stop()
    server.run("pg_checksums", "--enable", "-D", str(server.datadir))
    with open(relpath, "r+b") as f:  # a byte in the first page's tuples, header intact
        f.seek(6000)
        byte = f.read(1)
        f.seek(6000)
        f.write(bytes([byte[0] ^ 0xFF]))
    server.start()

    sink = DirectorySink(tmp_path)
    with pytest.raises(SourceDataCorrupted, match="checksum verification failure") as err:
        await run_base_backup(params(server), sink)
    assert err.value.sqlstate == "XX001" and isinstance(err.value, CorruptData)
    assert sink.sizes["base.tar"] > 1 << 20, "the error came after the data"

    unchecked = BaseBackupOptions(verify_checksums=False)
    result = await run_base_backup(params(server), DirectorySink(tmp_path), options=unchecked)
    assert result.archives[0].name == "base.tar"
