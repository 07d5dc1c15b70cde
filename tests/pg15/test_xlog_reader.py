"""Unit tests of the sans-I/O WAL reader over synthetic WAL laid out like PostgreSQL writes it."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pg15.lsn import format_lsn, segment_file_name
from pg15.records import decode_record
from pg15.xlog_reader import (
    XLP_BKP_REMOVABLE,
    XLP_FIRST_IS_CONTRECORD,
    XLP_FIRST_IS_OVERWRITE_CONTRECORD,
    XLP_LONG_HEADER,
    RawRecord,
    WalCorrupt,
    WalReader,
    maxalign,
)
from proto.errors import CorruptData
from tests.pg15.test_records import build_record

BLCKSZ = 8192
SEG = 1 << 20  # the smallest legal segment size keeps the streams small
SYSID = 7311482154191758973


class WalWriter:
    """Lays records out into pages the way CopyXLogRecordToWAL does (test oracle)."""

    def __init__(self, start: int, seg_size: int = SEG, tli: int = 1) -> None:
        assert start % seg_size == 0
        self.start = start
        self.seg_size = seg_size
        self.tli = tli
        self.out = bytearray()
        self.prev = 0
        self.records: list[RawRecord] = []

    @property
    def lsn(self) -> int:
        return self.start + len(self.out)

    def _page_header(self, rem_len: int, extra_info: int = 0, pageaddr: int | None = None) -> None:
        addr = self.lsn if pageaddr is None else pageaddr
        info = XLP_BKP_REMOVABLE | extra_info | (XLP_FIRST_IS_CONTRECORD if rem_len else 0)
        if self.lsn % self.seg_size == 0:
            info |= XLP_LONG_HEADER
            self.out += struct.pack("<HHIQI4x", 0xD110, info, self.tli, addr, rem_len)
            self.out += struct.pack("<QII", SYSID, self.seg_size, BLCKSZ)
        else:
            self.out += struct.pack("<HHIQI4x", 0xD110, info, self.tli, addr, rem_len)

    def add(
        self,
        body_len: int = 30,
        rmid: int = 10,
        info: int = 0,
        prev: int | None = None,
        stop_after: int | None = None,
    ) -> RawRecord:
        """Append a record whose main data is `body_len` bytes (the part after its header)."""
        if self.lsn % BLCKSZ == 0:
            self._page_header(0)
        lsn = self.lsn
        main = bytes((lsn + i) % 251 for i in range(body_len)) if body_len else b""
        data = build_record(
            rmid, info, xid=lsn % 1000, prev=self.prev if prev is None else prev, main=main
        )
        rest = data
        written = 0
        while rest:
            if self.lsn % BLCKSZ == 0:
                self._page_header(len(rest))
            room = BLCKSZ - self.lsn % BLCKSZ
            piece = rest[:room]
            if stop_after is not None and written + len(piece) > stop_after:
                self.out += piece[: stop_after - written]
                raise _Stopped(lsn)
            self.out += piece
            written += len(piece)
            rest = rest[room:]
        self.out += bytes(maxalign(self.lsn) - self.lsn)
        self.prev = lsn
        raw = RawRecord(lsn, self.lsn, data)
        self.records.append(raw)
        return raw

    def switch(self) -> RawRecord:
        raw = self.add(body_len=0, rmid=0, info=0x40)
        seg_end = -(-self.lsn // self.seg_size) * self.seg_size
        self.out += bytes(seg_end - self.lsn)
        raw = RawRecord(raw.lsn, seg_end, raw.data)
        self.records[-1] = raw
        return raw

    def _end_of(self, tot: int) -> int:
        """Where a record of `tot` bytes starting at the current position would end."""
        pos = self.lsn
        if pos % BLCKSZ == 0:
            pos += 40 if pos % self.seg_size == 0 else 24
        rest = tot
        while True:
            room = BLCKSZ - pos % BLCKSZ
            if rest <= room:
                return maxalign(pos + rest)
            rest -= room
            pos += room
            pos += 40 if pos % self.seg_size == 0 else 24

    def pad_to(self, lsn: int) -> None:
        """Add one record that ends exactly at `lsn` (8-aligned, past a page header)."""
        tot = lsn - self.lsn
        while tot >= 24 and self._end_of(tot) > lsn:
            tot -= 8
        assert tot >= 24 and self._end_of(tot) == lsn, format_lsn(lsn)
        body = 0 if tot == 24 else tot - 26 if tot <= 281 else tot - 29
        self.add(body_len=body)
        assert self.lsn == lsn

    def zero_page_rest(self) -> None:
        self.out += bytes(-len(self.out) % BLCKSZ)


class _Stopped(Exception):
    pass


def read_all(reader: WalReader, data: bytes, chunks: list[int] | None = None) -> list[RawRecord]:
    out: list[RawRecord] = []
    pos = 0
    sizes = iter(chunks or [])
    while pos < len(data):
        step = next(sizes, len(data) - pos)
        reader.feed(data[pos : pos + step])
        pos += step
        out.extend(reader.records())
    return out


def mixed_stream(sizes: list[int], start: int = 0x2000000) -> WalWriter:
    w = WalWriter(start)
    for size in sizes:
        w.add(body_len=size)
    return w


def test_records_spanning_pages_and_segments_with_exact_end_lsns() -> None:
    w = WalWriter(0x3000000)
    w.add(30)
    w.add(20000)  # spans three pages
    w.pad_to(0x3000000 + SEG - BLCKSZ + 104)
    w.add(3 * BLCKSZ)  # crosses into the next segment (long header mid-record)
    w.add(5)
    w.zero_page_rest()
    reader = WalReader(0x3000000, SEG)
    got = read_all(reader, bytes(w.out))
    assert got == w.records
    crossing = next(r for r in got if r.lsn // SEG != (r.end_lsn - 1) // SEG)
    assert crossing.end_lsn > 0x3000000 + SEG
    assert reader.system_id == SYSID
    assert reader.end_of_wal is not None and reader.end_of_wal.lsn == w.records[-1].end_lsn
    assert reader.end_of_wal.reason == "zero record length"
    for raw in got:
        assert decode_record(raw).main_data == bytes(
            (raw.lsn + i) % 251
            for i in range(len(raw.data) - 24 - (2 if len(raw.data) - 24 - 2 <= 255 else 5))
        )


def test_end_lsn_is_page_boundary_when_record_fills_the_page() -> None:
    w = WalWriter(0x1000000)
    w.pad_to(0x1000000 + BLCKSZ - 64)
    filler = w.add(body_len=64 - 24 - 2)  # exactly to the page end
    nxt = w.add(10)
    assert filler.end_lsn == 0x1000000 + BLCKSZ
    assert nxt.lsn == filler.end_lsn + 24
    got = read_all(WalReader(0x1000000, SEG), bytes(w.out))
    assert got[-2:] == [filler, nxt]


def test_record_header_split_across_pages() -> None:
    w = WalWriter(0x1000000)
    w.pad_to(0x1000000 + BLCKSZ - 8)  # only xl_tot_len and xl_xid fit on this page
    split = w.add(40)
    w.zero_page_rest()
    reader = WalReader(0x1000000, SEG)
    got = read_all(reader, bytes(w.out), [BLCKSZ - 4, 1, 3, 10, 25, 10000])
    assert got[-1] == split and split.end_lsn == 0x1000000 + BLCKSZ + 24 + maxalign(66 - 8)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(
        st.one_of(st.integers(0, 300), st.integers(8000, 30000)), min_size=1, max_size=25
    ),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_chunking_yields_the_same_records(sizes: list[int], seed: int) -> None:
    w = mixed_stream(sizes)
    data = bytes(w.out)
    rng = random.Random(seed)
    chunks = [rng.choice([1, 7, 24, 40, 100, 4096, 8192, 20000]) for _ in range(len(data))]
    reader = WalReader(0x2000000, SEG)
    got = read_all(reader, data, chunks)
    assert got == w.records
    assert reader.last_end_lsn == w.records[-1].end_lsn
    assert reader.pending_record_lsn is None


def test_partial_record_is_kept_until_completed() -> None:
    w = mixed_stream([100, 20000, 50])
    data = bytes(w.out)
    reader = WalReader(0x2000000, SEG)
    reader.feed(data[:9000])
    assert list(reader.records()) == w.records[:1]
    assert reader.pending_record_lsn == w.records[1].lsn
    reader.feed(data[9000:])
    assert list(reader.records()) == w.records[1:]


def test_xlog_switch_skips_the_zero_padding() -> None:
    w = WalWriter(0x4000000)
    w.add(10)
    switch = w.switch()
    after = w.add(10)
    assert switch.end_lsn == 0x4000000 + SEG
    assert after.lsn == 0x4000000 + SEG + 40
    got = read_all(WalReader(0x4000000, SEG), bytes(w.out), [5000] * 1000)
    assert got == w.records


def test_start_inside_a_continued_record_skips_its_tail() -> None:
    w = WalWriter(0x5000000)
    w.pad_to(0x5000000 + SEG - 200)
    w.add(3 * BLCKSZ)  # continues over the first pages of the next segment
    w.add(40)
    w.add(41)
    seg2 = bytes(w.out[SEG:])
    reader = WalReader(0x5000000 + SEG, SEG)
    got = read_all(reader, seg2, [333] * 1000)
    assert got == w.records[-2:]


def test_start_at_a_record_boundary_mid_page() -> None:
    w = mixed_stream([10, 20, 30, 40])
    third = w.records[2]
    reader = WalReader(third.lsn, SEG, prev_lsn=w.records[1].lsn)
    got = read_all(reader, bytes(w.out[third.lsn - w.start :]))
    assert got == w.records[2:]


def test_end_of_wal_on_recycled_page() -> None:
    w = WalWriter(0x1000000)
    w.pad_to(0x1000000 + BLCKSZ - 40)
    last = w.add(10)
    assert last.end_lsn == 0x1000000 + BLCKSZ
    w.zero_page_rest()
    # The next page still holds an old segment's page: valid magic, stale pageaddr.
    w._page_header(0, pageaddr=w.lsn - 16 * SEG)
    w.out += b"\x55" * 100
    reader = WalReader(0x1000000, SEG)
    got = read_all(reader, bytes(w.out))
    assert got[-1] == last
    assert reader.end_of_wal is not None and "pageaddr" in reader.end_of_wal.reason
    assert reader.end_of_wal.lsn == 0x1000000 + BLCKSZ


def test_end_of_wal_when_a_continuation_page_is_missing() -> None:
    w = WalWriter(0x1000000)
    w.add(10)
    with pytest.raises(_Stopped):
        w.add(20000, stop_after=9000)
    torn = w.lsn
    w.zero_page_rest()
    w.out += bytes(BLCKSZ)
    reader = WalReader(0x1000000, SEG)
    got = read_all(reader, bytes(w.out))
    assert got == w.records[:1]
    assert reader.end_of_wal is not None and reader.end_of_wal.lsn == w.records[0].end_lsn
    assert torn > reader.end_of_wal.lsn


def test_end_of_wal_on_prev_link_mismatch() -> None:
    w = WalWriter(0x1000000)
    w.add(10)
    good = w.add(10)
    w.add(10, prev=0x123)
    w.add(10)
    reader = WalReader(0x1000000, SEG)
    got = read_all(reader, bytes(w.out))
    assert got == w.records[:2]
    assert reader.end_of_wal is not None and reader.end_of_wal.lsn == good.end_lsn
    assert "prev-link" in reader.end_of_wal.reason
    reader.feed(b"more")  # ignored after the end
    assert list(reader.records()) == []


def test_overwrite_contrecord_discards_the_partial_record() -> None:
    w = WalWriter(0x1000000)
    w.add(10)
    with pytest.raises(_Stopped):
        w.add(20000, stop_after=500)
    w.zero_page_rest()
    w._page_header(0, extra_info=XLP_FIRST_IS_OVERWRITE_CONTRECORD)
    w.out += bytes(0)
    replacement = w.add(16, rmid=0, info=0xD0)  # prev = the record before the aborted one
    w.add(10)
    got = read_all(WalReader(0x1000000, SEG), bytes(w.out), [700] * 100)
    assert got == [w.records[0], replacement, w.records[-1]]
    assert replacement.lsn == 0x1000000 + BLCKSZ + 24


def _corrupt(stream: bytes, offset: int, xor: int = 0x40) -> bytes:
    damaged = bytearray(stream)
    damaged[offset] ^= xor
    return bytes(damaged)


def test_crc_mismatch_names_lsn_and_segment_and_stops() -> None:
    w = mixed_stream([10, 20000, 30, 40])
    bad = w.records[1]
    stream = _corrupt(bytes(w.out), bad.lsn - w.start + 24 + 12000)  # inside a later page
    reader = WalReader(w.start, SEG)
    good: list[RawRecord] = []
    with pytest.raises(WalCorrupt) as err:
        for step in range(0, len(stream), 4096):
            reader.feed(stream[step : step + 4096])
            good.extend(reader.records())
    assert good == w.records[:1]
    assert isinstance(err.value, CorruptData)
    message = str(err.value)
    assert format_lsn(bad.lsn) in message and "checksum" in message
    assert segment_file_name(1, bad.lsn // SEG, SEG) in message
    assert err.value.lsn == bad.lsn
    with pytest.raises(WalCorrupt):  # the reader stays failed
        list(reader.records())


@pytest.mark.parametrize(
    ("where", "patch", "message"),
    [
        ("page", lambda b, o: struct.pack_into("<H", b, o, 0xD10D), "invalid magic number D10D"),
        ("page", lambda b, o: struct.pack_into("<H", b, o + 2, 0x0105), "invalid info bits"),
        ("segment", lambda b, o: struct.pack_into("<I", b, o + 32, 1 << 21), "segment size"),
        ("segment", lambda b, o: struct.pack_into("<I", b, o + 36, 4096), "XLOG_BLCKSZ"),
        ("segment", lambda b, o: struct.pack_into("<H", b, o + 2, 0x0004), "long header"),
        ("cont", lambda b, o: struct.pack_into("<I", b, o + 16, 77), "contrecord length"),
        ("cont", lambda b, o: struct.pack_into("<H", b, o + 2, 0x0004), "no contrecord flag"),
    ],
)
def test_invalid_page_headers_raise(where: str, patch: object, message: str) -> None:
    w = WalWriter(0x6000000)
    w.pad_to(0x6000000 + SEG - 2 * BLCKSZ - 1000)
    w.add(3 * BLCKSZ)  # continuation pages, then a segment boundary mid-record
    w.add(20)
    w.add(20)
    data = bytearray(w.out)
    offset = {"page": 3 * BLCKSZ, "segment": SEG, "cont": SEG - BLCKSZ}[where]
    assert callable(patch)
    patch(data, offset)
    reader = WalReader(0x6000000, SEG)
    with pytest.raises(WalCorrupt, match=message) as err:
        read_all(reader, bytes(data))
    assert format_lsn(0x6000000 + offset) in str(err.value)
    assert segment_file_name(1, (0x6000000 + offset) // SEG, SEG) in str(err.value)


def test_system_identifier_mismatch_raises() -> None:
    w = mixed_stream([10])
    with pytest.raises(WalCorrupt, match="different database system"):
        read_all(WalReader(w.start, SEG, system_id=SYSID + 1), bytes(w.out))


def test_invalid_record_lengths_and_rmgr() -> None:
    w = mixed_stream([10, 10])
    second = w.records[1].lsn - w.start
    short = bytearray(w.out)
    struct.pack_into("<I", short, second, 12)
    with pytest.raises(WalCorrupt, match="invalid record length 12"):
        read_all(WalReader(w.start, SEG), bytes(short))
    bad_rmgr = bytearray(w.out)
    bad_rmgr[second + 17] = 60
    with pytest.raises(WalCorrupt, match="resource manager ID 60"):
        read_all(WalReader(w.start, SEG), bytes(bad_rmgr))


def test_zero_page_at_segment_start_is_end_of_wal() -> None:
    reader = WalReader(0x1000000, SEG)
    reader.feed(bytes(BLCKSZ))
    assert list(reader.records()) == []
    assert reader.end_of_wal is not None and reader.end_of_wal.lsn == 0x1000000


def test_constructor_validates_arguments() -> None:
    with pytest.raises(CorruptData):
        WalReader(0, 3 * SEG)
    with pytest.raises(CorruptData):
        WalReader(0x1000003, SEG)
