"""Small builders shared by the snapfile tests: a manifest, a tar of generated files, and
whole-file encode/decode with a given chunking."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import random
import tarfile
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime

from snapfile import Checksums, Manifest, SnapshotFileReader, SnapshotFileWriter, TarData
from snapfile.container import (
    CHECKSUMS_NAME,
    END_OF_ARCHIVE,
    HEADER_SIZE,
    MANIFEST_NAME,
    member_header,
    padded,
    padding,
)
from snapfile.manifest import MemberEntry, encode_checksums, encode_manifest, written_version
from snapfile.reader import ManifestRead, ReaderEvent, SnapshotEnd
from snapfile.writer import DEFAULT_LEVEL

CREATED = datetime(2026, 12, 3, 17, 0, 0, tzinfo=UTC)


def make_manifest(frame_size: int = 4096, **changes: object) -> Manifest:
    fields: dict[str, object] = {
        "pg_version": 15,
        "system_identifier": 7312345678901234567,
        "lsn": 0x1_6B374848,
        "pg_timeline": 1,
        "source": "basebackup://127.0.0.1:5432",
        "created_at": CREATED,
        "frame_size": frame_size,
    }
    fields.update(changes)
    if "format_version" not in changes:  # as pg-neon writes it: a delta's is another
        fields["format_version"] = written_version(changes.get("parent"))  # type: ignore[arg-type]
    return Manifest(**fields)  # type: ignore[arg-type]


def generated_bytes(size: int, seed: int) -> bytes:
    """Half random (incompressible), half repetitive, like a data directory."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        n = rng.randrange(1, 3000)
        out += rng.randbytes(n) if rng.random() < 0.5 else bytes([rng.randrange(256)]) * n
    return bytes(out[:size])


def make_tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def split(data: bytes, sizes: Sequence[int]) -> Iterator[bytes]:
    """`data` cut into pieces of the given sizes, cycled; a size 0 is an empty piece followed
    by a one-byte piece (feeding nothing must be harmless)."""
    pos, i = 0, 0
    while pos < len(data):
        n = sizes[i % len(sizes)] if sizes else len(data)
        if n == 0:
            yield b""
            n = 1
        yield data[pos : pos + n]
        pos += n
        i += 1


def encode(
    manifest: Manifest, tar: bytes, chunk_sizes: Sequence[int] = (), level: int = DEFAULT_LEVEL
) -> tuple[bytes, Checksums]:
    writer = SnapshotFileWriter(manifest, level=level)
    out = [writer.write(piece) for piece in split(tar, chunk_sizes)]
    out.append(writer.finish())
    assert writer.offset == sum(len(p) for p in out)
    return b"".join(out), writer.checksums


def decode_events(
    neon: bytes, chunk_sizes: Sequence[int] = (), events: list[ReaderEvent] | None = None
) -> list[ReaderEvent]:
    """Every event of the file fed in the given chunking; appended to `events` as they come,
    so a caller sees what was yielded before an error."""
    got = [] if events is None else events
    reader = SnapshotFileReader("x.neon")
    for piece in split(neon, chunk_sizes):
        got.extend(reader.feed(piece))
    got.extend(reader.finish())
    return got


def decode(neon: bytes, chunk_sizes: Sequence[int] = ()) -> tuple[Manifest, bytes, Checksums]:
    events = decode_events(neon, chunk_sizes)
    assert isinstance(events[0], ManifestRead)
    assert isinstance(events[-1], SnapshotEnd)
    data = [e for e in events[1:-1] if isinstance(e, TarData)]
    assert len(data) == len(events) - 2
    return events[0].manifest, b"".join(e.data for e in data), events[-1].checksums


def member(name: str, data: bytes, mtime: int) -> bytes:
    digest = hashlib.sha256(data).hexdigest()
    return member_header(name, len(data), mtime, digest, None) + data + padding(len(data))


def as_version_1(neon: bytes, checksums: Checksums, tar: bytes) -> tuple[bytes, Checksums]:
    """The format version 1 file of the same frames (what pg-neon wrote before version 2):
    the manifest says 1 (the same length, so every offset stays) and checksums.json has
    the whole tar's SHA-256 as its last field. test_format_v1 checks it against a file the
    version 1 writer made."""
    manifest = decode(neon)[0]
    raw = encode_manifest(dataclasses.replace(manifest, format_version=1))
    entry = MemberEntry(MANIFEST_NAME, HEADER_SIZE, len(raw), hashlib.sha256(raw).hexdigest())
    v1 = dataclasses.replace(
        checksums, manifest=entry, data_sha256=hashlib.sha256(tar).hexdigest(), format_version=1
    )
    last = checksums.frames[-1]
    frames = neon[HEADER_SIZE + padded(len(raw)) : last.offset + padded(last.size)]
    head = member(MANIFEST_NAME, raw, manifest.mtime)
    tail = member(CHECKSUMS_NAME, encode_checksums(v1), manifest.mtime)
    return head + frames + tail + END_OF_ARCHIVE, v1
