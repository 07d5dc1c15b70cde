"""What a delta `.neon` file holds (docs/snapshot-format.md, "Delta files"), sans I/O.

A delta is a `.neon` file like any other (the same container, frames and checksums, so the
reader verifies it frame by frame); its manifest names its parent (`parent`, `parent_lsn`)
and its tar holds the snapshot's data directory with every relation fork replaced by one
member `neon-delta/<fork path>`: the fork's size at the snapshot and only the pages written
since the parent. Everything else (pg_control, pg_xact, relmap files, configuration...) is
whole: it is small. A fork absent from the tar does not exist at the snapshot.

A fork member's data: a 16-byte header (magic, page size, the fork's size in blocks), then
records of a 4-byte block number and one page, block numbers strictly ascending and below
the size. All integers little-endian. Fixed-size records let a reader apply a fork as its
bytes arrive, with no buffering.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from datadir_files.tar_reader import TarReader
from pageserver_api.errors import CorruptData
from pg15.constants import BLCKSZ, WAL_SEGMENT_SIZE_MAX
from pg15.datadir_layout import WAL_SEGMENT_MEMBER
from pg15.lsn import format_lsn

if TYPE_CHECKING:  # its module costs ~3.5 ms of `pg checkout`'s start, which needs none of it
    from snapfile.manifest import Manifest

DELTA_PREFIX = "neon-delta/"
MAGIC = b"NEONDLT1"
FORK_HEADER = struct.Struct("<8sII")
"""magic, page size, the fork's size in blocks at the snapshot"""
BLOCK_NUMBER = struct.Struct("<I")
MAX_BLOCKS = 0xFFFFFFFF
"""PostgreSQL's MaxBlockNumber + 1: a fork never has more blocks."""


@dataclass(frozen=True, slots=True)
class SnapshotIdentity:
    """Which snapshot a `.neon` file holds, or which one a delta applies to: its name where
    it was made (the manifest's `source`), its LSN and its cluster's system identifier. Two
    files with the same identity hold the same pages."""

    name: str
    lsn: int
    system_identifier: int

    @classmethod
    def of(cls, manifest: Manifest) -> SnapshotIdentity:
        return cls(manifest.source, manifest.lsn, manifest.system_identifier)

    @classmethod
    def parent_of(cls, manifest: Manifest) -> SnapshotIdentity | None:
        """The parent a delta applies to; None for a whole snapshot."""
        if manifest.parent is None or manifest.parent_lsn is None:
            return None
        return cls(manifest.parent, manifest.parent_lsn, manifest.system_identifier)

    def __str__(self) -> str:
        return f"{self.name} at LSN {format_lsn(self.lsn)} (system {self.system_identifier})"


def delta_member_name(fork_path: str) -> str:
    """The tar member of a fork whose first segment file is `fork_path` (`base/5/16384`)."""
    return DELTA_PREFIX + fork_path


def fork_path_of(member_name: str) -> str | None:
    """The fork path a delta member stands for; None for a whole file."""
    if not member_name.startswith(DELTA_PREFIX):
        return None
    return member_name[len(DELTA_PREFIX) :]


FORK_SIZES = "neon-delta-sizes"
"""In a checkout's delta tar only (BasebackupRequest.fork_sizes), the last member of each
database directory's forks, `neon-delta/<directory>/neon-delta-sizes`: the forks there the
delta sends no page of, one `<relation file name> <blocks>` line each, instead of a fork
member each (~710 of a 1% checkout's ~720: a tar header and a member's steps each were most
of the applier's members). Never in a `.neon` file."""
MAX_FORK_SIZES = 64 << 20
"""The largest such member read (a line is ~20 bytes: millions of forks)."""
_FORK_SIZE_LINE = re.compile(rb"([0-9]+(?:_fsm|_vm|_init)?) ([0-9]+)")


def fork_sizes_member(directory: str) -> str:
    return f"{DELTA_PREFIX}{directory}/{FORK_SIZES}"


def pack_fork_sizes(forks: list[tuple[str, int]]) -> bytes:
    """The `FORK_SIZES` member's bytes for (relation file name, blocks) pairs."""
    return "".join(f"{name} {nblocks}\n" for name, nblocks in forks).encode()


def parse_fork_sizes(data: bytes, member: str) -> list[tuple[str, int]]:
    """The (relation file name, blocks) pairs of a `FORK_SIZES` member; CorruptData naming
    `member` for a line that is not a plain relation file name and a block count."""
    if data and not data.endswith(b"\n"):
        raise CorruptData(f"delta member {member!r} ends inside a line")
    forks: list[tuple[str, int]] = []
    for line in data.split(b"\n")[:-1]:
        found = _FORK_SIZE_LINE.fullmatch(line)
        if found is None or int(found.group(2)) > MAX_BLOCKS:
            raise CorruptData(f"delta member {member!r} has a bad line {line[:80]!r}")
        forks.append((found.group(1).decode(), int(found.group(2))))
    return forks


def fork_header(nblocks: int) -> bytes:
    return FORK_HEADER.pack(MAGIC, BLCKSZ, nblocks)


def delta_tar_reader() -> TarReader:
    """A reader of a delta's tar (a delta `.neon` file's, format version 3, or a checkout's):
    its WAL segment may be a GNU sparse member, one, named as a segment, a segment's largest
    size at most; any other sparse member is refused (a few bytes of archive could declare a
    GiB of zeros to write)."""
    return TarReader(sparse_up_to=WAL_SEGMENT_SIZE_MAX, sparse_names=WAL_SEGMENT_MEMBER)


def record_size(page_size: int = BLCKSZ) -> int:
    return BLOCK_NUMBER.size + page_size


def fork_member_size(pages: int) -> int:
    """Bytes of a fork member carrying `pages` pages."""
    return FORK_HEADER.size + pages * record_size()


@dataclass(frozen=True, slots=True)
class ForkDelta:
    """A fork member's header, checked against the member's size."""

    nblocks: int
    pages: int


def parse_fork_header(header: bytes, member_size: int, name: str) -> ForkDelta:
    """The header of delta member `name` of `member_size` bytes; CorruptData unless it is one
    this pg-neon writes (page size, magic, a size that is whole records)."""
    if member_size < FORK_HEADER.size or len(header) != FORK_HEADER.size:
        raise CorruptData(f"delta member {name!r} is shorter than its header")
    magic, page_size, nblocks = FORK_HEADER.unpack(header)
    if magic != MAGIC:
        raise CorruptData(f"delta member {name!r} does not start with {MAGIC.decode()}")
    if page_size != BLCKSZ:
        raise CorruptData(
            f"delta member {name!r} has pages of {page_size} bytes; this PostgreSQL's are {BLCKSZ}"
        )
    pages, rest = divmod(member_size - FORK_HEADER.size, record_size())
    if rest:
        raise CorruptData(f"delta member {name!r}: {member_size} bytes are not whole page records")
    if pages > nblocks:
        raise CorruptData(f"delta member {name!r} has {pages} pages for a fork of {nblocks}")
    return ForkDelta(nblocks, pages)


# -- the extracted form of a delta's fork members --------------------------------------------

PACK_NAME = "neon-delta.pack"
"""Where an extracted delta keeps its fork members (beside the data directory's own files, at
its top): one file, where a file per member meant creating, reading and removing a few
hundred (one per relation fork, most of them a bare header) for a change of a few pages."""
PACK_RECORD = struct.Struct("<HQ")
"""Before each member's data in the pack: the length of its fork path (UTF-8), then of its
data; the path follows, then the data (the member's bytes as the tar had them)."""


def pack_record_header(fork_path: str, size: int) -> bytes:
    name = fork_path.encode()
    return PACK_RECORD.pack(len(name), size) + name


@dataclass(frozen=True, slots=True)
class PackedFork:
    """A fork member in a pack: its fork path, and where its data lies in the pack."""

    fork_path: str
    offset: int
    size: int


def read_pack_index(read_at: Callable[[int, int], bytes], pack_size: int) -> list[PackedFork]:
    """The members of a pack of `pack_size` bytes, read through `read_at(offset, n)`, in the
    order written; CorruptData for a pack cut short or a path named twice."""
    found: list[PackedFork] = []
    seen: set[str] = set()
    at = 0
    while at < pack_size:
        head = read_at(at, PACK_RECORD.size)
        if len(head) != PACK_RECORD.size:
            raise CorruptData(f"{PACK_NAME} is cut short at byte {at}")
        name_len, size = PACK_RECORD.unpack(head)
        at += PACK_RECORD.size
        raw = read_at(at, name_len)
        at += name_len
        if len(raw) != name_len or at + size > pack_size:
            raise CorruptData(f"{PACK_NAME} is cut short at byte {at}")
        try:
            name = raw.decode()
        except UnicodeDecodeError:
            raise CorruptData(f"{PACK_NAME} names a member {raw!r} that is not UTF-8") from None
        if name in seen:
            raise CorruptData(f"{PACK_NAME} holds delta member {name!r} twice")
        seen.add(name)
        found.append(PackedFork(name, at, size))
        at += size
    return found
