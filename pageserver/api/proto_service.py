"""Proto methods of the pageserver: the CLI's (and remote peers') way in."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Generator, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pageserver.api.local_files import LocalWrite, WriteInto, write_on_own_thread, write_tar_into
from pageserver.api.own_thread import on_own_thread
from pageserver.api.service import Pageserver
from pageserver.api.slow_requests import reported_if_slow
from pageserver.api.thread_chunks import chunks_in_thread
from pageserver.basebackup.checkout_delta import checkout_parent
from pageserver.basebackup.prepared_pages import page_point
from pageserver.basebackup.snapshot_file import (
    DeltaParent,
    TarCounter,
    delta_parent,
    snapshot_file_buffers,
    snapshot_file_chunks,
    snapshot_file_manifest,
)
from pageserver.basebackup.tar_stream import (
    FIRST_HANDOFF_BYTES,
    HANDOFF_BYTES,
    AlignedChunks,
    BasebackupInfo,
    PlannedTar,
    basebackup_chunks,
    batched,
)
from pageserver.follow.followed_nodes import followed_node
from pageserver.history.flusher import FOREGROUND
from pageserver.history.snapshots import is_user_snapshot
from pageserver.reconstruct.reads import get_rel_size, list_dbs, list_rels, materialize
from pageserver.storage.keys import rel_block_key
from pageserver_api import models as m
from pageserver_api.models_snapshots import tar_total_chunk
from pg15.constants import BLCKSZ, FORK_NAMES
from pg15.lsn import format_lsn
from proto.errors import InvalidArgument, NotFound
from proto.server import Handler, RequestContext

Route = Callable[[RequestContext, Any], Awaitable[m.ApiResponse]]
"""A handler of one method: the parsed request in, the response model out."""


async def _plan_basebackup(
    ps: Pageserver,
    req: m.BasebackupRequest | m.BasebackupPlanRequest,
    delta: DeltaParent | None = None,
    aligned: AlignedChunks | None = None,
) -> tuple[BasebackupInfo, PlannedTar]:
    """Validate a basebackup and describe it; its tar chunks are produced lazily (a delta's
    relation forks by `delta`; pages joined into `aligned`'s buffers if given)."""
    source, tli = await on_own_thread(
        "basebackup-source", ps.basebackup_source, req.node_id, req.snapshot
    )
    pg_timeline = req.pg_timeline if req.pg_timeline is not None else tli or 1
    history = req.timeline_history if isinstance(req, m.BasebackupRequest) else None
    if history is None and pg_timeline > 1:
        # The parent timeline and where this one branched from it (what a promotion's
        # .history file records); PostgreSQL wants it beside the new timeline's WAL.
        history = f"{pg_timeline - 1}\t{format_lsn(source.lsn)}\tneon branch\n".encode()
    return await asyncio.to_thread(
        basebackup_chunks,
        source,
        source.lsn,
        pg_timeline=pg_timeline,
        timeline_history=history,
        now=req.mtime if isinstance(req, m.BasebackupRequest) else None,
        fork_content=None if delta is None else delta.forks,
        aligned=aligned,
        sparse_wal=_sparse_wal(req, delta),
    )


def _sparse_wal(
    req: m.BasebackupRequest | m.BasebackupPlanRequest, delta: DeltaParent | None
) -> bool:
    """Whether the tar's WAL segment is a GNU sparse member: a checkout's tar asks for it
    (`sparse_wal`); a delta `.neon` file's is always so (its format version,
    snapfile/manifest.py DELTA_FORMAT_VERSION, says it to a reader: its records, not 16 MiB of
    zeros compressed, decompressed and written)."""
    if not isinstance(req, m.BasebackupRequest):
        return False
    return bool(req.sparse_wal) or (bool(req.snapshot_file) and delta is not None)


def _basebackup_response(
    info: BasebackupInfo, sent: int, tar_bytes: int, delta: DeltaParent | None
) -> m.BasebackupResponse:
    fields = asdict(info)
    spaces = [m.TablespaceLocation(oid, loc) for oid, loc in fields.pop("tablespaces")]
    return m.BasebackupResponse(
        **fields, bytes=sent, tar_bytes=tar_bytes, tablespaces=spaces,
        parent=None if delta is None else delta.name,
        parent_lsn=None if delta is None else delta.lsn,
        full_tar_bytes=tar_bytes if delta is None else delta.forks.full_tar_bytes(tar_bytes),
    )  # fmt: skip


@contextlib.contextmanager
def served(ps: Pageserver, model: type[m.ApiRequest]) -> Iterator[None]:
    """What every request gets, a proto method's and the local basebackup's alike:
    compaction paused while one a user waits for runs (FOREGROUND_REQUESTS), a report if it
    is slow (`reported_if_slow`) and its count by outcome (pageserver_proto_requests_total)."""
    try:
        with (
            FOREGROUND.held() if model in FOREGROUND_REQUESTS else contextlib.nullcontext(),
            reported_if_slow(model.METHOD),
        ):
            yield
    except Exception:
        ps.metrics.inc("pageserver_proto_requests_total", method=model.METHOD, outcome="error")
        raise
    ps.metrics.inc("pageserver_proto_requests_total", method=model.METHOD, outcome="ok")


def local_basebackup(ps: Pageserver) -> WriteInto:
    """The daemon's side of a basebackup written into a directory the local CLI handed it
    (pageserver/api/local_files.py): a plain one (no delta, no `.neon` file), its tar made
    on one thread as `basebackup` makes it and unpacked on another (`write_tar_into`, on a
    thread owning its own descriptor of the directory), `served` as the method is."""

    async def write_into(raw: dict[str, Any], dir_fd: int, write: LocalWrite) -> dict[str, Any]:
        with served(ps, m.BasebackupRequest):
            req = m.BasebackupRequest.from_wire(raw)
            if req.checkout_from or req.delta_from or req.snapshot_file:
                raise InvalidArgument("a local basebackup writes a whole data directory only")
            # The tar maker's C walk writes the pages into these buffers (no copy after it),
            # which the O_DIRECT writer also writes as they are.
            aligned = AlignedChunks()
            info, tar_chunks = await _plan_basebackup(ps, req, aligned=aligned)
            tar = TarCounter(tar_chunks)
            await write_on_own_thread(
                dir_fd,
                lambda fd: write_tar_into(iter(tar), fd, write.stopped, aligned, write.add),
                write.held,
            )
            return _basebackup_response(info, 0, tar.bytes, None).to_wire()

    return write_into


def build_handlers(ps: Pageserver) -> dict[str, Handler]:
    """One proto handler per API method: params are parsed into the method's request model
    and the response model is encoded, in `serve` below, for every method alike. What may
    download from a bucket for as long as that takes (a snapshot or PITR area held there, an
    upload's evicted layers coming back) runs on a thread of its own, not on the loop's
    default executor (pageserver/api/own_thread.py)."""

    async def status(ctx: RequestContext, req: m.StatusRequest) -> m.StatusResponse:
        status = ps.status()
        return m.StatusResponse(**{**status, "nodes": _node_statuses(status["nodes"])})

    async def node_register(ctx: RequestContext, req: m.NodeRegisterRequest) -> m.NodeStatus:
        return m.NodeStatus(**await ps.register_node(followed_node(asdict(req))))

    async def node_unregister(ctx: RequestContext, req: m.NodeUnregisterRequest) -> m.NodeStatus:
        return m.NodeStatus(**await ps.unregister_node(req.node_id))

    async def node_pause(ctx: RequestContext, req: m.NodePauseRequest) -> m.NodeStatus:
        if req.disconnect:
            return m.NodeStatus(**await ps.disconnect_node(req.node_id))
        return m.NodeStatus(**await ps.pause_node(req.node_id, req.wal_tail))

    async def node_list(ctx: RequestContext, req: m.NodeListRequest) -> m.NodeListResponse:
        return m.NodeListResponse(_node_statuses(ps.node_statuses()))

    async def node_wait_decoded(
        ctx: RequestContext, req: m.NodeWaitDecodedRequest
    ) -> m.WaitDecodedResponse:
        follower = ps.follower(req.node_id)
        reached = await follower.wait_decoded(req.lsn, req.wait_timeout)
        return m.WaitDecodedResponse(reached, m.NodeStatus(**follower.status()))

    async def node_take_wal_tail(
        ctx: RequestContext, req: m.NodeWalTailRequest
    ) -> m.WalTailResponse:
        follower = ps.follower(req.node_id)
        end, reached = await follower.take_tail(Path(req.pg_wal), req.timeline, req.wait_timeout)
        return m.WalTailResponse(end, reached)

    async def node_import(ctx: RequestContext, req: m.NodeImportRequest) -> m.ImportResponse:
        lsn = await ps.import_node(req.node_id, Path(req.datadir), req.at_lsn)
        return m.ImportResponse(lsn, format_lsn(lsn))

    async def timeline_info(ctx: RequestContext, req: m.TimelineInfoRequest) -> m.TimelineInfo:
        return m.TimelineInfo(**ps.store_info(req.node_id))

    async def page_get(ctx: RequestContext, req: m.PageGetRequest) -> m.PageResponse:
        lsn = await ps.wait_for_lsn(req.node_id, req.lsn, req.wait_timeout)
        key = rel_block_key(req.spc, req.db, req.rel, m.fork_number(req.fork), req.blkno)
        page = await asyncio.to_thread(
            materialize, ps.store(req.node_id).timeline, key, lsn, ps.redo_pool.reconstruct
        )
        return m.PageResponse(lsn, page)

    async def rel_size(ctx: RequestContext, req: m.RelSizeRequest) -> m.RelSizeResponse:
        lsn = await ps.wait_for_lsn(req.node_id, req.lsn, req.wait_timeout)
        fork = m.fork_number(req.fork)
        size = await asyncio.to_thread(
            get_rel_size, ps.store(req.node_id).timeline, req.spc, req.db, req.rel, fork, lsn
        )
        if size is None:
            raise NotFound(
                f"relation {req.spc}/{req.db}/{req.rel} fork {FORK_NAMES[fork]} does not exist "
                f"at {format_lsn(lsn)}"
            )
        return m.RelSizeResponse(lsn, size)

    async def db_list(ctx: RequestContext, req: m.DbListRequest) -> m.DbListResponse:
        lsn = await ps.wait_for_lsn(req.node_id, req.lsn, req.wait_timeout)
        dbs = await asyncio.to_thread(list_dbs, ps.store(req.node_id).timeline, lsn)
        return m.DbListResponse(lsn, [list(d) for d in dbs])

    async def rel_list(ctx: RequestContext, req: m.RelListRequest) -> m.RelListResponse:
        lsn = await ps.wait_for_lsn(req.node_id, req.lsn, req.wait_timeout)
        rels = await asyncio.to_thread(
            list_rels, ps.store(req.node_id).timeline, req.spc, req.db, lsn
        )
        return m.RelListResponse(lsn, [list(r) for r in rels])

    async def snapshot_create(ctx: RequestContext, req: m.SnapshotCreateRequest) -> m.SnapshotInfo:
        lsn = req.lsn
        if req.at_server_lsn:
            lsn = max(lsn or 0, await ps.follower(req.node_id).server_wal_lsn())
        snap = await ps.create_snapshot(req.node_id, req.name, lsn, req.wait_timeout)
        return m.SnapshotInfo(**asdict(snap))

    async def snapshot_list(
        ctx: RequestContext, req: m.SnapshotListRequest
    ) -> m.SnapshotListResponse:
        return m.SnapshotListResponse([m.SnapshotInfo(**s) for s in ps.list_snapshots()])

    async def snapshot_destroy(
        ctx: RequestContext, req: m.SnapshotDestroyRequest
    ) -> m.SnapshotInfo:
        snap = await asyncio.to_thread(ps.destroy_snapshot, req.name)
        return m.SnapshotInfo(**asdict(snap))

    async def snapshot_import(ctx: RequestContext, req: m.SnapshotImportRequest) -> m.SnapshotInfo:
        snap = await ps.import_snapshot(
            req.name, Path(req.datadir), Path(req.store_dir), lambda: ctx.client_left, req.origin,
            None if req.neon_file is None else Path(req.neon_file), req.label, req.fetching,
        )  # fmt: skip
        return m.SnapshotInfo(**asdict(snap))

    async def snapshot_import_delta(
        ctx: RequestContext, req: m.SnapshotImportDeltaRequest
    ) -> m.SnapshotInfo:
        snap = await ps.import_delta_snapshot(
            req.name, Path(req.datadir), req.parent, req.origin, lambda: ctx.client_left,
            None if req.neon_file is None else Path(req.neon_file), req.label, req.fetching,
            None if req.work_store is None else Path(req.work_store),
        )  # fmt: skip
        return m.SnapshotInfo(**asdict(snap))

    async def snapshot_show(ctx: RequestContext, req: m.SnapshotShowRequest) -> m.SnapshotInfo:
        history, snap = ps.find_snapshot(req.name)
        if req.checkout_node is not None:
            ps.prepare_checkout(req.checkout_node, history, snap)
        return m.SnapshotInfo(**asdict(snap))

    async def snapshot_diff(
        ctx: RequestContext, req: m.SnapshotDiffRequest
    ) -> m.SnapshotDiffResponse:
        a, b, stat = await asyncio.to_thread(ps.diff_snapshots, req.from_snapshot, req.to_snapshot)
        relations = [
            m.RelationDiff(
                **{k: getattr(r, k) for k in _RELATION_FIELDS},
                pages_before=r.pages_before,
                pages_after=r.pages_after,
                pages_changed=r.pages_changed,
                bytes_changed=r.pages_changed * BLCKSZ,
                forks=[m.ForkDiff(*fork) for fork in r.forks],
            )
            for r in stat.relations
        ]
        return m.SnapshotDiffResponse(
            a.name, b.name, a.lsn, b.lsn, stat.common_lsn, stat.pages_changed,
            stat.bytes_changed, relations,
        )  # fmt: skip

    async def node_branch(ctx: RequestContext, req: m.NodeBranchRequest) -> m.BranchResponse:
        state = await ps.branch_node(
            req.node_id, req.snapshot, pg_timeline=req.pg_timeline, checkout=req.checkout
        )
        return m.BranchResponse(**state)

    def plan_basebackup(
        req: m.BasebackupRequest | m.BasebackupPlanRequest, delta: DeltaParent | None = None,
        aligned: AlignedChunks | None = None,
    ) -> Awaitable[tuple[BasebackupInfo, PlannedTar]]:  # fmt: skip
        return _plan_basebackup(ps, req, delta, aligned)

    async def basebackup_plan(
        ctx: RequestContext, req: m.BasebackupPlanRequest
    ) -> m.BasebackupPlan:
        """What `basebackup` would describe, without producing the tar."""
        info, _chunks = await plan_basebackup(req)
        fields = asdict(info)
        del fields["tablespaces"]  # not part of a plan: the basebackup's result lists them
        return m.BasebackupPlan(**fields)

    async def basebackup(ctx: RequestContext, req: m.BasebackupRequest) -> m.BasebackupResponse:
        """Stream a tar of a startable data directory (a snapshot, or a node's branch point),
        or its `.neon` snapshot file (a delta on one of `delta_from` when one is an ancestor)."""
        delta = None
        prepared = None
        if req.checkout_from is not None and req.hints_logged_from is not None:
            # The node's branch point, or the target snapshot itself, which a checkout asks
            # for while the branch is made (the same pages at the same LSN).
            if req.snapshot is not None:
                await ps.checkout_target_ready(req.snapshot)
            source, _tli = await on_own_thread(
                "basebackup-source", ps.basebackup_source, req.node_id, req.snapshot
            )
            delta = await asyncio.to_thread(
                checkout_parent, ps.find_snapshot, req.checkout_from, source,
                req.hints_logged_from,
            )  # fmt: skip
            # Taken once the delta is sure (HintsNotLogged, DifferentHistories raised above
            # leave it to expire) and closed however the delta ends (the prepare stops).
            prepared = ps.prepared_pages.take(page_point(source.timeline, source.lsn))
            delta.forks.prepared = prepared
            delta.forks.fork_sizes = bool(req.fork_sizes) and not req.snapshot_file
        elif req.delta_from and req.snapshot is not None:
            source, _tli = await on_own_thread(
                "basebackup-source", ps.basebackup_source, None, req.snapshot
            )
            delta = await asyncio.to_thread(
                delta_parent, ps.find_snapshot, req.snapshot, source, req.delta_from
            )
        try:
            # A whole .neon file: the tar maker's C walk writes the pages into buffers the
            # frames are compressed from where they lie, each given back once its frames are
            # (no bytes object per page, no join: the sender's tar thread is a push's
            # longest serial stage). Deltas keep their own way.
            aligned = snapshot_file_buffers() if req.snapshot_file and delta is None else None
            info, tar_chunks = await plan_basebackup(req, delta, aligned)
            if req.tar_total:  # none for a tar of very many members (PlannedTar.size)
                total = await asyncio.to_thread(tar_chunks.size)
                if total is not None:
                    await ctx.send(tar_total_chunk(total))
            tar = TarCounter(tar_chunks)
            chunks: Generator[bytes, None, None] = iter(tar)
            if req.snapshot_file:
                created = req.created_at if req.created_at is not None else int(time.time())
                source_name = req.snapshot or req.node_id or ""
                manifest = snapshot_file_manifest(info, source_name, created, delta)
                chunks = snapshot_file_chunks(manifest, tar, aligned)
            sent = 0
            # Handed over and sent a MiB at a time (the first batches smaller, so the reader
            # starts at once: FIRST_HANDOFF_BYTES), as the list of chunks the tar maker made
            # (not joined: raw frames written as they are). One chunk a frame and a thread hop,
            # a delta's many small members (a header per unchanged fork) cost more than its
            # pages; joined, every page was copied once more on its way to the socket.
            async with contextlib.aclosing(
                chunks_in_thread(batched(chunks, HANDOFF_BYTES, FIRST_HANDOFF_BYTES))
            ) as produced:
                async for batch in produced:
                    sent += sum(map(len, batch))
                    await ctx.send(batch)
            if delta is not None and delta.forks.prepared_used:
                ps.metrics.inc("pageserver_prepared_pages_used_total", delta.forks.prepared_used)
        finally:
            if prepared is not None:
                prepared.close()
        return _basebackup_response(info, sent, tar.bytes, delta)

    async def pitr_create(ctx: RequestContext, req: m.PitrCreateRequest) -> m.PitrAreaInfo:
        area = await on_own_thread(
            "pitr-create", ps.pitr_create, req.name, req.node_id, req.ttl, req.size_limit,
            req.remote, req.takeover,
        )  # fmt: skip
        return m.PitrAreaInfo(**asdict(area), storage=ps.pitr_storage(area.name))

    async def remote_status(
        ctx: RequestContext, req: m.RemoteStatusRequest
    ) -> m.RemoteStatusResponse:
        raw = ps.remote_status()
        return m.RemoteStatusResponse(
            [m.RemoteUploadStatus(**u) for u in raw["uploads"]],
            [_usage(u) for u in raw["storages"]],
        )

    async def remote_attach(
        ctx: RequestContext, req: m.RemoteAttachRequest
    ) -> m.RemoteStorageUsage:
        return _usage(await on_own_thread("remote-attach", ps.remote_attach, req.settings))

    async def remote_detach(
        ctx: RequestContext, req: m.RemoteDetachRequest
    ) -> m.RemoteStorageUsage:
        return _usage(await asyncio.to_thread(ps.remote_detach, req.storage))

    async def pitr_list(ctx: RequestContext, req: m.PitrListRequest) -> m.PitrListResponse:
        areas = await asyncio.to_thread(ps.pitr_list)
        return m.PitrListResponse([m.PitrAreaInfo(**a) for a in areas])

    async def pitr_destroy(ctx: RequestContext, req: m.PitrDestroyRequest) -> m.PitrAreaInfo:
        return m.PitrAreaInfo(
            **asdict(await on_own_thread("pitr-destroy", ps.pitr_destroy, req.name))
        )

    async def pitr_extract(ctx: RequestContext, req: m.PitrExtractRequest) -> m.SnapshotInfo:
        snap = await on_own_thread(
            "pitr-extract", ps.pitr_extract, req.name, lsn=req.lsn, at=req.time, tag=req.tag
        )
        return m.SnapshotInfo(**asdict(snap))

    async def pitr_commits(ctx: RequestContext, req: m.PitrCommitsRequest) -> m.PitrCommitsResponse:
        listing, timeline_id = await asyncio.to_thread(
            ps.pitr_commits, req.node_id, lsn=req.lsn, at=req.time, limit=req.limit
        )
        return m.PitrCommitsResponse(
            req.node_id,
            timeline_id,
            listing.point,
            [m.XactInfo(**asdict(r)) for r in listing.before],
            [m.XactInfo(**asdict(r)) for r in listing.after],
            listing.scanned_from,
            listing.scanned_to,
        )

    async def storage_usage(
        ctx: RequestContext, req: m.StorageUsageRequest
    ) -> m.StorageUsageResponse:
        found = await asyncio.to_thread(ps.storage_usage, Path(req.store_dir))
        return m.StorageUsageResponse([m.RetainedInfo(**asdict(r)) for r in found])

    async def gc_run(ctx: RequestContext, req: m.GcRunRequest) -> m.GcRunResponse:
        return m.GcRunResponse([m.GcResult(**r) for r in await ps.gc_all(on_request=True)])

    routes: dict[type[m.ApiRequest], Route] = {
        m.StatusRequest: status,
        m.NodeRegisterRequest: node_register,
        m.NodeUnregisterRequest: node_unregister,
        m.NodePauseRequest: node_pause,
        m.NodeListRequest: node_list,
        m.NodeWaitDecodedRequest: node_wait_decoded,
        m.NodeWalTailRequest: node_take_wal_tail,
        m.NodeImportRequest: node_import,
        m.TimelineInfoRequest: timeline_info,
        m.PageGetRequest: page_get,
        m.RelSizeRequest: rel_size,
        m.DbListRequest: db_list,
        m.RelListRequest: rel_list,
        m.SnapshotCreateRequest: snapshot_create,
        m.SnapshotListRequest: snapshot_list,
        m.SnapshotDestroyRequest: snapshot_destroy,
        m.SnapshotShowRequest: snapshot_show,
        m.SnapshotImportRequest: snapshot_import,
        m.SnapshotImportDeltaRequest: snapshot_import_delta,
        m.SnapshotDiffRequest: snapshot_diff,
        m.NodeBranchRequest: node_branch,
        m.BasebackupRequest: basebackup,
        m.BasebackupPlanRequest: basebackup_plan,
        m.PitrCreateRequest: pitr_create,
        m.PitrListRequest: pitr_list,
        m.PitrDestroyRequest: pitr_destroy,
        m.PitrExtractRequest: pitr_extract,
        m.RemoteStatusRequest: remote_status,
        m.RemoteAttachRequest: remote_attach,
        m.RemoteDetachRequest: remote_detach,
        m.PitrCommitsRequest: pitr_commits,
        m.StorageUsageRequest: storage_usage,
        m.GcRunRequest: gc_run,
    }

    def serve(model: type[m.ApiRequest], route: Route) -> Handler:
        async def handler(ctx: RequestContext) -> Any:
            with served(ps, model):
                req = model.from_wire(ctx.params)
                result = await route(ctx, req)
                if not isinstance(result, model.RESPONSE):
                    raise TypeError(f"{model.METHOD} must answer {model.RESPONSE.__name__}")
            if isinstance(req, m.SnapshotCreateRequest) and is_user_snapshot(req.name):
                # Named: the user's wait is over and nothing of theirs follows (`snapshot
                # create` ends here), so compaction goes on at once, not LINGER later: its
                # next pass writes the snapshot's image layers (Pageserver.create_snapshot),
                # which a checkout back to it reads, and that checkout would pause it again.
                FOREGROUND.release()
            return result.to_wire()

        return handler

    return {model.METHOD: serve(model, route) for model, route in routes.items()}


FOREGROUND_REQUESTS: frozenset[type[m.ApiRequest]] = frozenset({
    m.NodeWaitDecodedRequest, m.NodeWalTailRequest, m.SnapshotCreateRequest, m.NodeBranchRequest,
    m.BasebackupRequest, m.PageGetRequest, m.PitrExtractRequest, m.SnapshotShowRequest,
})  # fmt: skip
"""Requests a user waits for: compaction pauses while they run and shortly after (FOREGROUND).
SnapshotShowRequest is how `pg checkout` begins: the pause then covers the node's shutdown
checkpoint too, before its first wait."""

_RELATION_FIELDS = (
    "database", "schema", "name", "kind", "table", "change", "spc", "db", "relfilenode", "oid"
)  # fmt: skip


def _node_statuses(statuses: list[dict[str, Any]]) -> list[m.NodeStatus]:
    return [m.NodeStatus(**s) for s in statuses]


def _usage(raw: dict[str, Any]) -> m.RemoteStorageUsage:
    return m.RemoteStorageUsage(
        raw["storage"], raw["used_bytes"], list(raw["uploading"]), list(raw["attached"])
    )
