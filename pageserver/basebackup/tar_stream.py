"""Basebackup: a tar stream of a data directory that stock PostgreSQL 15 starts from cleanly.

The state comes from a `SnapshotSource` (the page store at one LSN, or a cleanly shut-down data
directory). The archive is the recipe of shared/reference/datadir-at-lsn.md §1.3 and §2:

* every relation fork except `_fsm` (never WAL-logged by a stock primary) and, unless asked
  for and the source tracks it exactly, `_vm`; 1 GiB segment files `<rel>[_fork][.N]`;
* unlogged relations: the init fork is kept **and copied as the main fork**, because a clean
  start does not run ResetUnloggedRelations (the table reads as empty, as after a crash);
* SLRU segments (pg_xact, pg_multixact/offsets and members), relmap files, PG_VERSION in the
  root and every `base/<db>`, the directories PostgreSQL expects, two-phase state files;
* `global/pg_control` saying "shut down" at a checkpoint C, and `pg_wal/<segment>` holding
  exactly one record: the 114-byte shutdown checkpoint at C, with `redo = C`;
* the configuration files the caller passes (they are not page state).

Where C is put (`normalize_lsn`): the requested LSN X is the end of the last record included
(a record boundary, MAXALIGNed). C = X, moved past a page header if X is a page boundary (+24,
+40 at a segment start, the first usable byte as pg_resetwal does), and to the next page's first
usable byte if the 114-byte record would not fit on X's page. So C >= X >= every page LSN and
the new insert position C + 120 is past every pd_lsn ("xlog flush request ... is not satisfied"
cannot happen); the stream checks that while it writes pages.

Choices: ThisTimeLineID = PrevTimeLineID = `pg_timeline` (a checkpoint after a timeline switch
has both equal; the history file, if given, says where the parent ended). xl_prev = `prev_lsn`
if given, else 0 (only `xl_prev < C` is checked on this random-access read). oldestActiveXid = 0
(shutdown convention); the commit-timestamp xids are cleared because pg_commit_ts is not
rebuilt. When C is not the first record position of its page, the page is marked
XLP_FIRST_IS_CONTRECORD with xlp_rem_len covering the gap so that pg_waldump, which scans from
the page start, finds the record (tested in datadir-at-lsn.md §1.4). Data checksums must be off.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import tarfile
import tempfile
import time as time_mod
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol

import crc32c

from cli.pgbin import give_to_pg_user, make_pg_dir
from pageserver.ingest.import_datadir import CHECKPOINT_RECORD_SIZE, RELSEG_SIZE, import_lsn_of
from pageserver.reconstruct import page_reconstruct as pr
from pageserver.reconstruct.page_reconstruct import (
    DEFAULTTABLESPACE_OID,
    GLOBALTABLESPACE_OID,
    SLRU_PAGES_PER_SEGMENT,
)
from pageserver.redo.page import BLCKSZ
from pageserver.storage.keys import SlruKind
from pageserver.storage.timeline import Timeline
from pg15.lsn import WAL_BLOCK_SIZE, format_lsn, segment_file_name
from pg15.pg_control import (
    parse_control_file,
    read_control_file,
    with_checkpoint,
)
from pg15.records import (
    FSM_FORKNUM,
    INIT_FORKNUM,
    MAIN_FORKNUM,
    VISIBILITYMAP_FORKNUM,
    XLR_BLOCK_ID_DATA_SHORT,
)
from pg15.rmgr.xlog import XLOG_CHECKPOINT_SHUTDOWN, CheckPoint
from pg15.xlog_reader import (
    LONG_PAGE_HEADER_SIZE,
    RM_XLOG_ID,
    SHORT_PAGE_HEADER_SIZE,
    XLP_FIRST_IS_CONTRECORD,
    XLP_LONG_HEADER,
    maxalign,
    pack_page_header,
    record_crc,
)
from proto.errors import AlreadyExists, CorruptData, InvalidArgument, NotFound

PG_MAJOR_VERSION = b"15\n"
FIRST_NORMAL_XID = 3
CLOG_XACTS_PER_PAGE = BLCKSZ * 4
MULTIXACT_OFFSETS_PER_PAGE = BLCKSZ // 4
MULTIXACT_MEMBERS_PER_GROUP = 4
MULTIXACT_GROUPS_PER_PAGE = BLCKSZ // 20
MULTIXACT_MEMBERS_PER_PAGE = MULTIXACT_GROUPS_PER_PAGE * MULTIXACT_MEMBERS_PER_GROUP

FORK_SUFFIX = {
    MAIN_FORKNUM: "",
    FSM_FORKNUM: "_fsm",
    VISIBILITYMAP_FORKNUM: "_vm",
    INIT_FORKNUM: "_init",
}
_SUFFIX_FORK = {v: k for k, v in FORK_SUFFIX.items()}

# initdb's subdirs (PG15) minus base/1, which comes with the databases.
PGDATA_SUBDIRS = (
    "base",
    "global",
    "pg_commit_ts",
    "pg_dynshmem",
    "pg_logical",
    "pg_logical/mappings",
    "pg_logical/snapshots",
    "pg_multixact",
    "pg_multixact/members",
    "pg_multixact/offsets",
    "pg_notify",
    "pg_replslot",
    "pg_serial",
    "pg_snapshots",
    "pg_stat",
    "pg_stat_tmp",
    "pg_subtrans",
    "pg_tblspc",
    "pg_twophase",
    "pg_wal",
    "pg_wal/archive_status",
    "pg_xact",
)
# Files a basebackup must never carry: they would start recovery, standby mode, or claim a
# running postmaster.
FORBIDDEN_FILES = frozenset(
    {
        "postmaster.pid",
        "postmaster.opts",
        "backup_label",
        "backup_label.old",
        "tablespace_map",
        "recovery.signal",
        "standby.signal",
        "PG_VERSION",
    }
)

_RECORD_HEADER = struct.Struct("<IIQBB2xI")
_U32 = struct.Struct("<I")
_PD_LSN = struct.Struct("<II")
_ZERO_PAGE = bytes(BLCKSZ)
_CHUNK_PAGES = 32  # pages per yielded chunk (256 KiB)
_TAR_BLOCK = 512


class SnapshotSource(Protocol):
    """What a basebackup reads: the whole non-WAL state of a cluster at one LSN."""

    @property
    def lsn(self) -> int:
        """The record boundary this state is at (every page LSN is <= it)."""
        ...

    @property
    def tracks_visibility_map(self) -> bool:
        """True if VM pages are exact (implicit clears applied), so `_vm` forks may be shipped."""
        ...

    def list_dbs(self) -> list[tuple[int, int]]:
        """(spc, db) of every database; (1664, 0) stands for the shared catalogs in global/."""
        ...

    def list_rels(self, spc: int, db: int) -> list[tuple[int, int]]:
        """(relfilenode, fork) of every relation fork of a database."""
        ...

    def get_rel_size(self, spc: int, db: int, rel: int, fork: int) -> int: ...

    def get_page(self, spc: int, db: int, rel: int, fork: int, blkno: int) -> bytes: ...

    def list_slru_segments(self, kind: SlruKind) -> list[int]: ...

    def get_slru_segment_size(self, kind: SlruKind, segno: int) -> int: ...

    def get_slru_page(self, kind: SlruKind, segno: int, blkno: int) -> bytes: ...

    def get_relmap(self, spc: int, db: int) -> bytes | None: ...

    def get_twophase_files(self) -> dict[int, bytes]:
        """xid -> pg_twophase/%08X file bytes (state data followed by its CRC-32C)."""
        ...

    def get_checkpoint(self) -> CheckPoint:
        """The tracked counters (nextXid, nextOid, multis, oldest xids...)."""
        ...

    def get_control_template(self) -> bytes:
        """pg_control bytes of this cluster: system id, compile-time fields, GUC snapshot."""
        ...


# --- sources ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TimelineSource:
    """The page store's state of `timeline` at `lsn`, read through pageserver.reconstruct."""

    timeline: Timeline
    lsn: int

    @property
    def tracks_visibility_map(self) -> bool:
        # page_reconstruct applies the implicit VM clears of heap records and VM truncation.
        return True

    def list_dbs(self) -> list[tuple[int, int]]:
        return pr.list_dbs(self.timeline, self.lsn)

    def list_rels(self, spc: int, db: int) -> list[tuple[int, int]]:
        return pr.list_rels(self.timeline, spc, db, self.lsn)

    def get_rel_size(self, spc: int, db: int, rel: int, fork: int) -> int:
        size = pr.get_rel_size(self.timeline, spc, db, rel, fork, self.lsn)
        if size is None:
            raise NotFound(f"relation {spc}/{db}/{rel} fork {fork} has no size at {self._at}")
        return size

    def get_page(self, spc: int, db: int, rel: int, fork: int, blkno: int) -> bytes:
        return pr.get_rel_page(self.timeline, spc, db, rel, fork, blkno, self.lsn)

    def list_slru_segments(self, kind: SlruKind) -> list[int]:
        return pr.list_slru_segments(self.timeline, kind, self.lsn)

    def get_slru_segment_size(self, kind: SlruKind, segno: int) -> int:
        size = pr.get_slru_segment_size(self.timeline, kind, segno, self.lsn)
        if size is None:
            raise NotFound(f"{kind.directory} segment {segno:04X} has no size at {self._at}")
        return size

    def get_slru_page(self, kind: SlruKind, segno: int, blkno: int) -> bytes:
        return pr.get_slru_page(self.timeline, kind, segno, blkno, self.lsn)

    def get_relmap(self, spc: int, db: int) -> bytes | None:
        return pr.get_relmap(self.timeline, spc, db, self.lsn)

    def get_twophase_files(self) -> dict[int, bytes]:
        return pr.get_twophase_files(self.timeline, self.lsn)

    def get_checkpoint(self) -> CheckPoint:
        checkpoint = pr.get_checkpoint(self.timeline, self.lsn)
        if checkpoint is None:
            raise NotFound(f"no checkpoint counters are tracked at {self._at}")
        return checkpoint

    def get_control_template(self) -> bytes:
        raw = pr.get_control_file(self.timeline, self.lsn)
        if raw is None:
            raise NotFound(f"no pg_control was imported at or below {self._at}")
        return raw

    @property
    def _at(self) -> str:
        return format_lsn(self.lsn)


_REL_FILE_RE = re.compile(r"^(\d+)(_fsm|_vm|_init)?(?:\.(\d+))?$")
_SLRU_FILE_RE = re.compile(r"^[0-9A-F]{4,6}$")
_TWOPHASE_FILE_RE = re.compile(r"^[0-9A-F]{8}$")


class DatadirSource:
    """A cleanly shut-down data directory, read file by file (tests, `snapshot import`).

    Its LSN is the end of its shutdown checkpoint record. Holds one open relation segment
    file at a time; use it as a context manager or call `close()`.
    """

    __slots__ = ("_control", "_lsn", "_open", "path")

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        # The same checks and LSN as an import of this directory into the page store.
        self._lsn = import_lsn_of(self.path)
        self._control = read_control_file(self.path)
        self._open: tuple[Path, BinaryIO] | None = None

    def __enter__(self) -> DatadirSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._open is not None:
            self._open[1].close()
            self._open = None

    @property
    def lsn(self) -> int:
        return self._lsn

    @property
    def tracks_visibility_map(self) -> bool:
        return True  # the files of a clean shutdown are exact

    def _db_dir(self, spc: int, db: int) -> Path:
        if spc == GLOBALTABLESPACE_OID and db == 0:
            return self.path / "global"
        if spc == DEFAULTTABLESPACE_OID:
            return self.path / "base" / str(db)
        raise InvalidArgument(f"tablespace {spc} is not supported")

    def list_dbs(self) -> list[tuple[int, int]]:
        dbs = [(GLOBALTABLESPACE_OID, 0)]
        for entry in sorted((self.path / "base").iterdir()):
            if entry.is_dir() and entry.name.isdigit():
                dbs.append((DEFAULTTABLESPACE_OID, int(entry.name)))
        return dbs

    def list_rels(self, spc: int, db: int) -> list[tuple[int, int]]:
        rels: set[tuple[int, int]] = set()
        for entry in self._db_dir(spc, db).iterdir():
            m = _REL_FILE_RE.match(entry.name)
            if m and entry.is_file():
                rels.add((int(m.group(1)), _SUFFIX_FORK[m.group(2) or ""]))
        return sorted(rels)

    def _seg_path(self, spc: int, db: int, rel: int, fork: int, segno: int) -> Path:
        name = f"{rel}{FORK_SUFFIX[fork]}" + (f".{segno}" if segno else "")
        return self._db_dir(spc, db) / name

    def get_rel_size(self, spc: int, db: int, rel: int, fork: int) -> int:
        segno = 0
        while True:
            try:
                size = self._seg_path(spc, db, rel, fork, segno).stat().st_size
            except FileNotFoundError:
                if segno == 0:
                    raise NotFound(
                        f"relation {spc}/{db}/{rel} fork {fork} does not exist"
                    ) from None
                return segno * RELSEG_SIZE
            if size < RELSEG_SIZE * BLCKSZ:
                return segno * RELSEG_SIZE + size // BLCKSZ
            segno += 1

    def get_page(self, spc: int, db: int, rel: int, fork: int, blkno: int) -> bytes:
        path = self._seg_path(spc, db, rel, fork, blkno // RELSEG_SIZE)
        return self._read_block(path, blkno % RELSEG_SIZE)

    def _read_block(self, path: Path, blkno: int) -> bytes:
        if self._open is None or self._open[0] != path:
            self.close()
            self._open = (path, open(path, "rb"))  # noqa: SIM115 - kept open across calls
        f = self._open[1]
        f.seek(blkno * BLCKSZ)
        page = f.read(BLCKSZ)
        if len(page) != BLCKSZ:
            raise CorruptData(f"{path}: block {blkno} is past the end of the file")
        return page

    def _slru_dir(self, kind: SlruKind) -> Path:
        return self.path / kind.directory

    def list_slru_segments(self, kind: SlruKind) -> list[int]:
        return sorted(
            int(e.name, 16)
            for e in self._slru_dir(kind).iterdir()
            if _SLRU_FILE_RE.match(e.name) and e.is_file()
        )

    def get_slru_segment_size(self, kind: SlruKind, segno: int) -> int:
        return (self._slru_dir(kind) / slru_file_name(segno)).stat().st_size // BLCKSZ

    def get_slru_page(self, kind: SlruKind, segno: int, blkno: int) -> bytes:
        return self._read_block(self._slru_dir(kind) / slru_file_name(segno), blkno)

    def get_relmap(self, spc: int, db: int) -> bytes | None:
        try:
            return (self._db_dir(spc, db) / "pg_filenode.map").read_bytes()
        except FileNotFoundError:
            return None

    def get_twophase_files(self) -> dict[int, bytes]:
        return {
            int(e.name, 16): e.read_bytes()
            for e in sorted((self.path / "pg_twophase").iterdir())
            if _TWOPHASE_FILE_RE.match(e.name)
        }

    def get_checkpoint(self) -> CheckPoint:
        return self._control.checkpoint

    def get_control_template(self) -> bytes:
        return self._control.raw


# --- LSN rules --------------------------------------------------------------------------------


def _page_header_size(lsn: int, segment_size: int) -> int:
    return LONG_PAGE_HEADER_SIZE if lsn % segment_size == 0 else SHORT_PAGE_HEADER_SIZE


def normalize_lsn(lsn: int, segment_size: int) -> int:
    """Where the shutdown checkpoint for a state at record boundary `lsn` is written.

    MAXALIGN; past the page header if on a page boundary (+40 at a segment start, else +24);
    if the 114-byte record would cross the page end, the next page's first usable byte.
    """
    pos = maxalign(lsn)
    if pos % WAL_BLOCK_SIZE == 0:
        pos += _page_header_size(pos, segment_size)
    if pos % WAL_BLOCK_SIZE + CHECKPOINT_RECORD_SIZE > WAL_BLOCK_SIZE:
        pos += WAL_BLOCK_SIZE - pos % WAL_BLOCK_SIZE
        pos += _page_header_size(pos, segment_size)
    return pos


def slru_file_name(segno: int) -> str:
    return f"{segno:04X}"


def relation_file_name(spc: int, db: int, rel: int, fork: int, segno: int = 0) -> str:
    """Path inside PGDATA of one segment file of a relation fork."""
    if spc == GLOBALTABLESPACE_OID:
        base = "global"
    elif spc == DEFAULTTABLESPACE_OID:
        base = f"base/{db}"
    else:
        raise InvalidArgument(f"relation {spc}/{db}/{rel} is in a tablespace; not supported")
    return f"{base}/{rel}{FORK_SUFFIX[fork]}" + (f".{segno}" if segno else "")


# --- the WAL segment --------------------------------------------------------------------------


def checkpoint_record(checkpoint: CheckPoint, prev_lsn: int) -> bytes:
    """The 114-byte XLOG_CHECKPOINT_SHUTDOWN record with its CRC."""
    body = bytes([XLR_BLOCK_ID_DATA_SHORT, CheckPoint.SIZE]) + checkpoint.pack()
    head = _RECORD_HEADER.pack(
        CHECKPOINT_RECORD_SIZE, 0, prev_lsn, XLOG_CHECKPOINT_SHUTDOWN, RM_XLOG_ID, 0
    )
    record = bytearray(head + body)
    _U32.pack_into(record, 20, record_crc(memoryview(record)))
    return bytes(record)


def _wal_page(
    page_start: int, record_lsn: int | None, record: bytes, pg_timeline: int, sysid: int, seg: int
) -> bytes:
    """One WAL page: its header and, if given, the record at `record_lsn` inside it."""
    long = page_start % seg == 0
    hdr_size = LONG_PAGE_HEADER_SIZE if long else SHORT_PAGE_HEADER_SIZE
    info = XLP_LONG_HEADER if long else 0
    gap = 0 if record_lsn is None else record_lsn - page_start - hdr_size
    if gap:
        info |= XLP_FIRST_IS_CONTRECORD
    head = pack_page_header(info, pg_timeline, page_start, gap, sysid, seg)
    page = bytearray(WAL_BLOCK_SIZE)
    page[: len(head)] = head
    if record_lsn is not None:
        off = record_lsn - page_start
        page[off : off + len(record)] = record
    return bytes(page)


def wal_segment_chunks(
    checkpoint_lsn: int, record: bytes, pg_timeline: int, sysid: int, segment_size: int
) -> Iterator[bytes]:
    """The segment holding `checkpoint_lsn`: long header on page 0, a header on the record's
    page, the record, zeros elsewhere (full size, as PostgreSQL requires)."""
    seg_start = checkpoint_lsn - checkpoint_lsn % segment_size
    rec_page = checkpoint_lsn - checkpoint_lsn % WAL_BLOCK_SIZE
    zeros = bytes(WAL_BLOCK_SIZE * _CHUNK_PAGES)
    if rec_page == seg_start:
        yield _wal_page(seg_start, checkpoint_lsn, record, pg_timeline, sysid, segment_size)
    else:
        yield _wal_page(seg_start, None, b"", pg_timeline, sysid, segment_size)
        yield from _zeros(rec_page - seg_start - WAL_BLOCK_SIZE, zeros)
        yield _wal_page(rec_page, checkpoint_lsn, record, pg_timeline, sysid, segment_size)
    yield from _zeros(seg_start + segment_size - rec_page - WAL_BLOCK_SIZE, zeros)


def _zeros(n: int, chunk: bytes) -> Iterator[bytes]:
    while n > 0:
        take = min(n, len(chunk))
        yield chunk if take == len(chunk) else bytes(take)
        n -= take


# --- the tar stream ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BasebackupInfo:
    """Where the archive's WAL is: new WAL of a server started on it begins at `end_lsn`."""

    lsn: int
    checkpoint_lsn: int
    end_lsn: int
    pg_timeline: int
    wal_segment: str
    system_identifier: int
    wal_segment_size: int


def _tar_header(name: str, size: int, mtime: int, is_dir: bool = False) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = mtime
    info.mode = 0o700 if is_dir else 0o600
    info.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
    return info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="strict")


def _tar_file(name: str, size: int, chunks: Iterable[bytes], mtime: int) -> Iterator[bytes]:
    yield _tar_header(name, size, mtime)
    written = 0
    for chunk in chunks:
        written += len(chunk)
        yield chunk
    if written != size:
        raise CorruptData(f"basebackup: {name} produced {written} bytes, expected {size}")
    pad = -size % _TAR_BLOCK
    if pad:
        yield bytes(pad)


def _tar_bytes(name: str, data: bytes, mtime: int) -> Iterator[bytes]:
    return _tar_file(name, len(data), [data], mtime)


class _Plan:
    """Everything validated up front, so that errors come before the first byte."""

    def __init__(
        self,
        source: SnapshotSource,
        lsn: int,
        pg_timeline: int,
        config_files: Mapping[str, bytes],
        timeline_history: bytes | None,
        include_vm: bool,
        prev_lsn: int | None,
        now: int,
    ) -> None:
        if pg_timeline < 1 or pg_timeline > 0xFFFFFFFF:
            raise InvalidArgument(f"invalid PostgreSQL timeline {pg_timeline}")
        if timeline_history is not None and pg_timeline == 1:
            raise InvalidArgument("a timeline history file needs a PostgreSQL timeline > 1")
        if lsn < source.lsn:
            raise InvalidArgument(
                f"basebackup LSN {format_lsn(lsn)} is before the state's LSN "
                f"{format_lsn(source.lsn)}"
            )
        for name in config_files:
            _check_config_name(name)
        control = parse_control_file(source.get_control_template(), "pg_control template")
        if control.data_checksum_version != 0:
            raise InvalidArgument(
                "the cluster has data checksums enabled, which basebackup does not support"
            )
        seg = control.wal_segment_size
        if seg & (seg - 1) or not (1 << 20) <= seg <= (1 << 30):
            raise CorruptData(f"pg_control template has an invalid WAL segment size {seg}")
        self.source = source
        self.config_files = dict(config_files)
        self.timeline_history = timeline_history
        self.include_vm = include_vm and source.tracks_visibility_map
        self.now = now
        c = normalize_lsn(lsn, seg)
        tracked = source.get_checkpoint()
        next_full_xid = tracked.next_full_xid
        if next_full_xid & 0xFFFFFFFF < FIRST_NORMAL_XID:
            next_full_xid = (next_full_xid & ~0xFFFFFFFF) | FIRST_NORMAL_XID
        self.checkpoint = replace(
            tracked,
            redo=c,
            this_timeline=pg_timeline,
            prev_timeline=pg_timeline,
            full_page_writes=True,
            next_full_xid=next_full_xid,
            time=now,
            oldest_commit_ts_xid=0,
            newest_commit_ts_xid=0,
            oldest_active_xid=0,
        )
        if prev_lsn is not None and prev_lsn >= c:
            raise InvalidArgument(f"prev_lsn {format_lsn(prev_lsn)} is not before {format_lsn(c)}")
        self.record = checkpoint_record(self.checkpoint, prev_lsn or 0)
        self.control = with_checkpoint(control.raw, c, self.checkpoint, now)
        self.info = BasebackupInfo(
            lsn=lsn,
            checkpoint_lsn=c,
            end_lsn=c + maxalign(CHECKPOINT_RECORD_SIZE),
            pg_timeline=pg_timeline,
            wal_segment=segment_file_name(pg_timeline, c // seg, seg),
            system_identifier=control.system_identifier,
            wal_segment_size=seg,
        )
        self.dbs = source.list_dbs()
        for spc, db in self.dbs:
            if (spc, db) != (GLOBALTABLESPACE_OID, 0) and spc != DEFAULTTABLESPACE_OID:
                raise InvalidArgument(
                    f"database {db} is in tablespace {spc}; only the default tablespaces are "
                    "supported"
                )

    def chunks(self) -> Iterator[bytes]:
        mtime = self.now
        yield from _tar_bytes("PG_VERSION", PG_MAJOR_VERSION, mtime)
        for name in sorted(self.config_files):
            yield from _tar_bytes(name, self.config_files[name], mtime)
        for d in PGDATA_SUBDIRS:
            yield _tar_header(d + "/", 0, mtime, is_dir=True)
        for spc, db in self.dbs:
            yield from self._database(spc, db)
        yield from self._slrus()
        for xid, data in sorted(self.source.get_twophase_files().items()):
            _check_twophase(xid, data)
            yield from _tar_bytes(f"pg_twophase/{xid:08X}", data, mtime)
        if self.timeline_history is not None:
            name = f"pg_wal/{self.info.pg_timeline:08X}.history"
            yield from _tar_bytes(name, self.timeline_history, mtime)
        info = self.info
        yield from _tar_file(
            f"pg_wal/{info.wal_segment}",
            info.wal_segment_size,
            wal_segment_chunks(
                info.checkpoint_lsn,
                self.record,
                info.pg_timeline,
                info.system_identifier,
                info.wal_segment_size,
            ),
            mtime,
        )
        yield from _tar_bytes("global/pg_control", self.control, mtime)
        yield bytes(2 * _TAR_BLOCK)  # end-of-archive marker

    def _database(self, spc: int, db: int) -> Iterator[bytes]:
        mtime = self.now
        is_global = (spc, db) == (GLOBALTABLESPACE_OID, 0)
        if not is_global:
            yield _tar_header(f"base/{db}/", 0, mtime, is_dir=True)
            yield from _tar_bytes(f"base/{db}/PG_VERSION", PG_MAJOR_VERSION, mtime)
        relmap = self.source.get_relmap(spc, db)
        if relmap is not None:
            if len(relmap) != 512:
                raise CorruptData(f"relmap of database {spc}/{db} has {len(relmap)} bytes, not 512")
            where = "global" if is_global else f"base/{db}"
            yield from _tar_bytes(f"{where}/pg_filenode.map", relmap, mtime)
        rels = self.source.list_rels(spc, db)
        unlogged = {rel for rel, fork in rels if fork == INIT_FORKNUM}
        for rel, fork in rels:
            if fork == FSM_FORKNUM or (fork == VISIBILITYMAP_FORKNUM and not self.include_vm):
                continue
            if rel in unlogged and fork != INIT_FORKNUM:
                continue  # the main fork comes from the init fork below; fsm/vm are dropped
            yield from self._fork(spc, db, rel, fork, fork)
            if fork == INIT_FORKNUM:
                yield from self._fork(spc, db, rel, INIT_FORKNUM, MAIN_FORKNUM)

    def _fork(self, spc: int, db: int, rel: int, src_fork: int, dst_fork: int) -> Iterator[bytes]:
        """The segment files of fork `dst_fork`, with the content of fork `src_fork`."""
        nblocks = self.source.get_rel_size(spc, db, rel, src_fork)
        nsegs = max(1, -(-nblocks // RELSEG_SIZE))
        for segno in range(nsegs):
            first = segno * RELSEG_SIZE
            count = min(nblocks - first, RELSEG_SIZE)
            name = relation_file_name(spc, db, rel, dst_fork, segno)
            yield from _tar_file(
                name,
                count * BLCKSZ,
                self._rel_pages(spc, db, rel, src_fork, first, count),
                self.now,
            )

    def _rel_pages(
        self, spc: int, db: int, rel: int, fork: int, first: int, count: int
    ) -> Iterator[bytes]:
        limit = self.info.end_lsn
        batch: list[bytes] = []
        for blkno in range(first, first + count):
            page = self.source.get_page(spc, db, rel, fork, blkno)
            if len(page) != BLCKSZ:
                raise CorruptData(
                    f"relation {spc}/{db}/{rel} fork {fork} block {blkno}: short page"
                )
            hi, lo = _PD_LSN.unpack_from(page, 0)
            if (hi << 32 | lo) > limit:
                raise CorruptData(
                    f"relation {spc}/{db}/{rel} fork {fork} block {blkno} has page LSN "
                    f"{format_lsn(hi << 32 | lo)}, past the basebackup's WAL end "
                    f"{format_lsn(limit)}"
                )
            batch.append(page)
            if len(batch) == _CHUNK_PAGES:
                yield b"".join(batch)
                batch = []
        if batch:
            yield b"".join(batch)

    def _slrus(self) -> Iterator[bytes]:
        cp = self.checkpoint
        needed = {
            SlruKind.CLOG: _needed_page(cp.next_xid, CLOG_XACTS_PER_PAGE, 1),
            SlruKind.MULTIXACT_OFFSETS: _needed_page(cp.next_multi, MULTIXACT_OFFSETS_PER_PAGE, 1),
            SlruKind.MULTIXACT_MEMBERS: _needed_page(
                cp.next_multi_offset, MULTIXACT_MEMBERS_PER_PAGE, MULTIXACT_MEMBERS_PER_GROUP
            ),
        }
        for kind in (SlruKind.CLOG, SlruKind.MULTIXACT_OFFSETS, SlruKind.MULTIXACT_MEMBERS):
            have = {
                s: self.source.get_slru_segment_size(kind, s)
                for s in self.source.list_slru_segments(kind)
            }
            sizes = dict(have)
            page = needed[kind]
            if page is not None:
                # Startup (TrimCLOG / TrimMultiXact) reads this page; a missing or short file
                # is an error there. Zeros are what PostgreSQL itself would find.
                segno, blk = divmod(page, SLRU_PAGES_PER_SEGMENT)
                sizes[segno] = max(sizes.get(segno, 0), blk + 1)
            for segno in sorted(sizes):
                yield from _tar_file(
                    f"{kind.directory}/{slru_file_name(segno)}",
                    sizes[segno] * BLCKSZ,
                    self._slru_pages(kind, segno, have.get(segno, 0), sizes[segno]),
                    self.now,
                )

    def _slru_pages(self, kind: SlruKind, segno: int, have: int, nblocks: int) -> Iterator[bytes]:
        """`nblocks` pages of a segment: the source's first `have`, then zero pages."""
        batch: list[bytes] = []
        for blkno in range(nblocks):
            page = self.source.get_slru_page(kind, segno, blkno) if blkno < have else _ZERO_PAGE
            if len(page) != BLCKSZ:
                raise CorruptData(
                    f"{kind.directory}/{slru_file_name(segno)} block {blkno}: short page"
                )
            batch.append(page)
            if len(batch) == _CHUNK_PAGES:
                yield b"".join(batch)
                batch = []
        if batch:
            yield b"".join(batch)


def _needed_page(counter: int, per_page: int, per_group: int) -> int | None:
    """The SLRU page startup reads for a next-counter value; None if it is at a page start."""
    if (counter % per_page) // per_group == 0:
        return None
    return counter // per_page


def _check_config_name(name: str) -> None:
    if not name or "/" in name or "\0" in name or name in (".", "..") or name in FORBIDDEN_FILES:
        raise InvalidArgument(f"{name!r} cannot be passed as a configuration file")


def _check_twophase(xid: int, data: bytes) -> None:
    """twophase.c writes the state data followed by its CRC-32C (little-endian)."""
    if len(data) < 4 or crc32c.crc32c(data[:-4]) != _U32.unpack_from(data, len(data) - 4)[0]:
        raise CorruptData(f"two-phase state file of transaction {xid} has a bad CRC")


def basebackup_chunks(
    source: SnapshotSource,
    lsn: int,
    *,
    pg_timeline: int = 1,
    config_files: Mapping[str, bytes] | None = None,
    timeline_history: bytes | None = None,
    include_vm: bool = False,
    prev_lsn: int | None = None,
    now: int | None = None,
) -> tuple[BasebackupInfo, Iterator[bytes]]:
    """Validate, then return the archive's description and a lazy iterator of tar chunks.

    Memory is bounded by one chunk (256 KiB of pages or one WAL run); errors in the inputs
    are raised here, before any byte; source errors surface while iterating.
    """
    plan = _Plan(
        source,
        lsn,
        pg_timeline,
        config_files or {},
        timeline_history,
        include_vm,
        prev_lsn,
        int(time_mod.time()) if now is None else now,
    )
    return plan.info, plan.chunks()


def basebackup(
    source: SnapshotSource,
    lsn: int,
    *,
    pg_timeline: int = 1,
    out: BinaryIO,
    config_files: Mapping[str, bytes] | None = None,
    timeline_history: bytes | None = None,
    include_vm: bool = False,
    prev_lsn: int | None = None,
    now: int | None = None,
) -> BasebackupInfo:
    """Write the tar of a data directory at `lsn` to `out` (see the module docstring)."""
    info, chunks = basebackup_chunks(
        source,
        lsn,
        pg_timeline=pg_timeline,
        config_files=config_files,
        timeline_history=timeline_history,
        include_vm=include_vm,
        prev_lsn=prev_lsn,
        now=now,
    )
    for chunk in chunks:
        out.write(chunk)
    return info


# --- extraction -------------------------------------------------------------------------------


class UnsafeArchive(CorruptData):
    """A tar member that could write outside the target or create a non-regular file."""


def _member_path(member: tarfile.TarInfo) -> PurePosixPath | None:
    """The member's relative path, or None for the root itself; UnsafeArchive if hostile."""
    name = member.name
    path = PurePosixPath(name)
    if "\0" in name or "\\" in name or path.is_absolute():
        raise UnsafeArchive(f"refusing tar member {name!r}: absolute or unusual path")
    parts = [p for p in path.parts if p != "."]
    if ".." in parts:
        raise UnsafeArchive(f"refusing tar member {name!r}: it leads outside the target")
    if not (member.isreg() or member.isdir()):
        kind = (
            "symbolic link" if member.issym() else
            "hard link" if member.islnk() else
            "device" if member.ischr() or member.isblk() else
            "FIFO" if member.isfifo() else "special file"
        )  # fmt: skip
        raise UnsafeArchive(f"refusing tar member {name!r}: it is a {kind}")
    return PurePosixPath(*parts) if parts else None


def _make_dirs(root: Path, rel: PurePosixPath) -> None:
    cur = root
    for part in rel.parts:
        cur = cur / part
        if not cur.is_dir():
            os.mkdir(cur, 0o700)
            os.chmod(cur, 0o700)
            give_to_pg_user(cur)


def extract_basebackup(stream: BinaryIO, target_dir: Path) -> None:
    """Unpack a basebackup tar into `target_dir` (absent or empty), for the PostgreSQL user.

    Refuses absolute paths, `..`, links, devices and other special members, naming the member.
    Extracts into a sibling `<name>.tmp-XXXX` and renames it at the end, so a failure leaves
    nothing behind. Directories get mode 0700 and files 0600.
    """
    target = Path(target_dir)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise AlreadyExists(f"{target} exists and is not an empty directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{target.name}.tmp-", dir=target.parent))
    try:
        make_pg_dir(tmp)
        try:
            with tarfile.open(fileobj=stream, mode="r|*") as tar:
                for member in tar:
                    rel = _member_path(member)
                    if rel is None:
                        continue
                    try:
                        _extract_member(tar, member, tmp, rel)
                    except OSError as exc:
                        raise CorruptData(
                            f"cannot extract tar member {member.name!r}: {exc.strerror}"
                        ) from None
        except (tarfile.TarError, EOFError) as exc:
            raise CorruptData(f"the basebackup archive is damaged: {exc}") from None
        if target.exists():
            target.rmdir()
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _extract_member(
    tar: tarfile.TarFile, member: tarfile.TarInfo, root: Path, rel: PurePosixPath
) -> None:
    if member.isdir():
        _make_dirs(root, rel)
        return
    _make_dirs(root, rel.parent)
    dest = root / rel
    if dest.is_dir():
        raise CorruptData(f"tar member {member.name!r} is a file where a directory was")
    src = tar.extractfile(member)
    if src is None:
        raise CorruptData(f"tar member {member.name!r} has no data")
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        shutil.copyfileobj(src, f, 1 << 20)
    os.chmod(dest, 0o600)
    give_to_pg_user(dest)


__all__ = [
    "BasebackupInfo",
    "DatadirSource",
    "SnapshotSource",
    "TimelineSource",
    "UnsafeArchive",
    "basebackup",
    "basebackup_chunks",
    "extract_basebackup",
    "normalize_lsn",
]
