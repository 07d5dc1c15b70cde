"""Apply the tar of a delta `.neon` file (snapfile/delta.py) to the parent's data directory,
which becomes the snapshot's.

Sans asyncio, fed the verified tar in chunks of any size: whole files are written over the
parent's; each relation fork member sets the fork's segment files to the size it states
(truncating, extending with zeros, removing segments past it) and writes its pages where
they belong; at the end, every file and directory the delta did not name (relations dropped
since the parent, old WAL, SLRU segments gone) is removed, as the snapshot does not have it.
Memory is one page record, whatever the delta's size.

What arrives is untrusted: paths leaving the directory, links, a fork member whose name is
no relation file, a wrong page size, block numbers out of order or at or past the size it
states are refused with CorruptData naming the member; what the delta changed until then
stays, so the caller applies into a work directory it throws away on error (nothing is
removed before the whole delta was applied).
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import re
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path, PurePosixPath

from datadir_files.pg_account import pg_os_user
from datadir_files.tar_reader import (
    ArchiveEnd,
    MemberData,
    MemberEnd,
    MemberStart,
    TarFormatError,
    TarReader,
)
from datadir_files.untar import UnsafeArchive, member_path
from durable_files import fsync_dir
from pg15.constants import BLCKSZ, RELSEG_SIZE, WAL_SEGMENT_SIZE_MAX
from pg15.datadir_layout import parse_relation_file_name
from proto.errors import CorruptData
from snapfile.delta import (
    BLOCK_NUMBER,
    DELTA_PREFIX,
    FORK_HEADER,
    FORK_SIZES,
    MAX_BLOCKS,
    MAX_FORK_SIZES,
    ForkDelta,
    delta_tar_reader,
    fork_path_of,
    parse_fork_header,
    parse_fork_sizes,
    record_size,
)

_SEGMENT_BYTES = RELSEG_SIZE * BLCKSZ
_ALLOCATE_FROM = 1 << 20
"""WAL segments (pg_wal members from 1 MiB to WAL_SEGMENT_SIZE_MAX, 1 GiB) are allocated
with posix_fallocate before their bytes are written (space reserved, as PostgreSQL's
zero-filled segments have it: wal_init_zero), so that their pieces of zeros need no writing
(`DeltaApplier._write`). Only those: a member's size is the archive's word, and at most one
member's is reserved ahead of its bytes."""
_ZEROS = bytes(4 << 20)
_PLAIN_FORK = re.compile(
    re.escape(DELTA_PREFIX) + r"((?:global|base/[0-9]+)/[0-9]+(?:_fsm|_vm|_init)?)"
)
"""A fork member's name as a delta's tar writes it outside tablespaces: safe as it is."""
_SIZES_MEMBER = re.compile(
    re.escape(DELTA_PREFIX) + r"(global|base/[0-9]+)/" + re.escape(FORK_SIZES)
)
"""A checkout tar's list of a directory's forks with no page (snapfile/delta.py FORK_SIZES)."""
_MAX_IOV = 1024
"""Buffers one pwritev takes at most (Linux's IOV_MAX)."""
_WRITE_BACK_BYTES = 32 << 20
"""Bytes of pages written into a segment after which an fsync of it starts (sync_early)."""


class _Fork:
    """One fork member being applied: its header, then page records. Paths are strings
    (`rel` relative to `root`, '/'-separated): most members of a checkout's delta are forks
    with no page, and pathlib's objects for each of their segments were a third of the
    applier's CPU (cProfile of a 1% checkout: ~5k path parses for ~760 members)."""

    def __init__(
        self,
        root: str,
        rel: str,
        member: MemberStart,
        changed: _Changed,
        names: set[str],
        write_back: Callable[[Path], None] | None = None,
        settle_later: Callable[[_Fork, int, int], None] | None = None,
    ) -> None:
        """`names`: those in the fork's directory (DeltaApplier._listed), kept up to date;
        `write_back`: called with a segment's path after each _WRITE_BACK_BYTES written
        into it; `settle_later(fork, segno, size)`: takes the segments of a fork with no
        page, to be looked at once the stream has ended (`settle`), else done here."""
        self.root, self.rel, self.member, self.changed = root, rel, member, changed
        self.names = names
        self.write_back = write_back
        self.settle_later = settle_later
        self.unsynced: dict[int, int] = {}
        """Bytes written into each segment since its last `write_back`."""
        self.buf = bytearray()
        self.delta: ForkDelta | None = None
        self.last_block = -1
        self.records = 0
        self.fds: dict[int, int] = {}
        self.written: set[int] = set()
        self.to_own: set[int] = set()
        """Segments not yet PostgreSQL's with mode 0600 (created here or by a killed run)."""

    def segment(self, segno: int) -> str:
        """Segment `segno`'s path, relative to the root."""
        return f"{self.rel}.{segno}" if segno else self.rel

    def path(self, segno: int) -> Path:
        return Path(self.root, self.segment(segno))

    def feed(self, data: memoryview, keep: set[str]) -> None:
        """The member's next bytes. Whole records are written from `data` itself; only a
        header or record cut by the piece's end is copied (into `buf`) to be completed by
        the next one: copying every page into `buf` first was a copy of all the pages."""
        if self.delta is None:
            take = FORK_HEADER.size - len(self.buf)
            self.buf += data[:take]
            data = data[take:]
            if len(self.buf) < FORK_HEADER.size:
                return
            header = bytes(self.buf)
            self.buf.clear()
            self.delta = parse_fork_header(header, self.member.size, self.member.name)
            self._set_size(keep)
        if self.buf:  # a record begun in the piece before
            take = record_size() - len(self.buf)
            self.buf += data[:take]
            data = data[take:]
            if len(self.buf) < record_size():
                return
            self._pages(self.buf)
            self.buf.clear()  # the record views _pages made are gone
        done = self._pages(data)
        self.buf += data[done:]

    def sized(self, nblocks: int, keep: set[str]) -> None:
        """A fork with no page in the delta, `nblocks` long (from a FORK_SIZES member), as
        its own member with no page would set it."""
        self.delta = ForkDelta(nblocks, 0)
        self._set_size(keep)
        self.end()

    def _set_size(self, keep: set[str]) -> None:
        """The fork's segment files as long as its size says, and no more of them."""
        assert self.delta is not None
        nblocks = self.delta.nblocks
        nsegs = max(1, -(-nblocks // RELSEG_SIZE))
        for segno in range(nsegs):
            keep.add(self.segment(segno))
            size = min(nblocks * BLCKSZ - segno * _SEGMENT_BYTES, _SEGMENT_BYTES)
            if not self.delta.pages and self.settle_later is not None:
                self.settle_later(self, segno, size)
            elif self.delta.pages or not _as_it_should_be(
                f"{self.root}/{self.segment(segno)}", size
            ):
                self._open(segno, size)
        segno = nsegs
        name = posixpath.basename(self.rel)
        while (past := f"{name}.{segno}") in self.names:
            os.unlink(self.path(segno))
            self.names.discard(past)
            self.changed.dirs.add(Path(self.root, posixpath.dirname(self.rel)))
            self.changed.forks.add(self.rel)
            segno += 1

    def _open(self, segno: int, size: int) -> None:
        """Segment `segno` open (made if missing) as `size` bytes long."""
        rel = self.segment(segno)
        path = f"{self.root}/{rel}"
        try:
            fd = _open_regular(path, os.O_RDWR, self.member.name)
            created = False
        except FileNotFoundError:
            fd = _open_regular(path, os.O_RDWR | os.O_CREAT, self.member.name)
            created = True
            self.names.add(posixpath.basename(rel))
        self.fds[segno] = fd
        st = os.fstat(fd)
        if created or st.st_size != size:
            os.ftruncate(fd, size)
            self.changed.file(Path(path), created)
            self.changed.forks.add(self.rel)
        if created or not _owned(st):
            self.to_own.add(segno)

    def settle(self, segno: int, size: int) -> Path | None:
        """A segment of a fork with no page (taken by `settle_later`), once the stream has
        ended: nothing where it is a regular file of `size` bytes, PostgreSQL's with mode
        0600 (most forks of a delta: one lstat), else made so (its path returned)."""
        if _as_it_should_be(f"{self.root}/{self.segment(segno)}", size):
            return None
        self._open(segno, size)
        self.end()
        return self.path(segno)

    def _pages(self, buf: bytearray | memoryview) -> int:
        """Write the whole page records at the start of `buf`; the bytes they took.

        A run of consecutive blocks of one segment file goes in one `pwritev` (up to
        _MAX_IOV pages): the checkout after `pgbench -c 4` writes ~35k pages, mostly in
        runs, and a `pwrite` each was most of the applier's CPU. A record out of order or
        past the fork's size is refused after the pages before it were written."""
        assert self.delta is not None
        size = record_size()
        count = len(buf) // size
        view = memoryview(buf)
        run: list[memoryview] = []
        run_start = run_seg = -1
        last, nblocks, unpack = self.last_block, self.delta.nblocks, BLOCK_NUMBER.unpack_from
        try:
            for at in range(0, count * size, size):
                (blkno,) = unpack(view, at)
                if blkno <= last or blkno >= nblocks:
                    self._write_run(run_seg, run_start, run)
                    problem = "out of order" if blkno <= last else "past the fork's size"
                    raise CorruptData(
                        f"delta member {self.member.name!r}: block {blkno} is {problem} "
                        f"({nblocks} blocks)"
                    )
                segno, index = divmod(blkno, RELSEG_SIZE)
                if blkno != last + 1 or segno != run_seg or len(run) >= _MAX_IOV:
                    self._write_run(run_seg, run_start, run)
                    run, run_start, run_seg = [], index, segno
                run.append(view[at + BLOCK_NUMBER.size : at + size])
                last = blkno
                self.last_block = last
                self.records += 1
            self._write_run(run_seg, run_start, run)
        finally:
            run.clear()
            view.release()
        return count * size

    def _write_run(self, segno: int, index: int, pages: list[memoryview]) -> None:
        """Pages of consecutive blocks from `index` on in segment `segno` (none: nothing)."""
        if not pages:
            return
        fd, at, want = self.fds[segno], index * BLCKSZ, len(pages) * BLCKSZ
        written = os.pwritev(fd, pages, at)
        while written < want:  # a short write (a regular file's are rare): the rest, in order
            rest = b"".join(pages)[written:]
            step = os.pwrite(fd, rest, at + written)
            if step <= 0:
                raise OSError(f"short write of block {index + written // BLCKSZ}")
            written += step
        self.written.add(segno)
        if self.write_back is not None:
            unsynced = self.unsynced.get(segno, 0) + want
            if unsynced >= _WRITE_BACK_BYTES:
                self.write_back(self.path(segno))
                unsynced = 0
            self.unsynced[segno] = unsynced
        pages.clear()

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def end(self) -> None:
        """The member is complete: the segment files handed to PostgreSQL, all closed."""
        if self.delta is None or self.buf or self.records != self.delta.pages:
            raise CorruptData(f"delta member {self.member.name!r} ends inside a page record")
        for segno in sorted(self.to_own):
            _own(self.fds[segno])
        self.to_own.clear()  # a fork settled segment by segment comes here once a segment
        for segno in self.written:
            self.changed.file(self.path(segno), False)
        if self.written:
            self.changed.forks.add(self.rel)
        self.close()


class _Changed:
    """What applying changed: files written or resized, directories whose entries changed,
    relation forks (their paths in the directory) with pages written or a new size."""

    def __init__(self) -> None:
        self.files: set[Path] = set()
        self.dirs: set[Path] = set()
        self.forks: set[str] = set()
        """As the delta names them, relative to the root: `base/DB/RELFILENODE`."""
        self.synced: dict[Path, Future[None]] = {}
        """Files whose fsync was started once this applier was done with them."""
        self.written_back: list[Future[None]] = []
        """fsyncs of files still being written (`_Fork.write_back`): their errors count."""

    def file(self, path: Path, created: bool) -> None:
        self.files.add(path)
        self.synced.pop(path, None)  # written (again) after an early fsync: not durable yet
        if created:
            self.dirs.add(path.parent)


class DeltaApplier:
    """Feed `feed()` the delta's tar, then call `finish()`: `root` (the parent's data
    directory) is then the snapshot's. On an error, `root` is half-applied: throw it away.
    `make_durable()` then fsyncs what this applier changed (not what an earlier, killed one
    changed without fsyncing: after such a run, fsync the whole tree)."""

    def __init__(
        self,
        root: Path,
        keep: Iterable[str] = (),
        sync_early: bool = False,
        aside: Path | None = None,
        compare: bool = True,
        sparse_wal: bool = False,
    ) -> None:
        """`keep`: paths in `root` that stay although the delta does not name them (a
        checkout in place keeps the node's configuration: cli/checkout_delta.py).
        `sync_early`: each file's fsync starts in a thread as soon as its member is applied,
        while the rest streams in, so that `make_durable` finds most of them done (it
        fsynced them one after another at the end: a tenth of a checkout in place).
        `aside`: a directory to create on `root`'s filesystem that the files not named are
        moved into instead of being unlinked, for the caller to delete later: on ext4
        mounted with `discard`, an unlink waits for its blocks to be trimmed (1.2 ms a small
        file that was written back, 7 ms a 16 MiB one): the ~300 FSM and VM files of a
        checkout took half a second, the renames a hundredth of that.
        `compare`: a whole file is written only from its first byte that differs (most hold
        the member's bytes already). Off for a run again after a failed one: after a
        writeback error Linux marks the lost pages clean, so the page cache may read as
        the member while the disk does not, and a fresh fsync reports nothing: each file
        is written again, its pages dirty, so the fsync after makes them durable.
        `sparse_wal`: the tar is a checkout's stream or a delta `.neon` file's, whose WAL
        segment may be a GNU sparse member (one, named as a segment, at most
        WAL_SEGMENT_SIZE_MAX bytes); any other sparse member is refused."""
        self.root = root
        self._root = str(root)
        self._aside = aside
        self._set_aside = 0
        self._reader = delta_tar_reader() if sparse_wal else TarReader()
        self._keep: set[str] = {PurePosixPath(p).as_posix() for p in keep}
        """Relative paths ('/'-separated, no '.' parts) that stay: named by the delta, or
        kept by the caller."""
        self._changed = _Changed()
        self._member: MemberStart | None = None
        self._fd: int | None = None
        self._fork: _Fork | None = None
        self._sizes: bytearray | None = None
        """A FORK_SIZES member being received."""
        self._ended = False
        self._offset = 0
        self._allocated = False
        self._path = root
        self._names: dict[str, set[str]] = {}
        self._created = self._differs = False
        self._compare = compare
        self._syncer = ThreadPoolExecutor(2, thread_name_prefix="fsync") if sync_early else None
        if self._syncer is not None:
            _start_threads(self._syncer, 2)
        self._unsettled: list[tuple[_Fork, int, int]] = []
        """Segments of forks with no page, looked at once the stream has ended (`_settle`)."""

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._handle(self._reader.feed(data))

    def finish(self) -> None:
        self._handle(self._reader.finish())
        if not self._ended:
            raise CorruptData("the delta's archive has no end")
        self._settle()
        self._remove_stale()

    def changed_fork(self, rel: PurePosixPath) -> bool:
        """Whether this applier wrote pages of, resized, created or removed segments of the
        fork at `rel` (as the delta names it: `base/DB/RELFILENODE`, no segment suffix)."""
        return rel.as_posix() in self._changed.forks

    @property
    def synced_early(self) -> frozenset[Path]:
        """The files whose fsync began once their member was applied (`sync_early`) and
        that were not written since."""
        return frozenset(self._changed.synced)

    def make_durable(self) -> None:
        """fsync every file this applier wrote or resized (those an early fsync covered,
        once it ended), then every directory whose entries it changed."""
        synced = self._changed.synced
        if self._syncer is not None:
            self._syncer.shutdown(wait=True)
            for future in [*self._changed.written_back, *synced.values()]:
                future.result()  # an fsync error is this call's
        for path in sorted(self._changed.files):
            if path not in synced and os.path.lexists(path):  # else removed later
                _fsync_file(path)
        for path in sorted(self._changed.dirs, key=lambda p: -len(p.parts)):
            if path.is_dir():
                fsync_dir(path)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._fork is not None:
            self._fork.close()
            self._fork = None
        if self._syncer is not None:
            self._syncer.shutdown(wait=True)

    def _sync_soon(self, paths: Iterable[Path]) -> None:
        if self._syncer is None:
            return
        for path in paths:
            if path in self._changed.files and path not in self._changed.synced:
                self._changed.synced[path] = self._syncer.submit(_fsync_file, path)

    def _handle(self, events: Iterator[object]) -> None:
        try:
            for event in events:
                if isinstance(event, MemberData):
                    if self._fork is not None:
                        self._fork.feed(event.data, self._keep)
                    elif self._fd is not None:
                        self._write(event.data)
                    elif self._sizes is not None:
                        self._sizes += event.data
                elif isinstance(event, MemberStart):
                    self._start(event)
                elif isinstance(event, MemberEnd):
                    self._end()
                elif isinstance(event, ArchiveEnd):
                    self._ended = True
        except TarFormatError as exc:
            self.close()
            raise CorruptData(f"the delta's archive is damaged: {exc}") from None
        except OSError as exc:
            self.close()
            name = self._member.name if self._member is not None else "?"
            raise CorruptData(f"cannot apply delta member {name!r}: {exc}") from None
        except BaseException:
            self.close()
            raise

    def _start(self, member: MemberStart) -> None:
        self._member = member
        plain = _PLAIN_FORK.fullmatch(member.name) if member.kind == "file" else None
        if plain is None and (sizes := _SIZES_MEMBER.fullmatch(member.name)) is not None:
            if member.kind != "file" or member.size > MAX_FORK_SIZES:
                raise CorruptData(f"delta member {member.name!r} is not a list of forks")
            self._make_dirs(sizes.group(1))
            self._sizes = bytearray()
            return
        if plain is not None:  # nearly every member: no path to check part by part
            rel: str = plain.group(1)
            fork_path: str | None = rel
        else:
            found = member_path(member)
            if found is None:
                return
            rel = found.as_posix()
            fork_path = fork_path_of(rel + ("/" if member.kind == "directory" else ""))
        if fork_path is not None:
            rel = fork_path if plain is not None else PurePosixPath(fork_path).as_posix()
            parent, name = posixpath.split(rel)
            parsed = parse_relation_file_name(name)
            if member.kind != "file" or parsed is None or parsed.segno != 0 or "." in name:
                raise UnsafeArchive(f"delta member {member.name!r} names no relation fork")
            if member.size > FORK_HEADER.size + MAX_BLOCKS * record_size():
                raise CorruptData(f"delta member {member.name!r} is larger than any fork")
            self._make_dirs(parent)
            names = self._listed(parent)
            write_back = None if self._syncer is None else self._write_back
            self._fork = _Fork(
                self._root, rel, member, self._changed, names, write_back, self._settle_later
            )
            return
        if member.kind == "directory":
            self._make_dirs(rel)
            return
        self._make_dirs(posixpath.dirname(rel))
        dest = self.root / rel
        if dest.is_dir() and not dest.is_symlink():
            raise CorruptData(f"delta member {member.name!r} is a file where a directory is")
        self._keep.add(rel)
        # Written over, not truncated first (cut to its size at the end): on ext4 mounted
        # with `discard` a truncation waits for the freed blocks' trim, and most of these
        # files (pg_xact, maps, PG_VERSION) hold the same bytes as before.
        self._path, self._created = dest, not os.path.lexists(dest)
        self._differs = False
        if self._created or not self._compare:
            self._differ()
        self._fd = _open_regular(str(dest), os.O_RDWR | os.O_CREAT, member.name)
        self._offset = 0
        wal_sized = _ALLOCATE_FROM <= member.size <= WAL_SEGMENT_SIZE_MAX
        if rel.partition("/")[0] == "pg_wal" and wal_sized:
            if not self._created:  # its pieces of zeros are not written: none of it stays
                self._differ()
                os.ftruncate(self._fd, 0)
            try:
                os.posix_fallocate(self._fd, 0, member.size)
                self._allocated = True
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self._allocated = False
        else:
            self._allocated = False

    def _write(self, data: memoryview) -> None:
        """A whole file's bytes, at the member's offset. In a file allocated up front, a
        piece of zeros is not written: the allocation reads as zeros already (a WAL segment
        is 16 MiB, all zeros but its first records: writing them was most of the fixed cost
        of a checkout in place)."""
        assert self._fd is not None
        at = self._offset
        self._offset += len(data)
        if self._allocated and _ZEROS.startswith(data):  # a memcmp
            return
        if not self._differs:  # the file's bytes so far are the member's: written only if not
            if os.pread(self._fd, len(data), at) == data:
                return
            self._differ()
        view = data
        while view:
            written = os.pwrite(self._fd, view, at)
            view, at = view[written:], at + written

    def _end(self) -> None:
        if self._sizes is not None:
            data, self._sizes = bytes(self._sizes), None
            assert self._member is not None
            self._sized(self._member, data)
        elif self._fork is not None:
            fork, self._fork = self._fork, None
            segments = [fork.path(s) for s in fork.fds]
            fork.end()
            self._sync_soon(segments)
        elif self._fd is not None:
            st = os.fstat(self._fd)
            if st.st_size != self._offset:
                self._differ()
                os.ftruncate(self._fd, self._offset)
            if self._created or not _owned(st):
                _own(self._fd)
            os.close(self._fd)
            self._fd = None
            if self._differs:  # else as it was: neither written nor to be fsynced
                self._sync_soon([self._path])

    def _sized(self, member: MemberStart, data: bytes) -> None:
        """The forks a FORK_SIZES member lists, each as its own member with no page would
        have them."""
        directory = member.name[len(DELTA_PREFIX) : -len(FORK_SIZES) - 1]
        names = self._listed(directory)
        write_back = None if self._syncer is None else self._write_back
        for name, nblocks in parse_fork_sizes(data, member.name):
            rel = f"{directory}/{name}"
            fork = _Fork(
                self._root, rel, member, self._changed, names, write_back, self._settle_later
            )
            fork.sized(nblocks, self._keep)

    def _settle_later(self, fork: _Fork, segno: int, size: int) -> None:
        self._unsettled.append((fork, segno, size))

    def _settle(self) -> None:
        """The segments of forks with no page (`_Fork.settle`), one after another once the
        stream has ended: an lstat each while the next bytes were being received made this
        thread wait for the interpreter's lock after each of the ~700 (py-spy of a 1%
        checkout: 14 ms of 25 at load 3-4); now nothing else runs."""
        try:
            for fork, segno, size in self._unsettled:
                settled = fork.settle(segno, size)
                if settled is not None:
                    self._sync_soon([settled])
        except OSError as exc:
            self.close()
            raise CorruptData(f"cannot apply delta member {fork.member.name!r}: {exc}") from None
        except BaseException:
            self.close()
            raise
        self._unsettled.clear()

    def _listed(self, directory: str) -> set[str]:
        """The names in `directory` (relative to the root; listed once: a fork's segments
        past its size are looked up here, not with a stat each, for the thousand-odd forks
        of a delta)."""
        names = self._names.get(directory)
        if names is None:
            names = self._names[directory] = set(os.listdir(f"{self._root}/{directory}"))
        return names

    def _write_back(self, path: Path) -> None:
        """fsync a segment being written, on the fsync threads: its final fsync (once the
        member ends) then finds most of it on disk. A large fork's pages were all written
        back by that one fsync at the end (the newcomer's checkout, ~200 MiB of pages in
        pgbench_accounts: the command waited ~0.4 s for it after the last byte)."""
        assert self._syncer is not None
        self._changed.written_back.append(self._syncer.submit(_fsync_file, path))

    def _differ(self) -> None:
        """The whole file being applied is about to differ from what the directory held."""
        self._differs = True
        self._changed.file(self._path, self._created)

    def _make_dirs(self, rel: str) -> None:
        """Directory `rel` (relative to the root; '' is the root) and its parents."""
        if not rel or rel in self._keep:
            return
        self._make_dirs(posixpath.dirname(rel))
        path = self.root / rel
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            path.unlink()
        if not path.is_dir():
            os.mkdir(path, 0o700)
            user = pg_os_user()
            if user is not None:  # the link's own owner if one took its place (see `_own`)
                os.chown(path, user.uid, user.gid, follow_symlinks=False)
            self._changed.dirs.update((path, path.parent))
        self._keep.add(rel)

    def _remove_stale(self) -> None:
        """Remove what the snapshot does not have: every file and directory not named."""
        for top, dirs, files in os.walk(self._root, topdown=False):
            here = posixpath.relpath(top, self._root)
            prefix = "" if here == "." else here + "/"
            links = [d for d in dirs if (Path(top) / d).is_symlink()]
            for name in files + links:
                if prefix + name not in self._keep:
                    self._remove_file(Path(top) / name)
                    self._changed.dirs.add(Path(top))
            for name in dirs:
                path = Path(top) / name
                if prefix + name not in self._keep and not path.is_symlink():
                    os.rmdir(path)
                    self._changed.dirs.add(Path(top))
                    self._changed.dirs.discard(path)

    def _remove_file(self, path: Path) -> None:
        """Unlink `path`, or move it into the `aside` directory (a regular file there)."""
        if self._aside is not None and stat.S_ISREG(os.lstat(path).st_mode):
            try:
                if self._set_aside == 0:
                    self._aside.mkdir(exist_ok=True)
                os.rename(path, self._aside / str(self._set_aside))
                self._set_aside += 1
                return
            except OSError:  # another filesystem (EXDEV): unlinked instead
                pass
        os.unlink(path)


def _start_threads(pool: ThreadPoolExecutor, count: int) -> None:
    """Have `pool` start its `count` threads now, before the stream comes: started on the
    first fsyncs, each start waited for the new thread to take the interpreter's lock from
    the one receiving (~5 ms of a 1% checkout's apply at load 3-4, py-spy)."""
    barrier = threading.Barrier(count)

    def meet() -> None:
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(timeout=1.0)

    for _ in range(count):
        pool.submit(meet)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_regular(path: str, flags: int, member: str) -> int:
    """`path` opened with `flags` (0600 where created), refused unless it is a regular
    file: the directory is PostgreSQL's account's, which may put a FIFO or a device at a
    name a delta writes (O_NONBLOCK: opening either never waits; written, a device's
    writes would go to it). UnsafeArchive names the delta's `member`."""
    fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafeArchive(f"refusing delta member {member!r}: {path} is not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _owned(st: os.stat_result) -> bool:
    """Whether a file is PostgreSQL's with mode 0600 already (one chmod and chown less for
    each of the thousand-odd forks of a checkout, nearly all unchanged)."""
    user = pg_os_user()
    mode_ok = stat.S_IMODE(st.st_mode) == 0o600
    return mode_ok and (user is None or (st.st_uid, st.st_gid) == (user.uid, user.gid))


def _as_it_should_be(path: str, size: int) -> bool:
    """Whether `path` is a regular file of `size` bytes, PostgreSQL's with mode 0600 (a
    fork segment with no page in the delta then needs nothing)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == size and _owned(st)


def _own(fd: int) -> None:
    """Hand a file this applier opened to PostgreSQL's OS user, mode 0600: through its
    descriptor, as the directory is that user's and this process may be root (by its path,
    a link put in its place would have the chmod and chown follow it)."""
    os.fchmod(fd, 0o600)
    user = pg_os_user()
    if user is not None:
        os.fchown(fd, user.uid, user.gid)
