"""The pull spool on bytes: a read killed midway leaves what arrived, a read run again takes
it from the spool and fetches only the rest; an object that changed size since is read whole
again; a spool another read holds is left alone; `discard` removes what was used."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from cli.transport import parse_location
from cli.transport.base import read_object, use_spool
from cli.transport.spool import PullSpool

DATA = os.urandom(3 * 1024 * 1024 + 4321)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "remote" / "x.neon"
    path.parent.mkdir()
    path.write_bytes(DATA)
    return path


@pytest.fixture
def spool(tmp_path: Path) -> PullSpool:
    spool = PullSpool(tmp_path / "storage" / ".pull-partials")
    (tmp_path / "storage").mkdir()
    spool.prepare()
    return spool


async def read_some(spool: PullSpool, url: str, chunks: int | None = None) -> bytes:
    """Read through `spool`, stopping after `chunks` chunks (a killed pull)."""
    use_spool(spool)
    try:
        got = []
        stream = read_object(parse_location(url))
        async for chunk in stream:
            got.append(chunk)
            if chunks is not None and len(got) == chunks:
                await stream.aclose()  # type: ignore[attr-defined]
                break
        return b"".join(got)
    finally:
        use_spool(None)


async def test_a_read_run_again_fetches_only_the_rest(spool: PullSpool, source: Path) -> None:
    assert await read_some(spool, str(source), chunks=2) == DATA[: 2 * 1024 * 1024]
    assert spool.fetched == 2 * 1024 * 1024 and spool.resumed == 0
    assert stat.S_IMODE(spool.directory.stat().st_mode) == 0o700
    [kept] = spool.directory.glob("*.neon")
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600

    again = PullSpool(spool.directory)
    assert await read_some(again, str(source)) == DATA
    assert again.resumed == 2 * 1024 * 1024 and again.fetched == len(DATA) - again.resumed
    again.discard()
    assert list(spool.directory.iterdir()) == []


async def test_an_object_of_another_size_is_read_whole(spool: PullSpool, source: Path) -> None:
    await read_some(spool, str(source), chunks=1)
    source.write_bytes(DATA[:-1])
    again = PullSpool(spool.directory)
    assert await read_some(again, str(source)) == DATA[:-1]
    assert again.resumed == 0 and again.fetched == len(DATA) - 1


async def test_a_spool_in_use_is_left_alone(spool: PullSpool, source: Path) -> None:
    use_spool(spool)
    try:
        first = read_object(parse_location(str(source)))
        assert len(await anext(first)) > 0  # holds the spool's lock
        other = PullSpool(spool.directory)
        assert await read_some(other, str(source)) == DATA
        assert other.resumed == 0 and other.fetched == len(DATA)
        await first.aclose()  # type: ignore[attr-defined]
    finally:
        use_spool(None)
