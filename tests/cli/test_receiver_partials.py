"""What a receiver keeps of a cut push (cli/receiver_partials.py), on a real directory: the
kept bytes' digests are those the pusher compares with, a resumed push gets the kept prefix
before its own bytes (refused when fewer are kept, or when they shrink while read), an empty
cut keeps nothing, what nobody resumed for KEEP_SECONDS is swept, and no more than KEEP_FILES
are kept."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cli.receiver_partials import KEEP_FILES, KEEP_SECONDS, PARTIALS_DIR, Partials
from cli.transport.resume import NO_PARTIAL, RESUME_BLOCK
from proto.errors import Conflict

DATA = os.urandom(RESUME_BLOCK + 12345)


async def upload(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


def cut_push(
    tmp_path: Path, partials: Partials, name: str, data: bytes, mtime: float | None = None
) -> None:
    fetched = tmp_path / f"fetched-{name}"
    fetched.write_bytes(data)
    if mtime is not None:  # when the cut push's last bytes arrived
        os.utime(fetched, (mtime, mtime))
    partials.keep(name, fetched)
    assert fetched.exists() == (not data)  # moved, not copied (an empty one stays)


async def test_kept_bytes_go_before_a_resumed_upload(tmp_path: Path) -> None:
    partials = Partials(tmp_path)
    assert partials.describe("x.neon") == NO_PARTIAL
    cut_push(tmp_path, partials, "x.neon", DATA)
    kept = partials.describe("x.neon")
    assert kept.size == len(DATA)
    assert kept.digests == (
        hashlib.sha256(DATA[:RESUME_BLOCK]).hexdigest(),
        hashlib.sha256(DATA[RESUME_BLOCK:]).hexdigest(),
    )
    got = b"".join([c async for c in partials.prefixed("x.neon", RESUME_BLOCK, upload(b"new"))])
    assert got == DATA[:RESUME_BLOCK] + b"new"
    with pytest.raises(Conflict, match=r"no longer holds the first \d+ bytes of x\.neon"):
        async for _ in partials.prefixed("x.neon", len(DATA) + 1, upload()):
            pass
    with pytest.raises(Conflict):
        async for _ in partials.prefixed("other.neon", 1, upload()):
            pass
    partials.drop("x.neon")
    assert partials.describe("x.neon") == NO_PARTIAL


def test_an_empty_cut_keeps_nothing_and_old_ones_are_swept(tmp_path: Path) -> None:
    partials = Partials(tmp_path)
    cut_push(tmp_path, partials, "a.neon", b"aaa")
    cut_push(tmp_path, partials, "a.neon", b"")  # a cut before any byte: the old one goes
    assert partials.describe("a.neon") == NO_PARTIAL
    cut_push(tmp_path, partials, "old.neon", b"old")
    cut_push(tmp_path, partials, "new.neon", b"new")
    now = time.time()
    old = now - KEEP_SECONDS - 60
    os.utime(tmp_path / PARTIALS_DIR / "old.neon", (old, old))
    partials.sweep(now)
    assert sorted(os.listdir(tmp_path / PARTIALS_DIR)) == ["new.neon"]
    assert (tmp_path / PARTIALS_DIR).stat().st_mode & 0o777 == 0o700


def test_no_more_than_keep_files_are_kept(tmp_path: Path) -> None:
    """One token admits any number of cut pushes of different names (review M3): each keep
    leaves the newest KEEP_FILES, the one just kept among them however old its bytes are,
    and sweeps what is older than KEEP_SECONDS (a long-running serve never starts again)."""
    assert KEEP_FILES == 2
    partials = Partials(tmp_path)
    now = time.time()
    cut_push(tmp_path, partials, "a.neon", b"a", now - 30)
    cut_push(tmp_path, partials, "b.neon", b"b", now - 20)
    cut_push(tmp_path, partials, "c.neon", b"c", now - 10)
    assert sorted(os.listdir(tmp_path / PARTIALS_DIR)) == ["b.neon", "c.neon"]
    cut_push(tmp_path, partials, "d.neon", b"d", now - KEEP_SECONDS - 60)
    assert sorted(os.listdir(tmp_path / PARTIALS_DIR)) == ["c.neon", "d.neon"]
    old = now - KEEP_SECONDS - 60
    os.utime(tmp_path / PARTIALS_DIR / "c.neon", (old, old))
    cut_push(tmp_path, partials, "e.neon", b"e")
    assert sorted(os.listdir(tmp_path / PARTIALS_DIR)) == ["e.neon"]
    assert partials.describe("e.neon").size == 1


async def test_kept_bytes_cut_short_while_read_are_refused(tmp_path: Path) -> None:
    """Kept bytes truncated after their size was checked (review L6): Conflict, where the
    read went on yielding empty blocks for ever."""
    partials = Partials(tmp_path)
    cut_push(tmp_path, partials, "x.neon", DATA)
    reading = partials.prefixed("x.neon", len(DATA), upload(b"new"))
    got = [await anext(reading)]
    os.truncate(tmp_path / PARTIALS_DIR / "x.neon", len(got[0]))
    with pytest.raises(Conflict, match=r"kept bytes of x\.neon ended \d+ bytes short"):
        while len(got) < 100:
            got.append(await anext(reading))
    assert len(got) == 1
