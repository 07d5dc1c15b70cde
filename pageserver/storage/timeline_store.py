"""All timelines under one directory: create, open, list, branch, delete.

Layout::

    <root>/timelines/<timeline id>/manifest.json
    <root>/timelines/<timeline id>/<layer files>

A timeline id is 1-64 lowercase hex characters (32 when generated, like Neon's). Timelines
are opened lazily, ancestors first, and share one block cache.

A timeline being filled by an import carries an `importing` marker file until
`complete_import`; one still marked when a store is opened was cut short (a killed pageserver)
and is removed with its partial layers, so no half-imported history stays on disk.
"""

from __future__ import annotations

import re
import shutil
import threading
import uuid
from pathlib import Path

from durable_files import fsync_dir, write_file_durably
from pageserver.storage.layers.blocks import BlockCache
from pageserver.storage.manifest import MANIFEST_NAME, read_manifest
from pageserver.storage.settings import DEFAULT_SETTINGS, StoreSettings
from pageserver.storage.timeline import Timeline
from pg15.lsn import format_lsn
from proto.errors import AlreadyExists, Conflict, InvalidArgument, NotFound

_TIMELINE_ID = re.compile(r"^[0-9a-f]{1,64}\Z")
_DELETING_SUFFIX = ".deleting"
_IMPORTING = "importing"


def check_timeline_id(timeline_id: str) -> str:
    if not _TIMELINE_ID.match(timeline_id):
        raise InvalidArgument(
            f"invalid timeline id {timeline_id!r}: expected 1-64 lowercase hex characters"
        )
    return timeline_id


def new_timeline_id() -> str:
    return uuid.uuid4().hex


class TimelineStore:
    """Thread-safe registry of the timelines under `root`."""

    def __init__(self, root: Path, settings: StoreSettings = DEFAULT_SETTINGS) -> None:
        self.root = root
        self.settings = settings
        self.cache = BlockCache(settings.block_cache_bytes)
        self._dir = root / "timelines"
        self._dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._open: dict[str, Timeline] = {}
        for leftover in self._dir.glob(f"*{_DELETING_SUFFIX}"):
            shutil.rmtree(leftover, ignore_errors=True)
        for marker in self._dir.glob(f"*/{_IMPORTING}"):
            shutil.rmtree(marker.parent, ignore_errors=True)

    def _path(self, timeline_id: str) -> Path:
        return self._dir / check_timeline_id(timeline_id)

    def list_timelines(self) -> list[str]:
        return sorted(
            p.name
            for p in self._dir.iterdir()
            if _TIMELINE_ID.match(p.name) and (p / MANIFEST_NAME).exists()
        )

    def exists(self, timeline_id: str) -> bool:
        return (self._path(timeline_id) / MANIFEST_NAME).exists()

    def get(self, timeline_id: str) -> Timeline:
        """The timeline, opened (and its ancestors) on first use."""
        with self._lock:
            timeline = self._open.get(timeline_id)
            if timeline is not None:
                return timeline
            path = self._path(timeline_id)
            if not (path / MANIFEST_NAME).exists():
                raise NotFound(f"timeline {timeline_id} not found")
            manifest = read_manifest(path)
            ancestor = None if manifest.ancestor_id is None else self.get(manifest.ancestor_id)
            timeline = Timeline.open(path, ancestor, self.settings, self.cache, manifest)
            self._open[timeline_id] = timeline
            return timeline

    def create_timeline(
        self, timeline_id: str | None = None, *, importing: bool = False
    ) -> Timeline:
        """A new root timeline (no ancestor) with last_record_lsn 0; with `importing`, it is
        removed at the next open of the store unless `complete_import` is called first."""
        return self._create(timeline_id, None, 0, None, importing=importing)

    def complete_import(self, timeline_id: str) -> None:
        """The import into the timeline is whole and durable: keep it from now on."""
        path = self._path(timeline_id)
        (path / _IMPORTING).unlink(missing_ok=True)
        fsync_dir(path)

    def branch(
        self,
        source_id: str,
        at_lsn: int | None = None,
        new_id: str | None = None,
        prev_record_lsn: int | None = None,
    ) -> Timeline:
        """A child of `source_id` at `at_lsn` (default: its last record LSN); no data copied.

        The source is flushed first if its durable state does not yet reach at_lsn, so the
        child never depends on in-memory data of its ancestor.
        """
        source = self.get(source_id)
        if at_lsn is None:
            at_lsn = source.last_record_lsn
        if at_lsn > source.last_record_lsn:
            raise InvalidArgument(
                f"cannot branch timeline {source_id} at {format_lsn(at_lsn)}: it has only "
                f"ingested up to {format_lsn(source.last_record_lsn)}"
            )
        if at_lsn < source.ancestor_lsn:
            raise InvalidArgument(
                f"cannot branch timeline {source_id} at {format_lsn(at_lsn)}: it starts at "
                f"{format_lsn(source.ancestor_lsn)}; branch its ancestor instead"
            )
        if prev_record_lsn is None and at_lsn == source.last_record_lsn:
            prev_record_lsn = source.prev_record_lsn
        if source.disk_consistent_lsn < at_lsn:
            source.freeze_and_flush()
        return self._create(new_id, source, at_lsn, prev_record_lsn)

    def _create(
        self,
        timeline_id: str | None,
        ancestor: Timeline | None,
        ancestor_lsn: int,
        prev_record_lsn: int | None,
        *,
        importing: bool = False,
    ) -> Timeline:
        """A new timeline's directory, its `importing` marker (before the manifest: a kill at
        any later point leaves a marked directory, which the next open removes) and its
        manifest. One that fails midway (a full disk) is removed at once: no directory stays
        behind, listed or not. Only what this call made: the mkdir is the existence check
        (one made by anyone else, even after a look, is refused and left alone)."""
        with self._lock:
            timeline_id = new_timeline_id() if timeline_id is None else timeline_id
            path = self._path(timeline_id)
            try:
                path.mkdir(parents=True)
            except FileExistsError:
                raise AlreadyExists(f"timeline {timeline_id} already exists") from None
            try:
                if importing:
                    write_file_durably(path / _IMPORTING, b"")
                timeline = Timeline.create(
                    path,
                    timeline_id,
                    ancestor,
                    ancestor_lsn,
                    prev_record_lsn,
                    self.settings,
                    self.cache,
                )
            except BaseException:
                shutil.rmtree(path, ignore_errors=True)
                raise
            self._open[timeline_id] = timeline
            return timeline

    def children(self, timeline_id: str) -> list[str]:
        return [
            child
            for child in self.list_timelines()
            if read_manifest(self._path(child)).ancestor_id == timeline_id
        ]

    def delete_timeline(self, timeline_id: str) -> None:
        """Delete a timeline that has no children (refused with Conflict otherwise)."""
        with self._lock:
            if not self.exists(timeline_id):
                raise NotFound(f"timeline {timeline_id} not found")
            kids = self.children(timeline_id)
            if kids:
                raise Conflict(
                    f"timeline {timeline_id} has child timelines ({', '.join(kids)}); "
                    "delete them first"
                )
            timeline = self._open.pop(timeline_id, None)
            if timeline is not None:
                timeline.close()
            path = self._path(timeline_id)
            doomed = path.with_name(path.name + _DELETING_SUFFIX)
            path.rename(doomed)
            shutil.rmtree(doomed)

    def close(self) -> None:
        with self._lock:
            for timeline in self._open.values():
                timeline.close()
            self._open.clear()
