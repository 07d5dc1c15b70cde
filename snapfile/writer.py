"""Encode a basebackup tar stream into a `.neon` snapshot file, sans I/O.

`SnapshotFileWriter` is fed the tar in chunks of any size and returns the file's bytes as they
become final: manifest.json first, then one member per zstd frame of `frame_size` tar bytes
(each frame compressed as it is fed, so memory stays about one compressed frame), then
checksums.json and the end of the archive. The output is a pure function of the manifest, the
tar bytes and the zstd level (not of the chunking), so a sender can regenerate a file to resume
it at a frame boundary. `write_snapshot_file` drives it over file objects.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
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
)

DEFAULT_LEVEL = 3


class SnapshotFileWriter:
    """Feed `write()` the tar bytes, then call `finish()`; write out everything both return,
    in order. `checksums` is set once finished."""

    def __init__(self, manifest: Manifest, *, level: int = DEFAULT_LEVEL) -> None:
        if not 1 <= level <= 22:
            raise InvalidArgument(f"zstd level must be between 1 and 22, not {level}")
        self.manifest = manifest
        self._compressor = zstandard.ZstdCompressor(level=level, write_checksum=True, threads=0)
        self._frame: zstandard.ZstdCompressionObj | None = None
        self._frame_pieces: list[bytes] = []
        self._frame_fill = 0
        self._frames = FrameLog()
        self._data_hash = hashlib.sha256()
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
        if self._checksums is not None:
            raise InvalidArgument("the snapshot file is already finished")
        out = [self._head()] if self._manifest_entry is None else []
        view = memoryview(data).cast("B")
        self._data_hash.update(view)
        self._data_size += len(view)
        frame_size = self.manifest.frame_size
        while view:
            if self._frame is None:
                self._frame = self._compressor.compressobj()
            take = min(len(view), frame_size - self._frame_fill)
            piece = self._frame.compress(view[:take])
            if piece:
                self._frame_pieces.append(piece)
            self._frame_fill += take
            view = view[take:]
            if self._frame_fill == frame_size:
                out.append(self._end_frame())
        return b"".join(out)

    def finish(self) -> bytes:
        """Return the rest of the file: the last frame, checksums.json, the end of archive."""
        out = [self.write(b"")]
        if self._frame is not None or len(self._frames) == 0:
            out.append(self._end_frame())
        manifest_entry = self._manifest_entry
        assert manifest_entry is not None
        checksums = Checksums(
            manifest=manifest_entry,
            frames=tuple(self._frames),
            data_size=self._data_size,
            data_sha256=self._data_hash.hexdigest(),
        )
        encoded = encode_checksums(checksums)
        out.append(self._member(CHECKSUMS_NAME, encoded, hashlib.sha256(encoded).hexdigest()))
        out.append(END_OF_ARCHIVE)
        self.offset += len(END_OF_ARCHIVE)
        self._checksums = checksums
        return b"".join(out)

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

    def _end_frame(self) -> bytes:
        index = len(self._frames)
        if index >= MAX_FRAMES:
            raise InvalidArgument(
                f"a snapshot file holds at most {MAX_FRAMES} frames; use a bigger frame size"
            )
        frame = self._frame or self._compressor.compressobj()
        self._frame_pieces.append(frame.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH))
        compressed = b"".join(self._frame_pieces)
        data_size = self._frame_fill
        self._frame, self._frame_pieces, self._frame_fill = None, [], 0
        entry = FrameEntry(
            frame_name(index),
            self.offset + HEADER_SIZE,
            len(compressed),
            hashlib.sha256(compressed).hexdigest(),
            data_size,
        )
        self._frames.append(entry)
        return self._member(entry.name, compressed, entry.sha256, data_size)


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
