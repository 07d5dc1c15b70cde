"""The heap tuple reader on hand-built PostgreSQL 15 tuples (htup_details.h layout), and the
relation mapper file parser."""

from __future__ import annotations

import struct

import pytest

from pg15.catalogs import (
    PG_CLASS_COLUMNS,
    PG_DATABASE_COLUMNS,
    RELMAPPER_FILEMAGIC,
    parse_relmap,
)
from pg15.heap_tuple import Column, decode_fixed_columns, parse_tuple_header
from proto.errors import CorruptData


def tuple_bytes(data: bytes, natts: int, infomask: int = 0, bits: bytes = b"") -> bytes:
    """A heap tuple: 23-byte header, null bitmap, padding to t_hoff (MAXALIGN), data."""
    hoff = (23 + len(bits) + 7) & ~7
    header = struct.pack("<IIIHHHHHB", 100, 0, 0, 0, 1, 1, natts, infomask | 0x0800, hoff)
    return header + bits + b"\0" * (hoff - 23 - len(bits)) + data


def name(text: str) -> bytes:
    return text.encode().ljust(64, b"\0")


def test_pg_class_row_at_struct_offsets() -> None:
    # pg_class's fixed part: oid, relname(64, align c), 6 oids, relpages, reltuples,
    # relallvisible, reltoastrelid, then bools and chars.
    data = (
        struct.pack("<I", 16384)
        + name("accounts")
        + struct.pack("<IIIIIIIifiI", 2200, 16386, 0, 10, 2, 16384, 0, 7, 700.0, 3, 16387)
        + struct.pack("<??cc", True, False, b"p", b"r")
    )
    item = tuple_bytes(data, natts=33)
    header = parse_tuple_header(item)
    assert (header.xmin, header.hoff, header.natts) == (100, 24, 33)
    row = decode_fixed_columns(item, header, PG_CLASS_COLUMNS)
    assert row["oid"] == 16384 and row["relname"] == "accounts"
    assert row["relnamespace"] == 2200 and row["relfilenode"] == 16384
    assert row["reltoastrelid"] == 16387 and row["reltuples"] == 700.0
    assert row["relhasindex"] is True and row["relisshared"] is False
    assert (row["relpersistence"], row["relkind"]) == ("p", "r")


def test_alignment_skips_padding_after_chars() -> None:
    # pg_database: ... datlocprovider char @76, two bools, then datconnlimit int4 at 80.
    data = (
        struct.pack("<I", 5)
        + name("postgres")
        + struct.pack("<Ii", 10, 6)
        + struct.pack("<c??", b"c", False, True)
        + b"\xee"  # alignment padding before datconnlimit
        + struct.pack("<iIII", -1, 716, 1, 1663)
    )
    item = tuple_bytes(data, natts=16)
    row = decode_fixed_columns(item, parse_tuple_header(item), PG_DATABASE_COLUMNS)
    assert row["datname"] == "postgres" and row["datlocprovider"] == "c"
    assert row["datconnlimit"] == -1 and row["dattablespace"] == 1663


def test_null_bitmap_nulls_take_no_space() -> None:
    columns = (Column("a", "int4"), Column("b", "int2"), Column("c", "int4"))
    # b is NULL: bitmap 0b101; c follows a directly (aligned to 4 at data offset 4).
    item = tuple_bytes(struct.pack("<ii", 7, 9), natts=3, infomask=0x0001, bits=b"\x05")
    header = parse_tuple_header(item)
    assert header.has_nulls and header.hoff == 24
    assert decode_fixed_columns(item, header, columns) == {"a": 7, "b": None, "c": 9}


def test_attributes_past_natts_are_missing() -> None:
    columns = (Column("a", "int4"), Column("b", "int4"))
    item = tuple_bytes(struct.pack("<i", 1), natts=1)
    assert decode_fixed_columns(item, parse_tuple_header(item), columns) == {"a": 1, "b": None}


def test_truncated_tuples_are_refused() -> None:
    with pytest.raises(CorruptData, match="shorter than its header"):
        parse_tuple_header(b"\0" * 10)
    item = tuple_bytes(struct.pack("<h", 1), natts=1)
    with pytest.raises(CorruptData, match="ends inside column 'a'"):
        decode_fixed_columns(item, parse_tuple_header(item), (Column("a", "int4"),))
    bad_hoff = bytearray(tuple_bytes(b"", natts=0))
    bad_hoff[22] = 200
    with pytest.raises(CorruptData, match="t_hoff 200"):
        parse_tuple_header(bytes(bad_hoff))


def test_relmap() -> None:
    raw = struct.pack("<ii", RELMAPPER_FILEMAGIC, 2) + struct.pack("<IIII", 1259, 1259, 1249, 16500)
    raw = raw.ljust(512, b"\0")
    assert parse_relmap(raw) == {1259: 1259, 1249: 16500}
    with pytest.raises(CorruptData):
        parse_relmap(raw[:100])
    with pytest.raises(CorruptData):
        parse_relmap(b"\1" * 512)
