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
def pack_values(
    keys: list[bytes], values: list[bytes | None], i: int, tag: int, lsn: int,
    keys_out: list[bytes], buf: bytearray, limit: int, block_no: int, entries: bytearray,
    n: int, /,
) -> tuple[int, int, int, int]: ...  # fmt: skip
def lower_bound(keys: bytes, key_size: int, key: bytes, /) -> int: ...
def first_bad_page(pages: list[bytes], size: int, limit: int, /) -> int: ...

class Merge:
    """The L0 merge of compaction (see `_blockpack.c`)."""

    def __init__(self, inputs: list[tuple[Any, ...]], /) -> None: ...
    def next_key(self) -> bytes | None: ...
    def run(
        self, buf: bytearray, entries: bytearray, keys_out: list[bytes], limit: int,
        block_no: int, n_versions: int, lsn_lo: int, lsn_hi: int, target: int,
        added_before: int, max_keys: int, max_blocks: int, cut: list[bytes], /,
    ) -> tuple[int, int, int, bytes | None, int, bytes | None, int, int, int]: ...  # fmt: skip
    def close(self) -> None: ...

def newest_of_keys(
    keys: bytes, firsts: Any, file: Any, versions_at: int, start: int, end_key: bytes,
    narrow: bool, lsn_base: int, upto: int = ..., above: int = ..., /,
) -> list[tuple[bytes, int, int]]: ...  # fmt: skip
def key_table(table: bytes, n_keys: int, n_versions: int, /) -> tuple[bytes, bytes, int]: ...
def narrow_versions(entries: Any, lsn_base: int, /) -> bytes | None: ...
def widen_versions(raw: Any, lsn_base: int, /) -> bytes: ...
