from collections.abc import Callable
from typing import Any

RECORD_FIELDS: dict[str, dict[str, int]]

def init(fallback: Callable[[Any, int, bytes | None], bytes], /) -> None: ...
def try_redo_block(
    record: Any, block_id: int, page: bytes | bytearray | None, /
) -> bytes | None: ...
def redo_block(record: Any, block_id: int, page: bytes | None, /) -> bytes: ...
