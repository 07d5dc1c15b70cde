"""Files the CLI writes or reads inside a data directory that PostgreSQL's OS user owns.

The CLI may run as root while the data directory and everything in it belong to PostgreSQL's
account, which can put a symbolic link at any name in it (a server it runs, an extension, a
user who got its shell). A path-based write as root would follow such a link: `touch
standby.signal` or `chown` through a link to /etc/shadow hands that file over. So every
access here goes through directory descriptors opened with O_NOFOLLOW from the data
directory down: a link in place of a directory fails the call, a link in place of the file
is replaced by the file (written under a temporary name with O_EXCL, then renamed over it),
and nothing a link names is read, written or handed over. Ownership is given through the
file's own descriptor (fchown), never by path.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path, PurePosixPath

from datadir_files.pg_account import pg_os_user
from proto.errors import CorruptData

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def give_fd_to_pg_user(fd: int) -> None:
    """fchown: hand what `fd` is open on to PostgreSQL's account (nothing when we are it)."""
    user = pg_os_user()
    if user is not None:
        os.fchown(fd, user.uid, user.gid)


def open_pg_dir(datadir: Path, rel: PurePosixPath, *, create: bool = False) -> int:
    """A descriptor on directory `rel` of `datadir`, each component opened without following
    a link; with `create`, missing components are made 0700 and given to PostgreSQL's user.

    `datadir` itself is opened by path: it is in a directory of ours (a node's home, a
    temporary directory), not in one PostgreSQL's account may change."""
    fd = os.open(datadir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in rel.parts:
            if part in ("", ".", "..", "/"):
                raise ValueError(f"not a plain relative path: {rel}")
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o700, dir_fd=fd)
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                raise CorruptData(
                    f"{datadir / rel}: {part!r} in the data directory is not a directory "
                    f"({exc.strerror}); remove it and retry"
                ) from None
            os.close(fd)
            fd = child
            if create:
                give_fd_to_pg_user(fd)
        return fd
    except BaseException:
        os.close(fd)
        raise


def write_pg_file_at(directory: int, name: str, data: bytes, *, durable: bool = True) -> None:
    """`name` in the open `directory` written whole under `name.tmp` (O_EXCL, O_NOFOLLOW),
    handed to PostgreSQL's user, fsynced when `durable`, and renamed into place (replacing
    whatever entry had the name, a link included, never writing through it)."""
    tmp = f"{name}.tmp"
    try:
        os.unlink(tmp, dir_fd=directory)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        raise CorruptData(
            f"{tmp} in the data directory is a directory, where pg-neon writes {name}; "
            "remove it and retry"
        ) from None
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o600, dir_fd=directory)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        give_fd_to_pg_user(fd)
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=directory)
        raise
    os.close(fd)
    os.rename(tmp, name, src_dir_fd=directory, dst_dir_fd=directory)
    if durable:
        os.fsync(directory)


def write_pg_file(datadir: Path, rel: str, data: bytes, *, durable: bool = True) -> None:
    """File `rel` of `datadir` (its directories must exist) holding `data`, PostgreSQL's
    user's, written as write_pg_file_at writes it."""
    path = PurePosixPath(rel)
    directory = open_pg_dir(datadir, path.parent)
    try:
        write_pg_file_at(directory, path.name, data, durable=durable)
    finally:
        os.close(directory)


MAX_READ = 16 << 20
"""The largest file read_pg_file reads (configuration files, marks, postmaster.pid): a
sparse file of a terabyte there must not make the CLI, maybe root, allocate as much."""


def read_pg_file(
    datadir: Path, rel: str, *, limit: int = MAX_READ, any_owner: bool = False
) -> bytes | None:
    """The bytes of regular file `rel` of `datadir`, None when it is missing; a link or a
    non-regular file there is refused (never read through: its target may be anyone's), and
    so is a file of more than `limit` bytes, or (unless `any_owner`: what is read says
    nothing of the file's) one neither PostgreSQL's account's nor a single-named one of ours."""
    path = PurePosixPath(rel)
    directory = open_pg_dir(datadir, path.parent)
    try:
        try:
            # O_NONBLOCK: a FIFO put there must not hang the open (regular files ignore it).
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            fd = os.open(path.name, flags, dir_fd=directory)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CorruptData(
                f"{datadir / rel} is not a regular file ({exc.strerror}); remove it and retry"
            ) from None
    finally:
        os.close(directory)
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise CorruptData(f"{datadir / rel} is not a regular file; remove it and retry")
            if st.st_size > limit:
                raise CorruptData(
                    f"{datadir / rel} is {st.st_size} bytes, more than the {limit} pg-neon "
                    "reads of it; remove it and retry"
                )
            user = None if any_owner else pg_os_user()
            if user is not None and st.st_uid not in (user.uid, os.geteuid()):
                # A second name of someone else's file (a hard link) is not the node's.
                raise CorruptData(
                    f"{datadir / rel} belongs to uid {st.st_uid}, neither PostgreSQL's "
                    f"account ({user.name}) nor ours; remove it and retry"
                )
            if user is not None and st.st_uid != user.uid and st.st_nlink > 1:
                # Ours, with another name: a hard link to one of root's files (/etc/shadow
                # on the same filesystem) that PostgreSQL's account made where the kernel
                # lets it (fs.protected_hardlinks=0); a file we put here has one name.
                raise CorruptData(
                    f"{datadir / rel} belongs to uid {st.st_uid} and has {st.st_nlink} names "
                    "(a hard link to a file outside the data directory); remove it and retry"
                )
            data = f.read(limit + 1)
            if len(data) > limit:  # it grew after the fstat
                raise CorruptData(f"{datadir / rel} grew past {limit} bytes while read")
            return data
    finally:
        os.close(fd)
