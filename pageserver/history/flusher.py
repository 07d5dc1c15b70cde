"""Flushing and compaction off the decode thread.

Writing a frozen in-memory layer and compacting (L0 merges, image layers: redo of every page
with deltas) took seconds on the decode thread, and ingest stood still meanwhile: under a
steady write load the ingested lag jumped by those seconds at every flush. One thread per node
store now does that work while ingest goes on; the store bounds how many frozen layers may
wait for it (memory), and a failed flush is retried on the decode thread, where the follower's
stall handling (a full disk) sees it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

Job = Callable[[], None]


class BackgroundFlusher:
    """Runs the latest requested flush job on its own thread (a later request covers an
    earlier one not yet started). `mutex` is held while any flush runs, here or in a caller
    that flushes synchronously, so the two never overlap."""

    def __init__(self, name: str) -> None:
        self.mutex = threading.Lock()
        self._name = name
        self._cond = threading.Condition()
        self._job: Job | None = None
        self._running = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def request(self, job: Job) -> None:
        with self._cond:
            self._job = job
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def take_error(self) -> BaseException | None:
        """The error of the last failed job, once (the caller retries synchronously)."""
        with self._cond:
            error, self._error = self._error, None
            return error

    def wait(self, done: Callable[[], bool]) -> None:
        """Block until done() (checked whenever a job ends); raise a job's error instead."""
        with self._cond:
            while not done():
                error, self._error = self._error, None
                if error is not None:
                    raise error
                self._cond.wait(0.5)

    def wait_idle(self) -> None:
        """Until no job is queued or running (errors stay for take_error)."""
        with self._cond:
            while self._job is not None or self._running:
                self._cond.wait(0.5)

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._job is None:
                    self._cond.wait()
                job, self._job = self._job, None
                self._running = True
            try:
                with self.mutex:
                    job()
            except BaseException as exc:  # kept for the decode thread, which retries
                log.warning("%s: background flush failed: %s", self._name, exc)
                with self._cond:
                    self._error = exc
            finally:
                with self._cond:
                    self._running = False
                    self._cond.notify_all()
