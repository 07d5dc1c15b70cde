"""The reader's whole-tar SHA-256 of a format version 1 file on a thread of its own
(hash_in_background, as snapfile/verified.py verified_tar reads every .neon file): the same
events and checksums as hashing inline, and a whole-tar digest that does not match is still
refused. A version 2 file has no whole-tar digest: no thread is started for it."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest

from pageserver_api.errors import CorruptData
from snapfile import Checksums, SnapshotFileReader
from snapfile.background_hash import BackgroundSha256
from snapfile.container import CHECKSUMS_NAME, END_OF_ARCHIVE, member_header, padding
from snapfile.manifest import encode_checksums
from snapfile.reader import ReaderEvent
from tests.snapfile.snapfile_helpers import (
    as_version_1,
    encode,
    generated_bytes,
    make_manifest,
    split,
)

FRAME = 4096
TAR = generated_bytes(23 * FRAME + 77, 4)
MANIFEST = make_manifest(FRAME)


def encode_v1() -> tuple[bytes, Checksums]:
    return as_version_1(*encode(MANIFEST, TAR), TAR)


def events_of(neon: bytes, chunks: tuple[int, ...], background: bool) -> list[ReaderEvent]:
    reader = SnapshotFileReader("x.neon", hash_in_background=background)
    try:
        got = [e for piece in split(neon, chunks) for e in reader.feed(piece)]
        return got + list(reader.finish())
    finally:
        reader.close()


@pytest.mark.parametrize("chunks", [(), (1,), (1000, 3), (FRAME * 5 + 1,)])
def test_background_hash_reads_the_same(chunks: tuple[int, ...]) -> None:
    neon, checksums = encode_v1()
    got = events_of(neon, chunks, background=True)
    assert got == events_of(neon, chunks, background=False)
    assert got[-1].checksums == checksums  # type: ignore[union-attr]


def test_a_whole_tar_digest_that_does_not_match_is_refused() -> None:
    """checksums.json rewritten (canonical, its header matching) with another data_sha256:
    every frame checks out, the whole tar's digest does not."""
    neon, checksums = encode_v1()
    bad = encode_checksums(dataclasses.replace(checksums, data_sha256="ab" * 32))
    start = checksums.frames[-1].offset + checksums.frames[-1].size
    start += len(padding(checksums.frames[-1].size))
    header = member_header(
        CHECKSUMS_NAME, len(bad), MANIFEST.mtime, hashlib.sha256(bad).hexdigest(), None
    )
    damaged = neon[:start] + header + bad + padding(len(bad)) + END_OF_ARCHIVE
    for background in (False, True):
        with pytest.raises(CorruptData, match="SHA-256 of the whole tar does not match"):
            events_of(damaged, (999,), background)


def test_background_sha256_is_sha256() -> None:
    h = BackgroundSha256()
    pieces = list(split(TAR, (1, 5000, 3, 70000)))
    for piece in pieces:
        h.update(piece)
    assert h.hexdigest() == hashlib.sha256(TAR).hexdigest()
    h.close()


def test_a_version_2_file_is_read_without_a_hashing_thread() -> None:
    neon, checksums = encode(MANIFEST, TAR)
    reader = SnapshotFileReader("x.neon", hash_in_background=True)
    got = [e for piece in split(neon, (5000,)) for e in reader.feed(piece)]
    got += reader.finish()
    assert got[-1].checksums == checksums  # type: ignore[union-attr]
    assert reader._data_hash is None  # no BackgroundSha256, hence no thread
