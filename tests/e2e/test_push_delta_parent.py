"""Which parent an incremental push builds on: the newest snapshot of this home's history that
the destination holds whole (its chain of parents complete there), not merely the newest this
home has; a destination with none of them gets the whole file. Each push is pulled into a
second home and must dump as the sender's snapshot (issue 12, item 2)."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_snapshot_delta import node_dump
from tests.e2e.test_snapshot_export import snapshot_dump
from tests.neoncli import NeonCli, free_port, pgbench, psql
from tests.pgtest import pg_reachable_tmpdir


@pytest.fixture(scope="module")
def base() -> Iterator[Path]:
    path = pg_reachable_tmpdir("neon-ahead-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def sender(base: Path) -> Iterator[NeonCli]:
    """pgbench at scale 1: @s0, a change, @s1, another, @s2."""
    neon = NeonCli(base / "sender", {})
    try:
        neon.run("pg", "create", "--port", str(free_port()))
        c = str(neon.json("pg", "show", "pgdata1")["connstr"])
        pgbench(c, "-i", "-s", "1", "-q")
        neon.run("snapshot", "create", "pgdata1@s0")
        psql(c, "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid <= 1000")
        neon.run("snapshot", "create", "pgdata1@s1")
        psql(c, "UPDATE pgbench_accounts SET abalance = abalance + 2 WHERE aid > 99000")
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


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_destination_without_the_newest_parent_gets_a_delta_on_what_it_has(
    sender: NeonCli, receiver: NeonCli, base: Path
) -> None:
    """This home's newest older snapshot is @s1, which the place lacks: the delta is on @s0."""
    place = base / "has-s0"
    place.mkdir()
    sender.run("snapshot", "push", "--to", f"{place}/", "pgdata1@s0")
    pushed = sender.json("snapshot", "push", "--to", f"{place}/", "pgdata1@s2")
    assert pushed["parent"] == "pgdata1@s0"
    assert pushed["sha256"] == sha256(place / "pgdata1@s2.neon")
    receiver.run("snapshot", "pull", "--from", str(place / "pgdata1@s2.neon"), "via-s0")
    assert node_dump(receiver, "via-s0", "copy-s0") == snapshot_dump(sender, "pgdata1@s2")


def test_an_empty_destination_gets_the_whole_file(sender: NeonCli, base: Path) -> None:
    place = base / "empty"
    place.mkdir()
    pushed = sender.json("snapshot", "push", "--to", f"{place}/", "pgdata1@s2")
    assert pushed["parent"] is None
    whole = sender.json("snapshot", "push", "--to", f"{base}/whole-s2.neon", "--full", "pgdata1@s2")
    assert pushed["sha256"] == whole["sha256"] == sha256(place / "pgdata1@s2.neon")


def test_a_destination_with_the_newest_parent_gets_a_delta_on_it(
    sender: NeonCli, receiver: NeonCli, base: Path
) -> None:
    """On a place holding @s0 and @s1 (a delta on @s0), and on one holding @s1 whole, the
    delta is on @s1, the same bytes both times and again (a snapshot's file is the same at
    every push), and it pulls into the other home."""
    both, alone = base / "both", base / "alone"
    both.mkdir()
    alone.mkdir()
    sender.run("snapshot", "push", "--to", f"{both}/", "pgdata1@s0")
    sender.run("snapshot", "push", "--to", f"{both}/", "pgdata1@s1")
    sender.run("snapshot", "push", "--to", f"{alone}/", "--full", "pgdata1@s1")
    on_both = sender.json("snapshot", "push", "--to", f"{both}/", "pgdata1@s2")
    on_alone = sender.json("snapshot", "push", "--to", f"{alone}/", "pgdata1@s2")
    assert on_both["parent"] == on_alone["parent"] == "pgdata1@s1"
    assert on_both["sha256"] == on_alone["sha256"] == sha256(alone / "pgdata1@s2.neon")
    again = sender.json("snapshot", "push", "--to", f"{alone}/", "pgdata1@s2", "--force")
    assert again["sha256"] == on_alone["sha256"]
    receiver.run("snapshot", "pull", "--from", str(alone / "pgdata1@s2.neon"), "via-s1")
    assert node_dump(receiver, "via-s1", "copy-s1") == snapshot_dump(sender, "pgdata1@s2")
