"""PITR areas: a retention policy (TTL and/or size) over one node's WAL history, inside which
any record boundary (or the last commit before a time) can be extracted as a snapshot."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from pageserver.history.named_records import NamedRecords
from pageserver.history.snapshots import NAME_RULE, is_valid_name
from pageserver.storage.retention import RetentionPolicy
from proto.errors import InvalidArgument


@dataclass(frozen=True, slots=True)
class PitrArea:
    name: str
    node_id: str
    ttl: str
    size_limit: str
    created_at: float

    def policy(self) -> RetentionPolicy:
        """The stored policy, as stored (no range check: older areas must still load)."""
        return RetentionPolicy.parse(self.ttl, self.size_limit)


def check_area_name(name: str) -> str:
    if not is_valid_name(name):
        raise InvalidArgument(
            f"invalid PITR area name {name!r}: a PITR area name is {NAME_RULE} (e.g. daily)"
        )
    return name


def new_area(name: str, node_id: str, ttl: str, size_limit: str) -> PitrArea:
    check_area_name(name)
    RetentionPolicy.parse_new(ttl, size_limit)  # validates both, ranges included
    return PitrArea(name, node_id, ttl, size_limit, time.time())


def pitr_registry(path: Path) -> NamedRecords[PitrArea]:
    return NamedRecords(path, PitrArea, "PITR area", "`neon pitr list`")
