"""MultiXact rmgr (6): SLRU page zeroing, multixact creation (with members), truncation."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pg15.rmgr.fields import MainDataError, array, unpack

XLOG_MULTIXACT_ZERO_OFF_PAGE = 0x00
XLOG_MULTIXACT_ZERO_MEM_PAGE = 0x10
XLOG_MULTIXACT_CREATE_ID = 0x20
XLOG_MULTIXACT_TRUNCATE_ID = 0x30

MEMBER_STATUS_NAMES = ("keysh", "sh", "fornokeyupd", "forupd", "nokeyupd", "upd")

_I32 = struct.Struct("<i")
_CREATE = struct.Struct("<IIi")
_TRUNCATE = struct.Struct("<IIIII")


@dataclass(frozen=True, slots=True)
class MultiXactZeroPage:
    """Zero a page of pg_multixact/offsets (`members` False) or pg_multixact/members."""

    members: bool
    pageno: int


@dataclass(frozen=True, slots=True)
class MultiXactMember:
    xid: int
    status: int  # MultiXactStatus: 0 ForKeyShare .. 5 Update

    @property
    def status_name(self) -> str:
        s = self.status
        return MEMBER_STATUS_NAMES[s] if 0 <= s < len(MEMBER_STATUS_NAMES) else f"unk{s}"


@dataclass(frozen=True, slots=True)
class MultiXactCreate:
    mid: int
    moff: int
    members: tuple[MultiXactMember, ...]


@dataclass(frozen=True, slots=True)
class MultiXactTruncate:
    oldest_multi_db: int
    start_trunc_off: int
    end_trunc_off: int
    start_trunc_memb: int
    end_trunc_memb: int


MultiXactMain = MultiXactZeroPage | MultiXactCreate | MultiXactTruncate


def decode(info: int, data: bytes) -> MultiXactMain:
    op = info & 0xF0
    if op in (XLOG_MULTIXACT_ZERO_OFF_PAGE, XLOG_MULTIXACT_ZERO_MEM_PAGE):
        pageno = unpack(_I32, data, 0, "MultiXact ZERO_PAGE")[0]
        return MultiXactZeroPage(op == XLOG_MULTIXACT_ZERO_MEM_PAGE, pageno)
    if op == XLOG_MULTIXACT_CREATE_ID:
        mid, moff, n = unpack(_CREATE, data, 0, "CREATE_ID")
        flat = array("I", data, 12, 2 * n, "CREATE_ID")
        members = tuple(MultiXactMember(flat[i], flat[i + 1]) for i in range(0, len(flat), 2))
        return MultiXactCreate(mid, moff, members)
    if op == XLOG_MULTIXACT_TRUNCATE_ID:
        return MultiXactTruncate(*unpack(_TRUNCATE, data, 0, "TRUNCATE_ID"))
    raise MainDataError(f"unknown MultiXact record info {info:#04x}")
