"""Sequence rmgr (15): the logged sequence tuple (values pre-advanced by SEQ_LOG_VALS)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pg15.records import RelFileNode
from pg15.rmgr.fields import MainDataError, relfilenode, unpack

XLOG_SEQ_LOG = 0x00
_SEQ_DATA = struct.Struct("<qq?")
_T_HOFF_OFFSET = 22  # HeapTupleHeaderData.t_hoff


@dataclass(frozen=True, slots=True)
class SeqLog:
    """`tuple_data` is the whole heap tuple (header + FormData_pg_sequence_data)."""

    rnode: RelFileNode
    tuple_data: bytes
    last_value: int
    log_cnt: int
    is_called: bool


def decode(info: int, data: bytes) -> SeqLog:
    if info & 0xF0 != XLOG_SEQ_LOG:
        raise MainDataError(f"unknown Sequence record info {info:#04x}")
    rnode = relfilenode(data, 0, "Sequence LOG")
    tup = data[12:]
    if len(tup) <= _T_HOFF_OFFSET:
        raise MainDataError(f"Sequence LOG: tuple of {len(tup)} bytes")
    last_value, log_cnt, is_called = unpack(_SEQ_DATA, tup, tup[_T_HOFF_OFFSET], "Sequence LOG")
    return SeqLog(rnode, tup, last_value, log_cnt, is_called)
