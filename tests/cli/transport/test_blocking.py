"""The blocking facade the export writes through: chunks written from a worker thread reach
the transport in order; the object appears on a clean exit only."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import pytest

from cli.transport import parse_location
from cli.transport.blocking import BlockingWriter
from proto.errors import AlreadyExists
from tests.cli.transport.conftest import entries


def test_writes_from_a_thread_then_commits(tmp_path: Path) -> None:
    seen: list[bytes] = []
    chunks = [bytes([i]) * (100_000 + i) for i in range(20)]
    with BlockingWriter(
        parse_location(str(tmp_path / "x.neon")), overwrite=False, on_write=seen.append
    ) as out:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            for chunk in chunks:
                pool.submit(out.write, memoryview(chunk)).result()
        assert entries(tmp_path)[0].startswith(".x.neon.")  # not visible yet
    assert (tmp_path / "x.neon").read_bytes() == b"".join(chunks)
    assert seen == chunks and out.bytes_written == sum(map(len, chunks))
    assert entries(tmp_path) == ["x.neon"]


def test_exception_aborts_and_refusal_is_raised(tmp_path: Path) -> None:
    with (
        pytest.raises(KeyboardInterrupt),
        BlockingWriter(parse_location(str(tmp_path / "x.neon")), overwrite=False) as out,
    ):
        out.write(b"partial")
        raise KeyboardInterrupt
    assert entries(tmp_path) == []
    (tmp_path / "x.neon").write_bytes(b"kept")
    with (
        pytest.raises(AlreadyExists),
        BlockingWriter(parse_location(str(tmp_path / "x.neon")), overwrite=False) as out,
    ):
        out.write(b"new")
    assert entries(tmp_path) == ["x.neon"] and (tmp_path / "x.neon").read_bytes() == b"kept"
