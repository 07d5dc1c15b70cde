"""Every damage to a .neon file raises CorruptData naming the member and the offset, and
nothing of a damaged frame is ever yielded."""

from __future__ import annotations

import hashlib
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pageserver_api.errors import CorruptData
from snapfile import Checksums, SnapshotFileReader, TarData
from snapfile.container import END_OF_ARCHIVE, HEADER_SIZE, member_header, padded, padding
from snapfile.frame_buffers import FrameBuffers
from snapfile.reader import ManifestRead, ReaderEvent, SnapshotEnd
from tests.snapfile.snapfile_helpers import decode_events, encode, generated_bytes, make_manifest

FRAME = 4096
TAR = generated_bytes(4 * FRAME + 1234, 11)
MANIFEST = make_manifest(FRAME)
NEON, CHECKSUMS = encode(MANIFEST, TAR)
ERROR = re.compile(r"^x\.neon is (corrupt|truncated)(: (.+))? at offset (\d+)")


def spans(checksums: Checksums, total: int) -> list[tuple[str, int, int]]:
    """(member, start, end) of every member's header+data+padding, then the end blocks."""
    out = [(m.name, m.offset - HEADER_SIZE, m.offset + padded(m.size)) for m in checksums.members]
    trailer_start = out[-1][2]
    end_start = total - len(END_OF_ARCHIVE)
    out.append(("checksums.json", trailer_start, end_start))
    out.append(("end-of-archive", end_start, total))
    return out


SPANS = spans(CHECKSUMS, len(NEON))


def member_at(offset: int) -> tuple[str, int, int]:
    return next((name, start, end) for name, start, end in SPANS if start <= offset < end)


def decode_until_error(neon: bytes, chunks: list[int]) -> tuple[list[ReaderEvent], CorruptData]:
    events: list[ReaderEvent] = []
    with pytest.raises(CorruptData) as exc:
        decode_events(neon, chunks, events)
    assert not any(isinstance(e, SnapshotEnd) for e in events)
    return events, exc.value


def assert_only_whole_verified_frames(events: list[ReaderEvent], bad_from: int) -> None:
    """Yielded data is the tar's prefix, in whole frames, all of members before `bad_from`."""
    frames = [e for e in events if isinstance(e, TarData)]
    data = b"".join(e.data for e in frames)
    assert TAR.startswith(data)
    assert all(e.frame.offset + e.frame.size <= bad_from for e in frames)
    assert len(data) % FRAME == 0 or len(data) == len(TAR)


@settings(max_examples=300, deadline=None)
@given(
    position=st.integers(min_value=0, max_value=len(NEON) - 1),
    xor=st.integers(min_value=1, max_value=255),
    chunks=st.lists(st.integers(min_value=1, max_value=5000), max_size=3),
)
def test_flipped_byte_anywhere_is_named(position: int, xor: int, chunks: list[int]) -> None:
    damaged = bytearray(NEON)
    damaged[position] ^= xor
    events, error = decode_until_error(bytes(damaged), chunks)
    m = ERROR.match(str(error))
    assert m is not None, str(error)
    name, start, end = member_at(position)
    assert name in str(error)
    assert start <= int(m.group(4)) < end
    assert_only_whole_verified_frames(events, position)


def test_every_byte_of_a_small_file_is_protected() -> None:
    """Exhaustive on an empty snapshot: no byte of it can change unnoticed."""
    neon, _ = encode(MANIFEST, b"")
    for position in range(len(neon)):
        damaged = bytearray(neon)
        damaged[position] ^= 0x20
        with pytest.raises(CorruptData, match=r"^x\.neon is corrupt: .* at offset \d+"):
            decode_events(bytes(damaged))


@settings(max_examples=200, deadline=None)
@given(
    cut=st.integers(min_value=0, max_value=len(NEON) - 1),
    chunks=st.lists(st.integers(min_value=1, max_value=5000), max_size=3),
)
def test_truncation_anywhere_is_named(cut: int, chunks: list[int]) -> None:
    events, error = decode_until_error(NEON[:cut], chunks)
    assert str(error).startswith(f"x.neon is truncated at offset {cut}: ")
    name, _, _ = member_at(cut)
    assert name.replace("end-of-archive", "end-of-archive blocks") in str(error)
    assert_only_whole_verified_frames(events, cut)


def members(neon: bytes) -> list[bytes]:
    return [neon[start:end] for _, start, end in SPANS]


def test_reordered_member_is_named() -> None:
    parts = members(NEON)
    parts[1], parts[2] = parts[2], parts[1]
    events, error = decode_until_error(b"".join(parts), [])
    assert str(error) == (
        f"x.neon is corrupt: frames/00000001.zst at offset {SPANS[1][1]}: member "
        "'frames/00000001.zst' where frames/00000000.zst belongs (members are missing, "
        "reordered or repeated)"
    )
    assert len(events) == 1


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda p: p[:3] + p[2:], "member 'frames/00000001.zst' where frames/00000002.zst"),
        (lambda p: p[:2] + p[3:], "member 'frames/00000002.zst' where frames/00000001.zst"),
        (lambda p: p[:1] + p[2:], "member 'frames/00000001.zst' where frames/00000000.zst"),
        (lambda p: p[1:], "member 'frames/00000000.zst' where manifest.json belongs"),
        (lambda p: p[:-2] + p[-1:], f"checksums.json at offset {SPANS[-2][1]}: the archive ends"),
        (lambda p: p[:-1], "the end-of-archive blocks"),
        (lambda p: p[:-2] + p[-2:-1] + p[-2:], "checksums.json"),
        (lambda p: p[:1] + p[:1] + p[1:], "member 'manifest.json' where frames/00000000.zst"),
    ],
)
def test_missing_repeated_or_extra_members_are_named(edit: object, named: str) -> None:
    damaged = b"".join(edit(members(NEON)))  # type: ignore[operator]
    _, error = decode_until_error(damaged, [777])
    assert named in str(error)
    assert ERROR.match(str(error)) or "truncated" in str(error)


@pytest.mark.parametrize("garbage", [b"\0", b"x", bytes(512), bytes(10240 - 1024)])
def test_trailing_garbage_is_named(garbage: bytes) -> None:
    _, error = decode_until_error(NEON + garbage, [])
    assert str(error) == (
        f"x.neon is corrupt: the end of the archive at offset {len(NEON)}: unexpected bytes "
        "after it"
    )


def reframed(index: int, data: bytes, data_size: int) -> bytes:
    """NEON with frame `index` replaced by `data`, its header consistent with it."""
    entry = CHECKSUMS.frames[index]
    header = member_header(
        entry.name, len(data), MANIFEST.mtime, hashlib.sha256(data).hexdigest(), data_size
    )
    start, end = entry.offset - HEADER_SIZE, entry.offset + padded(entry.size)
    return NEON[:start] + header + data + padding(len(data)) + NEON[end:]


def test_frame_whose_digest_does_not_match_is_named() -> None:
    entry = CHECKSUMS.frames[2]
    damaged = bytearray(NEON)
    damaged[entry.offset + entry.size - 1] ^= 1
    events, error = decode_until_error(bytes(damaged), [])
    assert str(error) == (
        f"x.neon is corrupt: frames/00000002.zst at offset {entry.offset}: SHA-256 of the data "
        f"does not match its header (at offset {entry.offset - HEADER_SIZE})"
    )
    assert_only_whole_verified_frames(events, entry.offset)


def test_frame_consistent_with_its_header_but_not_the_checksums_is_caught_at_the_end() -> None:
    """A frame swapped with its header rewritten to match passes its own check (the digests
    are not signatures); checksums.json and the whole tar's digest then refuse the file."""
    import zstandard

    fake = zstandard.ZstdCompressor().compress(bytes(FRAME))
    _, error = decode_until_error(reframed(1, fake, FRAME), [])
    assert "checksums.json" in str(error)
    assert "differs from the frame read" in str(error)


@pytest.mark.parametrize(
    ("data", "data_size", "problem"),
    [
        (b"not zstd", FRAME, "zstd frame does not decompress"),
        (b"", FRAME, "zstd frame does not decompress"),
        (None, FRAME - 1, "decompresses to 4096 bytes, its header says 4095"),
        (None, FRAME + 1, "data_size 4097 is not possible with frames of 4096 bytes"),
        (None, 0, "data_size 0 is not possible"),
        ("two frames", FRAME, "zstd frame does not decompress"),
    ],
)
def test_bad_frame_content_is_named(data: object, data_size: int, problem: str) -> None:
    """The same error whether the reader decompresses into new bytes or into its buffers
    (snapfile/frame_buffers.py, the pageserver's import), and a buffer taken for a frame
    that failed is given back."""
    import zstandard

    one = zstandard.ZstdCompressor().compress(TAR[FRAME : 2 * FRAME])
    raw = one if data is None else one + one if data == "two frames" else data
    assert isinstance(raw, bytes)
    neon = reframed(1, raw, data_size)
    _, error = decode_until_error(neon, [])
    assert "frames/00000001.zst at offset" in str(error)
    assert problem in str(error)
    buffers = FrameBuffers()
    reader = SnapshotFileReader("x.neon", buffers=buffers)
    lent = []
    with pytest.raises(CorruptData) as into:
        for event in reader.feed(neon):
            assert isinstance(event, TarData | ManifestRead)
            if isinstance(event, TarData):
                assert isinstance(event.data, memoryview) and event.data == TAR[:FRAME]
                lent.append(event.data.obj)
                buffers.give_back(event.data)
    # the same member, offset and problem (zstd's own words after it may differ)
    assert problem in str(into.value)
    assert str(into.value).split(problem)[0] == str(error).split(problem)[0]
    assert buffers.take(FRAME).obj is lent[0]  # frame 1 took it, and gave it back


def test_oversized_member_is_refused_before_it_is_buffered() -> None:
    entry = CHECKSUMS.frames[0]
    header = member_header(entry.name, 1 << 30, MANIFEST.mtime, entry.sha256, FRAME)
    reader = SnapshotFileReader("x.neon")
    list(reader.feed(NEON[: entry.offset - HEADER_SIZE]))
    with pytest.raises(CorruptData, match=r"frames/00000000.zst at offset \d+: size 1073741824"):
        list(reader.feed(header))
    # The reader stays failed.
    with pytest.raises(CorruptData, match="size 1073741824"):
        list(reader.feed(b"more"))
