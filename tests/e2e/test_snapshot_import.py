"""`neon snapshot import` from a plain PostgreSQL 15 server (initdb, not a neon node): over
BASE_BACKUP, from its stopped data directory and from `pg_basebackup -F tar -X stream` output;
`pg create --snapshot` on the result has the source's data (pg_dump equal, every database)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import random
import re
import shutil
import signal
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from aiohttp import web

from cli.pgbin import pg_binary
from datadir_files.pg_account import give_to_pg_user
from snapfile import read_manifest
from tests.neoncli import NEON, NeonCli, neon_home, psql, run_on_tty
from tests.pgtest import (
    PASSWORD,
    SUPERUSER,
    PgTestCluster,
    PgTestServer,
    free_port,
    pg_reachable_tmpdir,
)

DATABASES = ("postgres", "app")
DUMP_KEY = "snapshotimporttest"  # pg_dump 15.18 prints a random \restrict key otherwise

DATA_SQL = """
CREATE TABLE docs (id int PRIMARY KEY, title text, tags text[]);
INSERT INTO docs SELECT g, 'doc ' || g, ARRAY['t' || (g % 7), 'u' || (g % 3)]
  FROM generate_series(1, 2000) g;
CREATE INDEX docs_title ON docs (title);
CREATE INDEX docs_tags ON docs USING gin (tags);
CREATE TABLE places (id int, at point, area box, name text, seen timestamptz);
INSERT INTO places SELECT g, point(g % 100, g / 100), box(point(g, g), point(g + 3, g + 5)),
  'place ' || (g % 50), '2026-01-01'::timestamptz + g * interval '1 minute'
  FROM generate_series(1, 3000) g;
CREATE INDEX places_name_hash ON places USING hash (name);
CREATE INDEX places_area_gist ON places USING gist (area);
CREATE INDEX places_at_spgist ON places USING spgist (at);
CREATE INDEX places_seen_brin ON places USING brin (seen);
"""


INDEX_QUERIES = (
    "SELECT count(*) FROM places WHERE name = 'place 7'",
    "SELECT count(*) FROM places WHERE area && box(point(100, 100), point(200, 300))",
    "SELECT count(*) FROM places WHERE at <@ box(point(10, 0), point(20, 10))",
    "SELECT count(*) FROM places WHERE seen < '2026-01-01 10:00+00'",
)


@pytest.fixture(scope="module")
def source(pg_cluster_module: PgTestCluster) -> PgTestServer:
    """A plain server with pgbench data (-s 1) and an index of every type (btree, gin, hash,
    gist, spgist, brin); no writes after."""
    server = pg_cluster_module.create({"checkpoint_timeout": "1h"})
    server.psql("CREATE DATABASE app")
    server.run("pgbench", "-i", "-s", "1", "-q", "app")
    server.psql(DATA_SQL, dbname="app")
    server.psql("CREATE TABLE notes AS SELECT generate_series(1, 100) AS n")
    server.psql(f"CREATE ROLE plain LOGIN PASSWORD '{PASSWORD}'")
    with open(server.datadir / "pg_hba.conf", "a") as f:
        f.write("host replication plain 127.0.0.1/32 scram-sha-256\n")
    server.psql("SELECT pg_reload_conf()")
    return server


@pytest.fixture(scope="module")
def home() -> Iterator[NeonCli]:
    """One neon home for the module (its pageserver started once)."""
    yield from neon_home()


def dump(server: PgTestServer, dbname: str) -> str:
    return str(server.run("pg_dump", f"--restrict-key={DUMP_KEY}", "-d", dbname).stdout)


def url(server: PgTestServer, user: str = SUPERUSER, password: str = PASSWORD) -> str:
    return f"basebackup://{user}:{password}@127.0.0.1:{server.port}/"


def names(neon: NeonCli) -> list[str]:
    return [s["name"] for s in neon.json("snapshot", "list")]


def check_node_equals_source(neon: NeonCli, source: PgTestServer, snapshot: str) -> None:
    node = neon.json(
        "pg", "create", "--snapshot", snapshot, "-n", f"from-{snapshot}", "--port", str(free_port())
    )["pgdata"]
    connstr = neon.json("pg", "show", node)["connstr"]
    try:
        for db in DATABASES:
            assert dumped(connstr, db) == dump(source, db), db
        assert psql(connstr, "SELECT count(*) FROM pgbench_accounts", "app") == "100000"
        plan = psql(
            connstr,
            "SET enable_seqscan = off; EXPLAIN SELECT id FROM docs WHERE tags @> ARRAY['t3']",
            "app",
        )
        assert "docs_tags" in plan
        count = "SET enable_seqscan = off; SELECT count(*) FROM docs WHERE tags @> ARRAY['t3']"
        assert psql(connstr, count, "app") == "286"
        for query in INDEX_QUERIES:  # each answered through its index, as on the source
            forced = f"SET enable_seqscan = off; SET enable_bitmapscan = off; {query}"
            assert psql(connstr, forced, "app") == source.psql(query, dbname="app"), query
    finally:
        neon.run("pg", "destroy", "--yes", node)


def dumped(connstr: str, dbname: str) -> str:
    proc = subprocess.run(
        [pg_binary("pg_dump"), f"--restrict-key={DUMP_KEY}", "-d", connstr.replace(
            "dbname=postgres", f"dbname={dbname}"
        )],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def imported(home: NeonCli, source: PgTestServer) -> str:
    """`oldpg`, imported from the source over BASE_BACKUP."""
    out = home.run("snapshot", "import", f"--from={url(source)}", "oldpg")
    assert out.stdout == "" and out.stderr == ""  # no TTY: no progress bar
    return "oldpg"


def test_import_over_base_backup_then_create_node(
    home: NeonCli, source: PgTestServer, imported: str
) -> None:
    [row] = [s for s in home.json("snapshot", "list") if s["name"] == "oldpg"]
    assert row["parent"] is None and row["size_bytes"] > 0
    table = home.run("snapshot", "list").stdout.splitlines()
    [line] = [ln.split() for ln in table if ln.startswith("oldpg ")]
    assert line[2] == "-"
    check_node_equals_source(home, source, "oldpg")


def test_import_from_stopped_data_directory(
    home: NeonCli, source: PgTestServer, pg_cluster_module: PgTestCluster, tmp_path: Path
) -> None:
    copy = pg_cluster_module.create_standby(source)  # a second cluster we may stop
    copy.psql("SELECT pg_promote()")
    wait_sql = "SELECT pg_is_in_recovery()"
    for _ in range(100):
        if copy.psql(wait_sql) == "f":
            break
    copy.stop()
    # Run as root (as CI is), on a directory PostgreSQL's account owns: a link that account
    # put in it must not carry a file of root's into the page history (and so to a node).
    assert os.geteuid() == 0 and copy.datadir.stat().st_uid != 0
    secret = tmp_path / "secret"
    secret.write_text("root's only\n")
    secret.chmod(0o600)
    planted = copy.datadir / "planted.conf"
    planted.symlink_to(secret)
    before = names(home)
    error = home.fail("snapshot", "import", "--from", str(copy.datadir), "stopped")
    assert "planted.conf is owned by uid 0, not by the data directory's owner" in error
    assert names(home) == before
    planted.unlink()
    home.run("snapshot", "import", "--from", str(copy.datadir), "stopped")
    check_node_equals_source(home, source, "stopped")
    # Destroying an imported snapshot nothing branches from removes its history too.
    again = home.json("snapshot", "import", "--from", str(copy.datadir), "again")
    assert again["name"] == "again" and again["parent"] is None and again["lsn_text"]
    timeline = home.home / "storage" / "local" / "pagestore" / "timelines" / again["timeline_id"]
    assert timeline.is_dir()
    assert home.run("snapshot", "destroy", "again").stdout == "Ok\n"
    assert not timeline.exists() and "again" not in names(home)


@pytest.mark.parametrize("fmt", ["tar", "plain"])
def test_import_from_pg_basebackup_output(home: NeonCli, source: PgTestServer, fmt: str) -> None:
    """-F tar: base.tar + pg_wal.tar; -F plain: a directory with backup_label (copied)."""
    out = Path(tempfile.mkdtemp(prefix="pgbb-", dir=pg_reachable_tmpdir("neon-bb-")))
    os.chmod(out, 0o777)
    give_to_pg_user(out)
    target = out / "backup"
    source.run(
        "pg_basebackup", "-D", str(target), "-F", fmt, "-X", "stream", "-c", "fast",
        "-d", source.dsn(),
    )  # fmt: skip
    if fmt == "tar":
        assert (target / "base.tar").is_file() and (target / "pg_wal.tar").is_file()
    else:
        assert (target / "backup_label").is_file()
    files_before = sorted(p.name for p in target.rglob("*"))
    if fmt == "tar":  # on a terminal, a progress bar
        code, shown = run_on_tty(home, "snapshot", "import", "--from", str(target), "fromtar")
        assert code == 0, shown
        assert re.search(r"\[=+-*\] +\d+% \| .*B/s \| ETA ", shown), shown
    else:
        home.run("snapshot", "import", "--from", str(target), f"from{fmt}")
    assert sorted(p.name for p in target.rglob("*")) == files_before  # the source is untouched
    check_node_equals_source(home, source, f"from{fmt}")
    shutil.rmtree(out.parent, ignore_errors=True)


def test_refusals_change_nothing(home: NeonCli, source: PgTestServer, imported: str) -> None:
    before = home.json("snapshot", "list")
    wrong = home.fail("snapshot", "import", "--from", url(source, password="nope"), "x1")
    assert "password" in wrong and "nope" not in wrong
    exists = home.fail("snapshot", "import", "--from", url(source), imported)
    assert f"'{imported}' already exists" in exists
    running = home.fail("snapshot", "import", "--from", str(source.datadir), "x2")
    assert "running" in running and "basebackup://" in running
    no_repl = home.fail("snapshot", "import", "--from", url(source, user="plain"), "x3")
    assert "REPLICATION" in no_repl
    bad = home.fail("snapshot", "import", "--from", "basebackup://127.0.0.1:x/", "x4")
    assert "expected basebackup://USER" in bad
    with_at = home.fail("snapshot", "import", "--from", url(source), "a@b")
    assert "bare names" in with_at
    assert home.json("snapshot", "list") == before
    assert not list((home.home / "storage" / "local").glob(".import-*"))


def _tar_dir(members: list[tuple[str, bytes]]) -> Path:
    directory = Path(tempfile.mkdtemp(prefix="neon-badtar-"))
    with tarfile.open(directory / "base.tar", "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return directory


def test_hostile_truncated_tar_and_unreachable_server(home: NeonCli) -> None:
    before = home.json("snapshot", "list")
    hostile = _tar_dir([("PG_VERSION", b"15\n"), ("../escaped", b"x")])
    assert "'../escaped'" in home.fail("snapshot", "import", "--from", str(hostile), "h1")
    assert not (hostile.parent / "escaped").exists()
    truncated = _tar_dir([("PG_VERSION", b"15\n"), ("global/big", os.urandom(100_000))])
    with open(truncated / "base.tar", "r+b") as f:
        f.truncate(60_000)
    assert "damaged" in home.fail("snapshot", "import", "--from", str(truncated), "h2")
    port = free_port()
    down = home.fail("snapshot", "import", "--from", f"basebackup://u:p@127.0.0.1:{port}/", "h3")
    assert f"127.0.0.1:{port}" in down
    assert home.json("snapshot", "list") == before
    assert not list((home.home / "storage" / "local").glob(".import-*"))
    shutil.rmtree(hostile)
    shutil.rmtree(truncated)


def test_sigint_during_recovery_leaves_nothing(home: NeonCli, source: PgTestServer) -> None:
    """^C while the temporary server replays the backup: it is stopped, its directory
    removed, and no snapshot appears."""
    before = home.json("snapshot", "list")
    storage = home.home / "storage" / "local"
    proc = subprocess.Popen(
        [NEON, "snapshot", "import", "--from", url(source), "interrupted"],
        env=home.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        pid = None
        deadline = time.monotonic() + 120
        while pid is None and proc.poll() is None and time.monotonic() < deadline:
            for pidfile in storage.glob(".import-*/pgdata/postmaster.pid"):
                with contextlib.suppress(OSError, ValueError, IndexError):
                    pid = int(pidfile.read_text().splitlines()[0])
            time.sleep(0.01)
        assert pid is not None, "the temporary server was never seen running"
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, err
    assert not Path(f"/proc/{pid}").exists() or "postgres" not in Path(
        f"/proc/{pid}/cmdline"
    ).read_text(errors="replace")
    assert not list(storage.glob(".import-*"))
    assert home.json("snapshot", "list") == before


# .neon files: export -> import round trip, damage refused, pg create from a URL


@pytest.fixture(scope="module")
def neon_file(home: NeonCli, imported: str) -> Iterator[Path]:
    """`oldpg` exported as a snapshot file."""
    base = pg_reachable_tmpdir("neon-file-")
    path = base / "oldpg.neon"
    home.run("snapshot", "export", imported, "-o", str(path))
    yield path
    shutil.rmtree(base, ignore_errors=True)


def test_neon_file_round_trip(home: NeonCli, source: PgTestServer, neon_file: Path) -> None:
    """export -> import gives the source's data and keeps its identity."""
    home.run("snapshot", "import", "--from", str(neon_file), "fromfile")
    check_node_equals_source(home, source, "fromfile")
    again = neon_file.with_name("again.neon")
    home.run("snapshot", "export", "fromfile", "-o", str(again))
    with neon_file.open("rb") as first, again.open("rb") as second:
        m1, m2 = read_manifest(first), read_manifest(second)
    assert m2.system_identifier == m1.system_identifier == source_system_id(source)
    # The file's directory starts at a shutdown checkpoint written at the snapshot's LSN;
    # the import's LSN is that record's end.
    assert m1.lsn < m2.lsn < m1.lsn + 8192 and m2.pg_timeline == m1.pg_timeline


def source_system_id(server: PgTestServer) -> int:
    return int(server.psql("SELECT system_identifier FROM pg_control_system()"))


def test_damaged_neon_file_is_refused_and_changes_nothing(home: NeonCli, neon_file: Path) -> None:
    before = home.json("snapshot", "list")
    data = neon_file.read_bytes()
    rng = random.Random(20261203)
    bad = neon_file.with_name("bad.neon")
    offsets = [rng.randrange(len(data)) for _ in range(3)]
    for offset in offsets:  # a flipped byte anywhere: the member and offset are named
        damaged = bytearray(data)
        damaged[offset] ^= 0x20
        bad.write_bytes(damaged)
        error = home.fail("snapshot", "import", "--from", str(bad), "damaged")
        assert re.search(rf"{bad} is corrupt: \S+ at offset \d+", error), (offset, error)
    for cut in [rng.randrange(1, len(data)) for _ in range(3)]:
        bad.write_bytes(data[:cut])
        error = home.fail("snapshot", "import", "--from", str(bad), "damaged")
        assert re.search(rf"{bad} is (truncated|corrupt)", error), (cut, error)
    assert home.json("snapshot", "list") == before
    assert not list((home.home / "storage" / "local").glob(".import-*"))


@contextlib.contextmanager
def http_server(files: dict[str, Path]) -> Iterator[str]:
    """A real aiohttp server on 127.0.0.1 serving `files` by name; yields its base URL."""
    port = free_port()
    loop = asyncio.new_event_loop()
    app = web.Application()

    def serve(path: Path) -> Callable[[web.Request], Awaitable[web.FileResponse]]:
        async def handler(_request: web.Request) -> web.FileResponse:
            return web.FileResponse(path)

        return handler

    for name, path in files.items():
        app.router.add_get(f"/{name}", serve(path))
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


def test_pg_create_from_http_prints_the_proposal_lines(
    home: NeonCli, source: PgTestServer, neon_file: Path
) -> None:
    before = names(home)
    with http_server({"x.neon": neon_file}) as base:
        missing = home.fail("pg", "create", "--snapshot", f"{base}/nothing.neon", "nothing")
        assert f"{base}/nothing.neon" in missing and "404" in missing
        port = free_port()
        out = home.run(
            "pg", "create", "--snapshot", f"{base}/x.neon", "movies", "--port", str(port)
        ).stdout
    assert out.splitlines() == [
        "Downloading snapshot... Done.",
        f"Started postgres on localhost:{port}",
        "Destroying snapshot... Done.",
    ]
    assert not [n for n in names(home) if n not in before and n != "movies@CURRENT"]
    connstr = home.json("pg", "show", "movies")["connstr"]
    try:
        for db in DATABASES:
            assert dumped(connstr, db) == dump(source, db), db
    finally:
        home.run("pg", "destroy", "--yes", "movies")


def test_pg_create_from_a_running_server(home: NeonCli, source: PgTestServer) -> None:
    """The proposal's implicit import: `pg create --snapshot basebackup://…`."""
    port = free_port()
    out = home.run("pg", "create", "--snapshot", url(source), "--port", str(port)).stdout
    lines = out.splitlines()
    assert lines == [
        "Downloading snapshot... Done.",
        f"Started postgres on localhost:{port}",
        "Destroying snapshot... Done.",
    ]
    [node] = [n for n in home.json("pg", "list") if n["port"] == port]
    try:
        assert psql(node["connstr"], "SELECT count(*) FROM pgbench_accounts", "app") == "100000"
    finally:
        home.run("pg", "destroy", "--yes", node["id"])
