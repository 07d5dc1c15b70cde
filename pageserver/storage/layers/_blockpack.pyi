"""Type stub of the C fast path pageserver/storage/layers/_blockpack.c (see its comment)."""

from typing import Any

def pack_versions(
    versions: list[Any],
    start: int,
    buf: bytearray,
    limit: int,
    block_no: int,
    entries: bytearray,
    lsn_lo: int,
    lsn_hi: int,
    prev: int,
    value_types: tuple[type, ...],
    /,
) -> tuple[int, int, int, int]: ...
def lower_bound(keys: bytes, key_size: int, key: bytes, /) -> int: ...
