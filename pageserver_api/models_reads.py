"""The models of reads at an LSN (`neon debug`): pages, relation sizes, databases, relations.

Imported on first use through pageserver_api.models (its module docstring says why).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pageserver_api.models import (
    DEFAULT_WAIT_SECONDS,
    ApiRequest,
    ApiResponse,
    _check_lsn,
    _check_wait,
    fork_number,
    method,
)


@dataclass(frozen=True, slots=True)
class ReadAt(ApiRequest):
    """A read of a node's pages at `lsn` (default: the latest ingested); a future LSN is
    waited for up to `wait_timeout` seconds."""

    node_id: str
    lsn: int | None = field(default=None, kw_only=True)
    wait_timeout: float = field(default=DEFAULT_WAIT_SECONDS, kw_only=True)

    def __post_init__(self) -> None:
        _check_lsn("lsn", self.lsn)
        _check_wait(self.wait_timeout)


@dataclass(frozen=True, slots=True)
class PageResponse(ApiResponse):
    lsn: int
    page: bytes


@method("page.get", PageResponse)
@dataclass(frozen=True, slots=True)
class PageGetRequest(ReadAt):
    spc: int
    db: int
    rel: int
    blkno: int
    fork: int | str = "main"

    def __post_init__(self) -> None:
        ReadAt.__post_init__(self)
        fork_number(self.fork)


@dataclass(frozen=True, slots=True)
class RelSizeResponse(ApiResponse):
    lsn: int
    nblocks: int


@method("rel.size", RelSizeResponse)
@dataclass(frozen=True, slots=True)
class RelSizeRequest(ReadAt):
    spc: int
    db: int
    rel: int
    fork: int | str = "main"

    def __post_init__(self) -> None:
        ReadAt.__post_init__(self)
        fork_number(self.fork)


@dataclass(frozen=True, slots=True)
class DbListResponse(ApiResponse):
    lsn: int
    dbs: list[list[int]]
    """[spc, db] of every database, [1664, 0] standing for the shared catalogs."""


@method("db.list", DbListResponse)
@dataclass(frozen=True, slots=True)
class DbListRequest(ReadAt):
    pass


@dataclass(frozen=True, slots=True)
class RelListResponse(ApiResponse):
    lsn: int
    rels: list[list[int]]
    """[relfilenode, fork] of every relation fork of the database."""


@method("rel.list", RelListResponse)
@dataclass(frozen=True, slots=True)
class RelListRequest(ReadAt):
    spc: int
    db: int
