"""`neon snapshot export`: a snapshot out of pg-neon, as a `.neon` file, a plain basebackup tar,
a `pg_dump -Fc` dump or CSV files.

`neon` and `tar` stream the pageserver's basebackup straight to the output (through the
snapfile writer for `neon`): memory stays bounded and no tar is staged. Both pin the basebackup's
time to the snapshot's creation time, so one snapshot always exports to the same tar bytes.
`pg_dump` and `csv` read through the snapshot's read-only server (`snapshot start`): an
already running one is used as is, else one is started and stopped afterwards, also on failure
or SIGINT. Output goes to `FILE.partial` (`DIR.partial`) and is renamed only when complete, so
a failed export leaves nothing that looks complete.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import errno
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import click

from cli.context import App, get_app
from cli.output import print_json
from cli.pageserver_control import local_api
from cli.pgbin import pg_binary
from cli.progress import Progress
from cli.snapshot_servers import databases, snapshot_server, with_db
from pageserver_api.client import PageserverClient, SyncPageserverClient
from pageserver_api.errors import ExternalCommandFailed, error_from_os
from pageserver_api.models import (
    BasebackupPlan,
    BasebackupPlanRequest,
    BasebackupRequest,
    BasebackupResponse,
    SnapshotInfo,
    SnapshotShowRequest,
)
from pageserver_api.models_snapshots import read_tar_total
from proto.errors import AlreadyExists, Conflict, InvalidArgument, NotFound

FORMATS = ("neon", "tar", "pg_dump", "csv")
if TYPE_CHECKING:
    import psycopg
    from _typeshed import SupportsWrite

# psycopg is imported by the pg_dump and csv exports only, where they use it: it takes a tenth
# of a second to import, which every `neon` invocation would pay.

_COPY_CHUNK = 1 << 20
_IN_FLIGHT = 8  # chunks handed to the writer thread and not yet written


class _Meter:
    """Bytes written so far, shown as cli.progress's bar (bytes, rate) on a TTY."""

    def __init__(self, show: bool, what: str) -> None:
        self.bytes = 0
        self._progress = Progress(show, what)

    def add(self, n: int) -> None:
        self.bytes += n
        self._progress.update(self.bytes, None)

    def close(self) -> None:
        self._progress.close()


@dataclass(frozen=True, slots=True)
class _Target:
    """Where an export goes: `final` once complete, `partial` while written (None: stdout)."""

    final: Path | None
    partial: Path | None


def _target(output: str, force: bool, is_dir: bool) -> _Target:
    if output == "-":
        if is_dir:
            raise InvalidArgument("--format csv writes a directory; give it with -o DIR")
        if sys.stdout.isatty():
            raise InvalidArgument(
                "refusing to write a binary export to a terminal; use -o FILE or redirect stdout"
            )
        return _Target(None, None)
    final = Path(output).absolute()
    if (final.exists() or final.is_symlink()) and not force:
        raise AlreadyExists(f"{final} already exists; choose another -o or pass --force")
    if is_dir and final.exists() and not final.is_dir():
        raise Conflict(f"{final} exists and is not a directory; --format csv writes a directory")
    if not final.parent.is_dir():
        raise NotFound(f"directory {final.parent} does not exist; create it first")
    return _Target(final, final.with_name(final.name + ".partial"))


def export_file_name(snapshot: str, suffix: str) -> str:
    """The file an export writes when not told where: `pgdata1@snap1.neon` (a '/' in a
    snapshot's name would make it a path)."""
    return snapshot.replace("/", "_") + suffix


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def _writing(path: Path | None) -> Iterator[None]:
    """A write that fails for space (the exception names no file): one line naming `path`."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise error_from_os(exc, path) from None
        raise


@contextlib.contextmanager
def _output_file(target: _Target) -> Iterator[IO[bytes]]:
    """A binary stream to the export; renamed into place only if the block succeeds."""
    if target.partial is None:
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    assert target.final is not None
    _remove(target.partial)  # a killed earlier export's leftover: never a complete file
    try:
        with _writing(target.final), open(target.partial, "xb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        if target.final.is_dir() and not target.final.is_symlink():
            raise Conflict(f"{target.final} is a directory; choose a file name with -o")
        os.replace(target.partial, target.final)
    finally:
        target.partial.unlink(missing_ok=True)


@contextlib.contextmanager
def _output_dir(target: _Target) -> Iterator[Path]:
    """A fresh directory for the export, put in place (replacing with --force) on success."""
    assert target.partial is not None and target.final is not None
    _remove(target.partial)
    try:
        target.partial.mkdir(mode=0o755)
        yield target.partial
        if target.final.exists() or target.final.is_symlink():
            _remove(target.final)
        os.replace(target.partial, target.final)
    finally:
        _remove(target.partial)


def _stream_basebackup(
    app: App, name: str, mtime: int, plan: BasebackupPlan, out: SupportsWrite[bytes],
    meter: _Meter, snapshot_file: bool, delta_from: list[str] | None = None,
    api: SyncPageserverClient | None = None, on_total: Callable[[int], None] | None = None,
) -> BasebackupResponse:  # fmt: skip
    """Copy the snapshot's basebackup tar, or its `.neon` file (made by the daemon, which
    compresses on its threads), to `out`; through `api` if given (another thread's: the
    registry behind `local_api` is its own thread's). `on_total`: called with the size of
    the `.neon` file's tar, which the daemon announces before the file (none from an
    older daemon).

    Writing runs in a thread beside the download, in order, at most _IN_FLIGHT chunks behind
    it: one after the other, a core would wait for the other's work."""
    # The manifest's creation time is the snapshot's too: every export of one snapshot is
    # the same bytes, so an interrupted push can be regenerated and resumed (and a cut pull
    # of a served file continued).
    created_at = mtime if snapshot_file else None
    request = BasebackupRequest(
        snapshot=name, mtime=mtime, snapshot_file=snapshot_file, created_at=created_at,
        delta_from=delta_from or None, tar_total=on_total is not None or None,
    )  # fmt: skip

    def sink(chunk: bytes) -> None:
        out.write(chunk)
        meter.add(len(chunk))

    async def fetch(client: PageserverClient) -> BasebackupResponse:
        loop = asyncio.get_running_loop()
        pending: collections.deque[asyncio.Future[None]] = collections.deque()
        with concurrent.futures.ThreadPoolExecutor(1, "export-sink") as pool:
            try:
                async with client.basebackup(request) as download:
                    first = on_total is not None
                    async for chunk in download:
                        if first:
                            first = False
                            total = read_tar_total(chunk)
                            if total is not None and on_total is not None:
                                on_total(total)
                                continue
                        pending.append(loop.run_in_executor(pool, sink, bytes(chunk)))
                        if len(pending) > _IN_FLIGHT:
                            await pending.popleft()
                    while pending:
                        await pending.popleft()
                    result = download.result
            finally:
                for future in pending:
                    future.cancel()
        if (result.lsn, result.system_identifier, result.pg_timeline) != (
            plan.lsn,
            plan.system_identifier,
            plan.pg_timeline,
        ):
            raise Conflict(f"snapshot {name} changed during the export (destroyed and recreated?)")
        return result

    return (local_api(app) if api is None else api).run(fetch)


def write_snapshot_file(
    app: App, snap: SnapshotInfo, out: SupportsWrite[bytes], delta_from: list[str] | None = None,
    plan: BasebackupPlan | None = None, api: SyncPageserverClient | None = None,
    on_total: Callable[[int], None] | None = None,
) -> BasebackupResponse:  # fmt: skip
    """Write the `.neon` file of `snap` to `out` (`out.write` is called from a worker thread,
    in order): `neon snapshot push` sends it through a transport so. With `delta_from`
    (snapshots the receiver has), a delta on the newest that is an ancestor of `snap`;
    `plan`: the snapshot's basebackup plan when the caller has it already; `api`: the
    pageserver's client when the caller has it; `on_total`: told the file's tar size
    before its first byte (`_stream_basebackup`)."""
    if plan is None:
        plan = local_api(app).basebackup_plan(BasebackupPlanRequest(snapshot=snap.name))
    return _stream_basebackup(
        app, snap.name, int(snap.created_at), plan, out, _Meter(False, ""), snapshot_file=True,
        delta_from=delta_from, api=api, on_total=on_total,
    )  # fmt: skip


def _export_basebackup(
    app: App, snap: SnapshotInfo, fmt: str, target: _Target, meter: _Meter
) -> dict[str, Any]:
    name = snap.name
    plan = local_api(app).basebackup_plan(BasebackupPlanRequest(snapshot=name))
    mtime = int(snap.created_at)  # the same snapshot, the same tar bytes
    with _output_file(target) as out:
        _stream_basebackup(app, name, mtime, plan, out, meter, fmt == "neon")
    return {}


def _choose_db(connstr: str, name: str, db: str | None) -> str:
    """`db` if the snapshot has it; else its one user database (or `postgres`)."""
    existing = databases(connstr)
    if db is not None:
        if db not in existing:
            raise NotFound(
                f"database {db!r} does not exist in snapshot {name}; it has: {', '.join(existing)}"
            )
        return db
    user_dbs = [d for d in existing if d != "postgres"]
    if len(user_dbs) > 1:
        raise InvalidArgument(
            f"snapshot {name} has several databases ({', '.join(existing)}); choose one with --db"
        )
    return user_dbs[0] if user_dbs else "postgres"


def _export_pg_dump(
    connstr: str, name: str, db: str | None, target: _Target, meter: _Meter
) -> dict[str, Any]:
    db = _choose_db(connstr, name, db)
    cmd = [pg_binary("pg_dump"), "-Fc", "--no-password", "-d", with_db(connstr, db)]
    # pg_dump's messages go to a file: a pipe it filled while we wait on stdout would block it.
    with _output_file(target) as out, tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errors, bufsize=0)
        try:
            assert proc.stdout is not None
            while chunk := proc.stdout.read(_COPY_CHUNK):  # unbuffered: what is there
                out.write(chunk)
                meter.add(len(chunk))
            proc.wait()
            errors.seek(0)
            stderr = errors.read().decode(errors="replace").strip()
            if proc.returncode != 0:
                last = stderr.splitlines()[-1] if stderr else f"exit {proc.returncode}"
                raise ExternalCommandFailed(f"pg_dump of database {db!r} failed: {last}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return {"db": db}


def _tables(
    conn: psycopg.Connection[Any], db: str, wanted: tuple[str, ...]
) -> list[tuple[str, str]]:
    """(schema, table) of each wanted table, or of every user table."""
    if not wanted:
        rows = conn.execute(
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n "
            "ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'm') "
            "AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
            "AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%' "
            "ORDER BY 1, 2"
        ).fetchall()
        return [(r[0], r[1]) for r in rows]
    found = []
    for table in wanted:
        row = conn.execute(
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n "
            "ON n.oid = c.relnamespace WHERE c.oid = to_regclass(%s) "
            "AND c.relkind IN ('r', 'm', 'v', 'p', 'f')",
            (table,),
        ).fetchone()
        if row is None:
            raise NotFound(f"table {table!r} does not exist in database {db!r}")
        found.append((row[0], row[1]))
    return found


def _export_csv(
    connstr: str, name: str, db: str | None, tables: tuple[str, ...], target: _Target,
    meter: _Meter,
) -> dict[str, Any]:  # fmt: skip
    import psycopg
    from psycopg import sql

    db = _choose_db(connstr, name, db)
    written = []
    with psycopg.connect(with_db(connstr, db), connect_timeout=10) as conn:
        chosen = _tables(conn, db, tables)
        with _output_dir(target) as directory:
            for schema, table in chosen:
                filename = f"{schema}.{table}.csv"
                if "/" in filename or filename.startswith("."):
                    raise InvalidArgument(f"table {schema}.{table} has no safe file name")
                query = sql.SQL("COPY (SELECT * FROM {}) TO STDOUT WITH (FORMAT csv, HEADER)")
                size = 0
                path = directory / filename
                with _writing(path), path.open("xb") as out, conn.cursor() as cur:
                    with cur.copy(query.format(sql.Identifier(schema, table))) as copy:
                        for block in copy:
                            out.write(block)
                            size += len(block)
                            meter.add(len(block))
                    out.flush()
                    os.fsync(out.fileno())
                written.append({"table": f"{schema}.{table}", "file": filename, "bytes": size})
    return {"db": db, "tables": written}


@click.command("export")
@click.argument("name", metavar="SNAPSHOT")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="neon", show_default=True)
@click.option("-o", "--output", default=None, metavar="FILE|-|DIR",
              help="where to write (default: SNAPSHOT.neon or .tar/.dump in the current "
                   "directory; - for stdout; a new directory for csv)")  # fmt: skip
@click.option("--db", default=None, help="database for pg_dump and csv")
@click.option("--table", "tables", multiple=True, metavar="T", help="table for csv (repeatable)")
@click.option("--force", is_flag=True, help="replace an existing output")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def snapshot_export(
    ctx: click.Context,
    name: str,
    fmt: str,
    output: str | None,
    db: str | None,
    tables: tuple[str, ...],
    force: bool,
    as_json: bool,
) -> None:
    """Export a snapshot: a .neon file, a basebackup tar, a pg_dump -Fc dump, or CSV files."""
    app = get_app(ctx)
    name = app.registry.snapshot_name(name)
    if tables and fmt != "csv":
        raise InvalidArgument("--table applies to --format csv only")
    if db is not None and fmt not in ("pg_dump", "csv"):
        raise InvalidArgument("--db applies to --format pg_dump and csv only")
    if as_json and output == "-":
        raise InvalidArgument("--json prints to stdout; give the export a file with -o FILE")
    if output is None:
        if fmt == "csv":
            raise InvalidArgument("--format csv needs -o DIR (a new directory)")
        output = export_file_name(name, {"neon": ".neon", "tar": ".tar", "pg_dump": ".dump"}[fmt])
    snap = local_api(app).snapshot_show(SnapshotShowRequest(name))  # unknown: one line
    target = _target(output, force, is_dir=fmt == "csv")
    meter = _Meter(not as_json and sys.stderr.isatty(), f"Exporting {name}")
    try:
        if fmt in ("neon", "tar"):
            details = _export_basebackup(app, snap, fmt, target, meter)
        else:
            with snapshot_server(app, name) as connstr:
                if fmt == "pg_dump":
                    details = _export_pg_dump(connstr, name, db, target, meter)
                else:
                    details = _export_csv(connstr, name, db, tables, target, meter)
    finally:
        meter.close()
    if as_json:
        print_json(
            {
                "snapshot": name,
                "format": fmt,
                "path": str(target.final) if target.final else "-",
                "bytes": meter.bytes,
                "lsn": snap.lsn,
                "lsn_text": snap.lsn_text,
                **details,
            }
        )
