"""The setting a recovering server needs when its data directory has in-place tablespaces.

When archive or standby recovery reaches consistency, PostgreSQL 15 checks that every
pg_tblspc entry is a symlink (CheckTablespaceDirectory, src/backend/access/transam/
xlogrecovery.c) and PANICs on a directory unless allow_in_place_tablespaces is on, which makes
it a WARNING. The directories pg-neon rebuilds have their tablespaces in place
(pageserver/basebackup/tar_stream.py), and so do the backups import recovers
(cli/backup_tablespaces.py), so the read-only servers over snapshots and import's recovery
turn it on when there is one. Clean starts (nodes, checkout) run no such recovery; the setting
only otherwise allows CREATE TABLESPACE ... LOCATION '', so it is not set where not needed.
"""

from __future__ import annotations

from pathlib import Path


def has_in_place_tablespace(datadir: Path) -> bool:
    tblspc = datadir / "pg_tblspc"
    return tblspc.is_dir() and any(
        entry.name.isdigit() and entry.is_dir() and not entry.is_symlink()
        for entry in tblspc.iterdir()
    )


def in_place_tablespace_settings(datadir: Path) -> dict[str, object]:
    """Settings to add to the configuration of a server that recovers on `datadir`."""
    return {"allow_in_place_tablespaces": True} if has_in_place_tablespace(datadir) else {}
