"""What a killed download leaves beside its target is removed, even while it is still being
written (cli/extract.py)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from cli.extract import remove_download_leftovers


def test_a_leftover_still_being_written_is_removed_once_its_writer_stops(tmp_path: Path) -> None:
    """A `pg checkout` killed by SIGKILL while the daemon writes its download into
    `<name>.tmp-XXXXXXXX` (through a descriptor of the directory): the daemon stops at its
    next MiB, and the next command's recovery ran meanwhile, so a file it made between the
    removal's listing and its rmdir left the directory behind (CI, session 36). The removal
    goes on until the writer has stopped."""
    target = tmp_path / "pgdata1"
    left = tmp_path / "pgdata1.tmp-ab12cd34"
    (left / "base" / "5").mkdir(parents=True)
    for n in range(1000):  # written before: the removal takes a while over them
        (left / "base" / "5" / f"old{n}").touch()
    fd = os.open(left / "base" / "5", os.O_RDONLY | os.O_DIRECTORY)
    writing = threading.Event()
    made = [0]

    def writer() -> None:
        """Files made through the directory's descriptor for 0.1 s, as the daemon writes."""
        deadline = time.monotonic() + 0.1
        while time.monotonic() < deadline:
            try:
                os.close(os.open(f"{made[0]}", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd))
            except FileNotFoundError:  # its directory removed: the daemon's write fails so
                return
            made[0] += 1
            writing.set()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert writing.wait(5)
        assert remove_download_leftovers(target) == [left]
    finally:
        thread.join()
        os.close(fd)
    assert made[0] > 1 and not left.exists()
