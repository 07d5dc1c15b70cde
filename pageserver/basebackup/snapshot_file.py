"""A basebackup as a `.neon` snapshot file, encoded where the tar is made.

Compressing in the daemon rather than in the client sends about a twentieth of the bytes
over the socket (what a client decodes is the cost: its event loop, framing and copies), and
the frames are compressed on the daemon's threads, several at once (snapfile's
`encode_snapshot_file`). The manifest is made from what the tar describes before its first
byte, so nothing is buffered.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable
from datetime import UTC, datetime

from pageserver.basebackup.tar_stream import BasebackupInfo
from pg15.constants import PG_MAJOR_VERSION
from snapfile import Manifest
from snapfile.writer import encode_snapshot_file

COMPRESSION_THREADS = 2


class TarCounter:
    """Counts the tar bytes passing on to the encoder."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self.bytes = 0
        self._chunks = chunks

    def __iter__(self) -> Generator[bytes, None, None]:
        for chunk in self._chunks:
            self.bytes += len(chunk)
            yield chunk


def snapshot_file_manifest(info: BasebackupInfo, source: str, created_at: int) -> Manifest:
    return Manifest(
        pg_version=PG_MAJOR_VERSION,
        system_identifier=info.system_identifier,
        lsn=info.lsn,
        pg_timeline=info.pg_timeline,
        source=source,
        created_at=datetime.fromtimestamp(created_at, UTC),
    )


def snapshot_file_chunks(manifest: Manifest, tar: TarCounter) -> Generator[bytes, None, None]:
    """The `.neon` file's bytes, about one frame's worth at a time."""
    return encode_snapshot_file(manifest, tar, workers=COMPRESSION_THREADS)
