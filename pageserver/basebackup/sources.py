"""What a basebackup reads: the whole non-WAL state of a cluster at one LSN.

Two sources: the page store at (timeline, LSN) through `pageserver.reconstruct`, and a cleanly
shut-down data directory read file by file (tests, imports).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

from pageserver.ingest.datadir_tablespaces import tablespace_locations, tablespaces
from pageserver.ingest.import_datadir import import_lsn_of
from pageserver.reconstruct import range_reads
from pageserver.reconstruct import reads as pr
from pageserver.reconstruct.range_reads import SlowValues
from pageserver.reconstruct.range_rebuild import PageFill, rebuild_keys
from pageserver.reconstruct.value_format import ZERO_PAGE, decode_u32
from pageserver.redo.native import redo as native_redo
from pageserver.storage.keys import (
    SlruKind,
    database_range,
    describe,
    rel_size_key,
    slru_block_key,
    slru_segment_blocks_range,
)
from pageserver.storage.timeline import PersistentView, RangeRead, Timeline
from pg15.constants import BLCKSZ, DEFAULTTABLESPACE_OID, GLOBALTABLESPACE_OID, RELSEG_SIZE
from pg15.datadir_layout import (
    SLRU_SEGMENT_FILE,
    TWOPHASE_FILE,
    database_directory,
    parse_relation_file_name,
    relation_file_name,
    slru_file_name,
)
from pg15.lsn import format_lsn
from pg15.pg_control import read_control_file
from pg15.rmgr.xlog import CheckPoint
from proto.errors import CorruptData, NotFound


def pages_one_by_one(
    source: SnapshotSource, spc: int, db: int, rel: int, fork: int, first: int, count: int
) -> Iterator[bytes]:
    """`rel_pages` through `get_page`, block by block: for a source with no bulk read."""
    return (source.get_page(spc, db, rel, fork, b) for b in range(first, first + count))


def sizes_one_by_one(
    source: SnapshotSource, spc: int, db: int, forks: list[tuple[int, int]]
) -> list[int]:
    """`rel_sizes` through `get_rel_size`, fork by fork: for a source with no bulk read."""
    return [source.get_rel_size(spc, db, rel, fork) for rel, fork in forks]


def slru_pages_one_by_one(
    source: SnapshotSource, kind: SlruKind, segno: int, count: int
) -> Iterator[bytes]:
    """`slru_pages` through `get_slru_page`: for a source with no bulk read."""
    return (source.get_slru_page(kind, segno, b) for b in range(count))


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

    def get_tablespaces(self) -> dict[int, str]:
        """OID -> location ("" = in-place) of every non-default tablespace."""
        ...

    def get_rel_size(self, spc: int, db: int, rel: int, fork: int) -> int: ...

    def rel_sizes(self, spc: int, db: int, forks: list[tuple[int, int]]) -> list[int]:
        """The sizes of a database's forks (rel, fork), in order (a bulk read)."""
        ...

    def get_page(self, spc: int, db: int, rel: int, fork: int, blkno: int) -> bytes: ...

    def rel_pages(
        self, spc: int, db: int, rel: int, fork: int, first: int, count: int
    ) -> Iterator[bytes]:
        """Blocks first..first+count-1 of a fork, in order (a bulk read)."""
        ...

    def list_slru_segments(self, kind: SlruKind) -> list[int]: ...

    def get_slru_segment_size(self, kind: SlruKind, segno: int) -> int: ...

    def get_slru_page(self, kind: SlruKind, segno: int, blkno: int) -> bytes: ...

    def slru_pages(self, kind: SlruKind, segno: int, count: int) -> Iterator[bytes]:
        """Pages 0..count-1 of an SLRU segment, in order (a bulk read)."""
        ...

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


@runtime_checkable
class FillingSource(Protocol):
    """A source that can also write a fork's pages into the tar maker's buffers
    (`TimelineSource`): the tar maker uses it when it has AlignedChunks."""

    def rel_chunks(
        self, span: range_reads.ForkSpan, buffers: range_reads.Buffers, per_chunk: int
    ) -> Iterator[range_reads.Filled] | None:
        """`rel_pages` of `span` written into buffers from `buffers`; None where it cannot."""
        ...


@dataclass(frozen=True, slots=True)
class TimelineSource:
    """The page store's state of `timeline` at `lsn`, read through pageserver.reconstruct."""

    timeline: Timeline
    lsn: int
    bulk: bool = True
    """Rebuild the pages that need redo in bulk (range_rebuild); False: key by key (the
    reference the tests compare with)."""
    _plans: dict[
        tuple[int, int], tuple[RangeRead | None, SlowValues | None, PersistentView | None]
    ] = field(default_factory=dict, compare=False, repr=False)
    _views: dict[tuple[int, int], PersistentView] = field(
        default_factory=dict, compare=False, repr=False
    )

    @property
    def tracks_visibility_map(self) -> bool:
        # apply_delta applies the implicit VM clears of heap records and VM truncation.
        return True

    def list_dbs(self) -> list[tuple[int, int]]:
        return pr.list_dbs(self.timeline, self.lsn)

    def list_rels(self, spc: int, db: int) -> list[tuple[int, int]]:
        return pr.list_rels(self.timeline, spc, db, self.lsn)

    def get_tablespaces(self) -> dict[int, str]:
        return pr.get_tablespaces(self.timeline, self.lsn)

    def get_rel_size(self, spc: int, db: int, rel: int, fork: int) -> int:
        size = pr.get_rel_size(self.timeline, spc, db, rel, fork, self.lsn)
        if size is None:
            raise NotFound(f"relation {spc}/{db}/{rel} fork {fork} has no size at {self._at}")
        return size

    def rel_sizes(self, spc: int, db: int, forks: list[tuple[int, int]]) -> list[int]:
        # A size key follows its fork's blocks (pageserver.storage.keys): a database's ~300
        # of them are read in one pass over the layer files (range_rebuild), where one
        # get_rel_size each (a layer-map walk, an index search per layer) took a seventh of
        # a checkout's delta with no page changed (py-spy).
        if not self.bulk or native_redo is None or not forks:
            return sizes_one_by_one(self, spc, db, forks)
        keys = [rel_size_key(spc, db, rel, fork) for rel, fork in forks]
        order = sorted(range(len(keys)), key=keys.__getitem__)
        view = self.timeline.persistent_view(database_range(spc, db), self.lsn)
        sizes = [0] * len(keys)
        values = rebuild_keys(
            self.timeline, self.lsn, view, [keys[i] for i in order], scattered=True
        )
        for i, raw in zip(order, values, strict=True):
            if raw is None:
                rel, fork = forks[i]
                raise NotFound(f"relation {spc}/{db}/{rel} fork {fork} has no size at {self._at}")
            sizes[i] = decode_u32(raw, partial(describe, keys[i]))
        return sizes

    def get_page(self, spc: int, db: int, rel: int, fork: int, blkno: int) -> bytes:
        return pr.get_rel_page(self.timeline, spc, db, rel, fork, blkno, self.lsn)

    def rel_pages(
        self, spc: int, db: int, rel: int, fork: int, first: int, count: int
    ) -> Iterator[bytes]:
        # One plan per database (pageserver.reconstruct.range_reads): pages held by image
        # layers are scanned, the others ("slow") rebuilt in bulk from the layer files by the
        # C chain redo (range_rebuild); without it (NEON_PURE_PYTHON=1), the slow keys go
        # through the per-key path, and every key where image layers cover the database only
        # in part.
        if (spc, db) not in self._plans:
            key_range = database_range(spc, db)
            plan = self.timeline.plan_range_read(key_range, self.lsn)
            bulk: SlowValues | None = None
            view: PersistentView | None = None
            if self.bulk and native_redo is not None:
                view = self._view(spc, db)
                bulk = partial(rebuild_keys, self.timeline, self.lsn, view)
            self._plans[spc, db] = (plan, bulk, view)
        plan, bulk, view = self._plans[spc, db]
        if plan is None and bulk is None:
            return pages_one_by_one(self, spc, db, rel, fork, first, count)
        return range_reads.rel_pages(
            self.timeline, plan, spc, db, rel, fork, first, count, self.lsn, bulk, view
        )

    def rel_chunks(
        self, span: range_reads.ForkSpan, buffers: range_reads.Buffers, per_chunk: int
    ) -> Iterator[range_reads.Filled] | None:
        """`rel_pages` written into the caller's buffers (`range_reads.rel_chunks`: the C
        walk writes each page in place, no plan is made); None where it cannot."""
        # Before any view is made: on a branch the C walk cannot fill, and rel_pages makes
        # its plan (a view scans the in-memory layers under the timeline lock).
        if not self.bulk or native_redo is None or not PageFill.usable(self.timeline):
            return None
        view = self._view(span.spc, span.db)
        return range_reads.rel_chunks(self.timeline, span, self.lsn, view, buffers, per_chunk)

    def _view(self, spc: int, db: int) -> PersistentView:
        """The persistent layers of database `db` at the LSN, made once per database for
        `rel_pages` and `rel_chunks`."""
        view = self._views.get((spc, db))
        if view is None:
            view = self.timeline.persistent_view(database_range(spc, db), self.lsn)
            self._views[spc, db] = view
        return view

    def list_slru_segments(self, kind: SlruKind) -> list[int]:
        return pr.list_slru_segments(self.timeline, kind, self.lsn)

    def get_slru_segment_size(self, kind: SlruKind, segno: int) -> int:
        size = pr.get_slru_segment_size(self.timeline, kind, segno, self.lsn)
        if size is None:
            raise NotFound(f"{kind.directory} segment {segno:04X} has no size at {self._at}")
        return size

    def get_slru_page(self, kind: SlruKind, segno: int, blkno: int) -> bytes:
        return pr.get_slru_page(self.timeline, kind, segno, blkno, self.lsn)

    def slru_pages(self, kind: SlruKind, segno: int, count: int) -> Iterator[bytes]:
        # A pg_xact page holds the commit bits of 32768 transactions: its chain is thousands
        # of commit records, redone here in C in one pass over the layer files (the per-key
        # path spent a tenth of a 1 GiB extraction on a few such pages).
        if not self.bulk or native_redo is None or count == 0:
            return slru_pages_one_by_one(self, kind, segno, count)
        keys = [slru_block_key(kind, segno, blkno) for blkno in range(count)]
        view = self.timeline.persistent_view(slru_segment_blocks_range(kind, segno), self.lsn)
        values = rebuild_keys(self.timeline, self.lsn, view, keys)
        # Below the segment's size, a page never written reads as zeros (as `materialize`).
        return (ZERO_PAGE if value is None else value for value in values)

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
        return self.path / database_directory(spc, db)

    def list_dbs(self) -> list[tuple[int, int]]:
        dbs = [(GLOBALTABLESPACE_OID, 0)]
        for entry in sorted((self.path / "base").iterdir()):
            if entry.is_dir() and entry.name.isdigit():
                dbs.append((DEFAULTTABLESPACE_OID, int(entry.name)))
        for spc, version_dir in sorted(tablespaces(self.path).items()):
            if version_dir.is_dir():
                for entry in sorted(version_dir.iterdir()):
                    if entry.is_dir() and entry.name.isdigit():
                        dbs.append((spc, int(entry.name)))
        return dbs

    def get_tablespaces(self) -> dict[int, str]:
        return tablespace_locations(self.path)

    def list_rels(self, spc: int, db: int) -> list[tuple[int, int]]:
        rels: set[tuple[int, int]] = set()
        for entry in self._db_dir(spc, db).iterdir():
            parsed = parse_relation_file_name(entry.name)
            if parsed is not None and entry.is_file():
                rels.add((parsed.relfilenode, parsed.fork))
        return sorted(rels)

    def _seg_path(self, spc: int, db: int, rel: int, fork: int, segno: int) -> Path:
        return self.path / relation_file_name(spc, db, rel, fork, segno)

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

    def rel_sizes(self, spc: int, db: int, forks: list[tuple[int, int]]) -> list[int]:
        return sizes_one_by_one(self, spc, db, forks)

    def get_page(self, spc: int, db: int, rel: int, fork: int, blkno: int) -> bytes:
        path = self._seg_path(spc, db, rel, fork, blkno // RELSEG_SIZE)
        return self._read_block(path, blkno % RELSEG_SIZE)

    def rel_pages(
        self, spc: int, db: int, rel: int, fork: int, first: int, count: int
    ) -> Iterator[bytes]:
        return pages_one_by_one(self, spc, db, rel, fork, first, count)

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
            if SLRU_SEGMENT_FILE.match(e.name) and e.is_file()
        )

    def get_slru_segment_size(self, kind: SlruKind, segno: int) -> int:
        return (self._slru_dir(kind) / slru_file_name(segno)).stat().st_size // BLCKSZ

    def get_slru_page(self, kind: SlruKind, segno: int, blkno: int) -> bytes:
        return self._read_block(self._slru_dir(kind) / slru_file_name(segno), blkno)

    def slru_pages(self, kind: SlruKind, segno: int, count: int) -> Iterator[bytes]:
        return slru_pages_one_by_one(self, kind, segno, count)

    def get_relmap(self, spc: int, db: int) -> bytes | None:
        try:
            return (self._db_dir(spc, db) / "pg_filenode.map").read_bytes()
        except FileNotFoundError:
            return None

    def get_twophase_files(self) -> dict[int, bytes]:
        return {
            int(e.name, 16): e.read_bytes()
            for e in sorted((self.path / "pg_twophase").iterdir())
            if TWOPHASE_FILE.match(e.name)
        }

    def get_checkpoint(self) -> CheckPoint:
        return self._control.checkpoint

    def get_control_template(self) -> bytes:
        return self._control.raw
