"""The `.neon` snapshot file: one self-describing, streamable, verifiable file per snapshot
(docs/snapshot-format.md). Sans I/O: `SnapshotFileWriter` and `SnapshotFileReader` are fed
bytes and return bytes or events; `write_snapshot_file` and `extract_tar` work on file objects.
"""

from snapfile.manifest import Checksums, FrameEntry, Manifest, MemberEntry
from snapfile.reader import (
    ManifestRead,
    ReaderEvent,
    SnapshotEnd,
    SnapshotFileReader,
    TarData,
    extract_tar,
    looks_like_snapshot_file,
    read_manifest,
    read_snapshot_file,
)
from snapfile.writer import SnapshotFileWriter, write_snapshot_file

__all__ = [
    "Checksums",
    "FrameEntry",
    "Manifest",
    "ManifestRead",
    "MemberEntry",
    "ReaderEvent",
    "SnapshotEnd",
    "SnapshotFileReader",
    "SnapshotFileWriter",
    "TarData",
    "extract_tar",
    "looks_like_snapshot_file",
    "read_manifest",
    "read_snapshot_file",
    "write_snapshot_file",
]
