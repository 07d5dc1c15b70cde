"""Issue 6 acceptance: data directories extracted from the page history at any LSN equal what
stock PostgreSQL recovery gives at that LSN, and pass amcheck.

A node is created (its clean initdb state is copied as the oracle's base backup) and runs a
workload in phases. After each phase the flush LSN and `pg_dump` of every database are kept.
For each phase, `pitr extract-snapshot --lsn` + `snapshot start` give the same dumps; for
random record boundaries in between, the extracted state equals stock PostgreSQL recovery of
the same WAL with `recovery_target_lsn` (exclusive, so exactly the records that end at or
before the target are applied, like ours), and amcheck finds nothing. Then the pageserver is
restarted with NEON_PURE_PYTHON=1 (no C extension loaded: its reads, redo, tar and ingest of
what its layers do not hold yet in Python) and extracts the first random target again: equal
to the same stock recovery's dumps, amcheck clean.
"""

from __future__ import annotations

import difflib
import json
import os
import random
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from cli import postmaster
from cli.pgbin import pg_binary
from datadir_files.pg_account import pg_os_user
from pageserver.redo.native import redo as native_redo
from pg15.lsn import format_lsn, parse_lsn
from tests.neoncli import NeonCli, psql
from tests.pgtest import free_port
from tests.pure_python import PURE_ENV, mapped_extensions

pytestmark = pytest.mark.slow

PHASES = [
    # 1: pgbench and every index type
    """
    CREATE EXTENSION IF NOT EXISTS amcheck;
    CREATE TABLE docs (id serial PRIMARY KEY, tags int[], body text, pt point, r int4range);
    INSERT INTO docs (tags, body, pt, r)
    SELECT ARRAY[g % 13, g % 4], repeat(md5(g::text), 1 + g % 30), point(g % 50, g % 70),
           int4range(g, g + 5) FROM generate_series(1, 3000) g;
    CREATE INDEX ON docs USING gin (tags);
    CREATE INDEX ON docs USING gist (pt);
    CREATE INDEX ON docs USING spgist (r);
    CREATE INDEX ON docs USING hash (id);
    CREATE INDEX ON docs USING brin (id);
    CREATE INDEX ON docs (body);
    CREATE SEQUENCE seq1; SELECT nextval('seq1') FROM generate_series(1, 40);
    """,
    # 2: databases, TRUNCATE, VACUUM FULL, updates and deletes
    """
    CREATE DATABASE walloged STRATEGY wal_log;
    CREATE DATABASE copied STRATEGY file_copy;
    DROP DATABASE copied;
    UPDATE docs SET body = 'x' WHERE id % 5 = 0;
    DELETE FROM docs WHERE id % 11 = 0;
    CREATE TABLE scratch AS SELECT generate_series(1, 2000) a;
    TRUNCATE scratch;
    INSERT INTO scratch SELECT generate_series(1, 300);
    VACUUM FULL docs;
    VACUUM pgbench_accounts;
    """,
    # 3: two-phase commit left prepared
    """
    BEGIN; INSERT INTO scratch VALUES (-7); PREPARE TRANSACTION 'left_prepared';
    BEGIN; INSERT INTO scratch VALUES (-8); PREPARE TRANSACTION 'committed';
    COMMIT PREPARED 'committed';
    INSERT INTO docs (body) SELECT 'late ' || g FROM generate_series(1, 500) g;
    """,
]


def dump_all(connstr: str) -> dict[str, str]:
    dbs = psql(connstr, "SELECT datname FROM pg_database WHERE datallowconn ORDER BY 1")
    out = {}
    for db in dbs.splitlines():
        conn = connstr.replace("dbname=postgres", f"dbname={db}")
        proc = subprocess.run(
            [pg_binary("pg_dump"), "-d", conn, "--no-sync"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        # pg_dump 15.18+ adds \restrict lines with a random key.
        out[db] = re.sub(r"^\\(un)?restrict .*$", "", proc.stdout, flags=re.M)
    return out


def assert_same_dumps(ours: dict[str, str], theirs: dict[str, str], what: str) -> None:
    assert sorted(ours) == sorted(theirs), f"{what}: databases differ"
    for db in theirs:
        if ours[db] != theirs[db]:
            diff = difflib.unified_diff(
                theirs[db].splitlines(),
                ours[db].splitlines(),
                "expected",
                "extracted",
                lineterm="",
                n=1,
            )
            raise AssertionError(f"{what}: pg_dump of {db} differs:\n" + "\n".join(list(diff)[:40]))


_SETVAL = re.compile(r"^(SELECT pg_catalog\.setval\('[^']+', )(\d+)(, \w+\);)$", re.M)


def mask_setval(dumps: dict[str, str]) -> dict[str, str]:
    return {db: _SETVAL.sub(r"\1N\3", text) for db, text in dumps.items()}


def assert_sequences_ahead(extracted: dict[str, str], live: dict[str, str]) -> None:
    for db, text in live.items():
        theirs = {m.group(1): int(m.group(2)) for m in _SETVAL.finditer(text)}
        ours = {m.group(1): int(m.group(2)) for m in _SETVAL.finditer(extracted[db])}
        assert ours.keys() == theirs.keys()
        for name, value in theirs.items():
            assert value <= ours[name] <= value + 32, f"{db} {name}: {ours[name]} vs {value}"


def amcheck(connstr: str) -> None:
    for db in psql(connstr, "SELECT datname FROM pg_database WHERE datallowconn").splitlines():
        if psql(connstr, "SELECT count(*) FROM pg_extension WHERE extname='amcheck'", db) != "1":
            continue
        psql(
            connstr,
            """
            SELECT bt_index_check(c.oid, true) FROM pg_index i
            JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am a ON a.oid = c.relam
            WHERE a.amname = 'btree' AND c.relpersistence = 'p';
        """,
            db,
        )
        bad = psql(
            connstr,
            """
            SELECT count(*) FROM pg_class c, LATERAL verify_heapam(c.oid)
            WHERE c.relkind IN ('r', 'm', 't') AND c.relpersistence = 'p';
        """,
            db,
        )
        assert bad == "0", f"verify_heapam found {bad} problems in {db}"


def extract(neon: NeonCli, lsn: int, tag: str) -> tuple[str, int]:
    out = json.loads(
        neon.run(
            "pitr", "extract-snapshot", "area", "--lsn", format_lsn(lsn), "--as", tag, "--json"
        ).stdout
    )
    started = json.loads(neon.run("snapshot", "start", f"pgdata1@{tag}", "--json").stdout)
    return started["connstr"], int(out["lsn"])


class Oracle:
    """Stock PostgreSQL recovery of a base copy to a target LSN, with our archived WAL."""

    def __init__(
        self, base: Path, archive: Path, work: Path, locations: tuple[Path, ...] = ()
    ) -> None:
        self.base, self.archive, self.work = base, archive, work
        self.locations = locations
        """Absolute tablespace locations the WAL creates: stock recovery replays into them
        (CREATE TABLESPACE's symlink), so each recovery starts them empty. Left as the node
        (or an earlier oracle) had them, a relation file there holds pages from after the
        target (the node runs with wal_log_hints, so even its FSM pages carry later LSNs) and
        the end-of-recovery checkpoint fails with "xlog flush request ... is not satisfied"."""

    def recover_to(self, lsn: int) -> tuple[Path, str]:
        for location in self.locations:
            for entry in location.iterdir():
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        datadir = self.work / f"oracle-{lsn:X}"
        subprocess.run(["cp", "-a", str(self.base), str(datadir)], check=True)
        port = free_port()
        sock = self.work / "sock"
        postmaster.write_config(
            datadir,
            {
                "port": port,
                "listen_addresses": "127.0.0.1",
                "unix_socket_directories": str(sock),
                "logging_collector": False,
                "restore_command": f"cp {self.archive}/%f %p",
                "recovery_target_lsn": format_lsn(lsn),
                "recovery_target_inclusive": False,
                "recovery_target_action": "promote",
                "max_prepared_transactions": 10,
                "allow_in_place_tablespaces": True,  # its replayed in-place tablespaces
            },
            ["local all all trust"],
        )
        (datadir / "recovery.signal").touch()
        postmaster.give_to_pg_user(datadir / "recovery.signal")
        log = self.work / f"oracle-{lsn:X}.log"
        postmaster.start(datadir, log, timeout=120)
        deadline = time.monotonic() + 60
        conn = f"host={sock} port={port} user=neon dbname=postgres"
        try:
            while psql(conn, "SELECT pg_is_in_recovery()") != "f":
                assert time.monotonic() < deadline, "oracle did not finish recovery"
                time.sleep(0.2)
        except AssertionError as exc:  # the oracle's own words say why
            tail = "".join(log.read_text(errors="replace").splitlines(True)[-15:])
            raise AssertionError(f"{exc}\noracle log {log}:\n{tail}") from None
        return datadir, conn


def archive_wal(neon: NeonCli, node: dict[str, str], work: Path) -> Path:
    """A copy of the node's archived WAL that PostgreSQL's account can read (restore_command)."""
    history_wal = Path(node["datadir"]).parent / "pagestore" / "wal" / "primary1"
    (timeline_wal,) = history_wal.iterdir()
    archive = work / "wal"
    shutil.copytree(timeline_wal, archive)
    user = pg_os_user()
    if user is not None:
        for path in [archive, *archive.iterdir()]:
            os.chown(path, user.uid, user.gid)
    return archive


def compare_random_targets(
    neon: NeonCli, oracle: Oracle, start: int, n: int, seed: int
) -> dict[int, dict[str, str]]:
    """Extract at `n` random record boundaries after `start`; each equals stock recovery
    (its dumps, by target, are returned)."""
    records = [
        json.loads(line)
        for line in neon.run("waldump", "--json", str(oracle.archive)).stdout.splitlines()
    ]
    candidates = [r["lsn"] for r in records if parse_lsn(r["lsn"]) > max(start, 0x1600000)]
    recovered = {}
    for i, target_text in enumerate(random.Random(seed).sample(candidates, n)):
        target = parse_lsn(target_text)
        ours, snapped = extract(neon, target, f"rand{i}")
        try:
            assert snapped <= target
            odir, theirs = oracle.recover_to(target)
            try:
                recovered[target] = dump_all(theirs)
                assert_same_dumps(dump_all(ours), recovered[target], f"state at {target_text}")
                amcheck(ours)
            finally:
                postmaster.stop(odir, "immediate")
                shutil.rmtree(odir, ignore_errors=True)
        finally:
            neon.run("snapshot", "stop", f"pgdata1@rand{i}")
    return recovered


def compare_pure_python(neon: NeonCli, recovered: dict[int, dict[str, str]]) -> None:
    """The pageserver restarted with every C fast path off extracts the first target again:
    the same stock recovery's dumps, amcheck clean."""
    pidfile = neon.home / "pageserver" / "pageserver.pid"
    c_daemon = mapped_extensions(int(pidfile.read_text().split()[0]))
    assert ("pageserver.redo._redo" in c_daemon) == (native_redo is not None), c_daemon
    neon.run("pageserver", "stop")
    pure = NeonCli(neon.home, {**neon.env_extra, **PURE_ENV})
    target, theirs = next(iter(recovered.items()))
    ours, _snapped = extract(pure, target, "pure")
    try:
        assert not mapped_extensions(int(pidfile.read_text().split()[0]))
        assert_same_dumps(dump_all(ours), theirs, f"pure Python, state at {format_lsn(target)}")
        amcheck(ours)
    finally:
        pure.run("snapshot", "stop", "pgdata1@pure")


def start_node_with_oracle_base(neon: NeonCli) -> tuple[dict[str, str], Path, Path]:
    """A node whose clean initdb state is copied as the oracle's base backup, then started
    with a PITR area `area`: (its `pg show`, the oracle's work directory, the base copy)."""
    neon.run("pg", "create", "--no-start", "--port", str(free_port()))
    node = neon.json("pg", "show", "pgdata1")
    work = neon.home.parent / "oracle"  # PostgreSQL's account enters it (tmp_path is 0700)
    postmaster.make_pg_dir(work, 0o711)
    postmaster.make_pg_dir(work / "sock", 0o700)
    base = work / "base"
    subprocess.run(["cp", "-a", node["datadir"], str(base)], check=True)
    (base / "postmaster.pid").unlink(missing_ok=True)
    neon.run("pg", "start", "pgdata1")
    psql(node["connstr"], "ALTER SYSTEM SET max_prepared_transactions = 10")
    neon.run("pg", "stop", "pgdata1")
    neon.run("pg", "start", "pgdata1")
    neon.run("pitr", "create", "area", "--pg", "pgdata1", "--ttl", "inf")
    return node, work, base


def test_extracted_states_equal_stock_recovery(neon: NeonCli, tmp_path: Path) -> None:
    node, work, base = start_node_with_oracle_base(neon)
    conn = node["connstr"]

    subprocess.run(
        [pg_binary("pgbench"), "-i", "-s", "1", "-q", conn], check=True, capture_output=True
    )
    subprocess.run(
        [pg_binary("pgbench"), "-c", "2", "-t", "200", conn], check=True, capture_output=True
    )
    phases: list[tuple[int, dict[str, str]]] = []
    for sql in PHASES:
        psql(conn, sql)
        # An in-flight transaction at the cut: its rows must not appear.
        inflight = subprocess.Popen(
            [
                pg_binary("psql"),
                conn,
                "-X",
                "-q",
                "-c",
                "BEGIN; INSERT INTO pgbench_history VALUES (1,1,1,42,now(),'inflight');"
                "SELECT pg_sleep(3); COMMIT;",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)
        lsn = parse_lsn(psql(conn, "SELECT pg_current_wal_flush_lsn()"))
        phases.append((lsn, dump_all(conn)))
        inflight.wait(timeout=30)
    psql(conn, "SELECT pg_switch_wal(); CHECKPOINT;")
    time.sleep(1)

    for i, (lsn, dumps) in enumerate(phases):
        ours, _snapped = extract(neon, lsn, f"phase{i}")
        try:
            # Against the live server's dump, sequences are the one expected difference:
            # WAL (hence any recovery, PostgreSQL's too) holds values up to 32 calls ahead.
            extracted = dump_all(ours)
            assert_sequences_ahead(extracted, dumps)
            assert_same_dumps(mask_setval(extracted), mask_setval(dumps), f"phase {i}")
            assert "left_prepared" not in dumps  # (pg_dump never shows prepared xacts)
        finally:
            neon.run("snapshot", "stop", f"pgdata1@phase{i}")

    # Random record boundaries between the phases, against stock recovery.
    archive = archive_wal(neon, node, work)
    oracle = Oracle(base, archive, work)
    compare_pure_python(neon, compare_random_targets(neon, oracle, phases[0][0] - 2_000_000, 3, 7))

    # Outside the area: a clear error with its bounds.
    err = neon.fail("pitr", "extract-snapshot", "area", "--lsn", "0/100")
    assert "outside" in err and "area" in err


TABLESPACE_PHASES = [
    # 1: an in-place and an absolute tablespace with tables and indexes of several kinds
    """
    CREATE EXTENSION IF NOT EXISTS amcheck;
    SET allow_in_place_tablespaces = on;
    CREATE TABLESPACE ts_here LOCATION '';
    CREATE TABLESPACE ts_far LOCATION '{far}';
    CREATE TABLE near (id int PRIMARY KEY, t text) TABLESPACE ts_here;
    INSERT INTO near SELECT g, md5(g::text) FROM generate_series(1, 3000) g;
    CREATE INDEX near_t ON near (t) TABLESPACE ts_far;
    CREATE TABLE far (id int, v int[], pt point) TABLESPACE ts_far;
    INSERT INTO far SELECT g, ARRAY[g % 7, g % 11], point(g % 40, g % 30)
      FROM generate_series(1, 2000) g;
    CREATE INDEX far_v ON far USING gin (v) TABLESPACE ts_here;
    CREATE INDEX far_pt ON far USING gist (pt) TABLESPACE ts_far;
    """,
    # 2: databases in them (both strategies), a table moved, updates, VACUUM, TRUNCATE
    """
    CREATE DATABASE far_db TABLESPACE ts_far;
    CREATE DATABASE here_db STRATEGY file_copy TABLESPACE ts_here;
    ALTER TABLE near SET TABLESPACE ts_far;
    UPDATE far SET v = v || 99 WHERE id % 3 = 0;
    DELETE FROM far WHERE id % 13 = 0;
    VACUUM far;
    CREATE TABLE scratch TABLESPACE ts_here AS SELECT generate_series(1, 900) a;
    TRUNCATE scratch;
    INSERT INTO scratch SELECT generate_series(1, 90);
    """,
    # 3: everything leaves ts_far, which is dropped
    """
    DROP DATABASE far_db;
    DROP TABLE far;
    ALTER TABLE near SET TABLESPACE pg_default;
    ALTER INDEX near_t SET TABLESPACE ts_here;
    DROP TABLESPACE ts_far;
    INSERT INTO scratch SELECT generate_series(1000, 1100);
    """,
]


def test_extracted_states_with_tablespaces_equal_stock_recovery(neon: NeonCli) -> None:
    """The same check on a node with an in-place and an absolute tablespace, up to and past
    DROP TABLESPACE; the extracted servers have them in place (pg_tblspc/OID directories)."""
    node, work, base = start_node_with_oracle_base(neon)
    conn = node["connstr"]
    far = work / "far"
    postmaster.make_pg_dir(far, 0o700)
    phases: list[tuple[int, dict[str, str]]] = []
    for sql in TABLESPACE_PHASES:
        psql(conn, sql.format(far=far))
        lsn = parse_lsn(psql(conn, "SELECT pg_current_wal_flush_lsn()"))
        phases.append((lsn, dump_all(conn)))
    psql(conn, "SELECT pg_switch_wal(); CHECKPOINT;")
    # Stock recovery of CREATE TABLESPACE empties the location's PG_15 directory: the node
    # that owns it must be stopped before an oracle replays it.
    neon.run("pg", "stop", "pgdata1")

    for i, (lsn, dumps) in enumerate(phases):
        ours, _snapped = extract(neon, lsn, f"phase{i}")
        try:
            assert_same_dumps(dump_all(ours), dumps, f"phase {i}")
            spaces = psql(
                ours,
                "SELECT spcname, pg_tablespace_location(oid) FROM pg_tablespace "
                "WHERE spcname LIKE 'ts\\_%' ORDER BY 1",
            ).splitlines()
            assert [row.split("|")[0] for row in spaces] == (
                ["ts_far", "ts_here"] if i < 2 else ["ts_here"]
            )
            assert all(row.split("|")[1].startswith("pg_tblspc/") for row in spaces), spaces
            amcheck(ours)
        finally:
            neon.run("snapshot", "stop", f"pgdata1@phase{i}")

    oracle = Oracle(base, archive_wal(neon, node, work), work, locations=(far,))
    compare_pure_python(neon, compare_random_targets(neon, oracle, phases[0][0] - 300_000, 4, 11))
