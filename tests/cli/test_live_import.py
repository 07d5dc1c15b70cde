"""The CLI's side of a live import (cli/live_import.py): which members of a backup's tar are
announced, the start LSN from its backup_label, the request sent once begun and answered
after `finish`, and `fail` on an error in the block."""

from __future__ import annotations

import asyncio
import io
import tarfile
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cli.live_import import LiveImport, announced
from pageserver.ingest import live_journal
from pageserver.ingest.live_journal import JOURNAL_NAME

LABEL = (
    b"START WAL LOCATION: 1/2A000028 (file 00000001000000010000002A)\n"
    b"CHECKPOINT LOCATION: 1/2A000060\nBACKUP METHOD: streamed\n"
)


def backup_tar() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, size in [
            ("backup_label", None), ("base/5/16396", 3 * 8192), ("base/5/16396_fsm", 8192),
            ("global/1262", 2 * 8192), ("base/5/16396.1", 100), ("pg_wal/x", 3 * 8192),
            ("pg_tblspc/16500/PG_15_202209061/5/16400", 3 * 8192),
        ]:  # fmt: skip
            data = LABEL if size is None else bytes(size)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


async def chunks_of(data: bytes, size: int) -> AsyncIterator[bytes]:
    for at in range(0, len(data), size):
        yield data[at : at + size]


async def test_backup_members_are_announced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(live_journal, "EARLY_BYTES", 2 * 8192)
    pgdata = tmp_path / "pgdata"
    asked: list[tuple[Path, str | None]] = []
    answered = threading.Event()

    def register(path: Path, origin: str | None) -> str:
        asked.append((path, origin))
        answered.wait(30)
        return "imported"

    data = backup_tar()
    with LiveImport(pgdata, register) as live:
        passed = b"".join(
            [c async for c in announced(chunks_of(data, 700), live, backup_label=True)]
        )
        assert passed == data and live.begun
        answered.set()
        assert live.finish() == "imported"
    assert asked == [(pgdata, None)]
    lines = (tmp_path / JOURNAL_NAME).read_text().splitlines()
    assert lines[0].startswith("neon-live-import 1 ")
    assert lines[1:] == [
        "lsn 12A000028",
        f"file {3 * 8192} base/5/16396",
        f"file {2 * 8192} global/1262",
        "done",
    ]


async def test_an_error_in_the_block_fails_the_import(tmp_path: Path) -> None:
    seen: list[str] = []

    def register(path: Path, origin: str | None) -> None:
        journal = (path.parent / JOURNAL_NAME).read_text()
        seen.append(journal)

    with (
        pytest.raises(RuntimeError, match="cut"),
        LiveImport(tmp_path / "pgdata", register) as live,
    ):
        live.begin(0x1000, "origin")
        raise RuntimeError("cut")
    assert (tmp_path / JOURNAL_NAME).read_text().splitlines()[-1] == "failed"
    assert len(seen) == 1


async def test_a_source_that_never_begins_sends_nothing(tmp_path: Path) -> None:
    def register(path: Path, origin: str | None) -> None:
        raise AssertionError("no request")

    with LiveImport(tmp_path / "pgdata", register) as live:
        tar = backup_tar().replace(b"START WAL", b"START XXX")
        async for _ in announced(chunks_of(tar, 4096), live, backup_label=True):
            pass
        assert not live.begun
    assert not (tmp_path / JOURNAL_NAME).exists()


async def test_a_refused_request_stops_the_transfer(tmp_path: Path) -> None:
    """The pageserver refused the import at once: the next member stops the transfer with
    its error instead of receiving the rest for nothing."""

    def register(path: Path, origin: str | None) -> None:
        raise PermissionError("refused")

    with (
        pytest.raises(PermissionError, match="refused"),
        LiveImport(tmp_path / "p", register) as live,
    ):
        chunks = announced(chunks_of(backup_tar(), 512), live, backup_label=True)
        async for _ in chunks:
            if live.begun:
                while not live._request.done():  # type: ignore[union-attr]
                    await asyncio.sleep(0.01)


def test_extracted_records_each_announced_file_as_the_extractor_left_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the tar is unpacked (before recovery), each announced file's inode, size and
    mtime go to the journal, for the pageserver to compare with the final directory's."""
    monkeypatch.setattr(live_journal, "EARLY_BYTES", 2 * 8192)
    pgdata = tmp_path / "pgdata"
    (pgdata / "base" / "5").mkdir(parents=True)
    (pgdata / "base" / "5" / "16396").write_bytes(bytes(3 * 8192))
    with LiveImport(pgdata, lambda path, origin: "imported") as live:
        live.begin(0x1000)
        live.file(3 * 8192, "base/5/16396")
        live.file(8192, "base/5/16397")  # small: not announced, no line
        live.file(3 * 8192, "base/5/16398")  # announced, never written: no line
        live.extracted()
        assert live.finish() == "imported"
    st = (pgdata / "base" / "5" / "16396").lstat()
    lines = (tmp_path / JOURNAL_NAME).read_text().splitlines()
    assert lines[1:] == [
        "lsn 1000",
        f"file {3 * 8192} base/5/16396",
        f"file {3 * 8192} base/5/16398",
        f"whole {st.st_ino} {st.st_size} {st.st_mtime_ns} base/5/16396",
        "done",
    ]
