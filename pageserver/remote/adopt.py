"""A snapshot held in a bucket made readable from a storage of this machine, so a node there
can branch from it (`neon pg create --snapshot NAME` of a snapshot attached from s3).

A node branches within one storage: its new timeline names the snapshot's timeline as its
ancestor, looked up in the node's own storage (storage/timeline_store.py). So the timelines
the snapshot reads through are laid out in that storage under their own IDs, each naming only
the layer files a read at the snapshot's LSN needs: those the mirror downloaded and verified
(pageserver/remote/mirror.py), linked, not copied, when on the same file system. A read at
the branch point needs nothing else (pageserver/remote/layer_selection.py); the child reads
its ancestor only there. A second snapshot of the same timeline adds the layers it needs to
the ones already there: more real layers of a timeline never change what a read returns.

Files first, then the manifest that names them (write_manifest is durable), so a crash
leaves either no timeline (a directory without a manifest is not one) or a whole one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from durable_files import fsync_dir
from pageserver.history.node_store import StorageHistory
from pageserver.history.snapshots import Snapshot
from pageserver.remote.mirror import MirrorArea, timeline_manifest
from pageserver.storage.layers.names import parse_layer_name
from pageserver.storage.manifest import LayerEntry, write_manifest
from pageserver.storage.timeline import open_layer
from proto.errors import CorruptData


def _link(source: Path, target: Path) -> None:
    """`target` holds `source`'s bytes (a hard link, or a copy across file systems)."""
    if target.exists():
        if target.stat().st_size == source.stat().st_size:
            return
        target.unlink()  # a leftover of a killed adoption, not named by any manifest
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
        with open(target, "rb+") as f:
            os.fsync(f.fileno())


def adopt_snapshot(mirror: MirrorArea, snap: Snapshot, target: StorageHistory) -> int:
    """Lay out in `target` the timelines `snap` reads through with the layers a read at its
    LSN needs (downloaded already: MirrorArea.prepare(exact=True)); the bytes of layer files
    added to `target`."""
    index = mirror.index
    assert index is not None
    needed: dict[str, list[str]] = {}
    for path in mirror.needed_layers(snap.lsn, timeline=snap.timeline_id):
        _dir, owner, name = path.split("/")
        needed.setdefault(owner, []).append(name)
    chain: list[str] = []
    walk: str | None = snap.timeline_id
    while walk is not None:
        if walk not in index.timelines:
            raise CorruptData(f"the index of {mirror.name!r} has no timeline {walk}")
        chain.append(walk)
        ancestor = index.timelines[walk]["ancestor_id"]
        walk = None if ancestor is None else str(ancestor)
    added = 0
    for timeline_id in reversed(chain):  # ancestors first: a child opens its ancestor
        source = mirror.root / "timelines" / timeline_id
        directory = target.root / "timelines" / timeline_id
        names = needed.get(timeline_id, [])
        for name in names:
            if not (source / name).exists():
                raise CorruptData(f"layer {name} of {mirror.name!r} was not downloaded")
        if target.timelines.exists(timeline_id):
            timeline = target.timelines.get(timeline_id)
            have = {layer.name.file_name for layer in timeline.layer_map().layers()}
            new = [n for n in names if n not in have]
            for name in new:
                _link(source / name, directory / name)
            if new:
                fsync_dir(directory)
                layers = []
                for name in new:
                    parsed = parse_layer_name(name)
                    assert parsed is not None
                    layers.append(open_layer(directory, parsed, timeline.cache))
                timeline.replace_layers(layers, [])
            added += sum((directory / n).stat().st_size for n in new)
            continue
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        entries = []
        for name in sorted(names):
            parsed = parse_layer_name(name)
            assert parsed is not None
            _link(source / name, directory / name)
            entries.append(LayerEntry(parsed, (directory / name).stat().st_size))
        fsync_dir(directory)
        write_manifest(directory, timeline_manifest(index.timelines[timeline_id], entries))
        added += sum(e.size for e in entries)
    return added
