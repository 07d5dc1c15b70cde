"""A snapshot's read-only server as a connection string, for the commands that read a
snapshot through SQL (`snapshot export --format pg_dump|csv`, `snapshot diff --schema|--data`).

psycopg is imported inside the functions: it takes a tenth of a second to import, which every
`neon` invocation would pay.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from cli import postmaster
from cli.context import App


@contextlib.contextmanager
def snapshot_server(app: App, name: str) -> Iterator[str]:
    """A connection string to the snapshot's read-only server: a running one, else a new one
    stopped (and removed) when the block ends, however it ends."""
    # Imported here: cli.snapshot_commands imports the commands that import this module.
    from cli.snapshot_commands import (
        remove_snapshot_server,
        server_connstr,
        start_snapshot_server,
    )

    running = app.registry.snapshot_server(name)
    if running is not None and postmaster.running_pid(Path(running["datadir"])) is not None:
        yield server_connstr(app, running["port"])
        return
    try:
        port, _datadir = start_snapshot_server(app, name)
        yield server_connstr(app, port)
    finally:
        remove_snapshot_server(app, name)


def with_db(connstr: str, db: str) -> str:
    import psycopg

    return psycopg.conninfo.make_conninfo(connstr, dbname=db)


def databases(connstr: str) -> list[str]:
    import psycopg

    with psycopg.connect(connstr, connect_timeout=10) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate "
            "ORDER BY datname"
        ).fetchall()
    return [r[0] for r in rows]
