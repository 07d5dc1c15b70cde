from collections.abc import Callable
from typing import Any

RECORD_FIELDS: dict[str, dict[str, int]]

def init(fallback: Callable[[Any, int, bytes | None], bytes], /) -> None: ...
def try_redo_block(
    record: Any, block_id: int, page: bytes | bytearray | None, /
) -> bytes | None: ...
def redo_block(record: Any, block_id: int, page: bytes | None, /) -> bytes: ...
def rebuild_page(
    key: bytes, lsn: int, parts: list[tuple[bytes, int, list[bytes], int]], base_known: bool, /
) -> bytes | bool | tuple[bytes | None, list[tuple[int, bool, bytes]]] | None:
    """A key's value at lsn from its versions in layers (pageserver/reconstruct/range_rebuild.py).

    parts: per layer, oldest first: (version entries as stored, number of the first block they
    reference, those blocks decompressed, floor + 1); versions with floor < LSN <= lsn count.
    base_known: a chain without a base starts from nothing (else it is the ancestor's).
    Returns the value (None: none), False (use the per-key path for this key), or (page, rest):
    the page so far and the deltas (end LSN, will_init, payload) the Python redo must apply.
    """
