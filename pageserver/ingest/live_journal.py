"""The journal of a live import (pageserver/ingest/live_import.py): what the CLI appends while
it unpacks a backup, and which of its files it announces. Apart so that the CLI loads none of
the page store to write it.

    neon-live-import 1 PID    the writer (if it dies before `done`, the import fails)
    lsn HEX                   the LSN of the early layers (the backup's start: below the import's)
    file SIZE PATH            a relation segment file, PATH relative to the data directory
                              (global/ or base/DB/), that will hold SIZE bytes once written
    whole INO SIZE MTIME NAME an announced file as the extractor left it (inode, size, mtime in
                              ns), written once the whole tar is unpacked and before anything
                              else (recovery) may write to the directory
    done                      the directory is final (recovered); `failed`: the writer gave up
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from pg15.constants import BLCKSZ, DEFAULTTABLESPACE_OID, GLOBALTABLESPACE_OID
from pg15.datadir_layout import parse_relation_file_name

JOURNAL_NAME = "live-import.journal"
MAGIC = "neon-live-import 1"
EARLY_BYTES = 64 * 1024 * 1024
"""Relation segment files from this size on are imported early: a database's bulk, in few
enough files that the layers between them stay few (at most 16 per GiB)."""


def journal_path(datadir: Path) -> Path:
    return datadir.parent / JOURNAL_NAME


def early_candidate(name: str, size: int) -> bool:
    """Whether the CLI announces a data directory's member `name` of `size` bytes."""
    return size >= EARLY_BYTES and size % BLCKSZ == 0 and file_key(name) is not None


def file_key(name: str) -> tuple[int, int, int, int, int] | None:
    """(spc, db, rel, fork, segno) of a relation segment file's relative path in global/ or
    base/DB/; None for any other path."""
    parts = [p for p in PurePosixPath(name).parts if p != "."]
    if len(parts) == 2 and parts[0] == "global":
        spc, db = GLOBALTABLESPACE_OID, 0
    elif len(parts) == 3 and parts[0] == "base" and parts[1].isdigit():
        spc, db = DEFAULTTABLESPACE_OID, int(parts[1])
    else:
        return None
    parsed = parse_relation_file_name(parts[-1])
    if parsed is None:
        return None
    rel, fork, segno = parsed
    return spc, db, rel, fork, segno


class JournalWriter:
    """The CLI's end: creates the journal (refusing an existing one) and appends events, each
    line one write (O_APPEND), so the reader never sees half a line as a whole one."""

    def __init__(self, datadir: Path) -> None:
        self.path = journal_path(datadir)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND
        self._fd: int | None = os.open(self.path, flags, 0o600)
        self._line(f"{MAGIC} {os.getpid()}")

    def lsn(self, lsn: int) -> None:
        self._line(f"lsn {lsn:X}")

    def file(self, size: int, name: str) -> None:
        self._line(f"file {size} {name}")

    def whole(self, name: str, st: os.stat_result) -> None:
        self._line(f"whole {st.st_ino} {st.st_size} {st.st_mtime_ns} {name}")

    def done(self) -> None:
        self._line("done")
        self.close()

    def failed(self) -> None:
        if self._fd is not None:
            self._line("failed")
            self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _line(self, text: str) -> None:
        if self._fd is not None:
            os.write(self._fd, text.encode() + b"\n")
