from typing import Any

RECORD_FIELDS: dict[str, dict[str, int]]

def redo_block(record: Any, block_id: int, page: bytes | bytearray | None, /) -> bytes | None: ...
