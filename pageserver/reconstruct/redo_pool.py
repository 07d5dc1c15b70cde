"""Redo of long delta chains in worker processes, so page reads use every core.

Short chains are replayed inline: shipping a chain to a process costs more than a few redo
steps. The workers run `apply_delta.reconstruct`, a pure function of picklable inputs,
and keep their own cache of recently materialized pages.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor

from pageserver.reconstruct.apply_delta import reconstruct
from pageserver.storage.keys import Key
from pageserver.storage.values import ReconstructData

INLINE_MAX_DELTAS = 8


class RedoPool:
    def __init__(self, workers: int | None = None, inline_max: int = INLINE_MAX_DELTAS) -> None:
        self.workers = workers or max(1, min(4, os.cpu_count() or 1))
        self.inline_max = inline_max
        self._executor: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def _pool(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._executor is None:
                # spawn: the daemon has threads (decoders, the event loop) that fork would copy.
                context = multiprocessing.get_context("spawn")
                self._executor = ProcessPoolExecutor(self.workers, mp_context=context)
            return self._executor

    def reconstruct(self, key: Key, lsn: int, data: ReconstructData) -> bytes | None:
        """The same as apply_delta.reconstruct; long chains run in a worker process."""
        if len(data.deltas) <= self.inline_max:
            return reconstruct(key, lsn, data)
        return self._pool().submit(reconstruct, key, lsn, data).result()

    def close(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
