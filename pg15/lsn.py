"""LSNs and WAL segment naming, as PostgreSQL prints and names them."""

from __future__ import annotations

import re

from proto.errors import InvalidArgument

DEFAULT_SEGMENT_SIZE = 16 * 1024 * 1024

_LSN_RE = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})\Z")
_SEGMENT_RE = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})(\.partial)?\Z")


def parse_lsn(text: str) -> int:
    """Parse `16/B374D848` into an integer; a clear error otherwise."""
    m = _LSN_RE.match(text.strip())
    if not m:
        raise InvalidArgument(f"invalid LSN {text!r}: expected the form X/X, e.g. 0/16B3748")
    return (int(m.group(1), 16) << 32) | int(m.group(2), 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:08X}"


def segments_per_xlogid(segment_size: int) -> int:
    return 0x100000000 // segment_size


def segment_file_name(timeline: int, segno: int, segment_size: int = DEFAULT_SEGMENT_SIZE) -> str:
    per = segments_per_xlogid(segment_size)
    return f"{timeline:08X}{segno // per:08X}{segno % per:08X}"


def parse_segment_file_name(
    name: str, segment_size: int = DEFAULT_SEGMENT_SIZE
) -> tuple[int, int, bool]:
    """Return (timeline, segno, is_partial) for a name like 000000010000000000000002."""
    m = _SEGMENT_RE.match(name)
    if not m:
        raise InvalidArgument(f"{name!r} is not a WAL segment file name")
    per = segments_per_xlogid(segment_size)
    return int(m.group(1), 16), int(m.group(2), 16) * per + int(m.group(3), 16), bool(m.group(4))


def segment_start(segno: int, segment_size: int = DEFAULT_SEGMENT_SIZE) -> int:
    return segno * segment_size


def lsn_segno(lsn: int, segment_size: int = DEFAULT_SEGMENT_SIZE) -> int:
    return lsn // segment_size
