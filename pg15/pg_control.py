"""pg_control (global/pg_control) of PostgreSQL 15: parse and validate the fields we use.

Layout: ControlFileData of src/include/catalog/pg_control.h (x86-64, little-endian), padded
with zeros to 8192 bytes (PG_CONTROL_FILE_SIZE); the CRC-32C of bytes [0, 288) is stored at
offset 288. Offsets used here are named below.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from pg15.checkpoint import CheckPoint
from pg15.checksum import crc32c
from proto.errors import CorruptData

PG_CONTROL_VERSION = 1300
CONTROL_FILE_SIZE = 8192
_CRC_OFFSET = 288
_HEAD = struct.Struct(
    "<QIII4xqQ"
)  # system_identifier, version, catversion, state, time, checkPoint
_CRC = struct.Struct("<I")
_SEG_SIZE_OFFSET = 228
_CHECKSUM_VERSION_OFFSET = 252
_U32 = struct.Struct("<I")
# Writer offsets (pg_control.h): state, time, checkPoint, checkPointCopy, unloggedLSN, then
# minRecoveryPoint, minRecoveryPointTLI, backupStartPoint, backupEndPoint, backupEndRequired.
_STATE_TIME_CHECKPOINT = struct.Struct("<I4xqQ")
_STATE_OFFSET = 16
_CHECKPOINT_COPY_OFFSET = 40
_UNLOGGED_LSN = struct.Struct("<Q")
_UNLOGGED_LSN_OFFSET = 128
_RECOVERY_FIELDS = struct.Struct("<QI4xQQ?3x")
_RECOVERY_FIELDS_OFFSET = 136
FIRST_NORMAL_UNLOGGED_LSN = 1000

DB_STATES = {
    0: "starting up",
    1: "shut down",
    2: "shut down in recovery",
    3: "shutting down",
    4: "in crash recovery",
    5: "in archive recovery",
    6: "in production",
}
DB_SHUTDOWNED = 1
DB_SHUTDOWNED_IN_RECOVERY = 2
DB_IN_PRODUCTION = 6


@dataclass(frozen=True, slots=True)
class ControlFile:
    system_identifier: int
    pg_control_version: int
    catalog_version: int
    state: int
    checkpoint_lsn: int
    checkpoint: CheckPoint
    wal_segment_size: int
    raw: bytes
    data_checksum_version: int = 0

    @property
    def state_name(self) -> str:
        return DB_STATES.get(self.state, f"unknown ({self.state})")


def parse_control_file(data: bytes, source: str = "pg_control") -> ControlFile:
    if len(data) < _CRC_OFFSET + 4:
        raise CorruptData(f"{source} is truncated ({len(data)} bytes)")
    (stored,) = _CRC.unpack_from(data, _CRC_OFFSET)
    if crc32c(data[:_CRC_OFFSET]) != stored:
        raise CorruptData(f"{source} has a bad CRC; the file is corrupt")
    sysid, version, catversion, state, _time, checkpoint_lsn = _HEAD.unpack_from(data, 0)
    if version != PG_CONTROL_VERSION:
        raise CorruptData(
            f"{source} has version {version}, expected {PG_CONTROL_VERSION} (PostgreSQL 15)"
        )
    return ControlFile(
        system_identifier=sysid,
        pg_control_version=version,
        catalog_version=catversion,
        state=state,
        checkpoint_lsn=checkpoint_lsn,
        checkpoint=CheckPoint.unpack(data, _HEAD.size),
        wal_segment_size=_U32.unpack_from(data, _SEG_SIZE_OFFSET)[0],
        raw=bytes(data[:CONTROL_FILE_SIZE]),
        data_checksum_version=_U32.unpack_from(data, _CHECKSUM_VERSION_OFFSET)[0],
    )


def with_checkpoint(
    template: bytes, checkpoint_lsn: int, checkpoint: CheckPoint, time: int
) -> bytes:
    """A pg_control for a clean start at a shutdown checkpoint, as pg_resetwal writes one.

    state = shut down, checkPoint and checkPointCopy set, recovery and backup fields cleared,
    unloggedLSN raised to at least FirstNormalUnloggedLSN; everything else (system identifier,
    compile-time constants, GUC snapshot) is kept from `template`; the CRC is recomputed.
    """
    if len(template) < _CRC_OFFSET + 4:
        raise CorruptData(f"pg_control template is truncated ({len(template)} bytes)")
    buf = bytearray(template[:CONTROL_FILE_SIZE].ljust(CONTROL_FILE_SIZE, b"\0"))
    _STATE_TIME_CHECKPOINT.pack_into(buf, _STATE_OFFSET, DB_SHUTDOWNED, time, checkpoint_lsn)
    buf[_CHECKPOINT_COPY_OFFSET : _CHECKPOINT_COPY_OFFSET + CheckPoint.SIZE] = checkpoint.pack()
    (unlogged,) = _UNLOGGED_LSN.unpack_from(buf, _UNLOGGED_LSN_OFFSET)
    _UNLOGGED_LSN.pack_into(buf, _UNLOGGED_LSN_OFFSET, max(unlogged, FIRST_NORMAL_UNLOGGED_LSN))
    _RECOVERY_FIELDS.pack_into(buf, _RECOVERY_FIELDS_OFFSET, 0, 0, 0, 0, False)
    _CRC.pack_into(buf, _CRC_OFFSET, crc32c(bytes(buf[:_CRC_OFFSET])))
    return bytes(buf)


def for_standby(control: bytes, min_recovery_point: int, min_recovery_tli: int) -> bytes:
    """A primary's pg_control made that of a standby that stopped after reaching
    `min_recovery_point`: state "shut down in recovery", minRecoveryPoint set, backup fields
    cleared; the checkpoint (where redo starts) kept. Started with standby.signal, such a
    directory replays from the checkpoint's redo and is consistent (open for reads) once
    replay passes minRecoveryPoint: InitWalRecovery and CheckRecoveryConsistency in
    src/backend/access/transam/xlogrecovery.c, as for a standby restarted after a clean stop.
    """
    parse_control_file(control, "the primary's pg_control")
    buf = bytearray(control[:CONTROL_FILE_SIZE])
    struct.pack_into("<I", buf, _STATE_OFFSET, DB_SHUTDOWNED_IN_RECOVERY)
    _RECOVERY_FIELDS.pack_into(
        buf, _RECOVERY_FIELDS_OFFSET, min_recovery_point, min_recovery_tli, 0, 0, False
    )
    _CRC.pack_into(buf, _CRC_OFFSET, crc32c(bytes(buf[:_CRC_OFFSET])))
    return bytes(buf)


def read_control_file(datadir: Path) -> ControlFile:
    """global/pg_control of `datadir`: its name opened without following a link, a regular
    file only, its CONTROL_FILE_SIZE bytes at most. The CLI, maybe root, reads it in a
    directory PostgreSQL's account owns: a link there to /dev/zero was read until memory
    ran out, one to a FIFO hung the read."""
    path = datadir / "global" / "pg_control"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise CorruptData(f"{path} is not a regular file")
            data = f.read(CONTROL_FILE_SIZE)
    except OSError as exc:
        raise CorruptData(f"cannot read {path}: {exc.strerror}") from None
    return parse_control_file(data, str(path))
