"""The registry under concurrent first use: commands started at once on a new NEON_HOME."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from cli.registry import Registry


def _open_and_write(path: str, name: str) -> str:
    registry = Registry(Path(path))
    try:
        with registry.transaction() as cur:
            Registry.insert_storage(cur, name, "local", {})
        return "ok"
    except Exception as exc:  # returned, so the parent shows which process failed and why
        return f"{type(exc).__name__}: {exc}"
    finally:
        registry.close()


def test_processes_opening_a_new_registry_at_once_all_succeed(tmp_path: Path) -> None:
    """Each process switches the new file to WAL mode while the others hold shared locks;
    SQLite reports that as "database is locked" without waiting, which failed `pg create`
    run three at a time."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(6) as pool:
        for attempt in range(8):
            path = tmp_path / f"registry{attempt}.db"
            results = pool.starmap(_open_and_write, [(str(path), f"s{i}") for i in range(6)])
            assert results == ["ok"] * 6
            registry = Registry(path)
            assert sorted(s.name for s in registry.storages()) == [f"s{i}" for i in range(6)]
            registry.close()


_V1_NODES = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE storages (name TEXT PRIMARY KEY, type TEXT NOT NULL, options TEXT NOT NULL,
                       created_at REAL NOT NULL);
CREATE TABLE nodes (
    id TEXT PRIMARY KEY, pgdata TEXT NOT NULL UNIQUE,
    storage TEXT NOT NULL REFERENCES storages(name), datadir TEXT NOT NULL UNIQUE,
    port INTEGER NOT NULL UNIQUE, role TEXT NOT NULL, superuser TEXT NOT NULL,
    replication_user TEXT NOT NULL, state TEXT NOT NULL, creator_pid INTEGER,
    created_at REAL NOT NULL, extra TEXT NOT NULL DEFAULT '{}');
INSERT INTO meta VALUES ('schema_version', '1');
INSERT INTO storages VALUES ('local', 'native', '{}', 0);
INSERT INTO nodes VALUES ('primary1', 'pgdata1', 'local', '/d/pgdata1', 5432, 'primary', 'neon',
                          'neon_replication', 'ready', NULL, 1.0, '{"k": 1}');
"""


def _add_node(registry: Registry, node_id: str, port: int, role: str) -> None:
    with registry.transaction() as cur:
        cur.execute(
            "INSERT INTO nodes(id, pgdata, storage, datadir, port, role, superuser, "
            "replication_user, state, created_at) VALUES (?, ?, 'local', ?, ?, ?, 'u', 'u', "
            "'ready', 2.0)",
            (node_id, node_id, f"/d/{node_id}", port, role),
        )


def test_schema_1_registry_is_migrated_keeping_its_nodes(tmp_path: Path) -> None:
    """Version 2 lets attached servers (other hosts) share a port number; nodes this home
    runs keep one port each."""
    import sqlite3

    import pytest

    path = tmp_path / "registry.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(_V1_NODES)
    registry = Registry(path)
    (node,) = registry.nodes()
    assert (node.id, node.port, node.extra) == ("primary1", 5432, {"k": 1})
    _add_node(registry, "db1", 5432, "attached")
    _add_node(registry, "db2", 5432, "attached")
    with pytest.raises(sqlite3.IntegrityError):
        _add_node(registry, "primary2", 5432, "primary")
    registry.close()
    again = Registry(path)  # opening a migrated registry changes nothing
    assert [n.id for n in again.nodes()] == ["primary1", "db1", "db2"]
    version = again._conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    assert version[0] == "2"
    again.close()
