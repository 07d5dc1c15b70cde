"""Comparing PostgreSQL's own relation files with pages the pagestore rebuilds.

Shared by the in-process fidelity test and the daemon test: which access method (hence which
wal_consistency_checking mask) each relation file has, the files' pages, and the masked form
of a page that ignores what PostgreSQL changes without WAL.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from pageserver.redo import mask_page
from pageserver.redo.masks import mask_page_content, mask_page_lsn_and_checksum
from pageserver.redo.page import PageError, get_item, page_is_new
from pg15.constants import (
    BLCKSZ,
    RELSEG_SIZE,
    RM_BRIN_ID,
    RM_BTREE_ID,
    RM_GIN_ID,
    RM_GIST_ID,
    RM_HASH_ID,
    RM_HEAP_ID,
    RM_SEQ_ID,
    RM_SPGIST_ID,
)

_REL_FILE = re.compile(r"^(\d+)(_fsm|_vm|_init)?(?:\.(\d+))?$")
_FORKS = {"": 0, "_fsm": 1, "_vm": 2, "_init": 3}

RMGR_OF_KIND = {
    "heap": RM_HEAP_ID,
    "btree": RM_BTREE_ID,
    "hash": RM_HASH_ID,
    "gin": RM_GIN_ID,
    "gist": RM_GIST_ID,
    "spgist": RM_SPGIST_ID,
    "brin": RM_BRIN_ID,
    "sequence": RM_SEQ_ID,
}


def relation_kinds(psql: Callable[[str], str], db_oid: int) -> dict[tuple[int, int, int], str]:
    """(spc, db, filenode) -> mask name, from pg_class and pg_am."""
    out = psql(
        "SELECT pg_relation_filenode(c.oid), c.reltablespace, c.relkind, coalesce(a.amname, '') "
        "FROM pg_class c LEFT JOIN pg_am a ON a.oid = c.relam "
        "WHERE pg_relation_filenode(c.oid) IS NOT NULL"
    )
    kinds: dict[tuple[int, int, int], str] = {}
    for line in out.splitlines():
        node, spc, relkind, am = line.split("|")
        if relkind == "S":
            kind = "sequence"
        elif relkind == "i":
            kind = am
        else:
            kind = "heap"
        key = (1664, 0, int(node)) if spc == "1664" else (1663, db_oid, int(node))
        kinds[key] = kind
    return kinds


def relation_files(directory: Path) -> dict[tuple[int, int], list[tuple[int, Path]]]:
    found: dict[tuple[int, int], list[tuple[int, Path]]] = {}
    for path in directory.iterdir():
        m = _REL_FILE.match(path.name)
        if m and path.is_file():
            key = (int(m.group(1)), _FORKS[m.group(2) or ""])
            found.setdefault(key, []).append((int(m.group(3) or 0), path))
    return found


def fork_pages(segments: list[tuple[int, Path]]) -> list[bytes]:
    pages: list[bytes] = []
    for segno, path in sorted(segments):
        data = path.read_bytes()
        if data:
            assert len(pages) == segno * RELSEG_SIZE
        pages.extend(data[i : i + BLCKSZ] for i in range(0, len(data), BLCKSZ))
    return pages


def masked_page(kind: str, page: bytes, blkno: int) -> bytes:
    """The page under its access method's wal_consistency_checking mask, plus two masks for
    state PostgreSQL changes without WAL: the SP-GiST metapage's last-used-pages cache and a
    sequence's current value (WAL holds the value 32 calls ahead; checked separately)."""
    work = bytearray(page)
    if page_is_new(work):
        return bytes(work)
    try:
        mask_page(RMGR_OF_KIND.get(kind, RM_HEAP_ID), work, blkno)
    except PageError:
        mask_page_lsn_and_checksum(work)
    if kind == "spgist" and blkno == 0:
        mask_page_content(work)
    if kind == "sequence":
        start = sequence_data_offset(page)
        work[start : start + 16] = bytes(16)
    return bytes(work)


def sequence_data_offset(page: bytes) -> int:
    """Offset of FormData_pg_sequence_data (last_value, log_cnt) in a sequence page."""
    item = get_item(page, 1)
    t_hoff = item[22]
    return page.index(item) + t_hoff


def sequence_last_value(page: bytes) -> int:
    start = sequence_data_offset(page)
    return int.from_bytes(page[start : start + 8], "little", signed=True)
