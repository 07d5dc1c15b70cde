"""The bounds check of every record main-data decoder (pg15/rmgr/fields.py), in a module of
its own so that pg15/checkpoint.py (read by every `neon` command that opens pg_control) does not
import the record decoders."""

from __future__ import annotations

import struct
from typing import Any

from proto.errors import CorruptData


class MainDataError(CorruptData):
    """Main data too short or inconsistent for its record type."""


def unpack(layout: struct.Struct, data: bytes, offset: int, what: str) -> tuple[Any, ...]:
    """`layout.unpack_from` that names the record type when the data is too short."""
    if len(data) < offset + layout.size:
        raise MainDataError(f"{what}: main data has {len(data)} bytes, need {offset + layout.size}")
    return layout.unpack_from(data, offset)
