"""Naming relations from the catalog pages of a timeline at an LSN, without a server.

`neon snapshot diff --stat` knows relations as (tablespace, database, relfilenode) keys; their
names are rows of pg_database (shared), pg_class, pg_namespace and pg_index, read here as
pages (`materialize`) and decoded with `pg15/heap_tuple.py`. Mapped catalogs (pg_class
itself, the shared ones) have relfilenode 0 in pg_class and are found through the relation
mapper files.

Visibility: a snapshot is a record boundary of a consistent history, so a row is visible when
its inserting transaction committed before that LSN and its deleting one did not: xmin/xmax
are looked up in the CLOG pages of the page store at the same LSN (hint bits are used where
set, the frozen and bootstrap xids count as committed, a sub-committed status is a
subtransaction of a transaction still running, so not committed). A row whose xmax is only a
lock (HEAP_XMAX_LOCK_ONLY, or a lone exclusive lock) stays visible. A MultiXact xmax that is
not lock-only (an update under key-share locks, rare in catalogs) is not resolved through the
MultiXact SLRUs: such a row is used only when no other visible version of its OID exists.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from pageserver.reconstruct.reads import (
    get_rel_size,
    get_relmap,
    get_slru_page,
    list_dbs,
    materialize,
)
from pageserver.redo.clog import (
    TRANSACTION_STATUS_COMMITTED,
    clog_get_status,
)
from pageserver.redo.heap import (
    HEAP_LOCK_MASK,
    HEAP_XMAX_COMMITTED,
    HEAP_XMAX_EXCL_LOCK,
    HEAP_XMAX_INVALID,
    HEAP_XMAX_IS_MULTI,
    HEAP_XMAX_LOCK_ONLY,
    HEAP_XMIN_COMMITTED,
    HEAP_XMIN_FROZEN,
    HEAP_XMIN_INVALID,
)
from pageserver.redo.page import LP_NORMAL, get_item_id, max_offset, page_is_new
from pageserver.storage.keys import SlruKind, rel_block_key
from pageserver.storage.timeline import Timeline
from pg15.catalogs import (
    PG_CLASS_COLUMNS,
    PG_CLASS_OID,
    PG_DATABASE_COLUMNS,
    PG_DATABASE_OID,
    PG_INDEX_COLUMNS,
    PG_INDEX_OID,
    PG_NAMESPACE_COLUMNS,
    PG_NAMESPACE_OID,
    parse_relmap,
)
from pg15.constants import (
    BLCKSZ,
    CLOG_XACTS_PER_PAGE,
    GLOBALTABLESPACE_OID,
    SLRU_PAGES_PER_SEGMENT,
)
from pg15.heap_tuple import Column, HeapTupleHeader, decode_fixed_columns, parse_tuple_header
from proto.errors import CorruptData, NotFound

FROZEN_XID = 2
BOOTSTRAP_XID = 1


@dataclass(frozen=True, slots=True)
class RelationRow:
    """What names one relation: its pg_class row, schema, and the table it belongs to."""

    oid: int
    name: str
    schema: str
    relkind: str
    owner_oid: int
    """The table an index or TOAST table serves (its TOAST table's, for a TOAST index); the
    relation itself otherwise."""


@dataclass(frozen=True, slots=True)
class DatabaseRow:
    oid: int
    name: str
    tablespace: int


class CatalogReader:
    """Catalog rows of one timeline at one LSN (CLOG pages and results cached)."""

    def __init__(self, timeline: Timeline, lsn: int) -> None:
        self.timeline = timeline
        self.lsn = lsn
        self._clog: dict[int, bytes | None] = {}
        self._databases: dict[int, DatabaseRow] | None = None
        self._relations: dict[int, dict[tuple[int, int], RelationRow]] = {}

    # --- visibility ------------------------------------------------------------------------

    def _committed(self, xid: int) -> bool:
        if xid in (FROZEN_XID, BOOTSTRAP_XID):
            return True
        if xid == 0:
            return False
        pageno = xid // CLOG_XACTS_PER_PAGE
        if pageno not in self._clog:
            segno, blkno = divmod(pageno, SLRU_PAGES_PER_SEGMENT)
            try:
                page: bytes | None = get_slru_page(
                    self.timeline, SlruKind.CLOG, segno, blkno, self.lsn
                )
            except NotFound:
                page = None  # past the CLOG's end: not committed at this LSN
            self._clog[pageno] = page
        page = self._clog[pageno]
        return page is not None and clog_get_status(page, xid) == TRANSACTION_STATUS_COMMITTED

    def _visibility(self, h: HeapTupleHeader) -> bool | None:
        """True visible, False not, None: deleted or not by a MultiXact (see the module)."""
        mask = h.infomask
        if mask & HEAP_XMIN_FROZEN == HEAP_XMIN_INVALID:
            return False  # inserter aborted (hint bit)
        if not mask & HEAP_XMIN_COMMITTED and not self._committed(h.xmin):
            return False
        if mask & HEAP_XMAX_INVALID or h.xmax == 0:
            return True
        if mask & HEAP_XMAX_LOCK_ONLY or (
            mask & (HEAP_XMAX_IS_MULTI | HEAP_LOCK_MASK) == HEAP_XMAX_EXCL_LOCK
        ):
            return True  # HEAP_XMAX_IS_LOCKED_ONLY
        if mask & HEAP_XMAX_IS_MULTI:
            return None
        if mask & HEAP_XMAX_COMMITTED:
            return False
        return not self._committed(h.xmax)

    # --- rows ------------------------------------------------------------------------------

    def _rows(
        self, spc: int, db: int, filenode: int, columns: Sequence[Column], key: str
    ) -> list[dict[str, object]]:
        """The visible rows of a catalog (fixed columns), one per `key` column value."""
        rows: dict[object, dict[str, object]] = {}
        doubtful: list[dict[str, object]] = []
        for page in self._pages(spc, db, filenode):
            for item in heap_items(page):
                header = parse_tuple_header(item)
                visible = self._visibility(header)
                if visible is False:
                    continue
                row = decode_fixed_columns(item, header, columns)
                if visible:
                    rows[row[key]] = row
                else:
                    doubtful.append(row)
        for row in doubtful:
            rows.setdefault(row[key], row)
        return list(rows.values())

    def _pages(self, spc: int, db: int, filenode: int) -> Iterator[bytes]:
        size = get_rel_size(self.timeline, spc, db, filenode, 0, self.lsn) or 0
        for blkno in range(size):
            yield materialize(self.timeline, rel_block_key(spc, db, filenode, 0, blkno), self.lsn)

    def _relmap(self, spc: int, db: int) -> dict[int, int]:
        raw = get_relmap(self.timeline, spc, db, self.lsn)
        return {} if raw is None else parse_relmap(raw)

    def databases(self) -> dict[int, DatabaseRow]:
        """OID -> database, from the shared pg_database."""
        if self._databases is None:
            filenode = self._relmap(GLOBALTABLESPACE_OID, 0).get(PG_DATABASE_OID)
            rows = (
                []
                if filenode is None
                else self._rows(GLOBALTABLESPACE_OID, 0, filenode, PG_DATABASE_COLUMNS, "oid")
            )
            self._databases = {
                _int(r["oid"]): DatabaseRow(
                    _int(r["oid"]),
                    str(r["datname"]),
                    _int(r["dattablespace"]),
                )
                for r in rows
            }
        return self._databases

    def database_tablespace(self, db: int) -> int | None:
        """Where database `db` keeps its catalogs: its default tablespace, from pg_database,
        else the first (spc, db) of the database directory."""
        row = self.databases().get(db)
        if row is not None:
            return row.tablespace
        spaces = [spc for spc, d in list_dbs(self.timeline, self.lsn) if d == db]
        return spaces[0] if spaces else None

    def relations(self, db: int) -> dict[tuple[int, int], RelationRow]:
        """(tablespace, relfilenode) -> relation, for the relations of database `db`
        (db 0: the shared catalogs, named through any database's pg_class)."""
        cached = self._relations.get(db)
        if cached is not None:
            return cached
        result: dict[tuple[int, int], RelationRow] = {}
        source = db if db != 0 else self._any_database()
        spc = None if source is None else self.database_tablespace(source)
        if source is not None and spc is not None:
            result = self._read_relations(spc, source, shared=db == 0)
        self._relations[db] = result
        return result

    def _any_database(self) -> int | None:
        dbs = sorted(d for _spc, d in list_dbs(self.timeline, self.lsn) if d != 0)
        return dbs[0] if dbs else None

    def _read_relations(
        self, spc: int, db: int, shared: bool
    ) -> dict[tuple[int, int], RelationRow]:
        local_map = self._relmap(spc, db)
        shared_map = self._relmap(GLOBALTABLESPACE_OID, 0)
        pg_class = local_map.get(PG_CLASS_OID)
        if pg_class is None:
            return {}
        classes = self._rows(spc, db, pg_class, PG_CLASS_COLUMNS, "oid")
        by_oid = {_int(c["oid"]): c for c in classes}

        def filenode_of(oid: int) -> int | None:
            row = by_oid.get(oid)
            return None if row is None else _int(row["relfilenode"]) or None

        schemas: dict[int, str] = {}
        if (node := filenode_of(PG_NAMESPACE_OID)) is not None:
            for r in self._rows(spc, db, node, PG_NAMESPACE_COLUMNS, "oid"):
                schemas[_int(r["oid"])] = str(r["nspname"])
        index_of: dict[int, int] = {}
        if (node := filenode_of(PG_INDEX_OID)) is not None:
            for r in self._rows(spc, db, node, PG_INDEX_COLUMNS, "indexrelid"):
                index_of[_int(r["indexrelid"])] = _int(r["indrelid"])
        toast_of = {
            _int(c["reltoastrelid"]): oid for oid, c in by_oid.items() if c["reltoastrelid"]
        }

        def owner(oid: int) -> int:
            table = index_of.get(oid, oid)
            return toast_of.get(table, table)

        result: dict[tuple[int, int], RelationRow] = {}
        for oid, c in by_oid.items():
            if bool(c["relisshared"]) != shared:
                continue
            filenode = _int(c["relfilenode"])
            if shared:
                filenode = filenode or shared_map.get(oid, 0)
                tablespace = GLOBALTABLESPACE_OID
            else:
                filenode = filenode or local_map.get(oid, 0)
                tablespace = _int(c["reltablespace"]) or spc
            if not filenode:
                continue  # views, composite types, partitioned tables: no storage
            result[(tablespace, filenode)] = RelationRow(
                oid,
                str(c["relname"]),
                schemas.get(_int(c["relnamespace"]), str(c["relnamespace"])),
                str(c["relkind"]),
                owner(oid),
            )
        return result

    def relation_by_oid(self, db: int, oid: int) -> RelationRow | None:
        for row in self.relations(db).values():
            if row.oid == oid:
                return row
        return None


def _int(value: object) -> int:
    """A decoded integer column (catalog columns are NOT NULL)."""
    if not isinstance(value, int):
        raise CorruptData(f"catalog column holds {value!r}, not an integer")
    return value


def heap_items(page: bytes) -> Iterator[bytes]:
    """The tuples of a heap page's normal line pointers."""
    if page_is_new(page):
        return
    for offnum in range(1, max_offset(page) + 1):
        off, flags, length = get_item_id(page, offnum)
        if flags == LP_NORMAL and length and off + length <= BLCKSZ:
            yield page[off : off + length]
