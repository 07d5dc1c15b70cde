"""A request still running after SLOW_REQUEST_SECONDS leaves every thread's stack and every
asyncio task's chain of awaits in the daemon's stderr (`pageserver.stderr`), once, and a
warning naming it in its log. A `pg checkout` hung once in the branch request for more
than ten minutes with the daemon idle, and nobody had sent `kill -USR1` (pageserver/daemon.py)
before it was stopped: the next such hang leaves its own report. A long request is not
necessarily stuck (a basebackup of a big database streams for minutes): the report says so,
and costs nothing but its lines."""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from pageserver.task_stacks import format_task_stacks

log = logging.getLogger(__name__)

SLOW_REQUEST_SECONDS = 300.0


@contextmanager
def reported_if_slow(method: str) -> Iterator[None]:
    """Within a request handler on the event loop: a report after SLOW_REQUEST_SECONDS if
    the request has not ended by then (a loop that is itself blocked reports nothing: the
    USR1 dump shows that one)."""
    loop = asyncio.get_running_loop()
    started = loop.time()

    def report() -> None:
        log.warning(
            "request %s has run for %.0f s (not necessarily stuck); the threads' stacks and "
            "the asyncio tasks follow on stderr, for a report if it never ends",
            method,
            loop.time() - started,
        )
        try:
            faulthandler.dump_traceback(sys.stderr, all_threads=True)
            sys.stderr.write(format_task_stacks(loop))
            sys.stderr.flush()
        except (OSError, ValueError) as exc:  # stderr closed or not a file: the log line stays
            log.warning("cannot write the stacks of the slow request %s: %s", method, exc)

    timer = loop.call_later(SLOW_REQUEST_SECONDS, report)
    try:
        yield
    finally:
        timer.cancel()
