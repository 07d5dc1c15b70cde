"""A delta `.neon` file read by the pageserver itself (pageserver/ingest/import_delta.py
`import_delta_file`): its fork members' pages put as they arrive, from pieces of any size,
never written as files; the rest extracted. The pack's reader and this one put the same
values, and refuse the same damage.

Before, `neon snapshot recv` extracted a pushed delta (its pages into the pack) and the
pageserver read the pack back once the whole file was there: ~60 ms of a neon:// delta
push after its last byte (issue 12).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from datadir_files.untar import extract_chunks
from pageserver.ingest.import_delta import (
    ForkRecords,
    _add_member,
    _database_of,
    _PackedForks,
    _StreamedForks,
)
from pg15.constants import BLCKSZ
from proto.errors import CorruptData
from snapfile.delta import PACK_NAME, fork_header
from tests.pageserver.ingest.test_import_delta_pack import (
    FORKS,
    Recorded,
    delta_tar,
    extract,
    fork_member,
    imported,
)


def pieces(data: bytes, size: int) -> Iterator[bytes]:
    for at in range(0, len(data), size):
        yield data[at : at + size]


def streamed(
    tar: bytes, target: Path, size: int = 3000
) -> tuple[_StreamedForks, list[tuple[bytes, bytes]]]:
    """The tar extracted with its fork members streamed: the forks and the pages put."""
    forks = _StreamedForks(target)
    sink = Recorded()
    forks.sink = sink  # type: ignore[assignment]
    extract_chunks(pieces(tar, size), target, delta_members=forks.member)
    return forks, sink.values


@pytest.mark.parametrize("size", [1, 3000, 1 << 20])
def test_streamed_members_put_what_the_pack_did_and_make_no_file(tmp_path: Path, size: int) -> None:
    target, packed = tmp_path / "streamed", tmp_path / "packed"
    forks, pages = streamed(delta_tar(), target, size)
    sizes = imported(forks, target)  # type: ignore[arg-type]
    forks.check_all_taken()
    extract(delta_tar(), packed, pack=True)
    with _PackedForks(packed, packed / PACK_NAME) as from_pack:
        expected = imported(from_pack, packed)
    assert sorted(pages + sizes) == sorted(expected)
    assert len(pages) == sum(len(blocks) for _, blocks in FORKS.values())
    files = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    assert files == ["PG_VERSION", "base/5/PG_VERSION", "global/pg_control"]
    assert not (target / "neon-delta").exists()


def test_fork_records_take_pieces_of_any_size_and_name_a_cut() -> None:
    member = fork_member(600, list(range(0, 600, 2)))  # 300 pages
    whole: list[tuple[int, bytes]] = []
    records = ForkRecords(lambda b, p: whole.append((b, p)), len(member), "m")
    records.write(member)
    records.end()
    assert records.nblocks == 600 and len(whole) == 300
    assert whole[1] == (2, member[16 + 8196 + 4 :][:BLCKSZ])
    rng = random.Random(7)
    for _ in range(20):
        got: list[tuple[int, bytes]] = []
        records = ForkRecords(lambda b, p, got=got: got.append((b, p)), len(member), "m")
        at = 0
        while at < len(member):
            step = rng.choice([1, 3, 4, 15, 17, 8195, 8196, 8197, 50000])
            records.write(memoryview(member)[at : at + step])
            at += step
        records.end()
        assert got == whole
    five = 16 + 5 * (4 + BLCKSZ)  # the header and five records: blocks 0 to 8
    cuts = {five: "ends after block 8", five + 2: "ends inside a block number",
            five + 99: "ends inside block 10", 16: "ends after its header",
            9: "is shorter than its header"}  # fmt: skip
    for cut, error in cuts.items():
        records = ForkRecords(lambda b, p: None, len(member), "m")
        for piece in pieces(member[:cut], 5000):
            records.write(piece)
        with pytest.raises(CorruptData, match=f"'m' {error}"):
            records.end()
    records = ForkRecords(lambda b, p: None, len(member), "m")
    with pytest.raises(CorruptData, match="longer than its"):
        records.write(member + b"x")


def test_a_member_read_through_a_file_is_the_same_reader() -> None:
    """`_add_member` (the pack's and a member file's reader) feeds ForkRecords: a block out
    of order is refused there as in a stream."""
    member = fork_header(10) + b"".join(
        b.to_bytes(4, "little") + bytes([b]) * BLCKSZ for b in (3, 2)
    )
    data = iter([member[:16], member[16:]])
    with pytest.raises(CorruptData, match="block 2 after 3 in a fork of 10 blocks"):
        _add_member(Recorded(), 1663, 5, 16384, 0, lambda n: next(data), len(member), "m")


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        ({"neon-delta/base/x/16400": fork_member(1, [0])}, "not in a database's directory"),
        ({"neon-delta/base/5/16400.1": fork_member(1, [0])}, "names a segment, not a fork"),
        ({"neon-delta/pg_tblspc/1663/PG_15_202209061/5/16400": fork_member(1, [0])},
         "not in a database's directory"),
    ],
)  # fmt: skip
def test_a_member_out_of_place_is_refused_as_it_comes(
    tmp_path: Path, extra: dict[str, bytes], error: str
) -> None:
    with pytest.raises(CorruptData, match=error):
        streamed(delta_tar(extra), tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_members_of_a_database_the_delta_lacks_and_stray_files(tmp_path: Path) -> None:
    """A fork under base/7 with no base/7 directory in the delta: its pages were put, so
    the import is refused once the directories are known; a file there that is no fork
    is dropped (as the pack's reader skips one)."""
    extra = {"neon-delta/base/7/16400": fork_member(2, [1]),
             "neon-delta/base/5/pg_filenode.map": b"m" * 512}  # fmt: skip
    target = tmp_path / "d"
    forks, pages = streamed(delta_tar(extra), target)
    imported(forks, target)  # type: ignore[arg-type]
    with pytest.raises(CorruptData, match="under neon-delta/base/7 but no database directory"):
        forks.check_all_taken()
    assert len(pages) == sum(len(blocks) for _, blocks in FORKS.values()) + 1


def test_a_member_twice_is_refused(tmp_path: Path) -> None:
    # Another name in the tar for the same fork: "./" makes it a second member.
    extra = {"neon-delta/./base/5/16384": fork_member(10, [0])}
    with pytest.raises(CorruptData, match="twice"):
        streamed(delta_tar(extra), tmp_path / "d")


@pytest.mark.parametrize(
    ("directory", "place"),
    [
        ("global", (1664, 0)), ("base/5", (1663, 5)), ("base/16384", (1663, 16384)),
        ("pg_tblspc/16400/PG_15_202209061/5", (16400, 5)),
        ("base/05", None), ("base", None), ("base/5/6", None), ("global/1", None),
        ("pg_tblspc/16400/PG_14_202107181/5", None), ("pg_tblspc/1663/PG_15_202209061/5", None),
        ("pg_tblspc/x/PG_15_202209061/5", None), ("other/5", None),
    ],
)  # fmt: skip
def test_the_database_of_a_member_directory(directory: str, place: tuple[int, int] | None) -> None:
    assert _database_of(directory) == place
