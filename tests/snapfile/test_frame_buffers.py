"""Frames decompressed into buffers used again (snapfile/frame_buffers.py): the same bytes and
the same refusals as `ZstdDecompressor.decompress`, a frame's length found from its headers
whatever its blocks (raw, RLE, compressed) and flags, and buffers reused once given back, so
that a thread whose freed 4 MiB blocks go back to the kernel faults its pages in once."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap

import pytest
import zstandard

from snapfile.frame_buffers import (
    BufferPool,
    FrameBuffers,
    FrameError,
    decompress_into,
    frame_length,
)
from tests.snapfile.snapfile_helpers import generated_bytes


def frames() -> list[tuple[str, bytes, bytes]]:
    """(what, data, its frame): every block type, with and without the optional fields."""
    rng = random.Random(5)
    cases = {
        "empty": b"",
        "random (raw blocks)": rng.randbytes(300_000),
        "one byte repeated (RLE blocks)": b"\x07" * 400_000,
        "mixed": generated_bytes(1_000_000, 3),
    }
    compressors = {
        "level 2": zstandard.ZstdCompressor(level=2),
        "checksum, no content size": zstandard.ZstdCompressor(
            write_checksum=True, write_content_size=False
        ),
        "level -5": zstandard.ZstdCompressor(level=-5),
    }
    out = []
    for what, data in cases.items():
        for how, compressor in compressors.items():
            out.append((f"{what}, {how}", data, compressor.compress(data)))
        streamed = compressor.compressobj()  # no content size in the header, not one segment
        out.append((f"{what}, streamed", data, streamed.compress(data) + streamed.flush()))
    return out


@pytest.mark.parametrize(("what", "data", "frame"), frames(), ids=[f[0] for f in frames()])
def test_a_frame_is_measured_and_decompressed_as_zstd_does(
    what: str, data: bytes, frame: bytes
) -> None:
    assert frame_length(memoryview(frame + b"tail")) == len(frame)
    out = bytearray(b"\xff" * len(data))
    decompress_into(zstandard.ZstdDecompressor(), memoryview(frame), memoryview(out))
    assert out == data


ONE = zstandard.ZstdCompressor().compress(b"abc" * 5000)


@pytest.mark.parametrize(
    ("frame", "size", "problem"),
    [
        (b"not zstd", 15000, "zstd frame does not decompress: no zstd magic number"),
        (b"", 15000, "zstd frame does not decompress"),
        (ONE[:-1], 15000, "zstd frame does not decompress: it is cut short"),
        (ONE[:8], 15000, "zstd frame does not decompress: it is cut short"),
        (ONE + b"\0", 15000, "zstd frame does not decompress: 1 bytes follow the frame"),
        (ONE + ONE, 15000, f"zstd frame does not decompress: {len(ONE)} bytes follow the frame"),
        (ONE, 14999, "decompresses to 15000 bytes, its header says 14999"),
        (ONE, 15001, "decompresses to 15000 bytes, its header says 15001"),
    ],
    ids=["garbage", "nothing", "cut", "header only", "a byte after", "two", "short", "long"],
)
def test_anything_but_one_frame_of_the_size_is_refused(
    frame: bytes, size: int, problem: str
) -> None:
    with pytest.raises(FrameError) as exc:
        decompress_into(
            zstandard.ZstdDecompressor(), memoryview(frame), memoryview(bytearray(size))
        )
    assert str(exc.value).startswith(problem)
    with pytest.raises(zstandard.ZstdError):  # and decompress refuses it too
        data = zstandard.ZstdDecompressor().decompress(
            frame, max_output_size=size, allow_extra_data=False
        )
        if len(data) != size:
            raise zstandard.ZstdError("size")


def test_a_frame_without_its_size_in_the_header_is_checked_by_decompressing() -> None:
    streamed = zstandard.ZstdCompressor().compressobj()
    frame = memoryview(streamed.compress(b"xyz" * 1000) + streamed.flush())
    assert zstandard.frame_content_size(frame) == -1
    dctx = zstandard.ZstdDecompressor()
    with pytest.raises(FrameError, match="decompresses to more than the 2999 bytes"):
        decompress_into(dctx, frame, memoryview(bytearray(2999)))
    with pytest.raises(FrameError, match="decompresses to 3000 bytes, its header says 3001"):
        decompress_into(dctx, frame, memoryview(bytearray(3001)))


def test_the_frame_is_free_to_change_once_decompressed() -> None:
    """The reader of the frame lets go of it (a `.neon` reader then trims the bytearray
    it holds the frame in: a view still exported would refuse that)."""
    held = bytearray(ONE)
    with memoryview(held) as view:
        decompress_into(zstandard.ZstdDecompressor(), view, memoryview(bytearray(15000)))
    with memoryview(held) as view, pytest.raises(FrameError):
        decompress_into(zstandard.ZstdDecompressor(), view, memoryview(bytearray(3)))
    del held[:10]


def test_buffers_given_back_are_lent_again() -> None:
    buffers = FrameBuffers()
    first = buffers.take(1000)
    second = buffers.take(1000)
    assert first.obj is not second.obj
    buffers.give_back(first)
    buffers.give_back(b"not lent")  # ignored
    buffers.give_back(first)  # given back twice: once
    again = buffers.take(800)
    assert again.obj is first.obj and len(again) == 800
    third = buffers.take(1000).obj
    assert third is not first.obj and third is not second.obj
    buffers.give_back(again)
    assert buffers.take(5000).obj is not first.obj  # too small: a new one


def test_a_thread_decompressing_into_buffers_faults_its_pages_in_once() -> None:
    """With the daemon's malloc settings (pageserver/malloc_tuning.py: blocks of 4 MiB and
    more mapped and unmapped), every 4 MiB frame `decompress` returns is a fresh mapping,
    each of its pages faulted in on a thread of its own; decompressed into buffers given
    back, the frames reuse two."""
    script = textwrap.dedent(
        """
        import resource, sys, threading, zstandard
        from pageserver.malloc_tuning import tune_malloc
        from snapfile.frame_buffers import FrameBuffers, decompress_into
        assert tune_malloc()
        FRAME = 4 << 20
        frame = zstandard.ZstdCompressor().compress(bytes(range(256)) * (FRAME // 256))
        faults = {}

        def run(into):
            dctx, buffers = zstandard.ZstdDecompressor(), FrameBuffers()
            before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
            for _ in range(32):
                if into:
                    out = buffers.take(FRAME)
                    decompress_into(dctx, memoryview(frame), out)
                    buffers.give_back(out)
                else:
                    out = dctx.decompress(frame, max_output_size=FRAME)
                del out
            faults[into] = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before

        for into in (False, True):
            thread = threading.Thread(target=run, args=(into,))
            thread.start()
            thread.join()
        print(faults[False], faults[True])
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    plain, into = map(int, out.split())
    pages = 32 * (4 << 20) // 4096
    assert plain >= pages * 0.9  # the old way: every page of every frame
    assert into < pages / 8  # one buffer's pages, and the decompressor's own


def test_a_kept_pool_lends_the_next_readers_buffers_and_keeps_a_few() -> None:
    pool = BufferPool(keep_bytes=2000)
    first = FrameBuffers(pool)
    lent = [first.take(1000) for _ in range(3)]
    for view in lent:
        first.give_back(view)
    second = FrameBuffers(pool)
    again = [second.take(1000).obj for _ in range(3)]
    kept = [any(obj is view.obj for view in lent) for obj in again]
    assert kept == [True, True, False]  # two kept, the third one freed


def test_a_small_buffer_kept_is_passed_over_not_dropped() -> None:
    """A file's short last frame leaves a small buffer on top of the pool: a full frame's
    take skips it (and it stays for a small one)."""
    pool = BufferPool()
    buffers = FrameBuffers(pool)
    big, small = buffers.take(4000), buffers.take(100)
    buffers.give_back(big)
    buffers.give_back(small)
    assert buffers.take(4000).obj is big.obj
    assert buffers.take(50).obj is small.obj


def test_imports_of_small_files_one_after_another_fault_their_buffers_in_once() -> None:
    """The pageserver's imports lend frames from IMPORTS, kept between them: with the
    daemon's malloc settings a small import's fresh 4 MiB buffers were each faulted in and
    zeroed again (a 1% delta: ~6,000 page faults, 15 ms of its import)."""
    script = textwrap.dedent(
        """
        import resource, zstandard
        from pageserver.malloc_tuning import tune_malloc
        from snapfile.frame_buffers import IMPORTS, FrameBuffers, decompress_into
        assert tune_malloc()
        FRAME = 4 << 20
        frame = zstandard.ZstdCompressor().compress(bytes(range(256)) * (FRAME // 256))
        dctx = zstandard.ZstdDecompressor()

        def imports(pool):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(8):  # eight imports of six frames, all lent at once
                buffers = FrameBuffers(pool)
                lent = [buffers.take(FRAME) for _ in range(6)]
                for out in lent:
                    decompress_into(dctx, memoryview(frame), out)
                for out in lent:
                    buffers.give_back(out)
                del buffers, lent, out
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

        print(imports(None), imports(IMPORTS))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    private, kept = map(int, out.split())
    pages = 8 * 6 * (4 << 20) // 4096
    assert private >= pages * 0.9
    assert kept < pages / 6  # the first import's six buffers, then none
