"""The outer tar of a `.neon` file, byte by byte (docs/snapshot-format.md), shared by the writer
and the reader so that both agree on one canonical encoding.

Every member is a 1536-byte header region (a POSIX pax extended header block, its one data
block, the ustar header block) followed by the member's data padded with zeros to 512 bytes.
The pax header carries only a `comment` record (ignored by every tar): the SHA-256 of the
member's data and, for a frame, its uncompressed size, so a reader verifies each member as it
arrives. The archive ends with two zero blocks and nothing after them.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from snapfile.manifest import FrameEntry

BLOCK = 512
HEADER_SIZE = 3 * BLOCK
END_OF_ARCHIVE = bytes(2 * BLOCK)
MANIFEST_NAME = "manifest.json"
CHECKSUMS_NAME = "checksums.json"
FRAME_DIR = "frames/"
FRAME_DIGITS = 8
MAX_FRAMES = 10**FRAME_DIGITS
PAX_PREFIX = "PaxHeaders/"
MAX_MANIFEST_SIZE = 64 * 1024

_FRAME_NAME_RE = re.compile(r"^frames/(\d{8})\.zst\Z")
_COMMENT_RE = re.compile(r"^sha256=([0-9a-f]{64})(?: data_size=(0|[1-9]\d{0,9}))?\Z")
_OCTAL_RE = re.compile(rb"^[0-7]{11}\0\Z")
_REGULAR = b"0"
_PAX = b"x"


def frame_name(index: int) -> str:
    return f"{FRAME_DIR}{index:0{FRAME_DIGITS}d}.zst"


def frame_index(name: str) -> int | None:
    m = _FRAME_NAME_RE.match(name)
    return int(m.group(1)) if m else None


def max_frame_member_size(frame_size: int) -> int:
    """An upper bound of zstd's compressed size of `frame_size` bytes (ZSTD_compressBound plus
    frame header and checksum), so a reader refuses a bigger member before buffering it."""
    return frame_size + frame_size // 128 + 64 * 1024


def padding(size: int) -> bytes:
    return bytes(-size % BLOCK)


def padded(size: int) -> int:
    return size + (-size % BLOCK)


def _ustar_header(name: str, size: int, mtime: int, typeflag: bytes) -> bytes:
    raw = name.encode("ascii")
    if not 0 < len(raw) <= 100:
        raise ValueError(f"tar member name {name!r} does not fit a ustar header")
    if not 0 <= size < 8**11 or not 0 <= mtime < 8**11:
        raise ValueError(f"size {size} or mtime {mtime} of {name} does not fit a ustar header")
    header = bytearray(BLOCK)
    header[0 : len(raw)] = raw
    header[100:108] = b"0000644\0"
    header[108:116] = b"0000000\0"
    header[116:124] = b"0000000\0"
    header[124:136] = b"%011o\0" % size
    header[136:148] = b"%011o\0" % mtime
    header[148:156] = b" " * 8
    header[156:157] = typeflag
    header[257:263] = b"ustar\0"
    header[263:265] = b"00"
    header[329:337] = b"0000000\0"
    header[337:345] = b"0000000\0"
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def _pax_record(keyword: str, value: str) -> bytes:
    """`LEN keyword=value\\n`, LEN counting itself."""
    body = f" {keyword}={value}\n".encode("ascii")
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length += 1
    return str(length).encode("ascii") + body


def comment(sha256: str, data_size: int | None) -> str:
    return f"sha256={sha256}" + ("" if data_size is None else f" data_size={data_size}")


def member_header(name: str, size: int, mtime: int, sha256: str, data_size: int | None) -> bytes:
    """The 1536 bytes before a member's data."""
    record = _pax_record("comment", comment(sha256, data_size))
    return (
        _ustar_header(PAX_PREFIX + name, len(record), mtime, _PAX)
        + record
        + padding(len(record))
        + _ustar_header(name, size, mtime, _REGULAR)
    )


@dataclass(frozen=True, slots=True)
class MemberHeader:
    """What a member's header region says (already checked to be canonical)."""

    name: str
    size: int
    mtime: int
    sha256: str
    data_size: int | None


def _octal(field: bytes, what: str) -> int:
    if not _OCTAL_RE.match(field):
        raise ValueError(f"{what} field {field!r} is not 11 octal digits")
    return int(field[:11], 8)


def _block_checksum_ok(block: bytes) -> bool:
    stored = block[148:156]
    if not re.match(rb"^[0-7]{6}\0 \Z", stored):
        return False
    return int(stored[:6], 8) == sum(block[:148]) + 8 * 32 + sum(block[156:])


def parse_member_header(region: bytes) -> MemberHeader:
    """Decode a 1536-byte header region; ValueError saying what is wrong unless it is exactly
    what member_header() writes."""
    pax, pax_data, ustar = region[:BLOCK], region[BLOCK : 2 * BLOCK], region[2 * BLOCK :]
    for block, which in ((pax, "pax header"), (ustar, "ustar header")):
        if not _block_checksum_ok(block):
            raise ValueError(f"{which} block checksum does not match")
    name = ustar[:100].rstrip(b"\0")
    if not name or not name.isascii() or b"\0" in name:
        raise ValueError(f"member name {bytes(name)!r} is not a valid name")
    size = _octal(ustar[124:136], "size")
    mtime = _octal(ustar[136:148], "mtime")
    record_len = _octal(pax[124:136], "pax size")
    if record_len > BLOCK:
        raise ValueError(f"pax header of {record_len} bytes is longer than one block")
    record = pax_data[:record_len].decode("ascii", "replace")
    prefix = f"{record_len} comment="
    m = _COMMENT_RE.match(record[len(prefix) : -1]) if record.startswith(prefix) else None
    if m is None or not record.endswith("\n"):
        raise ValueError(f"pax header record {record!r} is not a snapshot member comment")
    header = MemberHeader(
        name=name.decode("ascii"),
        size=size,
        mtime=mtime,
        sha256=m.group(1),
        data_size=None if m.group(2) is None else int(m.group(2)),
    )
    canonical = member_header(header.name, size, mtime, header.sha256, header.data_size)
    if canonical != region:
        at = next(i for i in range(HEADER_SIZE) if canonical[i] != region[i])
        raise ValueError(f"header byte {at} differs from its canonical encoding")
    return header


_FRAME_RECORD = struct.Struct("<QQQ32s")


class FrameLog:
    """The frames seen so far, packed in 56 bytes each: the only state of a writer or reader
    that grows with the snapshot (14 MiB per TiB at 4 MiB frames)."""

    def __init__(self) -> None:
        self._packed = bytearray()

    def __len__(self) -> int:
        return len(self._packed) // _FRAME_RECORD.size

    def append(self, entry: FrameEntry) -> None:
        self._packed += _FRAME_RECORD.pack(
            entry.offset, entry.size, entry.data_size, bytes.fromhex(entry.sha256)
        )

    def __iter__(self) -> Iterator[FrameEntry]:
        for index, (offset, size, data_size, digest) in enumerate(
            _FRAME_RECORD.iter_unpack(self._packed)
        ):
            yield FrameEntry(frame_name(index), offset, size, digest.hex(), data_size)


class TarBytesPassed:
    """Follows a `.neon` file's bytes as they pass (`feed`), member by member, counting the
    tar bytes of the frames whose members passed (`tar_bytes`, from their headers): a
    pusher's progress against the tar's size, without reading the frames' data. What is
    not a member header where one is due (never from pg-neon's daemon) stops the count."""

    def __init__(self) -> None:
        self.tar_bytes = 0
        self._head = bytearray()
        self._skip = 0
        self._frame = 0  # the tar bytes of the frame being skipped
        self._lost = False

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view and not self._lost:
            if self._skip:
                step = min(self._skip, len(view))
                self._skip -= step
                view = view[step:]
                if not self._skip:
                    self.tar_bytes += self._frame
                    self._frame = 0
                continue
            take = HEADER_SIZE - len(self._head)
            self._head += view[:take]
            view = view[take:]
            if len(self._head) < HEADER_SIZE:
                return
            try:
                header = parse_member_header(bytes(self._head))
            except ValueError:  # the end of the archive's zeros, or not a .neon file
                self._lost = True
                return
            self._head.clear()
            self._skip = padded(header.size)
            if frame_index(header.name) is not None and header.data_size is not None:
                self._frame = header.data_size  # counted once its member passed
