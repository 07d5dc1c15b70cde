"""The followed nodes' file: private, and each change durable, its rename included."""

from __future__ import annotations

import dataclasses
import stat
from pathlib import Path

import pytest

import durable_files
from pageserver.follow.followed_nodes import FollowedNode, FollowedNodes


def test_each_change_is_durable_rename_included_and_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node's `paused` mark lost to a power cut (the rename never reached the disk) would
    have the restarted pageserver connect to whoever took the stopped node's port: the file's
    directory is fsynced after each change, the file holds the password, 0600."""
    synced: list[Path] = []
    real = durable_files.fsync_dir

    def fsync_dir(path: Path) -> None:
        synced.append(Path(path))
        real(path)

    monkeypatch.setattr(durable_files, "fsync_dir", fsync_dir)
    path = tmp_path / "nodes.json"
    nodes = FollowedNodes(path)
    node = FollowedNode("n1", "127.0.0.1", 5432, "neon", "secret")
    nodes.add(node)
    assert synced == [tmp_path]
    nodes.add(dataclasses.replace(node, paused=True))
    assert synced == [tmp_path, tmp_path]
    assert FollowedNodes(path).get("n1").paused
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nodes.json"]  # no temporary left
    nodes.remove("n1")
    assert len(synced) == 3 and not FollowedNodes(path).all()


def test_a_temporary_a_crash_left_is_removed(tmp_path: Path) -> None:
    """A temporary copy a crash left (it holds the nodes' passwords) is removed when the file
    is next opened; the file itself is read."""
    path = tmp_path / "nodes.json"
    FollowedNodes(path).add(FollowedNode("n1", "127.0.0.1", 5432, "neon", "secret"))
    for left in ("nodes.json.tmp", "nodes.json" + durable_files.TEMP_SUFFIX):
        (tmp_path / left).write_text("[]")
    assert [n.node_id for n in FollowedNodes(path).all()] == ["n1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nodes.json"]
