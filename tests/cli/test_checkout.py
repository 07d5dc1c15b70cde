"""The checkout swap's durability order, on a real directory tree: power loss cannot be produced
here, so the test records which paths os.fsync reaches, in order, and what existed then."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import pytest

from cli import checkout, checkout_files
from cli.registry import NodeRow


def node_at(datadir: Path) -> NodeRow:
    return NodeRow(
        "primary1", "pgdata1", "local", datadir, 5432, "primary", "neon", "repl", "ready", None,
        time.time(), {},
    )  # fmt: skip


def make_tree(root: Path, label: str) -> None:
    (root / "base" / "1").mkdir(parents=True)
    (root / "global").mkdir()
    (root / "PG_VERSION").write_text("15\n")
    (root / "base" / "1" / "1259").write_bytes(label.encode() * 100)
    (root / "global" / "pg_control").write_bytes(b"\0" * 64)


def test_swap_is_made_durable_in_the_order_the_journal_relies_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = tmp_path / "storage"
    live = storage / "pgdata1"
    new = storage / "pgdata1.checkout"
    node = node_at(live)
    make_tree(live, "old")
    make_tree(new, "new")
    (new / "postgresql.conf").write_text("port = 5432\n")
    journal = json.dumps({"snapshot": "pgdata1@s", "old_timeline": "aa"})
    (storage / "pgdata1.checkout.json").write_text(journal)
    new_files = {p for p in new.rglob("*")} | {new}

    synced: list[tuple[Path, frozenset[str]]] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        synced.append((path, frozenset(p.name for p in storage.iterdir())))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    checkout._seal(new, journal)
    checkout._swap(node)
    checkout._finish(node)

    paths = [p for p, _ in synced]
    marker = new / checkout.COMPLETE_MARKER
    marker_at = next(i for i, p in enumerate(paths) if p.name.startswith(marker.name))
    # 1. Every file and directory of the rebuilt tree, each file before its directory and
    #    each directory after its subdirectories, all before the marker.
    tree = paths[:marker_at]
    assert set(tree) == new_files
    for i, path in enumerate(tree):
        if path != new:
            assert tree.index(path.parent) > i, f"{path.parent} synced before {path}"
    # 2. The marker (written as a temp file and renamed), then its directory.
    assert paths[marker_at + 1] == new
    # 3. The parent after the first rename (old moved away, new not yet in place), after the
    #    second (new in place), and after the journal is gone (old deleted first).
    parent_syncs = [names for p, names in synced[marker_at + 2 :] if p == storage]
    assert parent_syncs == [
        frozenset({"pgdata1.old", "pgdata1.checkout", "pgdata1.checkout.json"}),
        frozenset({"pgdata1.old", "pgdata1", "pgdata1.checkout.json"}),
        frozenset({"pgdata1"}),
    ]
    assert len(synced) == marker_at + 2 + 3
    assert (live / "base" / "1" / "1259").read_bytes() == b"new" * 100
    assert not (live / checkout.COMPLETE_MARKER).exists()


def test_a_marker_equal_to_the_journal_in_the_live_directory_means_the_swap_happened(
    tmp_path: Path,
) -> None:
    """Power lost after the swap, before the journal went: recovery only cleans up (it must
    not rebuild, which would rename the new live directory away)."""
    live = tmp_path / "pgdata1"
    make_tree(live, "new")
    make_tree(tmp_path / "pgdata1.old", "old")
    journal = json.dumps({"snapshot": "pgdata1@s", "old_timeline": "aa"})
    (tmp_path / "pgdata1.checkout.json").write_text(journal)
    (live / checkout.COMPLETE_MARKER).write_text(journal)
    (tmp_path / ".pgdata1.checkout.abcd1234.tar").write_bytes(b"x")
    (tmp_path / "pgdata1.checkout.tmp-abcd1234").mkdir()
    app = None  # no pageserver call may happen on this path
    assert checkout.finish_pending(app, node_at(live))  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pgdata1"]
    assert (live / "base" / "1" / "1259").read_bytes() == b"new" * 100


def test_a_pg_wal_that_cannot_be_moved_stays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pg_wal that is a mount point cannot be renamed (EBUSY, EXDEV: no mount can be made
    here, so the rename is made to fail): the checkout goes on with it in place, as with a
    linked pg_wal, instead of failing once `.applying` exists."""
    from cli import checkout_delta

    node = node_at(tmp_path / "pgdata1")
    (node.datadir / "pg_wal").mkdir(parents=True)
    (node.datadir / "pg_wal" / "000000010000000000000001").write_bytes(b"x")

    def busy(src: object, dst: object) -> None:
        raise OSError(errno.EBUSY, "Device or resource busy")

    monkeypatch.setattr(checkout_delta.os, "rename", busy)
    checkout_delta._set_wal_aside(node)
    assert (node.datadir / "pg_wal" / "000000010000000000000001").exists()
    assert not checkout_files.old_wal_dir(node).exists()


def test_a_set_aside_directory_is_deleted_also_without_rm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The old pg_wal is deleted by an `rm -rf` the command does not wait for; where none can
    be started (no rm on PATH), it is deleted before the call returns, not left."""
    from cli import checkout_delta

    for path in ("/nonexistent", os.environ.get("PATH", "")):
        node = node_at(tmp_path / f"pgdata{len(path)}")
        (node.datadir / "pg_wal").mkdir(parents=True)
        (node.datadir / "pg_wal" / "000000010000000000000001").write_bytes(b"x")
        monkeypatch.setenv("PATH", path)
        checkout_delta._set_wal_aside(node)
        assert not (node.datadir / "pg_wal").exists()
        remover = checkout_files.removing.get(checkout_files.old_wal_dir(node))
        if remover is not None:
            remover.wait(timeout=30)
        assert not checkout_files.old_wal_dir(node).exists()
