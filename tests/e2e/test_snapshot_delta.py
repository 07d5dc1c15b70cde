"""Incremental push (issue 12 item 2) between two homes on loopback: a snapshot pushed whole,
1% of pgbench_accounts changed, the next snapshot pushed as a delta on it (at most 5% of the
bytes), pulled into a second NEON_HOME from the parent + delta in the store, and a node
created on it dumps exactly as the sender's snapshot; a delta whose parent is nowhere is one
line naming it."""

from __future__ import annotations

import json
import shutil
import socket
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_snapshot_export import pg_dump_text, snapshot_dump
from tests.e2e.test_snapshot_recv import receiving
from tests.httpd import file_server
from tests.neoncli import NeonCli, free_port, pgbench, psql
from tests.pgtest import pg_reachable_tmpdir
from tests.s3d import moto_s3
from tests.snapfile.test_standard_tools import run as run_pipeline


@pytest.fixture(scope="module")
def base() -> Iterator[Path]:
    path = pg_reachable_tmpdir("neon-delta-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def sender(base: Path) -> Iterator[NeonCli]:
    """pgbench at scale 2 (200000 accounts), @s1, then 1% of the accounts updated, @s2."""
    neon = NeonCli(base / "sender", {})
    try:
        neon.run("pg", "create", "--port", str(free_port()))
        c = str(neon.json("pg", "show", "pgdata1")["connstr"])
        pgbench(c, "-i", "-s", "2", "-q")
        neon.run("snapshot", "create", "pgdata1@s1")
        psql(c, "UPDATE pgbench_accounts SET abalance = abalance + 7 WHERE aid <= 2000")
        neon.run("snapshot", "create", "pgdata1@s2")
        yield neon
    finally:
        neon.cleanup()


@pytest.fixture(scope="module")
def receiver(base: Path) -> Iterator[NeonCli]:
    neon = NeonCli(base / "receiver", {})
    try:
        yield neon
    finally:
        neon.cleanup()


def node_dump(home: NeonCli, snapshot: str, pgdata: str) -> str:
    home.run("pg", "create", "--port", str(free_port()), "--snapshot", snapshot, pgdata)
    return pg_dump_text(str(home.json("pg", "show", pgdata)["connstr"]))


def test_delta_push_is_small_and_pulls_into_another_home(
    sender: NeonCli, receiver: NeonCli, base: Path
) -> None:
    dest = base / "store"
    dest.mkdir()
    first = sender.json("snapshot", "push", "--to", f"{dest}/", "pgdata1@s1")
    assert first["parent"] is None and first["bytes_sent"] < first["snapshot_bytes"]
    out = sender.run("snapshot", "push", "--to", f"{dest}/", "pgdata1@s2").stdout
    assert "(incremental on pgdata1@s1)" in out, out
    delta = dest / "pgdata1@s2.neon"
    again = sender.json("snapshot", "push", "--to", f"{dest}/", "pgdata1@s2", "--force")
    assert again["parent"] == "pgdata1@s1"
    assert again["bytes_sent"] == delta.stat().st_size
    # the whole snapshot's size, as a whole push reports it
    whole = sender.json("snapshot", "push", "--to", f"{base}/whole.neon", "--full", "pgdata1@s2")
    assert whole["parent"] is None and whole["snapshot_bytes"] == again["snapshot_bytes"]
    print(f"delta {again['bytes_sent']} B, whole file {whole['bytes_sent']} B, "
          f"data {again['snapshot_bytes']} B")  # fmt: skip
    assert again["bytes_sent"] <= 0.05 * again["snapshot_bytes"]
    assert again["bytes_sent"] <= 0.05 * whole["bytes_sent"]

    check_wal_segment_sparse(delta, base / "whole.neon", base / "tools")

    pulled = receiver.json("snapshot", "pull", "--from", str(delta))
    assert pulled["name"] == "pgdata1-s2"
    assert node_dump(receiver, "pgdata1-s2", "copy2") == snapshot_dump(sender, "pgdata1@s2")

    lonely = base / "lonely"
    lonely.mkdir()
    shutil.copy(delta, lonely / "pgdata1@s2.neon")
    error = receiver.fail("snapshot", "pull", "--from", f"file://{lonely}/pgdata1@s2.neon", "x")
    assert "is a delta on snapshot pgdata1@s1 at LSN" in error, error
    assert "neon snapshot push --full" in error and len(error.strip().splitlines()) == 1
    assert "x" not in [s["name"] for s in receiver.json("snapshot", "list")]


def check_wal_segment_sparse(delta: Path, whole: Path, work: Path) -> None:
    """A delta file (format version 3) holds its WAL segment as a GNU sparse member, a few
    KiB of its 16 MiB (a whole file, version 2, the segment whole); the real tar and zstd
    extract both (docs/snapshot-format.md's pipeline) to the same segment."""
    segments = []
    for path, version in ((delta, 3), (whole, 2)):
        out = work / path.stem
        out.mkdir(parents=True)
        manifest = json.loads(run_pipeline(f"tar -xOf '{path}' manifest.json", out))
        assert manifest["format_version"] == version
        inner = out / "data.tar"
        inner.write_bytes(run_pipeline(f"tar -xOf '{path}' --wildcards 'frames/*' | zstd -d", out))
        with tarfile.open(inner) as archive:
            wal = [m for m in archive.getmembers() if m.name.startswith("pg_wal/0000")]
        assert len(wal) == 1 and wal[0].issparse() == (version == 3), wal
        run_pipeline(f"tar -xOf '{path}' --wildcards 'frames/*' | zstd -d | tar -x", out)
        (segment,) = (out / "pg_wal").glob("0000*")
        segments.append(segment.read_bytes())
    assert len(segments[0]) == 16 << 20 and segments[0] == segments[1]
    assert segments[0].rstrip(b"\0"), "the segment holds records"


def test_delta_over_s3(sender: NeonCli, receiver: NeonCli) -> None:
    with moto_s3() as server:
        bucket = server.new_bucket()
        a, b = (NeonCli(h.home, {**h.env_extra, **server.env()}) for h in (sender, receiver))
        a.run("snapshot", "push", "--to", f"s3://{bucket}/snaps/", "pgdata1@s1")
        pushed = a.json("snapshot", "push", "--to", f"s3://{bucket}/snaps/", "pgdata1@s2")
        assert pushed["parent"] == "pgdata1@s1"
        assert pushed["bytes_sent"] <= 0.05 * pushed["snapshot_bytes"]
        b.run("snapshot", "pull", "--from", pushed["url"], "overs3")
    assert node_dump(receiver, "overs3", "copy3") == snapshot_dump(sender, "pgdata1@s2")


def test_delta_over_http_to_a_plain_server_and_to_recv(
    sender: NeonCli, receiver: NeonCli, base: Path
) -> None:
    """Plain HTTP lists nothing: a push keeps the store's index (`neon-index.json`) on a
    plain PUT/GET server and reads it on the next push, which sends a delta; a pull of that
    delta finds its parent through it. A `recv --http` answers the index itself (its
    snapshots described by their manifests): the second push is a delta there too."""
    expected = snapshot_dump(sender, "pgdata1@s2")
    served = base / "served"
    served.mkdir()
    with file_server(served) as httpd:
        sender.run("snapshot", "push", "--to", httpd.url(""), "pgdata1@s1")
        pushed = sender.json("snapshot", "push", "--to", httpd.url(""), "pgdata1@s2")
        assert pushed["parent"] == "pgdata1@s1"
        assert pushed["bytes_sent"] <= 0.05 * pushed["snapshot_bytes"]
        receiver.run("snapshot", "pull", "--from", pushed["url"], "overhttp")
    assert snapshot_dump(receiver, "overhttp") == expected
    with receiving(receiver, "r1", "--http", "--once") as recv:
        whole = sender.json("snapshot", "push", "--to", recv.line(), "pgdata1@s1")
        assert recv.proc.wait(timeout=60) == 0
    with receiving(receiver, "r2", "--http", "--once") as recv:
        delta = sender.json("snapshot", "push", "--to", recv.line(), "pgdata1@s2")
        assert recv.proc.wait(timeout=60) == 0
    assert whole["parent"] is None and delta["parent"] == "pgdata1@s1"
    assert delta["bytes_sent"] <= 0.05 * delta["snapshot_bytes"]
    assert snapshot_dump(receiver, "r2") == expected


def test_a_guessed_delta_is_the_one_the_destination_calls_for(sender: NeonCli, base: Path) -> None:
    """Over s3 a push asks for the delta on its own guess (@s1, the newest snapshot below
    @s2) while the bucket is listed (cli/snapshot_transfer.py `_Guess`): kept where the
    bucket holds @s1, the bytes a push into a directory (which never guesses) sends;
    dropped where the bucket holds nothing, which gets the whole file a --full push makes."""
    with moto_s3() as server:
        bucket = server.new_bucket()
        a = NeonCli(sender.home, {**sender.env_extra, **server.env()})
        dest = base / "guess"
        dest.mkdir()
        sender.run("snapshot", "push", "--to", f"{dest}/", "pgdata1@s1")
        by_file = sender.json("snapshot", "push", "--to", f"{dest}/", "pgdata1@s2")
        a.run("snapshot", "push", "--to", f"s3://{bucket}/held/", "pgdata1@s1")
        held = a.json("snapshot", "push", "--to", f"s3://{bucket}/held/", "pgdata1@s2")
        assert held["parent"] == by_file["parent"] == "pgdata1@s1"
        assert held["sha256"] == by_file["sha256"] and held["bytes_sent"] == by_file["bytes_sent"]
        empty = a.json("snapshot", "push", "--to", f"s3://{bucket}/empty/", "pgdata1@s2")
        whole = sender.json(
            "snapshot", "push", "--to", f"{base}/guess-whole.neon", "--full", "pgdata1@s2"
        )
        assert empty["parent"] is None and empty["sha256"] == whole["sha256"]


def test_a_chain_of_deltas_with_dropped_created_and_truncated_relations(
    sender: NeonCli, receiver: NeonCli, base: Path
) -> None:
    """@s3 on @s2 on @s1: a table dropped, one created, one truncated, one rewritten by
    VACUUM FULL (a new relfilenode), a database created; pulled through the chain."""
    c = str(sender.json("pg", "show", "pgdata1")["connstr"])
    psql(c, "DROP TABLE pgbench_history; TRUNCATE pgbench_tellers;"
            "CREATE TABLE fresh AS SELECT g AS id FROM generate_series(1, 5000) g;"
            "VACUUM FULL pgbench_branches; CREATE DATABASE other")  # fmt: skip
    psql(c, "CREATE TABLE t2 (x int); INSERT INTO t2 VALUES (1)", dbname="other")
    sender.run("snapshot", "create", "pgdata1@s3")
    dest = base / "chain"
    dest.mkdir()
    for snap in ("pgdata1@s1", "pgdata1@s2"):
        sender.run("snapshot", "push", "--to", f"{dest}/", snap)
    pushed = sender.json("snapshot", "push", "--to", f"{dest}/", "pgdata1@s3")
    assert pushed["parent"] == "pgdata1@s2"
    receiver.run("snapshot", "pull", "--from", pushed["url"], "chained")
    assert node_dump(receiver, "chained", "copy4") == snapshot_dump(sender, "pgdata1@s3")
    other = str(receiver.json("pg", "show", "copy4")["connstr"])
    assert psql(other, "SELECT x FROM t2", dbname="other") == "1"


def test_push_names_an_unknown_snapshot_before_an_unreachable_destination(
    sender: NeonCli, base: Path
) -> None:
    """A push asks the pageserver and the destination at once (cli/snapshot_transfer.py
    `_plan_push`): the pageserver's answer still decides the error, as when it was asked
    first, without waiting for a destination that does not answer, and an existing file is
    still refused before anything is exported."""
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never says a word
        url = f"ssh://127.0.0.1:{silent.getsockname()[1]}/x/"
        started = time.monotonic()
        error = sender.fail("snapshot", "push", "--to", url, "pgdata1@nope")
        # Not held back until ssh gives up on the silent server (ConnectTimeout=30).
        assert time.monotonic() - started < 20
    assert "pgdata1@nope" in error, error
    dest = base / "there"
    dest.mkdir()
    (dest / "pgdata1@s2.neon").write_bytes(b"kept")
    error = sender.fail("snapshot", "push", "--to", f"{dest}/", "pgdata1@s2")
    assert "already exists" in error, error
    assert sorted(p.name for p in dest.iterdir()) == ["pgdata1@s2.neon"]
    assert (dest / "pgdata1@s2.neon").read_bytes() == b"kept"
