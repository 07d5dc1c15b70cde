"""What a receiver (`neon snapshot recv`, `serve`) keeps of a whole `.neon` file whose push
was cut (the pusher killed, the connection dropped), so that the same push run again sends
only the rest (issue 12 item 3), as the ssh and file destinations keep `.NAME.partial`.

Kept: the bytes the import's work file held (`fetched.neon`, written as they arrived), moved
to `STORAGE/.recv-partials/NAME` (0700, one per file name: the next cut push of that name
replaces it, a push that ends in any other way removes it: one refused for a full disk too,
whose bytes would hold the space the push run again needs). At most KEEP_FILES are kept, the
newest, and none older than KEEP_SECONDS (both seen to at each keep and when a receiver
starts): a token admits any number of cut pushes of different names, and these must not
fill the receiver's disk. Nothing there is a snapshot or is listed. Answered: their
size and the SHA-256 of each RESUME_BLOCK (cli/transport/resume.py), which the pusher
compares with the stream it makes again; a resumed push then says from which byte it sends
(`resume_at`), and the kept bytes before it are fed to the same verifying import ahead of
the upload's. Nothing kept is trusted: a prefix that does not check out fails the import as
a tampered stream does, and is removed. A delta (a few percent of a snapshot) is not kept:
sent again whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

from cli.transport.base import CHUNK
from cli.transport.file import read_partial
from cli.transport.resume import NO_PARTIAL, Partial
from proto.errors import Conflict

PARTIALS_DIR = ".recv-partials"
KEEP_SECONDS = 2 * 24 * 3600
"""A cut push nobody ran again for this long is forgotten (its bytes removed)."""
KEEP_FILES = 2
"""The most cut pushes kept at once (the newest): the disk they take is at most this many
of the largest file a push may send."""


class Partials:
    """The cut pushes kept in one storage, by file name (a checked object name)."""

    def __init__(self, storage_path: Path) -> None:
        self._dir = storage_path / PARTIALS_DIR

    def sweep(self, now: float, spare: str | None = None) -> None:
        """Remove what was kept longer than KEEP_SECONDS before `now` (time.time()), and all
        but the newest KEEP_FILES (`spare`, the file name just kept, counted first)."""
        ages: list[tuple[float, Path]] = []
        with contextlib.suppress(FileNotFoundError):
            for kept in self._dir.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    ages.append((kept.stat().st_mtime, kept))
        ages.sort(key=lambda age: (age[1].name == spare, age[0]), reverse=True)
        for at, (mtime, kept) in enumerate(ages):
            if at >= KEEP_FILES or (mtime < now - KEEP_SECONDS and kept.name != spare):
                kept.unlink(missing_ok=True)

    def _path(self, file_name: str) -> Path:
        return self._dir / file_name

    def describe(self, file_name: str) -> Partial:
        """The kept bytes' size and block digests (blocking: reads them)."""
        try:
            with self._path(file_name).open("rb") as f:
                return read_partial(f)
        except FileNotFoundError:
            return NO_PARTIAL

    async def prefixed(
        self, file_name: str, resume_at: int, chunks: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        """The first `resume_at` kept bytes, then `chunks`; Conflict when fewer are kept
        (another push of the name changed them meanwhile)."""
        try:
            f = await asyncio.to_thread(self._path(file_name).open, "rb")
        except FileNotFoundError:
            f = None
        if f is None or os.fstat(f.fileno()).st_size < resume_at:
            if f is not None:
                f.close()
            raise Conflict(
                f"this receiver no longer holds the first {resume_at} bytes of {file_name}; "
                "push again"
            )
        with f:
            left = resume_at
            while left:
                block = await asyncio.to_thread(f.read, min(CHUNK, left))
                if not block:  # cut short since its size was checked (review L6)
                    raise Conflict(
                        f"this receiver's kept bytes of {file_name} ended {left} bytes short "
                        f"of {resume_at}; push again"
                    )
                left -= len(block)
                yield block
        async for chunk in chunks:
            yield chunk

    def keep(self, file_name: str, fetched: Path) -> None:
        """Keep what the cut push's work file holds (none: drop what was kept before)."""
        if not fetched.is_file() or fetched.stat().st_size == 0:
            self.drop(file_name)
            return
        self._dir.mkdir(mode=0o700, exist_ok=True)
        os.replace(fetched, self._path(file_name))
        self.sweep(time.time(), spare=file_name)

    def drop(self, file_name: str) -> None:
        self._path(file_name).unlink(missing_ok=True)
