"""The pagestore as the daemon runs it: a real node streams into the pageserver; pages read
through proto (GetPage@LSN) equal the node's own files at checkpoints, before and after a
SIGKILL of the pageserver in the middle of ingest."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from cli.pgbin import pg_binary
from pageserver.ingest.import_datadir import record_end_lsn
from pg15.pg_control import read_control_file
from pg15.rmgr.xlog import CHECKPOINT_RECORD_SIZE
from proto.client import ProtoClient
from tests.neoncli import NeonCli, pgbench, psql
from tests.page_compare import fork_pages, masked_page, relation_files, relation_kinds

WORKLOAD = """
CREATE EXTENSION IF NOT EXISTS btree_gist;
CREATE TABLE docs (id serial PRIMARY KEY, tags int[], body text, pt point, rng int4range);
INSERT INTO docs (tags, body, pt, rng)
SELECT ARRAY[g % 17, g % 5], repeat(md5(g::text), 1 + g % 40), point(g % 97, g % 89),
       int4range(g, g + 10)
FROM generate_series(1, 4000) g;
CREATE INDEX docs_tags ON docs USING gin (tags);
CREATE INDEX docs_pt ON docs USING gist (pt);
CREATE INDEX docs_rng ON docs USING spgist (rng);
CREATE INDEX docs_hash ON docs USING hash (id);
CREATE INDEX docs_brin ON docs USING brin (id) WITH (pages_per_range = 2);
UPDATE docs SET body = 'short' WHERE id % 3 = 0;
DELETE FROM docs WHERE id % 7 = 0;
VACUUM docs;
CREATE TABLE scratch AS SELECT generate_series(1, 3000) AS a;
TRUNCATE scratch;
INSERT INTO scratch SELECT generate_series(1, 500);
VACUUM FULL pgbench_history;
CREATE SEQUENCE s1;
SELECT nextval('s1') FROM generate_series(1, 50);
CREATE DATABASE d_wal STRATEGY wal_log;
CREATE DATABASE d_copy STRATEGY file_copy;
DROP DATABASE d_copy;
BEGIN; INSERT INTO scratch VALUES (-1); PREPARE TRANSACTION 'tx1';
COMMIT PREPARED 'tx1';
"""


def stop_at_checkpoint(neon: NeonCli, node: str, datadir: Path) -> int:
    """Stop the node cleanly: its files then hold exactly the state at the end of the
    shutdown checkpoint, with no session left to prune or set hint bits behind our back."""
    neon.run("pg", "stop", node)
    control = read_control_file(datadir)
    return record_end_lsn(control.checkpoint_lsn, CHECKPOINT_RECORD_SIZE, control.wal_segment_size)


def copy_files(datadir: Path, dbs: dict[str, int]) -> dict[int, dict[tuple[int, int], list[bytes]]]:
    """Every fork's pages of the given databases, read while the server is idle."""
    return {
        oid: {k: fork_pages(v) for k, v in relation_files(datadir / "base" / str(oid)).items()}
        for oid in dbs.values()
    }


Pages = dict[tuple[int, int, int], bytes]


async def read_pages(
    neon: NeonCli, node: str, db: int, lsn: int, files: dict[tuple[int, int], list[bytes]]
) -> Pages:
    status = neon.json("pageserver", "status")
    token = (neon.home / "secrets" / "pageserver.token").read_text().strip()
    pages: dict[tuple[int, int, int], bytes] = {}
    async with await ProtoClient.connect("127.0.0.1", status["proto_port"], token=token) as c:
        for (rel, fork), theirs in sorted(files.items()):
            if fork != 0 or (rel, 3) in files:
                continue  # main forks of logged relations (FSM/VM/unlogged: see fidelity test)
            size = await c.call(
                "rel.size", node_id=node, spc=1663, db=db, rel=rel, fork=0, lsn=lsn, wait_timeout=60
            )
            assert size["nblocks"] == len(theirs), f"rel {db}/{rel}: size differs"
            for blkno in range(len(theirs)):
                got = await c.call(
                    "page.get",
                    node_id=node,
                    spc=1663,
                    db=db,
                    rel=rel,
                    fork=0,
                    blkno=blkno,
                    lsn=lsn,
                    wait_timeout=60,
                )
                pages[(db, rel, blkno)] = bytes(got["page"])
    return pages


def compare(
    ours: dict[tuple[int, int, int], bytes],
    files: dict[int, Any],
    kinds: dict[tuple[int, int, int], str],
) -> int:
    compared = 0
    for (db, rel, blkno), page in ours.items():
        theirs = files[db][(rel, 0)][blkno]
        kind = kinds.get((1663, db, rel), "heap")
        if kind == "sequence":
            continue  # WAL carries the value 32 calls ahead (see the fidelity test)
        assert masked_page(kind, page, blkno) == masked_page(kind, theirs, blkno), (
            f"rel {db}/{rel} ({kind}) blk {blkno} differs"
        )
        compared += 1
    return compared


def test_pages_through_the_daemon_equal_the_files(neon: NeonCli) -> None:
    neon.run("pg", "create")
    node = neon.json("pg", "show", "primary1")
    conn = node["connstr"]
    datadir = Path(node["datadir"])
    psql(
        conn,
        "ALTER SYSTEM SET wal_consistency_checking = 'all';"
        "ALTER SYSTEM SET max_prepared_transactions = 5;",
    )
    neon.run("pg", "stop", "primary1")
    neon.run("pg", "start", "primary1")
    pgbench(conn, "-i", "-s", "1", "-q")
    pgbench(conn, "-c", "2", "-t", "150")
    psql(conn, WORKLOAD)
    dbs = {
        name: int(oid)
        for name, oid in (
            line.split("|")
            for line in psql(
                conn, "SELECT datname, oid FROM pg_database WHERE datname IN ('postgres','d_wal')"
            ).splitlines()
        )
    }
    kinds: dict[tuple[int, int, int], str] = {}
    for name, oid in dbs.items():
        kinds.update(relation_kinds(lambda sql, d=name: psql(conn, sql, d), oid))
    docs = int(psql(conn, "SELECT pg_relation_filenode('docs')"))
    lsn1 = stop_at_checkpoint(neon, "primary1", datadir)
    files1 = copy_files(datadir, dbs)

    before: dict[tuple[int, int, int], bytes] = {}
    for oid in dbs.values():
        before.update(asyncio.run(read_pages(neon, "primary1", oid, lsn1, files1[oid])))
    assert compare(before, files1, kinds) > 500
    size = neon.run("debug", "rel-size", "primary1", f"1663/{dbs['postgres']}/{docs}").stdout
    assert int(size) == len(files1[dbs["postgres"]][(docs, 0)])

    # SIGKILL the pageserver while it ingests a pgbench run, then start it again.
    neon.run("pg", "start", "primary1")
    bench = subprocess.Popen(
        [pg_binary("pgbench"), "-c", "2", "-T", "5", conn],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        time.sleep(2)
        os.kill(neon.json("pageserver", "status")["pid"], signal.SIGKILL)
        time.sleep(0.5)
        neon.run("pageserver", "start")
        assert bench.wait(timeout=60) == 0
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
    lsn2 = stop_at_checkpoint(neon, "primary1", datadir)
    pg = dbs["postgres"]
    files2 = copy_files(datadir, {"postgres": pg})
    after2 = asyncio.run(read_pages(neon, "primary1", pg, lsn2, files2[pg]))
    assert compare(after2, files2, kinds) > 100
    # The reads at the first checkpoint give the same bytes after the crash.
    again = asyncio.run(read_pages(neon, "primary1", pg, lsn1, files1[pg]))
    assert again == {k: v for k, v in before.items() if k[0] == pg}
