"""Check native redo against PostgreSQL itself, using WAL written with wal_consistency_checking.

With wal_consistency_checking every block reference of a checked rmgr carries the page as
PostgreSQL left it after the record (APPLY clear: "FPW for WAL verification"). For each such
block, `RedoVerifier` takes the block's previous version, applies `redo_block`, masks both
that result and the restored image with the rmgr's mask (as checkXLogConsistency in
src/backend/access/transam/xlogrecovery.c does) and compares all 8192 bytes.

Where the previous version comes from: the newest image of that block seen earlier in the
same WAL (verification or APPLY image, with pd_lsn set to what redo would have stamped), or,
for blocks that carry no image, the result of our own redo of that record. Basing each check
on PostgreSQL's own image keeps one wrong redo from cascading into later records. A block
whose previous version is not in the WAL given (and which the record does not initialize)
is counted as skipped. Storage CREATE/TRUNCATE and dropped relations forget tracked pages.

Counts are per block reference, grouped by rmgr and record type as pg_waldump names them.
Pure logic: records in, counts and mismatch reports out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pageserver.redo import (
    REDO_BY_RMGR,
    UnsupportedRecord,
    mask_page,
    needs_previous,
    redo_block,
)
from pageserver.redo.page import get_lsn, set_lsn
from pageserver.redo.visibilitymap import vm_block, vm_changes, vm_clear
from pg15.constants import BLCKSZ, RM_SMGR_ID, RM_XACT_ID, VISIBILITYMAP_FORKNUM
from pg15.fpi import restore_page
from pg15.lsn import format_lsn
from pg15.records import BlockRef, DecodedRecord, RelFileNode
from pg15.rmgr import smgr, xact
from proto.errors import NeonError

PageKey = tuple[int, int]  # (fork, blkno) within one relation

MAX_DIFF_OFFSETS = 8


@dataclass
class TypeCounts:
    verified: int = 0
    mismatched: int = 0
    skipped: int = 0
    unsupported: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "verified": self.verified,
            "mismatched": self.mismatched,
            "skipped": self.skipped,
            "unsupported": self.unsupported,
        }


@dataclass(frozen=True, slots=True)
class Mismatch:
    """A block whose redo differs from PostgreSQL's image (or whose redo failed: `error`)."""

    lsn: int
    rmgr: str
    record_type: str
    block_id: int
    rnode: RelFileNode
    fork: str
    blkno: int
    differing: int
    first_offsets: tuple[int, ...]
    error: str | None = None

    def describe(self) -> str:
        where = (
            f"{format_lsn(self.lsn)} {self.rmgr} {self.record_type} blkref #{self.block_id}: "
            f"rel {self.rnode} fork {self.fork} blk {self.blkno}"
        )
        if self.error is not None:
            return f"redo failed at {where}: {self.error}"
        offsets = ", ".join(str(o) for o in self.first_offsets)
        return f"mismatch at {where}: {self.differing} bytes differ, first at offsets {offsets}"


def diff_offsets(a: bytes | bytearray, b: bytes | bytearray) -> tuple[int, tuple[int, ...]]:
    """(number of differing bytes, the first few differing offsets)."""
    diffs = [i for i in range(min(len(a), len(b))) if a[i] != b[i]]
    diffs.extend(range(min(len(a), len(b)), max(len(a), len(b))))
    return len(diffs), tuple(diffs[:MAX_DIFF_OFFSETS])


@dataclass
class RedoVerifier:
    """Feed records in WAL order with `feed`; read `counts`, `mismatches`, `ok`."""

    max_reports: int = 50
    counts: dict[tuple[str, str], TypeCounts] = field(default_factory=dict)
    mismatches: list[Mismatch] = field(default_factory=list)
    total_mismatched: int = 0
    total_unsupported: int = 0
    _pages: dict[RelFileNode, dict[PageKey, bytes]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.total_mismatched == 0 and self.total_unsupported == 0

    def _count(self, record: DecodedRecord) -> TypeCounts:
        key = (record.rmgr_name, record.type_name)
        entry = self.counts.get(key)
        if entry is None:
            entry = self.counts[key] = TypeCounts()
        return entry

    def feed(self, record: DecodedRecord) -> None:
        """Verify every block of `record` that carries a verification image."""
        self._forget(record)
        if not record.blocks:
            return
        for change in vm_changes(record):
            vm_pages = self._pages.get(change.rnode)
            key = (VISIBILITYMAP_FORKNUM, vm_block(change.heap_blkno))
            old = vm_pages.get(key) if vm_pages is not None else None
            if vm_pages is not None and old is not None:
                page = bytearray(old)
                vm_clear(page, change.heap_blkno, change.flags)
                vm_pages[key] = bytes(page)
        supported = record.rmgr_id in REDO_BY_RMGR
        for ref in record.blocks:
            self._block(record, ref, supported)

    def _block(self, record: DecodedRecord, ref: BlockRef, supported: bool) -> None:
        rel_pages = self._pages.setdefault(ref.rnode, {})
        key = (ref.fork, ref.blkno)
        image = ref.image
        if image is not None and image.apply:
            rel_pages[key] = redo_block(record, ref.block_id, None)
            return
        if not supported:
            # Only blocks PostgreSQL asked to check count: those are what we verify.
            rel_pages.pop(key, None)
            if image is not None:
                self._count(record).unsupported += 1
                self.total_unsupported += 1
            return
        prev = rel_pages.get(key)
        if image is None:
            # Not checked by PostgreSQL; keep tracking the page through our own redo.
            if prev is None and needs_previous(record, ref.block_id):
                return
            try:
                rel_pages[key] = redo_block(record, ref.block_id, prev)
            except NeonError:
                rel_pages.pop(key, None)
            return
        expected = restore_page(image)
        counts = self._count(record)
        try:
            if prev is None and needs_previous(record, ref.block_id):
                counts.skipped += 1
                rel_pages[key] = _stamped(expected, record.end_lsn)
                return
            result = redo_block(record, ref.block_id, prev)
        except UnsupportedRecord:
            counts.unsupported += 1
            self.total_unsupported += 1
            rel_pages[key] = _stamped(expected, record.end_lsn)
            return
        except NeonError as exc:
            self._mismatch(record, ref, counts, 0, (), str(exc))
            rel_pages[key] = _stamped(expected, record.end_lsn)
            return
        rel_pages[key] = _stamped(expected, get_lsn(result))
        ours = bytearray(result)
        theirs = bytearray(expected)
        try:
            mask_page(record.rmgr_id, ours, ref.blkno)
            mask_page(record.rmgr_id, theirs, ref.blkno)
        except NeonError as exc:
            self._mismatch(record, ref, counts, 0, (), f"mask failed: {exc}")
            return
        if ours == theirs:
            counts.verified += 1
        else:
            n, first = diff_offsets(ours, theirs)
            self._mismatch(record, ref, counts, n, first, None)

    def _mismatch(
        self,
        record: DecodedRecord,
        ref: BlockRef,
        counts: TypeCounts,
        n: int,
        first: tuple[int, ...],
        error: str | None,
    ) -> None:
        counts.mismatched += 1
        self.total_mismatched += 1
        if len(self.mismatches) < self.max_reports:
            self.mismatches.append(
                Mismatch(
                    record.lsn,
                    record.rmgr_name,
                    record.type_name,
                    ref.block_id,
                    ref.rnode,
                    ref.fork_name,
                    ref.blkno,
                    n,
                    first,
                    error,
                )
            )

    def _forget(self, record: DecodedRecord) -> None:
        """Drop tracked pages that a relation-level record makes stale."""
        if record.rmgr_id == RM_SMGR_ID:
            main = smgr.decode(record.info, record.main_data)
            if isinstance(main, smgr.SmgrCreate):
                rel_pages = self._pages.get(main.rnode)
                if rel_pages:
                    for key in [k for k in rel_pages if k[0] == main.fork]:
                        del rel_pages[key]
            else:
                rel_pages = self._pages.get(main.rnode)
                if rel_pages:
                    # Truncation also rewrites the tail VM/FSM page: forget those forks.
                    for key in [k for k in rel_pages if k[0] != 0 or k[1] >= main.blkno]:
                        del rel_pages[key]
        elif record.rmgr_id == RM_XACT_ID:
            main_x = xact.decode(record.info, record.main_data)
            if isinstance(main_x, xact.XactFinish):
                for rnode in main_x.rels:
                    self._pages.pop(rnode, None)

    def report(self) -> dict[str, dict[str, dict[str, int]]]:
        """{rmgr: {record_type: {verified, mismatched, skipped, unsupported}}}."""
        out: dict[str, dict[str, dict[str, int]]] = {}
        for (rmgr, rtype), counts in sorted(self.counts.items()):
            out.setdefault(rmgr, {})[rtype] = counts.as_dict()
        return out


def _stamped(page: bytes, lsn: int) -> bytes:
    """`page` with pd_lsn = `lsn` (images carry the LSN from before their record)."""
    if len(page) != BLCKSZ:
        return page
    out = bytearray(page)
    set_lsn(out, lsn)
    return bytes(out)
