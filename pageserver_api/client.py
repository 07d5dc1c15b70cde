"""Typed clients of the pageserver: one method per proto method, models in and out.

`PageserverClient` runs over one open proto connection (asyncio); `SyncPageserverClient` is
what synchronous code (the click CLI) uses: each call connects, calls and closes, as one
`neon` command makes a handful of calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from ssl import SSLContext
from typing import TYPE_CHECKING, TypeVar

from pageserver_api import models as m
from pageserver_api.models import ApiRequest, R, decode_result
from proto.client import DEFAULT_CONNECT_TIMEOUT, Download, ProtoClient

if TYPE_CHECKING:
    from pageserver_api.models import (
        BasebackupPlan,
        BasebackupPlanRequest,
        BasebackupRequest,
        BasebackupResponse,
        BranchResponse,
        DbListRequest,
        DbListResponse,
        GcResult,
        ImportResponse,
        NodeBranchRequest,
        NodeImportRequest,
        NodePauseRequest,
        NodeRegisterRequest,
        NodeStatus,
        NodeUnregisterRequest,
        NodeWaitDecodedRequest,
        NodeWalTailRequest,
        PageGetRequest,
        PageResponse,
        PitrAreaInfo,
        PitrCommitsRequest,
        PitrCommitsResponse,
        PitrCreateRequest,
        PitrDestroyRequest,
        PitrExtractRequest,
        RelListRequest,
        RelListResponse,
        RelSizeRequest,
        RelSizeResponse,
        RemoteAttachRequest,
        RemoteDetachRequest,
        RemoteStatusResponse,
        RemoteStorageUsage,
        RetainedInfo,
        SnapshotCreateRequest,
        SnapshotDestroyRequest,
        SnapshotDiffRequest,
        SnapshotDiffResponse,
        SnapshotImportDeltaRequest,
        SnapshotImportRequest,
        SnapshotInfo,
        SnapshotShowRequest,
        StatusResponse,
        StorageUsageRequest,
        TimelineInfo,
        TimelineInfoRequest,
        WaitDecodedResponse,
        WalTailResponse,
    )

T = TypeVar("T")


class PageserverClient:
    """The pageserver's API over an open proto connection (one request at a time)."""

    def __init__(self, proto: ProtoClient) -> None:
        self.proto = proto

    @classmethod
    async def connect(
        cls, host: str, port: int, *, token: str | None, timeout: float = DEFAULT_CONNECT_TIMEOUT,
        ssl: SSLContext | None = None,
    ) -> PageserverClient:  # fmt: skip
        return cls(await ProtoClient.connect(host, port, token=token, timeout=timeout, ssl=ssl))

    async def __aenter__(self) -> PageserverClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.proto.close()

    async def _call(self, request: ApiRequest, response: type[R]) -> R:
        raw = await self.proto.call(request.METHOD, **request.to_wire())
        return decode_result(request, response, raw)

    async def status(self) -> StatusResponse:
        return await self._call(m.StatusRequest(), m.StatusResponse)

    async def node_register(self, request: NodeRegisterRequest) -> NodeStatus:
        return await self._call(request, m.NodeStatus)

    async def node_unregister(self, request: NodeUnregisterRequest) -> NodeStatus:
        return await self._call(request, m.NodeStatus)

    async def node_pause(self, request: NodePauseRequest) -> NodeStatus:
        return await self._call(request, m.NodeStatus)

    async def node_list(self) -> list[NodeStatus]:
        return (await self._call(m.NodeListRequest(), m.NodeListResponse)).items

    async def node_wait_decoded(self, request: NodeWaitDecodedRequest) -> WaitDecodedResponse:
        return await self._call(request, m.WaitDecodedResponse)

    async def node_take_wal_tail(self, request: NodeWalTailRequest) -> WalTailResponse:
        return await self._call(request, m.WalTailResponse)

    async def node_import(self, request: NodeImportRequest) -> ImportResponse:
        return await self._call(request, m.ImportResponse)

    async def node_branch(self, request: NodeBranchRequest) -> BranchResponse:
        return await self._call(request, m.BranchResponse)

    async def timeline_info(self, request: TimelineInfoRequest) -> TimelineInfo:
        return await self._call(request, m.TimelineInfo)

    async def page_get(self, request: PageGetRequest) -> PageResponse:
        return await self._call(request, m.PageResponse)

    async def rel_size(self, request: RelSizeRequest) -> RelSizeResponse:
        return await self._call(request, m.RelSizeResponse)

    async def db_list(self, request: DbListRequest) -> DbListResponse:
        return await self._call(request, m.DbListResponse)

    async def rel_list(self, request: RelListRequest) -> RelListResponse:
        return await self._call(request, m.RelListResponse)

    async def snapshot_create(self, request: SnapshotCreateRequest) -> SnapshotInfo:
        return await self._call(request, m.SnapshotInfo)

    async def snapshot_list(self) -> list[SnapshotInfo]:
        return (await self._call(m.SnapshotListRequest(), m.SnapshotListResponse)).items

    async def snapshot_show(self, request: SnapshotShowRequest) -> SnapshotInfo:
        return await self._call(request, m.SnapshotInfo)

    async def snapshot_destroy(self, request: SnapshotDestroyRequest) -> SnapshotInfo:
        return await self._call(request, m.SnapshotInfo)

    async def snapshot_import(self, request: SnapshotImportRequest) -> SnapshotInfo:
        return await self._call(request, m.SnapshotInfo)

    async def snapshot_import_delta(self, request: SnapshotImportDeltaRequest) -> SnapshotInfo:
        return await self._call(request, m.SnapshotInfo)

    async def snapshot_diff(self, request: SnapshotDiffRequest) -> SnapshotDiffResponse:
        return await self._call(request, m.SnapshotDiffResponse)

    async def pitr_create(self, request: PitrCreateRequest) -> PitrAreaInfo:
        return await self._call(request, m.PitrAreaInfo)

    async def pitr_list(self) -> list[PitrAreaInfo]:
        return (await self._call(m.PitrListRequest(), m.PitrListResponse)).items

    async def pitr_destroy(self, request: PitrDestroyRequest) -> PitrAreaInfo:
        return await self._call(request, m.PitrAreaInfo)

    async def pitr_extract(self, request: PitrExtractRequest) -> SnapshotInfo:
        return await self._call(request, m.SnapshotInfo)

    async def pitr_commits(self, request: PitrCommitsRequest) -> PitrCommitsResponse:
        return await self._call(request, m.PitrCommitsResponse)

    async def remote_status(self) -> RemoteStatusResponse:
        return await self._call(m.RemoteStatusRequest(), m.RemoteStatusResponse)

    async def remote_attach(self, request: RemoteAttachRequest) -> RemoteStorageUsage:
        return await self._call(request, m.RemoteStorageUsage)

    async def remote_detach(self, request: RemoteDetachRequest) -> RemoteStorageUsage:
        return await self._call(request, m.RemoteStorageUsage)

    async def storage_usage(self, request: StorageUsageRequest) -> list[RetainedInfo]:
        return (await self._call(request, m.StorageUsageResponse)).items

    async def gc_run(self) -> list[GcResult]:
        return (await self._call(m.GcRunRequest(), m.GcRunResponse)).items

    async def basebackup_plan(self, request: BasebackupPlanRequest) -> BasebackupPlan:
        return await self._call(request, m.BasebackupPlan)

    def basebackup(self, request: BasebackupRequest) -> BasebackupDownload:
        """The tar stream; iterate it (`async with` so an abandoned one closes the
        connection), then read `.result`."""
        return BasebackupDownload(request, self.proto.download(request.METHOD, **request.to_wire()))


class BasebackupDownload:
    """Chunks of a basebackup tar, then its typed result."""

    def __init__(self, request: BasebackupRequest, download: Download) -> None:
        self._request = request
        self._download = download

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._download.__aiter__()

    @property
    def result(self) -> BasebackupResponse:
        return decode_result(self._request, m.BasebackupResponse, self._download.result)

    async def __aenter__(self) -> BasebackupDownload:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._download.aclose()


class SyncPageserverClient:
    """The same API for synchronous code: each call opens its own connection."""

    def __init__(
        self, host: str, port: int, *, token: str | None, timeout: float = DEFAULT_CONNECT_TIMEOUT,
        ssl: SSLContext | None = None,
    ) -> None:  # fmt: skip
        self.host = host
        self.port = port
        self._token = token
        self._timeout = timeout
        self._ssl = ssl

    def run(self, call: Callable[[PageserverClient], Awaitable[T]]) -> T:
        """Connect, run `call` with the async client, close (several calls: one connection)."""

        async def go() -> T:
            async with await self.connect() as client:
                return await call(client)

        return asyncio.run(go())

    async def connect(self) -> PageserverClient:
        """An async client of the same pageserver, for code already on an event loop."""
        return await PageserverClient.connect(
            self.host, self.port, token=self._token, timeout=self._timeout, ssl=self._ssl
        )

    def status(self) -> StatusResponse:
        return self.run(lambda c: c.status())

    def node_register(self, request: NodeRegisterRequest) -> NodeStatus:
        return self.run(lambda c: c.node_register(request))

    def node_unregister(self, request: NodeUnregisterRequest) -> NodeStatus:
        return self.run(lambda c: c.node_unregister(request))

    def node_pause(self, request: NodePauseRequest) -> NodeStatus:
        return self.run(lambda c: c.node_pause(request))

    def node_list(self) -> list[NodeStatus]:
        return self.run(lambda c: c.node_list())

    def node_wait_decoded(self, request: NodeWaitDecodedRequest) -> WaitDecodedResponse:
        return self.run(lambda c: c.node_wait_decoded(request))

    def node_take_wal_tail(self, request: NodeWalTailRequest) -> WalTailResponse:
        return self.run(lambda c: c.node_take_wal_tail(request))

    def node_import(self, request: NodeImportRequest) -> ImportResponse:
        return self.run(lambda c: c.node_import(request))

    def node_branch(self, request: NodeBranchRequest) -> BranchResponse:
        return self.run(lambda c: c.node_branch(request))

    def timeline_info(self, request: TimelineInfoRequest) -> TimelineInfo:
        return self.run(lambda c: c.timeline_info(request))

    def page_get(self, request: PageGetRequest) -> PageResponse:
        return self.run(lambda c: c.page_get(request))

    def rel_size(self, request: RelSizeRequest) -> RelSizeResponse:
        return self.run(lambda c: c.rel_size(request))

    def db_list(self, request: DbListRequest) -> DbListResponse:
        return self.run(lambda c: c.db_list(request))

    def rel_list(self, request: RelListRequest) -> RelListResponse:
        return self.run(lambda c: c.rel_list(request))

    def snapshot_create(self, request: SnapshotCreateRequest) -> SnapshotInfo:
        return self.run(lambda c: c.snapshot_create(request))

    def snapshot_list(self) -> list[SnapshotInfo]:
        return self.run(lambda c: c.snapshot_list())

    def snapshot_show(self, request: SnapshotShowRequest) -> SnapshotInfo:
        return self.run(lambda c: c.snapshot_show(request))

    def basebackup_plan(self, request: BasebackupPlanRequest) -> BasebackupPlan:
        return self.run(lambda c: c.basebackup_plan(request))

    def snapshot_destroy(self, request: SnapshotDestroyRequest) -> SnapshotInfo:
        return self.run(lambda c: c.snapshot_destroy(request))

    def snapshot_import(self, request: SnapshotImportRequest) -> SnapshotInfo:
        return self.run(lambda c: c.snapshot_import(request))

    def snapshot_import_delta(self, request: SnapshotImportDeltaRequest) -> SnapshotInfo:
        return self.run(lambda c: c.snapshot_import_delta(request))

    def snapshot_diff(self, request: SnapshotDiffRequest) -> SnapshotDiffResponse:
        return self.run(lambda c: c.snapshot_diff(request))

    def pitr_create(self, request: PitrCreateRequest) -> PitrAreaInfo:
        return self.run(lambda c: c.pitr_create(request))

    def pitr_list(self) -> list[PitrAreaInfo]:
        return self.run(lambda c: c.pitr_list())

    def pitr_destroy(self, request: PitrDestroyRequest) -> PitrAreaInfo:
        return self.run(lambda c: c.pitr_destroy(request))

    def pitr_extract(self, request: PitrExtractRequest) -> SnapshotInfo:
        return self.run(lambda c: c.pitr_extract(request))

    def pitr_commits(self, request: PitrCommitsRequest) -> PitrCommitsResponse:
        return self.run(lambda c: c.pitr_commits(request))

    def storage_usage(self, request: StorageUsageRequest) -> list[RetainedInfo]:
        return self.run(lambda c: c.storage_usage(request))

    def remote_status(self) -> RemoteStatusResponse:
        return self.run(lambda c: c.remote_status())

    def remote_attach(self, request: RemoteAttachRequest) -> RemoteStorageUsage:
        return self.run(lambda c: c.remote_attach(request))

    def remote_detach(self, request: RemoteDetachRequest) -> RemoteStorageUsage:
        return self.run(lambda c: c.remote_detach(request))

    def gc_run(self) -> list[GcResult]:
        return self.run(lambda c: c.gc_run())
