"""XLOG rmgr (0): checkpoints, nextoid, switch, parameter changes, page images, ..."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pg15.checkpoint import CHECKPOINT_RECORD_SIZE as CHECKPOINT_RECORD_SIZE
from pg15.checkpoint import CheckPoint as CheckPoint
from pg15.rmgr.fields import MainDataError, unpack

XLOG_CHECKPOINT_SHUTDOWN = 0x00
XLOG_CHECKPOINT_ONLINE = 0x10
XLOG_NOOP = 0x20
XLOG_NEXTOID = 0x30
XLOG_SWITCH = 0x40
XLOG_BACKUP_END = 0x50
XLOG_PARAMETER_CHANGE = 0x60
XLOG_RESTORE_POINT = 0x70
XLOG_FPW_CHANGE = 0x80
XLOG_END_OF_RECOVERY = 0x90
XLOG_FPI_FOR_HINT = 0xA0
XLOG_FPI = 0xB0
XLOG_OVERWRITE_CONTRECORD = 0xD0

_PARAMETER_CHANGE = struct.Struct("<iiiiii??2x")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_RESTORE_POINT = struct.Struct("<q64s")
_END_OF_RECOVERY = struct.Struct("<qII")
_OVERWRITE = struct.Struct("<Qq")


@dataclass(frozen=True, slots=True)
class XlogCheckpoint:
    shutdown: bool
    checkpoint: CheckPoint


@dataclass(frozen=True, slots=True)
class XlogNextOid:
    next_oid: int


@dataclass(frozen=True, slots=True)
class XlogSwitch:
    """The rest of the segment is padding."""


@dataclass(frozen=True, slots=True)
class XlogNoop:
    data: bytes


@dataclass(frozen=True, slots=True)
class XlogBackupEnd:
    start_point: int


@dataclass(frozen=True, slots=True)
class XlogParameterChange:
    max_connections: int
    max_worker_processes: int
    max_wal_senders: int
    max_prepared_xacts: int
    max_locks_per_xact: int
    wal_level: int
    wal_log_hints: bool
    track_commit_timestamp: bool


@dataclass(frozen=True, slots=True)
class XlogRestorePoint:
    time: int
    name: str


@dataclass(frozen=True, slots=True)
class XlogFpwChange:
    full_page_writes: bool


@dataclass(frozen=True, slots=True)
class XlogEndOfRecovery:
    end_time: int
    this_timeline: int
    prev_timeline: int


@dataclass(frozen=True, slots=True)
class XlogFpi:
    """XLOG_FPI / XLOG_FPI_FOR_HINT: the payload is the block images themselves."""

    for_hint: bool


@dataclass(frozen=True, slots=True)
class XlogOverwriteContrecord:
    overwritten_lsn: int
    overwrite_time: int


XlogMain = (
    XlogCheckpoint
    | XlogNextOid
    | XlogSwitch
    | XlogNoop
    | XlogBackupEnd
    | XlogParameterChange
    | XlogRestorePoint
    | XlogFpwChange
    | XlogEndOfRecovery
    | XlogFpi
    | XlogOverwriteContrecord
)


def decode(info: int, data: bytes) -> XlogMain:
    op = info & 0xF0
    if op in (XLOG_CHECKPOINT_SHUTDOWN, XLOG_CHECKPOINT_ONLINE):
        return XlogCheckpoint(op == XLOG_CHECKPOINT_SHUTDOWN, CheckPoint.unpack(data))
    if op == XLOG_NEXTOID:
        return XlogNextOid(unpack(_U32, data, 0, "NEXTOID")[0])
    if op == XLOG_SWITCH:
        return XlogSwitch()
    if op == XLOG_NOOP:
        return XlogNoop(data)
    if op == XLOG_BACKUP_END:
        return XlogBackupEnd(unpack(_U64, data, 0, "BACKUP_END")[0])
    if op == XLOG_PARAMETER_CHANGE:
        return XlogParameterChange(*unpack(_PARAMETER_CHANGE, data, 0, "PARAMETER_CHANGE"))
    if op == XLOG_RESTORE_POINT:
        time, name = unpack(_RESTORE_POINT, data, 0, "RESTORE_POINT")
        return XlogRestorePoint(time, name.split(b"\0", 1)[0].decode("utf-8", "replace"))
    if op == XLOG_FPW_CHANGE:
        if not data:
            raise MainDataError("FPW_CHANGE: no main data")
        return XlogFpwChange(data[0] != 0)
    if op == XLOG_END_OF_RECOVERY:
        return XlogEndOfRecovery(*unpack(_END_OF_RECOVERY, data, 0, "END_OF_RECOVERY"))
    if op in (XLOG_FPI, XLOG_FPI_FOR_HINT):
        return XlogFpi(op == XLOG_FPI_FOR_HINT)
    if op == XLOG_OVERWRITE_CONTRECORD:
        return XlogOverwriteContrecord(*unpack(_OVERWRITE, data, 0, "OVERWRITE_CONTRECORD"))
    raise MainDataError(f"unknown XLOG record info {info:#04x}")
