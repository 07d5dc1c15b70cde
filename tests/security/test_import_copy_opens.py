"""snapshot import's copy of a directory PostgreSQL's account owns (cli/snapshot_import.py,
`_copy_owned_by`) runs as root and follows that account's links: what a link names must be
checked before it is opened for reading, since opening some files acts (a FIFO releases its
writer, /dev/watchdog arms the watchdog, a tape device rewinds). Runs as root, as CI does."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from cli.snapshot_import import _copy_owned_by
from proto.errors import InvalidArgument


def _blocked_in_open(thread: threading.Thread) -> bool:
    """The thread sleeps in the kernel waiting for the FIFO's other end (fifo_open)."""
    task = Path(f"/proc/self/task/{thread.native_id}")
    try:
        return (task / "stat").read_text().rsplit(")", 1)[1].split()[0] == "S"
    except (FileNotFoundError, IndexError):
        return False


def test_a_link_to_a_fifo_is_refused_without_opening_it(tmp_path: Path) -> None:
    assert os.geteuid() == 0, "these tests run as root, as CI does"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    source = tmp_path / "datadir"
    source.mkdir()
    (source / "postgresql.auto.conf").symlink_to(fifo)
    opened = threading.Event()

    def writer() -> None:  # returns once a reader opens the FIFO
        os.close(os.open(fifo, os.O_WRONLY))
        opened.set()

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not _blocked_in_open(thread) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)  # in open(2), past any Python bookkeeping
    copy = _copy_owned_by(source.stat().st_uid)
    try:
        with pytest.raises(InvalidArgument, match="is not a regular file"):
            copy(str(source / "postgresql.auto.conf"), str(tmp_path / "out"))
        assert not opened.wait(0.5), "the copy opened the FIFO for reading"
        assert not (tmp_path / "out").exists()
    finally:
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))  # release the writer
        thread.join(10)


def test_a_regular_file_is_copied_through_its_link(tmp_path: Path) -> None:
    source = tmp_path / "datadir"
    source.mkdir()
    target = tmp_path / "postgresql.conf"
    target.write_bytes(b"shared_buffers = 16MB\n" * 1000)
    (source / "postgresql.conf").symlink_to(target)
    copy = _copy_owned_by(source.stat().st_uid)
    copy(str(source / "postgresql.conf"), str(tmp_path / "out"))
    assert (tmp_path / "out").read_bytes() == target.read_bytes()
