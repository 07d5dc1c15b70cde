"""The pageserver's remote histories: the areas it uploads and the areas it attached.

Kept in ``<workdir>/remote.json``: the s3 storages it was told about (settings, the path of
the secret file, never the secret) and which PITR areas it uploads to which of them, so the
uploads resume after a restart. Attached areas are laid out under
``<workdir>/remote/<storage>/<area>/pagestore`` (pageserver/remote/mirror.py) and found again
there after a restart, without asking the bucket.

Bytes used per storage come from the indexes this pageserver holds (what it uploaded last,
what it attached): no LIST of the bucket is made to count them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from durable_files import write_file_durably
from pageserver.history.node_store import NodeStore
from pageserver.remote.lease import acquire, pageserver_id
from pageserver.remote.mirror import MirrorArea
from pageserver.remote.objects import open_bucket
from pageserver.remote.settings import RemoteSettings
from pageserver.remote.uploader import AreaUploader, UploadStatus, area_prefix
from proto.errors import NeonError, NotFound

log = logging.getLogger(__name__)

REMOTE_FILE = "remote.json"


@dataclass(frozen=True, slots=True)
class StorageUsage:
    storage: str
    used_bytes: int
    uploading: tuple[str, ...]
    """PITR areas this pageserver writes there."""
    attached: tuple[str, ...]
    """PITR areas of the bucket attached here read-only."""


class RemoteHistories:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.owner = pageserver_id(workdir)
        self._path = workdir / REMOTE_FILE
        self._lock = threading.Lock()
        self.storages: dict[str, RemoteSettings] = {}
        self.uploads: dict[str, str] = {}
        """PITR area -> the storage it is uploaded to."""
        self.uploaders: dict[str, AreaUploader] = {}
        self.mirrors: dict[str, MirrorArea] = {}
        if self._path.exists():
            doc = json.loads(self._path.read_text())
            self.storages = {
                n: RemoteSettings.from_wire(s) for n, s in doc.get("storages", {}).items()
            }
            self.uploads = dict(doc.get("uploads", {}))
        for name, settings in self.storages.items():
            base = self._mirror_base(name)
            if base.exists():
                for area_dir in sorted(base.iterdir()):
                    if (area_dir / "pagestore" / "pitr.json").exists():
                        self.mirrors[area_dir.name] = MirrorArea(
                            settings, area_dir.name, area_dir / "pagestore"
                        )

    def _save(self) -> None:
        doc = {
            "storages": {n: s.to_wire() for n, s in self.storages.items()},
            "uploads": self.uploads,
        }
        write_file_durably(self._path, json.dumps(doc, indent=1).encode())

    def _mirror_base(self, storage: str) -> Path:
        return self.workdir / "remote" / storage

    def storage(self, name: str) -> RemoteSettings:
        try:
            return self.storages[name]
        except KeyError:
            raise NotFound(f"the pageserver knows no s3 storage {name!r}") from None

    def remember_storage(self, settings: RemoteSettings) -> None:
        with self._lock:
            self.storages[settings.storage] = settings
            self._save()

    # --- uploads ---------------------------------------------------------------------------

    def begin_upload(
        self, settings: RemoteSettings, area: dict[str, Any], pgdata: str,
        store: Callable[[], NodeStore], *, takeover: bool = False,
    ) -> None:  # fmt: skip
        """Take the area's lease in the bucket (refused if another pageserver writes it,
        unless `takeover`: the next generation is ours, and the old writer stops at its next
        index upload), then upload its history from now on. Blocking: run it in a worker
        thread."""
        name = str(area["name"])
        prefix = area_prefix(settings, name)

        async def take() -> None:
            async with open_bucket(settings) as bucket:
                await acquire(
                    bucket, f"{prefix}/lease.json", self.owner,
                    f"PITR area {name!r} in {settings.url}", takeover=takeover,
                )  # fmt: skip

        asyncio.run(take())
        with self._lock:
            self.storages[settings.storage] = settings
            self.uploads[name] = settings.storage
            self._save()
        self.start_upload(name, area, pgdata, store)

    def start_upload(
        self, name: str, area: dict[str, Any], pgdata: str, store: Callable[[], NodeStore]
    ) -> None:
        settings = self.storage(self.uploads[name])
        uploader = AreaUploader(settings, area, pgdata, store, self.owner)
        self.uploaders[name] = uploader
        uploader.start()

    def end_upload(self, name: str, *, restore: bool = False) -> None:
        """The area is destroyed here: stop uploading (what is in the bucket stays). With
        `restore`, the layers it evicted are fetched back first (raises, the upload going on,
        when it cannot): nothing would read them from the bucket any more."""
        uploader = self.uploaders.get(name)
        if uploader is not None and restore:
            uploader.cache.fetch_all()
        self.uploaders.pop(name, None)
        if uploader is not None:
            uploader.stop()
        with self._lock:
            if self.uploads.pop(name, None) is not None:
                self._save()

    def poke(self, node_id: str | None = None) -> None:
        """The local history changed (a flush, GC): let the uploaders look."""
        for uploader in list(self.uploaders.values()):
            if node_id is None or uploader.area.get("node_id") == node_id:
                uploader.poke()

    def statuses(self) -> list[UploadStatus]:
        return [u.status() for u in list(self.uploaders.values())]

    def stop(self) -> None:
        for uploader in list(self.uploaders.values()):
            uploader.stop()
        self.uploaders.clear()

    # --- attached areas --------------------------------------------------------------------

    def attach(
        self, settings: RemoteSettings, failed: dict[str, NeonError] | None = None
    ) -> list[str]:
        """Know the storage; attach, read-only, every PITR area of the bucket this pageserver
        does not write itself and has not attached yet (one LIST of the areas, then one GET of
        each new area's index): called again, it finds the areas created since. An area that
        cannot be read (damaged, unreachable, rewritten under every read) is not attached and
        its files here are removed; with `failed`, it is said there (name -> error) and the
        others are attached, else its error is raised."""
        self.remember_storage(settings)

        async def areas() -> list[str]:
            async with open_bucket(settings) as bucket:
                return await bucket.list_dirs(settings.key("pitr") + "/")

        attached = []
        for name in asyncio.run(areas()):
            if self.uploads.get(name) == settings.storage:
                continue
            known = self.mirrors.get(name)
            if known is not None and known.settings.storage == settings.storage:
                continue  # attached already: refreshed when an extraction reads it
            mirror = MirrorArea(
                settings, name, self._mirror_base(settings.storage) / name / "pagestore"
            )
            try:
                mirror.refresh()
            except NeonError as exc:
                # Half laid out, it would come back as attached at the next start.
                shutil.rmtree(mirror.root.parent, ignore_errors=True)
                if isinstance(exc, NotFound):
                    continue  # an area whose first index is not uploaded yet
                if failed is None:
                    raise
                failed[name] = exc
                continue
            self.mirrors[name] = mirror
            attached.append(name)
        return attached

    def forget_mirror(self, name: str) -> MirrorArea | None:
        """Stop reading area `name` from its bucket (this pageserver takes it over): its
        layout here is deleted (nodes made from its snapshots hold their own links)."""
        mirror = self.mirrors.pop(name, None)
        if mirror is not None:
            shutil.rmtree(mirror.root.parent, ignore_errors=True)
        return mirror

    def detach(self, storage: str) -> None:
        for name, mirror in list(self.mirrors.items()):
            if mirror.settings.storage == storage:
                del self.mirrors[name]
        with self._lock:
            self.storages.pop(storage, None)
            self._save()

    def mirror_of_root(self, root: Path) -> MirrorArea | None:
        for mirror in self.mirrors.values():
            if mirror.root == root:
                return mirror
        return None

    # --- usage -----------------------------------------------------------------------------

    def usage(self) -> list[StorageUsage]:
        out = []
        for name in sorted(self.storages):
            uploading = [u for u in self.uploaders.values() if u.settings.storage == name]
            attached = [
                m for m in self.mirrors.values()
                if m.settings.storage == name and m.name not in self.uploaders
            ]  # fmt: skip
            used = sum(u.remote.total_bytes for u in uploading if u.remote is not None)
            used += sum(m.index.total_bytes for m in attached if m.index is not None)
            out.append(
                StorageUsage(
                    name, used, tuple(u.name for u in uploading), tuple(m.name for m in attached)
                )
            )
        return out

    def status_wire(self) -> dict[str, Any]:
        return {
            "uploads": [asdict(s) for s in self.statuses()],
            "storages": [asdict(u) for u in self.usage()],
        }
