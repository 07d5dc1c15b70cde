"""A SHA-256 computed on a thread of its own, for the whole-tar hash of a `.neon` file: the
frames' decompression (or compression) and the hash then run at once (hashlib and zstd
release the GIL), instead of one after the other on the thread reading the file."""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib

_IN_FLIGHT = 2
"""Updates queued at most; one more waits for the oldest (memory: that many chunks)."""


class BackgroundSha256:
    """`update` in order from one thread; `hexdigest` waits for every update given."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._pool = concurrent.futures.ThreadPoolExecutor(1, "sha256")
        self._pending: collections.deque[concurrent.futures.Future[None]] = collections.deque()

    def update(self, data: bytes | memoryview) -> None:
        """Queue `data` (bytes, or a view of bytes nobody changes) for hashing."""
        while len(self._pending) >= _IN_FLIGHT:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(self._hash.update, data))

    def hexdigest(self) -> str:
        while self._pending:
            self._pending.popleft().result()
        return self._hash.hexdigest()

    def close(self) -> None:
        """Stop the thread (what is queued is dropped)."""
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=False)
