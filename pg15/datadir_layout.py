"""Where things live in a PostgreSQL 15 data directory, and how its files are named.

Relation files: `src/common/relpath.c` (GetRelationPath: `global/<rel>`, `base/<db>/<rel>`,
fork suffix, `.N` for segments past the first GiB); SLRU segments: `src/backend/access/transam/
slru.c` (SlruFileName, four or more hex digits); two-phase state: `twophase.c` (TwoPhaseFilePath,
the xid in eight hex digits); the directories initdb creates: `src/bin/initdb/initdb.c`
(subdirs[]); tablespaces: `src/include/catalog/catalog.h` (TABLESPACE_VERSION_DIRECTORY) and
`src/backend/commands/tablespace.c` (pg_tblspc/OID is a symlink to the LOCATION, or a plain
directory for an in-place tablespace; either holds the version directory, which holds one
directory per database).
"""

from __future__ import annotations

import re
from typing import NamedTuple

from pg15.constants import DEFAULTTABLESPACE_OID, FORK_SUFFIX, GLOBALTABLESPACE_OID
from proto.errors import InvalidArgument

PG_VERSION_FILE_CONTENT = b"15\n"
"""What `PG_VERSION` holds, in the root and in every `base/<db>`."""

# initdb's subdirs (PG15) minus base/1, which comes with the databases.
PGDATA_SUBDIRS = (
    "base",
    "global",
    "pg_commit_ts",
    "pg_dynshmem",
    "pg_logical",
    "pg_logical/mappings",
    "pg_logical/snapshots",
    "pg_multixact",
    "pg_multixact/members",
    "pg_multixact/offsets",
    "pg_notify",
    "pg_replslot",
    "pg_serial",
    "pg_snapshots",
    "pg_stat",
    "pg_stat_tmp",
    "pg_subtrans",
    "pg_tblspc",
    "pg_twophase",
    "pg_wal",
    "pg_wal/archive_status",
    "pg_xact",
)

TABLESPACE_VERSION_DIRECTORY = "PG_15_202209061"
"""`PG_<major>_<catalog version>`: the directory inside a tablespace that belongs to PG 15."""

SLRU_SEGMENT_FILE = re.compile(r"^[0-9A-F]{4,6}\Z")
TWOPHASE_FILE = re.compile(r"^[0-9A-F]{8}\Z")
WAL_SEGMENT_MEMBER = re.compile(r"pg_wal/[0-9A-F]{24}")
"""A WAL segment's path in a data directory (src/include/access/xlog_internal.h XLogFileName:
the timeline, the log and the segment number in eight hex digits each), matched whole."""
_REL_FILE = re.compile(r"([0-9]+)(_fsm|_vm|_init)?(?:\.([0-9]+))?")
_SUFFIX_FORK = {suffix: fork for fork, suffix in FORK_SUFFIX.items()}


class RelationFile(NamedTuple):
    """A parsed relation segment file name: `<relfilenode>[_fork][.<segno>]`."""

    relfilenode: int
    fork: int
    segno: int


def parse_relation_file_name(name: str) -> RelationFile | None:
    """The relation, fork and segment of a file in global/ or base/<db>/; None for other
    files there (pg_filenode.map, PG_VERSION, pg_internal.init, temporary `t3_16384`)."""
    m = _REL_FILE.fullmatch(name)  # not `$`: it matches before a final newline too
    if m is None:
        return None
    return RelationFile(int(m.group(1)), _SUFFIX_FORK[m.group(2) or ""], int(m.group(3) or 0))


def tablespace_link(spc: int) -> str:
    """pg_tblspc/OID: the symlink (or in-place directory) of a non-default tablespace."""
    if spc in (GLOBALTABLESPACE_OID, DEFAULTTABLESPACE_OID):
        raise InvalidArgument(f"tablespace {spc} is a default tablespace, not in pg_tblspc")
    return f"pg_tblspc/{spc}"


def tablespace_version_directory(spc: int) -> str:
    """pg_tblspc/OID/PG_15_202209061: where PostgreSQL 15 keeps a tablespace's databases."""
    return f"{tablespace_link(spc)}/{TABLESPACE_VERSION_DIRECTORY}"


def database_directory(spc: int, db: int) -> str:
    """The directory inside PGDATA of a database's files in tablespace `spc` (relpath.c
    GetDatabasePath); (1664, 0) is the shared catalogs."""
    if spc == GLOBALTABLESPACE_OID:
        return "global"
    if spc == DEFAULTTABLESPACE_OID:
        return f"base/{db}"
    return f"{tablespace_version_directory(spc)}/{db}"


def relation_file_name(spc: int, db: int, rel: int, fork: int, segno: int = 0) -> str:
    """Path inside PGDATA of one segment file of a relation fork."""
    base = database_directory(spc, db)
    return f"{base}/{rel}{FORK_SUFFIX[fork]}" + (f".{segno}" if segno else "")


def slru_file_name(segno: int) -> str:
    return f"{segno:04X}"


def twophase_file_name(xid: int) -> str:
    return f"{xid:08X}"
