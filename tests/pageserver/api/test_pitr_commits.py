"""`pitr.commits` (and `neon pitr commits`) on a real node: the transaction records listed are
exactly the transactions done, each with the XID txid_current() gave, inside the LSNs
pg_current_wal_insert_lsn() bracketed it with and the times clock_timestamp() did; around a
point the rows split at it; a point behind megabytes of WAL without a commit still finds
the commits before it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from pageserver_api.client import SyncPageserverClient
from pageserver_api.models import PitrCommitsRequest, XactInfo
from pg15.lsn import format_lsn, parse_lsn
from tests.neoncli import NeonCli, free_port, psql


@dataclass(frozen=True)
class Done:
    kind: str
    xid: int
    after_lsn: int
    """pg_current_wal_insert_lsn() before the record: it starts at or after this."""
    before_lsn: int
    """... and after: it ends at or before this."""
    after_time: datetime
    before_time: datetime
    gid: str | None = None


def bracket(connstr: str, kind: str, sql: str, gid: str | None = None) -> Done:
    """Run one transaction between two readings of the insert LSN and the clock."""
    out = psql(
        connstr,
        "SELECT pg_current_wal_insert_lsn() || '|' || clock_timestamp();\n"
        f"{sql}\n"
        "SELECT pg_current_wal_insert_lsn() || '|' || clock_timestamp();",
    ).splitlines()
    (lsn0, t0), xid, (lsn1, t1) = out[0].split("|"), out[1], out[-1].split("|")
    return Done(
        kind,
        int(xid),
        parse_lsn(lsn0),
        parse_lsn(lsn1),
        datetime.fromisoformat(t0),
        datetime.fromisoformat(t1),
        gid,
    )


def workload(connstr: str) -> list[Done]:
    """Commits, an abort, and two prepared transactions (one committed, one rolled back):
    a PREPARE and its finisher are two records of one XID. The finisher names no GID: it
    carries one only at wal_level=logical (XactLogCommitRecord, xact.c)."""
    done = [
        bracket(c := connstr, "commit", f"BEGIN; INSERT INTO t VALUES ({i}); SELECT "
                "txid_current(); COMMIT;")
        for i in range(3)
    ]  # fmt: skip
    done.append(
        bracket(c, "abort", "BEGIN; INSERT INTO t VALUES (-1); SELECT txid_current(); ROLLBACK;")
    )
    prep = bracket(
        c,
        "prepare",
        "BEGIN; INSERT INTO t VALUES (10); SELECT txid_current(); PREPARE TRANSACTION 'g1';",
        "g1",
    )
    done.append(prep)
    finish = bracket(c, "commit prepared", f"SELECT {prep.xid}; COMMIT PREPARED 'g1';")
    done.append(finish)
    prep2 = bracket(
        c,
        "prepare",
        "BEGIN; INSERT INTO t VALUES (11); SELECT txid_current(); PREPARE TRANSACTION 'g2';",
        "g2",
    )
    done.append(prep2)
    done.append(bracket(c, "abort prepared", f"SELECT {prep2.xid}; ROLLBACK PREPARED 'g2';"))
    done += [
        bracket(c, "commit", f"BEGIN; INSERT INTO t VALUES ({i}); SELECT txid_current(); COMMIT;")
        for i in range(20, 23)
    ]  # fmt: skip
    return done


def client(neon: NeonCli) -> SyncPageserverClient:
    status = neon.json("pageserver", "status")
    token = (neon.home / "secrets" / "pageserver.token").read_text().strip()
    return SyncPageserverClient("127.0.0.1", status["proto_port"], token=token)


def check_row(row: XactInfo, done: Done) -> None:
    assert (row.kind, row.xid, row.gid) == (done.kind, done.xid, done.gid)
    assert done.after_lsn <= row.lsn < row.end_lsn <= done.before_lsn, (row, done)
    assert done.after_time <= row.time <= done.before_time, (row, done)


def test_commits_listed_are_the_transactions_done(neon: NeonCli) -> None:
    neon.run("pg", "create", "--port", str(free_port()))
    connstr = neon.json("pg", "show", "pgdata1")["connstr"]
    # No autovacuum: its ANALYZE would commit transactions of its own in between.
    psql(connstr, "ALTER SYSTEM SET max_prepared_transactions = 5;\n"
         "ALTER SYSTEM SET autovacuum = off;")  # fmt: skip
    neon.run("pg", "stop", "pgdata1")
    neon.run("pg", "start", "pgdata1")
    neon.run("pitr", "create", "area1", "--pg", "pgdata1")  # GC keeps its WAL archived
    psql(connstr, "CREATE TABLE t (a int)")
    done = workload(connstr)

    # The CLI waits for ingest to reach the node's WAL end; around that tip, all of them.
    listing = neon.json("pitr", "commits", "pgdata1", "--limit", "50")
    rows = [XactInfo.from_wire(r) for r in listing["before"]]
    assert listing["after"] == []
    ours = [r for r in rows if r.end_lsn > done[0].after_lsn]
    assert len(ours) == len(done)
    for row, expected in zip(ours, done, strict=True):
        check_row(row, expected)
    assert [r.end_lsn for r in rows] == sorted(r.end_lsn for r in rows)

    # Around the third commit's end: it is the last at or before the point (inclusive).
    api = client(neon)
    point = ours[2].end_lsn
    around = api.pitr_commits(PitrCommitsRequest("primary1", lsn=point, limit=2))
    assert around.point == point
    assert [r.xid for r in around.before] == [done[1].xid, done[2].xid]
    assert [(r.kind, r.xid) for r in around.after] == [
        ("abort", done[3].xid),
        ("prepare", done[4].xid),
    ]
    # One byte before it: the third commit is after the point.
    around = api.pitr_commits(PitrCommitsRequest("primary1", lsn=point - 1, limit=1))
    assert [r.xid for r in around.before] == [done[1].xid]
    assert [r.xid for r in around.after] == [done[2].xid]
    assert around.scanned_from <= ours[1].lsn and around.scanned_to >= ours[2].end_lsn

    # Around a time: the commit time of the second commit maps to its end (as
    # extract-snapshot --time does), and the CLI takes the time as text.
    at = ours[1].time.isoformat()
    listing = neon.json("pitr", "commits", "primary1", "--around", at, "--limit", "1")
    assert listing["point"] == ours[1].end_lsn
    assert [r["xid"] for r in listing["before"]] == [done[1].xid]
    assert [r["xid"] for r in listing["after"]] == [done[2].xid]

    # The text form: a row per record and the point between them.
    out = neon.run(
        "pitr", "commits", "pgdata1", "--around", format_lsn(point), "--limit", "1"
    ).stdout
    lines = out.splitlines()
    assert lines[0].startswith(f"Around {format_lsn(point)}")
    assert lines[1].split() == ["KIND", "END", "LSN", "XID", "TIME", "GID"]
    assert lines[2].split()[:3] == ["commit", format_lsn(point), str(done[2].xid)]
    assert lines[3].split()[:2] == ["---", "point"]
    assert lines[4].split()[:3] == ["abort", format_lsn(ours[3].end_lsn), str(done[3].xid)]

    line = neon.fail("pitr", "commits", "pgdata1", "--around", "noon")
    assert "invalid --around 'noon'" in line


def test_commits_before_a_long_stretch_without_one(neon: NeonCli) -> None:
    """A point after megabytes of WAL of one transaction: the rows before it are found by
    reading back from the index's samples, step by growing step."""
    neon.run("pg", "create", "--port", str(free_port()))
    connstr = neon.json("pg", "show", "pgdata1")["connstr"]
    psql(connstr, "ALTER SYSTEM SET autovacuum = off")
    neon.run("pg", "stop", "pgdata1")
    neon.run("pg", "start", "pgdata1")
    neon.run("pitr", "create", "area1", "--pg", "pgdata1")
    psql(connstr, "CREATE TABLE t (a int); CREATE TABLE big (b text)")
    start = parse_lsn(psql(connstr, "SELECT pg_current_wal_insert_lsn()"))
    psql(connstr, "DO $$ BEGIN FOR i IN 1..300 LOOP INSERT INTO t VALUES (i); COMMIT; "
         "END LOOP; END $$")  # fmt: skip
    loop_end = parse_lsn(psql(connstr, "SELECT pg_current_wal_insert_lsn()"))
    big = bracket(
        connstr,
        "commit",
        "BEGIN; INSERT INTO big SELECT repeat(md5(g::text), 30) FROM generate_series(1, 6000) g;"
        " SELECT txid_current(); COMMIT;",
    )
    assert big.before_lsn - big.after_lsn > 4 * 1024 * 1024
    listing = neon.json("pitr", "commits", "pgdata1", "--limit", "120")
    rows = [XactInfo.from_wire(r) for r in listing["before"]]
    assert len(rows) == 120
    check_row(rows[-1], big)
    loop = rows[:-1]
    assert all(r.kind == "commit" and start < r.end_lsn <= loop_end for r in loop)
    xids = [r.xid for r in loop]
    assert xids == list(range(xids[0], xids[0] + 119)) and xids[-1] == big.xid - 1
    assert listing["scanned_from"] <= loop[0].lsn
