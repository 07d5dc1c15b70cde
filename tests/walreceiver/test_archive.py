"""The WAL archive's naming, completion and resume rules, on synthetic WAL pages."""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import pytest

from proto.errors import CorruptData
from walreceiver import archive as archive_module
from walreceiver.archive import WalArchive

SEG = 1 << 20  # the smallest segment size PostgreSQL allows keeps these tests fast
PAGE = 8192


def wal(start: int, length: int) -> bytes:
    """Fake WAL: every page carries its own address at offset 8, like xlp_pageaddr."""
    assert start % PAGE == 0 and length % PAGE == 0
    out = bytearray()
    for page in range(start, start + length, PAGE):
        hdr = struct.pack("<HHIQ", 0xD110, 0, 1, page)
        out += hdr + bytes([page // PAGE % 251]) * (PAGE - len(hdr))
    return bytes(out)


def test_segments_complete_and_partial_names(tmp_path: Path) -> None:
    a = WalArchive(tmp_path, SEG)
    assert a.resume() is None
    a.begin(1, 0)
    data = wal(0, SEG + 3 * PAGE)
    a.write(0, data[:5000])
    a.write(5000, data[5000:])  # crosses the segment boundary inside one chunk
    assert a.flushed_lsn == SEG  # completing a segment fsyncs it
    assert a.flush() == SEG + 3 * PAGE
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["000000010000000000000000", "000000010000000000000001.partial"]
    assert (tmp_path / names[0]).read_bytes() == data[:SEG]
    assert a.resume() == (1, SEG + 3 * PAGE)
    with pytest.raises(CorruptData, match="does not continue"):
        a.write(0, b"x")
    a.close()


def test_resume_rounds_down_and_drops_torn_pages(tmp_path: Path) -> None:
    a = WalArchive(tmp_path, SEG)
    a.begin(1, 0)
    a.write(0, wal(0, 4 * PAGE) + b"partial page")
    a.flush()
    assert a.resume() == (1, 4 * PAGE)  # streaming (a crash now): whole pages only
    a.close()
    assert a.resume() == (1, 4 * PAGE + 12)  # closed cleanly: exactly what is durable
    # A torn tail: page 3 holds garbage (its header does not carry its address).
    path = tmp_path / "000000010000000000000000.partial"
    raw = bytearray(path.read_bytes())
    raw[3 * PAGE : 4 * PAGE] = bytes(PAGE)
    path.write_bytes(bytes(raw))
    b = WalArchive(tmp_path, SEG)
    assert b.resume() == (1, 3 * PAGE)
    b.begin(1, 3 * PAGE)  # truncates the torn tail, then the server resends it
    assert path.stat().st_size == 3 * PAGE
    b.write(3 * PAGE, wal(3 * PAGE, PAGE))
    b.close()
    assert path.read_bytes() == wal(0, 4 * PAGE)


def test_resume_after_complete_segment_and_new_timeline(tmp_path: Path) -> None:
    a = WalArchive(tmp_path, SEG)
    a.begin(1, 0)
    a.write(0, wal(0, SEG))
    assert a.resume() == (1, SEG)
    a.begin(2, SEG)
    a.write(SEG, wal(SEG, PAGE))
    a.write_history("00000002.history", b"1\t0/100000\tno recovery target specified\n")
    a.close()
    assert a.resume() == (2, SEG + PAGE)
    assert (tmp_path / "00000002.history").exists()


def test_mid_segment_start_needs_the_segment_head(tmp_path: Path) -> None:
    a = WalArchive(tmp_path, SEG)
    with pytest.raises(CorruptData, match="segment boundary"):
        a.begin(1, 5 * PAGE)


def test_a_clean_close_resumes_exactly_where_it_was_durable(tmp_path: Path) -> None:
    """A stopped node's last WAL ends mid-page (its shutdown checkpoint): a restarted
    pageserver re-ingests the archive up to `resume()`, so rounded down to the page those
    bytes were left out until the node streamed again (a checkout waited 30 s for the
    checkpoint, a branch at a snapshot there 120 s). The record goes with the next begin;
    a record of another file, or past the file's end, is not used."""
    a = WalArchive(tmp_path, SEG)
    a.begin(1, 0)
    a.write(0, wal(0, 2 * PAGE) + b"last record")
    a.close()
    assert WalArchive(tmp_path, SEG).resume() == (1, 2 * PAGE + 11)
    b = WalArchive(tmp_path, SEG)
    b.begin(1, 2 * PAGE + 11)  # resumes exactly there: nothing truncated
    assert not (tmp_path / ".closed").exists()  # streaming again: a crash rounds down
    b.write(2 * PAGE + 11, b"more")
    b.flush()
    assert b.resume() == (1, 2 * PAGE)
    b.close()
    assert b.resume() == (1, 2 * PAGE + 15)
    path = tmp_path / "000000010000000000000000.partial"
    path.write_bytes(path.read_bytes()[: 2 * PAGE + 5])  # shorter than recorded
    assert WalArchive(tmp_path, SEG).resume() == (1, 2 * PAGE)
    (tmp_path / ".closed").write_text("2 0 5\n")  # another timeline's file
    assert WalArchive(tmp_path, SEG).resume() == (1, 2 * PAGE)


def test_a_clean_close_record_is_not_used_over_a_torn_tail_page(tmp_path: Path) -> None:
    """The page a clean close ended in must carry its address too (when it holds that far):
    trusted as it is, a zeroed tail (fsynced data lost after all) would never be received
    again, the archive no longer the server's bytes and the decoder stopped on it; rounded
    down to the page, it is received again. Fails on 37e0829: resumes past the zeros."""
    a = WalArchive(tmp_path, SEG)
    a.begin(1, 0)
    a.write(0, wal(0, 3 * PAGE)[: 2 * PAGE + 100])  # page 2's header and some records
    a.close()
    assert WalArchive(tmp_path, SEG).resume() == (1, 2 * PAGE + 100)
    path = tmp_path / "000000010000000000000000.partial"
    raw = bytearray(path.read_bytes())
    raw[2 * PAGE :] = bytes(100)  # the tail page lost, zeros read back
    path.write_bytes(bytes(raw))
    assert WalArchive(tmp_path, SEG).resume() == (1, 2 * PAGE)


def failing_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    """The next fsync of a WAL file fails with EIO, as a lost writeback reports it once (the
    kernel then marks the pages clean: a second fsync would succeed). A disk error cannot be
    made on demand here; the failure is injected at the system call."""
    real = os.fsync
    calls = {"n": 0}

    def fsync(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(archive_module.os, "fsync", fsync)


@pytest.mark.parametrize("where", ["flush", "segment end"])
def test_a_failed_fsync_never_counts_as_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """What was written since the last good fsync is cut off and received again: a retried
    fsync would succeed on pages the kernel dropped, and report them flushed."""
    a = WalArchive(tmp_path, SEG)
    a.begin(1, 0)
    data = wal(0, SEG)
    a.write(0, data[: 2 * PAGE])
    assert a.flush() == 2 * PAGE
    failing_fsync(monkeypatch)
    with pytest.raises(OSError, match=r"fsync failed.*000000010000000000000000\.partial"):
        if where == "flush":
            a.write(2 * PAGE, data[2 * PAGE : 5 * PAGE])
            a.flush()
        else:
            a.write(2 * PAGE, data[2 * PAGE :])  # completes the segment: its fsync fails
    assert a.flush() == 2 * PAGE  # still only what the good fsync made durable
    path = tmp_path / "000000010000000000000000.partial"
    assert path.stat().st_size == 2 * PAGE
    assert a.resume() == (1, 2 * PAGE)
    a.begin(1, 2 * PAGE)  # the receiver's next try: the server resends from there
    a.write(2 * PAGE, data[2 * PAGE :])
    a.close()
    assert (tmp_path / "000000010000000000000000").read_bytes() == data


def test_a_failed_directory_fsync_after_a_segment_ends_the_archive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The completed segment's rename may not be durable: it is not reported flushed, and
    nothing more is written (the next write used to reopen the finished segment's number,
    truncating a `.partial` under the wrong name); the next `begin` resumes after it."""
    a = WalArchive(tmp_path, SEG)
    a.begin(1, 0)
    data = wal(0, 2 * SEG)
    a.write(0, data[:PAGE])
    assert a.flush() == PAGE
    real = archive_module.fsync_dir

    def failing_fsync_dir(directory: Path) -> None:
        monkeypatch.setattr(archive_module, "fsync_dir", real)  # fails once
        raise OSError(errno.EIO, "Input/output error", str(directory))

    monkeypatch.setattr(archive_module, "fsync_dir", failing_fsync_dir)
    with pytest.raises(OSError, match="Input/output error"):
        a.write(PAGE, data[PAGE : SEG + PAGE])
    assert a.flushed_lsn == PAGE  # the name's durability is unknown
    with pytest.raises(Exception, match="before begin"):
        a.write(SEG, data[SEG : SEG + PAGE])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000000010000000000000000"]
    assert a.resume() == (1, SEG)
    a.begin(1, SEG)
    a.write(SEG, data[SEG:])
    a.close()
    assert (tmp_path / "000000010000000000000001").read_bytes() == data[SEG:]


def test_a_resume_makes_what_a_killed_writer_left_durable_before_reporting_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bytes before the resume point count as flushed (the server is told so and may
    recycle them): a writer killed before its fsync, or failed on a full disk, left them in
    the page cache only. begin() fsyncs them first; when that fails nothing is reported."""
    a = WalArchive(tmp_path, SEG)
    a.begin(1, 0)
    a.write(0, wal(0, 4 * PAGE))  # never flushed: the writer is killed here
    b = WalArchive(tmp_path, SEG)
    assert b.resume() == (1, 4 * PAGE)
    failing_fsync(monkeypatch)
    with pytest.raises(OSError, match=r"fsync failed.*000000010000000000000000\.partial"):
        b.begin(1, 4 * PAGE)
    assert b.flushed_lsn == 0
    b.begin(1, 4 * PAGE)  # the next try: its fsync succeeds
    assert b.flushed_lsn == 4 * PAGE
    b.close()
