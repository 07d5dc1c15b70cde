"""The pageserver's shared state, independent of which protocol asks for it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pageserver.api.import_paths import check_import_dir, check_import_file, check_outside
from pageserver.api.metrics import Metrics
from pageserver.api.own_thread import on_own_thread
from pageserver.basebackup.prepared_pages import PreparedPages, prepare_checkout
from pageserver.basebackup.sources import TimelineSource
from pageserver.basebackup.wal_synthesis import normalize_lsn
from pageserver.config import PageserverConfig
from pageserver.follow.followed_nodes import FollowedNode, FollowedNodes
from pageserver.follow.node_follower import NodeFollower
from pageserver.history.collect_garbage import ON_REQUEST, collect_garbage
from pageserver.history.imported import (
    ImportedRoots,
    forget_imported_snapshot,
    name_imported_snapshot,
)
from pageserver.history.node_store import NodeStore, StorageHistory
from pageserver.history.pitr import PitrArea, new_area
from pageserver.history.pitr_commits import XactListing, node_xacts
from pageserver.history.pitr_extract import area_retention, extraction_lsn
from pageserver.history.snapshot_diff import DifferentHistories, DiffStat, ReadPoint, diff_stat
from pageserver.history.snapshots import (
    IMPORTED_NODE_ID,
    Snapshot,
    check_import_name,
    check_user_tag,
    is_user_snapshot,
    new_snapshot,
    split_snapshot_name,
)
from pageserver.history.usage import Retained, storage_usage
from pageserver.ingest.import_datadir import import_datadir
from pageserver.ingest.import_delta import import_delta, import_delta_file
from pageserver.ingest.live_journal import journal_path
from pageserver.reconstruct.reads import get_node_metadata, materialize
from pageserver.reconstruct.redo_pool import RedoPool
from pageserver.remote.adopt import adopt_snapshot
from pageserver.remote.manager import RemoteHistories
from pageserver.remote.mirror import MirrorArea
from pageserver.remote.settings import RemoteSettings
from pageserver.storage.gc import DEFAULT_GC_SETTINGS
from pageserver.storage.timeline import Timeline
from pg15.lsn import DEFAULT_SEGMENT_SIZE, format_lsn
from proto.errors import (
    AlreadyExists,
    Conflict,
    InvalidArgument,
    NeonError,
    NotFound,
    Unavailable,
)

log = logging.getLogger(__name__)
VERSION = "0.1.0"


class Pageserver:
    def __init__(self, config: PageserverConfig) -> None:
        self.config = config
        self.started_at = time.time()
        self.metrics = Metrics()
        self.nodes = FollowedNodes(config.nodes_file)
        self.followers: dict[str, NodeFollower] = {}
        self.stores: dict[str, NodeStore] = {}
        self.histories: dict[str, StorageHistory] = {}
        self.redo_pool = RedoPool()
        self.imported_roots = ImportedRoots(config.workdir / "imported_histories.json")
        self.remote = RemoteHistories(config.workdir)
        self._mirror_stores: dict[str, NodeStore] = {}
        settings = config.store_settings
        self.prepared_pages = PreparedPages(
            settings.prepared_pages_bytes, settings.prepared_pages_seconds
        )
        """Checkout targets' pages rebuilt ahead of their delta (prepare_checkout)."""
        m = self.metrics
        m.describe("pageserver_up", "gauge", "1 while the pageserver serves.")
        m.set("pageserver_up", 1)
        m.describe("pageserver_uptime_seconds", "gauge", "Seconds since start.")
        m.computed("pageserver_uptime_seconds", lambda: time.time() - self.started_at)
        m.describe("pageserver_followed_nodes", "gauge", "PostgreSQL nodes followed.")
        m.computed("pageserver_followed_nodes", lambda: len(self.nodes.all()))
        m.describe("pageserver_proto_requests_total", "counter", "Proto requests by method.")
        m.describe("pageserver_http_requests_total", "counter", "HTTP requests by path.")
        m.describe(
            "pageserver_prepared_pages_used_total",
            "counter",
            "Checkout delta pages taken from those rebuilt ahead (prepared_pages.py).",
        )
        m.describe(
            "pageserver_prepared_pages_bytes",
            "gauge",
            "Bytes of pages rebuilt ahead, not taken yet, and of the forks being rebuilt.",
        )
        m.computed("pageserver_prepared_pages_bytes", lambda: self.prepared_pages.held_bytes)
        m.describe(
            "pageserver_prepared_pages_prepares_total",
            "counter",
            "Checkout prepares that ended (done, stopped or failed).",
        )
        m.computed(
            "pageserver_prepared_pages_prepares_total",
            lambda: self.prepared_pages.prepares_ended,
        )
        m.describe("pageserver_wal_received_bytes_total", "counter", "Durable WAL bytes per node.")
        m.describe("pageserver_wal_records_total", "counter", "WAL records decoded per node.")
        m.describe(
            "pageserver_ingest_stopped",
            "gauge",
            "1 while a node's WAL ingest is stopped on an error (see /v1/status), else 0.",
        )
        m.describe("pageserver_wal_flushed_lsn", "gauge", "WAL received and made durable (LSN).")
        m.describe(
            "pageserver_wal_ingested_lsn", "gauge", "WAL decoded and stored as page history (LSN)."
        )
        m.describe(
            "pageserver_ingest_lag_bytes",
            "gauge",
            "WAL received but not yet in the page history (flushed - ingested).",
        )
        m.describe(
            "pageserver_remote_upload_lag_bytes",
            "gauge",
            "Per PITR area on s3: durable page history not yet in the bucket's index (LSN bytes).",
        )
        m.describe(
            "pageserver_remote_uploaded_lsn", "gauge", "Per PITR area: the bucket index's LSN."
        )
        m.describe(
            "pageserver_remote_pending_bytes", "gauge", "Per PITR area: bytes queued for upload."
        )
        m.describe(
            "pageserver_remote_upload_errors",
            "gauge",
            "Per PITR area: 1 while its last upload attempt failed (see `neon storage show`).",
        )
        m.describe(
            "pageserver_remote_uploaded_bytes_total", "counter", "Per PITR area: bytes uploaded."
        )
        m.describe(
            "pageserver_remote_cache_resident_bytes",
            "gauge",
            "Per PITR area on a remote storage: layer files on disk (see -c local_cache).",
        )
        m.describe(
            "pageserver_remote_evicted_layers", "gauge", "Per PITR area: layers evicted from disk."
        )
        m.describe(
            "pageserver_remote_fetched_bytes_total",
            "counter",
            "Per PITR area: bytes of evicted layers downloaded again for reads.",
        )

    # following nodes

    def start_following(self) -> None:
        """Start a follower for every registered node (needs the running event loop)."""
        for node in self.nodes.all():
            self._follow(node)
        self._start_remote()

    def _start_remote(self) -> None:
        """Open the attached remote histories and resume the uploads of PITR areas on s3."""
        for mirror in self.remote.mirrors.values():
            self.history(mirror.root)
        for name in list(self.remote.uploads):
            try:
                _store, area = self._area(name)
            except NotFound:
                self.remote.end_upload(name)
                continue
            self.remote.start_upload(
                name, asdict(area), self._pgdata(area.node_id), self._store_of(area.node_id)
            )

    def _store_of(self, node_id: str) -> Callable[[], NodeStore]:
        return lambda: self.store(node_id)

    def _pgdata(self, node_id: str) -> str:
        return self.nodes.get(node_id).pgdata or node_id

    def store_dir(self, node: FollowedNode) -> Path:
        if node.store_dir:
            return Path(node.store_dir)
        return self.config.workdir / "pagestore"

    def history(self, root: Path) -> StorageHistory:
        key = str(root)
        history = self.histories.get(key)
        if history is None:
            history = StorageHistory(root, self.config.store_settings)
            self.histories[key] = history
        return history

    def store(self, node_id: str) -> NodeStore:
        store = self.stores.get(node_id)
        if store is None:
            node = self.nodes.get(node_id)
            store = NodeStore(self.history(self.store_dir(node)), node_id)
            self.stores[node_id] = store
        return store

    def _follow(self, node: FollowedNode) -> NodeFollower:
        follower = NodeFollower(node, self.store(node.node_id), self.metrics)
        self.followers[node.node_id] = follower
        follower.start()
        return follower

    async def _refollow(self, node_id: str) -> None:
        """Restart a node's follower: its timeline (hence its WAL archive) changed."""
        follower = self.followers.pop(node_id, None)
        if follower is not None:
            await follower.stop()
        self._follow(self.nodes.get(node_id))

    async def stop_following(self) -> None:
        """Stop every follower, then close the stores (a running compaction is cancelled,
        everything ingested is flushed: a clean restart re-ingests nothing)."""
        for follower in list(self.followers.values()):
            await follower.stop()
        self.followers.clear()
        for store in list(self.stores.values()):
            await asyncio.to_thread(store.close)
        self.stores.clear()
        self.remote.stop()
        for history in self.histories.values():
            history.close()
        self.histories.clear()
        await asyncio.to_thread(self.redo_pool.close)

    def follower(self, node_id: str) -> NodeFollower:
        try:
            return self.followers[node_id]
        except KeyError:
            raise NotFound(f"the pageserver does not follow node {node_id!r}") from None

    async def register_node(self, node: FollowedNode) -> dict[str, Any]:
        """Follow a node, or (same node again, e.g. on `pg start`) reconnect to it now; a
        paused node is resumed."""
        current = self.followers.get(node.node_id)
        if current is not None and current.node == node:
            if current.node.paused:
                self.nodes.add(node)  # registered again: no longer paused
            current.resume()
            return current.status()
        if current is not None:
            await current.stop()
        self.nodes.add(node)
        self.stores.pop(node.node_id, None)
        return self._follow(node).status()

    async def pause_node(self, node_id: str, wal_tail: bool = False) -> dict[str, Any]:
        """The node is being stopped: take its last WAL, then connect no more until it is
        registered again (`pg start`); kept across pageserver restarts. Answers once the
        stream that takes that WAL is open (NodeFollower.pause), or, where that WAL is
        taken from the node's pg_wal (`wal_tail`), once the stream is told to end."""
        node = replace(self.nodes.get(node_id), paused=True)
        self.nodes.add(node)
        follower = self.followers.get(node_id)
        if follower is None:
            return node.public()
        await follower.pause(wal_tail)
        return follower.status()

    async def disconnect_node(self, node_id: str) -> dict[str, Any]:
        """Pause a node at once: its receiver is stopped now, not at the stream's end (an
        attached server being detached; its history stays)."""
        node = replace(self.nodes.get(node_id), paused=True)
        self.nodes.add(node)
        follower = self.followers.pop(node_id, None)
        if follower is not None:
            await follower.stop()
        return self._follow(node).status()

    async def unregister_node(self, node_id: str) -> dict[str, Any]:
        """Stop following a node and drop its state, WAL, snapshots and PITR areas, and the
        timelines only it needed (another node's branch or snapshot keeps theirs)."""
        node = self.nodes.get(node_id)
        follower = self.followers.pop(node_id, None)
        if follower is not None:
            await follower.stop()
        store = self.store(node_id)
        for area in store.history.pitr.all():
            if area.node_id == node_id:  # an area follows one node's history
                store.history.pitr.remove(area.name)
                # Its uploads stop; what is in the bucket stays (the history of a lost node).
                try:  # layers it evicted that other nodes' timelines read through come back
                    await asyncio.to_thread(self.remote.end_upload, area.name, restore=True)
                except NeonError as exc:
                    log.warning("destroying %s: evicted layers not fetched back: %s", node_id, exc)
                    await asyncio.to_thread(self.remote.end_upload, area.name)
        current = store.state.timeline_id if store.state is not None else None
        await asyncio.to_thread(store.forget)
        others = [
            s.state.timeline_id
            for s in (self.store(n.node_id) for n in self.nodes.all() if n.node_id != node_id)
            if s.state is not None and s.history is store.history
        ]
        await asyncio.to_thread(store.history.drop_node, node_id, current, others)
        self.stores.pop(node_id, None)
        self.nodes.remove(node_id)
        return node.public()

    async def import_node(self, node_id: str, datadir: Path, at_lsn: int | None = None) -> int:
        """Import a node's cleanly shut-down data directory before its first start (or an
        attached server's recovered base backup at its end LSN: NodeStore.import_datadir)."""
        store = self.store(node_id)
        # Whoever holds the token names the directory: never one of ours, never a FIFO/link.
        check_outside(
            datadir, self._own_dirs(self.store_dir(self.nodes.get(node_id))), "a data directory"
        )
        check_import_dir(datadir)
        # A thread of its own: a whole data directory's import (pageserver/api/own_thread.py).
        lsn = await on_own_thread("import-node", store.import_datadir, datadir, at_lsn)
        await self._refollow(node_id)
        return lsn

    # snapshots and branches

    def _snapshot_lsn_now(self, node_id: str) -> tuple[NodeStore, int]:
        store = self.store(node_id)
        return store, store.timeline.last_record_lsn

    async def create_snapshot(
        self, node_id: str, name: str, wait_lsn: int | None, timeout: float
    ) -> Snapshot:
        """Name the current record boundary once ingest reached `wait_lsn`."""
        split_snapshot_name(name)
        if wait_lsn is not None:
            await self.wait_for_lsn(node_id, wait_lsn, timeout)
        store, lsn = self._snapshot_lsn_now(node_id)
        state = store.state
        assert state is not None
        snap = store.history.snapshots.add(
            new_snapshot(name, node_id, state.timeline_id, lsn, parent=state.parent)
        )
        if is_user_snapshot(name):  # a checkout's HEAD{i}: no pass while it runs
            threading.Thread(
                target=_images_at, args=(store, lsn), name="snapshot-images", daemon=True
            ).start()
        return snap

    def prepare_checkout(self, node_id: str, history: StorageHistory, snap: Snapshot) -> None:
        """Begin rebuilding, on a thread, the target's pages `node_id`'s checkout to `snap`
        will want (pageserver/basebackup/prepared_pages.py), after handing what the node
        ingested to the background flusher (`NodeStore.flush_ahead`: also where prepared
        pages are off). No pages where its delta could not take them or they could change:
        the node in another storage or without history, a snapshot held in a bucket, its
        timeline not (re-)ingested to it yet, or its store not open (opening one reads its
        files: not on the event loop this runs on; a followed node's is open). Never raises:
        the delta rebuilds what it does not find."""
        store = self.stores.get(node_id)
        if store is None:
            return

        def checked() -> None:  # reads files (a target timeline opened): off the event loop
            try:
                store.flush_ahead()  # the node's ingested WAL written while it stops
            except (NeonError, OSError) as exc:
                log.warning("checkout of node %s: early flush not begun: %s", node_id, exc)
            except Exception:  # a bug: logged, and the pages are prepared all the same
                log.exception("checkout of node %s: early flush failed", node_id)
            if not self.prepared_pages.enabled:
                return
            try:
                if store.state is None or store.history is not history:
                    return
                if self.remote.mirror_of_root(history.root) is not None:
                    return
                target = history.timelines.get(snap.timeline_id)
                if target.last_record_lsn < snap.lsn:
                    return
                current = store.timeline
            except (NeonError, OSError):
                return
            prepare_checkout(self.prepared_pages, current, target, snap.lsn)

        threading.Thread(target=checked, name="prepare-pages", daemon=True).start()

    def find_snapshot(self, name: str) -> tuple[StorageHistory, Snapshot]:
        for node in self.nodes.all():
            history = self.history(self.store_dir(node))
            snap = history.snapshots.find(name)
            if snap is not None:
                return history, snap
        for root in self.imported_roots.all():
            self.history(root)
        for history in self.histories.values():
            snap = history.snapshots.find(name)
            if snap is not None:
                return history, snap
        raise NotFound(f"snapshot {name!r} does not exist; see `neon snapshot list`")

    def list_snapshots(self) -> list[dict[str, Any]]:
        seen: set[str] = set()
        out: list[dict[str, Any]] = []
        roots = [self.store_dir(node) for node in self.nodes.all()]
        mirrors = [m.root for m in self.remote.mirrors.values()]
        for root in roots + self.imported_roots.all() + mirrors:
            history = self.history(root)
            if str(history.root) in seen:
                continue
            seen.add(str(history.root))
            mirror = self.remote.mirror_of_root(history.root)
            for snap in history.snapshots.all():
                size = history.bytes_needed(snap.timeline_id, snap.lsn)
                if mirror is not None:
                    needed = (
                        mirror.needed_layers(snap.lsn, timeline=snap.timeline_id)
                        if mirror.index is not None
                        else {}
                    )
                    size = sum(o.size for o in needed.values())
                out.append(
                    {
                        **asdict(snap),
                        "size_bytes": size,
                        "storage": None if mirror is None else mirror.settings.storage,
                    }
                )
        return out

    async def import_snapshot(
        self, name: str, datadir: Path, store_dir: Path, abandoned: Callable[[], bool],
        origin: str | None = None, neon_file: Path | None = None, label: str | None = None,
        fetching: bool = False,
    ) -> Snapshot:  # fmt: skip
        """Import a cleanly shut-down data directory as snapshot `name` on a new root timeline
        of the storage; on any failure, or if the caller is gone by the end (`abandoned`: an
        interrupted `snapshot import`), the timeline is deleted and no snapshot appears.
        `origin`: the manifest of the `.neon` file it came from (see Snapshot.origin); with
        `neon_file`, that whole file is read here, its small files extracted into `datadir`
        (pageserver/ingest/import_neon.py; `label` names it in errors; `fetching`: the
        caller is still writing it)."""
        check_import_name(name)
        self._check_name_free(name)
        own = self._own_dirs(store_dir)
        if neon_file is not None:
            _check_neon_file_import(neon_file, datadir, store_dir, own)
        else:
            check_outside(datadir, own, "a data directory")
            # A live import's directory may still be on its way: its journal is there.
            check_import_dir(datadir, missing_ok=os.path.lexists(journal_path(datadir)))
        history = self.history(store_dir)
        timeline = history.timelines.create_timeline(importing=True)
        self.imported_roots.remember(store_dir)
        if neon_file is not None:
            from pageserver.ingest.import_neon import NeonSource, import_neon_file

            path, shown = neon_file, label or str(neon_file)

            def write(t: Timeline) -> int:
                source = NeonSource(path, shown, fetching, abandoned)
                return import_neon_file(t, source, datadir, origin)
        else:

            def write(t: Timeline) -> int:
                return import_datadir(t, datadir)

        return await self._import_onto(history, timeline, name, origin, abandoned, write)

    async def import_delta_snapshot(
        self, name: str, datadir: Path, parent: str, origin: str, abandoned: Callable[[], bool],
        neon_file: Path | None = None, label: str | None = None, fetching: bool = False,
        work_store: Path | None = None,
    ) -> Snapshot:  # fmt: skip
        """Import a delta's extracted tar as snapshot `name` on a new branch of snapshot
        `parent` (pageserver/ingest/import_delta.py); on any failure, or if the caller is gone
        by the end, the branch is deleted and no snapshot appears. With `neon_file`, the
        delta file itself is read here (`fetching`: as the caller writes it), its small
        files extracted into `datadir` (absent or empty), in a work directory of the storage
        whose page history is `work_store` (default: the parent's)."""
        check_import_name(name)
        self._check_name_free(name)
        history, base = self.find_snapshot(parent)
        own = self._own_dirs(history.root)
        write: Callable[[Timeline], int]
        if neon_file is not None:
            from pageserver.ingest.import_neon import NeonSource

            store = history.root if work_store is None else work_store
            _check_neon_file_import(neon_file, datadir, store, [*own, store])
            source = NeonSource(neon_file, label or str(neon_file), fetching, abandoned)

            def write(t: Timeline) -> int:
                return import_delta_file(t, source, datadir, origin)
        else:
            check_outside(datadir, own, "a delta")
            check_import_dir(datadir)

            def write(t: Timeline) -> int:
                return import_delta(t, datadir)

        timeline = await self._branch_at(history, base)
        return await self._import_onto(history, timeline, name, origin, abandoned, write)

    async def _import_onto(
        self, history: StorageHistory, timeline: Timeline, name: str, origin: str | None,
        abandoned: Callable[[], bool], write: Callable[[Timeline], int],
    ) -> Snapshot:  # fmt: skip
        """`write` an import onto the new `timeline` (it returns the LSN to read it at) and
        name it; on any failure, or if the caller is gone by the end, the timeline is deleted
        and no snapshot appears."""

        def write_all(t: Timeline) -> int:
            lsn = write(t)
            t.freeze_and_flush()
            return lsn

        try:
            # A thread of its own, not the default executor's: a `.neon` file is read as its
            # pusher sends it, for as long as that lasts (pageserver/api/own_thread.py).
            lsn = await on_own_thread("import", write_all, timeline)
            if abandoned():
                raise Unavailable(f"the import of snapshot {name!r} was abandoned by its caller")
            # Its directory fsync took 0.37 s on a busy disk: not on the event loop. The name
            # is checked and taken after it, with no await between (another import's name).
            await asyncio.to_thread(history.timelines.complete_import, timeline.timeline_id)
            self._check_name_free(name)
            return name_imported_snapshot(history, name, timeline.timeline_id, lsn, origin)
        except BaseException:
            await asyncio.to_thread(history.timelines.delete_timeline, timeline.timeline_id)
            raise

    def _own_dirs(self, store_dir: Path) -> list[Path]:
        """Where an import's files may not be: the work directory and every page history
        this pageserver keeps (`store_dir`, the one imported into, included)."""
        roots = [self.config.workdir, store_dir, *self.imported_roots.all()]
        roots += [self.store_dir(node) for node in self.nodes.all()]
        return roots + [Path(root) for root in self.histories]

    def _check_name_free(self, name: str) -> None:
        with contextlib.suppress(NotFound):
            self.find_snapshot(name)
            raise AlreadyExists(
                f"snapshot {name!r} already exists; choose another name or "
                f"`neon snapshot destroy {name}` first"
            )

    def diff_snapshots(self, a: str, b: str) -> tuple[Snapshot, Snapshot, DiffStat]:
        """The pages that differ from snapshot `a` to `b`, per relation (one history only:
        snapshots of different storages or imported histories share no pages)."""
        history_a, snap_a = self._snapshot_or_current(a)
        history_b, snap_b = self._snapshot_or_current(b)
        try:
            if history_a is not history_b:
                raise DifferentHistories("they live in different storages")
            stat = diff_stat(
                ReadPoint(history_a.timelines.get(snap_a.timeline_id), snap_a.lsn),
                ReadPoint(history_b.timelines.get(snap_b.timeline_id), snap_b.lsn),
                lambda t, key, lsn: materialize(t, key, lsn, self.redo_pool.reconstruct),
            )
        except DifferentHistories as exc:
            raise DifferentHistories(
                f"snapshots {a!r} and {b!r} are not of one history ({exc}): --stat compares "
                f"page history; compare them with `neon snapshot diff {a} {b} --schema` or "
                "`--data`"
            ) from None
        return snap_a, snap_b, stat

    def _snapshot_or_current(self, name: str) -> tuple[StorageHistory, Snapshot]:
        """A snapshot, or `PGDATA@CURRENT`: a node's state as far as it is ingested."""
        ref, sep, tag = name.rpartition("@")
        node = next((n for n in self.nodes.all() if ref in (n.node_id, n.pgdata)), None)
        if not sep or tag != "CURRENT" or node is None:
            return self.find_snapshot(name)
        store, lsn = self._snapshot_lsn_now(node.node_id)
        if store.state is None:
            raise NotFound(f"node {node.node_id} has no page history yet")
        state = store.state
        return store.history, new_snapshot(name, node.node_id, state.timeline_id, lsn, state.parent)

    def destroy_snapshot(self, name: str) -> Snapshot:
        """Forget a snapshot; an imported one takes its history along when nothing else
        (another snapshot, a branch) uses that timeline."""
        history, snap = self.find_snapshot(name)
        removed = history.snapshots.remove(snap.name)
        forget_imported_snapshot(history, snap)
        return removed

    async def branch_node(
        self,
        node_id: str,
        snapshot: str,
        *,
        pg_timeline: int | None,
        checkout: bool,
    ) -> dict[str, Any]:
        """Point a node at a new timeline branched from a snapshot (checkout, or a node created
        from a snapshot); returns where its WAL decoding starts."""
        history, snap = self.find_snapshot(snapshot)
        store = self.store(node_id)
        mirror = self.remote.mirror_of_root(history.root)
        if mirror is not None and store.history is not history:  # held in a bucket
            # Its layers download: a thread of its own (pageserver/api/own_thread.py).
            await on_own_thread("adopt", self._adopt_from_bucket, mirror, snap, store.history)
            history = store.history
        if store.history is not history:
            raise InvalidArgument(
                f"snapshot {snapshot!r} lives in storage {history.root}, node {node_id} in "
                f"{store.history.root}; branch within one storage"
            )
        history.timelines.get(snap.timeline_id)  # NotFound before any wait
        await self._wait_reingested(snap)
        timeline = await self._branch_at(history, snap)
        segment_size = self._segment_size(history, snap)
        old = store.state
        tli = pg_timeline if pg_timeline is not None else (old.pg_timeline + 1 if old else 1)
        decode_from = normalize_lsn(snap.lsn, segment_size)
        state = await asyncio.to_thread(
            store.switch_to_branch,
            timeline,
            decode_from=decode_from,
            pg_timeline=tli,
            segment_size=segment_size,
            parent=snapshot,
            checkout=checkout,
        )
        await self._refollow(node_id)
        return {**asdict(state), "lsn": snap.lsn}

    def _adopt_from_bucket(self, mirror: MirrorArea, snap: Snapshot, into: StorageHistory) -> None:
        """Download the layers a read at the snapshot needs and lay its timelines out in the
        node's storage (pageserver/remote/adopt.py), so the node branches there."""
        self._prepare_mirror(mirror, snap.lsn, None, exact=True, timeline=snap.timeline_id)
        adopt_snapshot(mirror, snap, into)

    async def checkout_target_ready(self, snapshot: str) -> None:
        """Before a checkout's delta is read from its target snapshot while the node's branch
        is made: one named before a restart is re-ingested first, as the branch waits for it
        (`_wait_reingested`); one held in a bucket is refused (InvalidArgument, nothing read:
        the branch adopts it into the node's storage, downloading its layers under the
        mirror's rules, and the CLI then asks the delta of the node's branch point)."""
        history, snap = self.find_snapshot(snapshot)
        if self.remote.mirror_of_root(history.root) is not None:
            raise InvalidArgument(
                f"snapshot {snapshot!r} is held in a bucket: its checkout's delta is read from "
                "the node's branch point once the branch has adopted it"
            )
        await self._wait_reingested(snap)

    async def _wait_reingested(self, snap: Snapshot, timeout: float = 120.0) -> None:
        """After a restart, a node's follower re-ingests the archived WAL its layers did not
        hold yet: a snapshot named before the restart may lie ahead of what its timeline has
        now. Wait for it, rather than refuse to branch there (a checkout the pageserver's
        death interrupted is rolled forward so)."""
        store = self._ingesting_store(snap)
        if store is not None and store.timeline.last_record_lsn < snap.lsn:
            await self.wait_for_lsn(snap.node_id, snap.lsn, timeout)

    def _ingesting_store(self, snap: Snapshot) -> NodeStore | None:
        """The store of the node that still ingests the snapshot's timeline, if one does."""
        if snap.node_id == IMPORTED_NODE_ID:
            return None
        try:
            store = self.store(snap.node_id)
        except NotFound:
            return None  # its node is gone: nothing ingests that timeline any more
        state = store.state
        if state is None or state.timeline_id != snap.timeline_id:
            return None  # an older timeline of the node: complete since it was left
        return store

    async def _branch_at(self, history: StorageHistory, snap: Snapshot) -> Timeline:
        """A new timeline branched at the snapshot, in `history`; a node still ingesting the
        snapshot's timeline makes it durable first, its LSN index included (NodeStore.branch)."""
        owner = self._ingesting_store(snap)
        if owner is not None and owner.history is history:
            return await asyncio.to_thread(owner.branch, snap.timeline_id, snap.lsn)
        return await asyncio.to_thread(history.timelines.branch, snap.timeline_id, snap.lsn)

    # PITR areas and GC

    def _area(self, name: str) -> tuple[NodeStore, PitrArea]:
        for history in {id(h): h for h in self._all_histories()}.values():
            area = history.pitr.find(name)
            if area is not None:
                return self._area_store(history, area), area
        raise NotFound(f"PITR area {name!r} does not exist; see `neon pitr list`")

    def _area_store(self, history: StorageHistory, area: PitrArea) -> NodeStore:
        """The node store an area reads: its node's, or for an area attached from a bucket,
        the store of its history here (pageserver/remote/mirror.py)."""
        mirror = self.remote.mirror_of_root(history.root)
        if mirror is None:
            return self.store(area.node_id)
        store = self._mirror_stores.get(str(history.root))
        if store is None or store.history is not history:
            store = NodeStore(history, area.node_id)
            self._mirror_stores[str(history.root)] = store
        return store

    def _reload_mirror(self, mirror: MirrorArea) -> NodeStore:
        """After the mirror's files changed: timelines and LSN index read afresh."""
        history = self.history(mirror.root)
        history.timelines.close()
        self._mirror_stores.pop(str(history.root), None)
        return self._area_store(history, history.pitr.get(mirror.name))

    def _prepare_mirror(
        self, mirror: MirrorArea, lsn: int | None, at: datetime | None, *, exact: bool = False,
        timeline: str | None = None,
    ) -> None:  # fmt: skip
        """Read the bucket's index again and download what an extraction needs (`exact`: at a
        record end already, e.g. a snapshot's LSN: no WAL)."""
        try:
            mirror.refresh()
        except Unavailable:
            if mirror.index is None:
                raise
        store = self._reload_mirror(mirror)
        assert mirror.index is not None
        if at is not None:  # a commit's end: a record end
            lsn, exact = store.index.lsn_for_time(at), True
        if lsn is not None:
            top = mirror.index.disk_consistent_lsn
            mirror.prepare(min(lsn, top), exact=exact and lsn <= top, timeline=timeline)
            self._reload_mirror(mirror)

    def _all_histories(self) -> list[StorageHistory]:
        for node in self.nodes.all():
            self.history(self.store_dir(node))
        return list(self.histories.values())

    def pitr_create(
        self, name: str, node_id: str, ttl: str, size_limit: str,
        remote: dict[str, Any] | None = None, takeover: bool = False,
    ) -> PitrArea:  # fmt: skip
        """A PITR area; with `remote` (an s3 storage's settings), its history is also kept in
        that bucket (the lease taken first: refused when another pageserver writes it).
        Blocking when remote: run it in a worker thread."""
        store = self.store(node_id)
        if store.state is None:
            raise NotFound(f"node {node_id} has no page history yet")
        mirror = self.remote.mirrors.get(name)
        if takeover and mirror is not None:  # read from the bucket until now: written from here
            opened = self.histories.pop(str(mirror.root), None)
            if opened is not None:
                opened.close()
            self._mirror_stores.pop(str(mirror.root), None)
            self.remote.forget_mirror(name)
        for history in self._all_histories():
            if history.pitr.find(name) is not None:
                raise AlreadyExists(f"PITR area {name!r} already exists")
        area = new_area(name, node_id, ttl, size_limit)
        if remote is not None:
            settings = RemoteSettings.from_wire(remote)
            self.remote.begin_upload(
                settings, asdict(area), self._pgdata(node_id), self._store_of(node_id),
                takeover=takeover,
            )  # fmt: skip
        return store.history.pitr.add(area)

    def pitr_destroy(self, name: str) -> PitrArea:
        store, area = self._area(name)
        if self.remote.mirror_of_root(store.history.root) is not None:
            raise Conflict(
                f"PITR area {name!r} is attached read-only from its bucket; it is destroyed "
                "by the pageserver that writes it"
            )
        self.remote.end_upload(area.name, restore=True)  # its evicted layers back first
        return store.history.pitr.remove(area.name)

    def pitr_storage(self, name: str) -> str | None:
        """The s3 storage an area is kept in (uploaded or attached from), if any."""
        if name in self.remote.uploads:
            return self.remote.uploads[name]
        mirror = self.remote.mirrors.get(name)
        return None if mirror is None else mirror.settings.storage

    def pitr_list(self) -> list[dict[str, Any]]:
        out = []
        now = datetime.now(UTC)
        for history in self._all_histories():
            for area in history.pitr.all():
                retention = area_retention(self._area_store(history, area), area, now)
                start = retention.window_start if retention.window_start is not None else 0
                out.append(
                    {
                        **asdict(area),
                        "from_lsn": start,
                        "to_lsn": retention.tip,
                        "storage": self.pitr_storage(area.name),
                    }
                )
        return out

    def pitr_extract(
        self, name: str, *, lsn: int | None, at: datetime | None, tag: str | None
    ) -> Snapshot:
        """A snapshot at the last record boundary at or below `lsn` (or the last commit at or
        before `at`) inside the area."""
        store, area = self._area(name)
        mirror = self.remote.mirror_of_root(store.history.root)
        follower = self.followers.get(area.node_id) if mirror is None else None
        if mirror is not None:
            self._prepare_mirror(mirror, lsn, at)
            store = self._reload_mirror(mirror)
        snapped = extraction_lsn(
            store,
            area,
            lsn=lsn,
            at=at,
            now=datetime.now(UTC),
            check_ingesting=follower.check_ingesting if follower is not None else None,
            read_wal=mirror.wal_reader() if mirror is not None else None,
        )
        node_name = tag or f"pitr-{snapped:X}"
        check_user_tag(node_name)
        if mirror is not None and mirror.index is not None:
            pgdata = mirror.index.pgdata
        else:
            pgdata = self._pgdata(area.node_id)
        state = store.state
        assert state is not None
        return store.history.snapshots.add(
            new_snapshot(
                f"{pgdata}@{node_name}", area.node_id, state.timeline_id, snapped, state.parent
            )
        )

    def pitr_commits(
        self, node_id: str, *, lsn: int | None, at: datetime | None, limit: int
    ) -> tuple[XactListing, str]:
        """The transaction records around a point of a node's current timeline, and that
        timeline's ID."""
        store = self.store(node_id)
        listing = node_xacts(store, lsn=lsn, at=at, limit=limit)
        assert store.state is not None
        return listing, store.state.timeline_id

    def storage_usage(self, root: Path) -> list[Retained]:
        """What each snapshot and PITR area of the storage whose history is at `root` keeps
        (nothing when it holds no history: the directory is not made)."""
        if not root.is_dir():
            return []
        history = self.history(root)
        stores = [self.store(n.node_id) for n in self.nodes.all()]
        return storage_usage(history, stores, datetime.now(UTC))

    def gc_history(self, history: StorageHistory, on_request: bool = False) -> dict[str, Any]:
        """Remove layers and archived WAL that no snapshot, PITR area, child or tip needs."""
        stores = [self.store(n.node_id) for n in self.nodes.all()]
        settings = ON_REQUEST if on_request else DEFAULT_GC_SETTINGS
        return asdict(collect_garbage(history, stores, datetime.now(UTC), settings))

    async def gc_all(self, on_request: bool = False) -> list[dict[str, Any]]:
        """GC of every storage; `on_request` (`neon pitr gc`) frees what it can now."""
        results = [
            await asyncio.to_thread(self.gc_history, history, on_request)
            for history in self._all_histories()
            if self.remote.mirror_of_root(history.root) is None  # read-only here
        ]
        self.remote.poke()  # GC removed files: the next indexes stop naming them
        return results

    @staticmethod
    def _segment_size(history: StorageHistory, snap: Snapshot) -> int:
        timeline = history.timelines.get(snap.timeline_id)
        meta = get_node_metadata(timeline, snap.lsn) or {}
        return int(meta.get("wal_segment_size", DEFAULT_SEGMENT_SIZE))

    def basebackup_source(
        self, node_id: str | None, snapshot: str | None
    ) -> tuple[TimelineSource, int | None]:
        """What to extract: a snapshot, or a node's current timeline at its branch point. Call
        off the event loop: a snapshot held in a bucket downloads its layers here."""
        if snapshot is not None:
            history, snap = self.find_snapshot(snapshot)
            mirror = self.remote.mirror_of_root(history.root)
            if mirror is not None:  # a snapshot listed in a bucket: its layers come down first
                self._prepare_mirror(mirror, snap.lsn, None, exact=True, timeline=snap.timeline_id)
                history, snap = self.find_snapshot(snapshot)
            return TimelineSource(history.timelines.get(snap.timeline_id), snap.lsn), None
        if node_id is None:
            raise InvalidArgument("basebackup needs a node_id or a snapshot")
        store = self.store(node_id)
        state = store.state
        if state is None:
            raise NotFound(f"node {node_id} has no page history yet")
        timeline = store.timeline
        return TimelineSource(timeline, state.start_lsn), state.pg_timeline

    async def wait_for_lsn(self, node_id: str, lsn: int | None, timeout: float) -> int:
        """The LSN to read at: the latest ingested by default; a future one is waited for."""
        timeline = self.store(node_id).timeline
        if lsn is None:
            return timeline.last_record_lsn
        deadline = time.monotonic() + timeout
        follower = self.followers.get(node_id)
        while timeline.last_record_lsn < lsn:
            if follower is not None:
                follower.check_ingesting()  # a stopped ingest would never get there
            if time.monotonic() >= deadline:
                raise Unavailable(
                    f"node {node_id}: LSN {format_lsn(lsn)} not ingested within {timeout:.0f}s "
                    f"(last ingested: {format_lsn(timeline.last_record_lsn)})"
                )
            await asyncio.sleep(0.05)
        return lsn

    def store_info(self, node_id: str) -> dict[str, Any]:
        store = self.store(node_id)
        state = store.state
        if state is None:
            return {"node_id": node_id, "imported": False}
        timeline = store.timeline
        return {
            "node_id": node_id,
            "imported": True,
            "timeline_id": state.timeline_id,
            "start_lsn": state.start_lsn,
            "pg_timeline": state.pg_timeline,
            "checkouts": state.checkouts,
            "parent": state.parent,
            "last_record_lsn": timeline.last_record_lsn,
            "prev_record_lsn": timeline.prev_record_lsn,
            "disk_consistent_lsn": timeline.disk_consistent_lsn,
            "layers": len(list(timeline.layer_map().layers())),
            "size_bytes": store.history.bytes_needed(state.timeline_id, timeline.last_record_lsn),
        }

    def update_ingest_metrics(self) -> None:
        """Refresh the per-node ingest gauges (called before each scrape)."""
        for node_id, follower in self.followers.items():
            stopped = follower.ingest_state != "ok"
            self.metrics.set("pageserver_ingest_stopped", int(stopped), node=node_id)
            flushed = follower.flushed_lsn
            ingested = follower.ingested_positions()[0] or 0
            self.metrics.set("pageserver_wal_flushed_lsn", flushed, node=node_id)
            self.metrics.set("pageserver_wal_ingested_lsn", ingested, node=node_id)
            lag = max(0, flushed - ingested) if ingested else 0
            self.metrics.set("pageserver_ingest_lag_bytes", lag, node=node_id)

    # remote storages

    def remote_attach(self, settings: dict[str, Any]) -> dict[str, Any]:
        """Know an s3 storage and attach the PITR areas of its bucket read-only. Blocking."""
        parsed = RemoteSettings.from_wire(settings)
        failed: dict[str, NeonError] = {}
        for name in self.remote.attach(parsed, failed):
            mirror = self.remote.mirrors[name]
            self._reload_mirror(mirror)
        if failed:  # the others are attached: said after them
            said = "; ".join(f"PITR area {name!r}: {exc}" for name, exc in failed.items())
            raise type(next(iter(failed.values())))(
                f"{said} (not attached; the storage's other areas are)"
            )
        return self._usage_of(parsed.storage)

    def remote_detach(self, storage: str) -> dict[str, Any]:
        uploading = [a for a, s in self.remote.uploads.items() if s == storage]
        if uploading:
            raise Conflict(
                f"PITR areas {', '.join(uploading)} are kept in storage {storage!r}; destroy "
                "them first"
            )
        usage = self._usage_of(storage)
        for mirror in [m for m in self.remote.mirrors.values() if m.settings.storage == storage]:
            history = self.histories.pop(str(mirror.root), None)
            if history is not None:
                history.close()
            self._mirror_stores.pop(str(mirror.root), None)
        self.remote.detach(storage)
        return usage

    def _usage_of(self, storage: str) -> dict[str, Any]:
        for usage in self.remote.usage():
            if usage.storage == storage:
                return asdict(usage)
        return {"storage": storage, "used_bytes": 0, "uploading": (), "attached": ()}

    def remote_status(self) -> dict[str, Any]:
        return self.remote.status_wire()

    def update_remote_metrics(self) -> None:
        for status in self.remote.statuses():
            labels = {"area": status.area, "storage": status.storage}
            m = self.metrics
            m.set("pageserver_remote_upload_lag_bytes", status.lag_bytes, **labels)
            m.set("pageserver_remote_uploaded_lsn", status.remote_lsn, **labels)
            m.set("pageserver_remote_pending_bytes", status.pending_bytes, **labels)
            m.set("pageserver_remote_upload_errors", int(status.last_error is not None), **labels)
            m.set("pageserver_remote_uploaded_bytes_total", status.uploaded_bytes_total, **labels)
            m.set("pageserver_remote_cache_resident_bytes", status.cache_resident_bytes, **labels)
            m.set("pageserver_remote_evicted_layers", status.evicted_layers, **labels)
            m.set("pageserver_remote_fetched_bytes_total", status.fetched_bytes_total, **labels)

    def node_statuses(self) -> list[dict[str, Any]]:
        return [
            self.followers[n.node_id].status() if n.node_id in self.followers else n.public()
            for n in self.nodes.all()
        ]

    def status(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "pid": os.getpid(),
            "uptime_seconds": round(time.time() - self.started_at, 3),
            "workdir": str(self.config.workdir),
            "listen_host": self.config.listen_host,
            "proto_port": self.config.proto_port,
            "http_port": self.config.http_port,
            "nodes": self.node_statuses(),
        }


def _images_at(store: NodeStore, lsn: int) -> None:
    """`store.images_at(lsn)` off the event loop (its freeze waits for a batch being
    ingested), not waited for (the snapshot is named already); a failure costs only
    images: logged."""
    try:
        store.images_at(lsn)
    except (NeonError, OSError) as exc:
        log.warning("images at snapshot %s of node %s not asked for: %s",
                    format_lsn(lsn), store.node_id, exc)  # fmt: skip
    except Exception:  # a bug: logged, the snapshot stands
        log.exception("images at snapshot %s of node %s", format_lsn(lsn), store.node_id)


def _check_neon_file_import(
    neon_file: Path, datadir: Path, store_dir: Path, own: list[Path]
) -> None:
    """A `.neon` file the pageserver is asked to read itself, and where it extracts its
    small files: a regular file outside its own directories (a FIFO would hang the import's
    first read), extracted into a work directory of the storage imported into."""
    check_outside(neon_file, own, "a .neon file")
    check_import_file(neon_file)
    if datadir.parent.parent != store_dir.parent:
        raise InvalidArgument(
            f"{datadir}: a .neon file is extracted into a work directory of its storage"
        )
    check_outside(datadir, own, "an extraction")
