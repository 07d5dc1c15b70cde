"""A node whose WAL ingest stopped on an error shows it, and what waits on ingest fails at once.

Real CLI, real PostgreSQL: a byte of archived WAL that the pageserver has not made durable in
its layers yet is flipped while the pageserver is down, so its restart re-reads it and the
decoder stops on the CRC mismatch.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from pathlib import Path

from pg15.lsn import parse_lsn, segment_file_name
from proto.client import call_sync
from tests.neoncli import NeonCli, psql, wait_gone
from tests.pgtest import free_port


def _pageserver_call(neon: NeonCli, method: str, **params: object) -> dict:
    ports = json.loads((neon.home / "pageserver" / "pageserver.ports.json").read_text())
    token = (neon.home / "secrets" / "pageserver.token").read_text().strip()
    result = call_sync("127.0.0.1", ports["proto_port"], method, token=token, **params)
    assert isinstance(result, dict)
    return result


def _wait_ingested(neon: NeonCli, lsn: int) -> dict:
    """Wait (asking the daemon directly: a CLI call costs seconds on a busy machine) until the
    page history holds the record that ends at `lsn`; its timeline info."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        info = _pageserver_call(neon, "timeline.info", node_id="primary1")
        if info["last_record_lsn"] >= lsn:
            return info
        time.sleep(0.05)
    raise AssertionError(f"WAL up to {lsn:X} was not ingested in time")


def _flip_byte(wal_dir: Path, lsn: int, segment_size: int = 16 << 20) -> None:
    name = segment_file_name(1, lsn // segment_size, segment_size)
    (segment,) = [p for p in wal_dir.rglob(name + "*") if p.is_file()]
    with open(segment, "r+b") as f:
        f.seek(lsn % segment_size)
        byte = f.read(1)
        f.seek(lsn % segment_size)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_corrupt_archived_wal_is_shown_and_fails_waiters_fast(neon: NeonCli) -> None:
    neon.run("pg", "create", "--port", str(free_port()))
    c = neon.json("pg", "show", "pgdata1")["connstr"]
    psql(c, "CREATE TABLE t (a int, b text)")
    # The page history flushes every few seconds; a write that a flush did not take yet is
    # re-read from the archive after the kill below (a second try follows a fresh flush).
    for _attempt in range(4):
        before = parse_lsn(psql(c, "SELECT pg_current_wal_insert_lsn()"))
        _wait_ingested(neon, before)
        psql(c, "INSERT INTO t SELECT g, repeat('x', 200) FROM generate_series(1, 2000) g")
        info = _wait_ingested(neon, parse_lsn(psql(c, "SELECT pg_current_wal_insert_lsn()")))
        if info["disk_consistent_lsn"] <= before:
            break
    else:
        raise AssertionError("every write was flushed to the page history at once")
    pid = int((neon.home / "pageserver" / "pageserver.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    wait_gone(pid)
    _flip_byte(neon.home / "storage" / "local" / "pagestore" / "wal" / "primary1", before + 600)

    neon.run("pageserver", "start")
    deadline = time.monotonic() + 30
    while True:
        node = neon.json("pg", "list")[0]
        if node["wal"].get("error") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert node["wal"]["ingest"] == "failed", node["wal"]
    assert node["wal"]["lag_bytes"] > 0, node["wal"]
    error = node["wal"]["error"]
    assert "CRC" in error or "checksum" in error, error
    table = neon.run("pg", "list").stdout
    assert "ingest failed" in table, table
    assert error in table, table
    show = neon.run("pg", "show", "pgdata1").stdout
    assert f"error: {error}" in show and "ingest: failed" in show, show

    ports = json.loads((neon.home / "pageserver" / "pageserver.ports.json").read_text())
    base = f"http://127.0.0.1:{ports['http_port']}"
    with urllib.request.urlopen(f"{base}/v1/status", timeout=10) as resp:
        status = json.loads(resp.read())
    assert status["nodes"][0]["ingest_error"] == error
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    assert 'pageserver_ingest_stopped{node="primary1"} 1' in metrics, metrics
    # The WAL after the damaged record is received but never ingested: /metrics shows it.
    flushed = parse_lsn(node["wal"]["flushed_lsn"])
    ingested = parse_lsn(node["wal"]["ingested_lsn"])
    assert ingested < flushed, node["wal"]
    gauges = {
        line.split("{")[0]: int(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("pageserver_") and '{node="primary1"}' in line
    }
    # Ingest stopped, so its position holds; receiving may have gone on since `pg list`.
    assert gauges["pageserver_wal_ingested_lsn"] == ingested, metrics
    assert gauges["pageserver_wal_flushed_lsn"] >= flushed, metrics
    lag = gauges["pageserver_wal_flushed_lsn"] - ingested
    assert gauges["pageserver_ingest_lag_bytes"] == lag, metrics

    # "At once": within 5 s of what any command costs here (starting Python dominates on a
    # loaded machine), where it used to wait 120 s.
    start = time.monotonic()
    neon.run("snapshot", "list")
    baseline = time.monotonic() - start
    start = time.monotonic()
    line = neon.fail("snapshot", "create", "pgdata1@after")
    assert time.monotonic() - start < baseline + 5
    assert "primary1" in line and error in line, line

    start = time.monotonic()
    proc = neon.run("pg", "stop", "pgdata1", check=False)
    assert time.monotonic() - start < baseline + 10  # the server's own shutdown, then at once
    assert proc.returncode != 0 and error in proc.stderr, proc
    assert "Traceback" not in proc.stderr
