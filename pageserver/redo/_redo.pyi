from collections.abc import Callable
from typing import Any

RECORD_FIELDS: dict[str, dict[str, int]]
REBUILD_RUN_INTO: int
REBUILD_RUN_READS: int

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

def rebuild_run(
    keys: list[bytes],
    lsn: int,
    deltas: list[tuple[Any, ...]],
    images: list[tuple[Any, ...]],
    tiles: list[tuple[bytes, bytes, int, int]],
    in_memory: frozenset[bytes] | set[bytes],
    base_known: bool,
    into: Any = None,
    stride: int = ...,
    /,
) -> list[bytes | bool | tuple[bytes | None, list[tuple[int, bool, bytes]]] | None]:
    """rebuild_page of each of keys (ascending) at lsn, its parts found in the layers
    (pageserver/reconstruct/range_rebuild.py: _walk_native, _walk_python the reference).

    deltas: the delta layers newest first, images the image layers, each as
    LayerFile.run_input gives it (key table, map, version table offset, narrow, LSN base,
    the layer's end LSN, read_block, and a list [position, block number, block] the walk
    updates, so the next call for the following keys goes on from there; with
    REBUILD_RUN_READS, then where its block table starts, its block count, the calling
    thread's zstd decompress method, the file's _decompressor_of (None: no dictionary),
    the blocks prefetched for read_block, and the fault-around and release spans: its
    blocks are then read here, read_block only for one prefetched or anything off); tiles: (start,
    end, image LSN, index into images) ascending, the image covering each key range. A key
    in in_memory is False; base_known as for rebuild_page where no tile covers a key.
    The keys' versions are gathered (blocks read) with the GIL, then their chains redone
    without it, so another thread's run (image creation's next partition) goes on meanwhile.
    into: a writable buffer of len(keys) records of `stride` bytes (BLCKSZ by default); a
    key whose value is a whole page has it written at the end of its record (key k's at
    k * stride + stride - BLCKSZ) and True in the list, the others as without it.
    """

def run_kept_bytes(n: int, /) -> int:
    """Set the bytes of blocks rebuild_run keeps for the keys it has gathered before it redoes
    them (32 MiB; tests set 1: a redo after every key); returns the limit before."""
