"""Unpack a basebackup tar into a data directory owned by the PostgreSQL OS user.

The CLI's side of extraction: what the pageserver streams is untrusted bytes here, so every
member is checked before anything is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tarfile
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from cli.pgbin import give_to_pg_user, make_pg_dir
from proto.errors import AlreadyExists, CorruptData

_READ_SIZE = 1 << 20


class UnsafeArchive(CorruptData):
    """A tar member that could write outside the target or create a non-regular file."""


def _member_path(member: tarfile.TarInfo) -> PurePosixPath | None:
    """The member's relative path, or None for the root itself; UnsafeArchive if hostile."""
    name = member.name
    path = PurePosixPath(name)
    if "\0" in name or "\\" in name or path.is_absolute():
        raise UnsafeArchive(f"refusing tar member {name!r}: absolute or unusual path")
    parts = [p for p in path.parts if p != "."]
    if ".." in parts:
        raise UnsafeArchive(f"refusing tar member {name!r}: it leads outside the target")
    if not (member.isreg() or member.isdir()):
        kind = (
            "symbolic link" if member.issym() else
            "hard link" if member.islnk() else
            "device" if member.ischr() or member.isblk() else
            "FIFO" if member.isfifo() else "special file"
        )  # fmt: skip
        raise UnsafeArchive(f"refusing tar member {name!r}: it is a {kind}")
    return PurePosixPath(*parts) if parts else None


def _make_dirs(root: Path, rel: PurePosixPath) -> None:
    cur = root
    for part in rel.parts:
        cur = cur / part
        if not cur.is_dir():
            os.mkdir(cur, 0o700)
            os.chmod(cur, 0o700)
            give_to_pg_user(cur)


def tablespace_link_oid(member: tarfile.TarInfo) -> int | None:
    """The OID of a symbolic link member `pg_tblspc/OID` (how BASE_BACKUP without
    TABLESPACE_MAP sends a tablespace's location, basebackup.c sendDir), else None."""
    parts = [p for p in PurePosixPath(member.name).parts if p != "."]
    if member.issym() and len(parts) == 2 and parts[0] == "pg_tblspc" and parts[1].isdigit():
        return int(parts[1])
    return None


def extract_basebackup(
    stream: BinaryIO, target_dir: Path, tablespace_links: dict[int, str] | None = None
) -> None:
    """Unpack a basebackup tar into `target_dir` (absent or empty), for the PostgreSQL user.

    Refuses absolute paths, `..`, links, devices and other special members, naming the member.
    Extracts into a sibling `<name>.tmp-XXXX` and renames it at the end, so a failure leaves
    nothing behind. Directories get mode 0700 and files 0600. With `tablespace_links`, a link
    member `pg_tblspc/OID` is not created but recorded there (OID -> its target): the caller
    places that tablespace itself (cli/backup_tablespaces.py); any other link is refused.
    """
    target = Path(target_dir)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise AlreadyExists(f"{target} exists and is not an empty directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{target.name}.tmp-", dir=target.parent))
    try:
        make_pg_dir(tmp)
        try:
            # Stream mode reads `bufsize` bytes at a time and re-slices its buffer per read:
            # the default 10 KiB makes a large archive cost many small reads and copies.
            with tarfile.open(fileobj=stream, mode="r|*", bufsize=_READ_SIZE) as tar:
                for member in tar:
                    oid = tablespace_link_oid(member)
                    if tablespace_links is not None and oid is not None:
                        tablespace_links[oid] = member.linkname
                        continue
                    rel = _member_path(member)
                    if rel is None:
                        continue
                    try:
                        _extract_member(tar, member, tmp, rel)
                    except OSError as exc:
                        raise CorruptData(
                            f"cannot extract tar member {member.name!r}: {exc.strerror}"
                        ) from None
        except (tarfile.TarError, EOFError) as exc:
            raise CorruptData(f"the basebackup archive is damaged: {exc}") from None
        if target.exists():
            target.rmdir()
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _extract_member(
    tar: tarfile.TarFile, member: tarfile.TarInfo, root: Path, rel: PurePosixPath
) -> None:
    if member.isdir():
        _make_dirs(root, rel)
        return
    _make_dirs(root, rel.parent)
    dest = root / rel
    if dest.is_dir():
        raise CorruptData(f"tar member {member.name!r} is a file where a directory was")
    src = tar.extractfile(member)
    if src is None:
        raise CorruptData(f"tar member {member.name!r} has no data")
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        shutil.copyfileobj(src, f, 1 << 20)
    os.chmod(dest, 0o600)
    give_to_pg_user(dest)


_PIPE_BATCH = 1 << 20


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _extract_and_drain(
    reader: BinaryIO, target: Path, tablespace_links: dict[int, str] | None
) -> None:
    """Extract, then read the rest so the writer never blocks (data after the tar's end)."""
    try:
        extract_basebackup(reader, target, tablespace_links)
        while reader.read(1 << 20):
            pass
    finally:
        reader.close()


async def extract_stream(
    chunks: AsyncIterator[bytes | memoryview],
    target: Path,
    tablespace_links: dict[int, str] | None = None,
) -> None:
    """Extract a tar arriving as async chunks (bounded memory: a pipe to the extractor)."""
    rfd, wfd = os.pipe()
    reader = os.fdopen(rfd, "rb", buffering=1 << 20)
    extractor = asyncio.ensure_future(
        asyncio.to_thread(_extract_and_drain, reader, target, tablespace_links)
    )
    try:
        try:
            batch = bytearray()  # one thread hop per MiB, not per network message
            async for chunk in chunks:
                batch += chunk
                if len(batch) >= _PIPE_BATCH:
                    full, batch = batch, bytearray()
                    await asyncio.to_thread(_write_all, wfd, full)
            if batch:
                await asyncio.to_thread(_write_all, wfd, batch)
        except BrokenPipeError:
            pass  # the extractor refused the archive: its error says why
        finally:
            os.close(wfd)
        await extractor
    except BaseException:
        with contextlib.suppress(BaseException):
            await extractor
        raise
