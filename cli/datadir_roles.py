"""The bootstrap superuser of a data directory, read from its files: the role a read-only server
over a snapshot is logged into (its unix socket trusts every role, but a role must exist, and a
hot standby cannot create one). A node's snapshot has ours (`neon`); an attached server's or an
imported database's has whatever its initdb made (`postgres`, a distribution's own name…).

The bootstrap superuser is pg_authid's row with OID 10 (BOOTSTRAP_SUPERUSERID,
src/include/catalog/pg_authid.dat). pg_authid (OID 1260) is a mapped shared catalog: its file
is global/<relfilenode> with the relfilenode from global/pg_filenode.map (1260 until a VACUUM
FULL of it). Its first two columns are `oid oid` and `rolname name` (pg_authid.h), fixed-width,
decoded by pg15/heap_tuple.py. A version whose xmax is set was updated or deleted (ALTER ROLE
writes a new version): versions with no live xmax are preferred, any other is the fallback.
"""

from __future__ import annotations

from pathlib import Path

from cli.pg_files import read_pg_file
from pageserver.reconstruct.catalog_reads import heap_items
from pg15.catalogs import parse_relmap
from pg15.constants import BLCKSZ
from pg15.heap_tuple import Column, decode_fixed_columns, parse_tuple_header
from proto.errors import CorruptData

PG_AUTHID_OID = 1260
BOOTSTRAP_SUPERUSERID = 10
HEAP_XMAX_INVALID = 0x0800  # htup_details.h: t_xmax is invalid/aborted
_COLUMNS = (Column("oid", "oid"), Column("rolname", "name"))


def bootstrap_superuser(datadir: Path) -> str | None:
    """The name of OID 10 in the directory's pg_authid, None when it cannot be read. Both
    files are read through cli/pg_files.py: the CLI, maybe root, reads a directory
    PostgreSQL's account owns (a link there to a FIFO hung the read, to /dev/zero it read
    until memory ran out)."""
    try:
        raw_map = read_pg_file(datadir, "global/pg_filenode.map")
        if raw_map is None:
            return None
        authid = parse_relmap(raw_map).get(PG_AUTHID_OID, PG_AUTHID_OID)
        data = read_pg_file(datadir, f"global/{authid}")
    except (OSError, CorruptData):
        return None
    if data is None:
        return None
    live: str | None = None
    other: str | None = None
    for start in range(0, len(data) - BLCKSZ + 1, BLCKSZ):
        for item in heap_items(data[start : start + BLCKSZ]):
            try:
                header = parse_tuple_header(item)
                values = decode_fixed_columns(item, header, _COLUMNS)
            except CorruptData:
                continue
            if values["oid"] != BOOTSTRAP_SUPERUSERID or not isinstance(values["rolname"], str):
                continue
            if header.xmax == 0 or header.infomask & HEAP_XMAX_INVALID:
                live = values["rolname"]
            else:
                other = values["rolname"]
    return live or other
