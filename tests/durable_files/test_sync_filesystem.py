"""sync_filesystem: one syncfs(2) for a whole directory's filesystem (a crashed node's data
directory before a checkout seals it, cli/checkout_delta.py), the tree's fsyncs where the C
library has none."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest

import durable_files
from durable_files import sync_filesystem


def test_sync_filesystem_syncs_the_directorys_filesystem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "f").write_bytes(b"x" * 8192)
    called: list[int] = []
    real = ctypes.CDLL(None, use_errno=True)

    class Libc:
        def syncfs(self, fd: int) -> int:
            called.append(fd)
            return int(real.syncfs(fd))

    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: Libc())
    sync_filesystem(tmp_path)
    assert len(called) == 1
    with pytest.raises(NotADirectoryError):
        sync_filesystem(tmp_path / "f")


def test_a_failed_syncfs_raises_naming_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Libc:
        def syncfs(self, fd: int) -> int:
            ctypes.set_errno(5)  # EIO: a write-back error since the last sync
            return -1

    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: Libc())
    with pytest.raises(OSError, match="syncfs failed") as err:
        sync_filesystem(tmp_path)
    assert err.value.filename == str(tmp_path)


def test_without_syncfs_the_tree_is_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    walked: list[Path] = []
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: object())
    monkeypatch.setattr(durable_files, "fsync_tree", lambda root: walked.append(root))
    sync_filesystem(tmp_path)
    assert walked == [tmp_path]
