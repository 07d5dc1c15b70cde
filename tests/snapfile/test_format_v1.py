"""Format version 1 files (before the whole-tar SHA-256 was dropped) still read: a file the
version 1 writer made (tests/snapfile/data/format-v1.neon, written by the code of 82b706f)
decodes to its tar, and its whole-tar SHA-256 is still checked; a file mixing the versions is
refused."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest

from pageserver_api.errors import CorruptData, InvalidArgument
from snapfile import SnapshotFileWriter
from snapfile.container import CHECKSUMS_NAME, END_OF_ARCHIVE
from snapfile.manifest import FORMAT_VERSION, encode_checksums
from tests.snapfile.snapfile_helpers import (
    as_version_1,
    decode,
    encode,
    generated_bytes,
    make_manifest,
    make_tar,
    member,
)

FIXTURE = Path(__file__).with_name("data") / "format-v1.neon"
FIXTURE_TAR = make_tar(
    {
        "PG_VERSION": b"15\n",
        "base/1/1259": generated_bytes(9000, 7),
        "global/pg_control": generated_bytes(3000, 8),
    }
)
FIXTURE_TAR_SHA256 = "abcf32dee1a3a205fcfd90772b1380ddf4f7204252a6d14c79c81f7815c153af"


def test_a_version_1_file_reads_as_before() -> None:
    manifest, tar, checksums = decode(FIXTURE.read_bytes(), (1000, 7))
    assert manifest.format_version == checksums.format_version == 1
    assert hashlib.sha256(tar).hexdigest() == FIXTURE_TAR_SHA256 == checksums.data_sha256
    assert tar == FIXTURE_TAR
    assert len(checksums.frames) == 5


def test_version_2_is_written_without_the_whole_tar_digest() -> None:
    neon, checksums = encode(make_manifest(), FIXTURE_TAR, level=3)
    assert FORMAT_VERSION == checksums.format_version == 2 and checksums.data_sha256 is None
    assert b"data_sha256" not in neon
    # The same frames as version 1 wrote (zstd level 3 then): only the two JSON members differ.
    old = FIXTURE.read_bytes()
    assert as_version_1(neon, checksums, FIXTURE_TAR)[0] == old
    assert decode(neon)[1] == FIXTURE_TAR


def test_the_writer_refuses_to_write_version_1() -> None:
    with pytest.raises(InvalidArgument, match="writes a whole snapshot in format version 2, not 1"):
        SnapshotFileWriter(make_manifest(format_version=1))


def _with_checksums(neon: bytes, raw: bytes) -> bytes:
    """`neon` with its checksums.json replaced by `raw` (its header matching)."""
    start = neon.rindex(b"PaxHeaders/" + CHECKSUMS_NAME.encode())
    return neon[:start] + member(CHECKSUMS_NAME, raw, make_manifest().mtime) + END_OF_ARCHIVE


def test_a_version_1_whole_tar_digest_is_still_checked() -> None:
    neon, checksums = as_version_1(*encode(make_manifest(), FIXTURE_TAR), FIXTURE_TAR)
    bad = encode_checksums(dataclasses.replace(checksums, data_sha256="ab" * 32))
    with pytest.raises(CorruptData, match="SHA-256 of the whole tar does not match"):
        decode(_with_checksums(neon, bad))


def test_mixed_versions_are_refused() -> None:
    """A version 1 manifest with version 2 checksums, and the other way round."""
    neon2, checksums2 = encode(make_manifest(), FIXTURE_TAR)
    neon1, checksums1 = as_version_1(neon2, checksums2, FIXTURE_TAR)
    v1_then_2 = dataclasses.replace(checksums2, manifest=checksums1.manifest)
    with pytest.raises(CorruptData, match="format version 2 differs from the manifest's 1"):
        decode(_with_checksums(neon1, encode_checksums(v1_then_2)))
    v2_then_1 = dataclasses.replace(checksums1, manifest=checksums2.manifest)
    with pytest.raises(CorruptData, match="format version 1 differs from the manifest's 2"):
        decode(_with_checksums(neon2, encode_checksums(v2_then_1)))
