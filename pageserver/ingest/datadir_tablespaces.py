"""The non-default tablespaces of a data directory on disk: where their files are, and the
location to record for each in the page history.

``pg_tblspc/OID`` is a symlink to the tablespace's LOCATION, or a plain directory for an
in-place one (create_tablespace_directories, src/backend/commands/tablespace.c); either holds
``PG_15_202209061/<db>/``. The location recorded is the symlink's target ("" for a directory),
unless a ``tablespace_map`` file in the root names it: a recovered base backup
(cli/backup_tablespaces.py) keeps its tablespaces in place inside the private recovery
directory and writes the source's locations there, in PostgreSQL's own format
(pg15/tablespace_map.py), so the history records where they were on the source.
"""

from __future__ import annotations

from pathlib import Path

from pg15.datadir_layout import TABLESPACE_VERSION_DIRECTORY
from pg15.tablespace_map import TABLESPACE_MAP, parse_tablespace_map
from proto.errors import InvalidArgument


def tablespaces(datadir: Path) -> dict[int, Path]:
    """OID -> the PG_15_202209061 directory of every pg_tblspc entry (through its symlink);
    InvalidArgument for an entry whose files are not there (a dangling symlink)."""
    found: dict[int, Path] = {}
    tblspc = datadir / "pg_tblspc"
    if not tblspc.is_dir():
        return found
    for entry in sorted(tblspc.iterdir()):
        if not entry.name.isdigit():
            continue  # not a tablespace (PostgreSQL only looks up OIDs there)
        if not entry.is_dir():
            what = "a dangling symlink" if entry.is_symlink() else "not a directory"
            raise InvalidArgument(f"tablespace {entry} is {what}; restore its files first")
        found[int(entry.name)] = entry / TABLESPACE_VERSION_DIRECTORY
    return found


def tablespace_locations(datadir: Path) -> dict[int, str]:
    """OID -> location ("" = in-place) of the directory's tablespaces (see the docstring)."""
    named: dict[int, str] = {}
    map_file = datadir / TABLESPACE_MAP
    if map_file.is_file():
        named = parse_tablespace_map(map_file.read_bytes(), str(map_file))
    locations: dict[int, str] = {}
    for oid in tablespaces(datadir):
        link = datadir / "pg_tblspc" / str(oid)
        if oid in named:
            locations[oid] = named[oid]
        elif link.is_symlink():
            locations[oid] = str(link.readlink())
        else:
            locations[oid] = ""
    return locations
