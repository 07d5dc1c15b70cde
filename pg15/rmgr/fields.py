"""Bounds-checked unpacking shared by the per-rmgr main-data decoders."""

from __future__ import annotations

import struct
from typing import Any

from pg15.records import RelFileNode
from proto.errors import CorruptData

_RELFILENODE = struct.Struct("<III")


class MainDataError(CorruptData):
    """Main data too short or inconsistent for its record type."""


def unpack(layout: struct.Struct, data: bytes, offset: int, what: str) -> tuple[Any, ...]:
    """`layout.unpack_from` that names the record type when the data is too short."""
    if len(data) < offset + layout.size:
        raise MainDataError(f"{what}: main data has {len(data)} bytes, need {offset + layout.size}")
    return layout.unpack_from(data, offset)


def array(code: str, data: bytes, offset: int, count: int, what: str) -> tuple[int, ...]:
    """`count` little-endian integers of struct code `code` (e.g. 'I', 'H') at `offset`."""
    if count < 0:
        raise MainDataError(f"{what}: negative count {count}")
    return unpack(struct.Struct(f"<{count}{code}"), data, offset, what)


def relfilenode(data: bytes, offset: int, what: str) -> RelFileNode:
    return RelFileNode(*unpack(_RELFILENODE, data, offset, what))


def relfilenodes(data: bytes, offset: int, count: int, what: str) -> tuple[RelFileNode, ...]:
    flat = array("I", data, offset, 3 * count, what)
    return tuple(RelFileNode(*flat[i : i + 3]) for i in range(0, len(flat), 3))


def cstring(data: bytes, offset: int, what: str) -> tuple[str, int]:
    """A NUL-terminated string and the offset just past its NUL."""
    end = data.find(b"\0", offset)
    if end < 0:
        raise MainDataError(f"{what}: unterminated string")
    return data[offset:end].decode("utf-8", "replace"), end + 1
