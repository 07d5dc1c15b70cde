"""Bounds-checked unpacking shared by the per-rmgr main-data decoders."""

from __future__ import annotations

import struct

from pg15.main_data import MainDataError as MainDataError
from pg15.main_data import unpack as unpack
from pg15.records import RelFileNode

_RELFILENODE = struct.Struct("<III")


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
