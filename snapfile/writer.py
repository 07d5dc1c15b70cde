"""Encode a basebackup tar stream into a `.neon` snapshot file, sans I/O.

`SnapshotFileWriter` is fed the tar in chunks of any size and returns the file's bytes as they
become final: manifest.json first, then one member per zstd frame of `frame_size` tar bytes,
then checksums.json and the end of the archive. A frame is compressed whole, on its own
(`compress_frame` is a pure function of the frame's bytes and the level), so the output is a
pure function of the manifest, the tar bytes and the zstd level (not of the chunking): a sender
can regenerate a file to resume it at a frame boundary, and frames can be compressed on several
threads at once (`encode_snapshot_file`) with the same bytes as one after the other. Memory
stays about one frame (per thread) whatever the snapshot's size.

`write()` does everything in order; a parallel driver calls its parts: `cut()` (return the
frames the tar bytes complete), `compress_frame()` (anywhere, any thread), `add_frame()` (in
order), then `finish()`. It writes format version 2: no SHA-256 of the whole tar (the frames'
SHA-256s fix it; hashing 1 GiB of tar cost 0.63 s of CPU, a sixth of an export).
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import BinaryIO

import zstandard

from pageserver_api.errors import InvalidArgument
from snapfile.container import (
    CHECKSUMS_NAME,
    END_OF_ARCHIVE,
    HEADER_SIZE,
    MANIFEST_NAME,
    MAX_FRAMES,
    FrameLog,
    frame_name,
    member_header,
    padding,
)
from snapfile.manifest import (
    Checksums,
    FrameEntry,
    Manifest,
    MemberEntry,
    encode_checksums,
    encode_manifest,
    written_version,
)

DEFAULT_LEVEL = 2
"""zstd level of the frames. Against level 3 on 1 GiB of pgbench tar: 20% less CPU (0.82 s
against 1.03 s) and 1% smaller; on text (a tar of /usr/share/perl) 4.7% bigger, on binaries
(/usr/lib/postgresql) 4.4%, on compressed files (/usr/share/doc, man) 2.1%. Level 1 saves
only 0.06 s more on pgbench and costs 11-12% on text and binaries."""

FramePieces = tuple[memoryview, ...]
"""The tar bytes of one frame, as views of the chunks they arrived in."""


class SnapshotFileWriter:
    """Feed `write()` the tar bytes, then call `finish()`; write out everything both return,
    in order. `checksums` is set once finished."""

    def __init__(self, manifest: Manifest, *, level: int = DEFAULT_LEVEL) -> None:
        if not 1 <= level <= 22:
            raise InvalidArgument(f"zstd level must be between 1 and 22, not {level}")
        version = written_version(manifest.parent)
        if manifest.format_version != version:
            kind = "a whole snapshot" if manifest.parent is None else "a delta"
            raise InvalidArgument(
                f"this pg-neon writes {kind} in format version {version}, not "
                f"{manifest.format_version}"
            )
        self.manifest = manifest
        self.level = level
        self._frame: list[memoryview] = []
        self._frame_fill = 0
        self._cut_frames = 0
        self._frames = FrameLog()
        self._data_size = 0
        self._manifest_entry: MemberEntry | None = None
        self._checksums: Checksums | None = None
        self.offset = 0
        """Bytes of the file returned so far."""

    @property
    def checksums(self) -> Checksums:
        if self._checksums is None:
            raise InvalidArgument("the snapshot file is not finished yet")
        return self._checksums

    def write(self, data: bytes | bytearray | memoryview) -> bytes:
        """Take tar bytes; return the file bytes completed by them (maybe none)."""
        out = [self.add_frame(self.compress_frame(raw), size) for raw, size in self.cut(data)]
        return b"".join(out)

    def cut(
        self, data: bytes | bytearray | memoryview, *, copy: bool = True
    ) -> list[tuple[FramePieces, int]]:
        """Take tar bytes; return the whole frames (uncompressed, with their sizes) they
        complete, in order. Each must be given back to `add_frame`, compressed, in the same
        order. Bytes are not copied: a frame is views of the chunks given (a mutable buffer
        is copied first, as the caller may reuse it, unless `copy` is False: the caller
        then keeps it unchanged until the frame of its last byte, `last_frame`, is
        compressed)."""
        if self._checksums is not None:
            raise InvalidArgument("the snapshot file is already finished")
        kept = data if isinstance(data, bytes) or not copy else bytes(data)
        view = memoryview(kept).cast("B")
        self._data_size += len(view)
        frame_size = self.manifest.frame_size
        frames = []
        while view:
            take = min(len(view), frame_size - self._frame_fill)
            self._frame.append(view[:take])
            self._frame_fill += take
            view = view[take:]
            if self._frame_fill == frame_size:
                frames.append((tuple(self._frame), frame_size))
                self._frame, self._frame_fill = [], 0
        self._cut_frames += len(frames)
        return frames

    @property
    def last_frame(self) -> int:
        """The index of the frame the last byte cut so far went into (-1: none yet)."""
        return self._cut_frames - (self._frame_fill == 0)

    def cut_rest(self) -> tuple[FramePieces, int] | None:
        """After the last `cut`: the last, short frame (the only frame of an empty tar), or
        None when the tar ended on a frame boundary."""
        if self._frame_fill == 0 and self._cut_frames > 0:
            return None
        rest = (tuple(self._frame), self._frame_fill)
        self._frame, self._frame_fill = [], 0
        self._cut_frames += 1
        return rest

    def compress_frame(self, pieces: FramePieces) -> bytes:
        """One independent zstd frame of the pieces; thread-safe (see `compress_frame`)."""
        return compress_frame(pieces, self.level)

    def add_frame(self, compressed: bytes, data_size: int) -> bytes:
        """The file bytes of the next frame (and of the manifest before the first one)."""
        head = self._head() if self._manifest_entry is None else b""
        return head + self._frame_member(compressed, data_size)

    def finish(self) -> bytes:
        """Return the rest of the file: the last frame, checksums.json, the end of archive."""
        rest = self.cut_rest()
        out = [] if rest is None else [self.add_frame(self.compress_frame(rest[0]), rest[1])]
        return b"".join(out) + self.finish_frames()

    def finish_frames(self) -> bytes:
        """After the last frame was added: checksums.json and the end of the archive."""
        if len(self._frames) != self._cut_frames or self._manifest_entry is None:
            raise InvalidArgument("the snapshot file still has frames to add")
        checksums = Checksums(
            manifest=self._manifest_entry,
            frames=tuple(self._frames),
            data_size=self._data_size,
            format_version=self.manifest.format_version,
        )
        encoded = encode_checksums(checksums)
        out = self._member(CHECKSUMS_NAME, encoded, hashlib.sha256(encoded).hexdigest())
        self.offset += len(END_OF_ARCHIVE)
        self._checksums = checksums
        return out + END_OF_ARCHIVE

    def _head(self) -> bytes:
        data = encode_manifest(self.manifest)
        self._manifest_entry = MemberEntry(
            MANIFEST_NAME, self.offset + HEADER_SIZE, len(data), hashlib.sha256(data).hexdigest()
        )
        return self._member(MANIFEST_NAME, data, self._manifest_entry.sha256)

    def _member(self, name: str, data: bytes, digest: str, data_size: int | None = None) -> bytes:
        member = b"".join(
            (
                member_header(name, len(data), self.manifest.mtime, digest, data_size),
                data,
                padding(len(data)),
            )
        )
        self.offset += len(member)
        return member

    def _frame_member(self, compressed: bytes, data_size: int) -> bytes:
        index = len(self._frames)
        if index >= MAX_FRAMES:
            raise InvalidArgument(
                f"a snapshot file holds at most {MAX_FRAMES} frames; use a bigger frame size"
            )
        entry = FrameEntry(
            frame_name(index),
            self.offset + HEADER_SIZE,
            len(compressed),
            hashlib.sha256(compressed).hexdigest(),
            data_size,
        )
        self._frames.append(entry)
        return self._member(entry.name, compressed, entry.sha256, data_size)


def compress_frame(pieces: FramePieces, level: int) -> bytes:
    """The concatenated pieces as one zstd frame at `level`, with its content size and
    checksum. Streamed with the size pledged: zstd's output then does not depend on how the
    input is split (tests/snapfile/test_roundtrip.py checks it), and each piece is
    compressed with the GIL released, big ones without joining them first (small ones are
    joined: `coalesced`). A compressor per call: python-zstandard's compressors must not be
    shared between threads, and one costs microseconds next to a frame's milliseconds."""
    size = sum(len(piece) for piece in pieces)
    compressor = zstandard.ZstdCompressor(level=level, write_checksum=True)
    frame = compressor.compressobj(size=size)
    out = [frame.compress(piece) for piece in coalesced(pieces)]
    out.append(frame.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH))
    return b"".join(out)


COALESCE_BELOW = 64 * 1024
"""Pieces smaller than this are joined with their neighbours before compression."""
COALESCE_RUN = 1024 * 1024
"""A run of small pieces is joined up to this many bytes at a time (a frame of small pieces
only is not copied whole: frames go up to MAX_FRAME_SIZE, and the join holds the GIL)."""


def coalesced(pieces: FramePieces) -> list[bytes | bytearray | memoryview]:
    """`pieces` with each run of small ones (COALESCE_BELOW) joined into one, the others as
    they are: each compress call takes the GIL back once it is done, and a delta's first
    frame is ~700 members of a fork header each, whose calls waited on the tar thread for
    the GIL one by one (in-process: that frame 6-20 ms of wall for 3-4 ms of CPU, 4-8 ms
    joined; every frame of the file waits for it)."""
    out: list[bytes | bytearray | memoryview] = []
    run: list[bytes | bytearray | memoryview] = []
    run_bytes = 0
    for piece in pieces:
        if len(piece) >= COALESCE_BELOW or run_bytes >= COALESCE_RUN:
            if run:
                out.append(b"".join(run) if len(run) > 1 else run[0])
                run, run_bytes = [], 0
            if len(piece) >= COALESCE_BELOW:
                out.append(piece)
                continue
        run.append(piece)
        run_bytes += len(piece)
    if run:
        out.append(b"".join(run) if len(run) > 1 else run[0])
    return out


def encode_snapshot_file(
    manifest: Manifest,
    tar_chunks: Iterable[bytes | bytearray | memoryview],
    *,
    level: int = DEFAULT_LEVEL,
    workers: int = 2,
    release: Callable[[object], None] | None = None,
) -> Generator[bytes, None, None]:
    """The `.neon` file's bytes for the tar arriving as `tar_chunks`, its frames compressed
    by `workers` threads at once (zstd releases the GIL), in order: the same bytes as
    `SnapshotFileWriter.write`. At most 2 x `workers` frames are in flight, so memory stays a
    few frames; the thread reading `tar_chunks` (making the tar) does no compression.

    `release`: mutable chunks are read where they are, not copied, and each is handed to
    `release` once every frame holding its bytes is compressed (the tar maker's
    AlignedChunks then lends its buffer again: pageserver/basebackup/tar_stream.py)."""
    writer = SnapshotFileWriter(manifest, level=level)
    limit = 2 * workers
    Pending = tuple[concurrent.futures.Future[bytes], int]
    held: collections.deque[tuple[int, object]] = collections.deque()  # (last frame, chunk)
    added = 0  # frames compressed and added
    with concurrent.futures.ThreadPoolExecutor(workers, "snapfile-zstd") as pool:
        pending: collections.deque[Pending] = collections.deque()

        def take() -> bytes:
            nonlocal added
            compressed, size = pending.popleft()
            out = writer.add_frame(compressed.result(), size)
            added += 1
            while release is not None and held and held[0][0] < added:
                release(held.popleft()[1])
            return out

        try:

            def submit(frames: Iterable[tuple[FramePieces, int]]) -> Iterator[bytes]:
                for pieces, size in frames:
                    pending.append((pool.submit(writer.compress_frame, pieces), size))
                    while len(pending) > limit or (pending and pending[0][0].done()):
                        yield take()

            for chunk in tar_chunks:
                frames = writer.cut(chunk, copy=release is None)
                if release is not None:
                    held.append((writer.last_frame, chunk))
                yield from submit(frames)
            rest = writer.cut_rest()
            yield from submit([] if rest is None else [rest])
            while pending:
                yield take()
        finally:
            for compressed, _size in pending:
                compressed.cancel()
    yield writer.finish_frames()


def write_snapshot_file(
    out: BinaryIO,
    manifest: Manifest,
    tar_chunks: Iterable[bytes],
    *,
    level: int = DEFAULT_LEVEL,
) -> Checksums:
    """Write a whole `.neon` file to `out` from the tar's chunks; return its checksums."""
    writer = SnapshotFileWriter(manifest, level=level)
    for chunk in tar_chunks:
        encoded = writer.write(chunk)
        if encoded:
            out.write(encoded)
    out.write(writer.finish())
    return writer.checksums
