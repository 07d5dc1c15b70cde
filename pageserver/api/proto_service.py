"""Proto methods of the pageserver: the CLI's (and remote peers') way in."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

from pageserver.api.service import Pageserver
from pageserver.basebackup.tar_stream import basebackup_chunks
from pageserver.follow.followed_nodes import FollowedNode
from pageserver.reconstruct.page_reconstruct import get_rel_size, list_dbs, list_rels, materialize
from pageserver.storage.keys import FORK_NAMES, rel_block_key
from pg15.lsn import format_lsn
from proto.errors import InvalidArgument, NotFound
from proto.server import Handler, RequestContext


def _param(params: dict[str, Any], name: str, kind: type) -> Any:
    value = params.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise InvalidArgument(f"parameter {name!r} must be a {kind.__name__}")
    return value


def _opt_lsn(params: dict[str, Any]) -> int | None:
    value = params.get("lsn")
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidArgument("parameter 'lsn' must be a non-negative integer")
    return value


def _timeout(params: dict[str, Any]) -> float:
    value = params.get("wait_timeout", 30)
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value <= 600:
        raise InvalidArgument("parameter 'wait_timeout' must be a number of seconds <= 600")
    return float(value)


def _fork(params: dict[str, Any]) -> int:
    fork = params.get("fork", 0)
    if isinstance(fork, str) and fork in FORK_NAMES:
        return FORK_NAMES.index(fork)
    if isinstance(fork, int) and not isinstance(fork, bool) and 0 <= fork < len(FORK_NAMES):
        return fork
    raise InvalidArgument(f"unknown fork {fork!r}: use one of {', '.join(FORK_NAMES)}")


def build_handlers(ps: Pageserver) -> dict[str, Handler]:
    async def status(ctx: RequestContext) -> Any:
        return ps.status()

    async def node_register(ctx: RequestContext) -> Any:
        p = ctx.params
        node = FollowedNode(
            node_id=_param(p, "node_id", str),
            host=_param(p, "host", str),
            port=_param(p, "port", int),
            user=_param(p, "user", str),
            password=_param(p, "password", str),
            system_id=p.get("system_id") if isinstance(p.get("system_id"), str) else None,
            store_dir=p.get("store_dir") if isinstance(p.get("store_dir"), str) else None,
            pgdata=p.get("pgdata") if isinstance(p.get("pgdata"), str) else None,
        )
        return await ps.register_node(node)

    async def node_unregister(ctx: RequestContext) -> Any:
        return await ps.unregister_node(_param(ctx.params, "node_id", str))

    async def node_list(ctx: RequestContext) -> Any:
        return ps.node_statuses()

    async def node_wait_decoded(ctx: RequestContext) -> Any:
        """Wait until the record at `lsn` (e.g. a shutdown checkpoint) has been decoded."""
        follower = ps.follower(_param(ctx.params, "node_id", str))
        timeout = ctx.params.get("wait_timeout", 30)
        if not isinstance(timeout, int | float) or not 0 <= timeout <= 600:
            raise InvalidArgument("parameter 'wait_timeout' must be a number of seconds <= 600")
        reached = await follower.wait_decoded(_param(ctx.params, "lsn", int), float(timeout))
        return {"reached": reached, **follower.status()}

    async def node_import(ctx: RequestContext) -> Any:
        node_id = _param(ctx.params, "node_id", str)
        lsn = await ps.import_node(node_id, Path(_param(ctx.params, "datadir", str)))
        return {"lsn": lsn, "lsn_text": format_lsn(lsn)}

    async def timeline_info(ctx: RequestContext) -> Any:
        return ps.store_info(_param(ctx.params, "node_id", str))

    async def page_get(ctx: RequestContext) -> Any:
        p = ctx.params
        node_id = _param(p, "node_id", str)
        lsn = await ps.wait_for_lsn(node_id, _opt_lsn(p), _timeout(p))
        key = rel_block_key(
            _param(p, "spc", int),
            _param(p, "db", int),
            _param(p, "rel", int),
            _fork(p),
            _param(p, "blkno", int),
        )
        page = await asyncio.to_thread(
            materialize, ps.store(node_id).timeline, key, lsn, ps.redo_pool.reconstruct
        )
        return {"lsn": lsn, "page": page}

    async def rel_size(ctx: RequestContext) -> Any:
        p = ctx.params
        node_id = _param(p, "node_id", str)
        lsn = await ps.wait_for_lsn(node_id, _opt_lsn(p), _timeout(p))
        spc, db, rel = _param(p, "spc", int), _param(p, "db", int), _param(p, "rel", int)
        fork = _fork(p)
        size = await asyncio.to_thread(
            get_rel_size, ps.store(node_id).timeline, spc, db, rel, fork, lsn
        )
        if size is None:
            raise NotFound(
                f"relation {spc}/{db}/{rel} fork {FORK_NAMES[fork]} does not exist at "
                f"{format_lsn(lsn)}"
            )
        return {"lsn": lsn, "nblocks": size}

    async def db_list(ctx: RequestContext) -> Any:
        p = ctx.params
        node_id = _param(p, "node_id", str)
        lsn = await ps.wait_for_lsn(node_id, _opt_lsn(p), _timeout(p))
        dbs = await asyncio.to_thread(list_dbs, ps.store(node_id).timeline, lsn)
        return {"lsn": lsn, "dbs": [list(d) for d in dbs]}

    async def rel_list(ctx: RequestContext) -> Any:
        p = ctx.params
        node_id = _param(p, "node_id", str)
        lsn = await ps.wait_for_lsn(node_id, _opt_lsn(p), _timeout(p))
        rels = await asyncio.to_thread(
            list_rels,
            ps.store(node_id).timeline,
            _param(p, "spc", int),
            _param(p, "db", int),
            lsn,
        )
        return {"lsn": lsn, "rels": [list(r) for r in rels]}

    async def snapshot_create(ctx: RequestContext) -> Any:
        p = ctx.params
        snap = await ps.create_snapshot(
            _param(p, "node_id", str), _param(p, "name", str), _opt_lsn(p), _timeout(p)
        )
        return asdict(snap)

    async def snapshot_list(ctx: RequestContext) -> Any:
        return ps.list_snapshots()

    async def snapshot_destroy(ctx: RequestContext) -> Any:
        history, snap = ps.find_snapshot(_param(ctx.params, "name", str))
        return asdict(history.snapshots.remove(snap.name))

    async def snapshot_show(ctx: RequestContext) -> Any:
        _history, snap = ps.find_snapshot(_param(ctx.params, "name", str))
        return asdict(snap)

    async def node_branch(ctx: RequestContext) -> Any:
        p = ctx.params
        tli = p.get("pg_timeline")
        if tli is not None and (not isinstance(tli, int) or isinstance(tli, bool) or tli < 1):
            raise InvalidArgument("parameter 'pg_timeline' must be a positive integer")
        return await ps.branch_node(
            _param(p, "node_id", str),
            _param(p, "snapshot", str),
            pg_timeline=tli,
            checkout=bool(p.get("checkout", False)),
        )

    async def basebackup(ctx: RequestContext) -> Any:
        """Stream a tar of a startable data directory (a snapshot, or a node's branch point)."""
        p = ctx.params
        node_id = p.get("node_id") if isinstance(p.get("node_id"), str) else None
        snapshot = p.get("snapshot") if isinstance(p.get("snapshot"), str) else None
        source, tli = ps.basebackup_source(node_id, snapshot)
        pg_timeline = p.get("pg_timeline", tli or 1)
        if not isinstance(pg_timeline, int) or pg_timeline < 1:
            raise InvalidArgument("parameter 'pg_timeline' must be a positive integer")
        history = p.get("timeline_history")
        if history is None and pg_timeline > 1:
            # The parent timeline and where this one branched from it (what a promotion's
            # .history file records); PostgreSQL wants it beside the new timeline's WAL.
            history = f"{pg_timeline - 1}\t{format_lsn(source.lsn)}\tneon branch\n".encode()
        info, chunks = await asyncio.to_thread(
            basebackup_chunks,
            source,
            source.lsn,
            pg_timeline=pg_timeline,
            timeline_history=history if isinstance(history, bytes) else None,
        )
        sent = 0
        while True:
            chunk = await asyncio.to_thread(next, chunks, None)
            if chunk is None:
                break
            sent += len(chunk)
            await ctx.send(chunk)
        return {**asdict(info), "bytes": sent}

    async def pitr_create(ctx: RequestContext) -> Any:
        p = ctx.params
        area = ps.pitr_create(
            _param(p, "name", str),
            _param(p, "node_id", str),
            p.get("ttl", "inf") if isinstance(p.get("ttl", "inf"), str) else "inf",
            p.get("size_limit", "inf") if isinstance(p.get("size_limit", "inf"), str) else "inf",
        )
        return asdict(area)

    async def pitr_list(ctx: RequestContext) -> Any:
        return await asyncio.to_thread(ps.pitr_list)

    async def pitr_destroy(ctx: RequestContext) -> Any:
        return asdict(ps.pitr_destroy(_param(ctx.params, "name", str)))

    async def pitr_extract(ctx: RequestContext) -> Any:
        p = ctx.params
        at = p.get("time")
        when = None
        if at is not None:
            if not isinstance(at, str):
                raise InvalidArgument("parameter 'time' must be an ISO 8601 string")
            try:
                when = datetime.fromisoformat(at)
            except ValueError:
                raise InvalidArgument(
                    f"invalid time {at!r}: use ISO 8601, e.g. 2026-11-23T22:00:00+00:00"
                ) from None
        lsn = _opt_lsn(p)
        if (lsn is None) == (when is None):
            raise InvalidArgument("give exactly one of --lsn and --time")
        tag = p.get("tag") if isinstance(p.get("tag"), str) else None
        snap = await asyncio.to_thread(
            ps.pitr_extract, _param(p, "name", str), lsn=lsn, at=when, tag=tag
        )
        return asdict(snap)

    async def gc_run(ctx: RequestContext) -> Any:
        return await ps.gc_all()

    handlers: dict[str, Handler] = {
        "status": status,
        "node.register": node_register,
        "node.unregister": node_unregister,
        "node.list": node_list,
        "node.wait_decoded": node_wait_decoded,
        "node.import": node_import,
        "timeline.info": timeline_info,
        "page.get": page_get,
        "rel.size": rel_size,
        "db.list": db_list,
        "rel.list": rel_list,
        "snapshot.create": snapshot_create,
        "snapshot.list": snapshot_list,
        "snapshot.destroy": snapshot_destroy,
        "snapshot.show": snapshot_show,
        "node.branch": node_branch,
        "basebackup": basebackup,
        "pitr.create": pitr_create,
        "pitr.list": pitr_list,
        "pitr.destroy": pitr_destroy,
        "pitr.extract": pitr_extract,
        "gc.run": gc_run,
    }

    def counted(name: str, fn: Handler) -> Handler:
        async def wrapper(ctx: RequestContext) -> Any:
            try:
                result = await fn(ctx)
            except Exception:
                ps.metrics.inc("pageserver_proto_requests_total", method=name, outcome="error")
                raise
            ps.metrics.inc("pageserver_proto_requests_total", method=name, outcome="ok")
            return result

        return wrapper

    return {name: counted(name, fn) for name, fn in handlers.items()}
