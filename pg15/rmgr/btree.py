"""Btree rmgr (11): the main-data structs of every record type, plus the metapage data."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pg15.records import RelFileNode
from pg15.rmgr.fields import MainDataError, relfilenode, unpack

XLOG_BTREE_INSERT_LEAF = 0x00
XLOG_BTREE_INSERT_UPPER = 0x10
XLOG_BTREE_INSERT_META = 0x20
XLOG_BTREE_SPLIT_L = 0x30
XLOG_BTREE_SPLIT_R = 0x40
XLOG_BTREE_INSERT_POST = 0x50
XLOG_BTREE_DEDUP = 0x60
XLOG_BTREE_DELETE = 0x70
XLOG_BTREE_UNLINK_PAGE = 0x80
XLOG_BTREE_UNLINK_PAGE_META = 0x90
XLOG_BTREE_NEWROOT = 0xA0
XLOG_BTREE_MARK_PAGE_HALFDEAD = 0xB0
XLOG_BTREE_VACUUM = 0xC0
XLOG_BTREE_REUSE_PAGE = 0xD0
XLOG_BTREE_META_CLEANUP = 0xE0

_U16 = struct.Struct("<H")
_METADATA = struct.Struct("<IIIIII?3x")
_METADATA_MIN = 25  # the struct without its trailing padding
_SPLIT = struct.Struct("<IHHH")
_VACUUM = struct.Struct("<HH")
_DELETE = struct.Struct("<IHH")
_HALFDEAD = struct.Struct("<H2xIIII")
_UNLINK = struct.Struct("<III4xQIII")
_NEWROOT = struct.Struct("<II")
_REUSE_TAIL = struct.Struct("<I4xQ")


@dataclass(frozen=True, slots=True)
class BtreeMetadata:
    """xl_btree_metadata: block data of the metapage reference (INSERT_META, NEWROOT, ...)."""

    version: int
    root: int
    level: int
    fastroot: int
    fastlevel: int
    last_cleanup_num_delpages: int
    allequalimage: bool


@dataclass(frozen=True, slots=True)
class BtreeInsert:
    """INSERT_LEAF/UPPER/META/POST: `kind` is one of leaf, upper, meta, post."""

    kind: str
    offnum: int


@dataclass(frozen=True, slots=True)
class BtreeSplit:
    """SPLIT_L (`new_item_on_left`) or SPLIT_R."""

    new_item_on_left: bool
    level: int
    firstrightoff: int
    newitemoff: int
    postingoff: int


@dataclass(frozen=True, slots=True)
class BtreeDedup:
    nintervals: int


@dataclass(frozen=True, slots=True)
class BtreeVacuum:
    ndeleted: int
    nupdated: int


@dataclass(frozen=True, slots=True)
class BtreeDelete:
    latest_removed_xid: int
    ndeleted: int
    nupdated: int


@dataclass(frozen=True, slots=True)
class BtreeMarkPageHalfdead:
    poffset: int
    leafblk: int
    leftblk: int
    rightblk: int
    topparent: int


@dataclass(frozen=True, slots=True)
class BtreeUnlinkPage:
    """UNLINK_PAGE, or UNLINK_PAGE_META (`meta`: block 4 is the metapage)."""

    meta: bool
    leftsib: int
    rightsib: int
    level: int
    safexid: int
    leafleftsib: int
    leafrightsib: int
    leaftopparent: int


@dataclass(frozen=True, slots=True)
class BtreeNewroot:
    rootblk: int
    level: int


@dataclass(frozen=True, slots=True)
class BtreeReusePage:
    node: RelFileNode
    block: int
    latest_removed_full_xid: int


@dataclass(frozen=True, slots=True)
class BtreeMetaCleanup:
    """No main data: block 0 (the metapage) carries xl_btree_metadata."""


BtreeMain = (
    BtreeInsert
    | BtreeSplit
    | BtreeDedup
    | BtreeVacuum
    | BtreeDelete
    | BtreeMarkPageHalfdead
    | BtreeUnlinkPage
    | BtreeNewroot
    | BtreeReusePage
    | BtreeMetaCleanup
)

_INSERT_KINDS = {
    XLOG_BTREE_INSERT_LEAF: "leaf",
    XLOG_BTREE_INSERT_UPPER: "upper",
    XLOG_BTREE_INSERT_META: "meta",
    XLOG_BTREE_INSERT_POST: "post",
}


def parse_metadata(block_data: bytes) -> BtreeMetadata:
    """Decode xl_btree_metadata (its 3 trailing pad bytes may be absent)."""
    if len(block_data) < _METADATA_MIN:
        raise MainDataError(f"xl_btree_metadata: {len(block_data)} bytes, need 25")
    padded = block_data[: _METADATA.size].ljust(_METADATA.size, b"\0")
    return BtreeMetadata(*_METADATA.unpack(padded))


def decode(info: int, data: bytes) -> BtreeMain:
    op = info & 0xF0
    kind = _INSERT_KINDS.get(op)
    if kind is not None:
        return BtreeInsert(kind, unpack(_U16, data, 0, f"btree INSERT_{kind.upper()}")[0])
    if op in (XLOG_BTREE_SPLIT_L, XLOG_BTREE_SPLIT_R):
        return BtreeSplit(op == XLOG_BTREE_SPLIT_L, *unpack(_SPLIT, data, 0, "btree SPLIT"))
    if op == XLOG_BTREE_DEDUP:
        return BtreeDedup(unpack(_U16, data, 0, "btree DEDUP")[0])
    if op == XLOG_BTREE_VACUUM:
        return BtreeVacuum(*unpack(_VACUUM, data, 0, "btree VACUUM"))
    if op == XLOG_BTREE_DELETE:
        return BtreeDelete(*unpack(_DELETE, data, 0, "btree DELETE"))
    if op == XLOG_BTREE_MARK_PAGE_HALFDEAD:
        return BtreeMarkPageHalfdead(*unpack(_HALFDEAD, data, 0, "MARK_PAGE_HALFDEAD"))
    if op in (XLOG_BTREE_UNLINK_PAGE, XLOG_BTREE_UNLINK_PAGE_META):
        fields = unpack(_UNLINK, data, 0, "btree UNLINK_PAGE")
        return BtreeUnlinkPage(op == XLOG_BTREE_UNLINK_PAGE_META, *fields)
    if op == XLOG_BTREE_NEWROOT:
        return BtreeNewroot(*unpack(_NEWROOT, data, 0, "btree NEWROOT"))
    if op == XLOG_BTREE_REUSE_PAGE:
        node = relfilenode(data, 0, "btree REUSE_PAGE")
        return BtreeReusePage(node, *unpack(_REUSE_TAIL, data, 12, "btree REUSE_PAGE"))
    if op == XLOG_BTREE_META_CLEANUP:
        return BtreeMetaCleanup()
    raise MainDataError(f"unknown Btree record info {info:#04x}")
