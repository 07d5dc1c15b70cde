"""The count of a `.neon` stream as it passes, on either end of a transfer (what `neon
snapshot push` sent, what `neon snapshot recv` received): its bytes, their SHA-256, and the
progress bar.

A `.neon` file's size is known only at its end, but the tar it compresses is known before
its first byte where the daemon announced it (`expect`): the bar then counts the tar bytes
of the frames passed (snapfile.container.TarBytesPassed: each frame's header, not its data)
against it, with a percent and an ETA; with no total, the bytes and their rate."""

from __future__ import annotations

import hashlib

from cli.progress import Progress
from snapfile.container import TarBytesPassed


class NeonStreamCount:
    """Counts what `add` is given; `count_tar`: follow the tar bytes even with no total
    (a receiver tells them once the file ended)."""

    def __init__(self, progress: Progress, *, count_tar: bool = False) -> None:
        self.bytes = 0
        self.sha256 = hashlib.sha256()
        self._progress = progress
        self._tar = TarBytesPassed() if count_tar else None
        self._total: int | None = None

    def expect(self, tar_bytes: int) -> None:
        """The stream's tar size, before its first byte (a later one replaces it: a push's
        dropped guess). A hint for the bar only: a stream that holds more is not refused for
        that (what a receiver checks is the manifest's SHA-256s); the bar's total grows."""
        self._total = tar_bytes
        if self._tar is None:
            self._tar = TarBytesPassed()

    @property
    def tar_bytes(self) -> int | None:
        """The tar bytes of the frames passed so far (None: not followed)."""
        return None if self._tar is None else self._tar.tar_bytes

    def add(self, chunk: bytes) -> None:
        self.bytes += len(chunk)
        self.sha256.update(chunk)
        if self._tar is not None:
            self._tar.feed(chunk)
        if self._total is None or self._tar is None:
            self._progress.update(self.bytes, None)
            return
        self._progress.update(self._tar.tar_bytes, self._total)
