"""Resource manager and record-type names exactly as pg_waldump prints them (PG 15).

Reports and `neon waldump` group records by these names, so they follow the rm_identify
functions in src/backend/access/rmgrdesc/*.c, including which bits of xl_info each one masks.
"""

from __future__ import annotations

from pg15.constants import (
    RM_BRIN_ID,
    RM_BTREE_ID,
    RM_CLOG_ID,
    RM_COMMIT_TS_ID,
    RM_DBASE_ID,
    RM_GENERIC_ID,
    RM_GIN_ID,
    RM_GIST_ID,
    RM_HASH_ID,
    RM_HEAP2_ID,
    RM_HEAP_ID,
    RM_LOGICALMSG_ID,
    RM_MULTIXACT_ID,
    RM_RELMAP_ID,
    RM_REPLORIGIN_ID,
    RM_SEQ_ID,
    RM_SMGR_ID,
    RM_SPGIST_ID,
    RM_STANDBY_ID,
    RM_TBLSPC_ID,
    RM_XACT_ID,
    RM_XLOG_ID,
)

RMGR_NAMES: tuple[str, ...] = (
    "XLOG",
    "Transaction",
    "Storage",
    "CLOG",
    "Database",
    "Tablespace",
    "MultiXact",
    "RelMap",
    "Standby",
    "Heap2",
    "Heap",
    "Btree",
    "Hash",
    "Gin",
    "Gist",
    "Sequence",
    "SPGist",
    "BRIN",
    "CommitTs",
    "ReplicationOrigin",
    "Generic",
    "LogicalMessage",
)

# Per rmgr: the mask applied to xl_info before lookup, and the names by masked value.
_ALL_BUT_XLR = 0xF0  # info & ~XLR_INFO_MASK
_WHOLE_INFO = 0xFF  # identify functions that switch on the raw info byte
_XACT_OPMASK = 0x70

_TYPES: dict[int, tuple[int, dict[int, str]]] = {
    RM_XLOG_ID: (
        _ALL_BUT_XLR,
        {
            0x00: "CHECKPOINT_SHUTDOWN",
            0x10: "CHECKPOINT_ONLINE",
            0x20: "NOOP",
            0x30: "NEXTOID",
            0x40: "SWITCH",
            0x50: "BACKUP_END",
            0x60: "PARAMETER_CHANGE",
            0x70: "RESTORE_POINT",
            0x80: "FPW_CHANGE",
            0x90: "END_OF_RECOVERY",
            0xA0: "FPI_FOR_HINT",
            0xB0: "FPI",
            0xD0: "OVERWRITE_CONTRECORD",
        },
    ),
    RM_XACT_ID: (
        _XACT_OPMASK,
        {
            0x00: "COMMIT",
            0x10: "PREPARE",
            0x20: "ABORT",
            0x30: "COMMIT_PREPARED",
            0x40: "ABORT_PREPARED",
            0x50: "ASSIGNMENT",
            0x60: "INVALIDATION",
        },
    ),
    RM_SMGR_ID: (_ALL_BUT_XLR, {0x10: "CREATE", 0x20: "TRUNCATE"}),
    RM_CLOG_ID: (_ALL_BUT_XLR, {0x00: "ZEROPAGE", 0x10: "TRUNCATE"}),
    RM_DBASE_ID: (
        _ALL_BUT_XLR,
        {0x00: "CREATE_FILE_COPY", 0x10: "CREATE_WAL_LOG", 0x20: "DROP"},
    ),
    RM_TBLSPC_ID: (_ALL_BUT_XLR, {0x00: "CREATE", 0x10: "DROP"}),
    RM_MULTIXACT_ID: (
        _ALL_BUT_XLR,
        {0x00: "ZERO_OFF_PAGE", 0x10: "ZERO_MEM_PAGE", 0x20: "CREATE_ID", 0x30: "TRUNCATE_ID"},
    ),
    RM_RELMAP_ID: (_ALL_BUT_XLR, {0x00: "UPDATE"}),
    RM_STANDBY_ID: (_ALL_BUT_XLR, {0x00: "LOCK", 0x10: "RUNNING_XACTS", 0x20: "INVALIDATIONS"}),
    RM_HEAP2_ID: (
        _ALL_BUT_XLR,
        {
            0x00: "REWRITE",
            0x10: "PRUNE",
            0x20: "VACUUM",
            0x30: "FREEZE_PAGE",
            0x40: "VISIBLE",
            0x50: "MULTI_INSERT",
            0xD0: "MULTI_INSERT+INIT",
            0x60: "LOCK_UPDATED",
            0x70: "NEW_CID",
        },
    ),
    RM_HEAP_ID: (
        _ALL_BUT_XLR,
        {
            0x00: "INSERT",
            0x80: "INSERT+INIT",
            0x10: "DELETE",
            0x20: "UPDATE",
            0xA0: "UPDATE+INIT",
            0x30: "TRUNCATE",
            0x40: "HOT_UPDATE",
            0xC0: "HOT_UPDATE+INIT",
            0x50: "HEAP_CONFIRM",
            0x60: "LOCK",
            0x70: "INPLACE",
        },
    ),
    RM_BTREE_ID: (
        _ALL_BUT_XLR,
        {
            0x00: "INSERT_LEAF",
            0x10: "INSERT_UPPER",
            0x20: "INSERT_META",
            0x30: "SPLIT_L",
            0x40: "SPLIT_R",
            0x50: "INSERT_POST",
            0x60: "DEDUP",
            0x70: "DELETE",
            0x80: "UNLINK_PAGE",
            0x90: "UNLINK_PAGE_META",
            0xA0: "NEWROOT",
            0xB0: "MARK_PAGE_HALFDEAD",
            0xC0: "VACUUM",
            0xD0: "REUSE_PAGE",
            0xE0: "META_CLEANUP",
        },
    ),
    RM_HASH_ID: (
        _ALL_BUT_XLR,
        {
            0x00: "INIT_META_PAGE",
            0x10: "INIT_BITMAP_PAGE",
            0x20: "INSERT",
            0x30: "ADD_OVFL_PAGE",
            0x40: "SPLIT_ALLOCATE_PAGE",
            0x50: "SPLIT_PAGE",
            0x60: "SPLIT_COMPLETE",
            0x70: "MOVE_PAGE_CONTENTS",
            0x80: "SQUEEZE_PAGE",
            0x90: "DELETE",
            0xA0: "SPLIT_CLEANUP",
            0xB0: "UPDATE_META_PAGE",
            0xC0: "VACUUM_ONE_PAGE",
        },
    ),
    RM_GIN_ID: (
        _ALL_BUT_XLR,
        {
            0x10: "CREATE_PTREE",
            0x20: "INSERT",
            0x30: "SPLIT",
            0x40: "VACUUM_PAGE",
            0x90: "VACUUM_DATA_LEAF_PAGE",
            0x50: "DELETE_PAGE",
            0x60: "UPDATE_META_PAGE",
            0x70: "INSERT_LISTPAGE",
            0x80: "DELETE_LISTPAGE",
        },
    ),
    RM_GIST_ID: (
        _ALL_BUT_XLR,
        {
            0x00: "PAGE_UPDATE",
            0x10: "DELETE",
            0x20: "PAGE_REUSE",
            0x30: "PAGE_SPLIT",
            0x60: "PAGE_DELETE",
            0x70: "ASSIGN_LSN",
        },
    ),
    RM_SEQ_ID: (_ALL_BUT_XLR, {0x00: "LOG"}),
    RM_SPGIST_ID: (
        _ALL_BUT_XLR,
        {
            0x10: "ADD_LEAF",
            0x20: "MOVE_LEAFS",
            0x30: "ADD_NODE",
            0x40: "SPLIT_TUPLE",
            0x50: "PICKSPLIT",
            0x60: "VACUUM_LEAF",
            0x70: "VACUUM_ROOT",
            0x80: "VACUUM_REDIRECT",
        },
    ),
    RM_BRIN_ID: (
        _ALL_BUT_XLR,
        {
            0x00: "CREATE_INDEX",
            0x10: "INSERT",
            0x90: "INSERT+INIT",
            0x20: "UPDATE",
            0xA0: "UPDATE+INIT",
            0x30: "SAMEPAGE_UPDATE",
            0x40: "REVMAP_EXTEND",
            0x50: "DESUMMARIZE",
        },
    ),
    RM_COMMIT_TS_ID: (_WHOLE_INFO, {0x00: "ZEROPAGE", 0x10: "TRUNCATE"}),
    RM_REPLORIGIN_ID: (_WHOLE_INFO, {0x00: "SET", 0x10: "DROP"}),
    RM_LOGICALMSG_ID: (_ALL_BUT_XLR, {0x00: "MESSAGE"}),
}


def rmgr_name(rmgr_id: int) -> str:
    """The rmgr column of pg_waldump; custom rmgrs (128-255) print as `custom###`."""
    if rmgr_id < len(RMGR_NAMES):
        return RMGR_NAMES[rmgr_id]
    return f"custom{rmgr_id:03d}"


def record_type_name(rmgr_id: int, info: int) -> str:
    """The first word of pg_waldump's desc column, e.g. `INSERT+INIT` or `COMMIT`."""
    if rmgr_id == RM_GENERIC_ID:
        return "Generic"
    entry = _TYPES.get(rmgr_id)
    if entry is not None:
        mask, names = entry
        name = names.get(info & mask)
        if name is not None:
            return name
    return f"UNKNOWN ({info & 0xF0:x})"
