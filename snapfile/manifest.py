"""What a `.neon` snapshot file says about itself: the head manifest and the trailing checksums.

A streamed file cannot start with digests of what follows it, so the description is split in
two JSON members (see docs/snapshot-format.md): `manifest.json` first, with everything known
before the data (versions, identity, LSN, source, parent, framing), and `checksums.json` last,
with every member's offset, size and SHA-256 and the digest of the whole uncompressed tar.

Both are encoded canonically (fixed key order, two-space indent, ASCII, trailing newline), so
a reader can demand byte equality with the re-encoding of what it decoded. Decoding is strict:
an unknown format version, a missing, extra, duplicated or mistyped field raises CorruptData
naming the field; building a record with bad values in code raises InvalidArgument.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pageserver_api.errors import CorruptData, InvalidArgument, NeonError
from pg15.constants import PG_MAJOR_VERSION
from pg15.lsn import format_lsn

FORMAT_VERSION = 2
"""What this pg-neon writes for a whole snapshot. Version 2 dropped checksums.json's
`data_sha256` (the whole tar's SHA-256): the frames' own SHA-256s, listed there, already fix
every byte of the tar."""
DELTA_FORMAT_VERSION = 3
"""What it writes for a delta (a file naming a parent): version 2, whose tar may hold its WAL
segment as a GNU sparse member (format 1.0, in PAX headers: the segment's records, not its
16 MiB of zeros to compress, decompress and write). A reader older than that refuses the
file at its head, by this number, instead of at that member after the whole transfer."""
READABLE_VERSIONS = (1, 2, 3)
"""What it reads: version 1 files are verified as before, their whole-tar SHA-256 included."""
_READABLE = ", ".join(str(v) for v in READABLE_VERSIONS[:-1]) + f" and {READABLE_VERSIONS[-1]}"
COMPRESSION_ZSTD = "zstd"
DEFAULT_FRAME_SIZE = 4 * 1024 * 1024
# Bounds a reader's memory (one frame in, one frame out) against a hostile manifest.
MIN_FRAME_SIZE = 4096
MAX_FRAME_SIZE = 64 * 1024 * 1024
MAX_UINT64 = 2**64 - 1

_SHA256_RE = re.compile(r"^[0-9a-f]{64}\Z")
_LSN_RE = re.compile(r"^([0-9A-F]{1,8})/([0-9A-F]{8})\Z")
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_TIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z\Z")

ErrorType = type[NeonError]


def _check(ok: bool, error: ErrorType, what: str, field_name: str, problem: str) -> None:
    if not ok:
        raise error(f"{what}: field {field_name!r} {problem}")


def _check_int(
    value: object, error: ErrorType, what: str, name: str, lo: int = 0, hi: int = MAX_UINT64
) -> None:
    _check(
        isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi,
        error,
        what,
        name,
        f"must be an integer in [{lo}, {hi}], not {value!r}",
    )


def _check_sha256(value: object, error: ErrorType, what: str, name: str) -> None:
    _check(
        isinstance(value, str) and bool(_SHA256_RE.match(value)),
        error,
        what,
        name,
        f"must be 64 lowercase hex digits, not {value!r}",
    )


def format_time(when: datetime) -> str:
    return when.astimezone(UTC).strftime(_TIME_FORMAT)


@dataclass(frozen=True, slots=True)
class Manifest:
    """The head of a snapshot file: everything known before the first data byte."""

    pg_version: int
    system_identifier: int
    lsn: int
    pg_timeline: int
    source: str
    created_at: datetime
    parent: str | None = None
    parent_lsn: int | None = None
    frame_size: int = DEFAULT_FRAME_SIZE
    compression: str = COMPRESSION_ZSTD
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        self._validate(InvalidArgument)

    def _validate(self, error: ErrorType) -> None:
        what = "snapshot manifest"
        _check(
            self.format_version in READABLE_VERSIONS,
            error,
            what,
            "format_version",
            f"is {self.format_version!r}; this pg-neon reads versions {_READABLE} only "
            "(a newer pg-neon wrote the file: upgrade pg-neon to read it)",
        )
        _check(
            self.format_version != DELTA_FORMAT_VERSION or self.parent is not None,
            error,
            what,
            "format_version",
            f"is {DELTA_FORMAT_VERSION}, a delta's, but the file names no parent",
        )
        _check_int(self.pg_version, error, what, "pg_version", 1, 1000)
        _check_int(self.system_identifier, error, what, "system_identifier")
        _check_int(self.lsn, error, what, "lsn")
        _check_int(self.pg_timeline, error, what, "pg_timeline", 1, 2**32 - 1)
        _check(
            isinstance(self.source, str) and 0 < len(self.source) <= 4096,
            error,
            what,
            "source",
            "must be a non-empty string of at most 4096 characters",
        )
        _check(
            isinstance(self.created_at, datetime)
            and self.created_at.utcoffset() is not None
            and self.created_at.microsecond == 0,
            error,
            what,
            "created_at",
            "must be a timezone-aware time in whole seconds",
        )
        _check(
            self.parent is None or (isinstance(self.parent, str) and 0 < len(self.parent) <= 1024),
            error,
            what,
            "parent",
            "must be null or a non-empty snapshot name",
        )
        if self.parent_lsn is not None:
            _check_int(self.parent_lsn, error, what, "parent_lsn")
        _check(
            (self.parent is None) == (self.parent_lsn is None),
            error,
            what,
            "parent_lsn",
            "must be set exactly when 'parent' is (a delta names its parent and its LSN)",
        )
        _check(
            self.compression == COMPRESSION_ZSTD,
            error,
            what,
            "compression",
            f"must be {COMPRESSION_ZSTD!r}, not {self.compression!r}",
        )
        _check_int(self.frame_size, error, what, "frame_size", MIN_FRAME_SIZE, MAX_FRAME_SIZE)

    @property
    def mtime(self) -> int:
        """The creation time as the tar members' modification time (whole seconds)."""
        return int(self.created_at.timestamp())

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "pg_version": self.pg_version,
            "system_identifier": str(self.system_identifier),
            "lsn": format_lsn(self.lsn),
            "pg_timeline": self.pg_timeline,
            "source": self.source,
            "created_at": format_time(self.created_at),
            "parent": self.parent,
            "parent_lsn": None if self.parent_lsn is None else format_lsn(self.parent_lsn),
            "compression": self.compression,
            "frame_size": self.frame_size,
        }


def snapshot_manifest(
    system_identifier: int, lsn: int, pg_timeline: int, source: str, created_at: int,
    parent: str | None = None, parent_lsn: int | None = None,
) -> Manifest:  # fmt: skip
    """The manifest of a snapshot's `.neon` file as pg-neon writes it (`created_at`: the
    snapshot's creation time, whole seconds, so every export is the same bytes)."""
    return Manifest(
        pg_version=PG_MAJOR_VERSION,
        system_identifier=system_identifier,
        lsn=lsn,
        pg_timeline=pg_timeline,
        source=source,
        created_at=datetime.fromtimestamp(created_at, UTC),
        parent=parent,
        parent_lsn=parent_lsn,
        format_version=written_version(parent),
    )


def written_version(parent: str | None) -> int:
    """The format version pg-neon writes a file in: a delta's (naming `parent`) or a whole
    snapshot's."""
    return FORMAT_VERSION if parent is None else DELTA_FORMAT_VERSION


def _validate_location(entry: MemberEntry | FrameEntry, error: ErrorType, what: str) -> None:
    _check(
        isinstance(entry.name, str) and 0 < len(entry.name) <= 100,
        error,
        what,
        "name",
        "must be a member name",
    )
    _check_int(entry.offset, error, what, "offset")
    _check_int(entry.size, error, what, "size")
    _check_sha256(entry.sha256, error, what, "sha256")


@dataclass(frozen=True, slots=True)
class MemberEntry:
    """One member of the file: where its bytes are and their SHA-256 (`sha256sum` of the
    extracted file)."""

    name: str
    offset: int
    size: int
    sha256: str

    def __post_init__(self) -> None:
        self._validate(InvalidArgument, "snapshot member")

    def _validate(self, error: ErrorType, what: str) -> None:
        _validate_location(self, error, what)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "offset": self.offset, "size": self.size, "sha256": self.sha256}


@dataclass(frozen=True, slots=True)
class FrameEntry:
    """One zstd frame member: `size` compressed bytes at `offset` holding `data_size` bytes
    of the tar."""

    name: str
    offset: int
    size: int
    sha256: str
    data_size: int

    def __post_init__(self) -> None:
        self._validate(InvalidArgument, "snapshot frame")

    def _validate(self, error: ErrorType, what: str) -> None:
        _validate_location(self, error, what)
        _check_int(self.data_size, error, what, "data_size", 0, MAX_FRAME_SIZE)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "offset": self.offset,
            "size": self.size,
            "sha256": self.sha256,
            "data_size": self.data_size,
        }


@dataclass(frozen=True, slots=True)
class Checksums:
    """The tail of a snapshot file: every member before it, and the whole tar's digest."""

    manifest: MemberEntry
    frames: tuple[FrameEntry, ...]
    data_size: int
    data_sha256: str | None = None
    """Version 1 only (None in version 2): the SHA-256 of the whole uncompressed tar."""
    format_version: int = field(default=FORMAT_VERSION)

    def __post_init__(self) -> None:
        self._validate(InvalidArgument)

    def _validate(self, error: ErrorType) -> None:
        what = "snapshot checksums"
        _check(
            self.format_version in READABLE_VERSIONS,
            error,
            what,
            "format_version",
            f"is {self.format_version!r}; this pg-neon reads versions {_READABLE} only",
        )
        _check(
            isinstance(self.manifest, MemberEntry),
            error,
            what,
            "manifest",
            "must be a member entry",
        )
        _check(
            isinstance(self.frames, tuple)
            and len(self.frames) > 0
            and all(isinstance(f, FrameEntry) for f in self.frames),
            error,
            what,
            "frames",
            "must be a non-empty list of frame entries",
        )
        _check_int(self.data_size, error, what, "data_size")
        if self.format_version == 1:
            _check_sha256(self.data_sha256, error, what, "data_sha256")
        else:
            _check(
                self.data_sha256 is None,
                error,
                what,
                "data_sha256",
                f"is not in version {self.format_version}",
            )

    @property
    def content_id(self) -> str:
        """SHA-256 of checksums.json: it fixes every byte of the file (the manifest and each
        frame through their digests, every header through its canonical encoding), so two
        files with the same content_id are identical."""
        return hashlib.sha256(encode_checksums(self)).hexdigest()

    @property
    def members(self) -> tuple[MemberEntry | FrameEntry, ...]:
        """Every member before checksums.json, in file order."""
        return (self.manifest, *self.frames)

    def to_json(self) -> dict[str, Any]:
        out = {
            "format_version": self.format_version,
            "manifest": self.manifest.to_json(),
            "frames": [f.to_json() for f in self.frames],
            "data_size": self.data_size,
        }
        if self.format_version == 1:
            out["data_sha256"] = self.data_sha256
        return out


def _encode(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=True) + "\n").encode("ascii")


def encode_manifest(manifest: Manifest) -> bytes:
    """The canonical bytes of manifest.json."""
    return _encode(manifest.to_json())


def encode_checksums(checksums: Checksums) -> bytes:
    """The canonical bytes of checksums.json."""
    return _encode(checksums.to_json())


def _reject_duplicates(what: str) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise CorruptData(f"{what}: field {key!r} appears twice")
            out[key] = value
        return out

    return hook


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _load_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        text = data.decode("utf-8")
        obj = json.loads(
            text, object_pairs_hook=_reject_duplicates(what), parse_constant=_reject_constant
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptData(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise CorruptData(f"{what} is not a JSON object")
    return obj


def _fields(obj: dict[str, Any], names: Iterable[str], what: str) -> dict[str, Any]:
    """The named fields, each present; any other field is an error."""
    wanted = list(names)
    for name in wanted:
        if name not in obj:
            raise CorruptData(f"{what}: field {name!r} is missing")
    for name in obj:
        if name not in wanted:
            raise CorruptData(f"{what}: field {name!r} is unknown")
    return {name: obj[name] for name in wanted}


def _decode_lsn(value: object, what: str, name: str) -> int:
    m = _LSN_RE.match(value) if isinstance(value, str) else None
    if m is None:
        raise CorruptData(f"{what}: field {name!r} must be an LSN like '0/16B3748', not {value!r}")
    return (int(m.group(1), 16) << 32) | int(m.group(2), 16)


def _check_version(obj: dict[str, Any], what: str) -> int:
    """The version first: a newer file's other fields may legitimately differ."""
    version = obj.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        _check_int(version, CorruptData, what, "format_version", 1)
        raise CorruptData(
            f"{what}: format version {version} is not supported; this pg-neon reads versions "
            f"{_READABLE} (upgrade pg-neon to read this file)"
        )
    return version


def decode_manifest(data: bytes) -> Manifest:
    """Parse manifest.json strictly (see the module docstring)."""
    what = "snapshot manifest"
    obj = _load_object(data, what)
    _check_version(obj, what)
    f = _fields(obj, Manifest.__dataclass_fields__, what)
    sysid = f["system_identifier"]
    if not (isinstance(sysid, str) and sysid.isdigit() and str(int(sysid)) == sysid):
        raise CorruptData(f"{what}: field 'system_identifier' must be a decimal string")
    created = f["created_at"]
    if not (isinstance(created, str) and _TIME_RE.match(created)):
        raise CorruptData(
            f"{what}: field 'created_at' must be a UTC time like 2026-01-31T12:00:00Z, "
            f"not {created!r}"
        )
    try:
        # fromisoformat, not strptime: _TIME_RE checked the form, and strptime's first use
        # imports _strptime (locale, calendar, its regular expressions): ~8 ms of the CPU of
        # every push, which reads the manifests at its destination.
        created_at = datetime.fromisoformat(created)
    except ValueError:
        raise CorruptData(f"{what}: field 'created_at' is not a valid time: {created!r}") from None
    parent_lsn = f["parent_lsn"]
    manifest = object.__new__(Manifest)
    values = {
        **f,
        "system_identifier": int(sysid),
        "lsn": _decode_lsn(f["lsn"], what, "lsn"),
        "created_at": created_at,
        "parent_lsn": None if parent_lsn is None else _decode_lsn(parent_lsn, what, "parent_lsn"),
    }
    for name, value in values.items():
        object.__setattr__(manifest, name, value)
    manifest._validate(CorruptData)
    return manifest


def _decode_entry(obj: object, cls: type[Any], what: str) -> Any:
    if not isinstance(obj, dict):
        raise CorruptData(f"{what} is not a JSON object")
    f = _fields(obj, cls.__dataclass_fields__, what)
    entry = object.__new__(cls)
    for name, value in f.items():
        object.__setattr__(entry, name, value)
    entry._validate(CorruptData, what)
    return entry


def decode_checksums(data: bytes) -> Checksums:
    """Parse checksums.json strictly (see the module docstring)."""
    what = "snapshot checksums"
    obj = _load_object(data, what)
    version = _check_version(obj, what)
    names = [n for n in Checksums.__dataclass_fields__ if version == 1 or n != "data_sha256"]
    f = {"data_sha256": None, **_fields(obj, names, what)}
    if not isinstance(f["frames"], list):
        raise CorruptData(f"{what}: field 'frames' must be a list")
    checksums = object.__new__(Checksums)
    values = {
        **f,
        "manifest": _decode_entry(f["manifest"], MemberEntry, f"{what}: field 'manifest'"),
        "frames": tuple(
            _decode_entry(frame, FrameEntry, f"{what}: frames[{i}]")
            for i, frame in enumerate(f["frames"])
        ),
    }
    for name, value in values.items():
        object.__setattr__(checksums, name, value)
    checksums._validate(CorruptData)
    return checksums


def origin_of(manifest: Manifest) -> str:
    """What a snapshot imported from a `.neon` file is (Snapshot.origin): the file's manifest
    as a whole snapshot's (JSON), whether the file was whole or a delta."""
    version = manifest.format_version  # a delta's version is a whole file's, 1 and 2 kept
    whole = dataclasses.replace(
        manifest, parent=None, parent_lsn=None,
        format_version=FORMAT_VERSION if version == DELTA_FORMAT_VERSION else version,
    )  # fmt: skip
    return encode_manifest(whole).decode()
