"""The `tablespace_map` file of a base backup: one ``OID PATH`` line per symlinked tablespace.

do_pg_backup_start (src/backend/access/transam/xlog.c) writes it, escaping ``\\n``, ``\\r``
and ``\\\\`` in the path with a backslash; read_tablespace_map
(src/backend/access/transam/xlogrecovery.c) reads it back: lines end at an unescaped CR or LF,
the OID runs to the first space and the path is the rest (it may begin with spaces). At the
start of recovery PostgreSQL turns each line into the symlink pg_tblspc/OID -> PATH; in-place
tablespaces are not listed (their directory is inside the backup).
"""

from __future__ import annotations

from collections.abc import Mapping

from proto.errors import CorruptData

TABLESPACE_MAP = "tablespace_map"


def parse_tablespace_map(data: bytes, where: str = TABLESPACE_MAP) -> dict[int, str]:
    """OID -> location of every line; CorruptData naming `where` for what PostgreSQL refuses."""
    out: dict[int, str] = {}
    line = bytearray()
    escaped = False
    for byte in data:
        if not escaped and byte in b"\r\n":
            if line:
                oid, location = _parse_line(bytes(line), where)
                out[oid] = location
                line.clear()
        elif not escaped and byte == 0x5C:  # backslash
            escaped = True
        else:
            line.append(byte)
            escaped = False
    if line or escaped:
        raise CorruptData(f"{where}: the last line is not terminated")
    return out


def _parse_line(line: bytes, where: str) -> tuple[int, str]:
    oid_text, sep, path = line.partition(b" ")
    if not sep or not oid_text or not path:
        raise CorruptData(f"{where}: invalid line {line.decode('utf-8', 'replace')!r}")
    if not oid_text.isdigit() or not 0 < int(oid_text) <= 0xFFFFFFFF:
        shown = oid_text.decode("utf-8", "replace")
        raise CorruptData(f"{where}: invalid tablespace OID {shown!r}")
    try:
        return int(oid_text), path.decode("utf-8")
    except UnicodeDecodeError:
        raise CorruptData(f"{where}: the path of tablespace {int(oid_text)} is not UTF-8") from None


def format_tablespace_map(locations: Mapping[int, str]) -> bytes:
    """The file for `locations` (absolute paths), as do_pg_backup_start writes it."""
    out = bytearray()
    for oid in sorted(locations):
        path = locations[oid].encode("utf-8")
        escaped = bytearray()
        for byte in path:
            if byte in b"\r\n\\":
                escaped.append(0x5C)
            escaped.append(byte)
        out += f"{oid} ".encode() + escaped + b"\n"
    return bytes(out)
