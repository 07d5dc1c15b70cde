"""A pull's bytes kept on local disk as they arrive, so that a pull killed midway (SIGKILL,
a machine restart, more cuts than `read_object` survives) and run again fetches only the rest.

Why a spool of the raw bytes rather than of what was extracted: the `.neon` reader verifies a
stream from its first byte (members in order, then checksums.json over all of them), so a
resumed pull feeds it the kept bytes again, read locally, then the remote from where they
end; nothing kept is trusted without that check. A spool that does not check out makes the
pull fail with CorruptData; the caller (`neon snapshot pull`) then drops the spools and runs
once more from the start.

One spool per object URL (without secrets: `Location.url`) in a private directory (0700,
files 0600) under the storage the pull imports into; beside each, the object's size when it
was started: an object of another size at that URL now is another file, and its spool is
emptied. The spool is locked while read (flock), so two pulls of one URL never mix; the
second one reads without a spool. Spools untouched for MAX_AGE are removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

from cli.transport.base import CHUNK, Location, Progress, ReadSpool, read_from
from proto.errors import CorruptData

SPOOL_DIR = ".pull-partials"
MAX_AGE = 7 * 24 * 3600  # seconds


class PullSpool(ReadSpool):
    """The spools of one process's reads, in `directory`; `resumed` and `fetched` count the
    bytes read from spools and from the far side."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.fetched = 0
        self._used: set[Path] = set()
        self._found: dict[str, int] = {}  # URL -> bytes its spool held when first opened

    @property
    def resumed(self) -> int:
        """Bytes that earlier, interrupted runs had fetched, read here from spools."""
        return sum(self._found.values())

    def prepare(self) -> None:
        """Create the directory (private) and remove spools older than MAX_AGE."""
        self.directory.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.directory, 0o700)
        now = time.time()
        for path in self.directory.iterdir():
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime > MAX_AGE:
                    path.unlink()

    def _paths(self, url: str) -> tuple[Path, Path]:
        key = hashlib.sha256(url.encode()).hexdigest()[:32]
        return self.directory / f"{key}.neon", self.directory / f"{key}.json"

    def kept(self, url: str) -> Path | None:
        """The file this process read `url` through (the whole object once the pull that
        read it succeeded); None when it read around it (another pull held it)."""
        data, _meta = self._paths(url)
        return data if data in self._used else None

    def discard(self) -> None:
        """Remove the spools this process used (its pull is done, or they did not check out)."""
        for path in self._used:
            for spool in (path, path.with_suffix(".json")):
                spool.unlink(missing_ok=True)
        self._used.clear()
        self._found.clear()

    async def read(self, location: Location, progress: Progress | None) -> AsyncIterator[bytes]:
        spool = await asyncio.to_thread(self._open, location.url)
        if spool is None:  # another pull of this URL holds it
            async for chunk in read_from(location, 0, progress):
                self.fetched += len(chunk)
                yield chunk
            return
        data, meta = self._paths(location.url)
        with spool:
            held, size = await asyncio.to_thread(_held, spool, meta)
            if held:
                info = await location.store.stat(location.object_name)
                if info is not None and info.size != size:
                    held = 0  # another file at that URL now
                    await asyncio.to_thread(spool.truncate, 0)
            self._found.setdefault(location.url, held)
            done = 0
            while done < held:
                chunk = await asyncio.to_thread(spool.read, min(CHUNK, held - done))
                if not chunk:
                    raise CorruptData(f"{data}: the kept part of {location.url} shrank")
                done += len(chunk)
                if progress is not None:
                    progress(done, size)
                yield chunk
            if held and held == size:
                return

            opened = False

            def check_size(total: int | None) -> None:
                nonlocal size, opened
                if opened:
                    return
                opened = True
                if held and None not in (total, size) and total != size:
                    raise CorruptData(
                        f"{location.url} changed since an earlier pull of it was interrupted"
                    )
                size = total
                meta.write_text(json.dumps({"url": location.url, "size": total}))

            async for chunk in read_from(location, held, progress, check_size):
                await asyncio.to_thread(spool.write, chunk)
                self.fetched += len(chunk)
                yield chunk

    def _open(self, url: str) -> BinaryIO | None:
        data, _meta = self._paths(url)
        fd = os.open(data, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        self._used.add(data)
        return os.fdopen(fd, "r+b", buffering=0)


def _held(spool: BinaryIO, meta: Path) -> tuple[int, int | None]:
    """How many bytes the spool holds and the object's size it was started for (None: the
    transport did not say); a spool without its record, or holding more, is emptied."""
    try:
        size = json.loads(meta.read_text())["size"]
        known = size is None or isinstance(size, int)
    except (OSError, ValueError, KeyError, TypeError):
        size, known = None, False
    held = os.fstat(spool.fileno()).st_size
    if not known or (size is not None and held > size):
        spool.truncate(0)
        held, size = 0, None
    spool.seek(0)
    return held, size
