"""manifest.json and checksums.json: canonical round trips and strict, field-naming errors."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone

import pytest

from pageserver_api.errors import CorruptData, InvalidArgument
from snapfile.manifest import (
    DELTA_FORMAT_VERSION,
    FORMAT_VERSION,
    Checksums,
    FrameEntry,
    MemberEntry,
    decode_checksums,
    decode_manifest,
    encode_checksums,
    encode_manifest,
    origin_of,
    snapshot_manifest,
)
from snapfile.writer import SnapshotFileWriter
from tests.snapfile.snapfile_helpers import make_manifest

SHA = "ab" * 32


def manifest_json(**changes: object) -> bytes:
    obj = json.loads(encode_manifest(make_manifest()))
    for key, value in changes.items():
        if value is KeyError:
            del obj[key]
        else:
            obj[key] = value
    return json.dumps(obj).encode()


def test_manifest_round_trip_is_canonical() -> None:
    delta = make_manifest(parent="oldpg", parent_lsn=0x3000028, source="pgdata1@snap1")
    for manifest in (make_manifest(), delta):
        data = encode_manifest(manifest)
        assert decode_manifest(data) == manifest
        assert encode_manifest(decode_manifest(data)) == data
    obj = json.loads(encode_manifest(delta))
    assert obj["lsn"] == "1/6B374848"
    assert obj["parent_lsn"] == "0/03000028"
    assert obj["system_identifier"] == "7312345678901234567"
    assert obj["created_at"] == "2026-12-03T17:00:00Z"
    assert obj["format_version"] == DELTA_FORMAT_VERSION
    assert json.loads(encode_manifest(make_manifest()))["format_version"] == FORMAT_VERSION


def test_created_at_in_another_zone_is_written_in_utc() -> None:
    when = datetime(2026, 12, 3, 18, 0, 0, tzinfo=timezone(timedelta(hours=1)))
    manifest = make_manifest(created_at=when)
    assert json.loads(encode_manifest(manifest))["created_at"] == "2026-12-03T17:00:00Z"
    assert decode_manifest(encode_manifest(manifest)).created_at == when


def test_decoding_a_manifest_leaves_strptime_unimported() -> None:
    """A push reads the manifests at its destination: `created_at` is parsed without
    strptime, whose first use imports _strptime (~8 ms of the push's CLI CPU); in UTC, and a
    day or time that does not exist is refused as before."""
    code = (
        "import sys\n"
        "from snapfile.manifest import decode_manifest\n"
        "created = decode_manifest(sys.stdin.buffer.read()).created_at\n"
        "print(created.isoformat(), '_strptime' in sys.modules)"
    )
    data = encode_manifest(make_manifest())
    proc = subprocess.run([sys.executable, "-c", code], input=data, capture_output=True, check=True)
    assert proc.stdout.decode().split() == ["2026-12-03T17:00:00+00:00", "False"]
    for day in ("2026-02-29T17:00:00Z", "2026-12-03T24:00:00Z", "2026-12-03T17:00:60Z"):
        with pytest.raises(CorruptData, match="'created_at' is not a valid time"):
            decode_manifest(manifest_json(created_at=day))


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        (
            {"format_version": 4},
            "format version 4 is not supported; this pg-neon reads versions 1, 2 and 3",
        ),
        ({"format_version": 0}, "'format_version'"),
        ({"format_version": 3}, "'format_version' is 3, a delta's, but the file names no parent"),
        ({"format_version": True}, "'format_version'"),
        ({"format_version": 1.0}, "'format_version'"),
        ({"format_version": "1"}, "'format_version'"),
        ({"lsn": KeyError}, "'lsn' is missing"),
        ({"extra": 1}, "'extra' is unknown"),
        ({"lsn": 5}, "'lsn'"),
        ({"lsn": "0/1"}, "'lsn'"),
        ({"pg_version": "15"}, "'pg_version'"),
        ({"pg_version": True}, "'pg_version'"),
        ({"system_identifier": 7312345678901234567}, "'system_identifier'"),
        ({"system_identifier": "-1"}, "'system_identifier'"),
        ({"system_identifier": str(2**64)}, "'system_identifier'"),
        ({"pg_timeline": 0}, "'pg_timeline'"),
        ({"source": ""}, "'source'"),
        ({"source": None}, "'source'"),
        ({"created_at": "2026-12-03 17:00:00"}, "'created_at'"),
        ({"created_at": "2026-13-03T17:00:00Z"}, "'created_at'"),
        ({"parent": "snap"}, "'parent_lsn'"),
        ({"parent_lsn": "0/03000028"}, "'parent_lsn'"),
        ({"parent": 3, "parent_lsn": "0/03000028"}, "'parent'"),
        ({"compression": "gzip"}, "'compression'"),
        ({"frame_size": 1 << 30}, "'frame_size'"),
        ({"frame_size": 4096.0}, "'frame_size'"),
    ],
)
def test_bad_manifest_names_the_field(changes: dict[str, object], field: str) -> None:
    with pytest.raises(CorruptData, match="snapshot manifest") as exc:
        decode_manifest(manifest_json(**changes))
    assert field in str(exc.value)


@pytest.mark.parametrize(
    "data",
    [b"", b"[]", b"{", b'{"lsn": NaN}', b"\xff", b'{"format_version": 1, "format_version": 1}'],
)
def test_manifest_that_is_not_a_json_object_is_corrupt(data: bytes) -> None:
    with pytest.raises(CorruptData, match="snapshot manifest"):
        decode_manifest(data)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"lsn": -1}, "'lsn'"),
        ({"created_at": datetime(2026, 1, 1)}, "'created_at'"),
        ({"created_at": datetime(2026, 1, 1, 0, 0, 0, 5, tzinfo=UTC)}, "'created_at'"),
        ({"parent": "x"}, "'parent_lsn'"),
        ({"frame_size": 100}, "'frame_size'"),
        ({"format_version": 9}, "'format_version'"),
    ],
)
def test_bad_manifest_in_code_is_invalid_argument(changes: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        make_manifest(**changes)
    assert field in str(exc.value)


def make_checksums(version: int = FORMAT_VERSION) -> Checksums:
    return Checksums(
        manifest=MemberEntry("manifest.json", 1536, 290, SHA),
        frames=(
            FrameEntry("frames/00000000.zst", 3584, 100, SHA, 4096),
            FrameEntry("frames/00000001.zst", 5120, 10, SHA, 7),
        ),
        data_size=4103,
        data_sha256=SHA if version == 1 else None,
        format_version=version,
    )


@pytest.mark.parametrize("version", [1, 2])
def test_checksums_round_trip_is_canonical(version: int) -> None:
    data = encode_checksums(make_checksums(version))
    assert decode_checksums(data) == make_checksums(version)
    assert encode_checksums(decode_checksums(data)) == data
    assert ("data_sha256" in json.loads(data)) == (version == 1)


def test_a_delta_is_written_in_version_3_a_whole_snapshot_in_2() -> None:
    """Version 3 (a delta whose WAL segment may be a sparse member) is what an older reader
    refuses at the file's head; a whole file stays readable by it."""
    whole = snapshot_manifest(7, 0x3000028, 1, "pgdata1@s1", 1_700_000_000)
    delta = snapshot_manifest(7, 0x4000028, 1, "pgdata1@s2", 1_700_000_000, "pgdata1@s1", 1)
    assert (whole.format_version, delta.format_version) == (2, 3)
    assert decode_manifest(encode_manifest(delta)) == delta
    with pytest.raises(InvalidArgument, match="writes a delta in format version 3, not 2"):
        SnapshotFileWriter(dataclasses.replace(delta, format_version=2))
    with pytest.raises(InvalidArgument, match="'format_version' is 3, a delta's, but the file"):
        dataclasses.replace(whole, format_version=3)  # no such manifest to write
    # What a snapshot imported from it records: a whole file's manifest, in the version a
    # whole file of its time has (a version 1 file's origin stays 1, compared as before).
    assert json.loads(origin_of(delta))["format_version"] == 2
    old = make_manifest(format_version=1)
    assert json.loads(origin_of(old))["format_version"] == 1
    writer = SnapshotFileWriter(delta)
    writer.write(b"\0" * 1024)
    writer.finish()
    assert writer.checksums.format_version == 3


def test_the_whole_tar_digest_belongs_to_version_1_only() -> None:
    with pytest.raises(InvalidArgument, match="'data_sha256' is not in version 2"):
        dataclasses.replace(make_checksums(2), data_sha256=SHA)
    with pytest.raises(InvalidArgument, match="'data_sha256' must be 64 lowercase hex"):
        dataclasses.replace(make_checksums(1), data_sha256=None)


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda o: o.update(format_version=4), "format version 4"),
        (lambda o: o.update(data_sha256=SHA), "'data_sha256' is unknown"),
        (lambda o: o.update(frames=[]), "'frames'"),
        (lambda o: o.update(frames={}), "'frames'"),
        (lambda o: o["frames"][1].pop("data_size"), "frames[1]: field 'data_size' is missing"),
        (lambda o: o["frames"][0].update(size="1"), "frames[0]: field 'size'"),
        (lambda o: o["manifest"].update(sha256="x"), "'manifest': field 'sha256'"),
        (lambda o: o["manifest"].update(data_size=1), "'manifest': field 'data_size' is unknown"),
    ],
)
def test_bad_checksums_name_the_field(edit: object, field: str) -> None:
    obj = json.loads(encode_checksums(make_checksums()))
    edit(obj)  # type: ignore[operator]
    with pytest.raises(CorruptData, match="snapshot checksums") as exc:
        decode_checksums(json.dumps(obj).encode())
    assert field in str(exc.value)


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda o: o.pop("data_sha256"), "'data_sha256' is missing"),
        (lambda o: o.update(data_sha256="AB" * 32), "'data_sha256'"),
        (lambda o: o.update(data_sha256=None), "'data_sha256'"),
    ],
)
def test_bad_version_1_checksums_name_the_field(edit: object, field: str) -> None:
    obj = json.loads(encode_checksums(make_checksums(1)))
    edit(obj)  # type: ignore[operator]
    with pytest.raises(CorruptData, match="snapshot checksums") as exc:
        decode_checksums(json.dumps(obj).encode())
    assert field in str(exc.value)
