"""Type stub of the C fast path pageserver/ingest/_walingest.c (see its module comment)."""

from typing import Any

def ingest_run(
    records: list[Any],
    raws: list[bytes | None],
    start: int,
    context: tuple[Any, ...],
    /,
) -> tuple[int, int, int, int | None, int | None]: ...
def ingest_raw_run(
    records: list[Any],
    start: int,
    context: tuple[Any, ...],
    /,
) -> tuple[int, int, int, int | None, int | None]: ...
def index_entries(
    records: list[Any],
    start: int,
    stop: int,
    last_lsn: int,
    last_sample: int,
    c_max: int | None,
    sample_distance: int,
    /,
) -> tuple[int, int, int, bytes, bytes, bytes, bytes, bytes, bytes]: ...
