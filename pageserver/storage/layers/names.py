"""Layer file names: key range and LSN range in readable hex, as Neon names them.

    delta  <keystart 36 hex>-<keyend 36 hex>__<lsnstart 16 hex>-<lsnend 16 hex>
    image  <keystart 36 hex>-<keyend 36 hex>__<lsn 16 hex>

Ranges are start-inclusive, end-exclusive; an image layer at LSN L has the LSN range [L, L+1).
A delta layer whose key range is the whole keyspace is an L0 layer (a flushed in-memory layer).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pageserver.storage.keys import FULL_KEYSPACE, KeyRange, key_from_hex, key_to_hex
from proto.errors import InvalidArgument

_HEX_KEY = "[0-9A-F]{36}"
_HEX_LSN = "[0-9A-F]{16}"
_DELTA_RE = re.compile(rf"^({_HEX_KEY})-({_HEX_KEY})__({_HEX_LSN})-({_HEX_LSN})\Z")
_IMAGE_RE = re.compile(rf"^({_HEX_KEY})-({_HEX_KEY})__({_HEX_LSN})\Z")


@dataclass(frozen=True, slots=True)
class LayerName:
    is_image: bool
    key_range: KeyRange
    lsn_start: int
    lsn_end: int

    @staticmethod
    def delta(key_range: KeyRange, lsn_start: int, lsn_end: int) -> LayerName:
        return LayerName(False, key_range, lsn_start, lsn_end)

    @staticmethod
    def image(key_range: KeyRange, lsn: int) -> LayerName:
        return LayerName(True, key_range, lsn, lsn + 1)

    @property
    def is_l0(self) -> bool:
        return not self.is_image and self.key_range == FULL_KEYSPACE

    @property
    def file_name(self) -> str:
        keys = f"{key_to_hex(self.key_range.start)}-{key_to_hex(self.key_range.end)}"
        if self.is_image:
            return f"{keys}__{self.lsn_start:016X}"
        return f"{keys}__{self.lsn_start:016X}-{self.lsn_end:016X}"

    def __str__(self) -> str:
        return self.file_name


def parse_layer_name(name: str) -> LayerName | None:
    """The LayerName a file name encodes, or None if it is not a layer file name."""
    try:
        return _parse(name)
    except InvalidArgument:
        return None


def _parse(name: str) -> LayerName | None:
    m = _DELTA_RE.match(name)
    if m:
        start, end = int(m.group(3), 16), int(m.group(4), 16)
        if start >= end:
            return None
        return LayerName.delta(
            KeyRange(key_from_hex(m.group(1)), key_from_hex(m.group(2))), start, end
        )
    m = _IMAGE_RE.match(name)
    if m:
        return LayerName.image(
            KeyRange(key_from_hex(m.group(1)), key_from_hex(m.group(2))), int(m.group(3), 16)
        )
    return None
