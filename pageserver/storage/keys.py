"""The page store's keyspace: fixed-width 18-byte keys whose byte order is the key order.

Layout (big-endian, after Neon's `key.rs`): ``field1 u8 | field2 u32 | field3 u32 |
field4 u32 | field5 u8 | field6 u32``. Because the encoding is big-endian and fixed-width,
``bytes`` comparison is key comparison, so keys sort, bisect and hash as plain ``bytes`` and
a "range of keys" (everything of a relation, of a database...) is one contiguous interval.

==============================  ==============================================
key                              fields (f1 f2 f3 f4 f5 f6)
==============================  ==============================================
database directory               00 0   0   0   0    0
relmap file of (spc, db)         00 spc db  0   0    0      (db = 0: global)
relation directory of (spc, db)  00 spc db  0   0    1
relation page                    00 spc db  rel fork blkno  (rel != 0)
relation size (nblocks)          00 spc db  rel fork FFFFFFFF
SLRU directory of a kind         01 kind 0  0   0    0
SLRU page                        01 kind 1  seg 0    blkno
SLRU segment size                01 kind 1  seg 0    FFFFFFFF
two-phase directory              02 0   0   0   0    0
two-phase state file (xid)       02 0   0   0   1    xid
pg_control template              03 0   0   0   0    0
checkpoint counters              03 0   0   0   0    1
node metadata (system id...)     03 0   0   0   0    2
tablespace map (oid -> location) 03 0   0   0   0    3
==============================  ==============================================

``KEY_MAX`` (all 0xFF) is the exclusive end of the keyspace; keys whose first byte is 0xFF are
reserved and never stored, so a layer spanning [KEY_MIN, KEY_MAX) is recognisably an L0 layer.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NewType

from pg15.constants import FORK_NAMES
from proto.errors import InvalidArgument

KEY_SIZE = 18
Key = NewType("Key", bytes)

_FIELDS = struct.Struct(">BIIIBI")
assert _FIELDS.size == KEY_SIZE

U32_MAX = 0xFFFFFFFF
_SIZE_MARKER = U32_MAX

_REL_PREFIX = 0x00
_SLRU_PREFIX = 0x01
_TWOPHASE_PREFIX = 0x02
_CONTROL_PREFIX = 0x03


class SlruKind(enum.IntEnum):
    """The SLRUs whose pages the store keeps (numbering as in Neon)."""

    CLOG = 0
    MULTIXACT_MEMBERS = 1
    MULTIXACT_OFFSETS = 2

    @property
    def directory(self) -> str:
        """The directory under PGDATA holding this SLRU's segments."""
        return _SLRU_DIRS[self]


_SLRU_DIRS = {
    SlruKind.CLOG: "pg_xact",
    SlruKind.MULTIXACT_MEMBERS: "pg_multixact/members",
    SlruKind.MULTIXACT_OFFSETS: "pg_multixact/offsets",
}


@dataclass(frozen=True, slots=True)
class KeyFields:
    """A key split into its six fields (for parsing and error messages)."""

    field1: int
    field2: int
    field3: int
    field4: int
    field5: int
    field6: int


def make_key(f1: int, f2: int, f3: int, f4: int, f5: int, f6: int) -> Key:
    """Pack six fields; out-of-range fields are a caller bug reported as InvalidArgument."""
    try:
        return Key(_FIELDS.pack(f1, f2, f3, f4, f5, f6))
    except struct.error as exc:
        raise InvalidArgument(f"key fields out of range: {(f1, f2, f3, f4, f5, f6)}") from exc


def key_fields(key: bytes) -> KeyFields:
    return KeyFields(*_FIELDS.unpack(check_key(key)))


def keys_fields(keys: Iterable[bytes]) -> list[tuple[int, int, int, int, int, int]]:
    """The six fields of each of `keys`, as tuples, in one unpacking: for tens of thousands
    at once (a checkout's delta sorts every key written: a KeyFields each was 54 ms for 40k,
    this 11 ms). A key of the wrong size is refused (as check_key would)."""
    keys = list(keys)
    if set(map(len, keys)) - {KEY_SIZE}:
        for key in keys:
            check_key(key)
    return list(_FIELDS.iter_unpack(b"".join(keys)))


def check_key(key: bytes) -> Key:
    """Validate raw bytes as a storable key."""
    if len(key) != KEY_SIZE:
        raise InvalidArgument(f"a key is {KEY_SIZE} bytes, got {len(key)}")
    if key[0] == 0xFF:
        raise InvalidArgument("keys with first byte 0xFF are reserved (end of the keyspace)")
    return Key(bytes(key))


KEY_MIN = Key(b"\x00" * KEY_SIZE)
KEY_MAX = Key(b"\xff" * KEY_SIZE)


def key_successor(key: bytes) -> Key:
    """The smallest key greater than `key` (for exclusive range ends)."""
    n = int.from_bytes(key, "big") + 1
    if n >= 1 << (8 * KEY_SIZE):
        raise InvalidArgument("no key after the maximum key")
    return Key(n.to_bytes(KEY_SIZE, "big"))


def key_to_hex(key: bytes) -> str:
    return key.hex().upper()


def key_from_hex(text: str) -> Key:
    try:
        raw = bytes.fromhex(text)
    except ValueError as exc:
        raise InvalidArgument(f"{text!r} is not a hex key") from exc
    if len(raw) != KEY_SIZE:
        raise InvalidArgument(f"{text!r} is not a {KEY_SIZE}-byte hex key")
    return Key(raw)


@dataclass(frozen=True, slots=True)
class KeyRange:
    """Keys k with start <= k < end."""

    start: Key
    end: Key

    def __post_init__(self) -> None:
        if len(self.start) != KEY_SIZE or len(self.end) != KEY_SIZE:
            raise InvalidArgument("key range bounds must be 18-byte keys")
        if self.start > self.end:
            raise InvalidArgument(
                f"key range start {key_to_hex(self.start)} is after its end {key_to_hex(self.end)}"
            )

    def __contains__(self, key: object) -> bool:
        return isinstance(key, bytes) and self.start <= key < self.end

    @property
    def is_empty(self) -> bool:
        return self.start == self.end

    def overlaps(self, other: KeyRange) -> bool:
        return self.start < other.end and other.start < self.end

    def covers(self, other: KeyRange) -> bool:
        return self.start <= other.start and other.end <= self.end

    def intersection(self, other: KeyRange) -> KeyRange | None:
        start, end = max(self.start, other.start), min(self.end, other.end)
        return KeyRange(start, end) if start < end else None

    def __str__(self) -> str:
        return f"{key_to_hex(self.start)}-{key_to_hex(self.end)}"


FULL_KEYSPACE = KeyRange(KEY_MIN, KEY_MAX)


def ranges_cover(key_range: KeyRange, ranges: Iterable[KeyRange]) -> bool:
    """True when the union of `ranges` covers key_range."""
    at = key_range.start
    for r in sorted(ranges, key=lambda r: r.start):
        if r.start > at:
            return False
        if r.end > at:
            at = r.end
            if at >= key_range.end:
                return True
    return at >= key_range.end


def single_key_range(key: Key) -> KeyRange:
    return KeyRange(key, key_successor(key))


# --- relations --------------------------------------------------------------------------------

DB_DIR_KEY = make_key(_REL_PREFIX, 0, 0, 0, 0, 0)


def relmap_file_key(spc: int, db: int) -> Key:
    """The pg_filenode.map of a database (db = 0 with the global tablespace: global/)."""
    return make_key(_REL_PREFIX, spc, db, 0, 0, 0)


def rel_dir_key(spc: int, db: int) -> Key:
    """The set of relations (relnode, fork) of a database."""
    return make_key(_REL_PREFIX, spc, db, 0, 0, 1)


def _check_relnode(rel: int) -> None:
    if rel == 0:
        raise InvalidArgument("relfilenode 0 is not a relation")


def rel_block_key(spc: int, db: int, rel: int, fork: int, blkno: int) -> Key:
    _check_relnode(rel)
    if blkno == _SIZE_MARKER:
        raise InvalidArgument("block number 0xFFFFFFFF is not a valid block")
    return make_key(_REL_PREFIX, spc, db, rel, fork, blkno)


def rel_size_key(spc: int, db: int, rel: int, fork: int) -> Key:
    """The number of blocks of one fork (value: u32 little-endian, by convention of ingest)."""
    _check_relnode(rel)
    return make_key(_REL_PREFIX, spc, db, rel, fork, _SIZE_MARKER)


def fork_blocks_range(spc: int, db: int, rel: int, fork: int) -> KeyRange:
    """Every page of one fork, without its size key."""
    _check_relnode(rel)
    return KeyRange(
        make_key(_REL_PREFIX, spc, db, rel, fork, 0),
        make_key(_REL_PREFIX, spc, db, rel, fork, _SIZE_MARKER),
    )


def fork_range(spc: int, db: int, rel: int, fork: int) -> KeyRange:
    """Every page of one fork and its size key."""
    _check_relnode(rel)
    return KeyRange(
        make_key(_REL_PREFIX, spc, db, rel, fork, 0),
        key_successor(make_key(_REL_PREFIX, spc, db, rel, fork, _SIZE_MARKER)),
    )


def relation_range(spc: int, db: int, rel: int) -> KeyRange:
    """Every key of a relation: all forks, pages and sizes (for DROP and truncation)."""
    _check_relnode(rel)
    return KeyRange(
        make_key(_REL_PREFIX, spc, db, rel, 0, 0),
        key_successor(make_key(_REL_PREFIX, spc, db, rel, 0xFF, U32_MAX)),
    )


def database_range(spc: int, db: int) -> KeyRange:
    """Every key of a database: relmap, relation directory, all relations (CREATE/DROP DATABASE)."""
    return KeyRange(
        make_key(_REL_PREFIX, spc, db, 0, 0, 0),
        key_successor(make_key(_REL_PREFIX, spc, db, U32_MAX, 0xFF, U32_MAX)),
    )


def database_relations_range(spc: int, db: int) -> KeyRange:
    """The relation keys (pages and sizes) of a database, without relmap and directory."""
    return KeyRange(
        make_key(_REL_PREFIX, spc, db, 1, 0, 0),
        key_successor(make_key(_REL_PREFIX, spc, db, U32_MAX, 0xFF, U32_MAX)),
    )


RELATION_KEYSPACE = KeyRange(KEY_MIN, make_key(_SLRU_PREFIX, 0, 0, 0, 0, 0))
"""Every field1=0x00 key: directories, relmaps, relation pages and sizes."""


# --- SLRUs ------------------------------------------------------------------------------------


def slru_dir_key(kind: SlruKind) -> Key:
    return make_key(_SLRU_PREFIX, int(kind), 0, 0, 0, 0)


def slru_block_key(kind: SlruKind, segno: int, blkno: int) -> Key:
    if blkno == _SIZE_MARKER:
        raise InvalidArgument("block number 0xFFFFFFFF is not a valid SLRU block")
    return make_key(_SLRU_PREFIX, int(kind), 1, segno, 0, blkno)


def slru_segment_size_key(kind: SlruKind, segno: int) -> Key:
    return make_key(_SLRU_PREFIX, int(kind), 1, segno, 0, _SIZE_MARKER)


def slru_segment_blocks_range(kind: SlruKind, segno: int) -> KeyRange:
    return KeyRange(
        make_key(_SLRU_PREFIX, int(kind), 1, segno, 0, 0),
        make_key(_SLRU_PREFIX, int(kind), 1, segno, 0, _SIZE_MARKER),
    )


def slru_range(kind: SlruKind) -> KeyRange:
    """Every key of one SLRU: directory, pages and segment sizes."""
    return KeyRange(
        make_key(_SLRU_PREFIX, int(kind), 0, 0, 0, 0),
        make_key(_SLRU_PREFIX, int(kind) + 1, 0, 0, 0, 0),
    )


# --- two-phase state, control data ------------------------------------------------------------

TWOPHASE_DIR_KEY = make_key(_TWOPHASE_PREFIX, 0, 0, 0, 0, 0)


def twophase_file_key(xid: int) -> Key:
    return make_key(_TWOPHASE_PREFIX, 0, 0, 0, 1, xid)


TWOPHASE_FILES_RANGE = KeyRange(
    make_key(_TWOPHASE_PREFIX, 0, 0, 0, 1, 0), make_key(_TWOPHASE_PREFIX, 0, 0, 0, 2, 0)
)

CONTROLFILE_KEY = make_key(_CONTROL_PREFIX, 0, 0, 0, 0, 0)
CHECKPOINT_KEY = make_key(_CONTROL_PREFIX, 0, 0, 0, 0, 1)
NODE_METADATA_KEY = make_key(_CONTROL_PREFIX, 0, 0, 0, 0, 2)
TABLESPACE_MAP_KEY = make_key(_CONTROL_PREFIX, 0, 0, 0, 0, 3)
"""The non-default tablespaces (pg_tblspc entries) and their locations: not page state, and
written down nowhere else (pg_tablespace has no location), so one keyed value like relmaps."""


# --- parsing ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RelBlock:
    """A parsed relation page key."""

    spc: int
    db: int
    rel: int
    fork: int
    blkno: int


def parse_rel_block_key(key: bytes) -> RelBlock | None:
    """The relation page a key names, or None if it is another kind of key."""
    f = key_fields(key)
    if f.field1 != _REL_PREFIX or f.field4 == 0 or f.field6 == _SIZE_MARKER:
        return None
    return RelBlock(f.field2, f.field3, f.field4, f.field5, f.field6)


def parse_slru_block_key(key: bytes) -> tuple[SlruKind, int, int] | None:
    """(kind, segno, blkno) of an SLRU page key, or None."""
    f = key_fields(key)
    if f.field1 != _SLRU_PREFIX or f.field3 != 1 or f.field6 == _SIZE_MARKER:
        return None
    return SlruKind(f.field2), f.field4, f.field6


def parse_twophase_file_key(key: bytes) -> int | None:
    f = key_fields(key)
    if f.field1 != _TWOPHASE_PREFIX or f.field5 != 1:
        return None
    return f.field6


def _fork_name(fork: int) -> str:
    return FORK_NAMES[fork] if fork < len(FORK_NAMES) else f"fork{fork}"


def _slru_name(kind: int) -> str:
    try:
        return SlruKind(kind).directory
    except ValueError:
        return f"slru{kind}"


def describe(key: bytes) -> str:
    """A human description for error messages, e.g. ``rel 1663/5/16384 fork main blk 7``."""
    if len(key) != KEY_SIZE:
        return f"invalid key {key.hex()}"
    if key == KEY_MAX:
        return "end of keyspace"
    f = key_fields(key)
    if f.field1 == _REL_PREFIX:
        if key == DB_DIR_KEY:
            return "database directory"
        if f.field4 == 0 and f.field5 == 0 and f.field6 == 0:
            return f"relmap file {f.field2}/{f.field3}"
        if f.field4 == 0 and f.field5 == 0 and f.field6 == 1:
            return f"relation directory {f.field2}/{f.field3}"
        rel = f"rel {f.field2}/{f.field3}/{f.field4} fork {_fork_name(f.field5)}"
        if f.field6 == _SIZE_MARKER:
            return f"{rel} size"
        return f"{rel} blk {f.field6}"
    if f.field1 == _SLRU_PREFIX:
        name = _slru_name(f.field2)
        if f.field3 == 0:
            return f"{name} directory"
        if f.field6 == _SIZE_MARKER:
            return f"{name} segment {f.field4:04X} size"
        return f"{name} segment {f.field4:04X} blk {f.field6}"
    if f.field1 == _TWOPHASE_PREFIX:
        if key == TWOPHASE_DIR_KEY:
            return "two-phase directory"
        return f"two-phase state of xid {f.field6}"
    if key == CONTROLFILE_KEY:
        return "pg_control"
    if key == CHECKPOINT_KEY:
        return "checkpoint"
    if key == NODE_METADATA_KEY:
        return "node metadata"
    if key == TABLESPACE_MAP_KEY:
        return "tablespace map"
    return f"key {key_to_hex(key)}"
