"""The `.neon` snapshot file: one self-describing, streamable, verifiable file per snapshot
(docs/snapshot-format.md). Sans I/O: `SnapshotFileWriter` and `SnapshotFileReader` are fed
bytes and return bytes or events; `write_snapshot_file` and `extract_tar` work on file objects.

The names below load their module on first use (PEP 562 `__getattr__`): importing one
submodule (`snapfile.delta`, which `pg checkout`'s applier needs) ran this file first, and it
imported the manifest, reader and writer modules (~7 ms of every checkout's start) whether
they were used or not. Import them from here, as always.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pageserver_api.lazy_names import load_name

_MODULE_OF = {
    "Checksums": "snapfile.manifest",
    "FrameEntry": "snapfile.manifest",
    "Manifest": "snapfile.manifest",
    "MemberEntry": "snapfile.manifest",
    "ManifestRead": "snapfile.reader",
    "ReaderEvent": "snapfile.reader",
    "SnapshotEnd": "snapfile.reader",
    "SnapshotFileReader": "snapfile.reader",
    "TarData": "snapfile.reader",
    "extract_tar": "snapfile.reader",
    "looks_like_snapshot_file": "snapfile.reader",
    "read_manifest": "snapfile.reader",
    "read_snapshot_file": "snapfile.reader",
    "SnapshotFileWriter": "snapfile.writer",
    "write_snapshot_file": "snapfile.writer",
}
"""Each public name's module (tests/snapfile/test_package.py checks it against the
TYPE_CHECKING imports below)."""

__all__ = sorted(_MODULE_OF)

if TYPE_CHECKING:  # the names for type checkers (`X as X`: re-exported)
    from snapfile.manifest import Checksums as Checksums
    from snapfile.manifest import FrameEntry as FrameEntry
    from snapfile.manifest import Manifest as Manifest
    from snapfile.manifest import MemberEntry as MemberEntry
    from snapfile.reader import ManifestRead as ManifestRead
    from snapfile.reader import ReaderEvent as ReaderEvent
    from snapfile.reader import SnapshotEnd as SnapshotEnd
    from snapfile.reader import SnapshotFileReader as SnapshotFileReader
    from snapfile.reader import TarData as TarData
    from snapfile.reader import extract_tar as extract_tar
    from snapfile.reader import looks_like_snapshot_file as looks_like_snapshot_file
    from snapfile.reader import read_manifest as read_manifest
    from snapfile.reader import read_snapshot_file as read_snapshot_file
    from snapfile.writer import SnapshotFileWriter as SnapshotFileWriter
    from snapfile.writer import write_snapshot_file as write_snapshot_file


def __getattr__(name: str) -> Any:
    return load_name(globals(), _MODULE_OF, name)
