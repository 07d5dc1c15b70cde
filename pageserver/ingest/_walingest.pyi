"""Type stub of the C fast path pageserver/ingest/_walingest.c (see its module comment)."""

from typing import Any

def ingest_run(
    records: list[Any],
    raws: list[bytes | None],
    start: int,
    context: tuple[Any, ...],
    /,
) -> tuple[int, int, int, int | None, int | None]: ...
