"""`encode_snapshot_file` compresses frames on several threads: the bytes must be exactly the
serial writer's, whatever the chunking, the number of threads and where the tar ends."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from snapfile.writer import (
    COALESCE_BELOW,
    COALESCE_RUN,
    coalesced,
    compress_frame,
    encode_snapshot_file,
)
from tests.snapfile.snapfile_helpers import decode, encode, generated_bytes, make_manifest, split

FRAME = 64 * 1024


@pytest.mark.parametrize(
    ("size", "chunks", "workers"),
    [
        (0, (), 2),  # an empty tar: one empty frame
        (FRAME, (), 2),  # ends on a frame boundary: no short frame
        (5 * FRAME + 100, (1000,), 1),
        (5 * FRAME + 100, (FRAME,), 2),  # whole frames handed over without a copy
        (17 * FRAME + 3, (FRAME * 3 + 7, 0, 1), 3),
    ],
)
def test_parallel_output_equals_serial(size: int, chunks: tuple[int, ...], workers: int) -> None:
    tar = generated_bytes(size, size)
    manifest = make_manifest(FRAME)
    serial, checksums = encode(manifest, tar, chunks)
    parallel = b"".join(encode_snapshot_file(manifest, split(tar, chunks), workers=workers))
    assert parallel == serial == encode(manifest, tar)[0]  # nor on the chunking
    _manifest, data, decoded = decode(parallel)
    assert data == tar and decoded == checksums


def test_a_failing_source_stops_the_encoding() -> None:
    """An error from the tar's producer reaches the consumer; no frame work is left behind."""

    def chunks() -> Iterator[bytes]:
        yield generated_bytes(10 * FRAME, 1)
        raise OSError("layer file unreadable")

    with pytest.raises(OSError, match="unreadable"):
        b"".join(encode_snapshot_file(make_manifest(FRAME), chunks(), workers=2))


def test_a_reused_buffer_is_hashed_as_it_was_given() -> None:
    """The tar's SHA-256 runs on its own thread, after `cut` returned: a producer reusing
    one buffer for every chunk (overwritten as soon as the next is made) must not change
    the hash or the frames."""
    tar = generated_bytes(9 * FRAME + 5, 9)
    manifest = make_manifest(FRAME)

    def chunks() -> Iterator[bytearray]:
        buf = bytearray(FRAME // 2)
        for at in range(0, len(tar), len(buf)):
            piece = tar[at : at + len(buf)]
            buf[: len(piece)] = piece
            yield buf if len(piece) == len(buf) else bytearray(piece)
            buf[:] = bytes(len(buf))  # the producer moves on before the hash ran

    parallel = b"".join(encode_snapshot_file(manifest, chunks(), workers=2))
    assert parallel == encode(manifest, tar)[0]


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_chunks_read_in_place_are_released_only_once_their_frames_are_compressed(
    workers: int,
) -> None:
    """With `release`, mutable chunks are not copied: a producer lending a few buffers (the
    tar maker's AlignedChunks) gets each back only after every frame holding its bytes was
    compressed, and overwrites it at once; the bytes are the serial writer's, every buffer
    comes back, and buffers are lent again (chunks spanning frames, frames spanning chunks)."""
    tar = generated_bytes(23 * FRAME + 77, 23)
    manifest = make_manifest(FRAME)
    free = [bytearray(FRAME // 3) for _ in range(4)]
    lent: dict[int, bytearray] = {}
    lends = 0

    def chunks() -> Iterator[bytearray]:
        nonlocal lends
        size = len(free[0])
        for at in range(0, len(tar), size):
            piece = tar[at : at + size]
            if free and len(piece) == size:
                buf = free.pop()
                buf[:] = piece
                lent[id(buf)] = buf
                lends += 1
            else:
                buf = bytearray(piece)  # none free (or the tail): a new one, never reused
            yield buf

    def release(chunk: object) -> None:
        buf = lent.pop(id(chunk), None)
        if buf is not None:
            buf[:] = bytes(len(buf))  # reused: whatever still read it would see zeros
            free.append(buf)

    out = b"".join(encode_snapshot_file(manifest, chunks(), workers=workers, release=release))
    assert out == encode(manifest, tar)[0]
    assert not lent and len(free) == 4  # all given back
    assert lends > 3 * len(free)  # each buffer lent again and again


def test_small_pieces_are_joined_before_compression() -> None:
    """A frame's runs of small pieces (a delta's ~700 bare fork members) are compressed as
    one piece each, big ones as they are (not copied); the frame's bytes are those of the
    pieces joined, so its compression is the same."""
    data = generated_bytes(3 * COALESCE_BELOW + 5000, 7)
    big = memoryview(data)[: 2 * COALESCE_BELOW]
    small = [memoryview(data)[2 * COALESCE_BELOW + i * 100 : 2 * COALESCE_BELOW + (i + 1) * 100]
             for i in range(50)]  # fmt: skip
    rest = memoryview(data)[2 * COALESCE_BELOW + 5000 :]
    pieces = (*small[:10], big, *small[10:], rest)
    out = coalesced(pieces)
    assert len(out) == 4 and out[1] is big
    assert [len(p) for p in out] == [1000, len(big), 4000, len(rest)]
    assert b"".join(out) == b"".join(pieces)
    assert coalesced((big,)) == [big] and coalesced(()) == []
    more = generated_bytes(3 * COALESCE_RUN, 8)
    many = [memoryview(more)[i * 1000 : (i + 1) * 1000] for i in range(len(more) // 1000)]
    joined = coalesced(tuple(many))  # runs joined COALESCE_RUN bytes or so at a time
    assert len(joined) > 1 and max(map(len, joined)) < COALESCE_RUN + 1000
    assert b"".join(joined) == b"".join(many)
    assert compress_frame(pieces, 2) == compress_frame((memoryview(b"".join(pieces)),), 2)
