"""Flushing and compaction off the decode thread, on two threads of their own.

Writing a frozen in-memory layer and compacting (L0 merges, image layers: redo of every page
with deltas) took seconds on the decode thread, and ingest stood still meanwhile: under a
steady write load the ingested lag jumped by those seconds at every flush. A node store now
has one worker thread that writes frozen layers and another that compacts, so neither ingest
nor a flush waits for a compaction: ingest waits only when the store's bound of frozen layers
(memory) are waiting to be written, and a timeline switch or a snapshot only for the frozen
layers written. A failed flush is retried on the decode thread, where the follower's stall
handling (a full disk) sees it; a failed compaction is logged and tried again after the next
flush. At shutdown a running compaction is cancelled (`stop`): the timeline's compaction
code deletes the files it had not published yet, so no layer is lost or half visible.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

Job = Callable[[], None]

LINGER = 5.0
"""Seconds a compaction stays paused after the last foreground request ended: a snapshot's
wait polls with requests of half a second, and a checkout's last request (the delta) is
followed by its fsyncs, the single-user step and the start, seconds without a request
(py-spy: the compaction that resumed 2 s after the delta took a quarter of the daemon's
samples during the checkout)."""
MAX_PAUSE = 60.0
"""Seconds one compaction pass may be paused in all, so a stream of requests never starves
it (the L0 layers it merges make every read slower)."""
PAUSE_POLL = 0.05
"""Seconds between two looks of a paused pass at whether it may go on (a linger ended, the
pass cancelled); a `release` wakes it at once."""

_released = threading.Condition()
"""Notified by `Foreground.release` and `BackgroundWorker.stop` (`_wake_paused`): a pass paused
for a catch-up goes on as soon as the decode thread says it is done (it polled every
PAUSE_POLL: bench.ingest's final image pass began 30 ms after the durable point, on average),
and a cancelled one ends at once."""


def _wake_paused() -> None:
    with _released:
        _released.notify_all()


class Foreground:
    """Requests someone waits for (a checkout's delta, a snapshot's or a checkout's wait for
    ingest, a branch) take the CPU from compaction: on a 2-core box a compaction pass beside
    a checkout after `pgbench -c 4` took more of the daemon's time than the checkout itself
    (py-spy: 57% of its samples), and images written at the newest LSN do not help a checkout
    to an older snapshot. A running pass pauses at its next check (a key of an L0 merge, an
    image partition) while any request is held and LINGER seconds after; flushes never wait
    (ingest needs them)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = 0
        self._until = 0.0

    @contextmanager
    def held(self) -> Iterator[None]:
        with self._lock:
            self._active += 1
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1
                self._until = time.monotonic() + LINGER

    def busy(self) -> bool:
        return self._active > 0 or time.monotonic() < self._until

    def hold_for(self, seconds: float) -> None:
        """Busy from now for `seconds` (a signal with no end of its own to wait for)."""
        with self._lock:
            self._until = max(self._until, time.monotonic() + seconds)

    def release(self) -> None:
        """Not busy after the held requests end (the linger of hold_for and held dropped);
        a pass paused for it goes on at once."""
        with self._lock:
            self._until = 0.0
        _wake_paused()

    def yielding(self, cancelled: threading.Event, *others: Foreground) -> Callable[[], bool]:
        """A compaction pass's check: pauses while foreground work runs, here or in `others`
        (at most MAX_PAUSE seconds over the pass), then says whether the pass is cancelled."""
        budget = MAX_PAUSE

        def busy() -> bool:
            return self.busy() or any(other.busy() for other in others)

        def check() -> bool:
            nonlocal budget
            if budget > 0 and busy() and not cancelled.is_set():
                t0 = time.monotonic()
                while busy() and not cancelled.is_set() and time.monotonic() - t0 < budget:
                    with _released:  # busy() again under it: a release now wakes the wait
                        if busy():
                            _released.wait(PAUSE_POLL)
                paused = time.monotonic() - t0
                budget -= paused
                log.info("compaction paused %.1f s for the requests being served", paused)
            return cancelled.is_set()

        return check


FOREGROUND = Foreground()
"""The daemon's: its request handlers hold it, every node store's compaction yields to it."""


class BackgroundWorker:
    """Runs requested jobs on its own thread, oldest request first; one pending job per key (a
    later request for a key replaces its earlier one not yet started, so requests for two
    timelines never cover each other). `mutex` is held while a job runs, here or in a caller
    that does the same work synchronously, so the two never overlap. `cancelled` is set by
    `stop`: a long job checks it and ends early."""

    def __init__(self, name: str) -> None:
        self.mutex = threading.Lock()
        self.cancelled = threading.Event()
        self._name = name
        self._cond = threading.Condition()
        self._jobs: dict[str, Job] = {}
        self._running = False
        self._stopped = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def request(self, key: str, job: Job) -> None:
        """Queue `job` (ignored once stopped)."""
        with self._cond:
            if self._stopped:
                return
            self._jobs.pop(key, None)
            self._jobs[key] = job
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
            while self._jobs or self._running:
                self._cond.wait(0.5)

    @property
    def busy(self) -> bool:
        with self._cond:
            return bool(self._jobs) or self._running

    @property
    def queued(self) -> bool:
        """Whether a job waits to run after the running one."""
        with self._cond:
            return bool(self._jobs)

    def notify(self) -> None:
        """Wake `wait`'s callers to check again (a job's work ended on another thread)."""
        with self._cond:
            self._cond.notify_all()

    def stop(self) -> None:
        """Drop the queued jobs, cancel the running one (`cancelled`) and wait until it has
        ended and the thread is gone; later requests are ignored."""
        with self._cond:
            self._stopped = True
            self._jobs.clear()
            self.cancelled.set()
            thread = self._thread
            self._cond.notify_all()
        _wake_paused()  # a compaction pass paused for foreground work ends now
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    self._thread = None
                    self._cond.notify_all()
                    return
                key = next(iter(self._jobs))
                job = self._jobs.pop(key)
                self._running = True
            try:
                with self.mutex:
                    job()
            except BaseException as exc:  # kept for the owner (the decode thread retries)
                log.warning("%s: background job for %s failed: %s", self._name, key, exc)
                with self._cond:
                    self._error = exc
            finally:
                with self._cond:
                    self._running = False
                    self._cond.notify_all()
