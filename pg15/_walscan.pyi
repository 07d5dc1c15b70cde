from typing import Any

crc_implementation: str

def init_reader(raw_record_type: type, /) -> None: ...
def init_decoder(
    decoded_record: type, block_ref: type, block_image: type, rel_file_node: Any, fallback: Any, /
) -> None: ...
def scan(
    buf: bytes,
    base: int,
    pos: int,
    prev_lsn: int,
    segment_size: int,
    system_id: int | None,
    timeline: int,
    max_records: int,
    /,
) -> list[Any]: ...
def decode_record(raw: Any, /) -> Any: ...
def decode_records(batch: list[Any], /) -> list[Any]: ...
def crc32c(data: bytes | bytearray | memoryview, start: int = 0, /) -> int: ...
