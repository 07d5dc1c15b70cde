"""Reading PostgreSQL 15 heap tuples: the header and the fixed-width columns that follow it.

Layout (src/include/access/htup_details.h, HeapTupleHeaderData)::

    t_xmin u32 @0 | t_xmax u32 @4 | t_cid/t_xvac u32 @8 | t_ctid (block u16 hi, u16 lo;
    offset u16) @12 | t_infomask2 u16 @18 | t_infomask u16 @20 | t_hoff u8 @22 | t_bits @23

The data starts at t_hoff (MAXALIGNed past the header and the null bitmap). The null bitmap is
present when HEAP_HASNULL (0x0001) is set in t_infomask: bit i (LSB first) clear means
attribute i is NULL, and a NULL takes no space. Each non-NULL attribute starts at its type's
alignment (typalign 'c' 1, 's' 2, 'i' 4, 'd' 8) from the tuple's start, which is itself
MAXALIGNed on the page (src/backend/access/common/heaptuple.c, heap_deform_tuple). Attributes
at or past t_infomask2 & HEAP_NATTS_MASK (added later by ALTER TABLE without a rewrite) read
as missing (None here).

Only fixed-width columns are decoded: a catalog's columns up to its first variable-length
one, which is what its C struct (GETSTRUCT) maps and what `pg15/catalogs.py` describes.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from proto.errors import CorruptData

HEAP_HASNULL = 0x0001
HEAP_NATTS_MASK = 0x07FF
SIZEOF_HEAP_TUPLE_HEADER = 23
NAMEDATALEN = 64

_HEADER = struct.Struct("<IIIHHHHHB")

ColumnType = Literal["oid", "xid", "int4", "int2", "float4", "bool", "char", "name"]

_WIDTH: dict[str, tuple[int, int, str]] = {
    # type: (length, alignment, struct code); catalog headers' C types and pg_type's typalign
    "oid": (4, 4, "<I"),
    "xid": (4, 4, "<I"),
    "int4": (4, 4, "<i"),
    "int2": (2, 2, "<h"),
    "float4": (4, 4, "<f"),
    "bool": (1, 1, "<?"),
    "char": (1, 1, "c"),
    "name": (NAMEDATALEN, 1, ""),  # NameData: typalign 'c' since PostgreSQL 12
}


@dataclass(frozen=True, slots=True)
class Column:
    """One fixed-width attribute of a table, in attnum order."""

    name: str
    type: ColumnType


@dataclass(frozen=True, slots=True)
class HeapTupleHeader:
    xmin: int
    xmax: int
    infomask2: int
    infomask: int
    hoff: int

    @property
    def natts(self) -> int:
        return self.infomask2 & HEAP_NATTS_MASK

    @property
    def has_nulls(self) -> bool:
        return bool(self.infomask & HEAP_HASNULL)


def parse_tuple_header(item: bytes) -> HeapTupleHeader:
    """The header of a heap tuple (a line pointer's item), checked against its length."""
    if len(item) < SIZEOF_HEAP_TUPLE_HEADER:
        raise CorruptData(f"heap tuple of {len(item)} bytes is shorter than its header")
    xmin, xmax, _cid, _bhi, _blo, _off, infomask2, infomask, hoff = _HEADER.unpack_from(item)
    if hoff < SIZEOF_HEAP_TUPLE_HEADER or hoff > len(item):
        raise CorruptData(f"heap tuple t_hoff {hoff} outside its {len(item)} bytes")
    return HeapTupleHeader(xmin, xmax, infomask2, infomask, hoff)


def _align(offset: int, alignment: int) -> int:
    return (offset + alignment - 1) & ~(alignment - 1)


def decode_fixed_columns(
    item: bytes, header: HeapTupleHeader, columns: Sequence[Column]
) -> dict[str, object]:
    """The values of `columns` (the table's first attributes, fixed-width, in order): int,
    float, bool, str for char and name; None for NULL or missing attributes."""
    values: dict[str, object] = {}
    offset = header.hoff
    for attnum, column in enumerate(columns):
        if attnum >= header.natts or (
            header.has_nulls
            and not item[SIZEOF_HEAP_TUPLE_HEADER + attnum // 8] >> (attnum % 8) & 1
        ):
            values[column.name] = None
            continue
        length, alignment, code = _WIDTH[column.type]
        offset = _align(offset, alignment)
        end = offset + length
        if end > len(item):
            raise CorruptData(f"heap tuple of {len(item)} bytes ends inside column {column.name!r}")
        raw = item[offset:end]
        if column.type == "name":
            values[column.name] = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
        elif column.type == "char":
            values[column.name] = raw.decode("latin-1")
        else:
            values[column.name] = struct.unpack(code, raw)[0]
        offset = end
    return values
