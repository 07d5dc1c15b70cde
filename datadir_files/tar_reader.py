"""A tar archive read as a stream, sans I/O: fed bytes, it returns member events.

Why not `tarfile`: in stream mode it copies every byte several times (its read buffer is
re-sliced per read, then `extractfile` and `copyfileobj` copy again), and a basebackup is
gigabytes. Here a member's data is handed on as views of the bytes fed, and the extractor
writes them straight to the file.

What it reads: the POSIX ustar header (name, mode, size, typeflag, linkname, prefix; POSIX.1-
2001 tar, as PostgreSQL writes it: src/port/tar.c tarCreateHeader), pax extended headers
(`x`: path, linkpath, size records; `g` global headers are skipped) as Python's tarfile writes
them, GNU long names (`L`, `K`) and GNU sparse files of format 1.0 (PAX `GNU.sparse.*` records,
the map at the data's start: what a checkout's delta carries its WAL segment as,
pageserver/basebackup/tar_stream.py tar_sparse_file), whose holes are handed on as data of
zeros, so that a reader sees the file's bytes whatever the format; other sparse formats are
refused. A sparse member is read only by a reader made to (`sparse_up_to`, its largest size):
a few KiB of archive can declare any size, all of it zeros to write. Each header block's
checksum is verified (the unsigned sum of the block with the checksum field taken as
spaces), sizes are octal or GNU base-256; decimal sizes (pax, a sparse map) have 20 digits at
most. An archive ends with a zero block (a second one is optional, as tar itself allows);
data after it is ignored. Anything else raises TarFormatError naming the member and the offset.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

BLOCK = 512
_MAX_META = 1 << 20  # pax and GNU long-name records: a path, never megabytes
_SPARSE = "GNU.sparse."
_SPARSE_MAP_MAX = 64 << 10  # a sparse file's map: (offset, size) pairs in decimal text
_MAX_DIGITS = 20  # of a decimal size or offset: 2^64 has 20 (int() refuses over 4,300 digits)
_ZEROS = memoryview(bytes(1 << 20))
"""What a sparse member's holes are handed on as, a MiB at a time."""

REGULAR, HARD_LINK, SYMLINK, CHAR_DEVICE, BLOCK_DEVICE, DIRECTORY, FIFO = (
    b"0", b"1", b"2", b"3", b"4", b"5", b"6"
)  # fmt: skip
_KINDS = {
    REGULAR: "file",
    b"\0": "file",
    b"7": "file",  # contiguous file: a regular file everywhere but a few old systems
    HARD_LINK: "hard link",
    SYMLINK: "symbolic link",
    CHAR_DEVICE: "device",
    BLOCK_DEVICE: "device",
    DIRECTORY: "directory",
    FIFO: "FIFO",
}
_PAX, _PAX_GLOBAL, _GNU_LONGNAME, _GNU_LONGLINK = b"x", b"g", b"L", b"K"


class TarFormatError(ValueError):
    """The bytes are not a well-formed tar archive."""


@dataclass(frozen=True, slots=True)
class MemberStart:
    name: str
    kind: str
    """file, directory, symbolic link, hard link, device, FIFO."""
    size: int
    mode: int
    linkname: str


@dataclass(frozen=True, slots=True)
class MemberData:
    data: memoryview
    """The next bytes of the current member's data: valid until the next `feed`."""


@dataclass(frozen=True, slots=True)
class MemberEnd:
    pass


@dataclass(frozen=True, slots=True)
class ArchiveEnd:
    pass


TarEvent = MemberStart | MemberData | MemberEnd | ArchiveEnd


_SPARSE_MAP = b"S"  # not a typeflag: reading a sparse member's map


class _Sparse:
    """A GNU sparse member (format 1.0) being read: its map, then where its data goes."""

    def __init__(self, member: MemberStart) -> None:
        self.member = member
        self.text = bytearray()
        self.regions: deque[tuple[int, int]] = deque()
        """(offset, size) of the regions whose bytes are still to come."""
        self.stored = 0
        self.pad = 0
        """The zeros after the member's data (set aside while its map is read)."""
        self.at = 0
        """The file offset of the next byte handed on."""

    def parse(self, where: str) -> bool:
        """Whether the map read so far is whole (then checked and taken)."""
        lines = bytes(self.text).split(b"\n")
        if not lines[0]:
            raise TarFormatError(f"the {where} is empty")
        if len(lines) < 2 or not lines[0].isdigit():
            return self._partial(lines[0], where)
        count = _decimal(lines[0], f"the {where}")
        if len(lines) < 2 + 2 * count:
            return self._partial(b"".join(lines[1:]), where)
        numbers = lines[1 : 1 + 2 * count]
        if not all(n.isdigit() for n in numbers):
            raise TarFormatError(f"the {where} is not decimal numbers")
        end = 0
        for i in range(count):
            offset = _decimal(numbers[2 * i], f"the {where}")
            size = _decimal(numbers[2 * i + 1], f"the {where}")
            if offset < end or offset + size > self.member.size:
                raise TarFormatError(f"the {where} has regions out of order or past its end")
            end = offset + size
            self.stored += size
            if size:  # GNU tar ends a file ending in a hole with an empty region
                self.regions.append((offset, size))
        return True

    @staticmethod
    def _partial(text: bytes, where: str) -> bool:
        if text.strip(b"0123456789\n"):
            raise TarFormatError(f"the {where} is not decimal numbers")
        return False

    def data(self, piece: memoryview) -> Iterator[MemberData]:
        """The regions' next stored bytes, the holes before them as zeros."""
        while piece:
            offset, size = self.regions[0]
            yield from self._zeros_to(offset)
            take = min(len(piece), offset + size - self.at)
            yield MemberData(piece[:take])
            self.at += take
            piece = piece[take:]
            if self.at == offset + size:
                self.regions.popleft()

    def end(self) -> Iterator[MemberData]:
        yield from self._zeros_to(self.member.size)

    def _zeros_to(self, offset: int) -> Iterator[MemberData]:
        while self.at < offset:
            take = min(offset - self.at, len(_ZEROS))
            yield MemberData(_ZEROS[:take])
            self.at += take


def _decimal(text: bytes | str, where: str) -> int:
    """A size or offset in ASCII decimal digits (pax records, a sparse map), at most
    _MAX_DIGITS of them."""
    raw = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text
    if not raw.isdigit() or len(raw) > _MAX_DIGITS:  # bytes.isdigit: ASCII digits only
        raise TarFormatError(
            f"{where}: {bytes(raw[:30])!r} is not a decimal number of {_MAX_DIGITS} digits at most"
        )
    return int(raw)


def _number(field: bytes, what: str) -> int:
    """An octal number (NUL- or space-terminated), or GNU base-256 (high bit of byte 0 set)."""
    if field[:1] and field[0] & 0x80:
        if field[0] & 0x40:
            raise TarFormatError(f"negative {what} in a tar header")
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise TarFormatError(f"{what} field {bytes(field)!r} is not an octal number") from None


def _checksum_ok(block: bytes) -> bool:
    stored = _number(block[148:156], "checksum")
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    if stored == unsigned:
        return True  # the usual case: the signed sum, byte by byte in Python, is not needed
    signed = unsigned - 2 * sum(b for b in block[:148] + block[156:] if b & 0x80)
    return stored == signed  # old tars summed signed chars


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax_records(data: bytes, offset: int) -> dict[str, str]:
    """`LEN KEY=VALUE\\n` records (POSIX.1-2001 pax format)."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise TarFormatError(f"bad pax header record at offset {offset + pos}") from None
        record = data[space + 1 : pos + length]
        if length <= 0 or not record.endswith(b"\n") or b"=" not in record:
            raise TarFormatError(f"bad pax header record at offset {offset + pos}")
        key, value = record[:-1].split(b"=", 1)
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


class TarReader:
    """Feed archive bytes with `feed()`, then call `finish()`; each returns events in order:
    per member MemberStart, MemberData (files only), MemberEnd; finish() gives ArchiveEnd."""

    def __init__(
        self, *, sparse_up_to: int = 0, sparse_names: re.Pattern[str] | None = None
    ) -> None:
        """`sparse_up_to`: the largest GNU sparse member read (0: each is refused).
        `sparse_names`: the name a sparse member must have (all of it), and only one is
        read (a delta's WAL segment); None: any, and any number."""
        self._sparse_up_to = sparse_up_to
        self._sparse_names = sparse_names
        self._sparse_seen = False
        self._buf = bytearray()
        self.offset = 0
        """Archive bytes consumed."""
        self._name = ""  # of the current member, for messages
        self._data_left = 0  # of the current member's data
        self._pad_left = 0  # zero padding after it
        self._meta_kind: bytes | None = None  # reading a pax/GNU record of _meta_size bytes
        self._meta_size = 0
        self._pending: dict[str, str] = {}  # path/linkpath/size for the next member
        self._ended = False
        self._sparse: _Sparse | None = None  # of the current member, if it is sparse

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[TarEvent]:
        view = memoryview(data).cast("B")
        while view and not self._ended:
            if self._data_left and self._meta_kind is None:  # handed on without a copy
                take = min(len(view), self._data_left)
                self._data_left -= take
                self.offset += take
                if self._sparse is None:
                    yield MemberData(view[:take])
                else:
                    yield from self._sparse.data(view[:take])
                view = view[take:]
                if not self._data_left:
                    yield from self._member_end()
                continue
            if self._pad_left:
                take = min(len(view), self._pad_left)
                self._pad_left -= take
                self.offset += take
                view = view[take:]
                continue
            need = BLOCK if self._meta_kind is None else self._meta_size + -self._meta_size % BLOCK
            take = min(len(view), need - len(self._buf))
            self._buf += view[:take]
            view = view[take:]
            if len(self._buf) < need:
                break
            region = bytes(self._buf)
            self._buf.clear()
            if self._meta_kind is not None:
                start = self._meta_done(region)
                self.offset += need
            else:
                start = self._header(region)
                self.offset += need
            if start is not None:
                yield start
                if not self._data_left:
                    yield from self._member_end()

    def finish(self) -> Iterator[TarEvent]:
        """The end: ArchiveEnd, or TarFormatError if the archive was cut off."""
        if not self._ended:
            where = f" inside member {self._name!r}" if self._data_left or self._pad_left else ""
            raise TarFormatError(f"the archive is cut off at offset {self.offset}{where}")
        yield ArchiveEnd()

    def _header(self, block: bytes) -> MemberStart | None:
        """The member a header block starts (None: an extended header, or the end)."""
        if block == bytes(BLOCK):
            if self._pending:
                raise TarFormatError(f"an extended header at offset {self.offset} has no member")
            self._ended = True  # one zero block ends it; a second one and padding are not read
            return None
        if not _checksum_ok(block):
            raise TarFormatError(f"the tar header at offset {self.offset} has a bad checksum")
        typeflag = block[156:157]
        size = _number(block[124:136], "size")
        if typeflag in (_PAX, _PAX_GLOBAL, _GNU_LONGNAME, _GNU_LONGLINK):
            if size > _MAX_META:
                raise TarFormatError(f"the extended header at offset {self.offset} is too large")
            self._meta_kind, self._meta_size = typeflag, size
            return None
        name = _text(block[:100])
        if block[257:263] == b"ustar\0" and block[345] != 0:  # POSIX: prefix/name
            name = f"{_text(block[345:500])}/{name}"
        pending, self._pending = self._pending, {}
        name = pending.get("path", name)
        self._name = name
        kind = _KINDS.get(typeflag)
        if kind == "directory":
            name = name.rstrip("/") or name  # tar writers end directory names with '/'
            self._name = name
        if kind is None:
            raise TarFormatError(
                f"tar member {name!r} at offset {self.offset} has unknown type {typeflag!r}"
            )
        if "size" in pending:
            size = _decimal(pending["size"], f"tar member {name!r} has a bad pax size")
        if kind != "file" and size:
            raise TarFormatError(f"tar member {name!r} is a {kind} with {size} bytes of data")
        self._data_left = size
        self._pad_left = -size % BLOCK
        linkname = pending.get("linkpath", _text(block[157:257]))
        start = MemberStart(name, kind, size, _number(block[100:108], "mode"), linkname)
        if any(key.startswith(_SPARSE) for key in pending):
            self._sparse_start(start, pending)
            return None  # once its map is read
        return start

    def _sparse_start(self, start: MemberStart, pending: dict[str, str]) -> None:
        """A GNU sparse member (format 1.0 only): its map is read next (`_meta_done`)."""
        if (pending.get(_SPARSE + "major"), pending.get(_SPARSE + "minor")) != ("1", "0"):
            raise TarFormatError(f"tar member {start.name!r} is sparse in a format not read")
        name = pending.get(_SPARSE + "name", start.name)
        if not self._sparse_up_to:
            raise TarFormatError(f"tar member {name!r} is a GNU sparse file, not read here")
        realsize = pending.get(_SPARSE + "realsize", "")
        if start.kind != "file" or not realsize:
            raise TarFormatError(f"tar member {name!r} has a bad sparse header")
        size = _decimal(realsize, f"tar member {name!r} has a bad sparse header")
        if size > self._sparse_up_to:
            raise TarFormatError(
                f"tar member {name!r} is a GNU sparse file larger than {self._sparse_up_to}"
                f" bytes: {size}"
            )
        if self._sparse_names is not None:
            if not self._sparse_names.fullmatch(name):
                raise TarFormatError(f"tar member {name!r} is a GNU sparse file, not read so")
            if self._sparse_seen:
                raise TarFormatError(f"tar member {name!r} is a second GNU sparse file")
            self._sparse_seen = True
        self._name = name
        self._sparse = _Sparse(MemberStart(name, start.kind, size, start.mode, start.linkname))
        self._sparse.pad, self._pad_left = self._pad_left, 0
        self._meta_kind, self._meta_size = _SPARSE_MAP, BLOCK

    def _member_end(self) -> Iterator[TarEvent]:
        if self._sparse is not None:
            yield from self._sparse.end()
            self._sparse = None
        yield MemberEnd()

    def _meta_done(self, region: bytes) -> MemberStart | None:
        """An extended header's records read; for a sparse member's map, the member (once
        the map is whole)."""
        data, kind = region[: self._meta_size], self._meta_kind
        self._meta_kind, self._meta_size = None, 0
        if kind == _SPARSE_MAP:
            return self._sparse_map_block(region)
        if kind == _PAX:
            records = _pax_records(data, self.offset)
            self._pending.update(
                {
                    k: v
                    for k, v in records.items()
                    if k in ("path", "linkpath", "size") or k.startswith(_SPARSE)
                }
            )
        elif kind == _GNU_LONGNAME:
            self._pending["path"] = _text(data)
        elif kind == _GNU_LONGLINK:
            self._pending["linkpath"] = _text(data)
        return None

    def _sparse_map_block(self, block: bytes) -> MemberStart | None:
        """The next block of a sparse member's map (its data's first blocks): the member
        once the map is whole, its data then the regions' bytes."""
        sparse = self._sparse
        assert sparse is not None
        where = f"sparse map of tar member {self._name!r}"
        if self._data_left < BLOCK or len(sparse.text) >= _SPARSE_MAP_MAX:
            raise TarFormatError(f"the {where} is cut off or too large")
        self._data_left -= BLOCK
        sparse.text += block
        if not sparse.parse(where):
            self._meta_kind, self._meta_size = _SPARSE_MAP, BLOCK  # its next block
            return None
        if sparse.stored != self._data_left:
            raise TarFormatError(f"the {where} does not match the member's size")
        self._pad_left = sparse.pad
        return sparse.member
