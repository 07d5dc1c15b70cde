"""`neon snapshot diff A B [--stat | --schema | --data [--rows]]`: what changed from A to B.

- `--stat` (default) asks the pageserver, which compares the page history of the two
  snapshots (pageserver/history/snapshot_diff.py): no server starts.
- `--schema` and `--data` read both snapshots through read-only servers (a running
  `snapshot start` server is used as it is; others are started here and stopped when the
  command ends, however it ends).
- `--data` matches rows by primary key (by whole row where a table has none) with a merge of
  two key-ordered streams, one per server, so memory stays bounded whatever the table size:
  keys are compared as their text forms ordered by COLLATE "C" (byte order, which is Python's
  str order), so the merge needs no knowledge of each type's ordering. Counts follow Dolt's
  `dolt_diff_stat` (rows and cells added, deleted, modified; old and new counts). Columns
  are matched by name: one a side lacks reads as NULL there (an added column without a
  default changes no row). Unlogged tables are skipped (a standby cannot read them).
- Either side may be `PGDATA@CURRENT`, the node's live state: for `--stat` as far as the page
  history has it once ingest reached the server's WAL, for `--schema`/`--data` the running
  node itself.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import difflib
import functools
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import click

from cli import nodes
from cli.context import App, get_app
from cli.ingest_wait import wait_for_ingest
from cli.output import human_size, print_json, print_table
from cli.pageserver_control import local_api
from cli.pgbin import pg_binary
from cli.registry import NodeRow
from cli.snapshot_servers import databases, snapshot_server, with_db
from pageserver_api.models import (
    RelationDiff,
    SnapshotDiffRequest,
    SnapshotDiffResponse,
    SnapshotShowRequest,
)
from pg15.constants import BLCKSZ
from pg15.lsn import format_lsn
from proto.errors import Conflict, ExternalCommandFailed, NotFound

if TYPE_CHECKING:  # psycopg is imported by --data only (it costs every neon command time)
    import psycopg

DEFAULT_ROW_LIMIT = 100
_FETCH_ROWS = 2000
_RESTRICT_KEY = "neonsnapshotdiff"  # pg_dump >= 15.14 prints a random \restrict key otherwise


@click.command("diff")
@click.argument("from_name", metavar="A")
@click.argument("to_name", metavar="B")
@click.option(
    "--stat",
    "mode",
    flag_value="stat",
    default=True,
    help="pages changed per relation, from the page history (default)",
)
@click.option("--schema", "mode", flag_value="schema", help="unified diff of pg_dump --schema-only")
@click.option("--data", "mode", flag_value="data", help="rows added, deleted, changed per table")
@click.option("--rows", is_flag=True, help="with --data: list the rows (CSV, or JSON with --json)")
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=DEFAULT_ROW_LIMIT,
    show_default=True,
    help="with --rows: at most this many rows",
)
@click.option("--db", default=None, help="only this database (--schema, --data)")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def snapshot_diff(
    ctx: click.Context,
    from_name: str,
    to_name: str,
    mode: str,
    rows: bool,
    limit: int,
    db: str | None,
    as_json: bool,
) -> None:
    """Show what changed from snapshot A to snapshot B (A may be older or newer)."""
    app = get_app(ctx)
    if rows and mode != "data":
        raise click.UsageError("--rows goes with --data")
    if db is not None and mode == "stat":
        raise click.UsageError("--db goes with --schema or --data (--stat covers every database)")
    names = [app.registry.snapshot_name(n) for n in (from_name, to_name)]
    api = local_api(app)
    for name in names:  # one clear error before any server starts
        node = _current_node(app, name)
        if node is None:
            api.snapshot_show(SnapshotShowRequest(name))
        elif mode == "stat":  # the node's state as its server has made it durable
            wait = nodes.server_wal_lsn(app, nodes.node_status(app, node))
            if wait is not None:
                show = not as_json and sys.stderr.isatty()
                wait_for_ingest(app, node.id, wait, show_progress=show)
    if mode == "stat":
        _print_stat(api.snapshot_diff(SnapshotDiffRequest(*names)), as_json)
        return
    with contextlib.ExitStack() as servers:
        connstrs = [_connstr(app, servers, name) for name in names]
        dbs = _databases_to_compare(connstrs, names, db)
        if mode == "schema":
            _print_schema(connstrs, names, dbs, as_json)
        else:
            _print_data(connstrs, dbs, rows, limit, as_json)


def _current_node(app: App, name: str) -> NodeRow | None:
    """The node of `PGDATA@CURRENT` (its live state), None for a snapshot name."""
    ref, _sep, tag = name.rpartition("@")
    return app.registry.get_node(ref) if tag == "CURRENT" else None


def _connstr(app: App, servers: contextlib.ExitStack, name: str) -> str:
    """Where to read `name`: a snapshot's read-only server (started here if none runs, and
    stopped when `servers` closes), or for PGDATA@CURRENT the running node itself."""
    node = _current_node(app, name)
    if node is None:
        return servers.enter_context(snapshot_server(app, name))
    if nodes.node_status(app, node).state != "running":
        raise Conflict(f"node {node.id} is not running; start it with `neon pg start {node.id}`")
    return nodes.connstr(app, node)


# --- --stat ---------------------------------------------------------------------------------


def _print_stat(diff: SnapshotDiffResponse, as_json: bool) -> None:
    if as_json:
        print_json(diff.to_wire())
        return
    click.echo(
        f"{diff.from_snapshot} ({format_lsn(diff.from_lsn)}) -> "
        f"{diff.to_snapshot} ({format_lsn(diff.to_lsn)})"
    )
    print_table(
        ("DATABASE", "TABLE", "RELATION", "KIND", "CHANGE", "PAGES", "CHANGED", "BYTES"),
        _stat_rows(diff.relations),
    )
    click.echo(
        f"{len(diff.relations)} relations, {diff.pages_changed} pages changed "
        f"({human_size(diff.bytes_changed)})"
    )


_SYSTEM_SCHEMAS = ("pg_catalog", "information_schema")


def _stat_rows(relations: Sequence[RelationDiff]) -> list[tuple[object, ...]]:
    """One row per relation of the users' tables; the system catalogs' relations (with their
    indexes and TOAST) summed per database and kind of change, after that database's rows
    (--json lists every one)."""
    rows: list[tuple[object, ...]] = []
    system: dict[str, list[int]] = {}

    def flush_system(database: str) -> None:
        for change, (count, before, after, changed) in system.items():
            what = f"{count} relation{'s' * (count != 1)}"
            rows.append(
                (database, "(system catalogs)", what, "catalog", change, f"{before}->{after}",
                 changed, human_size(changed * BLCKSZ))
            )  # fmt: skip
        system.clear()

    database = None
    for r in relations:
        if r.database != database:
            if database is not None:
                flush_system(database)
            database = r.database
        if r.table is not None and r.table.split(".", 1)[0] in _SYSTEM_SCHEMAS:
            sums = system.setdefault(r.change, [0, 0, 0, 0])
            for i, n in enumerate((1, r.pages_before, r.pages_after, r.pages_changed)):
                sums[i] += n
            continue
        rows.append(
            (
                r.database,
                r.table,
                f"{r.schema}.{r.name}" if r.name else f"(relfilenode {r.relfilenode})",
                r.kind,
                r.change,
                f"{r.pages_before}->{r.pages_after}",
                r.pages_changed,
                human_size(r.bytes_changed),
            )
        )
    if database is not None:
        flush_system(database)
    return rows


# --- --schema -------------------------------------------------------------------------------


def _databases_to_compare(
    connstrs: Sequence[str], names: Sequence[str], db: str | None
) -> list[str]:
    """`db` (if either snapshot has it), else every connectable non-template database of
    either snapshot."""
    found = [set(databases(c)) for c in connstrs]
    if db is not None:
        if not any(db in f for f in found):
            raise NotFound(
                f"database {db!r} exists in neither {names[0]} nor {names[1]}; they have: "
                f"{', '.join(sorted(found[0] | found[1]))}"
            )
        return [db]
    return sorted(found[0] | found[1])


def _schema_dump(connstr: str, db: str) -> str:
    """pg_dump --schema-only of `db`; "" when the snapshot has no such database."""
    if db not in databases(connstr):
        return ""
    flags = ["--schema-only", "--no-password"]
    if "--restrict-key" in _pg_dump_help():
        flags.append(f"--restrict-key={_RESTRICT_KEY}")
    proc = subprocess.run(
        [pg_binary("pg_dump"), *flags, "-d", with_db(connstr, db)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        raise ExternalCommandFailed(f"pg_dump --schema-only of database {db!r} failed: {last[0]}")
    return proc.stdout


@functools.cache
def _pg_dump_help() -> str:
    """pg_dump's options: --restrict-key exists from 15.14 on."""
    proc = subprocess.run([pg_binary("pg_dump"), "--help"], capture_output=True, text=True)
    return proc.stdout


def _print_schema(
    connstrs: Sequence[str], names: Sequence[str], dbs: Sequence[str], as_json: bool
) -> None:
    result = []
    for db in dbs:
        before, after = (_schema_dump(c, db) for c in connstrs)
        diff = "".join(
            difflib.unified_diff(
                before.splitlines(keepends=True),
                after.splitlines(keepends=True),
                f"{names[0]}/{db}",
                f"{names[1]}/{db}",
            )
        )
        result.append({"database": db, "diff": diff})
        if not as_json:
            click.echo(diff, nl=False)
    if as_json:
        print_json(result)


# --- --data ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Table:
    schema: str
    name: str
    columns: tuple[str, ...]
    key: tuple[str, ...]
    """Primary key columns; () when the table has none."""

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


_TABLES_SQL = """
SELECT n.nspname, c.relname,
       ARRAY(SELECT a.attname FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0
             AND NOT a.attisdropped ORDER BY a.attnum)::text[],
       COALESCE(ARRAY(SELECT a.attname FROM pg_index i
                      JOIN LATERAL unnest(i.indkey) WITH ORDINALITY k(attnum, n) ON true
                      JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum
                      WHERE i.indrelid = c.oid AND i.indisprimary ORDER BY k.n), '{}')::text[]
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r' AND c.relpersistence = 'p'  -- a standby cannot read unlogged tables
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'
ORDER BY 1, 2
"""


def _tables(conn: psycopg.Connection[Any]) -> dict[str, _Table]:
    tables = {}
    for schema, name, columns, key in conn.execute(_TABLES_SQL).fetchall():
        table = _Table(schema, name, tuple(columns), tuple(key))
        tables[table.qualified] = table
    return tables


@dataclass(slots=True)
class TableDiffStat:
    """One table's counts, as Dolt's dolt_diff_stat names them."""

    table_name: str
    rows_unmodified: int = 0
    rows_added: int = 0
    rows_deleted: int = 0
    rows_modified: int = 0
    cells_added: int = 0
    cells_deleted: int = 0
    cells_modified: int = 0
    old_row_count: int = 0
    new_row_count: int = 0
    old_cell_count: int = 0
    new_cell_count: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)


Row = tuple[tuple[str, ...], tuple[str | None, ...]]
"""(match key as text, every column's value as text), columns in the compared order."""


def _stream(
    conn: psycopg.Connection[Any] | None,
    table: _Table | None,
    key: Sequence[str],
    columns: Sequence[str],
) -> Iterator[Row]:
    """The table's rows ordered by the text of `key` (every column when empty) in byte order;
    a table missing on this side streams nothing."""
    if table is None or conn is None:
        return
    from psycopg import sql

    present = [c for c in columns if c in table.columns]
    values = sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(c)) for c in present)
    match = key or present
    order = sql.SQL(", ").join(
        sql.SQL('{}::text COLLATE "C"').format(sql.Identifier(c)) for c in match
    )
    query = sql.SQL("SELECT ARRAY[{}]::text[], ARRAY[{}]::text[] FROM {}.{} ORDER BY {}").format(
        sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(c)) for c in match),
        values if present else sql.SQL(""),
        sql.Identifier(table.schema),
        sql.Identifier(table.name),
        order if match else sql.SQL("1"),
    )
    with conn.cursor(name=f"neon_diff_{id(table)}") as cur:
        cur.itersize = _FETCH_ROWS
        cur.execute(query)
        index = {c: i for i, c in enumerate(present)}
        for match_values, row_values in cur:
            yield (
                tuple(match_values),
                tuple(row_values[index[c]] if c in index else None for c in columns),
            )


def _compare_table(
    conns: Sequence[psycopg.Connection[Any] | None],
    old: _Table | None,
    new: _Table | None,
    rows_left: int,
) -> TableDiffStat:
    """Merge the two ordered streams of one table (see the module)."""
    either = new or old
    assert either is not None
    columns = tuple(dict.fromkeys((*(old.columns if old else ()), *(new.columns if new else ()))))
    key = either.key
    if old and new and old.key != new.key:
        key = ()  # the primary key changed: match whole rows
    stat = TableDiffStat(either.qualified)
    n_old = len(old.columns) if old else 0
    n_new = len(new.columns) if new else 0

    def emit(kind: str, before: Row | None, after: Row | None) -> None:
        if len(stat.rows) >= rows_left:
            return
        record: dict[str, Any] = {"table": stat.table_name, "diff_type": kind}
        for i, column in enumerate(columns):
            record[f"from_{column}"] = before[1][i] if before else None
            record[f"to_{column}"] = after[1][i] if after else None
        stat.rows.append(record)

    a_rows, b_rows = _stream(conns[0], old, key, columns), _stream(conns[1], new, key, columns)
    a, b = next(a_rows, None), next(b_rows, None)
    while a is not None or b is not None:
        a_key = None if a is None else (a[0] if key else a[1])
        b_key = None if b is None else (b[0] if key else b[1])
        if b is None or (a is not None and _before(a_key, b_key)):
            stat.rows_deleted += 1
            emit("removed", a, None)
            a = next(a_rows, None)
        elif a is None or _before(b_key, a_key):
            stat.rows_added += 1
            emit("added", None, b)
            b = next(b_rows, None)
        else:
            if a[1] == b[1]:
                stat.rows_unmodified += 1
            else:
                stat.rows_modified += 1
                stat.cells_modified += sum(x != y for x, y in zip(a[1], b[1], strict=True))
                emit("modified", a, b)
            a, b = next(a_rows, None), next(b_rows, None)
    stat.old_row_count = stat.rows_unmodified + stat.rows_modified + stat.rows_deleted
    stat.new_row_count = stat.rows_unmodified + stat.rows_modified + stat.rows_added
    stat.cells_added = stat.rows_added * n_new
    stat.cells_deleted = stat.rows_deleted * n_old
    stat.old_cell_count = stat.old_row_count * n_old
    stat.new_cell_count = stat.new_row_count * n_new
    return stat


def _before(x: Sequence[str | None] | None, y: Sequence[str | None] | None) -> bool:
    """Tuple order of text values as PostgreSQL sorts them COLLATE "C", NULLs last."""
    assert x is not None and y is not None
    for u, v in zip(x, y, strict=True):
        if u == v:
            continue
        if u is None or v is None:
            return v is None and u is not None
        return u < v  # code point order: UTF-8 byte order
    return False


def _print_data(
    connstrs: Sequence[str], dbs: Sequence[str], rows: bool, limit: int, as_json: bool
) -> None:
    import psycopg

    stats: list[tuple[str, TableDiffStat]] = []
    left = limit if rows else 0
    for db in dbs:
        with contextlib.ExitStack() as stack:
            conns: list[psycopg.Connection[Any] | None] = []
            tables: list[dict[str, _Table]] = []
            for connstr in connstrs:
                if db in databases(connstr):
                    conn = stack.enter_context(psycopg.connect(with_db(connstr, db)))
                    conns.append(conn)
                    tables.append(_tables(conn))
                else:
                    conns.append(None)
                    tables.append({})
            for name in sorted(tables[0].keys() | tables[1].keys()):
                old, new = tables[0].get(name), tables[1].get(name)
                stat = _compare_table(conns, old, new, left)
                left -= len(stat.rows)
                if stat.rows_added or stat.rows_deleted or stat.rows_modified or old != new:
                    stats.append((db, stat))
    if rows:
        listed = [{"database": db, **r} for db, s in stats for r in s.rows]
        if as_json:
            print_json(listed)
        else:
            _write_csv(listed)
        return
    counts = [
        {"database": db, **{k: v for k, v in _fields(s).items() if k != "rows"}} for db, s in stats
    ]
    if as_json:
        print_json(counts)
        return
    print_table(
        ("DATABASE", "TABLE", "ADDED", "DELETED", "MODIFIED", "UNMODIFIED", "OLD ROWS", "NEW ROWS"),
        [
            (c["database"], c["table_name"], c["rows_added"], c["rows_deleted"],
             c["rows_modified"], c["rows_unmodified"], c["old_row_count"], c["new_row_count"])
            for c in counts
        ],
    )  # fmt: skip


def _fields(stat: TableDiffStat) -> dict[str, Any]:
    return {f.name: getattr(stat, f.name) for f in dataclasses.fields(stat)}


def _write_csv(listed: list[dict[str, Any]]) -> None:
    headers = list(dict.fromkeys(k for row in listed for k in row))
    writer = csv.DictWriter(sys.stdout, headers, lineterminator="\n")
    writer.writeheader()
    writer.writerows(listed)
