"""The pieces of a stopped node's WAL tail (pageserver/follow/wal_tail.py) over WAL laid out as
PostgreSQL writes it (tests/pg15/test_xlog_reader.py's WalWriter): where the valid WAL ends,
where a second reader takes a stream up, the node's segment files read, the archive appended.
The whole path on a real server is tests/e2e/test_checkout_wal_tail.py."""

from __future__ import annotations

import fcntl
import os
import random
from pathlib import Path

import pytest

from pageserver.follow import wal_tail
from pageserver.follow.wal_tail import append_tail, locked_archive, pg_wal_bytes, valid_end
from pg15.lsn import segment_file_name
from pg15.xlog_reader import WalReader
from proto.errors import CorruptData, Unavailable
from tests.pg15.test_xlog_reader import SEG, WalWriter, _corrupt, _Stopped, read_all
from walreceiver.archive import WalArchive
from walreceiver.receiver import LOCK_FILE

START = 0x3000000


def stream(sizes: list[int]) -> WalWriter:
    w = WalWriter(START)
    for size in sizes:
        w.add(body_len=size)
    return w


def chunks(data: bytes, start: int, sizes: list[int]) -> list[tuple[int, bytes]]:
    out, pos = [], 0
    for size in [*sizes, len(data)]:
        if pos >= len(data):
            break
        out.append((start + pos, data[pos : pos + size]))
        pos += size
    return out


@pytest.mark.parametrize("seed", range(4))
def test_valid_end_is_the_end_of_the_last_whole_record(seed: int) -> None:
    w = stream([10, 20000, 30, 3 * 8192, 40])
    data = bytes(w.out) + bytes(8192)  # the rest of the page and the next never written
    rng = random.Random(seed)
    sizes = [rng.randint(1, 9000) for _ in range(100)]
    assert valid_end(WalReader(START, SEG), chunks(data, START, sizes)) == w.records[-1].end_lsn


def test_valid_end_stops_before_a_torn_or_damaged_record() -> None:
    """As recovery: a record cut short (its continuation never written) or one whose CRC
    fails ends the WAL at the record before it, without an error."""
    w = stream([10, 30])
    with pytest.raises(_Stopped):
        w.add(20000, stop_after=9000)
    w.zero_page_rest()
    data = bytes(w.out) + bytes(8192)
    assert valid_end(WalReader(START, SEG), chunks(data, START, [])) == w.records[1].end_lsn

    w = stream([10, 30, 5000, 40])
    damaged = _corrupt(bytes(w.out), w.records[2].lsn - START + 24 + 100)
    end = valid_end(WalReader(START, SEG), chunks(damaged, START, [4096] * 10))
    assert end == w.records[1].end_lsn


def test_valid_end_without_a_whole_record_is_none() -> None:
    w = WalWriter(START)
    with pytest.raises(_Stopped):
        w.add(20000, stop_after=9000)
    assert valid_end(WalReader(START, SEG), chunks(bytes(w.out), START, [])) is None


def test_valid_end_refuses_a_gap() -> None:
    w = stream([10, 30])
    with pytest.raises(ValueError, match="chunk at"):
        valid_end(WalReader(START, SEG), [(START + 8, bytes(w.out[8:]))])


@pytest.mark.parametrize("cut", [100, 8192 + 500, 20000, 40000])
def test_a_second_reader_takes_up_the_stream_at_the_resume_point(cut: int) -> None:
    """Fed a prefix (ending between records, inside one, inside a page header), the
    decoder's `resume_point` is where a second reader finds the same next records: the
    tail's scan begins there (wal_tail's step 1)."""
    w = stream([10, 20000, 30, 8192, 40, 50])
    data = bytes(w.out)
    first = WalReader(START, SEG)
    got = read_all(first, data[:cut])
    point = first.resume_point()
    assert point is not None
    start, prev = point
    second = WalReader(start, SEG, prev_lsn=prev)
    rest = read_all(second, data[start - START :], [777] * 100)
    assert got + rest == w.records


def test_the_resume_point_after_a_switch_is_the_next_segment() -> None:
    w = WalWriter(START)
    w.add(10)
    switch = w.switch()
    after = w.add(10)
    first = WalReader(START, SEG)
    assert read_all(first, bytes(w.out[: switch.end_lsn - START - 100])) == w.records[:2]
    assert first.resume_point() == (START + SEG, switch.lsn)
    second = WalReader(START + SEG, SEG, prev_lsn=switch.lsn)
    assert read_all(second, bytes(w.out[SEG:])) == [after]


def test_no_resume_point_while_a_record_begun_before_the_start_is_skipped() -> None:
    w = WalWriter(START)
    w.pad_to(START + SEG - 200)
    w.add(3 * 8192)
    w.add(40)
    reader = WalReader(START + SEG, SEG)
    reader.feed(bytes(w.out[SEG : SEG + 100]))
    assert list(reader.records()) == []
    assert reader.resume_point() is None


def write_segments(pg_wal: Path, w: WalWriter, timeline: int = 1) -> None:
    pg_wal.mkdir(exist_ok=True)
    data = bytes(w.out)
    for offset in range(0, len(data), SEG):
        name = segment_file_name(timeline, (START + offset) // SEG, SEG)
        (pg_wal / name).write_bytes(data[offset : offset + SEG].ljust(SEG, b"\0"))


def big_stream() -> WalWriter:
    """Records over two and a half segments."""
    w = WalWriter(START)
    while w.lsn < START + 2 * SEG + SEG // 2:
        w.add(body_len=7000)
    return w


def test_pg_wal_bytes_reads_across_segments_up_to_a_missing_one(tmp_path: Path) -> None:
    w = big_stream()
    write_segments(tmp_path, w)
    start = w.records[3].lsn
    got = list(pg_wal_bytes(tmp_path, 1, SEG, start))
    assert got[0][0] == start
    assert b"".join(d for _, d in got) == bytes(w.out[start - START :]).ljust(
        3 * SEG - (start - START), b"\0"
    )
    assert all(len(d) <= wal_tail.READ_CHUNK for _, d in got)
    end = w.records[-1].end_lsn
    assert b"".join(d for _, d in pg_wal_bytes(tmp_path, 1, SEG, start, end)) == bytes(
        w.out[start - START : end - START]
    )
    # The WAL ends where the next segment's file does not exist (as recovery's ENOENT).
    (tmp_path / segment_file_name(1, START // SEG + 1, SEG)).unlink()
    assert b"".join(d for _, d in pg_wal_bytes(tmp_path, 1, SEG, start)) == bytes(
        w.out[start - START : SEG]
    )
    assert list(pg_wal_bytes(tmp_path, 1, SEG, START + SEG)) == []  # from its very start
    # ... but never inside a segment: the WAL from there is not in that directory.
    with pytest.raises(Unavailable, match="does not exist"):
        list(pg_wal_bytes(tmp_path, 2, SEG, start))  # another timeline's names


def test_pg_wal_bytes_fails_on_what_is_no_end_of_wal(tmp_path: Path) -> None:
    """Any failure but a missing file is an error, not the end of the WAL (which would
    make the history short of what the node flushed)."""
    w = big_stream()
    write_segments(tmp_path, w)
    name = segment_file_name(1, START // SEG + 1, SEG)
    os.truncate(tmp_path / name, SEG // 2)
    with pytest.raises(CorruptData, match="is not a WAL segment"):
        list(pg_wal_bytes(tmp_path, 1, SEG, START))


def test_pg_wal_bytes_never_reads_through_a_link_or_a_fifo(tmp_path: Path) -> None:
    w = stream([10, 20])
    secret = tmp_path / "secret"
    secret.write_bytes(bytes(w.out).ljust(SEG, b"\0"))
    pg_wal = tmp_path / "pg_wal"
    pg_wal.mkdir()
    name = segment_file_name(1, START // SEG, SEG)
    (pg_wal / name).symlink_to(secret)
    with pytest.raises(Unavailable, match="cannot read"):
        list(pg_wal_bytes(pg_wal, 1, SEG, START))
    (pg_wal / name).unlink()
    os.mkfifo(pg_wal / name)
    with pytest.raises(CorruptData, match="not a regular file"):  # not opened blocking either
        list(pg_wal_bytes(pg_wal, 1, SEG, START))


def archived(w: WalWriter, archive_dir: Path, upto: int) -> None:
    """The archive as a receiver leaves it: [START, upto) streamed and closed."""
    archive = WalArchive(archive_dir, SEG)
    archive.begin(1, START)
    archive.write(START, bytes(w.out[: upto - START]))
    archive.close()


def test_append_tail_continues_the_archive_durably(tmp_path: Path) -> None:
    w = big_stream()
    write_segments(tmp_path / "pg_wal", w)
    sent = w.records[5].lsn + 100  # inside a record: the walsender sends pages, not records
    archived(w, tmp_path / "archive", sent)
    end = w.records[-1].end_lsn
    with locked_archive(tmp_path / "archive", SEG) as archive:
        assert archive.resume() == (1, sent)
        append_tail(archive, tmp_path / "pg_wal", 1, sent, end)
    reopened = WalArchive(tmp_path / "archive", SEG)
    assert reopened.resume() == (1, end)  # a receiver resumes exactly there
    data = b"".join(segment.path.read_bytes() for segment in reopened.segments())
    assert data == bytes(w.out[: end - START])


def test_append_tail_refuses_a_pg_wal_that_shrank(tmp_path: Path) -> None:
    w = big_stream()
    write_segments(tmp_path / "pg_wal", w)
    sent = w.records[5].lsn
    archived(w, tmp_path / "archive", sent)
    (tmp_path / "pg_wal" / segment_file_name(1, START // SEG + 2, SEG)).unlink()
    with (
        locked_archive(tmp_path / "archive", SEG) as archive,
        pytest.raises(Unavailable, match="changed while its WAL was read"),
    ):
        append_tail(archive, tmp_path / "pg_wal", 1, sent, w.records[-1].end_lsn)
    # What it wrote is the node's valid WAL, durable, and the archive resumes after it.
    assert WalArchive(tmp_path / "archive", SEG).resume() == (1, START + 2 * SEG)


def test_the_archive_is_not_written_while_a_receiver_holds_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wal_tail, "LOCK_WAIT", 0.05)
    (tmp_path / "archive").mkdir()
    fd = os.open(tmp_path / "archive" / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with (
            pytest.raises(Unavailable, match="a walreceiver still writes"),
            locked_archive(tmp_path / "archive", SEG),
        ):
            pass
    finally:
        os.close(fd)
    with locked_archive(tmp_path / "archive", SEG) as archive:
        assert archive.resume() is None
