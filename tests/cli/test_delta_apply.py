"""Applying a delta `.neon` tar (cli/delta_apply.py) to a parent's data directory: pages land
where they belong, forks are truncated, extended and dropped as the delta states, whole files
replace the parent's and what the snapshot lacks is removed; hostile deltas are refused
naming the member. And the resolution of a delta's parent chain in a store, with the one-line
error for a parent found nowhere."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest

import cli.delta_apply
from cli.delta_apply import DeltaApplier
from cli.snapshot_file_source import missing_parent, resolve_chain
from datadir_files.pg_account import pg_os_user
from pg15.constants import BLCKSZ, RELSEG_SIZE
from proto.errors import CorruptData
from snapfile.delta import BLOCK_NUMBER, FORK_HEADER, MAGIC, SnapshotIdentity, fork_header
from snapfile.manifest import Manifest
from tests.fifo import raised_within


def page(fill: int) -> bytes:
    return bytes([fill]) * BLCKSZ


def fork_data(nblocks: int, pages: dict[int, bytes], header: bytes | None = None) -> bytes:
    body = b"".join(BLOCK_NUMBER.pack(b) + p for b, p in pages.items())
    return (fork_header(nblocks) if header is None else header) + body


def delta_tar(members: list[tuple[str, bytes | None]], kind: bytes = tarfile.REGTYPE) -> bytes:
    """A tar of (name, data) members; None data: a directory."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.type = kind
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def apply(
    root: Path, tar: bytes, chunk: int = 5000, aside: Path | None = None, sparse_wal: bool = False
) -> None:
    applier = DeltaApplier(root, aside=aside, sparse_wal=sparse_wal)
    try:
        for i in range(0, len(tar), chunk):  # arbitrary cuts, records split across feeds
            applier.feed(tar[i : i + chunk])
        applier.finish()
    finally:
        applier.close()


@pytest.fixture
def parent(tmp_path: Path) -> Path:
    root = tmp_path / "pgdata"
    (root / "base" / "5").mkdir(parents=True)
    (root / "global").mkdir()
    (root / "pg_xact").mkdir()
    (root / "global" / "pg_control").write_bytes(b"old control")
    (root / "pg_xact" / "0000").write_bytes(b"old xact")
    (root / "pg_xact" / "0001").write_bytes(b"gone since")
    (root / "base" / "5" / "100").write_bytes(page(1) * 4)  # modified and extended
    (root / "base" / "5" / "200").write_bytes(page(2) * 6)  # truncated
    (root / "base" / "5" / "300").write_bytes(page(3) * 2)  # dropped
    (root / "base" / "5" / "300_init").write_bytes(page(3))  # dropped
    (root / "base" / "6").mkdir()  # a dropped database
    (root / "base" / "6" / "400").write_bytes(page(4))
    return root


@pytest.mark.parametrize(("aside", "sizes"), [(False, False), (True, False), (True, True)])
def test_a_delta_turns_the_parent_into_the_snapshot(parent: Path, aside: bool, sizes: bool) -> None:
    """`sizes`: the forks with no page listed in a checkout tar's FORK_SIZES members, one a
    directory, instead of a member each: the same directory results."""
    pageless: list[tuple[str, bytes | None]] = [
        ("neon-delta/base/5/200", fork_data(2, {})),
        ("neon-delta/base/7/600_init", fork_data(0, {})),  # a new database's empty fork
    ]
    if sizes:
        pageless = [
            ("neon-delta/base/5/neon-delta-sizes", b"200 2\n"),
            ("neon-delta/base/7/neon-delta-sizes", b"600_init 0\n"),
        ]
    tar = delta_tar(
        [
            ("global/", None),
            ("global/pg_control", b"new control"),
            ("pg_xact/0000", b"new xact"),
            ("neon-delta/base/5/100", fork_data(6, {1: page(9), 4: page(8), 5: page(7)})),
            pageless[0],
            ("neon-delta/base/5/500", fork_data(1, {0: page(5)})),  # created since
            pageless[1],
        ]
    )
    (parent / "base" / "5" / "link").symlink_to(parent / "global" / "pg_control")
    set_aside = parent.with_name("set-aside")
    apply(parent, tar, aside=set_aside if aside else None)
    base = parent / "base"
    assert (base / "5" / "100").read_bytes() == page(1) + page(9) + page(1) * 2 + page(8) + page(7)
    assert (base / "5" / "200").read_bytes() == page(2) * 2
    assert (base / "5" / "500").read_bytes() == page(5)
    assert (base / "7" / "600_init").read_bytes() == b""
    assert (parent / "global" / "pg_control").read_bytes() == b"new control"
    assert (parent / "pg_xact" / "0000").read_bytes() == b"new xact"
    files = sorted(p.relative_to(parent).as_posix() for p in parent.rglob("*"))
    assert files == [
        "base", "base/5", "base/5/100", "base/5/200", "base/5/500", "base/7", "base/7/600_init",
        "global", "global/pg_control", "pg_xact", "pg_xact/0000",
    ]  # fmt: skip
    # The files not named were moved aside whole (the link unlinked, never followed), not
    # unlinked: the caller deletes them later.
    moved = sorted(p.read_bytes() for p in set_aside.iterdir()) if aside else []
    gone = [page(3), page(3) * 2, page(4), b"gone since"] if aside else []
    assert moved == sorted(gone)
    assert set_aside.exists() == aside
    assert (parent / "global" / "pg_control").read_bytes() == b"new control"


def test_early_fsyncs_cover_every_file_written(parent: Path) -> None:
    """With sync_early, each file's fsync starts once its member is applied (make_durable
    then waits for them): every file written or resized, a file written again after its
    first fsync included, and nothing left unchanged."""
    (parent / "base" / "5" / "800").write_bytes(page(8))  # named, unchanged: no fsync
    tar = delta_tar(
        [
            ("global/pg_control", b"first"),
            ("neon-delta/base/5/100", fork_data(6, {1: page(9)})),
            ("neon-delta/base/5/200", fork_data(2, {})),
            ("neon-delta/base/5/800", fork_data(1, {})),
            ("neon-delta/base/7/600_init", fork_data(0, {})),
            ("global/pg_control", b"new control"),  # again, after its first fsync began
        ]
    )
    control = parent / "global" / "pg_control"
    second = tar.index(b"global/pg_control", tar.index(b"global/pg_control") + 1)
    applier = DeltaApplier(parent, sync_early=True)
    try:
        applier.feed(tar[: second + 512 + 3])  # into the second pg_control's data
        assert parent / "base" / "5" / "100" in applier.synced_early
        assert control not in applier.synced_early  # written again since its fsync began
        applier.feed(tar[second + 512 + 3 :])
        applier.finish()
        assert applier.synced_early == {
            control,
            parent / "base" / "5" / "100",
            parent / "base" / "5" / "200",
            parent / "base" / "7" / "600_init",
        }
        applier.make_durable()
    finally:
        applier.close()
    assert (parent / "global" / "pg_control").read_bytes() == b"new control"
    assert (parent / "base" / "5" / "100").read_bytes()[BLCKSZ:] == page(9) + page(1) * 2 + bytes(
        2 * BLCKSZ
    )


def test_a_wal_segment_is_whole_and_allocated_though_its_zeros_are_not_written(
    parent: Path,
) -> None:
    """A pg_wal member is allocated up front and its pieces of zeros skipped: the file is
    the member's bytes (zeros where an older file of that name had others), and all of it
    is allocated (a WAL segment is never sparse: no ENOSPC once PostgreSQL writes into it)."""
    size = 16 << 20
    segment = bytearray(size)
    segment[:100] = b"r" * 100  # the checkpoint record's page
    segment[9 << 20 : (9 << 20) + 10] = b"x" * 10  # a piece of data far in
    name = "pg_wal/000000020000000000000003"
    (parent / "pg_wal").mkdir()
    (parent / name).write_bytes(b"\xff" * size)  # an older segment of that name
    apply(parent, delta_tar([("pg_wal/", None), (name, bytes(segment))]), chunk=1 << 20)
    assert (parent / name).read_bytes() == segment
    assert (parent / name).stat().st_blocks * 512 >= size


def test_a_sparse_wal_segment_is_applied_only_from_a_checkouts_stream(parent: Path) -> None:
    """A GNU sparse member (the checkout stream's WAL segment) is read where the applier is
    told it comes (sparse_wal), at most a WAL segment's largest size; a `.neon` file's delta
    holding one is refused: a few KiB of it would have written any number of zeros."""
    from pageserver.basebackup.tar_stream import tar_sparse_file

    name = "pg_wal/000000020000000000000003"
    regions = [(0, b"r" * 100), (9 << 20, b"x" * 10)]

    def tar(size: int) -> bytes:
        return b"".join([*tar_sparse_file(name, size, regions, 1), bytes(1024)])

    (parent / "pg_wal").mkdir()
    with pytest.raises(CorruptData, match=f"{name}' is a GNU sparse file, not read here"):
        apply(parent, tar(16 << 20))
    with pytest.raises(CorruptData, match="larger than 1073741824 bytes"):
        apply(parent, tar((1 << 30) + 8192), sparse_wal=True)
    assert not (parent / name).exists()
    apply(parent, tar(16 << 20), chunk=1 << 20, sparse_wal=True)
    segment = bytearray(16 << 20)
    segment[:100] = b"r" * 100
    segment[9 << 20 : (9 << 20) + 10] = b"x" * 10
    assert (parent / name).read_bytes() == segment


def test_segments_follow_the_fork_size(parent: Path) -> None:
    rel = parent / "base" / "5" / "100"
    for segno in (1, 2):
        rel.with_name(f"100.{segno}").write_bytes(page(6))
    rel.with_name("200.1").write_bytes(page(6))  # past a fork with no page in the delta
    rel.with_name("200_fsm").write_bytes(page(6))  # as long as it should be: left as it is
    last = RELSEG_SIZE  # the first block of segment 1
    apply(
        parent,
        delta_tar(
            [
                ("neon-delta/base/5/100", fork_data(last + 1, {last: page(9)})),
                ("neon-delta/base/5/200", fork_data(6, {})),
                ("neon-delta/base/5/200_fsm", fork_data(1, {})),
            ]
        ),
    )
    assert rel.stat().st_size == RELSEG_SIZE * BLCKSZ
    assert rel.with_name("100.1").read_bytes() == page(9)
    assert not rel.with_name("100.2").exists()
    assert rel.with_name("200").read_bytes() == page(2) * 6
    assert not rel.with_name("200.1").exists()
    assert rel.with_name("200_fsm").read_bytes() == page(6)


@pytest.mark.parametrize("chunk", [1 << 30, 8197, 1])
def test_runs_of_pages_go_in_one_write_each(
    parent: Path, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Consecutive blocks of one segment file are written with one pwritev (the real call,
    counted): runs end at a gap and at a segment's end; records cut across feeds land all
    the same."""
    rel = parent / "base" / "5" / "100"
    top = RELSEG_SIZE + 2
    blocks = [0, 1, 2, 5, RELSEG_SIZE - 1, RELSEG_SIZE, RELSEG_SIZE + 1]
    writes: list[tuple[int, int]] = []
    real = os.pwritev

    def counted(fd: int, buffers: list[memoryview], offset: int) -> int:
        writes.append((offset // BLCKSZ, len(buffers)))
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", counted)
    pages = {b: page(10 + i) for i, b in enumerate(blocks)}
    apply(parent, delta_tar([("neon-delta/base/5/100", fork_data(top, pages))]), chunk=chunk)
    with rel.open("rb") as f:
        for b in [*blocks[:4], 3, 4, RELSEG_SIZE - 2]:
            f.seek(b * BLCKSZ)
            assert f.read(BLCKSZ) == pages.get(b, page(1) if b < 4 else bytes(BLCKSZ)), b
    assert rel.with_name("100.1").read_bytes() == pages[RELSEG_SIZE] + pages[RELSEG_SIZE + 1]
    if chunk > 1 << 20:  # the whole fork member in one feed
        assert writes == [(0, 3), (5, 1), (RELSEG_SIZE - 1, 1), (0, 2)]
    assert sum(n for _, n in writes) == len(blocks)


def test_pages_before_a_bad_record_are_written(parent: Path) -> None:
    """A block out of order is refused after the run before it was written, as when each
    page was written on its own (the directory is thrown away either way)."""
    rel = parent / "base" / "5" / "100"
    body = fork_data(4, {0: page(7), 1: page(8)}) + BLOCK_NUMBER.pack(1) + page(9)
    with pytest.raises(CorruptData, match="block 1 is out of order"):
        apply(parent, delta_tar([("neon-delta/base/5/100", body)]), chunk=1 << 30)
    assert rel.read_bytes()[: 2 * BLCKSZ] == page(7) + page(8)


def test_fork_files_end_up_private_whoever_left_them(parent: Path) -> None:
    """A segment file a killed run created (or anyone left) with other permissions or owner
    is made PostgreSQL's (as root) with mode 0600, although only some of its pages change:
    the applier hands over only files not so already, and must not miss one."""
    rel = parent / "base" / "5" / "100"
    rel.chmod(0o644)
    apply(parent, delta_tar([("neon-delta/base/5/100", fork_data(4, {0: page(9)}))]))
    st = rel.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600
    user = pg_os_user()
    if user is not None:
        assert (st.st_uid, st.st_gid) == (user.uid, user.gid)
    assert rel.read_bytes() == page(9) + page(1) * 3


def test_a_link_put_in_place_of_a_file_being_written_is_not_followed(
    parent: Path, tmp_path: Path
) -> None:
    """The directory is PostgreSQL's OS user's and the applier may be root: a file (or a
    fork's segment) that user replaces by a link while its member streams in is handed over
    through the applier's descriptor, never the file the link names."""
    outside = tmp_path / "outside"
    outside.write_bytes(b"root's own")
    outside.chmod(0o644)
    before = outside.stat()
    control = delta_tar([("global/pg_control", b"c" * 20_000)])
    fork = delta_tar([("neon-delta/base/5/100", fork_data(4, {0: page(9), 3: page(8)}))])
    for tar, target in ((control, "global/pg_control"), (fork, "base/5/100")):
        path = parent / target
        path.chmod(0o644)  # not PostgreSQL's yet: to be handed over at the member's end
        applier = DeltaApplier(parent)
        try:
            applier.feed(tar[:4096])  # the member started: its file is open
            path.unlink()
            path.symlink_to(outside)
            applier.feed(tar[4096:])
        finally:
            applier.close()
        after = outside.stat()
        assert outside.read_bytes() == b"root's own"
        assert (stat.S_IMODE(after.st_mode), after.st_uid) == (0o644, before.st_uid)


@pytest.mark.parametrize(
    ("target", "member", "data"),
    [
        ("global/pg_control", "global/pg_control", b"c" * 200_000),
        ("base/5/100", "neon-delta/base/5/100", fork_data(40, {0: page(9), 39: page(8)})),
    ],
)
def test_a_fifo_put_in_place_of_a_file_is_refused_not_written(
    parent: Path, target: str, member: str, data: bytes
) -> None:
    """A file a delta writes over (or a fork segment it resizes) exists legitimately, so
    it is opened without O_EXCL: a FIFO PostgreSQL's account put there instead was opened
    and written (failing only at a positioned write or the resize, ESPIPE or EINVAL; a
    device would have been written): refused as not a regular file, naming the member."""
    fifo = parent / target
    fifo.unlink()
    os.mkfifo(fifo)
    error = raised_within(lambda: apply(parent, delta_tar([(member, data)])), parent)
    assert isinstance(error, CorruptData)
    assert f"{member!r}" in str(error) and "not a regular file" in str(error)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


REL = "neon-delta/base/5/100"


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([("../escape", b"x")], "leads outside the target"),
        ([("/etc/passwd", b"x")], "absolute or unusual path"),
        ([("neon-delta/../../x", fork_data(1, {}))], "leads outside the target"),
        ([("neon-delta/base/5/pg_filenode.map", fork_data(1, {}))], "names no relation fork"),
        ([("neon-delta/base/5/100.1", fork_data(1, {}))], "names no relation fork"),
        ([(REL, fork_data(2, {2: page(1)}))], "block 2 is past the fork's size"),
        ([(REL, fork_data(4, {3: page(1), 1: page(1)}))], "block 1 is out of order"),
        (
            [(REL, FORK_HEADER.pack(MAGIC, 4096, 1) + bytes(4 + 4096))],
            "has pages of 4096 bytes",
        ),
        ([(REL, fork_data(3, {0: page(1)}) + b"xyz")], "not whole page records"),
        ([(REL, b"NOTADELT" + bytes(8))], "does not start with NEONDLT1"),
        ([(REL, fork_data(1, {0: page(1), 1: page(1)}))], "2 pages for a fork of 1"),
    ],
)  # fmt: skip
def test_hostile_deltas_are_refused(
    parent: Path, members: list[tuple[str, bytes | None]], message: str
) -> None:
    with pytest.raises(CorruptData, match=message):
        apply(parent, delta_tar(members))
    assert not (parent.parent / "escape").exists() and not (parent.parent / "x").exists()


def test_links_and_cut_archives_are_refused(parent: Path) -> None:
    with pytest.raises(CorruptData, match="it is a symbolic link"):
        apply(parent, delta_tar([("global/pg_control", b"")], kind=tarfile.SYMTYPE))
    tar = delta_tar([("neon-delta/base/5/100", fork_data(4, {0: page(1)}))])
    with pytest.raises(CorruptData):
        apply(parent, tar[:3000])
    # nothing is removed before the whole delta was applied
    assert (parent / "base" / "6" / "400").exists()


def manifest(source: str, lsn: int, parent: tuple[str, int] | None = None) -> Manifest:
    return Manifest(
        pg_version=15, system_identifier=7, lsn=lsn, pg_timeline=1, source=source,
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
        parent=None if parent is None else parent[0],
        parent_lsn=None if parent is None else parent[1],
    )  # fmt: skip


def test_a_chain_resolves_to_a_whole_file_and_a_missing_parent_is_named() -> None:
    s1 = manifest("pgdata1@s1", 100)
    s2 = manifest("pgdata1@s2", 200, ("pgdata1@s1", 100))
    s3 = manifest("pgdata1@s3", 300, ("pgdata1@s2", 200))
    s2_whole = manifest("pgdata1@s2", 200)
    files = {"a.neon": s1, "b.neon": s2, "c.neon": s3}
    assert resolve_chain("c.neon", s3, files) == [("a.neon", s1), ("b.neon", s2), ("c.neon", s3)]
    files["b-full.neon"] = s2_whole  # a whole file of the same snapshot: the shorter chain
    assert resolve_chain("c.neon", s3, files) == [("b-full.neon", s2_whole), ("c.neon", s3)]
    wrong_lsn = manifest("pgdata1@s1", 99)
    missing = resolve_chain("b.neon", s2, {"a.neon": wrong_lsn, "b.neon": s2})
    assert missing == SnapshotIdentity("pgdata1@s1", 100, 7)
    error = str(missing_parent("file:///x/b.neon", missing, "file:///x/"))
    assert error == (
        "file:///x/b.neon is a delta on snapshot pgdata1@s1 at LSN 0/00000064 (system 7), "
        "which file:///x/ does not have; push the snapshot whole with `neon snapshot push --full`"
    )
    loop = manifest("pgdata1@s1", 100, ("pgdata1@s2", 200))
    with pytest.raises(CorruptData, match="is not older than it"):
        resolve_chain("a.neon", loop, {"a.neon": loop, "b.neon": s2})


def test_a_whole_file_holding_the_members_bytes_is_left_as_it_was(parent: Path) -> None:
    """A whole file is written over, never truncated first, and only where its bytes differ:
    one that holds the member's bytes already keeps its blocks and times and needs no fsync
    (most of a checkout's whole files: pg_xact, maps, PG_VERSION); one that differs is
    rewritten, one longer than the member cut to its size."""
    same, cut = parent / "pg_xact" / "0000", parent / "global" / "pg_control"
    long_ago = 1_000_000_000
    for path in (same, cut):
        os.utime(path, (long_ago, long_ago))
    tar = delta_tar(
        [
            ("pg_xact/0000", b"old xact"),  # as it is
            ("global/pg_control", b"old"),  # its start: cut to it
            ("pg_xact/0001", b"gone sinCE"),  # differs at its end
        ]
    )
    applier = DeltaApplier(parent, sync_early=True)
    try:
        for i in range(0, len(tar), 700):
            applier.feed(tar[i : i + 700])
        applier.finish()
        assert applier.synced_early == {cut, parent / "pg_xact" / "0001"}
        applier.make_durable()
    finally:
        applier.close()
    assert same.read_bytes() == b"old xact" and same.stat().st_mtime == long_ago
    assert cut.read_bytes() == b"old" and cut.stat().st_mtime != long_ago
    assert (parent / "pg_xact" / "0001").read_bytes() == b"gone sinCE"


def test_a_run_again_after_a_failed_one_writes_whole_files_even_if_they_read_the_same(
    parent: Path,
) -> None:
    """After a writeback error the page cache may read as the member while the disk holds
    the old bytes (Linux marks the lost pages clean), and a fresh fsync reports nothing: the
    run after a failed one (`compare=False`) writes each whole file again, so its fsync
    makes the bytes durable."""
    same = parent / "pg_xact" / "0000"
    long_ago = 1_000_000_000
    os.utime(same, (long_ago, long_ago))
    applier = DeltaApplier(parent, compare=False)
    try:
        applier.feed(delta_tar([("pg_xact/0000", b"old xact")]))
        applier.finish()
        applier.make_durable()
    finally:
        applier.close()
    assert same.read_bytes() == b"old xact" and same.stat().st_mtime != long_ago


def test_a_large_fork_is_written_back_while_its_pages_arrive(
    parent: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With sync_early, a segment's fsync starts after every _WRITE_BACK_BYTES of pages
    written into it, before its member ends (its final fsync then finds little left);
    make_durable waits for those too and raises their errors."""
    monkeypatch.setattr(cli.delta_apply, "_WRITE_BACK_BYTES", 2 * BLCKSZ)
    fsync = cli.delta_apply._fsync_file
    synced: list[Path] = []

    def recorded(path: Path) -> None:
        synced.append(path)
        fsync(path)

    monkeypatch.setattr(cli.delta_apply, "_fsync_file", recorded)
    rel = parent / "base" / "5" / "100"
    tar = delta_tar([("neon-delta/base/5/100", fork_data(8, {b: page(b) for b in range(8)}))])
    applier = DeltaApplier(parent, sync_early=True)
    try:
        applier.feed(tar[: len(tar) // 2])  # about half the pages: the member goes on
        applier._syncer.shutdown(wait=True)  # type: ignore[union-attr]
        assert rel in synced  # begun before the member's end
    finally:
        applier.close()

    def failing(path: Path) -> None:  # the write-back's fsync only: the final one passes
        if threading.current_thread().name.startswith("fsync"):
            raise OSError(5, "Input/output error")
        fsync(path)

    monkeypatch.setattr(cli.delta_apply, "_fsync_file", failing)
    applier = DeltaApplier(parent, sync_early=True)
    try:
        applier.feed(tar[: len(tar) // 2])
        with pytest.raises(OSError, match="Input/output"):
            applier.make_durable()
    finally:
        applier.close()


@pytest.mark.parametrize(
    ("name", "data", "why"),
    [
        ("neon-delta/base/5/neon-delta-sizes", b"200 2", "ends inside a line"),
        ("neon-delta/base/5/neon-delta-sizes", b"200.1 2\n", "bad line"),
        ("neon-delta/base/5/neon-delta-sizes", b"../200 2\n", "bad line"),
        ("neon-delta/base/5/neon-delta-sizes", b"200 99999999999\n", "bad line"),
        ("neon-delta/pg_tblspc/9/neon-delta-sizes", b"200 2\n", "names no relation fork"),
    ],
)
def test_a_bad_list_of_forks_is_refused(parent: Path, name: str, data: bytes, why: str) -> None:
    with pytest.raises(CorruptData, match=why):
        apply(parent, delta_tar([(name, data)]))
    assert (parent / "base" / "5" / "200").read_bytes() == page(2) * 6  # not resized


@pytest.mark.parametrize("listed", [False, True])
def test_every_segment_of_a_fork_with_no_page_is_settled(parent: Path, listed: bool) -> None:
    """A fork with no page in the delta, of two segments neither of them as it should be
    (mode 0644; the second also short), is made so once the stream has ended, each
    segment in turn (as its member, or listed in a FORK_SIZES member)."""
    rel = parent / "base" / "5" / "900"
    with rel.open("wb") as f:
        f.truncate(RELSEG_SIZE * BLCKSZ)  # segment 0, sparse
    rel.chmod(0o644)
    rel.with_name("900.1").write_bytes(page(3))
    rel.with_name("900.1").chmod(0o644)
    member = (
        ("neon-delta/base/5/neon-delta-sizes", f"900 {RELSEG_SIZE + 2}\n".encode())
        if listed
        else ("neon-delta/base/5/900", fork_data(RELSEG_SIZE + 2, {}))
    )
    apply(parent, delta_tar([member]))
    for path, size in ((rel, RELSEG_SIZE * BLCKSZ), (rel.with_name("900.1"), 2 * BLCKSZ)):
        st = path.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_size) == (0o600, size), path
