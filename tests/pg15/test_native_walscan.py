"""The C fast paths (pg15/_walscan.c) against the pure-Python reader and decoder.

The Python implementation is the reference (itself checked against pg_waldump in
test_waldump_oracle). Here both run over the same real WAL, fed in different chunk sizes, and
over damaged copies of it: records, end of WAL and error messages must be identical.
"""

from __future__ import annotations

import contextlib
import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from crc32c import crc32c
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pg15 import xlog_reader
from pg15.lsn import DEFAULT_SEGMENT_SIZE as SEG
from pg15.lsn import parse_lsn, parse_segment_file_name
from pg15.native import walscan
from pg15.records import (
    DecodedRecord,
    RecordDecodeError,
    decode_record_python,
)
from pg15.xlog_reader import RawRecord, WalReader, record_crc
from proto.errors import CorruptData
from tests.native_ext import require_c_extension
from tests.pg15.test_records import build_record
from tests.pgtest import PgTestCluster

FIXTURE_OK = [HealthCheck.function_scoped_fixture]  # real_wal is module-scoped and read-only


@pytest.fixture
def c_extension() -> None:
    require_c_extension(walscan, "pg15._walscan")


needs_native = pytest.mark.usefixtures("c_extension")


@contextlib.contextmanager
def pure_python_reader() -> Iterator[None]:
    saved = xlog_reader._native_scan
    xlog_reader._native_scan = None
    try:
        yield
    finally:
        xlog_reader._native_scan = saved


@dataclass
class ReadOutcome:
    records: list[RawRecord]
    end: object
    error: str | None


def read_stream(
    start: int, chunks: list[bytes], native: bool, batches: bool = False
) -> ReadOutcome:
    """Feed the chunks in order, collecting records until the end of WAL or an error."""
    ctx = contextlib.nullcontext() if native else pure_python_reader()
    reader = WalReader(start)
    out: list[RawRecord] = []
    with ctx:
        try:
            for chunk in chunks:
                reader.feed(chunk)
                if batches:
                    while batch := reader.read_batch():
                        out.extend(batch)
                else:
                    out.extend(reader.records())
        except CorruptData as exc:
            return ReadOutcome(out, reader.end_of_wal, str(exc))
    return ReadOutcome(out, reader.end_of_wal, None)


def decode_outcome(decode: object, raw: RawRecord) -> DecodedRecord | str:
    try:
        return decode(raw)  # type: ignore[operator,no-any-return]
    except RecordDecodeError as exc:
        return f"error: {exc}"


def split(data: bytes, sizes: list[int]) -> list[bytes]:
    chunks, pos, i = [], 0, 0
    while pos < len(data):
        step = sizes[i % len(sizes)] if sizes else len(data)
        chunks.append(data[pos : pos + step])
        pos += step
        i += 1
    return chunks


# ---- real WAL ------------------------------------------------------------------------------

WORKLOAD = """
CREATE TABLE t (a int PRIMARY KEY, b text, c int[]);
INSERT INTO t SELECT g, repeat(md5(g::text), g % 40), ARRAY[g, g + 1]
  FROM generate_series(1, 30000) g;
CREATE INDEX ON t USING gin (c);
BEGIN;
SAVEPOINT s1; UPDATE t SET b = 'x' WHERE a % 7 = 0;
SAVEPOINT s2; DELETE FROM t WHERE a % 11 = 0; ROLLBACK TO s2;
RELEASE s1;
COMMIT;
CREATE TABLE wide AS SELECT g AS a, repeat('z', 3000) AS b FROM generate_series(1, 300) g;
VACUUM t;
"""


@dataclass(frozen=True)
class RealWal:
    start: int
    stream: bytes


@pytest.fixture(scope="module")
def real_wal(pg_cluster_module: PgTestCluster) -> RealWal:
    server = pg_cluster_module.create(
        {"wal_keep_size": "1GB", "wal_compression": "lz4", "wal_consistency_checking": "all"}
    )
    start = parse_lsn(server.psql("SELECT pg_current_wal_insert_lsn()")) // SEG * SEG
    server.psql(WORKLOAD)
    server.psql("CHECKPOINT")
    server.psql("UPDATE t SET b = b || 'y' WHERE a % 13 = 0")
    end = parse_lsn(server.psql("SELECT pg_current_wal_insert_lsn()"))
    server.psql("SELECT pg_switch_wal()")
    files = []
    for path in sorted(server.wal_dir.iterdir()):
        with contextlib.suppress(Exception):
            _, segno, _ = parse_segment_file_name(path.name)
            if start // SEG <= segno <= end // SEG:
                files.append(path)
    assert len(files) >= 2  # records spanning a segment boundary are covered
    return RealWal(start, b"".join(p.read_bytes() for p in files))


@needs_native
def test_native_module_is_used() -> None:
    from pg15 import records

    assert records.decode_record is walscan.decode_record  # type: ignore[union-attr]
    assert xlog_reader._native_scan is walscan.scan  # type: ignore[union-attr]


@needs_native
def test_crc_matches_the_reference() -> None:
    rng = random.Random(3)
    for n in (0, 1, 7, 8, 9, 63, 64, 1000, 8192):
        data = rng.randbytes(n)
        assert walscan.crc32c(data) == crc32c(data)  # type: ignore[union-attr]
        assert walscan.crc32c(data, 0x1234) == crc32c(data, 0x1234)  # type: ignore[union-attr]


@needs_native
@pytest.mark.parametrize("sizes", [[], [131072], [8192, 24, 100000], [1, 13, 8191, 40000]])
def test_reader_and_decoder_equal_on_real_wal(real_wal: RealWal, sizes: list[int]) -> None:
    chunks = split(real_wal.stream, sizes)
    native = read_stream(real_wal.start, chunks, native=True)
    pure = read_stream(real_wal.start, chunks, native=False)
    assert native.error is None and pure.error is None
    assert native.records == pure.records
    assert native.end == pure.end
    assert len(native.records) > 5000
    for native_mode in (True, False):
        batched = read_stream(real_wal.start, chunks, native=native_mode, batches=True)
        assert (batched.records, batched.end, batched.error) == (pure.records, pure.end, None)

    decoded = [walscan.decode_record(r) for r in native.records]  # type: ignore[union-attr]
    assert decoded == [decode_record_python(r) for r in native.records]
    assert all(type(d) is DecodedRecord for d in decoded)
    # The shapes the C decoder must get right are all in this WAL.
    blocks = [b for d in decoded for b in d.blocks]
    assert any(len(d.main_data) > 255 for d in decoded)
    assert any(b.image is not None and b.image.hole_length for b in blocks)
    assert any(b.image is not None and b.image.compression == "lz4" for b in blocks)
    assert any(b.image is not None and not b.image.apply for b in blocks)
    assert any(len(d.blocks) > 1 and d.blocks[1].fork_flags & 0x80 for d in decoded)
    assert any(r.lsn // 8192 != (r.end_lsn - 1) // 8192 for r in native.records)
    assert any(r.lsn // SEG != (r.end_lsn - 1) // SEG for r in native.records)
    assert any(8192 - r.lsn % 8192 < 24 for r in native.records)  # header split by a page


@needs_native
def test_fast_path_takes_every_ordinary_record(real_wal: RealWal) -> None:
    """The C path must handle every record but XLOG_SWITCH itself, from its start (headers
    split by a page, spanning pages and segments): falling back to Python would be correct
    but slow, so the equality tests alone would not notice."""
    reader = WalReader(real_wal.start)
    reader.feed(real_wal.stream)
    records = list(reader.records())
    assert reader.system_id is not None
    for prev, rec in itertools.pairwise(records):
        if prev.data[17] == 0 and prev.data[16] & 0xF0 == 0x40:
            continue  # after a switch the reader skips the padding first
        is_switch = rec.data[17] == 0 and rec.data[16] & 0xF0 == 0x40
        got = walscan.scan(  # type: ignore[union-attr]
            real_wal.stream, real_wal.start, prev.end_lsn, prev.lsn, SEG, reader.system_id, 1, 1
        )
        assert got == ([] if is_switch else [rec]), hex(rec.lsn)


@needs_native
@settings(max_examples=150, deadline=None, suppress_health_check=FIXTURE_OK)
@given(data=st.data())
def test_damaged_wal_gives_the_same_outcome(real_wal: RealWal, data: st.DataObject) -> None:
    """Flipped bytes and truncation: the same records, then the same error or end of WAL."""
    window = data.draw(st.integers(1, 24), label="window") * 65536
    stream = bytearray(real_wal.stream[:window])
    for _ in range(data.draw(st.integers(0, 3), label="flips")):
        at = data.draw(st.integers(0, len(stream) - 1))
        stream[at] ^= data.draw(st.integers(1, 255))
    cut = data.draw(st.integers(len(stream) // 2, len(stream)), label="cut")
    sizes = data.draw(st.lists(st.integers(1, 200000), max_size=4), label="chunk sizes")
    chunks = split(bytes(stream[:cut]), sizes)
    native = read_stream(real_wal.start, chunks, native=True)
    pure = read_stream(real_wal.start, chunks, native=False)
    assert native.records == pure.records
    assert native.error == pure.error
    assert native.end == pure.end
    batched = read_stream(real_wal.start, chunks, native=True, batches=True)
    assert (batched.records, batched.error, batched.end) == (pure.records, pure.error, pure.end)


@needs_native
@settings(max_examples=300, deadline=None, suppress_health_check=FIXTURE_OK)
@given(data=st.data())
def test_damaged_records_decode_the_same(real_wal: RealWal, data: st.DataObject) -> None:
    """Record bodies with flipped bytes (CRC fixed up, as a buggy writer would make them)."""
    reader = WalReader(real_wal.start)
    reader.feed(real_wal.stream[: 4 * 65536])
    records = list(reader.records())
    raw = data.draw(st.sampled_from(records))
    body = bytearray(raw.data)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(body) - 1))
        body[at] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans(), label="truncate"):
        body = body[: data.draw(st.integers(0, len(body)))]
    if len(body) >= 24:
        body[20:24] = record_crc(bytes(body)).to_bytes(4, "little")
    damaged = RawRecord(raw.lsn, raw.end_lsn, bytes(body))
    assert decode_outcome(walscan.decode_record, damaged) == decode_outcome(  # type: ignore[union-attr]
        decode_record_python, damaged
    )


block_dicts = st.fixed_dictionaries(
    {
        "rnode": st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 3), st.integers(0, 3)),
        "fork": st.integers(0, 3),
        "blkno": st.integers(0, 2**32 - 1),
        "data": st.binary(max_size=300),
        "will_init": st.booleans(),
        "same_rel": st.booleans(),
    }
)


@needs_native
@settings(max_examples=300, deadline=None)
@given(
    blocks=st.lists(block_dicts, max_size=5),
    main=st.binary(max_size=600),
    origin=st.none() | st.integers(0, 65535),
    toplevel=st.none() | st.integers(0, 2**32 - 1),
    info=st.integers(0, 255),
    rmid=st.integers(0, 21),
)
def test_synthetic_records_decode_the_same(
    blocks: list[dict[str, object]],
    main: bytes,
    origin: int | None,
    toplevel: int | None,
    info: int,
    rmid: int,
) -> None:
    """Origins, top-level xids and SAME_REL chains, which real replica-level WAL lacks."""
    for i, b in enumerate(blocks):
        b["id"] = i * 2
        if i == 0:
            b["same_rel"] = False
        elif b["same_rel"]:
            b["rnode"] = blocks[i - 1]["rnode"]
    body = build_record(
        rmid, info, xid=7, prev=99, blocks=blocks, main=main, origin=origin, toplevel_xid=toplevel
    )
    raw = RawRecord(1 << 24, (1 << 24) + len(body), body)
    native = decode_outcome(walscan.decode_record, raw)  # type: ignore[union-attr]
    assert native == decode_outcome(decode_record_python, raw)
    assert not isinstance(native, str)
    assert native.origin == origin and native.toplevel_xid == toplevel


@needs_native
def test_image_header_edge_cases_decode_the_same() -> None:
    """Every combination of image-header corner values: same record or same error."""
    import struct

    seen_ok = seen_error = 0
    for bimg_info in (0, 1, 2, 3, 4, 5, 8, 9, 0x10, 0x11, 0x17):
        for bimg_len in (0, 1, 100, 8191, 8192, 8193, 9000):
            for hole_offset in (0, 1, 4000, 8191, 8192, 9000):
                for hole_length in (0, 1, 4000, 8192):
                    head = struct.pack("<BBH", 0, 0x10, 0)
                    head += struct.pack("<HHB", bimg_len, hole_offset, bimg_info)
                    if bimg_info & 0x1C and bimg_info & 1:
                        head += struct.pack("<H", hole_length)
                    head += struct.pack("<IIII", 1663, 5, 16384, 0) + bytes([255, 3])
                    body = head + bytes(bimg_len) + b"abc"
                    tot = 24 + len(body)
                    rec = bytearray(struct.pack("<IIQBBxxI", tot, 1, 2, 0, 10, 0) + body)
                    raw = RawRecord(1 << 24, (1 << 24) + tot, bytes(rec))
                    py = decode_outcome(decode_record_python, raw)
                    assert decode_outcome(walscan.decode_record, raw) == py  # type: ignore[union-attr]
                    if isinstance(py, str):
                        seen_error += 1
                    else:
                        seen_ok += 1
    assert seen_ok > 50 and seen_error > 500


def test_pure_python_switch(tmp_path: Path) -> None:
    """NEON_PURE_PYTHON=1 turns the C module off (the way to compare or to rule it out)."""
    import subprocess
    import sys

    code = "from pg15.native import walscan; print(walscan is None)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={"NEON_PURE_PYTHON": "1", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.stdout.strip() == "True"
