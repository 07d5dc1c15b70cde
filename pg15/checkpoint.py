"""PostgreSQL's CheckPoint struct (src/include/catalog/pg_control.h): the main data of a
checkpoint record and pg_control's checkPointCopy.

Apart from the XLOG rmgr's decoders (pg15/rmgr/xlog.py, which re-exports it) because
pg15/pg_control.py needs it too, and every `neon` command that reads pg_control (checkout,
snapshot create, start) would otherwise import every record decoder: 10-23 ms of its start.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pg15.main_data import unpack

_CHECKPOINT = struct.Struct("<QII?7xQIIIIIII4xqIII4x")


@dataclass(frozen=True, slots=True)
class CheckPoint:
    """The 88-byte CheckPoint struct (also pg_control's checkPointCopy)."""

    redo: int
    this_timeline: int
    prev_timeline: int
    full_page_writes: bool
    next_full_xid: int
    next_oid: int
    next_multi: int
    next_multi_offset: int
    oldest_xid: int
    oldest_xid_db: int
    oldest_multi: int
    oldest_multi_db: int
    time: int
    oldest_commit_ts_xid: int
    newest_commit_ts_xid: int
    oldest_active_xid: int

    SIZE = _CHECKPOINT.size

    @property
    def next_xid_epoch(self) -> int:
        return self.next_full_xid >> 32

    @property
    def next_xid(self) -> int:
        return self.next_full_xid & 0xFFFFFFFF

    @classmethod
    def unpack(cls, data: bytes, offset: int = 0) -> CheckPoint:
        return cls(*unpack(_CHECKPOINT, data, offset, "CheckPoint"))

    def pack(self) -> bytes:
        """The struct bytes with zero padding, for writing pg_control or a checkpoint record."""
        return _CHECKPOINT.pack(
            self.redo,
            self.this_timeline,
            self.prev_timeline,
            self.full_page_writes,
            self.next_full_xid,
            self.next_oid,
            self.next_multi,
            self.next_multi_offset,
            self.oldest_xid,
            self.oldest_xid_db,
            self.oldest_multi,
            self.oldest_multi_db,
            self.time,
            self.oldest_commit_ts_xid,
            self.newest_commit_ts_xid,
            self.oldest_active_xid,
        )


CHECKPOINT_RECORD_SIZE = 24 + 2 + 88
"""A checkpoint record: the 24-byte XLogRecord header, the short main-data header
(XLR_BLOCK_ID_DATA_SHORT and a length byte) and the 88-byte CheckPoint."""
