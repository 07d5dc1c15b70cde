"""The pageserver follows the nodes the CLI creates: slot, streaming, decoding, stop, restart."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from cli.pgbin import pg_binary
from pg15.lsn import parse_lsn
from pg15.pg_control import read_control_file
from tests.neoncli import NeonCli, pgbench, psql


def wal_of(neon: NeonCli, node: str) -> dict[str, Any]:
    info = neon.json("pg", "show", node)["wal"]
    assert isinstance(info, dict)
    return info


def wait_caught_up(neon: NeonCli, node: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        wal = wal_of(neon, node)
        if wal.get("lag_bytes") == 0 and wal.get("ingested_lsn") == wal.get("flushed_lsn"):
            return wal
        assert time.monotonic() < deadline, f"pageserver did not catch up: {wal}"
        time.sleep(0.2)


def node_wal_root(neon: NeonCli, node_id: str) -> Path:
    return neon.home / "storage" / "local" / "pagestore" / "wal" / node_id


def archive_dir(neon: NeonCli, node_id: str) -> Path:
    """The archive of the node's (only) timeline."""
    (timeline_dir,) = node_wal_root(neon, node_id).iterdir()
    return timeline_dir


def assert_complete_segments_identical(archive: Path, pg_wal: Path) -> int:
    complete = sorted(p for p in archive.iterdir() if len(p.name) == 24)
    assert complete, f"no complete segment in {archive}"
    compared = 0
    for seg in complete:
        theirs = pg_wal / seg.name
        if theirs.exists():
            assert seg.read_bytes() == theirs.read_bytes(), f"{seg.name} differs"
            compared += 1
    assert compared > 0
    return compared


def test_create_streams_decodes_and_stop_waits_for_checkpoint(neon: NeonCli) -> None:
    neon.run("pg", "create")
    node = neon.json("pg", "show", "primary1")
    assert node["slot"] == "neon_primary1"
    # The pageserver's receiver connects beside `pg create`, a moment after it returns (a
    # warm `pg show` comes sooner than that moment).
    active = "select count(*) from pg_replication_slots where slot_name='neon_primary1' and active"
    deadline = time.monotonic() + 30
    while psql(node["connstr"], active) != "1":
        assert time.monotonic() < deadline, "the pageserver never took the node's slot"
        time.sleep(0.1)
    pgbench(node["connstr"], "-i", "-s", "1", "-q")
    pgbench(node["connstr"], "-c", "2", "-t", "200")
    wal = wait_caught_up(neon, "primary1")
    assert wal["stream"] == "streaming" and wal["timeline"] == 1
    assert wal["records"] > 2000
    table = neon.run("pg", "list").stdout.splitlines()
    assert table[0].split()[-2:] == ["INGESTED", "LAG"]
    assert table[1].split()[-2:] == [wal["ingested_lsn"], "0B"]
    assert wal["receive_lag_bytes"] == 0
    assert parse_lsn(wal["durable_lsn"]) <= parse_lsn(wal["ingested_lsn"])

    psql(node["connstr"], "select pg_switch_wal()")
    pgbench(node["connstr"], "-c", "1", "-t", "50")
    wait_caught_up(neon, "primary1")
    assert_complete_segments_identical(
        archive_dir(neon, "primary1"), Path(node["datadir"]) / "pg_wal"
    )

    # Stopping returns once the pageserver has decoded the shutdown checkpoint.
    out = neon.run("pg", "stop", "primary1")
    assert "warning" not in out.stderr
    control = read_control_file(Path(node["datadir"]))
    wal = wal_of(neon, "primary1")
    assert parse_lsn(wal["decoded_lsn"]) > control.checkpoint_lsn
    assert wal["lag_bytes"] == 0

    # Starting again reconnects at once and streaming resumes where it stopped.
    neon.run("pg", "start", "primary1")
    psql(node["connstr"], "create table after_restart as select generate_series(1, 5000) a")
    wal2 = wait_caught_up(neon, "primary1", timeout=20)
    assert parse_lsn(wal2["flushed_lsn"]) > parse_lsn(wal["flushed_lsn"])
    assert wal2["records"] > wal["records"]

    # Destroying the node drops what the pageserver kept of it.
    neon.run("pg", "destroy", "--yes", "primary1")
    assert not node_wal_root(neon, "primary1").exists()


def test_pageserver_sigkill_mid_pgbench_loses_nothing(neon: NeonCli) -> None:
    neon.run("pg", "create")
    node = neon.json("pg", "show", "primary1")
    pgbench(node["connstr"], "-i", "-s", "2", "-q")
    bench = subprocess.Popen(
        [pg_binary("pgbench"), "-c", "2", "-T", "6", node["connstr"]],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        time.sleep(2)
        pid = neon.json("pageserver", "status")["pid"]
        os.kill(pid, signal.SIGKILL)
        time.sleep(1.5)
        neon.run("pageserver", "start")
        assert bench.wait(timeout=60) == 0
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
    psql(node["connstr"], "select pg_switch_wal()")
    psql(node["connstr"], "checkpoint")
    wal = wait_caught_up(neon, "primary1")
    assert wal["error"] is None
    compared = assert_complete_segments_identical(
        archive_dir(neon, "primary1"), Path(node["datadir"]) / "pg_wal"
    )
    assert compared >= 2
