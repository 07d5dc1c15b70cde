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

import contextlib
import os
import struct
from pathlib import Path

import crc32c

from cli.pgbin import OsUser, pg_os_user
from proto.errors import CorruptData

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
    return _HEADER.pack(SLOT_MAGIC, crc32c.crc32c(body), SLOT_VERSION, _SLOT_DATA.size) + data


def write_physical_slot(datadir: Path, name: str, restart_lsn: int) -> None:
    """pg_replslot/NAME/state, durably (the file, the slot's directory and pg_replslot), for
    PostgreSQL's OS user; the server must be stopped.

    Written by this process, which may be root, inside the data directory, which PostgreSQL's
    OS user owns (the single-user step this replaces ran as that user): every step goes
    through directory descriptors opened without following a link: a link put in place of
    pg_replslot or the slot's directory fails the write, one in place of its file is
    replaced, and what they name is neither written nor handed over."""
    data = slot_state(name, restart_lsn)
    user = pg_os_user()
    nofollow = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    top = os.open(datadir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # in a dir of ours
    try:
        slots = _open_dir(top, "pg_replslot", nofollow, user)
        try:
            slot = _open_dir(slots, name, nofollow, user)
            try:
                _write_at(slot, "state", data, user)
                os.fsync(slot)
            finally:
                os.close(slot)
            os.fsync(slots)
        finally:
            os.close(slots)
    finally:
        os.close(top)


def _open_dir(parent: int, name: str, flags: int, user: OsUser | None) -> int:
    """The directory `name` in `parent`, PostgreSQL's user's (made 0700 if missing), never
    through a link."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, 0o700, dir_fd=parent)
    try:
        fd = os.open(name, flags, dir_fd=parent)
    except OSError as exc:
        raise CorruptData(f"{name} in the data directory is not a directory: {exc}") from None
    if user is not None:
        os.fchown(fd, user.uid, user.gid)
    return fd


def _write_at(directory: int, name: str, data: bytes, user: OsUser | None) -> None:
    """`name` in `directory` written whole under a temporary name, fsynced, handed to
    PostgreSQL's user and renamed into place (as SaveSlotToPath writes state.tmp)."""
    tmp = f"{name}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=directory)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o600, dir_fd=directory)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if user is not None:
            os.fchown(fd, user.uid, user.gid)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, name, src_dir_fd=directory, dst_dir_fd=directory)
