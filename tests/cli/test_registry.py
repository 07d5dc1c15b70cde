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
