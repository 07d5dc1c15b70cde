"""A delta `.neon` file read by the pageserver itself (pageserver/ingest/import_delta.py
`import_delta_file`): its fork members' pages put as they arrive, from pieces of any size,
never written as files; the rest extracted. The pack's reader and this one put the same
values, and refuse the same damage.

Before, `neon snapshot recv` extracted a pushed delta (its pages into the pack) and the
pageserver read the pack back once the whole file was there: ~60 ms of a neon:// delta
push after its last byte (issue 12).
"""

from __future__ import annotations

import io
import random
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from datadir_files.untar import extract_chunks
from pageserver.ingest import import_datadir as imp
from pageserver.ingest import import_delta
from pageserver.ingest.import_delta import (
    ForkRecords,
    _add_member,
    _database_of,
    _PackedForks,
    _StreamedForks,
    import_delta_file,
)
from pageserver.ingest.import_neon import DONE_SUFFIX, NeonSource
from pg15.constants import BLCKSZ
from pg15.datadir_layout import parse_relation_file_name
from pg15.pg_control import read_control_file
from proto.errors import Conflict, CorruptData
from snapfile.delta import BLOCK_NUMBER, FORK_HEADER, PACK_NAME, fork_header
from snapfile.manifest import Manifest, origin_of
from snapfile.writer import write_snapshot_file
from tests.pageserver.ingest.test_import_delta_pack import (
    FORKS,
    Recorded,
    delta_tar,
    extract,
    fork_member,
    imported,
)
from tests.pageserver.ingest.test_import_threads import (
    basebackup_digest,
    datadir,  # noqa: F401 (the fixture)
    imported_tar,
    new_timeline,
)
from tests.snapfile.snapfile_helpers import make_manifest


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


# -- the whole import on a real timeline ------------------------------------------------------


def every_page_delta(root: Path, out: Path, **manifest: object) -> Manifest:
    """`out`: `root` as a delta `.neon` file on a parent with nothing in it: each relation
    fork a `neon-delta/` member carrying every page (first, as the daemon writes them), the
    other files whole, pg_control last; its manifest's LSN the shutdown checkpoint's."""
    control = read_control_file(root)
    fields: dict[str, object] = {
        "frame_size": 5 * 4096,  # not whole pages: records are cut across frames
        "system_identifier": control.system_identifier,
        "lsn": control.checkpoint_lsn,
        "parent": "pgdata1@p",
        "parent_lsn": 0x100,
    }
    made = make_manifest(**(fields | manifest))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        paths = sorted(root.rglob("*"))
        for path in paths:
            relative = path.relative_to(root)
            fork = _relation_fork(relative)
            if fork is None:
                continue
            data = path.read_bytes()
            blocks = len(data) // BLCKSZ
            body = b"".join(
                BLOCK_NUMBER.pack(b) + data[b * BLCKSZ : (b + 1) * BLCKSZ] for b in range(blocks)
            )
            info = tarfile.TarInfo(f"neon-delta/{relative}")
            info.size = FORK_HEADER.size + len(body)
            tar.addfile(info, io.BytesIO(fork_header(blocks) + body))
        control_path = root / "global" / "pg_control"
        for path in paths:
            relative = path.relative_to(root)
            if _relation_fork(relative) is None and path != control_path:
                tar.add(path, str(relative), recursive=False)
        tar.add(control_path, "global/pg_control", recursive=False)
    with out.open("wb") as f:
        write_snapshot_file(f, made, [buf.getvalue()])
    return made


def _relation_fork(relative: Path) -> tuple[int, int] | None:
    parts = relative.parts
    in_database = (parts[:1] == ("global",) and len(parts) == 2) or parts[:1] == ("base",)
    if not in_database or len(parts) != (2 if parts[0] == "global" else 3):
        return None
    parsed = parse_relation_file_name(parts[-1])
    return None if parsed is None or parsed.segno else (parsed.relfilenode, parsed.fork)


def import_file(
    path: Path, work: Path, origin: str, start: int = 0, fetching: bool = False
) -> tuple[str, int]:
    """`import_delta_file` onto a new timeline whose last record is at `start`: its
    basebackup tar's SHA-256 and the import LSN."""
    with new_timeline(work / "store") as timeline:
        if start:
            timeline.advance_last_record_lsn(start, None)
        source = NeonSource(path, path.name, fetching)
        lsn = import_delta_file(timeline, source, work / "delta", origin)
        return basebackup_digest(timeline, lsn), lsn


def test_a_delta_of_every_page_imports_what_a_whole_import_does(
    datadir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    path = tmp_path / "d.neon"
    manifest = every_page_delta(datadir, path)
    plain, _ = imported_tar(datadir, tmp_path / "plain", 1)
    digest, lsn = import_file(path, tmp_path / "work", origin_of(manifest))
    assert lsn == imp.import_lsn_of(datadir) and digest == plain
    left = sorted(str(p.relative_to(tmp_path / "work" / "delta")) for p in
                  (tmp_path / "work" / "delta").rglob("*") if p.is_file())  # fmt: skip
    assert not any(_relation_fork(Path(name)) for name in left)  # no fork written as a file


def test_a_delta_file_is_refused_for_its_manifest_or_lsns_before_anything_shows(
    datadir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    path = tmp_path / "d.neon"
    manifest = every_page_delta(datadir, path)
    origin = origin_of(manifest)
    end = imp.import_lsn_of(datadir)
    with pytest.raises(CorruptData, match="changed while it was read"):
        import_file(path, tmp_path / "w1", origin.replace("127.0.0.1", "127.0.0.2"))
    whole = tmp_path / "whole.neon"
    whole_manifest = every_page_delta(datadir, whole, parent=None, parent_lsn=None)
    with pytest.raises(CorruptData, match="whole snapshot file, not a delta"):
        import_file(whole, tmp_path / "w2", origin_of(whole_manifest))
    # The manifest's LSN not above the branch point: refused at its first batch of pages
    # (the batches would have nowhere to go, and grow without bound).
    with pytest.raises(Conflict, match="more pages than fit between its parent's LSN"):
        import_file(path, tmp_path / "w3", origin, start=manifest.lsn)

    # Pages put up to a manifest's LSN that lies above the data directory's: refused once
    # pg_control says where the snapshot is.
    far = tmp_path / "far.neon"
    far_manifest = every_page_delta(datadir, far, lsn=end + (1 << 20))
    with pytest.raises(Conflict, match="not above the last LSN its pages were put at"):
        import_file(far, tmp_path / "w4", origin_of(far_manifest), start=end - 16)


def test_pages_go_on_the_branch_while_the_file_still_arrives(
    datadir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A file being written (recv's) is read as it grows: the big fork's pages are put
    (the branch's last record LSN moves, a batch at a time) before its end is written."""
    whole = tmp_path / "whole.neon"
    manifest = every_page_delta(datadir, whole)
    plain, _ = imported_tar(datadir, tmp_path / "plain", 1)
    data = whole.read_bytes()
    path = tmp_path / "d.neon"
    path.touch()
    seen_before_end: list[int] = []
    with new_timeline(tmp_path / "work" / "store") as timeline:

        def write() -> None:
            with path.open("wb", buffering=0) as f:
                f.write(data[: len(data) * 3 // 4])
                deadline = time.monotonic() + 60
                while timeline.last_record_lsn == 0 and time.monotonic() < deadline:
                    time.sleep(0.01)
                seen_before_end.append(timeline.last_record_lsn)
                f.write(data[len(data) * 3 // 4 :])
            Path(f"{path}{DONE_SUFFIX}").touch()

        writer = threading.Thread(target=write)
        writer.start()
        try:
            source = NeonSource(path, path.name, fetching=True)
            lsn = import_delta_file(
                timeline, source, tmp_path / "work" / "delta", origin_of(manifest)
            )
            assert basebackup_digest(timeline, lsn) == plain
        finally:
            writer.join()
    assert seen_before_end[0] > 0


def test_a_delta_whose_manifest_lsn_is_below_the_branch_point_imports(
    datadir: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two snapshots a few WAL records apart: the parent's branch point here is its
    checkpoint record's end, above the child's manifest LSN (its checkpoint record's
    start). Pages that fit in the final batch import all the same."""
    monkeypatch.setattr(import_delta, "BATCH_BYTES", 1 << 40)  # one batch: the final one
    path = tmp_path / "d.neon"
    manifest = every_page_delta(datadir, path)
    plain, _ = imported_tar(datadir, tmp_path / "plain", 1)
    end = imp.import_lsn_of(datadir)
    assert manifest.lsn < end - 16
    digest, lsn = import_file(path, tmp_path / "work", origin_of(manifest), start=end - 16)
    assert lsn == end and digest == plain
    # The data directory's LSN not above the branch point: refused.
    with pytest.raises(Conflict, match=r"LSN .* is not above its parent's"):
        import_file(path, tmp_path / "w", origin_of(manifest), start=end)
