"""The CLI's registry: nodes, storages and pageserver endpoints in SQLite under NEON_HOME.

Every change runs in a `BEGIN IMMEDIATE` transaction so two `neon` commands running at once
serialize instead of racing; secrets are not stored here (see cli/secrets.py).
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pageserver.history.snapshots import split_snapshot_name
from pageserver_api.errors import error_from_os
from proto.errors import NeonError, NotFound, Unavailable

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS storages (
    name TEXT PRIMARY KEY,
    type TEXT NOT NULL,
    options TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS nodes (
    id TEXT PRIMARY KEY,
    pgdata TEXT NOT NULL UNIQUE,
    storage TEXT NOT NULL REFERENCES storages(name),
    datadir TEXT NOT NULL UNIQUE,
    port INTEGER NOT NULL,
    role TEXT NOT NULL,
    superuser TEXT NOT NULL,
    replication_user TEXT NOT NULL,
    state TEXT NOT NULL,
    creator_pid INTEGER,
    created_at REAL NOT NULL,
    extra TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS snapshot_servers (
    name TEXT PRIMARY KEY,
    datadir TEXT NOT NULL,
    port INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS replicas (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    primary_id TEXT NOT NULL,
    datadir TEXT NOT NULL UNIQUE,
    port INTEGER NOT NULL UNIQUE,
    snapshot TEXT,
    state TEXT NOT NULL,
    creator_pid INTEGER,
    created_at REAL NOT NULL,
    extra TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS pageservers (
    name TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    port INTEGER NOT NULL,
    http_port INTEGER NOT NULL,
    local INTEGER NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class StorageRow:
    name: str
    type: str
    options: dict[str, str]
    created_at: float


@dataclass(frozen=True, slots=True)
class NodeRow:
    id: str
    pgdata: str
    storage: str
    datadir: Path
    port: int
    role: str
    superuser: str
    replication_user: str
    state: str  # 'creating' while a `pg create` is at work, then 'ready'
    creator_pid: int | None
    created_at: float
    extra: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ReplicaRow:
    """A hot standby of a node (cli/replicas.py): no history of its own, never followed."""

    id: int
    name: str
    primary_id: str
    datadir: Path
    port: int
    snapshot: str | None  # a static read-only replica at this snapshot; None: it streams
    state: str  # 'creating' while `pg start --replica` seeds it, then 'ready'
    creator_pid: int | None
    created_at: float
    extra: dict[str, Any]

    @property
    def slot(self) -> str | None:
        """Its physical slot on the primary (a streaming replica's)."""
        return None if self.snapshot is not None else f"neon_replica_{self.id}"


@dataclass(frozen=True, slots=True)
class PageserverRow:
    name: str
    host: str
    port: int
    http_port: int
    local: bool


class Registry:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.read_only = not os.access(path.parent, os.W_OK)
        if self.read_only and path.exists():
            self._conn = _open_read_only(path)
            return
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
            os.close(fd)
        self._conn = sqlite3.connect(path, timeout=30, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        try:
            self._conn.execute("PRAGMA busy_timeout=30000")
            _use_wal_journal(self._conn)
            self._conn.execute("PRAGMA foreign_keys=ON")
            with self.transaction() as cur:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        cur.execute(statement)
                cur.execute(
                    "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
                _migrate(cur)
        except sqlite3.OperationalError as exc:
            # A full filesystem: an existing registry can still be read (pg list works);
            # a write then fails with one line (cli/main.py). Not so for a lock held too long.
            self._conn.close()
            if path.stat().st_size == 0 or not any(
                word in str(exc) for word in ("disk", "full", "readonly", "unable to open")
            ):
                raise
            self._conn = _open_read_only(path)
            self.read_only = True

    def close(self) -> None:
        self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Cursor]:
        """An immediate (write-locking) transaction, committed on success."""
        cur = self._conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            yield cur
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        cur.execute("COMMIT")

    # storages

    def storages(self) -> list[StorageRow]:
        rows = self._conn.execute("SELECT * FROM storages ORDER BY created_at, name").fetchall()
        return [_storage(r) for r in rows]

    def find_storage(self, name: str) -> StorageRow | None:
        row = self._conn.execute("SELECT * FROM storages WHERE name = ?", (name,)).fetchone()
        return _storage(row) if row else None

    def get_storage(self, name: str) -> StorageRow:
        row = self.find_storage(name)
        if row is None:
            known = ", ".join(s.name for s in self.storages()) or "none"
            raise NotFound(
                f"storage {name!r} does not exist (attached: {known}); see `neon storage list`"
            )
        return row

    @staticmethod
    def insert_storage(
        cur: sqlite3.Cursor,
        name: str,
        type_: str,
        options: dict[str, str],
        *,
        or_ignore: bool = False,
    ) -> None:
        verb = "INSERT OR IGNORE" if or_ignore else "INSERT"
        cur.execute(
            f"{verb} INTO storages(name, type, options, created_at) VALUES (?, ?, ?, ?)",
            (name, type_, json.dumps(options, sort_keys=True), time.time()),
        )

    # nodes

    def nodes(self) -> list[NodeRow]:
        rows = self._conn.execute("SELECT * FROM nodes ORDER BY created_at, id").fetchall()
        return [_node(r) for r in rows]

    def find_node(self, ref: str) -> NodeRow | None:
        """A node by ID (primary1) or data directory name (pgdata1): the one rule every
        command uses. `pg create` refuses names that look like IDs, so both never compete (an
        older home's collision resolves to the ID)."""
        row = self._conn.execute(
            "SELECT * FROM nodes WHERE id = ? OR pgdata = ? ORDER BY id = ? DESC",
            (ref, ref, ref),
        ).fetchone()
        return _node(row) if row else None

    def get_node(self, ref: str) -> NodeRow:
        node = self.find_node(ref)
        if node is None:
            known = ", ".join(n.id for n in self.nodes()) or "none"
            raise NotFound(f"node {ref!r} does not exist (known: {known}); see `neon pg list`")
        return node

    def snapshot_name(self, name: str) -> str:
        """PGDATA@TAG, PGDATA a node's ID or data directory name, as the pageserver names it:
        `<data directory name>@TAG`. A name whose node is gone stays as given (snapshots
        outlive their node). An imported snapshot's bare name stays as given."""
        if "@" not in name:
            return name
        ref, tag = split_snapshot_name(name)
        node = self.find_node(ref)
        return f"{node.pgdata}@{tag}" if node is not None else name

    # replicas

    def replicas(self, primary_id: str | None = None) -> list[ReplicaRow]:
        rows = self._conn.execute(
            "SELECT * FROM replicas WHERE ? IS NULL OR primary_id = ? ORDER BY created_at, id",
            (primary_id, primary_id),
        ).fetchall()
        return [_replica(r) for r in rows]

    def find_replica(self, name: str) -> ReplicaRow | None:
        row = self._conn.execute("SELECT * FROM replicas WHERE name = ?", (name,)).fetchone()
        return _replica(row) if row else None

    # read-only servers over snapshots

    def snapshot_server(self, name: str) -> dict[str, Any] | None:
        row = self._conn.execute(
            "SELECT name, datadir, port FROM snapshot_servers WHERE name = ?", (name,)
        ).fetchone()
        return dict(row) if row else None

    def snapshot_server_on(self, port: int) -> dict[str, Any] | None:
        row = self._conn.execute(
            "SELECT name, datadir, port FROM snapshot_servers WHERE port = ?", (port,)
        ).fetchone()
        return dict(row) if row else None

    def snapshot_server_ports(self) -> set[int]:
        return {r[0] for r in self._conn.execute("SELECT port FROM snapshot_servers")}

    # pageservers

    def pageserver(self, name: str = "local") -> PageserverRow | None:
        row = self._conn.execute("SELECT * FROM pageservers WHERE name = ?", (name,)).fetchone()
        if row is None:
            return None
        return PageserverRow(
            row["name"], row["host"], row["port"], row["http_port"], bool(row["local"])
        )

    @staticmethod
    def upsert_pageserver(cur: sqlite3.Cursor, row: PageserverRow) -> None:
        cur.execute(
            "INSERT INTO pageservers(name, host, port, http_port, local) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(name) DO UPDATE SET host = excluded.host, port = excluded.port, "
            "http_port = excluded.http_port, local = excluded.local",
            (row.name, row.host, row.port, row.http_port, int(row.local)),
        )


RETIRED_STORAGE_OPTIONS = ("compression",)
"""Options older versions stored and that never did anything (layers are always
zstd-compressed): dropped on read so no listing shows them."""


_NODE_COLUMNS = (
    "id, pgdata, storage, datadir, port, role, superuser, replication_user, state, "
    "creator_pid, created_at, extra"
)
_LOCAL_PORTS = (
    "CREATE UNIQUE INDEX IF NOT EXISTS nodes_local_port ON nodes(port) WHERE role != 'attached'"
)
"""Nodes this home runs own their port on 127.0.0.1; servers attached elsewhere
(`neon pg attach`) may share a port number on other hosts."""


def _migrate(cur: sqlite3.Cursor) -> None:
    """Bring an older registry to SCHEMA_VERSION, in the caller's transaction.

    Version 2: `nodes.port` is unique among the nodes this home runs only (a partial index),
    no longer a column constraint, which SQLite can drop only by rebuilding the table."""
    row = cur.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    version = int(row[0])
    if version > SCHEMA_VERSION:
        raise Unavailable(
            f"the registry was written by a newer pg-neon (schema {version}, this one knows "
            f"{SCHEMA_VERSION}); upgrade pg-neon"
        )
    if version < 2:
        create = _SCHEMA[_SCHEMA.index("CREATE TABLE IF NOT EXISTS nodes") :]
        create = create[: create.index(";")].replace(" nodes (", " nodes_v2 (", 1)
        cur.execute(create)
        cur.execute(f"INSERT INTO nodes_v2({_NODE_COLUMNS}) SELECT {_NODE_COLUMNS} FROM nodes")
        cur.execute("DROP TABLE nodes")
        cur.execute("ALTER TABLE nodes_v2 RENAME TO nodes")
    cur.execute(_LOCAL_PORTS)
    cur.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))


def _use_wal_journal(conn: sqlite3.Connection, wait_s: float = 30.0) -> None:
    """Put a registry in WAL mode (once per file: the mode is stored in it).

    The switch needs an exclusive lock. Commands opening a new registry at once each hold a
    shared lock while asking for it, and SQLite answers that deadlock with an immediate
    "database is locked" without calling the busy handler; so the switch is retried here.
    """
    deadline = time.monotonic() + wait_s
    delay = 0.005
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def _open_read_only(path: Path) -> sqlite3.Connection:
    """The registry of a home we cannot write (a read-only mount): reads work, a write fails
    with "attempt to write a readonly database" (cli/main.py turns that into one line).
    Without the right to create its -shm file, SQLite reads a WAL database only as immutable;
    the last writer's close checkpointed it into the main file."""
    for query in ("mode=ro", "mode=ro&immutable=1"):
        conn = sqlite3.connect(f"{path.absolute().as_uri()}?{query}", uri=True, timeout=30)
        conn.row_factory = sqlite3.Row
        try:
            conn.execute("SELECT count(*) FROM meta").fetchone()
        except sqlite3.OperationalError:
            conn.close()
            continue
        return conn
    raise Unavailable(f"the registry {path} cannot be read on this read-only filesystem")


def registry_error(exc: sqlite3.Error, path: Path) -> NeonError:
    """One line for a failed registry operation (a full or read-only filesystem, mostly)."""
    text = str(exc)
    if "readonly" in text or "read-only" in text:
        return Unavailable(
            f"the registry {path} is read-only (its filesystem or directory cannot be written); "
            "this command changes state, read-only commands such as `neon pg list` still work"
        )
    if "full" in text or "disk I/O" in text:
        return error_from_os(OSError(errno.ENOSPC, f"{text} (SQLite)"), path)
    return NeonError(f"the registry {path}: {text}")


def _storage(row: sqlite3.Row) -> StorageRow:
    options = {
        k: v for k, v in json.loads(row["options"]).items() if k not in RETIRED_STORAGE_OPTIONS
    }
    return StorageRow(row["name"], row["type"], options, row["created_at"])


def _node(row: sqlite3.Row) -> NodeRow:
    return NodeRow(
        id=row["id"],
        pgdata=row["pgdata"],
        storage=row["storage"],
        datadir=Path(row["datadir"]),
        port=row["port"],
        role=row["role"],
        superuser=row["superuser"],
        replication_user=row["replication_user"],
        state=row["state"],
        creator_pid=row["creator_pid"],
        created_at=row["created_at"],
        extra=json.loads(row["extra"]),
    )


def _replica(row: sqlite3.Row) -> ReplicaRow:
    return ReplicaRow(
        id=row["id"],
        name=row["name"],
        primary_id=row["primary_id"],
        datadir=Path(row["datadir"]),
        port=row["port"],
        snapshot=row["snapshot"],
        state=row["state"],
        creator_pid=row["creator_pid"],
        created_at=row["created_at"],
        extra=json.loads(row["extra"]),
    )
