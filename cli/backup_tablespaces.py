"""The tablespaces of a base backup being imported: placed in place inside the recovery
directory, their source locations kept for the page history.

A backup's tablespaces arrive apart from its main directory: `pg_basebackup -F tar` writes
`OID.tar[.gz|.zst]` beside base.tar (contents: `PG_15_202209061/<db>/...`), and base.tar's
`tablespace_map` names the source's locations (pg15/tablespace_map.py); BASE_BACKUP (asked
without TABLESPACE_MAP, so that in-place tablespaces stay in base.tar) sends one archive per
tablespace and base.tar's pg_tblspc/OID symlinks, which the extractor records instead of
creating (datadir_files/untar.py); plain output has pg_tblspc/OID symlinks to where
pg_basebackup wrote them. pg_basebackup -F tar leaves in-place tablespaces out (basebackup.c
sendDir skips pg_tblspc's directories when it writes a tablespace_map): import those from
plain output, the stopped directory or basebackup://. Nothing in such a backup says it lacks
one, so after recovery the catalog's tablespaces (pg_tablespace, read in single-user mode) are
checked against the directories that arrived, and a missing one refuses the import by OID.

Recovery (cli/snapshot_import.py) runs in a private directory and must never write to those
locations: they belong to the source server, which may still be running. So every tablespace
is unpacked **in place**, as the directory pgdata/pg_tblspc/OID, which PostgreSQL reads through
the same path as a symlink. The backup's `tablespace_map` is taken out first: with it, recovery
would replace pg_tblspc/OID by a symlink to the source's location (and it refuses a non-empty
directory there: remove_tablespace_symlink, src/backend/commands/tablespace.c). After recovery
the source's locations are written back as `tablespace_map`, which `import_datadir` reads to
record where each tablespace was (pageserver/ingest/import_datadir.py). The recovered
directory is never started again, so the file has no other effect.

Limit: a CREATE TABLESPACE replayed by recovery (run on the source while the backup was taken)
creates its directory at its recorded location, as PostgreSQL's own recovery of such a backup
does.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from cli.pg_files import write_pg_file
from cli.pgbin import run_pg
from cli.tablespace_mapping import OPTION, mapped
from cli.waldump import collect_segments, iter_records
from pg15.constants import RM_TBLSPC_ID
from pg15.lsn import format_lsn, parse_lsn
from pg15.rmgr import tblspc
from pg15.tablespace_map import TABLESPACE_MAP, format_tablespace_map, parse_tablespace_map
from proto.errors import Conflict, CorruptData, ExternalCommandFailed, NotFound


def tablespace_archive_oid(name: str) -> int | None:
    """The OID of a `pg_basebackup -F tar` tablespace archive name (`16385.tar.gz`), or None."""
    stem, dot, suffix = name.partition(".")
    if not dot or not stem.isdigit() or suffix not in ("tar", "tar.gz", "tar.zst"):
        return None
    return int(stem)


def tablespace_archives(directory: Path) -> dict[int, Path]:
    """OID -> archive of every tablespace archive in `pg_basebackup -F tar` output."""
    found: dict[int, Path] = {}
    for path in sorted(directory.iterdir()):
        oid = tablespace_archive_oid(path.name)
        if oid is not None and path.is_file():
            if oid in found:
                raise CorruptData(f"{directory} has two archives of tablespace {oid}")
            found[oid] = path
    return found


def tablespace_target(pgdata: Path, oid: int) -> Path:
    """Where tablespace `oid` of a backup is unpacked: pgdata/pg_tblspc/OID (in place)."""
    return pgdata / "pg_tblspc" / str(oid)


def move_in_place(pgdata: Path, unpacked: Mapping[int, Path]) -> None:
    """Move tablespaces unpacked elsewhere (before base.tar arrived) into pgdata, in place."""
    for oid, path in sorted(unpacked.items()):
        target = tablespace_target(pgdata, oid)
        if target.exists() or target.is_symlink():
            raise CorruptData(f"the backup has pg_tblspc/{oid} and an archive of tablespace {oid}")
        os.rename(path, target)


def plain_tablespace_locations(source: Path) -> dict[int, str]:
    """OID -> symlink target of each pg_tblspc/OID symlink of a plain backup or data
    directory (in-place ones are directories: not listed)."""
    tblspc = source / "pg_tblspc"
    if not tblspc.is_dir():
        return {}
    return {
        int(entry.name): str(entry.readlink())
        for entry in sorted(tblspc.iterdir())
        if entry.name.isdigit() and entry.is_symlink()
    }


def check_tablespace_links(source: Path, mappings: Mapping[str, str]) -> None:
    """Each tablespace a directory links to must be there to be read: at its location, or
    at the NEW a --tablespace-mapping gives for it (cli/tablespace_mapping.py)."""
    for oid, location in plain_tablespace_locations(source).items():
        where = mapped(mappings, location)
        if where != location and not Path(where).is_dir():
            raise NotFound(f"{OPTION} {location}={where}: {where} is not a directory")
        if where == location and not (source / "pg_tblspc" / str(oid)).is_dir():
            raise NotFound(
                f"tablespace {oid} of {source} is at {location}, which does not exist; put its "
                f"files back there, or give {OPTION} {location}=DIR where they are"
            )


def take_tablespace_map(pgdata: Path) -> dict[int, str]:
    """The backup's tablespace locations, its `tablespace_map` removed (see the docstring)."""
    path = pgdata / TABLESPACE_MAP
    if not path.is_file():
        return {}
    locations = parse_tablespace_map(path.read_bytes(), f"the backup's {TABLESPACE_MAP}")
    path.unlink()
    return locations


def check_in_place(pgdata: Path, oids: Iterable[int]) -> None:
    """Every tablespace the backup names must have arrived (an archive missing from -F tar
    output would make recovery fail on its files much later, less clearly)."""
    missing = [oid for oid in sorted(oids) if not tablespace_target(pgdata, oid).is_dir()]
    if missing:
        names = ", ".join(str(oid) for oid in missing)
        raise CorruptData(
            f"the backup's {TABLESPACE_MAP} names tablespace(s) {names} but their files are "
            "missing (for pg_basebackup -F tar output, the OID.tar archives beside base.tar)"
        )


def backup_start_lsn(pgdata: Path) -> int:
    """Where recovery of the backup begins: backup_label's START WAL LOCATION."""
    label = (pgdata / "backup_label").read_text(errors="replace")
    match = re.search(r"^START WAL LOCATION: ([0-9A-Fa-f]+/[0-9A-Fa-f]+)", label, re.M)
    if match is None:
        raise CorruptData("the backup's backup_label has no START WAL LOCATION line")
    return parse_lsn(match.group(1))


def refuse_replayed_locations(pgdata: Path) -> None:
    """A CREATE TABLESPACE at an absolute location in the WAL recovery replays (one that ran
    while the backup was taken): its replay makes pg_tblspc/OID a symlink to the location
    and writes that tablespace's files there (create_tablespace_directories, tablespace.c),
    which is the source's own directory: refused before recovery starts. In-place ones are
    created inside the private directory and are fine."""
    segments, seg_size = collect_segments([pgdata / "pg_wal"])
    for record in iter_records(segments, seg_size, backup_start_lsn(pgdata), None):
        if record.rmgr_id != RM_TBLSPC_ID:
            continue
        parsed = tblspc.decode(record.info, record.main_data)
        if isinstance(parsed, tblspc.TblspcCreate) and not parsed.in_place:
            raise Conflict(
                f"the backup's WAL creates tablespace {parsed.ts_id} at {parsed.location} "
                f"(CREATE TABLESPACE ran during the backup, at {format_lsn(record.lsn)}): "
                f"recovering it would write into {parsed.location}, the source's directory; "
                "take the backup again"
            )


def catalog_tablespaces(pgdata: Path) -> set[int]:
    """The OIDs of the non-default tablespaces pg_tablespace lists in a cleanly shut-down
    directory, read by PostgreSQL in single-user mode (no role name needed; it adds one
    shutdown checkpoint, no change to data)."""
    sql = "SELECT oid::text AS spc FROM pg_catalog.pg_tablespace WHERE oid >= 16384;\n"
    failure: ExternalCommandFailed | None = None
    for db in ("template1", "postgres"):  # any database will do: pg_tablespace is shared
        try:
            proc = run_pg(
                "postgres",
                ["--single", "-D", str(pgdata), "-c", "log_statement=none", db],
                input=sql,
                what="listing the backup's tablespaces",
            )
        except ExternalCommandFailed as exc:
            failure = exc
            continue
        return {int(oid) for oid in re.findall(r'\bspc = "(\d+)"', proc.stdout)}
    assert failure is not None
    raise failure


def check_catalog_tablespaces(pgdata: Path) -> None:
    """Every tablespace of the recovered catalog must have its files: pg_basebackup -F tar
    leaves in-place ones out (see the module docstring), and their tables would be missing
    from the snapshot without a word."""
    present = catalog_tablespaces(pgdata)
    missing = sorted(oid for oid in present if not tablespace_target(pgdata, oid).is_dir())
    if missing:
        names = ", ".join(str(oid) for oid in missing)
        raise CorruptData(
            f"the backup has no files for tablespace{'s' if len(missing) > 1 else ''} {names} "
            "(an in-place tablespace: pg_basebackup -F tar leaves them out); import the server "
            "over basebackup://, from plain pg_basebackup output or from its stopped data "
            "directory"
        )


def write_tablespace_locations(pgdata: Path, locations: Mapping[int, str]) -> None:
    """After recovery: the source's locations, for import_datadir (see the docstring)."""
    if locations:
        write_pg_file(pgdata, TABLESPACE_MAP, format_tablespace_map(locations))
