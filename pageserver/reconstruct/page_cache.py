"""Recently rebuilt pages, shared by every reader in the process."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable


class PageCache:
    """Recently redone pages: a thread-safe LRU of bounded size. Keyed by chain digest
    (`reconstruct`) or by `Timeline.version_ident` (`materialize`): either names exactly
    what the page depends on."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._items: OrderedDict[Hashable, bytes] = OrderedDict()

    def get(self, ident: Hashable) -> bytes | None:
        with self._lock:
            page = self._items.get(ident)
            if page is not None:
                self._items.move_to_end(ident)
            return page

    def put(self, ident: Hashable, page: bytes) -> None:
        with self._lock:
            self._items[ident] = page
            self._items.move_to_end(ident)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


PAGE_CACHE = PageCache(1024)
