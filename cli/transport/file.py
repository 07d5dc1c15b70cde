"""`file:///DIR/NAME` or a plain path: objects are files in a local directory.

A write goes to a hidden temporary file beside the target (`.NAME.XXXX.partial`), is fsynced,
and is linked to its name (refused if the name exists) or renamed over it (`overwrite`);
the directory is fsynced after. A resumable write (cli/transport/resume.py) uses
`.NAME.partial` instead, kept when the write is interrupted, locked (flock) while a writer
has it so that two pushes of one name never interleave. Blocking file calls run in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import os
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import BinaryIO, TypeVar
from urllib.parse import unquote, urlsplit

from cli.transport.base import (
    CHUNK,
    Location,
    ObjectInfo,
    ObjectReader,
    ObjectWriter,
    Store,
    already_exists,
    check_object_name,
)
from cli.transport.resume import (
    PARTIAL_SUFFIX,
    RESUME_BLOCK,
    Partial,
    PartialAppender,
    ResumingWriter,
    partial_name,
)
from pageserver_api.errors import error_from_os
from proto.errors import Conflict, InvalidArgument, NotFound

URL_FORM = "file:///PATH or a path"
T = TypeVar("T")


def parse_location(url: str) -> Location:
    """A file URL (`file:///abs/path`, `file://localhost/abs/path`) or a plain path; one that
    ends in '/' or is an existing directory names the directory."""
    if url.lower().startswith("file:"):
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise InvalidArgument(
                f"invalid file URL {url!r}: expected file:///ABSOLUTE/PATH (a local path)"
            )
        if parts.query or parts.fragment:
            raise InvalidArgument(f"invalid file URL {url!r}: it has a query or fragment")
        raw = unquote(parts.path)
    else:
        raw = url
    if not raw:
        raise InvalidArgument("empty path: give a file or directory")
    path = Path(raw).absolute()
    if raw.endswith("/") or path.is_dir():
        return Location(FileStore(path), None)
    return Location(FileStore(path.parent), check_object_name(path.name, str(path)))


async def _io(call: Callable[[], T], where: Path) -> T:
    """`call` in a thread; an OSError becomes one line naming `where` (disk full, ...)."""
    try:
        return await asyncio.to_thread(call)
    except OSError as exc:
        raise error_from_os(exc, where) from None


class FileStore(Store):
    guess_delta = False

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.url = str(directory) + "/"

    def object_url(self, name: str) -> str:
        return str(self.directory / name)

    def _path(self, name: str) -> Path:
        return self.directory / check_object_name(name, self.url)

    def _check_directory(self) -> None:
        if not self.directory.is_dir():
            raise NotFound(f"directory {self.directory} does not exist; create it first")

    async def stat(self, name: str) -> ObjectInfo | None:
        path = self._path(name)

        def size() -> int | None:
            try:
                return path.stat().st_size
            except FileNotFoundError:
                return None

        found = await _io(size, path)
        return None if found is None else ObjectInfo(name, found)

    async def list(self) -> list[ObjectInfo]:
        self._check_directory()

        def scan() -> list[ObjectInfo]:
            found = []
            with os.scandir(self.directory) as entries:
                for entry in entries:
                    if not entry.name.startswith(".") and entry.is_file():
                        found.append(ObjectInfo(entry.name, entry.stat().st_size))
            return sorted(found, key=lambda o: o.name)

        return await _io(scan, self.directory)

    async def open_write(self, name: str, *, overwrite: bool) -> ObjectWriter:
        final = self._path(name)
        self._check_directory()

        def create() -> tuple[BinaryIO, Path]:
            fd, tmp = tempfile.mkstemp(
                prefix=f".{name}.", suffix=PARTIAL_SUFFIX, dir=self.directory
            )
            os.fchmod(fd, 0o666 & ~_umask())  # as open() would create it
            return os.fdopen(fd, "wb", buffering=0), Path(tmp)

        out, tmp = await _io(create, final)
        return FileWriter(out, tmp, final, overwrite)

    async def open_resumable(self, name: str, *, overwrite: bool) -> ObjectWriter:
        final = self._path(name)
        self._check_directory()
        tmp = self.directory / partial_name(name)

        def open_partial() -> tuple[BinaryIO, Partial]:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o666)
            out = os.fdopen(fd, "r+b", buffering=0)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                out.close()
                raise Conflict(
                    f"{final}: another push is writing it now ({tmp.name} is locked)"
                ) from None
            return out, read_partial(out)

        out, partial = await _io(open_partial, final)
        return ResumingWriter(partial, FileAppender(out, tmp, final, overwrite))

    async def open_read(self, name: str, offset: int = 0) -> ObjectReader:
        path = self._path(name)

        def open_at() -> BinaryIO:
            f = path.open("rb")
            f.seek(offset)
            return f

        try:
            f = await _io(open_at, path)
        except Exception:
            if not path.exists():
                raise NotFound(f"{path}: no such file") from None
            raise
        return FileReader(f, path)

    async def delete(self, name: str) -> None:
        path = self._path(name)
        try:
            await _io(path.unlink, path)
        except Exception:
            if not path.exists():
                raise NotFound(f"{path}: no such file") from None
            raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link_new(tmp: Path, final: Path) -> None:
    """Put `tmp` at `final` unless something is there: a hard link never replaces (EEXIST);
    on a filesystem without hard links, a check then a rename."""
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise already_exists(str(final)) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
            raise
        if final.exists() or final.is_symlink():
            raise already_exists(str(final)) from None
        os.rename(tmp, final)
        return
    tmp.unlink()


def _publish(tmp: Path, final: Path, overwrite: bool) -> None:
    """Put the written, fsynced `tmp` at `final` (replacing it with `overwrite`), durably."""
    if overwrite:
        os.replace(tmp, final)
    else:
        _link_new(tmp, final)
    _fsync_dir(final.parent)


class FileWriter(ObjectWriter):
    def __init__(self, out: BinaryIO, tmp: Path, final: Path, overwrite: bool) -> None:
        super().__init__()
        self._out, self._tmp, self._final, self._overwrite = out, tmp, final, overwrite

    async def write(self, data: bytes) -> None:
        await _io(lambda: self._out.write(data), self._final)
        self.bytes_written += len(data)

    async def commit(self) -> None:
        def publish() -> None:
            with self._out:
                self._out.flush()
                os.fsync(self._out.fileno())
            _publish(self._tmp, self._final, self._overwrite)

        try:
            await _io(publish, self._final)
        except BaseException:
            await self.abort()
            raise

    async def abort(self) -> None:
        def remove() -> None:
            self._out.close()
            self._tmp.unlink(missing_ok=True)

        with contextlib.suppress(OSError):
            await asyncio.to_thread(remove)


def read_partial(f: BinaryIO) -> Partial:
    """The size and block digests of the partial object open as `f`."""
    f.seek(0)
    digests = []
    while block := f.read(RESUME_BLOCK):
        digests.append(hashlib.sha256(block).hexdigest())
    return Partial(f.tell(), tuple(digests))


class FileAppender(PartialAppender):
    """`.NAME.partial`, open and locked: cut, appended to, then published as FileWriter
    publishes its temporary file."""

    def __init__(self, out: BinaryIO, tmp: Path, final: Path, overwrite: bool) -> None:
        self._out, self._tmp, self._final, self._overwrite = out, tmp, final, overwrite

    async def start(self, keep: int) -> None:
        def cut() -> None:
            self._out.truncate(keep)
            self._out.seek(keep)

        await _io(cut, self._final)

    async def write(self, data: bytes) -> None:
        await _io(lambda: self._out.write(data), self._final)

    async def commit(self, size: int) -> None:
        def publish() -> None:
            with self._out:
                os.fsync(self._out.fileno())
                held = os.fstat(self._out.fileno()).st_size
                if held != size:
                    raise Conflict(f"{self._tmp} holds {held} bytes, not the {size} written")
            _publish(self._tmp, self._final, self._overwrite)

        try:
            await _io(publish, self._final)
        except BaseException:
            with contextlib.suppress(OSError):
                self._out.close()
                self._tmp.unlink(missing_ok=True)  # not this write's bytes: never resumed
            raise

    async def abort(self) -> None:
        def close() -> None:
            with self._out:
                if os.fstat(self._out.fileno()).st_size == 0:
                    self._tmp.unlink(missing_ok=True)

        with contextlib.suppress(OSError, ValueError):
            await asyncio.to_thread(close)


class FileReader(ObjectReader):
    def __init__(self, f: BinaryIO, path: Path) -> None:
        self._f, self._path = f, path
        self.size = os.fstat(f.fileno()).st_size

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        while chunk := await _io(lambda: self._f.read(CHUNK), self._path):
            yield chunk

    async def close(self) -> None:
        self._f.close()
