"""Writing and reading stay within a few MiB whatever the snapshot size: 64 MiB of tar piped
through the writer into the reader, neither side ever holding more than about a frame."""

from __future__ import annotations

import hashlib
import random
import tracemalloc
from collections.abc import Iterator

import pytest

from snapfile import SnapshotFileReader, SnapshotFileWriter, TarData
from snapfile.reader import ManifestRead, SnapshotEnd
from tests.snapfile.snapfile_helpers import make_manifest

pytestmark = pytest.mark.slow

TOTAL = 64 * 1024 * 1024
CHUNK = 256 * 1024
LIMIT = 16 * 1024 * 1024


def generated_chunks(seed: int) -> Iterator[bytes]:
    """64 MiB, a third incompressible (the worst case for a frame's compressed size)."""
    rng = random.Random(seed)
    for i in range(TOTAL // CHUNK):
        yield rng.randbytes(CHUNK) if i % 3 == 0 else bytes([i % 251]) * CHUNK


def test_write_and_read_64_mib_in_bounded_memory() -> None:
    manifest = make_manifest(4 * 1024 * 1024)
    writer = SnapshotFileWriter(manifest)
    reader = SnapshotFileReader()
    want, got = hashlib.sha256(), hashlib.sha256()
    events: list[type] = []
    file_size = 0

    def consume(encoded: bytes, final: bool = False) -> None:
        nonlocal file_size
        file_size += len(encoded)
        # The file goes to the reader in network-sized pieces, as a download would.
        for start in range(0, len(encoded), 64 * 1024):
            for event in reader.feed(encoded[start : start + 64 * 1024]):
                events.append(type(event))
                if isinstance(event, TarData):
                    got.update(event.data)
        if final:
            events.extend(type(e) for e in reader.finish())

    tracemalloc.start()
    try:
        for chunk in generated_chunks(1):
            want.update(chunk)
            consume(writer.write(chunk))
        consume(writer.finish(), final=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got.hexdigest() == want.hexdigest()
    assert events[0] is ManifestRead and events[-1] is SnapshotEnd
    assert events.count(TarData) == 16
    assert file_size < TOTAL // 2
    assert peak < LIMIT, f"peak {peak / 2**20:.1f} MiB while streaming 64 MiB"
