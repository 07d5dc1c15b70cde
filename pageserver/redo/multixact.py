"""pg_multixact offsets and members pages (RecordNewMultiXact in
src/backend/access/transam/multixact.c).

A CREATE_ID record stores the multixact's starting member offset in the offsets SLRU
(4 bytes per multixact) and each member in the members SLRU. Members pages are made of
409 groups of 20 bytes: 4 flag bytes (one status byte per member) then 4 xids; the last
12 bytes of a page are unused. Member offsets are 32-bit and wrap around.

Minor releases from 15.15 on (the installed 15.18 among them) also store the *next*
multixact's starting offset (moff + nmembers, skipping 0), possibly on the next offsets
page; older ones leave it for the next CREATE_ID, which writes the same value. Writing it is
correct for both, and is what a 15.18 server's own files hold.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from pageserver.redo.page import PageError
from pg15.constants import (
    BLCKSZ,
    FIRST_MULTIXACT_ID,
    MULTIXACT_FLAGBYTES_PER_GROUP,
    MULTIXACT_MEMBERGROUP_SIZE,
    MULTIXACT_MEMBERGROUPS_PER_PAGE,
    MULTIXACT_MEMBERS_PER_MEMBERGROUP,
    MULTIXACT_MEMBERS_PER_PAGE,
    MULTIXACT_OFFSETS_PER_PAGE,
    MXACT_MEMBER_BITS_PER_XACT,
)
from pg15.rmgr.multixact import MultiXactCreate, MultiXactMember

_U32 = struct.Struct("<I")


def offsets_page(multi: int) -> int:
    """MultiXactIdToOffsetPage."""
    return multi // MULTIXACT_OFFSETS_PER_PAGE


def members_page(offset: int) -> int:
    """MXOffsetToMemberPage."""
    return (offset & 0xFFFFFFFF) // MULTIXACT_MEMBERS_PER_PAGE


def _member_location(offset: int) -> tuple[int, int, int]:
    """(flags word offset, bit shift in it, xid offset) of member `offset` within its page."""
    group = (offset // MULTIXACT_MEMBERS_PER_MEMBERGROUP) % MULTIXACT_MEMBERGROUPS_PER_PAGE
    flagsoff = group * MULTIXACT_MEMBERGROUP_SIZE
    slot = offset % MULTIXACT_MEMBERS_PER_MEMBERGROUP
    return (
        flagsoff,
        slot * MXACT_MEMBER_BITS_PER_XACT,
        flagsoff + MULTIXACT_FLAGBYTES_PER_GROUP + slot * 4,
    )


def next_multi(mid: int) -> int:
    """The following MultiXactId, skipping InvalidMultiXactId (0) on wraparound."""
    nxt = (mid + 1) & 0xFFFFFFFF
    return nxt if nxt >= FIRST_MULTIXACT_ID else FIRST_MULTIXACT_ID


def multixact_offset_pages(mid: int) -> list[int]:
    """The offsets pages a CREATE_ID of `mid` writes (its own and maybe the next one's)."""
    pages = [offsets_page(mid)]
    nxt = offsets_page(next_multi(mid))
    if nxt != pages[0]:
        pages.append(nxt)
    return pages


def multixact_apply_offsets(
    page: bytearray, pageno: int, mid: int, moff: int, nmembers: int
) -> None:
    """Store `mid`'s starting member offset and the next multixact's, where on page `pageno`."""
    if len(page) != BLCKSZ:
        raise PageError(f"multixact offsets page has {len(page)} bytes")
    next_offset = (moff + nmembers) & 0xFFFFFFFF
    if next_offset == 0:
        next_offset = 1
    nxt = next_multi(mid)
    for multi, value in ((mid, moff & 0xFFFFFFFF), (nxt, next_offset)):
        if offsets_page(multi) == pageno:
            _U32.pack_into(page, (multi % MULTIXACT_OFFSETS_PER_PAGE) * 4, value)


def multixact_member_pages(moff: int, nmembers: int) -> list[int]:
    """The members pages a multixact with `nmembers` members starting at `moff` touches."""
    pages: list[int] = []
    for i in range(nmembers):
        p = members_page(moff + i)
        if not pages or pages[-1] != p:
            pages.append(p)
    return pages


def multixact_apply_members(
    page: bytearray, pageno: int, moff: int, members: Sequence[MultiXactMember]
) -> None:
    """Store the members that fall on members page `pageno` (others are left to their pages)."""
    if len(page) != BLCKSZ:
        raise PageError(f"multixact members page has {len(page)} bytes")
    for i, member in enumerate(members):
        offset = (moff + i) & 0xFFFFFFFF
        if members_page(offset) != pageno:
            continue
        if not 0 <= member.status <= 5:
            raise PageError(f"invalid multixact member status {member.status}")
        flagsoff, shift, xidoff = _member_location(offset)
        _U32.pack_into(page, xidoff, member.xid)
        flags = _U32.unpack_from(page, flagsoff)[0]
        flags = (flags & ~(0xFF << shift)) | (member.status << shift)
        _U32.pack_into(page, flagsoff, flags & 0xFFFFFFFF)


def apply_create(
    record: MultiXactCreate, offsets: dict[int, bytearray], members: dict[int, bytearray]
) -> None:
    """Apply a decoded CREATE_ID to the pages given by page number (missing ones: zeroed)."""
    for pageno in multixact_offset_pages(record.mid):
        page = offsets.setdefault(pageno, bytearray(BLCKSZ))
        multixact_apply_offsets(page, pageno, record.mid, record.moff, len(record.members))
    for pageno in multixact_member_pages(record.moff, len(record.members)):
        page = members.setdefault(pageno, bytearray(BLCKSZ))
        multixact_apply_members(page, pageno, record.moff, record.members)
