"""`storage.usage` (in `neon storage show --json` as `retained`) on a real node: what it says a
snapshot or PITR area alone keeps is what `pitr gc` then frees when it is destroyed (layer
files, and archived WAL for an area), and a snapshot references what `snapshot list` sizes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pageserver_api.client import SyncPageserverClient
from tests.neoncli import NeonCli, free_port, pgbench


def client(neon: NeonCli) -> SyncPageserverClient:
    status = neon.json("pageserver", "status")
    token = (neon.home / "secrets" / "pageserver.token").read_text().strip()
    return SyncPageserverClient("127.0.0.1", status["proto_port"], token=token)


def retained(neon: NeonCli) -> dict[str, dict[str, Any]]:
    info = neon.json("storage", "show", "local")
    return {r["name"]: r for r in info["retained"]}


def wal_bytes(neon: NeonCli) -> int:
    (wal,) = neon.home.glob("storage/**/pagestore/wal")
    return sum(p.stat().st_size for p in Path(wal).rglob("*") if p.is_file())


def gc(neon: NeonCli) -> int:
    (result,) = client(neon).gc_run()
    return result.removed_bytes


def test_exclusive_bytes_are_what_gc_frees_without_it(neon: NeonCli) -> None:
    # Small layers and no L0 merges: GC has whole files to remove wherever history ends.
    neon.env_extra.update(
        NEON_STORE_CHECKPOINT_DISTANCE=str(1024 * 1024),
        NEON_STORE_COMPACTION_THRESHOLD="1000",
        NEON_GC_INTERVAL="100000",  # no background GC between a measurement and its check
    )
    neon.run("pg", "create", "--port", str(free_port()))
    c = neon.json("pg", "show", "pgdata1")["connstr"]
    neon.run("pitr", "create", "a1", "--pg", "pgdata1")
    pgbench(c, "-i", "-q", "-s", "2")
    neon.run("snapshot", "create", "pgdata1@s1")
    pgbench(c, "-t", "1500", "-c", "2")
    neon.run("snapshot", "create", "pgdata1@s2")
    pgbench(c, "-t", "1500", "-c", "2")
    neon.run("snapshot", "create", "pgdata1@sync")  # ingest has reached the tip
    neon.run("snapshot", "destroy", "pgdata1@sync")
    neon.run("pg", "stop", "pgdata1")  # nothing moves from here on
    gc(neon)  # what is garbage already goes first

    usage = retained(neon)
    assert set(usage) == {"pgdata1@s1", "pgdata1@s2", "a1"}
    sizes = {s["name"]: s["size_bytes"] for s in neon.json("snapshot", "list")}
    for name in ("pgdata1@s1", "pgdata1@s2"):
        assert usage[name]["kind"] == "snapshot"
        assert usage[name]["referenced_bytes"] == sizes[name] > 0
    # The area's window is the whole history: no snapshot keeps anything alone.
    assert usage["pgdata1@s1"]["exclusive_bytes"] == usage["pgdata1@s2"]["exclusive_bytes"] == 0
    area = usage["a1"]
    assert area["kind"] == "pitr area" and area["exclusive_wal_bytes"] > 0
    assert area["exclusive_bytes"] > area["exclusive_wal_bytes"]
    assert area["referenced_bytes"] >= area["exclusive_bytes"]

    wal_before = wal_bytes(neon)
    neon.run("pitr", "destroy", "a1")
    freed = gc(neon)
    assert freed == area["exclusive_bytes"] - area["exclusive_wal_bytes"]
    assert wal_before - wal_bytes(neon) == area["exclusive_wal_bytes"]

    # Now s2 keeps the history between s1 and itself alone, and then s1 what is below it.
    usage = retained(neon)
    s2 = usage["pgdata1@s2"]["exclusive_bytes"]
    assert s2 > 0
    neon.run("snapshot", "destroy", "pgdata1@s2")
    assert gc(neon) == s2
    s1 = retained(neon)["pgdata1@s1"]["exclusive_bytes"]
    assert s1 > 0
    neon.run("snapshot", "destroy", "pgdata1@s1")
    assert gc(neon) == s1
    assert retained(neon) == {}

    text = neon.run("storage", "show", "local").stdout
    assert "kept by" not in text  # nothing keeps anything now
