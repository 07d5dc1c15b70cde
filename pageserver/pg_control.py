"""pg_control (global/pg_control) of PostgreSQL 15: parse and validate the fields we use.

Layout facts: shared/reference/pg15-wal.md §7. The CRC-32C covers bytes [0, 288).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import crc32c

from proto.errors import CorruptData
from walreceiver.rmgr.xlog import CheckPoint

PG_CONTROL_VERSION = 1300
CONTROL_FILE_SIZE = 8192
_CRC_OFFSET = 288
_HEAD = struct.Struct(
    "<QIII4xqQ"
)  # system_identifier, version, catversion, state, time, checkPoint
_CRC = struct.Struct("<I")
_SEG_SIZE_OFFSET = 228
_U32 = struct.Struct("<I")

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

    @property
    def state_name(self) -> str:
        return DB_STATES.get(self.state, f"unknown ({self.state})")


def parse_control_file(data: bytes, source: str = "pg_control") -> ControlFile:
    if len(data) < _CRC_OFFSET + 4:
        raise CorruptData(f"{source} is truncated ({len(data)} bytes)")
    (stored,) = _CRC.unpack_from(data, _CRC_OFFSET)
    if crc32c.crc32c(data[:_CRC_OFFSET]) != stored:
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
    )


def read_control_file(datadir: Path) -> ControlFile:
    path = datadir / "global" / "pg_control"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CorruptData(f"cannot read {path}: {exc.strerror}") from None
    return parse_control_file(data, str(path))
