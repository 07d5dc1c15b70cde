"""A live import (pageserver/ingest/live_import.py): big relation files written as image
layers while the directory is still being filled, the rest once it is final. The result is
the state a plain import of the final directory gives (equal basebackup tars), the layers
tile the keyspace, a file changed after it was read (as recovery rewrites pages) falls back
to the plain import, and a writer that gives up or dies leaves no layer."""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pageserver.ingest import import_datadir as imp
from pageserver.ingest.live_journal import JOURNAL_NAME, JournalWriter, early_candidate
from pageserver.storage.keys import key_to_hex, rel_block_key
from pageserver.storage.layers.blocks import compression_pool
from pageserver.storage.layers.image import ImageLayer
from pageserver.storage.timeline import Timeline
from pg15.constants import BLCKSZ, DEFAULTTABLESPACE_OID
from proto.errors import Unavailable
from tests.pageserver.ingest.test_import_threads import (
    BIG_PAGES,
    BIG_RELNODE,
    basebackup_digest,
    big_db,
    big_file,
    datadir,  # noqa: F401 (the fixture)
    imported_tar,
    new_timeline,
    tiling_images,
)

Writer = Callable[[JournalWriter, Path, Path, Timeline], None]


def live_import(source: Path, tmp_path: Path, write: Writer) -> tuple[str, list[ImageLayer], int]:
    """Import `source` live: `write` fills `pgdata` (from `source`) and the journal while
    import_datadir runs on its own thread. SHA-256 of the snapshot's basebackup tar, the
    layers (checked to tile the keyspace) and the import LSN."""
    work = tmp_path / "work"
    work.mkdir(parents=True)
    pgdata = work / "pgdata"
    with new_timeline(tmp_path / "store") as timeline:
        journal = JournalWriter(pgdata)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            future = pool.submit(imp.import_datadir, timeline, pgdata)
            try:
                write(journal, source, pgdata, timeline)
            finally:
                journal.failed()  # no-op once done
            lsn = future.result(timeout=120)
        layers = tiling_images(timeline)
        return basebackup_digest(timeline, lsn), layers, lsn


def live_equals(
    final: Path, source: Path, tmp_path: Path, write: Writer
) -> tuple[list[ImageLayer], int]:
    """Import `source` live through `write`; its state must be a plain import of `final` (the
    directory as `write` leaves it). The layers and the import LSN."""
    plain, _ = imported_tar(final, tmp_path / "plain", 1)
    live, layers, lsn = live_import(source, tmp_path / "live", write)
    assert live == plain
    return layers, lsn


def imported_as_final(final: Path, source: Path, tmp_path: Path, write: Writer) -> None:
    """As live_equals, and no early layer kept: the directory was imported whole."""
    layers, lsn = live_equals(final, source, tmp_path, write)
    assert {x.lsn for x in layers} == {lsn}


def early_lsn(source: Path) -> int:
    return imp.import_lsn_of(source) - 0x1000


def announce_and_copy(journal: JournalWriter, source: Path, pgdata: Path) -> str:
    """As the CLI does: the LSN, then each big file announced before it is written."""
    journal.lsn(early_lsn(source))
    name = str(big_file(source).relative_to(source))
    journal.file(BIG_PAGES * BLCKSZ, name)
    # As the extractor writes: the data only (copy2 would set each file's mtime once its
    # data is written, a change after the file is whole, which the import must refuse)
    shutil.copytree(source, pgdata, symlinks=True, copy_function=shutil.copy)
    journal.whole(name, (pgdata / name).lstat())  # the tar unpacked, recovery not begun
    return name


def rewrite_page(root: Path, blkno: int, fill: int) -> None:
    """Page `blkno` of the big file rewritten in place (a zero LSN, then `fill` bytes), as
    recovery or a second copy in the tar rewrites a page."""
    with open(big_file(root), "r+b") as f:
        f.seek(blkno * BLCKSZ)
        f.write(bytes(8) + bytes([fill]) * (BLCKSZ - 8))


def wait_for_layer_at(timeline: Timeline, lsn: int) -> None:
    deadline = time.monotonic() + 60
    while not any(p.name.endswith(f"__{lsn:016X}") for p in timeline.directory.iterdir()):
        assert time.monotonic() < deadline, "no early layer was written"
        time.sleep(0.01)


def test_big_files_are_imported_early_and_the_state_is_the_same(
    datadir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    def write(journal: JournalWriter, source: Path, pgdata: Path, timeline: Timeline) -> None:
        announce_and_copy(journal, source, pgdata)
        wait_for_layer_at(timeline, early_lsn(source))  # written before the directory is final
        journal.done()

    layers, lsn = live_equals(datadir, datadir, tmp_path, write)
    assert {x.lsn for x in layers} == {early_lsn(datadir), lsn}
    early = [x.name.key_range for x in layers if x.lsn == early_lsn(datadir)]
    db = big_db(datadir)
    assert early[0].start == rel_block_key(DEFAULTTABLESPACE_OID, db, BIG_RELNODE, 0, 0)
    assert early[-1].end == rel_block_key(DEFAULTTABLESPACE_OID, db, BIG_RELNODE, 0, BIG_PAGES)
    assert not (tmp_path / "live" / "work" / JOURNAL_NAME).read_text().count("failed")


def test_a_file_changed_after_it_was_read_is_imported_as_final(
    datadir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Recovery rewrites a page of an early file: the early layers go, the final directory is
    imported whole (its state, not the one read early)."""
    final = tmp_path / "final"
    shutil.copytree(datadir, final, symlinks=True)
    rewrite_page(final, 5, 0x5A)

    def write(journal: JournalWriter, source: Path, pgdata: Path, timeline: Timeline) -> None:
        announce_and_copy(journal, source, pgdata)
        wait_for_layer_at(timeline, early_lsn(source))
        time.sleep(0.02)  # past the file system's timestamp granularity, as recovery is
        rewrite_page(pgdata, 5, 0x5A)
        journal.done()

    imported_as_final(final, datadir, tmp_path, write)
    assert not [p for p in (tmp_path / "live" / "store").rglob(f"*__{early_lsn(datadir):016X}")]


@pytest.mark.parametrize("how", ["failed", "died"])
def test_a_writer_that_gives_up_or_dies_leaves_no_layer(
    datadir: Path,  # noqa: F811
    tmp_path: Path,
    how: str,
) -> None:
    work = tmp_path / "work"
    work.mkdir(parents=True)
    pgdata = work / "pgdata"
    with new_timeline(tmp_path / "store") as timeline:
        journal = JournalWriter(pgdata)
        if how == "died":  # a writer process that is gone (SIGKILL): its journal header
            journal.close()
            child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                                   capture_output=True, text=True, check=True)  # fmt: skip
            (work / JOURNAL_NAME).write_text(f"neon-live-import 1 {child.stdout.strip()}\n")
            with open(work / JOURNAL_NAME, "a") as f:
                f.write(f"lsn {early_lsn(datadir):X}\n")
                f.write(f"file {BIG_PAGES * BLCKSZ} {big_file(datadir).relative_to(datadir)}\n")
            shutil.copytree(datadir, pgdata, symlinks=True)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            future = pool.submit(imp.import_datadir, timeline, pgdata)
            if how == "failed":
                announce_and_copy(journal, datadir, pgdata)
                wait_for_layer_at(timeline, early_lsn(datadir))
                journal.failed()
            with pytest.raises(Unavailable, match="given up" if how == "failed" else "is gone"):
                future.result(timeout=120)
        assert not list(timeline.layer_map().layers())
        assert not [p for p in timeline.directory.iterdir() if "__" in p.name]


def test_which_members_are_announced() -> None:
    big = 64 * 1024 * 1024
    assert early_candidate("base/16384/16396", big)
    assert early_candidate("./base/16384/16396.1", big)
    assert early_candidate("global/1262_vm", big)
    assert not early_candidate("base/16384/16396", big - BLCKSZ)  # small: with the rest
    assert not early_candidate("base/16384/16396", big + 100)  # not whole pages
    assert not early_candidate("base/16384/pg_filenode.map", big)
    assert not early_candidate("base/16384/t3_16396", big)  # temporary
    assert not early_candidate("pg_tblspc/16500/PG_15_202209061/5/16396", big)
    assert not early_candidate("base/16384/../16396", big)
    # A name a hostile tar may hold: a final newline would add a line to the journal (and
    # name another file than the one written), other digits another relation's file.
    assert not early_candidate("base/16384/16396\n", big)
    assert not early_candidate("base/16384/\u0661\u0666\u0663\u0669\u0666", big)


def test_a_file_is_read_as_it_grows(datadir: Path, tmp_path: Path) -> None:  # noqa: F811
    """The big file arrives in pieces that end inside pages, slowly: only whole pages below
    its size are read, and the state is the plain import's."""

    def write(journal: JournalWriter, source: Path, pgdata: Path, timeline: Timeline) -> None:
        journal.lsn(early_lsn(source))
        big = big_file(source)
        journal.file(BIG_PAGES * BLCKSZ, str(big.relative_to(source)))
        shutil.copytree(source, pgdata, symlinks=True, ignore=lambda d, names: [
            n for n in names if Path(d) / n == big
        ])  # fmt: skip
        data = big.read_bytes()
        with open(big_file(pgdata), "wb", buffering=0) as f:
            for at in range(0, len(data), 3_000_001):
                f.write(data[at : at + 3_000_001])
                time.sleep(0.01)
        journal.whole(str(big.relative_to(source)), big_file(pgdata).lstat())
        journal.done()

    layers, lsn = live_equals(datadir, datadir, tmp_path, write)
    assert {x.lsn for x in layers} == {early_lsn(datadir), lsn}


def test_a_file_announced_twice_is_imported_as_final(datadir: Path, tmp_path: Path) -> None:  # noqa: F811
    """A tar holding the big file twice (the second copy rewrites it after the first was
    read, keeping its inode): the directory is imported as it ends up."""
    final = tmp_path / "final"
    shutil.copytree(datadir, final, symlinks=True)
    rewrite_page(final, 7, 0x33)

    def write(journal: JournalWriter, source: Path, pgdata: Path, timeline: Timeline) -> None:
        name = announce_and_copy(journal, source, pgdata)
        wait_for_layer_at(timeline, early_lsn(source))
        journal.file(BIG_PAGES * BLCKSZ, name)
        # The same inode, rewritten in place past the part read already (the first early
        # layer holds page 7), its mtime put back: only the second announcement tells.
        st = big_file(pgdata).stat()
        with open(big_file(pgdata), "r+b") as f:
            f.write(big_file(final).read_bytes())
        os.utime(big_file(pgdata), ns=(st.st_atime_ns, st.st_mtime_ns))
        journal.done()

    imported_as_final(final, datadir, tmp_path, write)


def test_a_file_shorter_than_announced_once_final_is_imported_as_final(
    datadir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Recovery truncates an early file (a relation VACUUM truncated while the backup ran)
    before the pageserver has read up to its announced size: once the journal says `done`
    the file will not grow, so the directory is imported whole as it ends up. The pageserver
    kept waiting for the missing bytes while the writer waited for its answer."""
    final = tmp_path / "final"
    shutil.copytree(datadir, final, symlinks=True)
    half = BIG_PAGES // 2 * BLCKSZ
    os.truncate(big_file(final), half)

    def write(journal: JournalWriter, source: Path, pgdata: Path, timeline: Timeline) -> None:
        journal.lsn(early_lsn(source))
        journal.file(BIG_PAGES * BLCKSZ, str(big_file(source).relative_to(source)))
        shutil.copytree(final, pgdata, symlinks=True)
        journal.done()

    def unstick(pgdata: Path) -> None:  # a hung import ends, so that this test fails
        with open(pgdata.parent / JOURNAL_NAME, "a") as f:
            f.write("failed\n")

    work = tmp_path / "live" / "work"
    timer = threading.Timer(30, unstick, (work / "pgdata",))
    timer.start()
    try:
        imported_as_final(final, datadir, tmp_path, write)
    finally:
        timer.cancel()


def test_a_file_changed_while_still_being_read_is_imported_as_final(
    datadir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The pageserver lags behind (its zstd threads busy): the file is whole, a page it has
    read already is rewritten (recovery's checkpoint, a busy table) while it still reads the
    rest. Its stat taken once it finished reading holds that write, so the old page was kept;
    the stat that counts is the one taken when the file was first seen whole (a write landing
    while the reader still digests the chunk it read before that is not told apart from the
    extractor's last one: only the extractor knows when it is done with a file)."""

    def write(journal: JournalWriter, source: Path, pgdata: Path, wait_read: WaitRead) -> None:
        shutil.copytree(source, pgdata, symlinks=True)  # whole before it is read
        journal.lsn(early_lsn(source))
        name = str(big_file(source).relative_to(source))
        journal.file(BIG_PAGES * BLCKSZ, name)
        journal.whole(name, (pgdata / name).lstat())
        wait_read()
        time.sleep(0.02)  # past the file system's timestamp granularity
        rewrite_page(pgdata, 5, 0x6B)

    rewritten_while_read(datadir, tmp_path, 0x6B, write)


WaitRead = Callable[[], None]


def rewritten_while_read(
    source_dir: Path, tmp_path: Path, fill: int,
    write: Callable[[JournalWriter, Path, Path, WaitRead], None],
) -> None:  # fmt: skip
    """Import `source_dir` live with the pageserver lagging (the zstd pool held busy while
    `write` runs; its `wait_read` returns once the import has read pages and waits for zstd),
    `write` rewriting page 5 with `fill`: the state must be the final directory's, with no
    early layer kept."""
    final = tmp_path / "final"
    shutil.copytree(source_dir, final, symlinks=True)
    rewrite_page(final, 5, fill)
    pool = compression_pool()
    release = threading.Event()

    def wait_read() -> None:
        deadline = time.monotonic() + 60
        while pool._work_queue.qsize() == 0:
            assert time.monotonic() < deadline, "the import read nothing"
            time.sleep(0.005)

    def held(journal: JournalWriter, source: Path, pgdata: Path, timeline: Timeline) -> None:
        busy = [pool.submit(release.wait, 60) for _ in range(pool._max_workers)]
        try:
            write(journal, source, pgdata, wait_read)
        finally:
            release.set()
        for future in busy:
            future.result()
        journal.done()

    imported_as_final(final, source_dir, tmp_path, held)


def test_a_file_rewritten_before_the_pageserver_saw_it_whole_is_imported_as_final(
    datadir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The pageserver has read page 5 of a file still arriving and lags behind (its zstd
    threads busy); the file is then written whole, the tar ends, and recovery rewrites page 5
    before the pageserver looks at the file's size again. Its own first stat of the whole
    file already holds that write; the writer's `whole` line, taken before recovery, does
    not: the directory is imported as it ends up, not with the page read before."""

    def write(journal: JournalWriter, source: Path, pgdata: Path, wait_read: WaitRead) -> None:
        big = big_file(source)
        name = str(big.relative_to(source))
        shutil.copytree(source, pgdata, symlinks=True, ignore=lambda d, names: [
            n for n in names if Path(d) / n == big
        ])  # fmt: skip
        data = big.read_bytes()
        journal.lsn(early_lsn(source))
        journal.file(BIG_PAGES * BLCKSZ, name)
        with open(pgdata / name, "wb", buffering=0) as f:
            f.write(data[: len(data) // 2])  # page 5 and more: the reader takes them
            wait_read()
            f.write(data[len(data) // 2 :])
        journal.whole(name, (pgdata / name).lstat())
        time.sleep(0.02)  # past the file system's timestamp granularity, as recovery is
        rewrite_page(pgdata, 5, 0x4C)

    rewritten_while_read(datadir, tmp_path, 0x4C, write)


def test_a_file_without_a_whole_line_is_not_imported_early(
    datadir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A writer that never said how its extractor left a file (its `whole` line): nothing
    tells a later write from the extractor's, so the directory is imported whole."""

    def write(journal: JournalWriter, source: Path, pgdata: Path, timeline: Timeline) -> None:
        journal.lsn(early_lsn(source))
        journal.file(BIG_PAGES * BLCKSZ, str(big_file(source).relative_to(source)))
        shutil.copytree(source, pgdata, symlinks=True, copy_function=shutil.copy)
        wait_for_layer_at(timeline, early_lsn(source))
        journal.done()

    imported_as_final(datadir, datadir, tmp_path, write)


def test_a_file_arrived_whole_is_imported_while_the_one_before_still_arrives(
    datadir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Two announced files (a table, then its index): the second, written whole, gets its
    layers while the first is still half written (EARLY_THREADS), and the state is the final
    directory's; both files' layers are early ones."""
    final = tmp_path / "final"
    shutil.copytree(datadir, final, symlinks=True)
    second = big_file(final).with_name(str(BIG_RELNODE + 1))
    shutil.copy(big_file(final), second)
    half = BIG_PAGES // 2 * BLCKSZ

    def write(journal: JournalWriter, source: Path, pgdata: Path, timeline: Timeline) -> None:
        journal.lsn(early_lsn(source))
        first_name = str(big_file(source).relative_to(source))
        second_name = str(second.relative_to(final))

        def first_file(_directory: str, names: list[str]) -> list[str]:
            return [n for n in names if n == str(BIG_RELNODE)]

        shutil.copytree(source, pgdata, symlinks=True, copy_function=shutil.copy,
                        ignore=first_file)  # fmt: skip
        journal.file(BIG_PAGES * BLCKSZ, first_name)
        data = big_file(source).read_bytes()
        with open(pgdata / first_name, "wb") as f:
            f.write(data[:half])
            f.flush()
            journal.file(BIG_PAGES * BLCKSZ, second_name)
            shutil.copy(second, pgdata / second_name)
            start = key_to_hex(rel_block_key(DEFAULTTABLESPACE_OID, big_db(source),
                                             BIG_RELNODE + 1, 0, 0))  # fmt: skip
            at = f"__{early_lsn(source):016X}"
            deadline = time.monotonic() + 60
            while not any(p.name.startswith(start) and p.name.endswith(at)
                          for p in timeline.directory.iterdir()):  # fmt: skip
                assert time.monotonic() < deadline, "the second file waited for the first"
                time.sleep(0.01)
            f.write(data[half:])
        for name in (first_name, second_name):
            journal.whole(name, (pgdata / name).lstat())
        journal.done()

    layers, _lsn = live_equals(final, datadir, tmp_path, write)
    db = big_db(datadir)
    early = {x.name.key_range.start for x in layers if x.lsn == early_lsn(datadir)}
    for rel in (BIG_RELNODE, BIG_RELNODE + 1):
        assert rel_block_key(DEFAULTTABLESPACE_OID, db, rel, 0, 0) in early
