"""The CLI's side of a live import (pageserver/ingest/live_import.py): the pageserver writes
the image layers of a backup's or `.neon` file's big relation files while the rest is still
arriving, instead of reading the whole directory back once it is complete.

`LiveImport.begin` (once the early LSN is known: the backup's start from its backup_label, a
`.neon` file's LSN from its manifest) creates the journal and sends the import request on a
thread of its own; `announced` passes a tar stream on to the extractor and announces its big
relation files on the way; `finish` says the directory is final and returns the request's
answer; `fail` (also on any error in the block) says the writer gave up, and the pageserver
removes what it wrote. A source that never calls `begin` (a data directory, a delta file) is
imported as before.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import TracebackType
from typing import Generic, TypeVar

from datadir_files.tar_reader import MemberData, MemberEnd, MemberStart, TarFormatError, TarReader
from pageserver.ingest.live_journal import JournalWriter, early_candidate

T = TypeVar("T")

_START_WAL = re.compile(rb"^START WAL LOCATION: ([0-9A-F]+)/([0-9A-F]+) ", re.MULTILINE)
_LABEL_MAX = 64 * 1024

Register = Callable[[Path, str | None], T]
"""The import request for a data directory (and the origin of a `.neon` file's snapshot)."""


class LiveImport(Generic[T]):
    def __init__(self, pgdata: Path, register: Register[T]) -> None:
        self._pgdata, self._register = pgdata, register
        self._journal: JournalWriter | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._request: concurrent.futures.Future[T] | None = None
        self._announced: list[str] = []

    @property
    def begun(self) -> bool:
        return self._request is not None

    def begin(self, lsn: int, origin: str | None = None) -> None:
        """Start the import: its early layers go at `lsn` (below the directory's own)."""
        if self._request is not None:
            return
        self._journal = JournalWriter(self._pgdata)
        self._journal.lsn(lsn)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, "live-import")
        self._request = self._pool.submit(self._register, self._pgdata, origin)

    def file(self, size: int, name: str) -> None:
        """A member of the data directory's tar is coming: announced if it is big. A request
        that ended already (refused) stops the transfer with its error."""
        if self._request is not None and self._request.done():
            self._request.result()
        if self._journal is not None and early_candidate(name, size):
            self._journal.file(size, name)
            self._announced.append(name)

    def extracted(self) -> None:
        """The whole tar is unpacked: each announced file's stat as the extractor left it, for
        the pageserver to compare with the final one. Call before recovery (or anything else)
        may write to the directory: a write after this changes the stat, and only the
        extractor knows when it is done with a file (a file the pageserver first saw whole
        may have been written again already). An announced file with no such line is not
        imported early."""
        if self._journal is None:
            return
        for name in self._announced:
            with contextlib.suppress(OSError):
                self._journal.whole(name, (self._pgdata / name).lstat())
        self._announced = []

    def finish(self) -> T:
        """The directory is final: the import's answer."""
        assert self._journal is not None and self._request is not None
        self._journal.done()
        try:
            return self._request.result()
        finally:
            self._close()

    def fail(self) -> None:
        """Give up (a no-op once finished or never begun); waits for the request to end."""
        if self._journal is not None:
            self._journal.failed()
        if self._request is not None:
            with contextlib.suppress(BaseException):
                self._request.result()
        self._close()

    def _close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __enter__(self) -> LiveImport[T]:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.fail()


async def announced(
    chunks: AsyncIterator[bytes | memoryview], live: LiveImport[T], *, backup_label: bool
) -> AsyncIterator[bytes | memoryview]:
    """The chunks of a data directory's tar, passed on; on the way, its big relation files
    are announced to `live` (and, with `backup_label`, the backup's start LSN begins it).
    A malformed archive is the extractor's to report: announcing just stops."""
    reader: TarReader | None = TarReader()
    label: bytearray | None = None
    async for chunk in chunks:
        if reader is not None:
            try:
                for event in reader.feed(chunk):
                    if isinstance(event, MemberStart) and event.kind == "file":
                        wanted = backup_label and event.name == "backup_label"
                        label = bytearray() if wanted else None
                        live.file(event.size, event.name)
                    elif isinstance(event, MemberData) and label is not None:
                        label += event.data[: _LABEL_MAX - len(label)]
                    elif isinstance(event, MemberEnd) and label is not None:
                        if found := _START_WAL.search(label):
                            live.begin(int(found[1], 16) << 32 | int(found[2], 16))
                        label = None
            except TarFormatError:
                reader = None
        yield chunk
