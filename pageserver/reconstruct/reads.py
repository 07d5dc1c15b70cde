"""GetPage@LSN and the data-directory reads built on it: sizes, directories, SLRUs, two-phase
state, checkpoint counters, pg_control and node metadata of a timeline at any LSN."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pageserver.reconstruct.apply_delta import reconstruct
from pageserver.reconstruct.page_cache import PAGE_CACHE
from pageserver.reconstruct.value_format import (
    ZERO_PAGE,
    decode_ints,
    decode_metadata,
    decode_pairs,
    decode_tablespaces,
    decode_u32,
)
from pageserver.storage.keys import (
    CHECKPOINT_KEY,
    CONTROLFILE_KEY,
    DB_DIR_KEY,
    NODE_METADATA_KEY,
    TABLESPACE_MAP_KEY,
    TWOPHASE_DIR_KEY,
    TWOPHASE_FILES_RANGE,
    Key,
    SlruKind,
    describe,
    parse_rel_block_key,
    parse_slru_block_key,
    parse_twophase_file_key,
    rel_block_key,
    rel_dir_key,
    rel_size_key,
    relmap_file_key,
    slru_block_key,
    slru_dir_key,
    slru_segment_size_key,
)
from pageserver.storage.timeline import Timeline
from pageserver.storage.values import ReconstructData
from pg15.lsn import format_lsn
from pg15.rmgr.xlog import CheckPoint
from proto.errors import NotFound


def _read_value(timeline: Timeline, key: Key, lsn: int) -> bytes | None:
    return reconstruct(key, lsn, timeline.get_reconstruct_data(key, lsn))


Reconstructor = Callable[[Key, int, ReconstructData], "bytes | None"]


def materialize(
    timeline: Timeline, key: Key, lsn: int, reconstructor: Reconstructor = reconstruct
) -> bytes:
    """GetPage@LSN for any key: the value at `lsn` (NotFound if the key has none).

    A relation or SLRU page that was never written but lies below its relation (segment)
    size reads as a zero page, like a hole in a PostgreSQL file. `reconstructor` lets the
    daemon run the redo of long chains in a process pool.
    """
    # A hot page is found in the cache by naming its newest version from the layer indexes,
    # without fetching (let alone hashing) the chain of deltas below it.
    ident = timeline.version_ident(key, lsn)
    if ident is not None:
        cached = PAGE_CACHE.get(ident)
        if cached is not None:
            return cached
    data = timeline.get_reconstruct_data(key, lsn)
    value = reconstructor(key, lsn, data)
    if value is not None:
        if ident is not None and data.deltas:
            PAGE_CACHE.put(ident, value)
        return value
    rel = parse_rel_block_key(key)
    if rel is not None:
        size = get_rel_size(timeline, rel.spc, rel.db, rel.rel, rel.fork, lsn)
        if size is not None and rel.blkno < size:
            return ZERO_PAGE
    slru = parse_slru_block_key(key)
    if slru is not None:
        size = get_slru_segment_size(timeline, slru[0], slru[1], lsn)
        if size is not None and slru[2] < size:
            return ZERO_PAGE
    raise NotFound(f"{describe(key)} does not exist at {format_lsn(lsn)}")


def get_rel_page(
    timeline: Timeline, spc: int, db: int, rel: int, fork: int, blkno: int, lsn: int
) -> bytes:
    return materialize(timeline, rel_block_key(spc, db, rel, fork, blkno), lsn)


def get_rel_size(
    timeline: Timeline, spc: int, db: int, rel: int, fork: int, lsn: int
) -> int | None:
    """Blocks of one fork at `lsn`; None if the fork does not exist."""
    key = rel_size_key(spc, db, rel, fork)
    raw = _read_value(timeline, key, lsn)
    return None if raw is None else decode_u32(raw, describe(key))


def list_dbs(timeline: Timeline, lsn: int) -> list[tuple[int, int]]:
    """(spc, db) of every database, ``(1664, 0)`` standing for the shared catalogs."""
    raw = _read_value(timeline, DB_DIR_KEY, lsn)
    return [] if raw is None else sorted(decode_pairs(raw, "database directory"))


def get_tablespaces(timeline: Timeline, lsn: int) -> dict[int, str]:
    """OID -> location ("" = in-place) of every non-default tablespace at `lsn`."""
    raw = _read_value(timeline, TABLESPACE_MAP_KEY, lsn)
    return {} if raw is None else decode_tablespaces(raw)


def list_rels(timeline: Timeline, spc: int, db: int, lsn: int) -> list[tuple[int, int]]:
    """(relfilenode, fork) of every relation fork of a database."""
    key = rel_dir_key(spc, db)
    raw = _read_value(timeline, key, lsn)
    return [] if raw is None else sorted(decode_pairs(raw, describe(key)))


def get_relmap(timeline: Timeline, spc: int, db: int, lsn: int) -> bytes | None:
    """The pg_filenode.map of a database (spc 1664, db 0: global/), None if absent."""
    return _read_value(timeline, relmap_file_key(spc, db), lsn)


def list_slru_segments(timeline: Timeline, kind: SlruKind, lsn: int) -> list[int]:
    raw = _read_value(timeline, slru_dir_key(kind), lsn)
    return [] if raw is None else sorted(decode_ints(raw, f"{kind.directory} directory"))


def get_slru_segment_size(timeline: Timeline, kind: SlruKind, segno: int, lsn: int) -> int | None:
    key = slru_segment_size_key(kind, segno)
    raw = _read_value(timeline, key, lsn)
    return None if raw is None else decode_u32(raw, describe(key))


def get_slru_page(timeline: Timeline, kind: SlruKind, segno: int, blkno: int, lsn: int) -> bytes:
    return materialize(timeline, slru_block_key(kind, segno, blkno), lsn)


def get_checkpoint(timeline: Timeline, lsn: int) -> CheckPoint | None:
    raw = _read_value(timeline, CHECKPOINT_KEY, lsn)
    return None if raw is None else CheckPoint.unpack(raw)


def get_control_file(timeline: Timeline, lsn: int) -> bytes | None:
    return _read_value(timeline, CONTROLFILE_KEY, lsn)


def get_node_metadata(timeline: Timeline, lsn: int) -> dict[str, Any]:
    raw = _read_value(timeline, NODE_METADATA_KEY, lsn)
    return {} if raw is None else decode_metadata(raw)


def list_twophase_xids(timeline: Timeline, lsn: int) -> list[int]:
    raw = _read_value(timeline, TWOPHASE_DIR_KEY, lsn)
    return [] if raw is None else sorted(decode_ints(raw, "two-phase directory"))


def get_twophase_files(timeline: Timeline, lsn: int) -> dict[int, bytes]:
    """xid -> the pg_twophase/%08X file of every transaction prepared at `lsn`."""
    files: dict[int, bytes] = {}
    for key in timeline.get_keys(TWOPHASE_FILES_RANGE, lsn):
        xid = parse_twophase_file_key(key)
        raw = _read_value(timeline, key, lsn)
        if xid is not None and raw is not None:
            files[xid] = raw
    return files
