"""Unpack a basebackup tar into a data directory owned by the PostgreSQL OS user.

The receiving side of extraction (the CLI, or the pageserver daemon writing a local
basebackup itself: pageserver/api/local_files.py): what the pageserver's tar maker sends is
untrusted bytes here, so every member is checked before anything is written. The archive is
parsed by the sans-I/O `datadir_files.tar_reader` and a member's data is written from the
bytes received, with no copy (tarfile in stream mode copied every byte three times). A gzip
archive (pg_basebackup -Ft -z) is recognised by its magic number, as tarfile's `r|*` did.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import mmap
import os
import queue
import shutil
import tempfile
import threading
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Generic, Protocol, TypeVar, cast

from datadir_files.pg_account import make_pg_dir, pg_os_user
from datadir_files.tar_reader import MemberData, MemberEnd, MemberStart, TarFormatError, TarReader
from pageserver_api.errors import FULL_ERRNOS
from pg15.constants import BLCKSZ, RELSEG_SIZE
from proto.errors import AlreadyExists, CorruptData, NoSpace

_READ_SIZE = 1 << 20
_PACK_BUFFER = 1 << 20
"""Bytes of a delta's pack gathered before a write (`_Extractor._to_pack`)."""
_ZEROS = bytes(4 << 20)


class UnsafeArchive(CorruptData):
    """A tar member that could write outside the target or create a non-regular file."""


def member_path(member: MemberStart) -> PurePosixPath | None:
    """The member's relative path, or None for the root itself; UnsafeArchive if hostile."""
    parts = member_parts(member)
    return PurePosixPath(*parts) if parts else None


def member_parts(member: MemberStart) -> list[str]:
    """`member_path`'s components (none: the root itself), split as PurePosixPath splits a
    relative name (empty and "." components dropped) without making one: a delta's ~730
    fork members went through four path objects each, half of `recv`'s extraction CPU
    (cProfile of a 1% delta)."""
    name = member.name
    if "\0" in name or "\\" in name or name.startswith("/"):  # is_absolute(), posix
        raise UnsafeArchive(f"refusing tar member {name!r}: absolute or unusual path")
    parts = [p for p in name.split("/") if p and p != "."]
    if ".." in parts:
        raise UnsafeArchive(f"refusing tar member {name!r}: it leads outside the target")
    if member.kind not in ("file", "directory"):
        raise UnsafeArchive(f"refusing tar member {name!r}: it is a {member.kind}")
    return parts


def tablespace_link_oid(member: MemberStart) -> int | None:
    """The OID of a symbolic link member `pg_tblspc/OID` (how BASE_BACKUP without
    TABLESPACE_MAP sends a tablespace's location, basebackup.c sendDir), else None."""
    if member.kind != "symbolic link":
        return None
    parts = [p for p in PurePosixPath(member.name).parts if p != "."]
    if len(parts) == 2 and parts[0] == "pg_tblspc":
        return int(parts[1]) if parts[1].isdigit() else None
    return None


class Diverted(Protocol):
    """Where a diverted member's data goes instead of its file (see `Divert`)."""

    def write(self, data: bytes | bytearray | memoryview) -> None: ...

    def end(self, st: os.stat_result) -> None:
        """The member ended; `st`: its file's stat, as the extractor left it."""


Divert = Callable[[str, int], Diverted | None]
"""Called with each regular file member's checked relative path and size, before its data:
a Diverted takes that data, and the file is created (same checks, mode and owner) holding
no data, sparse at the member's size (pageserver/ingest/import_neon.py); None: written."""


class DeltaMember(Protocol):
    """Where a delta's fork member's data goes (see `DeltaMembers`)."""

    def write(self, data: bytes | bytearray | memoryview) -> None: ...

    def end(self) -> None:
        """The member ended (its data was all written)."""


DeltaMembers = Callable[[str, int], DeltaMember]
"""Called with each delta fork member's path below `neon-delta/` and its size, before its
data: the returned DeltaMember takes the data, and nothing is made on disk for the member
(pageserver/ingest/import_delta.py, the pageserver reading a delta file itself)."""


Owner = tuple[int, int] | None
"""Whom extracted files and directories are given to (uid, gid); None: left as made."""

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def pg_owner() -> Owner:
    """PostgreSQL's OS account (`pg_os_user`), to whom the CLI gives what it extracts."""
    user = pg_os_user()
    return None if user is None else (user.uid, user.gid)


class _Extractor:
    """Writes the members of a tar fed in chunks into `root` (checked, given to `owner`);
    `tablespace_links` as in extract_basebackup; `divert` as `Divert` says; with
    `pack_deltas`, a delta's fork members (`neon-delta/...`) go into one file, PACK_NAME
    (snapfile/delta.py), not a file each.

    `delta_members` instead hands each fork member to a DeltaMember (`DeltaMembers`).

    `root` is a path (opened here) or the caller's directory descriptor (not closed here).
    Everything is made relative to descriptors of the directories below it, each opened
    with O_NOFOLLOW from its parent's: a link put in place of a directory meanwhile (the
    tree belongs to PostgreSQL's account, which may write in it) fails the member and is
    never written through."""

    def __init__(
        self, root: Path | int, tablespace_links: dict[int, str] | None, owner: Owner,
        divert: Divert | None = None, pack_deltas: bool = False,
        delta_members: DeltaMembers | None = None,
    ) -> None:  # fmt: skip
        self._root_fd = os.open(root, _DIR_FLAGS) if isinstance(root, Path) else root
        self._own_root = isinstance(root, Path)
        self._owner = owner
        self._links = tablespace_links
        self._divert = divert
        self._diverted: Diverted | None = None
        self._pack_deltas = pack_deltas or delta_members is not None
        self._delta_members = delta_members
        self._delta_member: DeltaMember | None = None  # the current member's, if one
        self._pack: int | None = None  # PACK_NAME's descriptor, once a member went in
        self._pack_buffer = bytearray()  # the pack's bytes not yet written (`_to_pack`)
        self._packing = False  # the current member's data goes to the pack
        self._reader = TarReader()
        if self._pack_deltas:  # its WAL segment may be sparse; imported on use, as in `_packed`
            from snapfile.delta import delta_tar_reader

            self._reader = delta_tar_reader()
        self._fd: int | None = None
        self._direct: _DirectWrites | None = None  # the current file's, if written so
        self._direct_writes = direct_writes_enabled()
        self._member: MemberStart | None = None
        self._dest: PurePosixPath | None = None
        self._dirs: dict[PurePosixPath, int] = {}  # made or found below the root: open
        self._offset = 0  # of the current file's next byte
        self._written_to = 0  # the file's offset (its bytes before it are written)
        self._allocated = 0  # bytes of the current file allocated up front (`preallocate`)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._handle(self._reader.feed(data))

    def finish(self) -> None:
        self._handle(self._reader.finish())
        self.close()

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        """A file's next bytes. In a file allocated up front, a piece of zeros is not
        written: the allocation reads as zeros already (a WAL segment is 16 MiB, all zeros
        but its first records: its page-cache copy was a sixth of `recv`'s extraction of a
        1% delta)."""
        assert self._fd is not None
        at = self._offset
        self._offset += len(data)
        if self._offset <= self._allocated and _ZEROS.startswith(data):  # a memcmp
            return
        if at != self._written_to:  # zeros skipped before: the file's offset is behind
            os.lseek(self._fd, at, os.SEEK_SET)
        _write_all(self._fd, data)
        self._written_to = self._offset

    def close(self) -> None:
        if self._direct is not None:
            self._direct.close()
            self._direct = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._pack is not None:
            os.close(self._pack)
            self._pack = None
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()
        if self._own_root and self._root_fd >= 0:
            os.close(self._root_fd)
        self._root_fd = -1

    def _give(self, fd: int) -> None:
        """Hand what `fd` is open on to the owner (fchown: never through a path)."""
        if self._owner is not None:
            os.fchown(fd, *self._owner)

    def _handle(self, events: Iterator[object]) -> None:
        try:
            for event in events:
                if isinstance(event, MemberData):
                    if self._packing:
                        self._to_pack(event.data)
                    elif self._delta_member is not None:
                        self._delta_member.write(event.data)
                    elif self._diverted is not None:
                        self._diverted.write(event.data)
                    elif self._direct is not None:
                        self._direct.write(event.data)
                    elif self._fd is not None:
                        self._write(event.data)
                elif isinstance(event, MemberStart):
                    self._start(event)
                elif isinstance(event, MemberEnd):
                    self._end()
                else:  # ArchiveEnd (finish): the pack's last bytes
                    self._flush_pack()
        except TarFormatError as exc:
            raise CorruptData(f"the basebackup archive is damaged: {exc}") from None
        except OSError as exc:
            name = self._member.name if self._member is not None else "?"
            # A full disk is not a damaged archive: typed so (a receiver tells its pusher).
            failed = NoSpace if exc.errno in FULL_ERRNOS else CorruptData
            raise failed(f"cannot extract tar member {name!r}: {exc.strerror}") from None

    def _start(self, member: MemberStart) -> None:
        self._member = member
        oid = tablespace_link_oid(member)
        if self._links is not None and oid is not None:
            self._links[oid] = member.linkname
            return
        parts = member_parts(member)
        if not parts:
            return
        if self._pack_deltas and self._packed(parts, member):
            return
        rel = PurePosixPath(*parts)
        if member.kind == "directory":
            self._dir(rel)
            return
        parent = self._dir(rel.parent)
        # O_EXCL: the directory was new or checked empty, so every file is new; whatever is
        # at the name was put there meanwhile (PostgreSQL's account may write here), and a
        # FIFO opened without it would block this writer for good.
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            self._fd = os.open(rel.name, flags, 0o600, dir_fd=parent)
        except FileExistsError:
            raise UnsafeArchive(
                f"refusing tar member {member.name!r}: something is at its path already "
                "(a repeated member, or put there during the extraction)"
            ) from None
        self._dest = rel
        if self._divert is not None:
            self._diverted = self._divert(str(rel), member.size)
        elif (
            self._direct_writes
            and member.size >= DIRECT_MIN_BYTES
            and member.size % _DIRECT_ALIGN == 0
        ):
            self._direct = _DirectWrites.start(self._fd)
        self._offset = self._written_to = self._allocated = 0
        if self._diverted is None and self._direct is None and member.size >= PREALLOCATE_MIN_BYTES:
            # written through the page cache; never more than a legitimate file's size
            size = min(member.size, PREALLOCATE_MAX_BYTES)
            if preallocate(self._fd, size):
                self._allocated = size

    def _packed(self, parts: list[str], member: MemberStart) -> bool:
        """A delta's fork member goes into the pack, or to a DeltaMember (its directories
        are not made); True when `member` was taken so."""
        # Imported here: `pg start` and `pg stop` extract nothing of a delta's (snapfile is
        # the delta machinery, tests/cli/test_lazy_imports.py).
        from snapfile.delta import DELTA_PREFIX, PACK_NAME, pack_record_header

        if parts == [PACK_NAME]:
            raise UnsafeArchive(f"refusing tar member {member.name!r}: {PACK_NAME} is the pack's")
        if parts[0] != DELTA_PREFIX.rstrip("/"):
            return False
        if member.kind != "file":
            return True
        fork_path = "/".join(parts[1:]) or "."  # str(PurePosixPath()) is "."
        if self._delta_members is not None:
            self._delta_member = self._delta_members(fork_path, member.size)
            return True
        if self._pack is None:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            self._pack = os.open(PACK_NAME, flags, 0o600, dir_fd=self._root_fd)
            self._give(self._pack)
        self._to_pack(pack_record_header(fork_path, member.size))
        self._packing = True
        return True

    def _to_pack(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes for the pack, gathered up to _PACK_BUFFER before a write: most of a delta's
        members are a fork header of a few bytes, two writes each, ~1500 syscalls for a 1%
        delta. The pack is read only once the whole archive is (import_delta), and an
        extraction that fails is thrown away, so nothing waits for these bytes before
        `finish`."""
        buffer = self._pack_buffer
        if not buffer and len(data) >= _PACK_BUFFER:
            assert self._pack is not None
            _write_all(self._pack, data)
            return
        buffer += data
        if len(buffer) >= _PACK_BUFFER:
            self._flush_pack()

    def _flush_pack(self) -> None:
        if self._pack_buffer:
            assert self._pack is not None
            _write_all(self._pack, self._pack_buffer)
            self._pack_buffer.clear()

    def _end(self) -> None:
        self._packing = False
        member, self._delta_member = self._delta_member, None
        if member is not None:
            member.end()
        if self._fd is None or self._dest is None:
            return
        if self._direct is not None:
            self._direct.finish()
            self._direct = None
        fd, self._fd = self._fd, None
        diverted, self._diverted = self._diverted, None
        try:  # through the descriptor: a link swapped in at the name is never followed
            if diverted is not None and self._member is not None:
                os.ftruncate(fd, self._member.size)
            os.fchmod(fd, 0o600)
            self._give(fd)
            if diverted is not None:
                diverted.end(os.fstat(fd))
        finally:
            os.close(fd)
        self._dest = None

    def _dir(self, rel: PurePosixPath) -> int:
        """A descriptor of directory `rel` below the root, made (0700, the owner's) where
        missing; each component opened from its parent's without following a link, once
        per archive."""
        if not rel.parts:
            return self._root_fd
        fd = self._dirs.get(rel)
        if fd is not None:
            return fd
        parent = self._dir(rel.parent)
        made = True
        try:
            os.mkdir(rel.name, 0o700, dir_fd=parent)
        except FileExistsError:
            made = False
        fd = os.open(rel.name, _DIR_FLAGS, dir_fd=parent)  # a link there: ELOOP, ENOTDIR
        self._dirs[rel] = fd
        if made:  # mode and owner through the descriptor: never through a link put there
            os.fchmod(fd, 0o700)
            self._give(fd)
        return fd


@contextlib.contextmanager
def staged_dir(target_dir: Path) -> Iterator[Path]:
    """A new directory for PostgreSQL's user, a sibling `<name>.tmp-XXXX` of `target_dir`
    (absent or empty), renamed to it when the block succeeds; removed, with whatever was
    written, when it fails (cli/extract.py's `remove_download_leftovers` removes one a
    killed process left)."""
    target = Path(target_dir)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise AlreadyExists(f"{target} exists and is not an empty directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{target.name}.tmp-", dir=target.parent))
    try:
        make_pg_dir(tmp)
        yield tmp
        if target.exists():
            target.rmdir()
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _extracting(
    target_dir: Path, tablespace_links: dict[int, str] | None, divert: Divert | None = None,
    pack_deltas: bool = False, delta_members: DeltaMembers | None = None,
) -> Iterator[_Extractor]:  # fmt: skip
    """An extractor into a `staged_dir` of `target_dir`, finished when the block succeeds."""
    with staged_dir(target_dir) as tmp:
        extractor = _Extractor(
            tmp, tablespace_links, pg_owner(), divert, pack_deltas, delta_members
        )
        try:
            yield extractor
            extractor.finish()
        finally:
            extractor.close()


def extract_into_dir_fd(
    batches: Iterable[list[bytes]], dir_fd: int, done: Callable[[bytes], None] | None = None
) -> None:
    """Unpack a tar arriving as lists of chunks into the empty directory open as `dir_fd`,
    as extract_basebackup does (the same checks, modes and owner; no link member): how the
    local pageserver writes a basebackup into the directory the CLI handed it
    (pageserver/api/local_files.py). The caller made the directory and removes it on
    failure. What is made is given to the directory's owner (root's process only: the CLI
    gave it to PostgreSQL's account), not to an account looked up here: the daemon's
    environment is the one of whichever CLI started it. `done` is told of each chunk once
    it is written (the tar maker's `AlignedChunks` then reuses its buffer)."""
    if os.listdir(dir_fd):
        raise AlreadyExists("the directory handed for a basebackup is not empty")
    st = os.fstat(dir_fd)
    extractor = _Extractor(dir_fd, None, (st.st_uid, st.st_gid) if os.geteuid() == 0 else None)
    try:
        for batch in batches:
            for chunk in batch:
                extractor.feed(chunk)  # written when it returns: nothing holds the chunk
                if done is not None:
                    done(chunk)
        extractor.finish()
    finally:
        extractor.close()


def extract_basebackup(
    stream: BinaryIO, target_dir: Path, tablespace_links: dict[int, str] | None = None
) -> None:
    """Unpack a basebackup tar (plain or gzip) into `target_dir` (absent or empty), for the
    PostgreSQL user.

    Refuses absolute paths, `..`, links, devices and other special members, naming the member.
    Extracts into a sibling `<name>.tmp-XXXX` and renames it at the end, so a failure leaves
    nothing behind. Directories get mode 0700 and files 0600. With `tablespace_links`, a link
    member `pg_tblspc/OID` is not created but recorded there (OID -> its target): the caller
    places that tablespace itself (cli/backup_tablespaces.py); any other link is refused.
    The process keeps freed heap memory for the MiB read next (`tune_malloc_for_streams`,
    as `consume_in_thread` does: a 1 GiB basebackup from a pipe took 26-74k page faults
    without, 6k with).
    """
    from pageserver.malloc_tuning import tune_malloc_for_streams  # ctypes: not at CLI start

    tune_malloc_for_streams()
    extract_chunks(_tar_bytes(stream), target_dir, tablespace_links)


def extract_chunks(
    chunks: Iterable[bytes | memoryview],
    target_dir: Path,
    tablespace_links: dict[int, str] | None = None,
    divert: Divert | None = None,
    used: Callable[[bytes | memoryview], None] | None = None,
    delta_members: DeltaMembers | None = None,
) -> None:
    """Extract a tar arriving as `chunks` (from this thread, which may block between them:
    no event loop) as extract_basebackup does; `divert`: see `Divert`, `delta_members`: see
    `DeltaMembers` (both run on the writer's thread); `used` is told of each chunk once
    nothing reads it any more (its buffer may be used again)."""
    batches = _Batches[bytes | memoryview]()
    errors: list[BaseException] = []

    def extract(chunks: Iterator[bytes | memoryview]) -> None:
        _extract_all(
            chunks, target_dir, tablespace_links, divert, used=used, delta_members=delta_members
        )

    def run() -> None:
        try:
            batches.consume(extract)
        except BaseException as exc:  # raised by the caller's thread
            errors.append(exc)

    # The files are written on a thread of their own while the next bytes are read (both
    # block in the kernel with the GIL released): read and written in turns, a pipe's
    # writer stood still while the files were written (py-spy: this side idle 78% of a
    # 1 GiB extraction, the pageserver's side blocked on the pipe 38%).
    writer = threading.Thread(target=run, name="untar-writer", daemon=True)
    writer.start()
    try:
        for data in chunks:
            if batches.failed.is_set():
                break  # its error says why
            batches.queue.put([data])
    except BaseException:
        batches.queue.put(_ABORT)
        writer.join()
        raise
    batches.queue.put(_END)
    writer.join()
    if errors:
        raise errors[0]


def _tar_bytes(stream: BinaryIO) -> Iterator[bytes]:
    """The stream's bytes, a MiB at a time, gunzipped if they start with gzip's magic number."""
    data = stream.read(_READ_SIZE)
    if data[:2] != b"\x1f\x8b":
        while data:
            yield data
            data = stream.read(_READ_SIZE)
        return
    gunzip = zlib.decompressobj(wbits=31)  # 31: a gzip header and trailer
    try:
        while data:
            while data:  # at most a MiB out per call: memory stays bounded
                yield gunzip.decompress(data, _READ_SIZE)
                data = gunzip.unconsumed_tail
            data = stream.read(_READ_SIZE)
        yield gunzip.flush()
        if not gunzip.eof:
            raise CorruptData("the basebackup archive is damaged: the gzip stream is cut off")
    except zlib.error as exc:
        raise CorruptData(f"the basebackup archive is damaged: {exc}") from None


_QUEUE_BATCH = 1 << 20
_QUEUE_DEPTH = 8


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


DIRECT_MIN_BYTES = 1 << 20
"""Files at least this large (and a whole number of _DIRECT_ALIGN blocks: relation segments,
WAL) are written with O_DIRECT (`_DirectWrites`) where `direct_writes_enabled()`."""
DIRECT_WRITES_ENV = "NEON_DIRECT_WRITES"


def direct_writes_enabled() -> bool:
    """O_DIRECT writes are opt-in (NEON_DIRECT_WRITES=1 in the environment of the process
    that writes: the CLI, or the pageserver daemon it starts, for the daemon's own writing).
    They save the kernel's copy into page-cache pages (on this 2-core VM ~45% of a 1 GiB
    extraction's CPU), but each MiB then waits for the device: on a volume capped at ~125
    MiB/s a 1 GiB data directory takes ~8 s where buffered writes finish at memory speed,
    and the directory, usually started at once, is read back cold from the device."""
    return os.environ.get(DIRECT_WRITES_ENV, "") == "1"


PREALLOCATE_MIN_BYTES = 1 << 20
"""Files at least this large written through the page cache get their blocks up front
(`preallocate`): relation segments and WAL, not the many small forks (a syscall each)."""
PREALLOCATE_MAX_BYTES = RELSEG_SIZE * BLCKSZ
"""At most this much is preallocated per member, whatever its tar header says: the largest
file of a data directory, a relation segment (RELSEG_SIZE x BLCKSZ: 131072 x 8192 = 1 GiB in
PostgreSQL 15's default build, src/include/pg_config.h, configure's --with-segsize=1; WAL
segments are 16 MiB by default, at most 1 GiB: WalSegMaxSize in
src/include/access/xlog_internal.h). The archive may come from a peer we do not trust (a
remote pageserver, a `.neon` pulled over ssh, s3 or https): a header declaring hundreds of
GiB would otherwise reserve that much disk before any data arrives (ENOSPC for the
PostgreSQL clusters on the same disk). Members follow one another, so a stream cut short
leaves at most what arrived plus this much; a larger member is still written whole, its
blocks past the cap allocated as its data arrive."""


def preallocate(fd: int, size: int) -> bool:
    """Give the new, empty file open as `fd` its `size` bytes of blocks in one call
    (fallocate(2), mode 0: its size is `size` at once); False where the filesystem or the
    platform cannot (the file is then written as without). Written into without it, ext4
    reserves a delayed allocation for every page at each write (ext4_da_write_begin): a 1
    GiB file in 1 MiB writes took 0.20 s of system CPU, 0.14 s preallocated (bench/README.md,
    `extract`). Not posix_fallocate: where the filesystem has no fallocate, glibc emulates
    it by writing into every block, and the file would be written twice."""
    call = _fallocate()
    if call is None:
        return False
    return call(fd, 0, 0, size) == 0  # an error (ENOSPC, EOPNOTSUPP): the writes say it


@functools.cache
def _fallocate() -> Callable[[int, int, int, int], int] | None:
    """libc's fallocate(2), where there is one (Linux) and its offsets are 64-bit."""
    import ctypes  # here: only where a large file is written

    if ctypes.sizeof(ctypes.c_long) != 8:  # a 32-bit off_t unless built for large files
        return None
    try:
        call = ctypes.CDLL(None, use_errno=True).fallocate
    except (AttributeError, OSError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    call.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], call)


_DIRECT_ALIGN = 4096  # what O_DIRECT asks of buffers, offsets and lengths on common devices
_DIRECT_STAGE = 1 << 20


class _DirectWrites:
    """A file's data written with O_DIRECT, a MiB at a time from a page-aligned buffer,
    bypassing the page cache. Through it, each page of a file is copied by the kernel into
    a page-cache page it has just taken: on this 2-core VM (bench/README.md, `extract`) that
    copy was ~45% of a 1 GiB extraction's CPU (perf: copy_folio_from_iter_atomic; freshly
    taken memory faults in the hypervisor), and the written-back pages cost the kernel's
    flusher threads more later. Where O_DIRECT is not supported (tmpfs refuses it at
    `fcntl`, a device may refuse the alignment at the first write), the file is written
    through the page cache as before."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._stage = mmap.mmap(-1, _DIRECT_STAGE)  # anonymous: page-aligned
        self._view = memoryview(self._stage)
        self._held = 0

    @classmethod
    def start(cls, fd: int) -> _DirectWrites | None:
        """Switch `fd` (a new, empty file) to O_DIRECT; None if the filesystem refuses."""
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
        except OSError:
            return None
        return cls(fd)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        if not self._held and len(view) % _DIRECT_ALIGN == 0 and _page_aligned(view):
            self._write(view)  # from the tar maker's aligned buffer, without a copy
            return
        while view:
            take = min(len(view), _DIRECT_STAGE - self._held)
            self._view[self._held : self._held + take] = view[:take]
            self._held += take
            view = view[take:]
            if self._held == _DIRECT_STAGE:
                self._flush()

    def finish(self) -> None:
        """Write what is held (a whole number of aligned blocks: the file's size is)."""
        self._flush()
        self.close()

    def close(self) -> None:
        self._view.release()
        with contextlib.suppress(BufferError):  # a view still held by an error's frame
            self._stage.close()

    def _flush(self) -> None:
        held, self._held = self._view[: self._held], 0
        self._write(held)
        held.release()

    def _write(self, held: memoryview) -> None:
        while held:
            try:
                held = held[os.write(self._fd, held) :]
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
                fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
                _write_all(self._fd, held)  # refused here: through the page cache
                held = held[len(held) :]


def _page_aligned(view: memoryview) -> bool:
    """Whether a view starts on a page boundary (only a writable one can tell: the tar
    maker's `AlignedChunks` are; a bytes object's data never is)."""
    if view.readonly or not view:
        return False
    import ctypes  # here: only for files written with O_DIRECT

    return ctypes.addressof(ctypes.c_char.from_buffer(view)) % mmap.PAGESIZE == 0


class _Abort(Exception):
    """The producer of the archive's bytes failed: the extraction is abandoned."""


_END, _ABORT = "end", "abort"


_C = TypeVar("_C")  # a chunk: bytes, or a view of a buffer used again


class _Batches(Generic[_C]):
    """Chunks handed to a consuming thread in batches through a bounded queue: the producer
    puts lists of chunks, then _END (or _ABORT); the thread's `consume` reads them as one
    iterator. On the consumer's failure `failed` is set (the producer stops) and the queue
    is taken until its end, so that the producer never blocks."""

    def __init__(self) -> None:
        self.queue: queue.Queue[list[_C] | str] = queue.Queue(_QUEUE_DEPTH)
        self.failed = threading.Event()
        self._ended = False

    def _chunks(self) -> Iterator[_C]:
        while isinstance(item := self.queue.get(), list):
            yield from item
        self._ended = True
        if item == _ABORT:
            raise _Abort

    def consume(self, consume: Callable[[Iterator[_C]], None]) -> None:
        """Run `consume` over the chunks (on the calling thread); raise what it raised."""
        try:
            consume(self._chunks())
        except BaseException:
            self.failed.set()
            while not self._ended:
                self._ended = not isinstance(self.queue.get(), list)
            raise


def _extract_all(
    chunks: Iterator[bytes | memoryview],
    target: Path,
    tablespace_links: dict[int, str] | None,
    divert: Divert | None = None,
    pack_deltas: bool = False,
    used: Callable[[bytes | memoryview], None] | None = None,
    delta_members: DeltaMembers | None = None,
) -> None:
    """Extract the archive's chunks (an _Abort from them: remove what was extracted);
    `used`: see extract_chunks (a feed writes or copies all it takes before it returns)."""
    with _extracting(target, tablespace_links, divert, pack_deltas, delta_members) as extractor:
        for chunk in chunks:
            extractor.feed(chunk)
            if used is not None:
                used(chunk)


async def consume_in_thread(
    chunks: AsyncIterator[bytes | memoryview], consume: Callable[[Iterator[bytes]], None]
) -> None:
    """Hand async `chunks` to `consume` running on a thread of its own, which works on one
    batch while the next bytes arrive (bounded memory: at most _QUEUE_DEPTH batches of a MiB
    queued). `consume` gets them as an iterator, which raises an exception of its own
    where `chunks` failed (it is then re-raised here once `consume` ended); this raises what
    `consume` raised. Both ends are done when this returns or raises. The process keeps
    freed heap memory for the pieces still to come (`tune_malloc_for_streams`)."""
    import asyncio  # here: a file's extraction (extract_basebackup) does without its import

    from pageserver.malloc_tuning import tune_malloc_for_streams  # ctypes: not at CLI start

    tune_malloc_for_streams()
    batches = _Batches[bytes]()
    worker = asyncio.ensure_future(asyncio.to_thread(batches.consume, consume))

    async def put(item: list[bytes] | str) -> None:
        try:
            batches.queue.put_nowait(item)
        except queue.Full:
            await asyncio.to_thread(batches.queue.put, item)

    try:
        try:
            batch: list[bytes] = []  # one queue hop per MiB, not per network message
            size = 0
            async for chunk in chunks:
                if batches.failed.is_set():
                    break  # its error says why
                batch.append(bytes(chunk))  # no copy of bytes; a view's buffer may be reused
                size += len(chunk)
                if size >= _QUEUE_BATCH:
                    await put(batch)
                    batch, size = [], 0
            if batch and not batches.failed.is_set():
                await put(batch)
        except BaseException:
            await put(_ABORT)
            raise
        await put(_END)
        await worker
    except BaseException:
        with contextlib.suppress(BaseException):
            await worker
        raise


async def extract_stream(
    chunks: AsyncIterator[bytes | memoryview],
    target: Path,
    tablespace_links: dict[int, str] | None = None,
    divert: Divert | None = None,
    pack_deltas: bool = False,
) -> None:
    """Extract a tar arriving as async chunks: a thread writes the files while the next
    bytes arrive (`consume_in_thread`); `divert`: see `Divert` (it runs on that thread);
    `pack_deltas`: a delta's fork members go into one file (`_Extractor`)."""

    def extract(received: Iterator[bytes]) -> None:
        _extract_all(received, target, tablespace_links, divert, pack_deltas)

    await consume_in_thread(chunks, extract)
