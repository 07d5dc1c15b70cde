"""Unit tests of WAL ingest + materialization on hand-built decoded records (no server),
plus the import refusals on a real (stopped / running) initdb'd cluster."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import crc32c
import pytest

from pageserver.ingest.import_datadir import import_datadir, import_lsn_of, record_end_lsn
from pageserver.ingest.walingest import (
    EMPTY_CHECKPOINT,
    WalIngest,
    encode_record,
    fsm_logical_to_physical,
)
from pageserver.reconstruct.apply_delta import ReconstructError, reconstruct
from pageserver.reconstruct.reads import (
    get_checkpoint,
    get_rel_size,
    get_relmap,
    get_slru_page,
    get_slru_segment_size,
    get_tablespaces,
    get_twophase_files,
    list_dbs,
    list_rels,
    list_slru_segments,
    list_twophase_xids,
    materialize,
)
from pageserver.redo import UnsupportedRecord
from pageserver.redo.clog import clog_get_status
from pageserver.redo.multixact import apply_create
from pageserver.redo.page import get_lsn, max_offset, new_page, set_lsn
from pageserver.redo.visibilitymap import vm_get, vm_set
from pageserver.storage.compaction import create_image_layers
from pageserver.storage.keys import SlruKind, rel_block_key, slru_block_key
from pageserver.storage.timeline import Timeline
from pageserver.storage.timeline_store import TimelineStore
from pg15.constants import (
    RM_CLOG_ID,
    RM_DBASE_ID,
    RM_HEAP2_ID,
    RM_HEAP_ID,
    RM_MULTIXACT_ID,
    RM_RELMAP_ID,
    RM_SMGR_ID,
    RM_STANDBY_ID,
    RM_TBLSPC_ID,
    RM_XACT_ID,
    RM_XLOG_ID,
)
from pg15.records import (
    BKPBLOCK_HAS_DATA,
    BKPBLOCK_HAS_IMAGE,
    BKPBLOCK_WILL_INIT,
    BKPIMAGE_APPLY,
    BlockImage,
    BlockRef,
    DecodedRecord,
    RelFileNode,
    decode_record_bytes,
)
from pg15.rmgr.multixact import MultiXactCreate, MultiXactMember
from proto.errors import Conflict, InvalidArgument, NotFound
from tests.pgtest import PgTestCluster

SPC, DB, REL = 1663, 5, 16384
RN = RelFileNode(SPC, DB, REL)
MAIN, FSM, VM = 0, 1, 2


@pytest.fixture
def timeline(tmp_path: Path) -> Iterator[Timeline]:
    store = TimelineStore(tmp_path / "store")
    try:
        yield store.create_timeline()
    finally:
        store.close()


class Wal:
    """Hands out consecutive LSNs to hand-built records and ingests them."""

    def __init__(self, timeline: Timeline) -> None:
        self.timeline = timeline
        self.ingest = WalIngest(timeline)
        self.lsn = 0x1000000

    def put(
        self,
        rmid: int,
        info: int,
        *,
        blocks: tuple[BlockRef, ...] = (),
        main: bytes = b"",
        xid: int = 0,
    ) -> DecodedRecord:
        start, self.lsn = self.lsn, self.lsn + 0x100
        record = DecodedRecord(start, self.lsn, 0, xid, 0, info, rmid, blocks, main)
        assert self.ingest.ingest_record(record)
        assert self.timeline.last_record_lsn == self.lsn
        return record


def block(
    block_id: int,
    blkno: int,
    *,
    fork: int = MAIN,
    data: bytes = b"",
    image: bytes | None = None,
    will_init: bool = False,
    rnode: RelFileNode = RN,
) -> BlockRef:
    flags = fork | (BKPBLOCK_HAS_DATA if data else 0) | (BKPBLOCK_WILL_INIT if will_init else 0)
    img = None
    if image is not None:
        flags |= BKPBLOCK_HAS_IMAGE
        img = BlockImage(image, 0, 0, BKPIMAGE_APPLY)
    return BlockRef(block_id, rnode, fork, blkno, flags, img, data)


def tuple_data(value: int) -> bytes:
    """xl_heap_header (natts 1, HEAP_XMAX_INVALID, t_hoff 24) + bytes 23.. of the tuple."""
    return struct.pack("<HHB", 1, 0x0800, 24) + b"\x00" + struct.pack("<q", value)


def heap_insert(
    wal: Wal,
    blkno: int,
    offnum: int,
    value: int,
    *,
    init: bool = False,
    flags: int = 0,
    rnode: RelFileNode = RN,
) -> DecodedRecord:
    return wal.put(
        RM_HEAP_ID,
        0x80 if init else 0x00,
        blocks=(block(0, blkno, data=tuple_data(value), will_init=init, rnode=rnode),),
        main=struct.pack("<HB", offnum, flags),
        xid=700,
    )


def commit_main(subxacts: tuple[int, ...] = (), rels: tuple[RelFileNode, ...] = ()) -> bytes:
    xinfo = (2 if subxacts else 0) | (4 if rels else 0)
    out = struct.pack("<qI", 0, xinfo)
    if subxacts:
        out += struct.pack(f"<i{len(subxacts)}I", len(subxacts), *subxacts)
    if rels:
        out += struct.pack("<i", len(rels))
        out += b"".join(struct.pack("<III", r.spc, r.db, r.rel) for r in rels)
    return out


# --- relation pages -----------------------------------------------------------------------------


def test_heap_insert_chain_and_sizes(timeline: Timeline) -> None:
    wal = Wal(timeline)
    first = heap_insert(wal, 0, 1, 10, init=True)
    second = heap_insert(wal, 0, 2, 20)
    third = heap_insert(wal, 1, 1, 30, init=True)
    key = rel_block_key(SPC, DB, REL, MAIN, 0)
    at_first = materialize(timeline, key, first.end_lsn)
    assert max_offset(at_first) == 1 and get_lsn(at_first) == first.end_lsn
    at_second = materialize(timeline, key, second.end_lsn)
    assert max_offset(at_second) == 2 and get_lsn(at_second) == second.end_lsn
    assert get_rel_size(timeline, SPC, DB, REL, MAIN, first.end_lsn) == 1
    assert get_rel_size(timeline, SPC, DB, REL, MAIN, third.end_lsn) == 2
    assert list_rels(timeline, SPC, DB, third.end_lsn) == [(REL, MAIN)]
    assert (SPC, DB) in list_dbs(timeline, third.end_lsn)
    with pytest.raises(NotFound):
        materialize(timeline, rel_block_key(SPC, DB, REL, MAIN, 1), second.end_lsn)
    # The stored delta is the record re-encoded: it decodes back to the same record.
    again = decode_record_bytes(encode_record(second), second.lsn, second.end_lsn)
    assert (again.blocks, again.main_data, again.xid) == (second.blocks, second.main_data, 700)
    assert wal.ingest.checkpoint.next_xid == 1024  # xid 700, rounded up


def test_gap_below_size_reads_as_zero_page(timeline: Timeline) -> None:
    wal = Wal(timeline)
    rec = heap_insert(wal, 3, 1, 1, init=True)
    assert get_rel_size(timeline, SPC, DB, REL, MAIN, rec.end_lsn) == 4
    assert materialize(timeline, rel_block_key(SPC, DB, REL, MAIN, 1), rec.end_lsn) == bytes(8192)


def test_fpi_image_then_delta(timeline: Timeline) -> None:
    wal = Wal(timeline)
    page = new_page(0)
    set_lsn(page, 0x42)
    fpi = wal.put(RM_XLOG_ID, 0xB0, blocks=(block(0, 0, image=bytes(page)),))
    key = rel_block_key(SPC, DB, REL, MAIN, 0)
    restored = materialize(timeline, key, fpi.end_lsn)
    assert get_lsn(restored) == fpi.end_lsn and max_offset(restored) == 0
    ins = heap_insert(wal, 0, 1, 5)
    assert max_offset(materialize(timeline, key, ins.end_lsn)) == 1
    # A wal_consistency_checking image (no APPLY) is also the page after the record.
    verified = bytearray(materialize(timeline, key, ins.end_lsn))
    set_lsn(verified, 0)
    ref = block(0, 0, data=tuple_data(6))
    ref = BlockRef(
        0,
        RN,
        MAIN,
        0,
        ref.fork_flags | BKPBLOCK_HAS_IMAGE,
        BlockImage(bytes(verified), 0, 0, 0),
        ref.data,
    )
    checked = wal.put(RM_HEAP_ID, 0x02, blocks=(ref,), main=struct.pack("<HB", 2, 0), xid=700)
    stored = materialize(timeline, key, checked.end_lsn)
    assert get_lsn(stored) == checked.end_lsn and stored[24:] == bytes(verified[24:])


def test_delta_without_base_is_a_clear_error(timeline: Timeline) -> None:
    wal = Wal(timeline)
    rec = heap_insert(wal, 0, 1, 1)  # not INIT: the page's history is missing
    with pytest.raises(ReconstructError, match=r"rel 1663/5/16384 fork main blk 0.*Heap"):
        materialize(timeline, rel_block_key(SPC, DB, REL, MAIN, 0), rec.end_lsn)


def test_vm_clear_from_heap_flags(timeline: Timeline) -> None:
    wal = Wal(timeline)
    heap_insert(wal, 0, 1, 1, init=True)
    vm = new_page(0)
    vm_set(vm, 0, 3)
    vm_set(vm, 1, 3)
    wal.put(RM_XLOG_ID, 0xB0, blocks=(block(0, 0, fork=VM, image=bytes(vm)),))
    vm_key = rel_block_key(SPC, DB, REL, VM, 0)
    before = materialize(timeline, vm_key, wal.lsn)
    ins = heap_insert(wal, 0, 2, 2, flags=0x01)  # XLH_INSERT_ALL_VISIBLE_CLEARED
    after = materialize(timeline, vm_key, ins.end_lsn)
    assert vm_get(after, 0) == 0 and vm_get(after, 1) == 3
    assert get_lsn(after) == get_lsn(before)  # clears do not stamp the VM page
    # VISIBLE sets the bit again through its VM block reference.
    visible = wal.put(
        RM_HEAP2_ID,
        0x40,
        blocks=(block(0, 0, fork=VM), block(1, 0)),
        main=struct.pack("<IB", 700, 0x01),
    )
    assert vm_get(materialize(timeline, vm_key, visible.end_lsn), 0) == 1


# --- storage ----------------------------------------------------------------------------------


def test_smgr_create_and_truncate(timeline: Timeline) -> None:
    wal = Wal(timeline)
    create = wal.put(RM_SMGR_ID, 0x10, main=struct.pack("<IIIi", SPC, DB, REL, MAIN))
    assert get_rel_size(timeline, SPC, DB, REL, MAIN, create.end_lsn) == 0
    assert list_rels(timeline, SPC, DB, create.end_lsn) == [(REL, MAIN)]
    for blkno in range(5):
        heap_insert(wal, blkno, 1, blkno, init=True)
    vm = new_page(0)
    for heap_blk in range(5):
        vm_set(vm, heap_blk, 3)
    wal.put(RM_XLOG_ID, 0xB0, blocks=(block(0, 0, fork=VM, image=bytes(vm)),))
    wal.put(RM_XLOG_ID, 0xB0, blocks=(block(0, 2, fork=FSM, image=bytes(new_page(0))),))
    trunc = wal.put(RM_SMGR_ID, 0x20, main=struct.pack("<IIIIi", 2, SPC, DB, REL, 0x7))
    lsn = trunc.end_lsn
    assert get_rel_size(timeline, SPC, DB, REL, MAIN, lsn) == 2
    assert get_rel_size(timeline, SPC, DB, REL, VM, lsn) == 1
    assert get_rel_size(timeline, SPC, DB, REL, FSM, lsn) == fsm_logical_to_physical(0) + 1 == 3
    with pytest.raises(NotFound):
        materialize(timeline, rel_block_key(SPC, DB, REL, MAIN, 3), lsn)
    vm_after = materialize(timeline, rel_block_key(SPC, DB, REL, VM, 0), lsn)
    assert [vm_get(vm_after, b) for b in range(5)] == [3, 3, 0, 0, 0]
    # Re-extension does not resurrect the truncated page.
    again = heap_insert(wal, 3, 1, 99, init=True)
    assert max_offset(materialize(timeline, rel_block_key(SPC, DB, REL, MAIN, 3), again.end_lsn))
    assert materialize(timeline, rel_block_key(SPC, DB, REL, MAIN, 2), again.end_lsn) == bytes(8192)


def test_commit_drops_relations(timeline: Timeline) -> None:
    wal = Wal(timeline)
    heap_insert(wal, 0, 1, 1, init=True)
    wal.put(RM_SMGR_ID, 0x10, main=struct.pack("<IIIi", SPC, DB, REL, FSM))
    commit = wal.put(RM_XACT_ID, 0x80, main=commit_main(rels=(RN,)), xid=800)
    assert list_rels(timeline, SPC, DB, commit.end_lsn) == []
    assert get_rel_size(timeline, SPC, DB, REL, MAIN, commit.end_lsn) is None
    assert get_rel_size(timeline, SPC, DB, REL, FSM, commit.end_lsn) is None
    with pytest.raises(NotFound):
        materialize(timeline, rel_block_key(SPC, DB, REL, MAIN, 0), commit.end_lsn)
    assert list_rels(timeline, SPC, DB, commit.lsn) == [(REL, MAIN), (REL, FSM)]


# --- SLRUs and transactions -------------------------------------------------------------------


def test_clog_commit_abort_with_subxacts(timeline: Timeline) -> None:
    wal = Wal(timeline)
    zero = wal.put(RM_CLOG_ID, 0x00, main=struct.pack("<i", 0))
    assert list_slru_segments(timeline, SlruKind.CLOG, zero.end_lsn) == [0]
    assert get_slru_segment_size(timeline, SlruKind.CLOG, 0, zero.end_lsn) == 1
    assert get_slru_page(timeline, SlruKind.CLOG, 0, 0, zero.end_lsn) == bytes(8192)
    commit = wal.put(RM_XACT_ID, 0x80, main=commit_main((1001, 40000)), xid=1000)
    abort = wal.put(RM_XACT_ID, 0x20, main=struct.pack("<q", 0), xid=1002)
    page0 = get_slru_page(timeline, SlruKind.CLOG, 0, 0, abort.end_lsn)
    assert [clog_get_status(page0, x) for x in (999, 1000, 1001, 1002)] == [0, 1, 1, 2]
    page1 = get_slru_page(timeline, SlruKind.CLOG, 0, 1, commit.end_lsn)
    assert clog_get_status(page1, 40000) == 1
    assert get_slru_segment_size(timeline, SlruKind.CLOG, 0, commit.end_lsn) == 2
    before = get_slru_page(timeline, SlruKind.CLOG, 0, 0, commit.lsn)
    assert clog_get_status(before, 1000) == 0
    checkpoint = get_checkpoint(timeline, abort.end_lsn)
    assert checkpoint is not None and checkpoint.next_xid == 40960


def test_multixact_create(timeline: Timeline) -> None:
    wal = Wal(timeline)
    wal.put(RM_MULTIXACT_ID, 0x00, main=struct.pack("<i", 0))
    wal.put(RM_MULTIXACT_ID, 0x10, main=struct.pack("<i", 0))
    members = (MultiXactMember(1000, 1), MultiXactMember(1001, 5))
    create = wal.put(RM_MULTIXACT_ID, 0x20, main=struct.pack("<IIi4I", 1, 0, 2, 1000, 1, 1001, 5))
    offsets: dict[int, bytearray] = {}
    member_pages: dict[int, bytearray] = {}
    apply_create(MultiXactCreate(1, 0, members), offsets, member_pages)
    lsn = create.end_lsn
    assert get_slru_page(timeline, SlruKind.MULTIXACT_OFFSETS, 0, 0, lsn) == bytes(offsets[0])
    assert get_slru_page(timeline, SlruKind.MULTIXACT_MEMBERS, 0, 0, lsn) == bytes(member_pages[0])
    checkpoint = get_checkpoint(timeline, lsn)
    assert checkpoint is not None
    assert (checkpoint.next_multi, checkpoint.next_multi_offset) == (2, 2)
    assert checkpoint.next_xid == 1024


def test_two_phase_prepare_and_commit_prepared(timeline: Timeline) -> None:
    wal = Wal(timeline)
    wal.put(RM_CLOG_ID, 0x00, main=struct.pack("<i", 0))
    gid = b"g1\x00\x00\x00\x00\x00\x00"
    head = struct.pack(
        "<IIIIqIiiiiii?xHQq", 0x57F94534, 0, 900, DB, 0, 10, 0, 0, 0, 0, 0, 0, False, 3, 0, 0
    )
    state = head + gid + struct.pack("<I", 0) + b"\x00" * 4  # + end-of-records sentinel
    prepare = wal.put(RM_XACT_ID, 0x10, main=state, xid=900)
    files = get_twophase_files(timeline, prepare.end_lsn)
    assert files == {900: state + struct.pack("<I", crc32c.crc32c(state))}
    assert list_twophase_xids(timeline, prepare.end_lsn) == [900]
    main = struct.pack("<qII", 0, 0x10, 900)  # xinfo HAS_TWOPHASE, twophase xid
    done = wal.put(RM_XACT_ID, 0x30 | 0x80, main=main)
    assert get_twophase_files(timeline, done.end_lsn) == {}
    assert list_twophase_xids(timeline, done.end_lsn) == []
    page = get_slru_page(timeline, SlruKind.CLOG, 0, 0, done.end_lsn)
    assert clog_get_status(page, 900) == 1


# --- databases and metadata -------------------------------------------------------------------


def test_relmap_and_database_copy_and_drop(timeline: Timeline) -> None:
    wal = Wal(timeline)
    relmap = bytes(range(256)) * 2
    rec = wal.put(RM_RELMAP_ID, 0x00, main=struct.pack("<IIi", DB, SPC, 512) + relmap)
    assert get_relmap(timeline, SPC, DB, rec.end_lsn) == relmap
    assert (SPC, DB) in list_dbs(timeline, rec.end_lsn)
    heap_insert(wal, 0, 1, 1, init=True)
    copy = wal.put(RM_DBASE_ID, 0x00, main=struct.pack("<IIII", 6, SPC, DB, SPC))
    lsn = copy.end_lsn
    assert list_dbs(timeline, lsn) == [(SPC, DB), (SPC, 6)]
    assert list_rels(timeline, SPC, 6, lsn) == [(REL, MAIN)]
    assert get_relmap(timeline, SPC, 6, lsn) == relmap
    assert get_rel_size(timeline, SPC, 6, REL, MAIN, lsn) == 1
    src = materialize(timeline, rel_block_key(SPC, DB, REL, MAIN, 0), lsn)
    assert materialize(timeline, rel_block_key(SPC, 6, REL, MAIN, 0), lsn) == src
    # The copy is independent: later changes of the source do not show in it.
    ins = heap_insert(wal, 0, 2, 2)
    assert max_offset(materialize(timeline, rel_block_key(SPC, 6, REL, MAIN, 0), ins.end_lsn)) == 1
    wal_log = wal.put(RM_DBASE_ID, 0x10, main=struct.pack("<II", 7, SPC))
    assert (SPC, 7) in list_dbs(timeline, wal_log.end_lsn)
    drop = wal.put(RM_DBASE_ID, 0x20, main=struct.pack("<Ii", 6, 1) + struct.pack("<I", SPC))
    lsn = drop.end_lsn
    assert list_dbs(timeline, lsn) == [(SPC, DB), (SPC, 7)]
    assert list_rels(timeline, SPC, 6, lsn) == []
    assert get_rel_size(timeline, SPC, 6, REL, MAIN, lsn) is None
    assert get_relmap(timeline, SPC, 6, lsn) is None


def test_tablespaces_are_tracked_with_their_locations(timeline: Timeline) -> None:
    """CREATE TABLESPACE records put the location in the history; relations in a tablespace
    are keyed by its OID; DROP TABLESPACE removes it and what is left of its directories."""
    wal = Wal(timeline)
    ts_abs, ts_in_place = 16400, 16401
    wal.put(RM_TBLSPC_ID, 0x00, main=struct.pack("<I", ts_abs) + b"/srv/ts1\0")
    created = wal.put(RM_TBLSPC_ID, 0x00, main=struct.pack("<I", ts_in_place) + b"\0")
    assert get_tablespaces(timeline, created.end_lsn) == {ts_abs: "/srv/ts1", ts_in_place: ""}
    rn = RelFileNode(ts_abs, DB, REL)
    wal.put(RM_SMGR_ID, 0x10, main=struct.pack("<IIIi", ts_abs, DB, REL, MAIN))
    ins = heap_insert(wal, 0, 1, 42, init=True, rnode=rn)
    assert (ts_abs, DB) in list_dbs(timeline, ins.end_lsn)
    assert list_rels(timeline, ts_abs, DB, ins.end_lsn) == [(REL, MAIN)]
    page = materialize(timeline, rel_block_key(ts_abs, DB, REL, MAIN, 0), ins.end_lsn)
    assert max_offset(page) == 1
    # A restarted ingest reloads the map from the timeline.
    wal.ingest = WalIngest(timeline)
    wal.put(RM_XACT_ID, 0x80, main=commit_main(rels=(rn,)), xid=900)
    drop = wal.put(RM_TBLSPC_ID, 0x10, main=struct.pack("<I", ts_abs))
    assert get_tablespaces(timeline, drop.end_lsn) == {ts_in_place: ""}
    assert (ts_abs, DB) not in list_dbs(timeline, drop.end_lsn)
    # The history still knows it before the drop.
    assert get_tablespaces(timeline, drop.lsn)[ts_abs] == "/srv/ts1"
    assert (ts_abs, DB) in list_dbs(timeline, drop.lsn)


def test_checkpoint_counters_and_restart(timeline: Timeline) -> None:
    wal = Wal(timeline)
    wal.put(RM_XLOG_ID, 0x30, main=struct.pack("<I", 24576))  # NEXTOID
    wal.put(RM_STANDBY_ID, 0x10, main=struct.pack("<ii?3xIII", 0, 0, False, 750, 740, 739))
    online = EMPTY_CHECKPOINT.pack()
    rec = wal.put(RM_XLOG_ID, 0x10, main=online)
    checkpoint = get_checkpoint(timeline, rec.end_lsn)
    assert checkpoint is not None
    assert checkpoint.next_oid == 24576  # an online checkpoint does not move nextOid back
    heap_insert(wal, 0, 1, 1, init=True)
    heap_insert(wal, 0, 2, 2)
    # A new WalIngest (restart) reloads directories, sizes and counters from the timeline.
    restarted = WalIngest(timeline)
    assert restarted.checkpoint == wal.ingest.checkpoint
    wal.ingest = restarted
    rec = heap_insert(wal, 1, 1, 3, init=True)
    assert get_rel_size(timeline, SPC, DB, REL, MAIN, rec.end_lsn) == 2
    assert list_rels(timeline, SPC, DB, rec.end_lsn) == [(REL, MAIN)]
    # Records the timeline already has are skipped.
    assert not restarted.ingest_record(rec)


def test_unknown_rmgr_and_unsupported_redo(timeline: Timeline) -> None:
    wal = Wal(timeline)
    heap_insert(wal, 0, 1, 1, init=True)
    rec = wal.put(200, 0x00, blocks=(block(0, 0, data=b"x"),))  # a custom rmgr
    key = rel_block_key(SPC, DB, REL, MAIN, 0)
    with pytest.raises(UnsupportedRecord):
        materialize(timeline, key, rec.end_lsn)
    assert max_offset(materialize(timeline, key, rec.lsn)) == 1
    assert slru_block_key(SlruKind.CLOG, 0, 0) != key


# --- import -----------------------------------------------------------------------------------


def test_record_end_lsn_across_pages() -> None:
    assert record_end_lsn(0x1000028, 114, 16 << 20) == 0x1000028 + 120
    # 100 bytes fit before the page end, 14 continue after a 24-byte short header.
    assert record_end_lsn(0x2000 - 100, 114, 16 << 20) == 0x2000 + 24 + 16
    # Across a segment boundary the continuation page has a 40-byte long header.
    assert record_end_lsn((16 << 20) - 100, 114, 16 << 20) == (16 << 20) + 40 + 16


def test_import_refuses_dangling_tablespaces_and_running_servers(
    pg_cluster: PgTestCluster, tmp_path: Path
) -> None:
    server = pg_cluster.create(start=False)
    lsn = import_lsn_of(server.datadir)
    link = server.datadir / "pg_tblspc" / "99999"
    link.symlink_to(tmp_path / "gone")
    store = TimelineStore(tmp_path / "store")
    try:
        with pytest.raises(InvalidArgument, match="99999 is a dangling symlink"):
            import_datadir(store.create_timeline(), server.datadir)
        link.unlink()
        tl = store.create_timeline()
        assert import_datadir(tl, server.datadir) == lsn == tl.last_record_lsn
        assert (1664, 0) in list_dbs(tl, lsn) and len(list_dbs(tl, lsn)) == 4
        with pytest.raises(Conflict, match="not empty"):
            import_datadir(tl, server.datadir)
        server.start()
        with pytest.raises(Conflict, match="not shut down cleanly"):
            import_datadir(store.create_timeline(), server.datadir)
    finally:
        store.close()


def test_reconstruct_is_the_compaction_callback(timeline: Timeline) -> None:
    wal = Wal(timeline)
    wal.put(RM_CLOG_ID, 0x00, main=struct.pack("<i", 0))
    heap_insert(wal, 0, 1, 1, init=True)
    heap_insert(wal, 0, 2, 2)
    last = wal.put(RM_XACT_ID, 0x00, main=struct.pack("<q", 0), xid=700)
    key = rel_block_key(SPC, DB, REL, MAIN, 0)
    page = materialize(timeline, key, last.end_lsn)
    clog = get_slru_page(timeline, SlruKind.CLOG, 0, 0, last.end_lsn)
    timeline.freeze_and_flush()
    assert create_image_layers(timeline, reconstruct, force=True) > 0
    data = timeline.get_reconstruct_data(key, last.end_lsn)
    assert data.image is not None and not data.deltas
    assert materialize(timeline, key, last.end_lsn) == page
    assert get_slru_page(timeline, SlruKind.CLOG, 0, 0, last.end_lsn) == clog


def test_redo_pool_matches_inline_redo(timeline: Timeline) -> None:
    """Long chains replayed in worker processes give the very page inline redo gives."""
    from pageserver.reconstruct.redo_pool import RedoPool

    wal = Wal(timeline)
    last = heap_insert(wal, 0, 1, 0, init=True)
    for i in range(2, 30):
        last = heap_insert(wal, 0, i, i)
    key = rel_block_key(SPC, DB, REL, MAIN, 0)
    assert len(timeline.get_reconstruct_data(key, last.end_lsn).deltas) == 29
    pool = RedoPool(workers=1, inline_max=0)
    try:
        pooled = materialize(timeline, key, last.end_lsn, pool.reconstruct)
        assert pool._executor is not None  # the chain really went to a worker
    finally:
        pool.close()
    assert pooled == materialize(timeline, key, last.end_lsn)
    assert max_offset(pooled) == 29
