"""Writer then reader: the same tar back whatever the sizes and chunkings, the same file
whatever the writer's chunking, and a download resumable at `verified_offset`."""

from __future__ import annotations

import hashlib
import io

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pageserver_api.errors import CorruptData, InvalidArgument
from snapfile import (
    SnapshotFileReader,
    SnapshotFileWriter,
    TarData,
    looks_like_snapshot_file,
    read_manifest,
)
from snapfile.container import HEADER_SIZE, TarBytesPassed, frame_name, padded
from tests.snapfile.snapfile_helpers import (
    decode,
    encode,
    generated_bytes,
    make_manifest,
    make_tar,
    split,
)

FRAME = 4096
chunkings = st.lists(st.integers(min_value=0, max_value=3 * FRAME), max_size=5)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.one_of(
        st.sampled_from([0, 1, FRAME - 1, FRAME, FRAME + 1, 3 * FRAME]),
        st.integers(min_value=0, max_value=6 * FRAME),
    ),
    seed=st.integers(0, 1000),
    write_chunks=chunkings,
    read_chunks=chunkings,
)
def test_round_trip_any_size_and_chunking(
    size: int, seed: int, write_chunks: list[int], read_chunks: list[int]
) -> None:
    tar = generated_bytes(size, seed)
    manifest = make_manifest(FRAME)
    neon, checksums = encode(manifest, tar, write_chunks)
    # The encoding does not depend on how the tar was fed (a sender may regenerate it).
    assert neon == encode(manifest, tar)[0]
    got_manifest, got_tar, got_checksums = decode(neon, read_chunks)
    assert got_manifest == manifest
    assert got_tar == tar
    assert got_checksums == checksums
    assert checksums.data_size == size
    assert checksums.data_sha256 is None  # format version 2
    # At least one frame (an empty tar has one empty frame), all full but the last.
    assert len(checksums.frames) == max(1, -(-size // FRAME))
    assert [f.name for f in checksums.frames] == [
        frame_name(i) for i in range(len(checksums.frames))
    ]
    assert all(f.data_size == FRAME for f in checksums.frames[:-1])
    for entry in checksums.members:
        data = neon[entry.offset : entry.offset + entry.size]
        assert hashlib.sha256(data).hexdigest() == entry.sha256
    end = checksums.frames[-1].offset + padded(checksums.frames[-1].size)
    assert neon[end : end + HEADER_SIZE].startswith(b"PaxHeaders/checksums.json\0")
    trailer = neon[end + HEADER_SIZE : -1024].rstrip(b"\0")
    assert hashlib.sha256(trailer).hexdigest() == checksums.content_id


def test_frame_data_events_are_whole_frames() -> None:
    tar = generated_bytes(5 * FRAME + 100, 7)
    neon, checksums = encode(make_manifest(FRAME), tar, [1000])
    reader = SnapshotFileReader()
    events = list(reader.feed(neon)) + list(reader.finish())
    frames = [e for e in events if isinstance(e, TarData)]
    assert [e.frame for e in frames] == list(checksums.frames)
    assert [len(e.data) for e in frames] == [FRAME] * 5 + [100]


def test_default_frames_are_4_mib_and_level_is_configurable() -> None:
    rows = b"".join(b"%d|%d|customer %d\n" % (i, i * 7919 % 100003, i % 977) for i in range(10**6))
    tar = (rows * 2)[: 9 * 1024 * 1024]  # text-like: a higher level finds more to save
    manifest = make_manifest(4 * 1024 * 1024)
    fast, checksums = encode(manifest, tar, [256 * 1024], level=1)
    small, _ = encode(manifest, tar, [256 * 1024], level=19)
    assert [f.data_size for f in checksums.frames] == [4 << 20, 4 << 20, 1 << 20]
    assert len(small) < len(fast)
    assert decode(small)[1] == tar
    assert make_manifest(frame_size=4096).frame_size == 4096
    with pytest.raises(InvalidArgument, match="zstd level"):
        SnapshotFileWriter(manifest, level=0)


def test_writer_refuses_use_after_finish() -> None:
    writer = SnapshotFileWriter(make_manifest(FRAME))
    with pytest.raises(InvalidArgument, match="not finished"):
        _ = writer.checksums
    writer.write(b"abc")
    writer.finish()
    with pytest.raises(InvalidArgument, match="already finished"):
        writer.write(b"x")


@settings(max_examples=30, deadline=None)
@given(cut=st.integers(min_value=0, max_value=10**9), seed=st.integers(0, 100))
def test_resume_from_verified_offset(cut: int, seed: int) -> None:
    """A download cut anywhere keeps `verified_offset` bytes (a frame boundary), then fetches
    the rest from there: the reader fed both ends as if nothing happened."""
    tar = generated_bytes(7 * FRAME + 33, seed)
    neon, _ = encode(make_manifest(FRAME), tar)
    cut %= len(neon) + 1
    first = SnapshotFileReader()
    kept = b"".join(e.data for e in first.feed(neon[:cut]) if isinstance(e, TarData))
    resume_at = first.verified_offset
    assert resume_at <= cut
    assert resume_at % 512 == 0
    # The second run re-verifies the kept prefix (a local file), then continues from the cut.
    second = SnapshotFileReader()
    redone = b"".join(e.data for e in second.feed(neon[:resume_at]) if isinstance(e, TarData))
    assert redone == kept
    assert second.verified_offset == resume_at
    rest = list(second.feed(neon[resume_at:])) + list(second.finish())
    assert kept + b"".join(e.data for e in rest if isinstance(e, TarData)) == tar


def test_read_manifest_reads_only_the_head_and_checks_it() -> None:
    tar = generated_bytes(3 * FRAME, 5)
    manifest = make_manifest(FRAME)
    neon, checksums = encode(manifest, tar)
    inp = io.BytesIO(neon)
    assert read_manifest(inp) == manifest
    assert inp.tell() <= checksums.frames[0].offset
    damaged = bytearray(neon)
    damaged[checksums.manifest.offset + 5] ^= 1
    with pytest.raises(CorruptData, match=r"x.neon is corrupt: manifest.json at offset 1536"):
        read_manifest(io.BytesIO(bytes(damaged)), label="x.neon")
    with pytest.raises(CorruptData, match=r"x.neon is truncated at offset 100: the header of"):
        read_manifest(io.BytesIO(neon[:100]), label="x.neon")


def test_looks_like_snapshot_file() -> None:
    neon, _ = encode(make_manifest(FRAME), b"abc")
    assert looks_like_snapshot_file(neon[:512])
    assert not looks_like_snapshot_file(make_tar({"manifest.json": b"{}"})[:512])
    assert not looks_like_snapshot_file(b"")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.sampled_from([0, 1, FRAME, FRAME + 1, 5 * FRAME + 7]),
    read_chunks=st.lists(st.integers(min_value=1, max_value=2 * FRAME), max_size=8),
)
def test_tar_bytes_passed_counts_each_frame_once_it_passed(
    size: int, read_chunks: list[int]
) -> None:
    """A pusher's progress: the frames' tar bytes, each counted once its member passed,
    however the file comes; all of the tar at its end, never more."""
    tar = generated_bytes(size, 3)
    neon, checksums = encode(make_manifest(FRAME), tar)
    passed = TarBytesPassed()
    frame_ends = {f.offset + padded(f.size): f.data_size for f in checksums.frames}
    seen = 0
    for piece in split(neon, read_chunks):
        passed.feed(piece)
        seen += len(piece)
        assert passed.tar_bytes == sum(n for end, n in frame_ends.items() if end <= seen)
    assert passed.tar_bytes == size


def test_tar_bytes_passed_stops_where_no_member_is() -> None:
    neon, _ = encode(make_manifest(FRAME), generated_bytes(2 * FRAME, 4))
    passed = TarBytesPassed()
    passed.feed(b"x" * HEADER_SIZE + neon)  # not a .neon file: nothing counted, no error
    assert passed.tar_bytes == 0
