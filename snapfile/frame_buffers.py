"""A `.neon` file's frames decompressed into buffers that are used again, for a reader whose
consumer says when it is done with each frame's bytes.

Why: `ZstdDecompressor.decompress` returns a new 4 MiB bytes object per frame, and on a
thread of its own (the pageserver's import of a pushed or pulled file) glibc gives such a
block back to the kernel once it is freed, so every page of the next frame was faulted in
and zeroed again: 306k minor faults for the 1 GiB bench database, a quarter of the receiving
pageserver's CPU in perf (the kernel's page-fault path, clear_page, munmap). A buffer
written again is faulted in once.

The check is `decompress`'s: the member holds exactly one zstd frame (its length is found by
walking the frame's header and block headers, as ZSTD_findFrameCompressedSize does) and it
decompresses to exactly the frame's size.
"""

from __future__ import annotations

import threading

import zstandard

_MAGIC = 0xFD2FB528
_DICT_ID_BYTES = (0, 1, 2, 4)
_CONTENT_SIZE_BYTES = (0, 2, 4, 8)  # flag 0 with the single-segment flag: 1 byte
_RAW, _RLE, _COMPRESSED = 0, 1, 2
_BLOCK_HEADER = 3
_CHECKSUM = 4


class FrameError(ValueError):
    """The member is not one zstd frame of the expected size (the reader says where); the
    messages are `ZstdDecompressor.decompress`'s reader's (snapfile/reader.py)."""


def _not_a_frame(reason: str) -> FrameError:
    return FrameError(f"zstd frame does not decompress: {reason}")


def frame_length(data: memoryview) -> int:
    """The length of the zstd frame at the start of `data`, from its headers alone."""
    if len(data) < 5 or int.from_bytes(data[:4], "little") != _MAGIC:
        raise _not_a_frame("no zstd magic number")
    descriptor = data[4]
    if descriptor & 0x08:
        raise _not_a_frame("a reserved bit is set in its header")
    single_segment = descriptor >> 5 & 1
    content_size = _CONTENT_SIZE_BYTES[descriptor >> 6] or single_segment
    at = 5 + (not single_segment) + _DICT_ID_BYTES[descriptor & 3] + content_size
    while True:
        if at + _BLOCK_HEADER > len(data):
            raise _not_a_frame("it is cut short")
        header = int.from_bytes(data[at : at + _BLOCK_HEADER], "little")
        kind, size = header >> 1 & 3, header >> 3
        if kind == _RLE:
            size = 1
        elif kind not in (_RAW, _COMPRESSED):
            raise _not_a_frame("a block of the reserved type")
        at += _BLOCK_HEADER + size
        if header & 1:
            break
    at += _CHECKSUM if descriptor & 0x04 else 0
    if at > len(data):
        raise _not_a_frame("it is cut short")
    return at


def decompress_into(dctx: zstandard.ZstdDecompressor, data: memoryview, out: memoryview) -> None:
    """Decompress the one zstd frame `data` into `out`, which it must fill exactly."""
    length = frame_length(data)
    if length != len(data):
        raise _not_a_frame(f"{len(data) - length} bytes follow the frame")
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise _not_a_frame(str(exc)) from None
    if declared >= 0 and declared != len(out):
        raise FrameError(f"decompresses to {declared} bytes, its header says {len(out)}")
    reader = dctx.stream_reader(data, read_across_frames=False)
    error = None
    try:
        got = 0
        while got < len(out):
            read = reader.readinto(out[got:])
            if not read:
                break
            got += read
        more = got == len(out) and bool(reader.read(1))
    except zstandard.ZstdError as exc:
        error = _not_a_frame(str(exc))
    finally:
        reader.close()
        del reader  # it holds `data`'s buffer until freed
    if error is not None:
        raise error
    if more:
        raise FrameError(f"decompresses to more than the {len(out)} bytes its header says")
    if got != len(out):
        raise FrameError(f"decompresses to {got} bytes, its header says {len(out)}")


class BufferPool:
    """Free buffers for `FrameBuffers` to lend (thread-safe); with `keep_bytes`, at most that
    many bytes of them are kept, the others freed as they come back."""

    def __init__(self, keep_bytes: int | None = None) -> None:
        self._free: list[bytearray] = []
        self._bytes = 0
        self._keep = keep_bytes
        self._lock = threading.Lock()

    def pop(self, size: int) -> bytearray | None:
        """A free buffer of at least `size` bytes, if one is kept (a file's short last
        frame's buffer stays for another)."""
        with self._lock:
            for at in range(len(self._free) - 1, -1, -1):
                if len(self._free[at]) >= size:
                    buffer = self._free.pop(at)
                    self._bytes -= len(buffer)
                    return buffer
            return None

    def push(self, buffer: bytearray) -> None:
        with self._lock:
            if self._keep is None or self._bytes + len(buffer) <= self._keep:
                self._free.append(buffer)
                self._bytes += len(buffer)


IMPORTS_KEPT_BYTES = 32 << 20
"""Frame buffers kept between the pageserver's imports of `.neon` files (`IMPORTS`): about as
many as one import lends at once (the extractor's queue of 8 frames bounds it: 32 MiB of
4 MiB frames). A small import (a 1% delta is ~6 frames) lent fresh buffers every time, each
faulted in and zeroed again: with the daemon's malloc settings a freed 4 MiB block is
unmapped at once (pageserver/malloc_tuning.py)."""
IMPORTS = BufferPool(IMPORTS_KEPT_BYTES)


class FrameBuffers:
    """Buffers for decompressed frames: `take` lends one (a new one when none was given
    back), `give_back` returns it once its bytes are used; thread-safe (taken on the
    reading thread, given back on the consuming one). As many exist as were ever lent at
    once (the consumer's queue bounds that); those given back go to `pool` (by default
    one of this object's own: freed with it)."""

    def __init__(self, pool: BufferPool | None = None) -> None:
        self._pool = pool if pool is not None else BufferPool()
        self._lent: dict[int, tuple[memoryview, bytearray]] = {}
        self._lock = threading.Lock()

    def take(self, size: int) -> memoryview:
        """A writable buffer of `size` bytes, lent until `give_back`."""
        buffer = self._pool.pop(size)
        if buffer is None:
            buffer = bytearray(size)
        view = memoryview(buffer)[:size]
        with self._lock:
            self._lent[id(view)] = (view, buffer)
        return view

    def give_back(self, chunk: object) -> None:
        """`chunk` (a view `take` returned) is no longer read; anything else: nothing."""
        with self._lock:
            lent = self._lent.pop(id(chunk), None)
        if lent is not None and lent[0] is chunk:
            self._pool.push(lent[1])
