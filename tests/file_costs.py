"""The order in which test files are handed to the xdist workers: the costliest first.

`-n 2 --dist loadfile` keeps a file on one worker and hands the next file to whichever
worker runs out; xdist's own order (most tests first) left files of a few long end-to-end
tests for the end, where one ran alone while the other worker idled. Handed out longest
first, the files last in the queue are short and the two workers end close together.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

SECONDS: dict[str, float] = {
    "tests/pageserver/storage/test_merge_flush.py": 234,
    "tests/e2e/test_s3_history.py": 124,
    "tests/e2e/test_snapshot_recv.py": 123,
    "tests/pg15/test_waldump_oracle.py": 106,
    "tests/e2e/test_pitr_faithfulness.py": 97,
    "tests/pageserver/redo/test_verify_index_ams.py": 91,
    "tests/e2e/test_attach.py": 76,
    "tests/e2e/test_warm_commands.py": 74,
    "tests/e2e/test_tablespaces.py": 68,
    "tests/e2e/test_snapshots_checkout.py": 68,
    "tests/cli/test_nodes.py": 67,
    "tests/e2e/test_tablespace_import.py": 66,
    "tests/e2e/test_checkout_delta.py": 64,
    "tests/security/test_port_squatter.py": 64,
    "tests/e2e/test_snapshot_resume.py": 60,
    "tests/e2e/test_snapshot_import.py": 57,
    "tests/e2e/test_pagestore_fidelity.py": 57,
    "tests/pageserver/redo/test_verify.py": 57,
    "tests/e2e/test_snapshot_export.py": 57,
    "tests/e2e/test_console.py": 53,
    "tests/pageserver/ingest/test_import_neon.py": 52,
    "tests/pageserver/history/test_compaction_stop.py": 52,
    "tests/e2e/test_snapshot_delta.py": 46,
    "tests/pageserver/basebackup/test_bulk_basebackup.py": 45,
    "tests/e2e/test_checkout_short_head.py": 44,
    "tests/e2e/test_snapshot_diff.py": 40,
    "tests/walreceiver/test_replication.py": 36,
    "tests/e2e/test_checkout_prepared.py": 36,
    "tests/pg15/test_native_walscan.py": 33,
    "tests/pageserver/redo/test_native_redo.py": 32,
    "tests/pageserver/api/test_page_service.py": 31,
    "tests/e2e/test_disk_full.py": 30,
    "tests/e2e/test_checkout_wal_tail.py": 30,
    "tests/pageserver/ingest/test_native_ingest.py": 30,
    "tests/e2e/test_pitr_gc.py": 29,
    "tests/pageserver/storage/layers/test_l0_merge.py": 29,
    "tests/pageserver/reconstruct/test_range_rebuild.py": 29,
    "tests/pageserver/ingest/test_live_import.py": 27,
    "tests/pageserver/basebackup/test_basebackup_datadir.py": 27,
    "tests/pageserver/history/test_node_store.py": 27,
    "tests/e2e/test_remote_pageserver.py": 26,
    "tests/e2e/test_rest.py": 25,
    "tests/e2e/test_replicas.py": 25,
    "tests/cli/transport/test_ssh.py": 25,
    "tests/pageserver/history/test_usage.py": 25,
    "tests/pageserver/follow/test_receiver_process.py": 25,
    "tests/e2e/test_ingest_wait.py": 25,
    "tests/e2e/test_push_delta_parent.py": 24,
    "tests/e2e/test_container.py": 23,
    "tests/cli/test_lazy_imports.py": 22,
    "tests/pageserver/storage/layers/test_compaction_publish.py": 22,
    "tests/e2e/test_live_import.py": 22,
    "tests/e2e/test_container_s3.py": 22,
    "tests/security/test_hostile_local_user.py": 20,
    "tests/pageserver/follow/test_node_follower.py": 20,
    "tests/walreceiver/test_base_backup.py": 20,
    "tests/cli/transport/test_resume.py": 20,
    "tests/cli/test_cli_errors.py": 19,
    "tests/cli/test_node_names.py": 18,
    "tests/cli/test_push_guess.py": 18,
    "tests/cli/transport/test_neon_file_import.py": 18,
    "tests/pageserver/remote/test_remote_history.py": 17,
    "tests/pageserver/test_daemon.py": 17,
    "tests/e2e/test_destroy_after_killed_checkout.py": 17,
    "tests/pageserver/remote/test_index_fence.py": 16,
    "tests/e2e/test_checkout_during_exit.py": 15,
    "tests/pageserver/api/test_pitr_commits.py": 14,
    "tests/pageserver/reconstruct/test_range_reads.py": 14,
    "tests/e2e/test_destroy_history.py": 13,
    "tests/cli/transport/test_base.py": 12,
    "tests/cli/test_node_lock.py": 12,
    "tests/pageserver/storage/layers/test_narrow_index.py": 11,
    "tests/cli/test_pg_show.py": 11,
    "tests/snapfile/test_roundtrip.py": 10,
}
"""A file's seconds on one of two workers (its tests' setup, call and teardown, summed from
`--durations=0` of the clean-clone CI runs at e9096a5 and 2c570c2, the latter where it ran
the whole file), for every file of 10 s or more: the order is only as good as these, and
session 24's table (at load 8-15) had drifted to a fifth of some files' cost and five times
others' (test_merge_flush.py 940 s against 212, test_s3_history.py unnamed: 80 estimated
against 240)."""

UNMEASURED_PER_TEST = 0.4
"""A file SECONDS does not name is taken to cost this many seconds a test..."""
UNMEASURED_E2E_PER_TEST = 8.0
"""...or this many, an end-to-end file (tests/e2e/: the two below 10 s took 8 s a test)."""


class Item(Protocol):
    @property
    def nodeid(self) -> str: ...


T = TypeVar("T", bound=Item)


def file_of(item: Item) -> str:
    return item.nodeid.partition("::")[0]


def per_test(file: str) -> float:
    return UNMEASURED_E2E_PER_TEST if file.startswith("tests/e2e/") else UNMEASURED_PER_TEST


def costliest_first(items: Sequence[T]) -> list[T]:
    """The items, file by file, files by their seconds descending (SECONDS, else an
    estimate a test), equal ones as found; a file's tests in their own order."""
    counts: dict[str, int] = {}
    for item in items:
        counts[file_of(item)] = counts.get(file_of(item), 0) + 1
    first = {file: index for index, file in enumerate(counts)}

    def rank(item: T) -> tuple[float, int]:
        file = file_of(item)
        return (-SECONDS.get(file, counts[file] * per_test(file)), first[file])

    return sorted(items, key=rank)
