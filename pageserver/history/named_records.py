"""A small durable registry of named records (snapshots, PITR areas) in one JSON file."""

from __future__ import annotations

import json
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from durable_files import write_file_durably
from proto.errors import AlreadyExists, NotFound


class Named(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def created_at(self) -> float: ...


T = TypeVar("T", bound=Named)


class NamedRecords(Generic[T]):
    """Thread-safe; every change is written to a temp file, fsynced and renamed."""

    def __init__(self, path: Path, cls: type[T], what: str, hint: str) -> None:
        self.path = path
        self._cls = cls
        self.what = what
        self.hint = hint
        self._lock = threading.Lock()

    def _load(self) -> dict[str, T]:
        if not self.path.exists():
            return {}
        items: list[dict[str, Any]] = json.loads(self.path.read_text())
        return {item["name"]: self._cls(**item) for item in items}

    def _save(self, records: dict[str, T]) -> None:
        data = json.dumps([asdict(r) for r in records.values()], indent=1)  # type: ignore[call-overload]
        write_file_durably(self.path, data.encode())

    def all(self) -> list[T]:
        with self._lock:
            return sorted(self._load().values(), key=lambda r: (r.created_at, r.name))

    def find(self, name: str) -> T | None:
        with self._lock:
            return self._load().get(name)

    def get(self, name: str) -> T:
        record = self.find(name)
        if record is None:
            raise NotFound(f"{self.what} {name!r} does not exist; see {self.hint}")
        return record

    def add(self, record: T, *, replace: bool = False) -> T:
        with self._lock:
            records = self._load()
            if record.name in records and not replace:
                raise AlreadyExists(f"{self.what} {record.name!r} already exists")
            records[record.name] = record
            self._save(records)
            return record

    def remove(self, name: str) -> T:
        with self._lock:
            records = self._load()
            if name not in records:
                raise NotFound(f"{self.what} {name!r} does not exist; see {self.hint}")
            record = records.pop(name)
            self._save(records)
            return record
