"""A physical replication slot written as PostgreSQL 15 writes it, into a stopped data directory.

A checkout in place (cli/checkout_delta.py) gives the node back its slot without running
PostgreSQL in single-user mode for it (a start, the SQL and a shutdown checkpoint: a tenth
of a second or more), when nothing else needs that step. The file is what
`pg_create_physical_replication_slot(name, true)` leaves: src/backend/replication/slot.c
(ReplicationSlotOnDisk, SaveSlotToPath; read back at startup by RestoreSlotFromDisk, which
checks the magic, version, length and CRC-32C). A physical slot that reserves WAL at once
starts at the redo pointer of the last checkpoint (ReplicationSlotReserveWal), which in a
stopped directory is pg_control's.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path, PurePosixPath

from cli.pg_files import open_pg_dir, write_pg_file_at
from pg15.checksum import crc32c

SLOT_MAGIC = 0x1051CA1
SLOT_VERSION = 2
_HEADER = struct.Struct("<IIII")
"""magic, checksum (CRC-32C of what follows it), version, length of the slot data."""
_NAMEDATALEN = 64
_SLOT_DATA = struct.Struct(f"<{_NAMEDATALEN}sIiIIQQQQ?{_NAMEDATALEN}s7x")
"""ReplicationSlotPersistentData (src/include/replication/slot.h) on x86-64: name, database,
persistency, xmin, catalog_xmin, restart_lsn, invalidated_at, confirmed_flush, two_phase_at,
two_phase, plugin, padding to 8 bytes (184 bytes)."""
_CHECKSUMMED_FROM = 8  # ReplicationSlotOnDiskNotChecksummedSize: magic and checksum
RS_PERSISTENT = 0


def slot_state(name: str, restart_lsn: int) -> bytes:
    """The `state` file of a persistent physical slot reserving WAL from `restart_lsn`."""
    raw = name.encode()
    if not raw or len(raw) >= _NAMEDATALEN:
        raise ValueError(f"slot name {name!r} does not fit NameData")
    data = _SLOT_DATA.pack(raw, 0, RS_PERSISTENT, 0, 0, restart_lsn, 0, 0, 0, False, b"")
    body = struct.pack("<II", SLOT_VERSION, _SLOT_DATA.size) + data
    return _HEADER.pack(SLOT_MAGIC, crc32c(body), SLOT_VERSION, _SLOT_DATA.size) + data


def write_physical_slot(datadir: Path, name: str, restart_lsn: int) -> None:
    """pg_replslot/NAME/state, durably (the file, the slot's directory and pg_replslot), for
    PostgreSQL's OS user; the server must be stopped.

    Written by this process, which may be root, inside the data directory, which PostgreSQL's
    OS user owns (the single-user step this replaces ran as that user): every step goes
    through directory descriptors opened without following a link: a link put in place of
    pg_replslot or the slot's directory fails the write, one in place of its file is
    replaced, and what they name is neither written nor handed over."""
    data = slot_state(name, restart_lsn)
    slot = open_pg_dir(datadir, PurePosixPath("pg_replslot", name), create=True)
    try:
        write_pg_file_at(slot, "state", data)  # fsyncs the file and the slot's directory
    finally:
        os.close(slot)
    slots = open_pg_dir(datadir, PurePosixPath("pg_replslot"))
    try:
        os.fsync(slots)
    finally:
        os.close(slots)
