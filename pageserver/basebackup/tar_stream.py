"""Basebackup: a tar stream of a data directory that stock PostgreSQL 15 starts from cleanly.

The state comes from a `SnapshotSource` (`pageserver.basebackup.sources`: the page store at
one LSN, or a cleanly shut-down data directory). The archive holds what a clean start needs:
StartupXLOG (src/backend/access/transam/xlog.c) reads pg_control, finds it "shut down", reads
the checkpoint record it points at, and runs no recovery:

* every relation fork except `_fsm` (never WAL-logged by a stock primary) and, unless asked
  for and the source tracks it exactly, `_vm`; 1 GiB segment files `<rel>[_fork][.N]`;
* unlogged relations: the init fork is kept **and copied as the main fork**, because a clean
  start does not run ResetUnloggedRelations (the table reads as empty, as after a crash);
* SLRU segments (pg_xact, pg_multixact/offsets and members), relmap files, PG_VERSION in the
  root and every `base/<db>`, the directories PostgreSQL expects, two-phase state files;
* `global/pg_control` saying "shut down" at a checkpoint C, and `pg_wal/<segment>` holding
  exactly one record: the 114-byte shutdown checkpoint at C, with `redo = C`;
* the configuration files the caller passes (they are not page state);
* every non-default tablespace **in place**: ``pg_tblspc/OID/`` is a directory (not a symlink)
  holding ``PG_15_202209061/<db>/`` with the relation files of that database in it, and
  PG_VERSION and pg_filenode.map when it is the database's default tablespace (CREATE
  DATABASE ... TABLESPACE writes them there, dbcommands.c).

Why in place: the archive is one tar unpacked into a *new* directory (checkout, `snapshot
start`, extraction, `pg create --snapshot`, `export --format tar`), and the tablespace's
recorded location (absolute, from its CREATE TABLESPACE record or the import) usually still
belongs to a live server: writing there would overwrite another node's files. An in-place
tablespace (what allow_in_place_tablespaces creates) is a plain directory that PostgreSQL
reads through the same path pg_tblspc/OID/PG_15_202209061, with no setting needed to use it,
so the archive is self-contained and `tar -x` of it starts anywhere; no link ever comes from
the archive, so the extractor (`datadir_files/untar.py`) keeps refusing every link member. The
recorded locations come with the archive's description (`BasebackupInfo.tablespaces`):
`pg checkout` puts a tablespace back at its location when the node has it there
(cli/tablespace_restore.py).

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
the page start, finds the record (XLogFindNextRecord skips xlp_rem_len bytes). Data checksums
must be off.
"""

from __future__ import annotations

import itertools
import mmap
import posixpath
import queue
import struct
import sys
import tarfile
import time as time_mod
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import BinaryIO, Protocol, cast

import crc32c

from pageserver.api.thread_chunks import chunks_ahead
from pageserver.basebackup.sources import FillingSource, SnapshotSource
from pageserver.basebackup.wal_synthesis import (
    checkpoint_record,
    normalize_lsn,
    wal_segment_chunks,
    wal_segment_pages,
)
from pageserver.reconstruct.range_reads import Filled, ForkSpan
from pageserver.storage.keys import SlruKind
from pageserver.storage.layers.native import blockpack
from pg15.constants import (
    BLCKSZ,
    CLOG_XACTS_PER_PAGE,
    DEFAULTTABLESPACE_OID,
    FIRST_NORMAL_XID,
    FSM_FORKNUM,
    GLOBALTABLESPACE_OID,
    INIT_FORKNUM,
    MAIN_FORKNUM,
    MULTIXACT_MEMBERS_PER_MEMBERGROUP,
    MULTIXACT_MEMBERS_PER_PAGE,
    MULTIXACT_OFFSETS_PER_PAGE,
    RELSEG_SIZE,
    SLRU_PAGES_PER_SEGMENT,
    VISIBILITYMAP_FORKNUM,
)
from pg15.datadir_layout import (
    PG_VERSION_FILE_CONTENT,
    PGDATA_SUBDIRS,
    database_directory,
    relation_file_name,
    slru_file_name,
    tablespace_link,
    tablespace_version_directory,
    twophase_file_name,
)
from pg15.lsn import format_lsn, segment_file_name
from pg15.pg_control import parse_control_file, with_checkpoint
from pg15.rmgr.xlog import CHECKPOINT_RECORD_SIZE
from pg15.xlog_reader import maxalign
from proto.errors import CorruptData, InvalidArgument

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

_U32 = struct.Struct("<I")
_PD_LSN = struct.Struct("<II")
_ZERO_PAGE = bytes(BLCKSZ)
_CHUNK_PAGES = 32  # pages per yielded chunk (256 KiB)
SIZED_PIECES_MOST = 32768  # pieces PlannedTar.size lists at most (~32 MiB held; review M4)
_TAR_BLOCK = 512


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
    tablespaces: tuple[tuple[int, str], ...] = ()
    """(OID, recorded location, "" = in-place) of each non-default tablespace; the archive
    has all of them in place (see the module docstring)."""


_USTAR_FIELDS = struct.Struct("100s8s8s8s12s12s8sc100s8s32s32s8s8s155s12x")
"""A ustar header's fields (POSIX.1-1988, as tarfile writes them): name, mode, uid, gid, size,
mtime, checksum, type, linkname, magic+version, uname, gname, devmajor, devminor, prefix."""
_USTAR_LIMIT = 8**11


def tar_header(name: str, size: int, mtime: int, is_dir: bool = False) -> bytes:
    """The header tarfile writes for the member (PAX format: a ustar block, with an extended
    header before it only for a name or number ustar cannot hold). Built directly where one
    ustar block does (every relation file, directory and small file of a basebackup): a delta
    of a checkout writes one per fork, ~1000 for a pgbench database, and tarfile's TarInfo
    took a tenth of a delta's time with no page changed (py-spy)."""
    raw = name.encode("ascii", "replace")
    if (
        len(raw) > 100
        or not name.isascii()
        or not 0 <= size < _USTAR_LIMIT
        or not 0 <= mtime < _USTAR_LIMIT
        or (is_dir and not name.endswith("/"))
    ):
        return _tarfile_header(name, size, mtime, is_dir)
    header = _USTAR_FIELDS.pack(
        raw,
        b"0000700\0" if is_dir else b"0000600\0",
        b"0000000\0",
        b"0000000\0",
        b"%011o\0" % size,
        b"%011o\0" % mtime,
        b"        ",
        tarfile.DIRTYPE if is_dir else tarfile.REGTYPE,
        b"",
        tarfile.POSIX_MAGIC,
        b"",
        b"",
        b"",  # device numbers: empty but for character and block devices
        b"",
        b"",
    )
    # tarfile's calc_chksums: the unsigned sum with the checksum field as spaces, written
    # as six octal digits, NUL, and the field's last space left in place.
    return header[:148] + b"%06o\0" % sum(header) + header[155:]


def _tarfile_header(name: str, size: int, mtime: int, is_dir: bool) -> bytes:
    """tar_header's reference (and its path for what one ustar block cannot hold)."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = mtime
    info.mode = 0o700 if is_dir else 0o600
    info.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
    return info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="strict")


@dataclass(frozen=True, slots=True)
class Content:
    """A member's data not made yet: `size` bytes that `chunks` (lazy: a generator) makes
    when the archive is written, so that the archive's size is known before its pages are
    read (`PlannedTar.size`)."""

    name: str
    size: int
    chunks: Iterable[bytes]


Piece = bytes | bytearray | memoryview | Content
"""What an archive is planned as: bytes made already (headers, padding, small files), or a
member's `Content`. A chunk handed on is never written again (but for AlignedChunks' buffers,
given back by their consumer): a delta's `.neon` file is compressed from the chunks where
they lie (pageserver/basebackup/snapshot_file.py)."""


def tar_member(name: str, size: int, chunks: Iterable[bytes], mtime: int) -> Iterator[Piece]:
    """A member's pieces: its header, its `Content` (checked to be `size` bytes when
    made), its padding."""
    yield tar_header(name, size, mtime)
    yield Content(name, size, chunks)
    pad = -size % _TAR_BLOCK
    if pad:
        yield bytes(pad)


def _made(content: Content) -> Iterator[bytes]:
    written = 0
    for chunk in content.chunks:
        written += len(chunk)
        yield chunk
    if written != content.size:
        raise CorruptData(
            f"basebackup: {content.name} produced {written} bytes, expected {content.size}"
        )


def tar_bytes_of(pieces: Iterable[Piece]) -> Iterator[bytes]:
    """The archive's bytes: each `Content` made where it comes."""
    for piece in pieces:
        if isinstance(piece, Content):
            yield from _made(piece)
        else:
            yield cast(bytes, piece)  # bytes, or a view of AlignedChunks: len and buffer


def tar_file(name: str, size: int, chunks: Iterable[bytes], mtime: int) -> Iterator[bytes]:
    return tar_bytes_of(tar_member(name, size, chunks, mtime))


class PlannedTar(Iterator[bytes]):
    """An archive's bytes, made lazily as they are read; `size()`, asked before the first
    byte, lists every member first (what the tar maker reads of the page store to name
    and size them: relation and SLRU sizes, small files, a delta's changed blocks, not
    the pages) and gives the archive's exact size: the total of a push's progress bar.
    Unasked, members are listed as they are written (a checkout's delta starts at once)."""

    def __init__(self, pieces: Iterator[Piece]) -> None:
        self._pieces = pieces
        self._chunks: Iterator[bytes] | None = None

    def size(self, most: int | None = None) -> int | None:
        """The archive's size; None when it has more than `most` pieces (SIZED_PIECES_MOST
        by default): the listed pieces are held until written (a header and a lazy content
        per fork, ~1 KiB), so a store of very many forks gives no total rather than holding
        them all (the bar then shows bytes and rate only, as with an older daemon)."""
        if self._chunks is not None:
            raise RuntimeError("the archive's size is asked before its first byte is read")
        most = SIZED_PIECES_MOST if most is None else most
        listed = list(itertools.islice(self._pieces, most + 1))
        if len(listed) > most:
            self._pieces = itertools.chain(listed, self._pieces)
            return None
        self._pieces = iter(listed)
        return sum(p.size if isinstance(p, Content) else len(p) for p in listed)

    def __next__(self) -> bytes:
        if self._chunks is None:
            self._chunks = tar_bytes_of(self._pieces)
        return next(self._chunks)


def tar_sparse_file(
    name: str, size: int, regions: list[tuple[int, bytes]], mtime: int
) -> Iterator[bytes]:
    """A member of `size` bytes, zeros but for `regions` ((offset, bytes), in order, apart),
    as a GNU sparse file (format 1.0 in a PAX header, what `tar --sparse --format=pax`
    writes): the archive holds the map and the regions' bytes only. A checkout's WAL
    segment is two pages in 16 MiB of zeros, which were 58% of a 1% checkout's delta and
    most of the daemon's writing into the socket (bench/README.md, `checkout`).
    datadir_files/tar_reader.py reads the zeros back; `tarfile` and GNU tar extract it (a
    file ending in a hole has an empty last region at its end, as GNU tar writes it)."""
    at = 0
    for offset, data in regions:
        if offset < at or offset + len(data) > size:
            raise CorruptData(f"basebackup: {name}'s sparse regions overlap or pass its end")
        at = offset + len(data)
    if at < size or not regions:  # GNU tar takes the file's size from the last region only
        regions = [*regions, (size, b"")]
    sparse_map = "".join(
        [f"{len(regions)}\n", *(f"{offset}\n{len(data)}\n" for offset, data in regions)]
    ).encode()
    sparse_map += bytes(-len(sparse_map) % _TAR_BLOCK)
    stored = len(sparse_map) + sum(len(data) for _offset, data in regions)
    directory, base = posixpath.split(name)
    info = tarfile.TarInfo(posixpath.join(directory, "GNUSparseFile.0", base))
    info.size = stored
    info.mtime = mtime
    info.mode = 0o600
    info.pax_headers = {
        "GNU.sparse.major": "1",
        "GNU.sparse.minor": "0",
        "GNU.sparse.name": name,
        "GNU.sparse.realsize": str(size),
    }
    yield info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="strict")
    yield sparse_map
    for _offset, data in regions:
        yield data
    if stored % _TAR_BLOCK:
        yield bytes(-stored % _TAR_BLOCK)


def _tar_bytes(name: str, data: bytes, mtime: int) -> Iterator[Piece]:
    return tar_member(name, len(data), [data], mtime)


class ForkContent(Protocol):
    """What stands for a relation fork's segment files in the archive (a delta `.neon` file
    carries changed pages only: pageserver/basebackup/delta_tar.py)."""

    def fork_members(
        self, path: str, spc: int, db: int, rel: int, fork: int, nblocks: int, mtime: int
    ) -> Iterator[Piece]:
        """The tar pieces for fork `fork` (of `nblocks` blocks) written at `path`, the name
        of its first segment file (pages as `Content`: made only when written)."""
        ...

    def directory_end(self, directory: str, mtime: int) -> Iterator[Piece]:
        """The tar pieces after the forks of a database `directory` (`global`, `base/5`)."""
        ...

    def sparse_member(self, name: str, size: int, stored: int, mtime: int) -> None:
        """The member `name` of `size` bytes went in as a sparse one of `stored` tar bytes
        (the WAL segment: a whole basebackup has it as a regular member)."""
        ...


class AlignedChunks:
    """Page-aligned buffers a fork's pages are joined into, 1 MiB each, lent to the writer
    and reused once it gives them back (`release`): a writer with O_DIRECT
    (datadir_files/untar.py's _DirectWrites, when the daemon writes a basebackup's files itself)
    writes from them as they are, where a bytes chunk's data, never page-aligned, was
    copied once more into its staging buffer (~0.4 s of CPU a GiB). `join` never waits:
    with every buffer lent it joins into bytes, as without it (a wait could deadlock
    against a consumer gathering chunks into a batch before it writes any)."""

    PAGES = 128

    def __init__(self, count: int = 16) -> None:
        size = self.PAGES * BLCKSZ
        whole = memoryview(mmap.mmap(-1, count * size))  # anonymous: page-aligned
        self._slots = [whole[i * size : (i + 1) * size] for i in range(count)]
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(count):
            self._free.put(i)
        self._lent: dict[int, tuple[memoryview, int]] = {}  # id(chunk) -> (chunk, slot)

    def join(self, pages: list[bytes]) -> bytes | memoryview:
        """The pages, one after the other, in a free buffer (lent until `release`), or
        in bytes when none is free."""
        chunk = self._lend(len(pages) * BLCKSZ)
        if chunk is None:
            return b"".join(pages)
        at = 0
        for page in pages:
            chunk[at : at + BLCKSZ] = page
            at += BLCKSZ
        return chunk

    def take(self, pages: int) -> memoryview | bytearray:
        """A buffer for `pages` pages to be written into: a free buffer's first pages (lent
        until `release`) when there is one and `pages` fill it, else a new bytearray (a
        fork's tail, as `join` makes bytes of it)."""
        chunk = self._lend(pages * BLCKSZ) if pages == self.PAGES else None
        return bytearray(pages * BLCKSZ) if chunk is None else chunk

    def _lend(self, size: int) -> memoryview | None:
        """The first `size` bytes of a free buffer, lent until `release`; None if none is
        free."""
        try:
            i = self._free.get_nowait()
        except queue.Empty:
            return None
        chunk = self._slots[i][:size]
        self._lent[id(chunk)] = (chunk, i)  # held: its id names it until released
        return chunk

    def release(self, chunk: object) -> None:
        """Take a chunk's buffer back (any other chunk: nothing)."""
        lent = self._lent.pop(id(chunk), None)
        if lent is not None and lent[0] is chunk:
            self._free.put(lent[1])


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
        fork_content: ForkContent | None = None,
        aligned: AlignedChunks | None = None,
        sparse_wal: bool = False,
    ) -> None:
        self.aligned = aligned
        self.sparse_wal = sparse_wal
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
        self.fork_content = fork_content
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
        locations = dict(source.get_tablespaces())
        for spc, _db in self.dbs:
            if spc not in (GLOBALTABLESPACE_OID, DEFAULTTABLESPACE_OID):
                # A tablespace whose CREATE record predates tablespace tracking: its files
                # are there, its location is not known.
                locations.setdefault(spc, "")
        self.tablespaces = dict(sorted(locations.items()))
        self.info = replace(self.info, tablespaces=tuple(self.tablespaces.items()))

    def pieces(self) -> Iterator[Piece]:
        mtime = self.now
        yield from _tar_bytes("PG_VERSION", PG_VERSION_FILE_CONTENT, mtime)
        for name in sorted(self.config_files):
            yield from _tar_bytes(name, self.config_files[name], mtime)
        for d in PGDATA_SUBDIRS:
            yield tar_header(d + "/", 0, mtime, is_dir=True)
        for spc in self.tablespaces:
            yield tar_header(tablespace_link(spc) + "/", 0, mtime, is_dir=True)
            yield tar_header(tablespace_version_directory(spc) + "/", 0, mtime, is_dir=True)
        for spc, db in self.dbs:
            yield from self._database(spc, db)
        yield from self._slrus()
        for xid, data in sorted(self.source.get_twophase_files().items()):
            _check_twophase(xid, data)
            yield from _tar_bytes(f"pg_twophase/{twophase_file_name(xid)}", data, mtime)
        if self.timeline_history is not None:
            name = f"pg_wal/{self.info.pg_timeline:08X}.history"
            yield from _tar_bytes(name, self.timeline_history, mtime)
        info = self.info
        segment = (
            info.checkpoint_lsn,
            self.record,
            info.pg_timeline,
            info.system_identifier,
            info.wal_segment_size,
        )
        name = f"pg_wal/{info.wal_segment}"
        if self.sparse_wal:
            pieces = list(
                tar_sparse_file(name, info.wal_segment_size, wal_segment_pages(*segment), mtime)
            )
            if self.fork_content is not None:
                stored = sum(map(len, pieces))
                self.fork_content.sparse_member(name, info.wal_segment_size, stored, mtime)
            yield from pieces
        else:
            yield from tar_member(name, info.wal_segment_size, wal_segment_chunks(*segment), mtime)
        yield from _tar_bytes("global/pg_control", self.control, mtime)
        yield bytes(2 * _TAR_BLOCK)  # end-of-archive marker

    def _database(self, spc: int, db: int) -> Iterator[Piece]:
        mtime = self.now
        is_global = (spc, db) == (GLOBALTABLESPACE_OID, 0)
        where = database_directory(spc, db)
        relmap = self.source.get_relmap(spc, db)
        if not is_global:
            yield tar_header(f"{where}/", 0, mtime, is_dir=True)
            if spc == DEFAULTTABLESPACE_OID or relmap is not None:
                yield from _tar_bytes(f"{where}/PG_VERSION", PG_VERSION_FILE_CONTENT, mtime)
        if relmap is not None:
            if len(relmap) != 512:
                raise CorruptData(f"relmap of database {spc}/{db} has {len(relmap)} bytes, not 512")
            yield from _tar_bytes(f"{where}/pg_filenode.map", relmap, mtime)
        rels = self.source.list_rels(spc, db)
        unlogged = {rel for rel, fork in rels if fork == INIT_FORKNUM}
        forks = [
            (rel, fork)
            for rel, fork in rels
            if fork != FSM_FORKNUM
            and (fork != VISIBILITYMAP_FORKNUM or self.include_vm)
            # an unlogged relation's main fork comes from its init fork; fsm/vm are dropped
            and (rel not in unlogged or fork == INIT_FORKNUM)
        ]
        sizes = self.source.rel_sizes(spc, db, forks)
        for (rel, fork), nblocks in zip(forks, sizes, strict=True):
            yield from self._fork(spc, db, rel, fork, fork, nblocks)
            if fork == INIT_FORKNUM:
                yield from self._fork(spc, db, rel, INIT_FORKNUM, MAIN_FORKNUM, nblocks)
        if self.fork_content is not None:
            yield from self.fork_content.directory_end(where, mtime)

    def _fork(
        self, spc: int, db: int, rel: int, src_fork: int, dst_fork: int, nblocks: int
    ) -> Iterator[Piece]:
        """The segment files of fork `dst_fork` (`nblocks` long), with the content of fork
        `src_fork`."""
        if self.fork_content is not None:
            path = relation_file_name(spc, db, rel, dst_fork)
            yield from self.fork_content.fork_members(
                path, spc, db, rel, src_fork, nblocks, self.now
            )
            return
        nsegs = max(1, -(-nblocks // RELSEG_SIZE))
        for segno in range(nsegs):
            first = segno * RELSEG_SIZE
            count = min(nblocks - first, RELSEG_SIZE)
            name = relation_file_name(spc, db, rel, dst_fork, segno)
            yield from tar_member(
                name,
                count * BLCKSZ,
                self._rel_pages(spc, db, rel, src_fork, first, count),
                self.now,
            )

    def _rel_pages(
        self, spc: int, db: int, rel: int, fork: int, first: int, count: int
    ) -> Iterator[bytes]:
        """The fork's pages, joined a chunk at a time, each checked (`_first_bad_page`:
        whole, and no page LSN past the WAL's end) before its chunk is yielded."""
        limit = self.info.end_lsn
        join: Callable[[list[bytes]], bytes | memoryview] = b"".join
        per_chunk = _CHUNK_PAGES
        if self.aligned is not None:
            join, per_chunk = self.aligned.join, self.aligned.PAGES
            filled = (
                self.source.rel_chunks(
                    ForkSpan(spc, db, rel, fork, first, count), self.aligned, per_chunk
                )
                if isinstance(self.source, FillingSource)
                else None
            )
            if filled is not None:
                yield from self._filled_pages(spc, db, rel, fork, first, filled)
                return
        pages = iter(self.source.rel_pages(spc, db, rel, fork, first, count))
        blkno = first
        while batch := list(itertools.islice(pages, per_chunk)):
            bad = _first_bad_page(batch, limit)
            if bad >= 0:
                raise _bad_page(spc, db, rel, fork, blkno + bad, batch[bad], limit)
            if len(batch) == per_chunk:
                yield cast(bytes, join(batch))  # a view of AlignedChunks: len and buffer
            else:  # a fork's tail: a buffer for it would sit in a batch still filling
                yield b"".join(batch)
            blkno += len(batch)

    def _filled_pages(
        self, spc: int, db: int, rel: int, fork: int, first: int, filled: Iterator[Filled]
    ) -> Iterator[bytes]:
        """`_rel_pages` of chunks the source wrote (`TimelineSource.rel_chunks`): the pages
        it left are put in place (a hole: zeros), each page checked as `_rel_pages` checks
        them."""
        limit = self.info.end_lsn
        blkno = first
        for out, n, left in filled:
            short = n
            for i, value in left:
                page = _ZERO_PAGE if value is None else value
                if len(page) != BLCKSZ:
                    short = min(short, i)
                    continue
                out[i * BLCKSZ : (i + 1) * BLCKSZ] = page
            bad = _first_late_page(out, n, limit)
            if bad < 0 and short == n:
                yield cast(bytes, out)  # a view or a bytearray: len and buffer
                blkno += n
                continue
            if 0 <= bad < short:
                page = bytes(out[bad * BLCKSZ : (bad + 1) * BLCKSZ])
                error = _bad_page(spc, db, rel, fork, blkno + bad, page, limit)
            else:
                value = dict(left)[short] or b""
                error = _bad_page(spc, db, rel, fork, blkno + short, value, limit)
            assert self.aligned is not None  # filled chunks come only with it
            self.aligned.release(out)  # never handed on: nobody else gives it back
            raise error

    def _slrus(self) -> Iterator[Piece]:
        cp = self.checkpoint
        needed = {
            SlruKind.CLOG: _needed_page(cp.next_xid, CLOG_XACTS_PER_PAGE, 1),
            SlruKind.MULTIXACT_OFFSETS: _needed_page(cp.next_multi, MULTIXACT_OFFSETS_PER_PAGE, 1),
            SlruKind.MULTIXACT_MEMBERS: _needed_page(
                cp.next_multi_offset, MULTIXACT_MEMBERS_PER_PAGE, MULTIXACT_MEMBERS_PER_MEMBERGROUP
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
                yield from tar_member(
                    f"{kind.directory}/{slru_file_name(segno)}",
                    sizes[segno] * BLCKSZ,
                    self._slru_pages(kind, segno, have.get(segno, 0), sizes[segno]),
                    self.now,
                )

    def _slru_pages(self, kind: SlruKind, segno: int, have: int, nblocks: int) -> Iterator[bytes]:
        """`nblocks` pages of a segment: the source's first `have`, then zero pages."""
        batch: list[bytes] = []
        stored = self.source.slru_pages(kind, segno, have) if have else iter(())
        for blkno in range(nblocks):
            page = next(stored) if blkno < have else _ZERO_PAGE
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


def _first_bad_page_python(pages: list[bytes], limit: int) -> int:
    """The index of the first page that is not BLCKSZ long or whose page LSN is past
    `limit`, or -1: the reference of `_blockpack.first_bad_page`, which spares the tar maker
    a Python step per page (~140k for a 1 GiB database)."""
    for i, page in enumerate(pages):
        if len(page) != BLCKSZ:
            return i
        hi, lo = _PD_LSN.unpack_from(page, 0)
        if (hi << 32 | lo) > limit:
            return i
    return -1


_LSN_WORDS = BLCKSZ // 4
"""A page's length in 32-bit words: pd_lsn's halves are words 0 and 1 of each page."""


def _first_late_page_python(buf: memoryview | bytearray, n: int, limit: int) -> int:
    """The index of the first of the `n` whole pages in `buf` whose page LSN is past
    `limit`, or -1: `_first_late_page`'s reference, a step per page."""
    for i in range(n):
        hi, lo = _PD_LSN.unpack_from(buf, i * BLCKSZ)
        if (hi << 32 | lo) > limit:
            return i
    return -1


def _first_late_page(buf: memoryview | bytearray, n: int, limit: int) -> int:
    """`_first_bad_page` of a chunk written in place (its pages whole): the pages' LSN
    words read as two strided views, no object per page but the high halves' ints."""
    if sys.byteorder != "little":  # pd_lsn's halves are read little-endian
        return _first_late_page_python(buf, n, limit)
    words = memoryview(buf).cast("B")[: n * BLCKSZ].cast("I")
    his = words[0::_LSN_WORDS].tolist()
    if max(his, default=0) < limit >> 32:
        return -1
    los = words[1::_LSN_WORDS].tolist()
    for i, (hi, lo) in enumerate(zip(his, los, strict=True)):
        if (hi << 32 | lo) > limit:
            return i
    return -1


def _first_bad_page(pages: list[bytes], limit: int) -> int:
    if blockpack is None:
        return _first_bad_page_python(pages, limit)
    return blockpack.first_bad_page(pages, BLCKSZ, limit)


def _bad_page(
    spc: int, db: int, rel: int, fork: int, blkno: int, page: bytes, limit: int
) -> CorruptData:
    """The error for a page `_first_bad_page` found."""
    where = f"relation {spc}/{db}/{rel} fork {fork} block {blkno}"
    if len(page) != BLCKSZ:
        return CorruptData(f"{where}: short page")
    hi, lo = _PD_LSN.unpack_from(page, 0)
    return CorruptData(
        f"{where} has page LSN {format_lsn(hi << 32 | lo)}, past the basebackup's WAL end "
        f"{format_lsn(limit)}"
    )


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
    fork_content: ForkContent | None = None,
    aligned: AlignedChunks | None = None,
    sparse_wal: bool = False,
) -> tuple[BasebackupInfo, PlannedTar]:
    """Validate, then return the archive's description and a lazy iterator of tar chunks.

    Memory is bounded by one chunk (256 KiB of pages or one WAL run); errors in the inputs
    are raised here, before any byte; source errors surface while iterating. With
    `fork_content`, it makes each relation fork's members instead (a delta); with
    `aligned`, a fork's pages come in its buffers (views lent until the consumer releases
    them), 1 MiB each; with `sparse_wal`, the WAL segment is a sparse member
    (`tar_sparse_file`: its two pages, not 16 MiB of zeros).
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
        fork_content,
        aligned,
        sparse_wal,
    )
    return plan.info, PlannedTar(plan.pieces())


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
    """Write the tar of a data directory at `lsn` to `out` (see the module docstring); the
    tar is made on a thread of its own a few chunks ahead of the writes (`chunks_ahead`)."""
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
    for batch in chunks_ahead(batched(chunks, HANDOFF_BYTES)):
        for chunk in batch:
            out.write(chunk)
    return info


HANDOFF_BYTES = 1 << 20
"""Tar bytes handed from the thread making them to the writer at a time (a list of chunks:
no join, no copy); `chunks_ahead` keeps four such batches ahead. The daemon sends a batch
as raw frames written as they are (proto/connection.py `send_pieces`)."""


FIRST_HANDOFF_BYTES = 64 << 10
"""The first batch of a stream the reader waits for (`batched`'s `first`): the batches
double from it up to HANDOFF_BYTES. A 1% checkout's delta begins with ~1 MiB of fork
members without pages (template1's and template0's ~600 forks, a tar header and a fork
header each): in one first batch of HANDOFF_BYTES the CLI got its first byte only once the
daemon had made them all (60-80 ms after the plan at load 6), then applied them while the
daemon went on; from 64 KiB on the two overlap."""


def batched(chunks: Iterable[bytes], size: int, first: int | None = None) -> Iterator[list[bytes]]:
    """`chunks` in lists of at least `size` bytes (the last one may be shorter); with
    `first`, the first list from `first` bytes, each next one twice the last up to `size`."""
    batch: list[bytes] = []
    held = 0
    want = size if first is None else min(first, size)
    for chunk in chunks:
        batch.append(chunk)
        held += len(chunk)
        if held >= want:
            yield batch
            batch, held = [], 0
            want = min(size, want * 2)
    if batch:
        yield batch
