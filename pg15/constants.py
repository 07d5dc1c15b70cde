"""Compile-time facts of a default PostgreSQL 15 build, defined once.

Each value is the one in PostgreSQL 15's headers (cited per group); pg-neon refuses clusters
built otherwise (pg_control carries BLCKSZ, RELSEG_SIZE and XLOG_BLCKSZ, checked on import).
"""

from __future__ import annotations

# src/include/pg_config.h (configure defaults)
BLCKSZ = 8192
"""Relation page size."""
XLOG_BLCKSZ = 8192
"""WAL page size."""
RELSEG_SIZE = 131072
"""Blocks per relation segment file (1 GiB)."""
PG_MAJOR_VERSION = 15

# src/include/access/xlog_internal.h
WAL_SEGMENT_SIZE_MAX = 1 << 30
"""The largest WAL segment (initdb --wal-segsize, WalSegMaxSize): 1 GiB."""

# src/include/common/relpath.h: ForkNumber and forkNames[]
MAIN_FORKNUM = 0
FSM_FORKNUM = 1
VISIBILITYMAP_FORKNUM = 2
INIT_FORKNUM = 3
N_FORKS = 4
FORK_NAMES = ("main", "fsm", "vm", "init")
FORK_SUFFIX = {
    MAIN_FORKNUM: "",
    FSM_FORKNUM: "_fsm",
    VISIBILITYMAP_FORKNUM: "_vm",
    INIT_FORKNUM: "_init",
}
"""File name suffix of each fork: `<relfilenode><suffix>[.<segno>]`."""

# src/include/catalog/pg_tablespace.dat
DEFAULTTABLESPACE_OID = 1663
GLOBALTABLESPACE_OID = 1664

# src/include/access/transam.h
INVALID_TRANSACTION_ID = 0
FIRST_NORMAL_XID = 3
FIRST_NORMAL_OBJECT_ID = 16384

# src/include/access/slru.h
SLRU_PAGES_PER_SEGMENT = 32

# src/backend/access/transam/clog.c
CLOG_BITS_PER_XACT = 2
CLOG_XACTS_PER_BYTE = 4
CLOG_XACTS_PER_PAGE = BLCKSZ * CLOG_XACTS_PER_BYTE

# src/backend/access/transam/multixact.c
FIRST_MULTIXACT_ID = 1
MULTIXACT_OFFSETS_PER_PAGE = BLCKSZ // 4  # sizeof(MultiXactOffset)
MXACT_MEMBER_BITS_PER_XACT = 8
MULTIXACT_FLAGBYTES_PER_GROUP = 4
MULTIXACT_MEMBERS_PER_MEMBERGROUP = 4
MULTIXACT_MEMBERGROUP_SIZE = 4 * MULTIXACT_MEMBERS_PER_MEMBERGROUP + MULTIXACT_FLAGBYTES_PER_GROUP
MULTIXACT_MEMBERGROUPS_PER_PAGE = BLCKSZ // MULTIXACT_MEMBERGROUP_SIZE
MULTIXACT_MEMBERS_PER_PAGE = MULTIXACT_MEMBERGROUPS_PER_PAGE * MULTIXACT_MEMBERS_PER_MEMBERGROUP

# src/include/access/rmgrlist.h (the order is the id)
RM_XLOG_ID = 0
RM_XACT_ID = 1
RM_SMGR_ID = 2
RM_CLOG_ID = 3
RM_DBASE_ID = 4
RM_TBLSPC_ID = 5
RM_MULTIXACT_ID = 6
RM_RELMAP_ID = 7
RM_STANDBY_ID = 8
RM_HEAP2_ID = 9
RM_HEAP_ID = 10
RM_BTREE_ID = 11
RM_HASH_ID = 12
RM_GIN_ID = 13
RM_GIST_ID = 14
RM_SEQ_ID = 15
RM_SPGIST_ID = 16
RM_BRIN_ID = 17
RM_COMMIT_TS_ID = 18
RM_REPLORIGIN_ID = 19
RM_GENERIC_ID = 20
RM_LOGICALMSG_ID = 21
RM_MAX_BUILTIN_ID = RM_LOGICALMSG_ID
RM_MIN_CUSTOM_ID = 128  # src/include/access/rmgr.h
