"""Storage rmgr (2): relation fork creation and truncation."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pg15.records import RelFileNode
from pg15.rmgr.fields import MainDataError, relfilenode, unpack

XLOG_SMGR_CREATE = 0x10
XLOG_SMGR_TRUNCATE = 0x20
SMGR_TRUNCATE_HEAP = 0x0001
SMGR_TRUNCATE_VM = 0x0002
SMGR_TRUNCATE_FSM = 0x0004

_I32 = struct.Struct("<i")
_U32 = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class SmgrCreate:
    rnode: RelFileNode
    fork: int


@dataclass(frozen=True, slots=True)
class SmgrTruncate:
    """Cut the forks named by `flags` so that heap block `blkno` and above are gone."""

    blkno: int
    rnode: RelFileNode
    flags: int

    @property
    def truncates_main(self) -> bool:
        return bool(self.flags & SMGR_TRUNCATE_HEAP)

    @property
    def truncates_vm(self) -> bool:
        return bool(self.flags & SMGR_TRUNCATE_VM)

    @property
    def truncates_fsm(self) -> bool:
        return bool(self.flags & SMGR_TRUNCATE_FSM)


def decode(info: int, data: bytes) -> SmgrCreate | SmgrTruncate:
    op = info & 0xF0
    if op == XLOG_SMGR_CREATE:
        return SmgrCreate(relfilenode(data, 0, "smgr CREATE"), unpack(_I32, data, 12, "CREATE")[0])
    if op == XLOG_SMGR_TRUNCATE:
        (blkno,) = unpack(_U32, data, 0, "smgr TRUNCATE")
        rnode = relfilenode(data, 4, "smgr TRUNCATE")
        return SmgrTruncate(blkno, rnode, unpack(_I32, data, 16, "smgr TRUNCATE")[0])
    raise MainDataError(f"unknown Storage record info {info:#04x}")
