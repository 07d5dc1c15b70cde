"""A timeline's manifest: the layer files that exist, the durable LSNs, the ancestor.

It is the commit point of every change to a timeline's files. Layer files are written and
fsynced first, then the manifest naming them is replaced atomically (temp, fsync, rename,
directory fsync); files are deleted only after a manifest without them is durable. So after a
crash the manifest names only whole files, and a file it does not name is a leftover.

Format: JSON ``{"format": 1, "crc32c": <crc of the canonical body>, "body": {...}}`` with LSNs
in PostgreSQL's X/X notation, readable by a human and checked by the CRC. `empty_spans` is
optional (absent when there are none, so a manifest without it reads as before, and a reader
that does not know it loses nothing but the spans: see `EmptySpan`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import crc32c

from durable_files import write_file_durably
from pageserver.storage.keys import KeyRange, key_from_hex, key_to_hex
from pageserver.storage.layers.names import LayerName, parse_layer_name
from pg15.lsn import format_lsn, parse_lsn
from proto.errors import CorruptData, InvalidArgument, NotFound

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1


class ManifestCorrupt(CorruptData):
    """A manifest failed validation."""


@dataclass(frozen=True, slots=True)
class LayerEntry:
    name: LayerName
    size: int


@dataclass(frozen=True, slots=True)
class EmptySpan:
    """Keys of `key_range` have no WAL version in [lsn_start, lsn_end): where the L1 files of a
    merge of full-keyspace layers (an L0 merge, a merged flush) hold no key. The layers merged
    held every version of their LSNs, so this stays true whatever happens to the L1 files
    later (GC removing one uncovers its own keys only): `Timeline.keys_written` counts it as
    a span of WAL versions, as it counted the merged layers, so an image layer written in a
    window it covers does not make those keys candidates for a delta."""

    key_range: KeyRange
    lsn_start: int
    lsn_end: int


@dataclass(frozen=True, slots=True)
class TimelineManifest:
    timeline_id: str
    ancestor_id: str | None
    ancestor_lsn: int
    disk_consistent_lsn: int
    """Every record with end LSN <= this is in the named layers."""
    prev_record_lsn: int | None
    """Start LSN of the record ending at disk_consistent_lsn, when known."""
    layers: tuple[LayerEntry, ...]
    empty_spans: tuple[EmptySpan, ...] = ()

    def to_json_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "timeline_id": self.timeline_id,
            "ancestor_id": self.ancestor_id,
            "ancestor_lsn": format_lsn(self.ancestor_lsn),
            "disk_consistent_lsn": format_lsn(self.disk_consistent_lsn),
            "prev_record_lsn": (
                None if self.prev_record_lsn is None else format_lsn(self.prev_record_lsn)
            ),
            "layers": [{"name": e.name.file_name, "size": e.size} for e in self.layers],
        }
        if self.empty_spans:
            body["empty_spans"] = [
                [
                    key_to_hex(s.key_range.start),
                    key_to_hex(s.key_range.end),
                    format_lsn(s.lsn_start),
                    format_lsn(s.lsn_end),
                ]
                for s in self.empty_spans
            ]
        return body


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def write_manifest(directory: Path, manifest: TimelineManifest) -> None:
    body = manifest.to_json_body()
    doc = {"format": MANIFEST_FORMAT, "crc32c": crc32c.crc32c(_canonical(body)), "body": body}
    write_file_durably(directory / MANIFEST_NAME, json.dumps(doc, indent=1).encode() + b"\n")


def read_manifest(directory: Path) -> TimelineManifest:
    path = directory / MANIFEST_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise NotFound(f"timeline directory {directory} has no manifest") from exc
    try:
        doc = json.loads(raw)
        if doc["format"] != MANIFEST_FORMAT:
            raise ManifestCorrupt(f"manifest {path} has unsupported format {doc['format']!r}")
        body = doc["body"]
        if crc32c.crc32c(_canonical(body)) != doc["crc32c"]:
            raise ManifestCorrupt(f"manifest {path} is corrupt: checksum mismatch")
        layers = []
        for entry in body["layers"]:
            name = parse_layer_name(entry["name"])
            if name is None:
                raise ManifestCorrupt(f"manifest {path} names a non-layer file {entry['name']!r}")
            layers.append(LayerEntry(name, int(entry["size"])))
        prev = body["prev_record_lsn"]
        return TimelineManifest(
            timeline_id=str(body["timeline_id"]),
            ancestor_id=None if body["ancestor_id"] is None else str(body["ancestor_id"]),
            ancestor_lsn=parse_lsn(body["ancestor_lsn"]),
            disk_consistent_lsn=parse_lsn(body["disk_consistent_lsn"]),
            prev_record_lsn=None if prev is None else parse_lsn(prev),
            layers=tuple(layers),
            empty_spans=tuple(
                EmptySpan(
                    KeyRange(key_from_hex(start), key_from_hex(end)), parse_lsn(lo), parse_lsn(hi)
                )
                for start, end, lo, hi in body.get("empty_spans", ())
            ),
        )
    except ManifestCorrupt:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, InvalidArgument) as exc:
        raise ManifestCorrupt(f"manifest {path} is corrupt: {exc}") from exc
