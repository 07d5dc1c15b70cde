"""Decode and verify a `.neon` snapshot file, sans I/O.

`SnapshotFileReader` is fed the file in chunks of any size and yields events: the manifest
first, then the tar bytes one frame at a time, each only after its member's SHA-256, its
uncompressed size and its place in the sequence are verified, then (once `finish()` confirms
the input ended right after the archive) the checksums. Anything else (a flipped byte, a
truncation, a missing, extra or reordered member, bytes after the end) raises CorruptData
naming the member and the file offset; the reader then stays failed.

Memory is one member's compressed bytes plus one frame's tar bytes, whatever the file size.
`verified_offset` is where a download can resume: feed the kept prefix, then the rest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import zstandard

from pageserver_api.errors import CorruptData, InvalidArgument, NeonError
from snapfile.background_hash import BackgroundSha256
from snapfile.container import (
    BLOCK,
    CHECKSUMS_NAME,
    END_OF_ARCHIVE,
    HEADER_SIZE,
    MANIFEST_NAME,
    MAX_FRAMES,
    MAX_MANIFEST_SIZE,
    PAX_PREFIX,
    FrameLog,
    MemberHeader,
    frame_index,
    frame_name,
    max_frame_member_size,
    padded,
    parse_member_header,
)
from snapfile.frame_buffers import FrameBuffers, FrameError, decompress_into
from snapfile.manifest import (
    Checksums,
    FrameEntry,
    Manifest,
    MemberEntry,
    decode_checksums,
    decode_manifest,
    encode_checksums,
    encode_manifest,
)

_COMPACT_AT = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ManifestRead:
    """The first event: the file's manifest, its own digest verified."""

    manifest: Manifest


@dataclass(frozen=True, slots=True)
class TarData:
    """The next `frame.data_size` bytes of the basebackup tar, verified (a view of a buffer
    lent by the reader's `buffers`, when it has them)."""

    data: bytes | memoryview
    frame: FrameEntry


@dataclass(frozen=True, slots=True)
class SnapshotEnd:
    """The last event: every member and the whole tar verified, nothing after the archive."""

    checksums: Checksums


ReaderEvent = ManifestRead | TarData | SnapshotEnd


class SnapshotFileReader:
    """Feed it the file with `feed()`, then call `finish()`; iterate what both return."""

    def __init__(
        self, label: str = "snapshot file", *, hash_in_background: bool = False,
        buffers: FrameBuffers | None = None,
    ) -> None:  # fmt: skip
        """`hash_in_background`: the whole tar's SHA-256 of a version 1 file (version 2 has
        none) runs on a thread of its own (snapfile/background_hash.py), beside the
        decompression of the next frames; `close` stops that thread. `buffers`: each frame
        is decompressed into a buffer taken from them, which the consumer gives back once it
        used the TarData's bytes (snapfile/frame_buffers.py)."""
        self.label = label
        self._buffers = buffers
        self._dctx = zstandard.ZstdDecompressor()
        self.manifest: Manifest | None = None
        self.checksums: Checksums | None = None
        self._buf = bytearray()
        self._pos = 0
        self._offset = 0  # file offset of self._buf[self._pos]
        self._eof = False
        self._error: NeonError | None = None
        self._header: MemberHeader | None = None
        self._header_offset = 0
        self._manifest_entry: MemberEntry | None = None
        self._frames = FrameLog()
        self._last_frame_full = True
        self._at_end = False  # checksums.json read; the end-of-archive blocks come next
        self._done = False  # the end-of-archive blocks read
        self._ended = False  # SnapshotEnd yielded
        self._hash_in_background = hash_in_background
        self._data_hash: BackgroundSha256 | hashlib._Hash | None = None  # version 1 only
        self._data_size = 0
        self.verified_offset = 0
        """Bytes from the start of the file that are verified: a resumable prefix."""

    def close(self) -> None:
        """Stop the background hash's thread, if any (a reader read to its end needs none)."""
        if isinstance(self._data_hash, BackgroundSha256):
            self._data_hash.close()

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[ReaderEvent]:
        """Take the next bytes of the file; return the events they complete."""
        self._raise_if_failed()
        if self._eof:
            raise InvalidArgument("SnapshotFileReader.feed() after finish()")
        self._buf += data
        return self._events()

    def finish(self) -> Iterator[ReaderEvent]:
        """The input ended: return the last events, or raise if the file is incomplete."""
        self._raise_if_failed()
        self._eof = True
        return self._events()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _events(self) -> Iterator[ReaderEvent]:
        try:
            yield from self._parse()
        except NeonError as exc:
            self._error = exc
            raise

    def _available(self) -> int:
        return len(self._buf) - self._pos

    def _take(self, size: int) -> bytes:
        data = bytes(self._buf[self._pos : self._pos + size])
        self._skip(size)
        return data

    def _skip(self, size: int) -> None:
        self._pos += size
        self._offset += size
        if self._pos >= _COMPACT_AT and self._pos * 2 >= len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0

    def _corrupt(self, member: str, offset: int, problem: str) -> CorruptData:
        return CorruptData(f"{self.label} is corrupt: {member} at offset {offset}: {problem}")

    def _expected_names(self) -> list[str]:
        if self._manifest_entry is None:
            return [MANIFEST_NAME]
        count = len(self._frames)
        if count == 0:
            return [frame_name(0)]
        if self._last_frame_full and count < MAX_FRAMES:
            return [frame_name(count), CHECKSUMS_NAME]
        return [CHECKSUMS_NAME]

    def _parse(self) -> Iterator[ReaderEvent]:
        while True:
            if self._done:
                if self._available():
                    raise self._corrupt(
                        "the end of the archive", self._offset, "unexpected bytes after it"
                    )
                break
            if self._at_end:
                if self._available() < len(END_OF_ARCHIVE):
                    break
                end = self._take(len(END_OF_ARCHIVE))
                if end != END_OF_ARCHIVE:
                    at = next(i for i, b in enumerate(end) if b)
                    raise self._corrupt(
                        "the end-of-archive blocks",
                        self._offset - len(end) + at,
                        f"a nonzero byte where only zeros belong (after {CHECKSUMS_NAME})",
                    )
                self._done = True
                self.verified_offset = self._offset
                continue
            if self._header is None:
                if self._available() >= BLOCK and not any(self._buf[self._pos : self._pos + BLOCK]):
                    where = " or ".join(self._expected_names())
                    raise self._corrupt(where, self._offset, "the archive ends where it belongs")
                if self._available() < HEADER_SIZE:
                    break
                self._read_header()
                continue
            header = self._header
            if self._available() < padded(header.size):
                break
            yield from self._read_member(header)
        if self._eof:
            if not self._done:
                raise CorruptData(
                    f"{self.label} is truncated at offset {self._offset + self._available()}: "
                    + self._missing()
                )
            if not self._ended:
                self._ended = True
                assert self.checksums is not None
                yield SnapshotEnd(self.checksums)

    def _missing(self) -> str:
        """What the input lacks, and where that starts."""
        need = (
            len(END_OF_ARCHIVE)
            if self._at_end
            else HEADER_SIZE
            if self._header is None
            else padded(self._header.size)
        ) - self._available()
        if self._at_end:
            what = f"the end-of-archive blocks after {CHECKSUMS_NAME} (at offset {self._offset})"
        elif self._header is not None:
            what = f"{self._header.name} (its data at offset {self._offset})"
        else:
            what = f"the header of {' or '.join(self._expected_names())} (at offset {self._offset})"
        return f"{what} lacks {need} bytes"

    def _read_header(self) -> None:
        offset = self._offset
        expected = self._expected_names()
        where = " or ".join(expected)
        try:
            header = parse_member_header(self._take(HEADER_SIZE))
        except ValueError as exc:
            raise self._corrupt(f"the header of {where}", offset, str(exc)) from None
        if header.name not in expected:
            problem = f"member {header.name!r} where {where} belongs"
            if frame_index(header.name) is not None or header.name in (
                MANIFEST_NAME,
                CHECKSUMS_NAME,
            ):
                problem += " (members are missing, reordered or repeated)"
            raise self._corrupt(header.name, offset, problem)
        if self.manifest is not None and header.mtime != self.manifest.mtime:
            raise self._corrupt(header.name, offset, "modification time differs from created_at")
        is_frame = header.name not in (MANIFEST_NAME, CHECKSUMS_NAME)
        if (header.data_size is not None) != is_frame:
            raise self._corrupt(header.name, offset, "data_size belongs to frames only")
        limit = self._size_limit(header)
        if header.size > limit:
            raise self._corrupt(
                header.name, offset, f"size {header.size} exceeds the limit of {limit} bytes"
            )
        if is_frame:
            assert header.data_size is not None and self.manifest is not None
            if header.data_size > self.manifest.frame_size or (
                header.data_size == 0 and len(self._frames) > 0
            ):
                raise self._corrupt(
                    header.name,
                    offset,
                    f"data_size {header.data_size} is not possible with frames of "
                    f"{self.manifest.frame_size} bytes",
                )
        self._header = header
        self._header_offset = offset

    def _size_limit(self, header: MemberHeader) -> int:
        if header.name == MANIFEST_NAME:
            return MAX_MANIFEST_SIZE
        if header.name == CHECKSUMS_NAME:
            return 1024 + 512 * (len(self._frames) + 1)
        assert self.manifest is not None
        return max_frame_member_size(self.manifest.frame_size)

    def _view(self, size: int) -> memoryview:
        """The next `size` buffered bytes without a copy (release it before the buffer
        changes)."""
        return memoryview(self._buf)[self._pos : self._pos + size]

    def _read_member(self, header: MemberHeader) -> Iterator[ReaderEvent]:
        offset = self._offset
        name, size = header.name, header.size
        with self._view(size) as view:
            digest = hashlib.sha256(view).hexdigest()
        if digest != header.sha256:
            raise self._corrupt(
                name,
                offset,
                f"SHA-256 of the data does not match its header (at offset {self._header_offset})",
            )
        if any(self._buf[self._pos + size : self._pos + padded(size)]):
            raise self._corrupt(name, offset + size, "nonzero padding after the data")
        if name == MANIFEST_NAME:
            raw = self._take(size)
            self._finish_member(size)
            yield self._accept_manifest(raw, header, offset)
        elif name == CHECKSUMS_NAME:
            raw = self._take(size)
            self._accept_checksums(raw, offset)
            self._finish_member(size)
        else:
            with self._view(size) as view:
                data = self._decompress(view, header, offset)
            assert header.data_size is not None and self.manifest is not None
            entry = FrameEntry(name, offset, size, header.sha256, header.data_size)
            self._frames.append(entry)
            self._last_frame_full = header.data_size == self.manifest.frame_size
            if self._data_hash is not None:
                self._data_hash.update(data)
            self._data_size += len(data)
            self._skip(size)
            self._finish_member(size)
            yield TarData(data, entry)

    def _finish_member(self, size: int) -> None:
        """Step over the padding: the member is verified, a download may resume after it."""
        self._skip(padded(size) - size)
        self._header = None
        self.verified_offset = self._offset

    def _decompress(
        self, compressed: memoryview, header: MemberHeader, offset: int
    ) -> bytes | memoryview:
        assert header.data_size is not None
        if self._buffers is not None:
            out = self._buffers.take(header.data_size)
            try:
                decompress_into(self._dctx, compressed, out)
            except FrameError as exc:
                self._buffers.give_back(out)
                raise self._corrupt(header.name, offset, str(exc)) from None
            return out
        try:
            data = self._dctx.decompress(
                compressed, max_output_size=max(header.data_size, 1), allow_extra_data=False
            )
        except zstandard.ZstdError as exc:
            raise self._corrupt(
                header.name, offset, f"zstd frame does not decompress: {exc}"
            ) from None
        if len(data) != header.data_size:
            raise self._corrupt(
                header.name,
                offset,
                f"decompresses to {len(data)} bytes, its header says {header.data_size}",
            )
        return data

    def _accept_manifest(self, raw: bytes, header: MemberHeader, offset: int) -> ManifestRead:
        try:
            manifest = decode_manifest(raw)
        except CorruptData as exc:
            raise self._corrupt(MANIFEST_NAME, offset, str(exc)) from None
        if encode_manifest(manifest) != raw:
            raise self._corrupt(MANIFEST_NAME, offset, "not in its canonical encoding")
        if header.mtime != manifest.mtime:
            raise self._corrupt(
                MANIFEST_NAME, self._header_offset, "modification time differs from created_at"
            )
        self.manifest = manifest
        if manifest.format_version == 1:
            # In the background only over bytes nobody reuses: a lent buffer is given back
            # once its consumer used it, maybe before a background hash reached it.
            background = self._hash_in_background and self._buffers is None
            self._data_hash = BackgroundSha256() if background else hashlib.sha256()
        self._manifest_entry = MemberEntry(MANIFEST_NAME, offset, header.size, header.sha256)
        return ManifestRead(manifest)

    def _accept_checksums(self, raw: bytes, offset: int) -> None:
        def bad(problem: str) -> CorruptData:
            return self._corrupt(CHECKSUMS_NAME, offset, problem)

        try:
            checksums = decode_checksums(raw)
        except CorruptData as exc:
            raise bad(str(exc)) from None
        assert self.manifest is not None
        if checksums.format_version != self.manifest.format_version:
            raise bad(
                f"its format version {checksums.format_version} differs from the manifest's "
                f"{self.manifest.format_version}"
            )
        if checksums.manifest != self._manifest_entry:
            raise bad(f"its manifest entry {checksums.manifest} is not the manifest read")
        if len(checksums.frames) != len(self._frames):
            raise bad(f"lists {len(checksums.frames)} frames, the file has {len(self._frames)}")
        for listed, seen in zip(checksums.frames, self._frames, strict=True):
            if listed != seen:
                raise bad(f"its entry {listed} differs from the frame read ({seen})")
        if checksums.data_size != self._data_size:
            raise bad(
                f"the whole tar's size {checksums.data_size} is not the {self._data_size} bytes "
                "of the frames read"
            )
        digest = None if self._data_hash is None else self._data_hash.hexdigest()
        if checksums.data_sha256 != digest:  # version 1: the whole tar's SHA-256
            raise bad("the SHA-256 of the whole tar does not match the frames read")
        if encode_checksums(checksums) != raw:
            raise bad("not in its canonical encoding")
        self.checksums = checksums
        self._at_end = True


def read_snapshot_file(
    inp: BinaryIO, *, label: str = "snapshot file", chunk_size: int = 1024 * 1024
) -> Iterator[ReaderEvent]:
    """Events of the whole file read from `inp` (see SnapshotFileReader)."""
    reader = SnapshotFileReader(label)
    while chunk := inp.read(chunk_size):
        yield from reader.feed(chunk)
    yield from reader.finish()


def looks_like_snapshot_file(head: bytes) -> bool:
    """Whether a file starting with `head` (its first 512 bytes or more) is a .neon file, to
    tell one from a plain tar or a directory before reading it."""
    return head.startswith(PAX_PREFIX.encode() + MANIFEST_NAME.encode() + b"\0") and (
        head[257:263] == b"ustar\0"
    )


def read_manifest(inp: BinaryIO, *, label: str = "snapshot file") -> Manifest:
    """The verified manifest of the file `inp`, reading only as far as it (a few KiB)."""
    reader = SnapshotFileReader(label)
    while chunk := inp.read(BLOCK):
        for event in reader.feed(chunk):
            if isinstance(event, ManifestRead):
                return event.manifest
    for event in reader.finish():
        raise AssertionError(f"{event} before the manifest")
    raise AssertionError("finish() of a file without a manifest did not raise")


def extract_tar(
    inp: BinaryIO, out: BinaryIO, *, label: str = "snapshot file"
) -> tuple[Manifest, Checksums]:
    """Copy the verified basebackup tar of the file `inp` to `out`. On CorruptData, `out`
    holds a verified prefix only: a caller makes nothing visible unless this returns."""
    manifest: Manifest | None = None
    for event in read_snapshot_file(inp, label=label):
        if isinstance(event, ManifestRead):
            manifest = event.manifest
        elif isinstance(event, TarData):
            out.write(event.data)
        else:
            assert manifest is not None
            return manifest, event.checksums
    raise AssertionError("the reader ended without SnapshotEnd")
