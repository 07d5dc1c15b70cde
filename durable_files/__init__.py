"""How every pg-neon process writes files: privately, and crash-safe.

Crash-safe file creation: write a temp name, fsync, rename, fsync the directory. After a crash
a file either exists whole under its final name or not at all (a leftover ``*.___temp`` may
remain, which readers ignore and the timeline deletes on open). Used by the CLI, the WAL
archive and the page store alike, so it belongs to none of them.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from pathlib import Path

TEMP_SUFFIX = ".___temp"

PRIVATE_UMASK = 0o077
"""The umask of every pg-neon process (CLI, pageserver, receiver): WAL, page history,
registries and logs are readable by their owner only, like PostgreSQL's own data directory."""


def temp_path(final: Path) -> Path:
    return final.with_name(final.name + TEMP_SUFFIX)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Make a whole directory tree durable in one bottom-up walk: each directory's files, then
    the directory itself (after its subdirectories), `root` last. Symbolic links are not
    followed (their own entry is made durable by their directory's fsync), nor FIFOs or
    sockets waited on or fsynced (O_NONBLOCK; only regular files hold data): the CLI, maybe
    root, makes PostgreSQL's account's data directory durable, and a FIFO that account put
    in it hung the open."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENXIO):  # a link now; a socket
                    continue
                raise
            try:
                if stat.S_ISREG(os.fstat(fd).st_mode):
                    os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def sync_filesystem(path: Path) -> None:
    """Make everything written on `path`'s filesystem durable in one call, syncfs(2), rather
    than a walk (fsync_tree of a 1 GiB data directory took ~65 ms of opens and fsyncs with
    nothing dirty, syncfs 0.3-8 ms): PostgreSQL's recovery_init_sync_method = syncfs. Linux
    reports a write-back error from it since 5.8 (errseq, as fsync does). Where the C
    library has no syncfs, the tree under `path` is fsynced instead."""
    import ctypes

    syncfs = getattr(ctypes.CDLL(None, use_errno=True), "syncfs", None)
    if syncfs is None:
        fsync_tree(path)
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if syncfs(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"syncfs failed: {os.strerror(code)}", str(path))
    finally:
        os.close(fd)


def write_chunks_durably(final: Path, chunks: Iterable[bytes]) -> int:
    """Write `chunks` to `final` atomically and durably; return the byte count."""
    tmp = temp_path(final)
    size = 0
    try:
        # Readable by the owner only, like everything pg-neon keeps (not left to the umask).
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                size += len(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.filename is None:  # write() and fsync() do not say which file (ENOSPC)
            raise OSError(exc.errno, exc.strerror, str(final)) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)
    return size


def write_file_durably(final: Path, data: bytes) -> None:
    write_chunks_durably(final, (data,))
