"""`decode_main`: the typed main-data struct of a record, dispatched on its rmgr id.

Rmgrs without a decoder here (Hash, Gin, Gist, SPGist, BRIN, Generic, ...) give None: their
records are still fully described by the generic part (blocks, images, block data) in
`pg15.records`. Its own module, not the package's `__init__`: importing one rmgr's structs
(pg_control needs the checkpoint's) must not import every decoder.
"""

from __future__ import annotations

from collections.abc import Callable

from pg15.constants import (
    RM_BTREE_ID,
    RM_CLOG_ID,
    RM_DBASE_ID,
    RM_HEAP2_ID,
    RM_HEAP_ID,
    RM_MULTIXACT_ID,
    RM_RELMAP_ID,
    RM_SEQ_ID,
    RM_SMGR_ID,
    RM_STANDBY_ID,
    RM_TBLSPC_ID,
    RM_XACT_ID,
    RM_XLOG_ID,
)
from pg15.records import DecodedRecord
from pg15.rmgr import (
    btree,
    clog,
    dbase,
    heap,
    multixact,
    relmap,
    sequence,
    smgr,
    standby,
    tblspc,
    xact,
    xlog,
)

DECODERS: dict[int, Callable[[int, bytes], object]] = {
    RM_XLOG_ID: xlog.decode,
    RM_XACT_ID: xact.decode,
    RM_SMGR_ID: smgr.decode,
    RM_CLOG_ID: clog.decode,
    RM_DBASE_ID: dbase.decode,
    RM_MULTIXACT_ID: multixact.decode,
    RM_RELMAP_ID: relmap.decode,
    RM_STANDBY_ID: standby.decode,
    RM_TBLSPC_ID: tblspc.decode,
    RM_HEAP2_ID: heap.decode_heap2,
    RM_HEAP_ID: heap.decode_heap,
    RM_BTREE_ID: btree.decode,
    RM_SEQ_ID: sequence.decode,
}


def decode_main(record: DecodedRecord) -> object | None:
    """The typed main-data struct of `record`, or None for rmgrs not decoded here."""
    decoder = DECODERS.get(record.rmgr_id)
    if decoder is None:
        return None
    return decoder(record.info, record.main_data)
