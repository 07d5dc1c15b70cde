"""Standby rmgr (8): AccessExclusive locks, running-xacts snapshots, invalidations."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pg15.rmgr.fields import MainDataError, array, unpack

XLOG_STANDBY_LOCK = 0x00
XLOG_RUNNING_XACTS = 0x10
XLOG_INVALIDATIONS = 0x20

_I32 = struct.Struct("<i")
_RUNNING = struct.Struct("<ii?3xIII")
_INVALS = struct.Struct("<II?3xi")


@dataclass(frozen=True, slots=True)
class StandbyLock:
    xid: int
    db_oid: int
    rel_oid: int


@dataclass(frozen=True, slots=True)
class StandbyLocks:
    locks: tuple[StandbyLock, ...]


@dataclass(frozen=True, slots=True)
class RunningXacts:
    subxid_overflow: bool
    next_xid: int
    oldest_running_xid: int
    latest_completed_xid: int
    xids: tuple[int, ...]
    subxids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class StandbyInvalidations:
    db_id: int
    ts_id: int
    relcache_init_file_inval: bool
    invalidations: bytes


def decode(info: int, data: bytes) -> StandbyLocks | RunningXacts | StandbyInvalidations:
    op = info & 0xF0
    if op == XLOG_STANDBY_LOCK:
        (n,) = unpack(_I32, data, 0, "Standby LOCK")
        flat = array("I", data, 4, 3 * n, "Standby LOCK")
        return StandbyLocks(tuple(StandbyLock(*flat[i : i + 3]) for i in range(0, len(flat), 3)))
    if op == XLOG_RUNNING_XACTS:
        xcnt, subxcnt, overflow, next_xid, oldest, latest = unpack(
            _RUNNING, data, 0, "RUNNING_XACTS"
        )
        xids = array("I", data, 24, xcnt + subxcnt, "RUNNING_XACTS")
        return RunningXacts(overflow, next_xid, oldest, latest, xids[:xcnt], xids[xcnt:])
    if op == XLOG_INVALIDATIONS:
        db_id, ts_id, init_inval, n = unpack(_INVALS, data, 0, "Standby INVALIDATIONS")
        if n < 0 or len(data) < 16 + 16 * n:
            raise MainDataError(f"Standby INVALIDATIONS: {n} messages do not fit")
        return StandbyInvalidations(db_id, ts_id, init_inval, data[16 : 16 + 16 * n])
    raise MainDataError(f"unknown Standby record info {info:#04x}")
