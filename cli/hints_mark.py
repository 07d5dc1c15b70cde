"""The mark a node's data directory keeps of since when its hint bits are WAL-logged.

A delta checkout (pageserver/basebackup/checkout_delta.py) keeps the pages of the stopped
directory that no WAL changed; that is right only if every hint PostgreSQL set in them since
the delta's first checkpoint was WAL-logged, as `wal_log_hints` makes it (the CLI's nodes run
with it, cli/nodes.py). The file `neon_hints_logged_from` holds an LSN L: every hint in the
directory set at a WAL position at or after L was WAL-logged. It is kept by:

* a full rebuild (a fresh directory has no hints at all): L = 0;
* every start by the CLI: once the server runs, pg_control holds the running value of
  wal_log_hints (XLogReportParameters, src/backend/access/transam/xlog.c, updates it before
  connections are accepted). Off (e.g. ALTER SYSTEM): the mark is removed. On, no mark (a node
  made before it): L = pg_control's checkpoint, which is past every position of earlier runs
  (a clean start's shutdown checkpoint, or the end-of-recovery checkpoint after a crash).

No mark, no delta: the checkout rebuilds the whole directory.
"""

from __future__ import annotations

from pathlib import Path

from cli.pg_files import read_pg_file, write_pg_file
from pg15.pg_control import read_control_file
from proto.errors import CorruptData

HINTS_MARK = "neon_hints_logged_from"
WAL_LOG_HINTS_OFFSET = 176
"""ControlFileData.wal_log_hints (src/include/catalog/pg_control.h, PostgreSQL 15): after
backupEndRequired (168) and wal_level (int, 172)."""


def hints_logged_from(datadir: Path) -> int | None:
    try:
        raw = read_pg_file(datadir, HINTS_MARK)
        return None if raw is None else int(raw.decode().strip())
    except (CorruptData, UnicodeDecodeError, ValueError):
        return None  # no usable mark: the checkout rebuilds the whole directory


def write_mark(datadir: Path, lsn: int) -> None:
    write_pg_file(datadir, HINTS_MARK, f"{lsn}\n".encode())


def note_start(datadir: Path) -> None:
    """After the CLI started a server on `datadir`: keep the mark true (see the module)."""
    control = read_control_file(datadir)
    if not control.raw[WAL_LOG_HINTS_OFFSET]:
        (datadir / HINTS_MARK).unlink(missing_ok=True)
    elif hints_logged_from(datadir) is None:
        write_mark(datadir, control.checkpoint_lsn)
