"""The remote index of one PITR area's history: what it is and every object it names.

It is the commit point in the bucket, as the manifest is on disk (storage/manifest.py): it is
written only after every object it names is complete in the bucket, and an object it stops
naming is deleted only after it is written (pageserver/remote/upload_queue.py).

Format: JSON ``{"format": 1, "generation": N, "body": {...}}``. ``objects`` maps a path inside
the history (``timelines/<id>/<layer file>``, ``wal/<segment>``, ``lsn_index/lsn_index``) to
its key under the area's prefix, its size and its SHA-256; a reader refuses an object whose
bytes do not hash to it. An index of a newer format is refused with the version it has, never
half-read.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from proto.errors import CorruptData, InvalidArgument

INDEX_FORMAT = 1
INDEX_NAME = "index.json"


class IndexTooNew(InvalidArgument):
    """The bucket's index was written by a newer pg-neon."""


class ChecksumMismatch(CorruptData):
    """An object's bytes do not match the SHA-256 its index gives."""


def verified(body: bytes, obj: RemoteObject, where: str) -> bytes:
    digest = hashlib.sha256(body).hexdigest()
    if len(body) != obj.size or digest != obj.sha256:
        raise ChecksumMismatch(
            f"object {where} is corrupt: {len(body)} bytes with SHA-256 {digest[:16]}..., "
            f"the index says {obj.size} bytes with {obj.sha256[:16]}...; refused, not used"
        )
    return body


@dataclass(frozen=True, slots=True)
class RemoteObject:
    key: str
    """Relative to the area's prefix (objects/...)."""
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class RemoteIndex:
    generation: int
    area: dict[str, Any]
    """The PitrArea record (pageserver/history/pitr.py)."""
    node_id: str
    pgdata: str
    node_state: dict[str, Any]
    """The node's NodeState (pageserver/history/node_store.py) on its current timeline."""
    timelines: dict[str, dict[str, Any]]
    """Timeline id -> its manifest body (storage/manifest.py), ancestors included."""
    objects: dict[str, RemoteObject]
    snapshots: list[dict[str, Any]] = field(default_factory=list)
    """The node's named snapshots on these timelines (history/snapshots.py records)."""
    uploaded_at: float = 0.0

    @property
    def timeline_id(self) -> str:
        return str(self.node_state["timeline_id"])

    @property
    def disk_consistent_lsn(self) -> int:
        from pg15.lsn import parse_lsn

        return parse_lsn(self.timelines[self.timeline_id]["disk_consistent_lsn"])

    @property
    def total_bytes(self) -> int:
        return sum(o.size for o in self.objects.values())

    def encode(self) -> bytes:
        body = {
            "area": self.area,
            "node_id": self.node_id,
            "pgdata": self.pgdata,
            "node_state": self.node_state,
            "timelines": self.timelines,
            "objects": {
                path: {"key": o.key, "size": o.size, "sha256": o.sha256}
                for path, o in sorted(self.objects.items())
            },
            "snapshots": self.snapshots,
            "uploaded_at": self.uploaded_at,
        }
        doc = {"format": INDEX_FORMAT, "generation": self.generation, "body": body}
        return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"


def decode_index(raw: bytes, where: str) -> RemoteIndex:
    try:
        doc = json.loads(raw)
        version = doc["format"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptData(f"remote index {where} is not a pg-neon index: {exc}") from None
    if not isinstance(version, int) or version > INDEX_FORMAT:
        raise IndexTooNew(
            f"remote index {where} has format {version!r}; this pg-neon reads format "
            f"{INDEX_FORMAT} and older: upgrade pg-neon to read it"
        )
    try:
        body = doc["body"]
        objects = {
            str(path): RemoteObject(str(o["key"]), int(o["size"]), str(o["sha256"]))
            for path, o in body["objects"].items()
        }
        return RemoteIndex(
            generation=int(doc["generation"]),
            area=dict(body["area"]),
            node_id=str(body["node_id"]),
            pgdata=str(body["pgdata"]),
            node_state=dict(body["node_state"]),
            timelines={str(k): dict(v) for k, v in body["timelines"].items()},
            objects=objects,
            snapshots=list(body.get("snapshots", [])),
            uploaded_at=float(body.get("uploaded_at", 0.0)),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CorruptData(f"remote index {where} is corrupt: {exc!r}") from None
