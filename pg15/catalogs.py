"""The system catalogs a page-level reader needs to name relations, in PostgreSQL 15.

Column lists are each catalog's leading fixed-width attributes in attnum order, as in its C
struct (src/include/catalog/pg_class.h, pg_namespace.h, pg_database.h, pg_index.h): every
catalog's fixed part is NOT NULL, so these offsets are GETSTRUCT's. The relation mapper file
is src/backend/utils/cache/relmapper.c (RelMapFile).
"""

from __future__ import annotations

import struct

from pg15.heap_tuple import Column
from proto.errors import CorruptData

# src/include/catalog/pg_*.h: `CATALOG(pg_class,1259,RelationRelationId)` etc.
PG_CLASS_OID = 1259
PG_DATABASE_OID = 1262
PG_NAMESPACE_OID = 2615
PG_INDEX_OID = 2610

PG_CLASS_COLUMNS = (
    Column("oid", "oid"),
    Column("relname", "name"),
    Column("relnamespace", "oid"),
    Column("reltype", "oid"),
    Column("reloftype", "oid"),
    Column("relowner", "oid"),
    Column("relam", "oid"),
    Column("relfilenode", "oid"),
    Column("reltablespace", "oid"),
    Column("relpages", "int4"),
    Column("reltuples", "float4"),
    Column("relallvisible", "int4"),
    Column("reltoastrelid", "oid"),
    Column("relhasindex", "bool"),
    Column("relisshared", "bool"),
    Column("relpersistence", "char"),
    Column("relkind", "char"),
)

PG_NAMESPACE_COLUMNS = (Column("oid", "oid"), Column("nspname", "name"))

PG_DATABASE_COLUMNS = (
    Column("oid", "oid"),
    Column("datname", "name"),
    Column("datdba", "oid"),
    Column("encoding", "int4"),
    Column("datlocprovider", "char"),
    Column("datistemplate", "bool"),
    Column("datallowconn", "bool"),
    Column("datconnlimit", "int4"),
    Column("datfrozenxid", "xid"),
    Column("datminmxid", "xid"),
    Column("dattablespace", "oid"),
)

PG_INDEX_COLUMNS = (Column("indexrelid", "oid"), Column("indrelid", "oid"))

# pg_class.h: relkind values
RELKIND_NAMES = {
    "r": "table",
    "i": "index",
    "S": "sequence",
    "t": "toast table",
    "v": "view",
    "m": "materialized view",
    "c": "composite type",
    "f": "foreign table",
    "p": "partitioned table",
    "I": "partitioned index",
}

# relmapper.c
RELMAPPER_FILEMAGIC = 0x592717
MAX_MAPPINGS = 62
RELMAPPER_FILESIZE = 512
_RELMAP_HEAD = struct.Struct("<ii")
_RELMAP_ENTRY = struct.Struct("<II")


def parse_relmap(raw: bytes) -> dict[int, int]:
    """A pg_filenode.map: relation OID -> relfilenode of each mapped catalog."""
    if len(raw) != RELMAPPER_FILESIZE:
        raise CorruptData(f"relation map of {len(raw)} bytes, not {RELMAPPER_FILESIZE}")
    magic, count = _RELMAP_HEAD.unpack_from(raw)
    if magic != RELMAPPER_FILEMAGIC or not 0 <= count <= MAX_MAPPINGS:
        raise CorruptData(f"relation map with magic {magic:#x} and {count} mappings")
    return dict(
        _RELMAP_ENTRY.unpack_from(raw, _RELMAP_HEAD.size + i * _RELMAP_ENTRY.size)
        for i in range(count)
    )
