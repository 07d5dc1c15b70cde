"""`neon snapshot diff` through the real CLI on one node: snapshot A, a workload of inserts,
updates (to NULL, to TOASTed values), deletes, a table without a primary key, CREATE, DROP,
TRUNCATE, an added column and a dropped index, snapshot B.

--stat is checked against the two snapshots' extracted data directories compared file by file
(the pages that differ, per relation file) and against pg_relation_size; --schema and --data
against what the workload did."""

from __future__ import annotations

import csv
import io
import shutil
import tarfile
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.neoncli import NeonCli, free_port, psql
from tests.pgtest import pg_reachable_tmpdir

A, B = "pgdata1@a", "pgdata1@b"
PAGE = 8192
FORKS = {"": "main", "_fsm": "fsm", "_vm": "vm", "_init": "init"}

SETUP = """
CREATE TABLE keep (id int PRIMARY KEY, v text);
CREATE INDEX keep_v ON keep (v);
INSERT INTO keep SELECT g, md5(g::text) FROM generate_series(1, 2000) g;
CREATE TABLE ins (id int PRIMARY KEY, v text);
CREATE INDEX ins_v ON ins (v);
INSERT INTO ins SELECT g, md5(g::text) FROM generate_series(1, 500) g;
CREATE TABLE upd (id int PRIMARY KEY, v text, n int);
INSERT INTO upd SELECT g, md5(g::text), g FROM generate_series(1, 500) g;
CREATE TABLE del (id int PRIMARY KEY, v text);
CREATE INDEX del_v ON del (v);
INSERT INTO del SELECT g, md5(g::text) FROM generate_series(1, 500) g;
CREATE TABLE toasty (id int PRIMARY KEY, doc text);
ALTER TABLE toasty ALTER COLUMN doc SET STORAGE EXTERNAL;
INSERT INTO toasty SELECT g, repeat(md5(g::text), 200) FROM generate_series(1, 20) g;
CREATE TABLE nopk (a int, b text);
INSERT INTO nopk SELECT g % 10, 'x' || (g % 7) FROM generate_series(1, 100) g;
CREATE TABLE gone (id int PRIMARY KEY);
INSERT INTO gone SELECT generate_series(1, 300);
CREATE TABLE trunc (id int PRIMARY KEY);
INSERT INTO trunc SELECT generate_series(1, 400);
CREATE TABLE tk (k text COLLATE "und-x-icu" PRIMARY KEY, v int);
INSERT INTO tk VALUES ('a', 1), ('B', 2), ('é', 3), ('Z', 4), ('ä', 5), ('10', 6), ('9', 7);
DO $$ DECLARE t text; BEGIN
  FOR t IN SELECT relname FROM pg_class
           WHERE relkind = 'r' AND relnamespace = 'public'::regnamespace
  LOOP EXECUTE format('ALTER TABLE %I SET (autovacuum_enabled = off)', t); END LOOP;
END $$;
"""

WORKLOAD = """
INSERT INTO ins SELECT g, md5(g::text) FROM generate_series(501, 800) g;
UPDATE upd SET v = NULL WHERE id <= 30;
UPDATE upd SET n = -n WHERE id > 480;
DELETE FROM del WHERE id % 10 = 0;
DROP INDEX del_v;
UPDATE toasty SET doc = repeat('changed' || id, 900) WHERE id <= 5;
INSERT INTO toasty SELECT g, repeat(md5(g::text), 300) FROM generate_series(21, 23) g;
INSERT INTO nopk SELECT 1, 'x1' FROM generate_series(1, 10);
DELETE FROM nopk WHERE ctid IN (SELECT ctid FROM nopk WHERE a = 3 LIMIT 5);
DROP TABLE gone;
TRUNCATE trunc;
ALTER TABLE upd ADD COLUMN extra int;
INSERT INTO tk VALUES ('Ω', 8), ('b', 9);
DELETE FROM tk WHERE k = 'é';
UPDATE tk SET v = -v WHERE k IN ('a', 'Z');
CREATE TABLE newt (id int PRIMARY KEY, label text);
INSERT INTO newt SELECT g, 'label ' || g FROM generate_series(1, 1000) g;
"""


@pytest.fixture(scope="module")
def home() -> Iterator[NeonCli]:
    base = pg_reachable_tmpdir("neon-diff-")
    neon = NeonCli(base / "home", {})
    try:
        neon.run("pg", "create", "--port", str(free_port()))
        connstr = str(neon.json("pg", "show", "pgdata1")["connstr"])
        psql(connstr, SETUP)
        neon.run("snapshot", "create", A)
        psql(connstr, WORKLOAD)
        # A table made by a transaction still open at B: its pages are in B, its catalog
        # rows are not visible there (the CLOG says in progress).
        with psycopg.connect(connstr) as pending:
            pending.execute("CREATE TABLE pending (id int)")
            pending.execute("INSERT INTO pending SELECT generate_series(1, 500)")
            psql(connstr, "SELECT txid_current()")  # a commit: WAL flushed up to here
            neon.run("snapshot", "create", B)
            pending.rollback()
        yield neon
    finally:
        neon.cleanup()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def connstr(home: NeonCli) -> str:
    return str(home.json("pg", "show", "pgdata1")["connstr"])


def _relation_pages(home: NeonCli, snapshot: str, out: Path) -> dict[tuple[int, int, str], bytes]:
    """(db, relfilenode, fork) -> file contents of the snapshot's extracted data directory."""
    tar_path = out / f"{snapshot.replace('@', '_')}.tar"
    home.run("snapshot", "export", snapshot, "--format", "tar", "-o", str(tar_path))
    files: dict[tuple[int, int, str], bytes] = defaultdict(bytes)
    with tarfile.open(tar_path) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            parts = member.name.split("/")
            if not member.isfile():
                continue
            if parts[0] == "base" and len(parts) == 3:
                db, name = int(parts[1]), parts[2]
            elif parts[0] == "global" and len(parts) == 2:
                db, name = 0, parts[1]
            else:
                continue
            stem, _dot, _segment = name.partition(".")
            node, _sep, fork = stem.partition("_")
            if not node.isdigit():
                continue
            data = tar.extractfile(member)
            assert data is not None
            files[(db, int(node), FORKS["_" + fork if fork else ""])] += data.read()
    return files


@pytest.fixture(scope="module")
def file_diff(home: NeonCli) -> dict[tuple[int, int, str], int]:
    """Pages that differ per relation fork file between the two extracted directories."""
    out = pg_reachable_tmpdir("neon-diff-out-")
    try:
        before, after = _relation_pages(home, A, out), _relation_pages(home, B, out)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    changed = {}
    for ident in before.keys() | after.keys():
        x, y = before.get(ident, b""), after.get(ident, b"")
        pages = max(len(x), len(y)) // PAGE
        n = sum(x[i * PAGE : (i + 1) * PAGE] != y[i * PAGE : (i + 1) * PAGE] for i in range(pages))
        if n:
            changed[ident] = n
    return changed


@pytest.fixture(scope="module")
def stat(home: NeonCli) -> dict[str, Any]:
    return dict(home.json("snapshot", "diff", A, B, "--stat"))


def _by_name(stat: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    named: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in stat["relations"]:
        named[f"{r['schema']}.{r['name']}"].append(r)
    return named


def test_stat_pages_equal_the_extracted_directories_compared_file_by_file(
    stat: dict[str, Any], file_diff: dict[tuple[int, int, str], int]
) -> None:
    reported = {
        (r["db"], r["relfilenode"], fork["fork"]): fork["pages_changed"]
        for r in stat["relations"]
        for fork in r["forks"]
        if fork["pages_changed"]
    }
    assert reported == file_diff
    assert stat["pages_changed"] == sum(file_diff.values())
    assert stat["bytes_changed"] == PAGE * sum(file_diff.values())


def test_stat_names_exactly_the_touched_relations(stat: dict[str, Any], connstr: str) -> None:
    named = _by_name(stat)
    user = {name for name in named if name.startswith("public.")}
    touched = {
        "public.ins", "public.ins_pkey", "public.ins_v",
        "public.upd",
        "public.del", "public.del_v",  # pages of the deleted rows; the dropped index
        "public.toasty", "public.toasty_pkey",
        "public.nopk",
        "public.gone", "public.gone_pkey",
        "public.trunc", "public.trunc_pkey",
        "public.newt", "public.newt_pkey",
        "public.tk", "public.tk_pkey",
    }  # fmt: skip
    # Updated rows that do not fit their page (not HOT) add entries to upd_pkey.
    assert touched <= user <= touched | {"public.upd_pkey"}
    assert not any(n.startswith("public.keep") for n in named)
    (pending,) = named["None.None"]  # not committed at B: no visible catalog row names it
    assert (pending["kind"], pending["change"], pending["table"]) == ("relation", "created", None)
    assert pending["pages_after"] == 3
    toast = {r["table"]: r for r in stat["relations"] if r["kind"] == "toast table"}
    assert toast.keys() == {"public.toasty", "public.newt"}  # newt's is new and empty
    assert toast["public.toasty"]["change"] == "modified"
    assert toast["public.toasty"]["schema"] == "pg_toast"
    assert all(r["database"] == "postgres" for r in named["public.ins"])
    assert {r["table"] for r in named["public.ins_v"]} == {"public.ins"}
    assert named["public.ins_v"][0]["kind"] == "index"
    assert [r["change"] for r in named["public.gone"]] == ["dropped"]
    assert [r["change"] for r in named["public.del_v"]] == ["dropped"]
    assert [r["change"] for r in named["public.newt"]] == ["created"]
    # TRUNCATE gives the table a new relfilenode: the old one dropped, the new one created.
    assert sorted(r["change"] for r in named["public.trunc"]) == ["created", "dropped"]


def test_stat_page_counts_match_postgres(stat: dict[str, Any], connstr: str) -> None:
    for name in ("newt", "newt_pkey", "ins", "ins_v"):
        (relation,) = [r for r in stat["relations"] if r["name"] == name]
        main = {f["fork"]: f for f in relation["forks"]}["main"]
        size = int(psql(connstr, f"SELECT pg_relation_size('{name}', 'main')"))
        assert main["pages_after"] == size // PAGE, name
    newt = _by_name(stat)["public.newt"][0]
    assert newt["pages_before"] == 0
    assert newt["pages_changed"] == newt["pages_after"] > 0
    ins = _by_name(stat)["public.ins"][0]
    assert ins["change"] == "modified"
    grown = {f["fork"]: f for f in ins["forks"]}["main"]
    assert grown["pages_after"] > grown["pages_before"]


def test_stat_reversed_swaps_created_and_dropped(home: NeonCli, stat: dict[str, Any]) -> None:
    back = home.json("snapshot", "diff", B, A)
    assert back["pages_changed"] == stat["pages_changed"]
    assert back["common_lsn"] == stat["common_lsn"] == stat["from_lsn"]

    def ids(diff: dict[str, Any], change: str) -> set[int]:
        return {r["relfilenode"] for r in diff["relations"] if r["change"] == change}

    assert ids(back, "created") == ids(stat, "dropped") != set()
    assert ids(back, "dropped") == ids(stat, "created") != set()
    assert {r["relfilenode"] for r in back["relations"]} == {
        r["relfilenode"] for r in stat["relations"]
    }
    table = home.run("snapshot", "diff", A, B).stdout
    assert "public.newt" in table and "created" in table and "public.keep" not in table
    assert "(system catalogs)" in table and "pg_class" not in table  # summed, not listed


def test_unknown_snapshot_is_one_error(home: NeonCli) -> None:
    for args in ((A, "pgdata1@nope"), ("pgdata1@nope", B, "--schema")):
        line = home.fail("snapshot", "diff", *args)
        assert "pgdata1@nope" in line and "does not exist" in line
    assert not any((home.home / "snapshot-servers").glob("*/pgdata"))


def test_schema_shows_the_added_table_column_and_dropped_index(home: NeonCli) -> None:
    diff = home.run("snapshot", "diff", A, B, "--schema").stdout
    added = {ln[1:].strip() for ln in diff.splitlines() if ln.startswith("+")}
    removed = {ln[1:].strip() for ln in diff.splitlines() if ln.startswith("-")}
    assert "CREATE TABLE public.newt (" in added
    assert "extra integer" in added
    assert "CREATE INDEX del_v ON public.del USING btree (v);" in removed
    assert "CREATE TABLE public.gone (" in removed
    assert not any("keep" in ln for ln in added | removed)
    assert diff.startswith(f"--- {A}/postgres")
    # Both temporary servers are gone.
    assert not any((home.home / "snapshot-servers").glob("*/pgdata"))


def test_data_counts_equal_the_workload(home: NeonCli) -> None:
    stats = {s["table_name"]: s for s in home.json("snapshot", "diff", A, B, "--data")}
    expected = {
        # table: (added, deleted, modified, old rows, new rows)
        "public.ins": (300, 0, 0, 500, 800),
        "public.upd": (0, 0, 50, 500, 500),
        "public.del": (0, 50, 0, 500, 450),
        "public.toasty": (3, 0, 5, 20, 23),
        "public.nopk": (10, 5, 0, 100, 105),
        "public.gone": (0, 300, 0, 300, 0),
        "public.trunc": (0, 400, 0, 400, 0),
        "public.newt": (1000, 0, 0, 0, 1000),
        # Keys in an ICU collation, which orders them unlike byte order: matched all the same.
        "public.tk": (2, 1, 2, 7, 8),
    }
    got = {
        name: (s["rows_added"], s["rows_deleted"], s["rows_modified"], s["old_row_count"],
               s["new_row_count"])
        for name, s in stats.items()
    }  # fmt: skip
    assert got == expected
    assert stats["public.upd"]["cells_modified"] == 50
    assert stats["public.newt"]["cells_added"] == 2000


def _columns(connstr: str, table: str) -> list[str]:
    """The table's columns (quoted), none if it does not exist there."""
    with psycopg.connect(connstr) as conn:
        rows = conn.execute(
            "SELECT quote_ident(attname) FROM pg_attribute WHERE attrelid = to_regclass(%s) "
            "AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            (table,),
        ).fetchall()
    return [r[0] for r in rows]


def _rows(connstr: str, table: str, columns: list[str]) -> Counter[tuple[Any, ...]]:
    """The table's rows over `columns`, as a multiset."""
    if not columns:
        return Counter()
    with psycopg.connect(connstr) as conn:
        return Counter(conn.execute(f"SELECT {', '.join(columns)} FROM {table}").fetchall())


def test_data_counts_equal_except_all_counts(home: NeonCli) -> None:
    """Per table, rows deleted + modified = |A EXCEPT ALL B| and rows added + modified =
    |B EXCEPT ALL A| over the columns both have, read from read-only servers over A and B.
    The two servers are separate instances, so EXCEPT ALL (multiset difference) is taken
    over the rows fetched, with Counter's subtraction, which is its definition."""
    stats = home.json("snapshot", "diff", A, B, "--data")
    servers = {s: str(home.json("snapshot", "start", s)["connstr"]) for s in (A, B)}
    try:
        assert len(stats) >= 9
        for s in stats:
            table = s["table_name"]
            cols_a, cols_b = _columns(servers[A], table), _columns(servers[B], table)
            common = [c for c in cols_a if c in cols_b]
            rows_a = _rows(servers[A], table, common if cols_b else cols_a)
            rows_b = _rows(servers[B], table, common if cols_a else cols_b)
            a_except_b = sum((rows_a - rows_b).values())
            b_except_a = sum((rows_b - rows_a).values())
            assert s["rows_deleted"] + s["rows_modified"] == a_except_b, table
            assert s["rows_added"] + s["rows_modified"] == b_except_a, table
            assert (s["old_row_count"], s["new_row_count"]) == (
                sum(rows_a.values()),
                sum(rows_b.values()),
            ), table
    finally:
        for snapshot in servers:
            home.run("snapshot", "stop", snapshot)


def test_data_rows_are_listed_bounded(home: NeonCli) -> None:
    rows = home.json("snapshot", "diff", A, B, "--data", "--rows", "--limit", "7")
    assert len(rows) == 7
    first = rows[0]
    assert first["table"] == "public.del" and first["diff_type"] == "removed"
    assert first["from_id"] == "10" and first["to_id"] is None
    text = home.run("snapshot", "diff", A, B, "--data", "--rows", "--limit", "3").stdout
    listed = list(csv.DictReader(io.StringIO(text)))
    assert [r["diff_type"] for r in listed] == ["removed"] * 3
    upd = home.json("snapshot", "diff", A, B, "--data", "--rows", "--limit", "3000")
    nulls = [r for r in upd if r["table"] == "public.upd" and r["to_v"] is None]
    assert len(nulls) == 30 and all(r["diff_type"] == "modified" for r in nulls)


def test_stat_between_different_histories_points_to_schema_and_data(
    home: NeonCli,
) -> None:
    out = pg_reachable_tmpdir("neon-diff-imp-")
    try:
        path = out / "a.neon"
        home.run("snapshot", "export", A, "-o", str(path))
        home.run("snapshot", "import", "--from", str(path), "imported")
        line = home.fail("snapshot", "diff", "imported", B)
        assert "--schema" in line and "--data" in line and "imported" in line
        stats = home.json("snapshot", "diff", "imported", B, "--data", "--db", "postgres")
        assert {s["table_name"] for s in stats} >= {"public.newt", "public.gone"}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_current_is_the_live_node(home: NeonCli, connstr: str) -> None:
    psql(connstr, "UPDATE keep SET v = 'live' WHERE id = 7")
    stat = home.json("snapshot", "diff", B, "pgdata1@CURRENT")
    assert stat["to_snapshot"] == "pgdata1@CURRENT" and stat["to_lsn"] > stat["from_lsn"]
    assert {"public.keep", "public.keep_v"} <= {
        f"{r['schema']}.{r['name']}" for r in stat["relations"]
    }
    (keep,) = home.json("snapshot", "diff", B, "primary1@CURRENT", "--data")
    assert keep["table_name"] == "public.keep" and keep["rows_modified"] == 1
