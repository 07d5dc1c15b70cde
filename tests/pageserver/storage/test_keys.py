"""Keyspace encoding, order, ranges and descriptions; value encoding; layer file names."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pageserver.storage import keys as K
from pageserver.storage.layers.names import LayerName, parse_layer_name
from pageserver.storage.values import (
    TOMBSTONE,
    Image,
    ReconstructData,
    WalDelta,
    decode_value,
    encode_value,
    value_size,
)
from proto.errors import CorruptData, InvalidArgument

u8 = st.integers(0, 0xFE)
u32 = st.integers(0, 0xFFFFFFFF)
fields = st.tuples(u8, u32, u32, u32, st.integers(0, 0xFF), u32)


@given(fields, fields)
def test_byte_order_is_field_order(a: tuple[int, ...], b: tuple[int, ...]) -> None:
    ka, kb = K.make_key(*a), K.make_key(*b)
    assert len(ka) == K.KEY_SIZE
    assert (ka < kb) == (a < b)
    assert (ka == kb) == (a == b)


@given(fields)
def test_fields_round_trip(f: tuple[int, ...]) -> None:
    key = K.make_key(*f)
    parsed = K.key_fields(key)
    assert (
        parsed.field1,
        parsed.field2,
        parsed.field3,
        parsed.field4,
        parsed.field5,
        parsed.field6,
    ) == f
    assert K.key_from_hex(K.key_to_hex(key)) == key


@given(st.lists(fields, max_size=20))
def test_many_keys_fields_at_once(many: list[tuple[int, ...]]) -> None:
    assert K.keys_fields(K.make_key(*f) for f in many) == many


@pytest.mark.parametrize("size", [0, 17, 19])
def test_many_keys_fields_refuse_a_key_of_another_size(size: int) -> None:
    good = K.make_key(0, 1663, 5, 16384, 0, 7)
    with pytest.raises(InvalidArgument, match="a key is 18 bytes"):
        K.keys_fields([good, b"\x00" * size, good])
    with pytest.raises(InvalidArgument):  # together the size of two keys
        K.keys_fields([b"\x00" * 17, b"\x00" * 19])


def test_field_out_of_range_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument):
        K.make_key(0, 1 << 32, 0, 0, 0, 0)
    with pytest.raises(InvalidArgument):
        K.rel_block_key(1663, 5, 0, 0, 1)  # relnode 0 is not a relation
    with pytest.raises(InvalidArgument):
        K.check_key(b"\x00" * 17)
    with pytest.raises(InvalidArgument):
        K.check_key(K.KEY_MAX)
    with pytest.raises(InvalidArgument):
        K.key_successor(K.KEY_MAX)


def test_well_known_keys_are_distinct_and_ordered() -> None:
    special = [
        K.DB_DIR_KEY,
        K.relmap_file_key(1664, 0),
        K.rel_dir_key(1663, 5),
        K.rel_block_key(1663, 5, 16384, 0, 0),
        K.rel_size_key(1663, 5, 16384, 0),
        K.slru_dir_key(K.SlruKind.CLOG),
        K.slru_block_key(K.SlruKind.CLOG, 0, 3),
        K.slru_segment_size_key(K.SlruKind.CLOG, 0),
        K.TWOPHASE_DIR_KEY,
        K.twophase_file_key(1234),
        K.CONTROLFILE_KEY,
        K.CHECKPOINT_KEY,
        K.NODE_METADATA_KEY,
    ]
    assert len(set(special)) == len(special)
    assert K.DB_DIR_KEY == K.KEY_MIN
    # Prefix groups sort as the table in keys.py says.
    assert K.rel_size_key(1663, 5, 16384, 0) < K.slru_dir_key(K.SlruKind.CLOG)
    assert K.slru_segment_size_key(K.SlruKind.MULTIXACT_OFFSETS, 9) < K.TWOPHASE_DIR_KEY
    assert K.twophase_file_key(0xFFFFFFFF) < K.CONTROLFILE_KEY


def test_relation_and_fork_ranges() -> None:
    rel = K.relation_range(1663, 5, 16384)
    for fork in range(4):
        assert K.rel_block_key(1663, 5, 16384, fork, 0) in rel
        assert K.rel_block_key(1663, 5, 16384, fork, 0xFFFFFFFE) in rel
        assert K.rel_size_key(1663, 5, 16384, fork) in rel
    assert K.rel_block_key(1663, 5, 16385, 0, 0) not in rel
    assert K.rel_block_key(1663, 5, 16383, 3, 9) not in rel
    blocks = K.fork_blocks_range(1663, 5, 16384, 0)
    assert K.rel_block_key(1663, 5, 16384, 0, 7) in blocks
    assert K.rel_size_key(1663, 5, 16384, 0) not in blocks
    assert K.rel_size_key(1663, 5, 16384, 0) in K.fork_range(1663, 5, 16384, 0)
    assert K.rel_block_key(1663, 5, 16384, 1, 0) not in K.fork_range(1663, 5, 16384, 0)


def test_database_range_holds_everything_of_one_database_only() -> None:
    db = K.database_range(1663, 5)
    inside = [
        K.relmap_file_key(1663, 5),
        K.rel_dir_key(1663, 5),
        K.rel_block_key(1663, 5, 1, 0, 0),
        K.rel_block_key(1663, 5, 0xFFFFFFFF, 3, 5),
        K.rel_size_key(1663, 5, 0xFFFFFFFF, 3),
    ]
    outside = [
        K.DB_DIR_KEY,
        K.relmap_file_key(1663, 4),
        K.relmap_file_key(1663, 6),
        K.rel_block_key(1663, 6, 1, 0, 0),
        K.rel_block_key(1664, 5, 1, 0, 0),
        K.relmap_file_key(1664, 0),
    ]
    assert all(k in db for k in inside)
    assert not any(k in db for k in outside)
    rels = K.database_relations_range(1663, 5)
    assert K.relmap_file_key(1663, 5) not in rels and K.rel_dir_key(1663, 5) not in rels
    assert K.rel_block_key(1663, 5, 1, 0, 0) in rels
    assert all(k in K.RELATION_KEYSPACE for k in inside + outside)
    assert K.slru_dir_key(K.SlruKind.CLOG) not in K.RELATION_KEYSPACE


def test_slru_and_twophase_ranges() -> None:
    clog = K.slru_range(K.SlruKind.CLOG)
    assert K.slru_dir_key(K.SlruKind.CLOG) in clog
    assert K.slru_block_key(K.SlruKind.CLOG, 0xFFFF, 31) in clog
    assert K.slru_block_key(K.SlruKind.MULTIXACT_MEMBERS, 0, 0) not in clog
    seg = K.slru_segment_blocks_range(K.SlruKind.CLOG, 2)
    assert K.slru_block_key(K.SlruKind.CLOG, 2, 0) in seg
    assert K.slru_segment_size_key(K.SlruKind.CLOG, 2) not in seg
    assert K.twophase_file_key(7) in K.TWOPHASE_FILES_RANGE
    assert K.TWOPHASE_DIR_KEY not in K.TWOPHASE_FILES_RANGE


def test_parsers() -> None:
    parsed = K.parse_rel_block_key(K.rel_block_key(1663, 5, 16384, 2, 7))
    assert parsed == K.RelBlock(1663, 5, 16384, 2, 7)
    assert K.parse_rel_block_key(K.rel_size_key(1663, 5, 16384, 0)) is None
    assert K.parse_rel_block_key(K.relmap_file_key(1663, 5)) is None
    slru = K.slru_block_key(K.SlruKind.MULTIXACT_OFFSETS, 3, 4)
    assert K.parse_slru_block_key(slru) == (K.SlruKind.MULTIXACT_OFFSETS, 3, 4)
    assert K.parse_twophase_file_key(K.twophase_file_key(99)) == 99
    assert K.parse_twophase_file_key(K.TWOPHASE_DIR_KEY) is None


@pytest.mark.parametrize(
    ("key", "text"),
    [
        (K.rel_block_key(1663, 5, 16384, 0, 7), "rel 1663/5/16384 fork main blk 7"),
        (K.rel_size_key(1663, 5, 16384, 2), "rel 1663/5/16384 fork vm size"),
        (K.DB_DIR_KEY, "database directory"),
        (K.relmap_file_key(1664, 0), "relmap file 1664/0"),
        (K.rel_dir_key(1663, 5), "relation directory 1663/5"),
        (K.slru_block_key(K.SlruKind.CLOG, 1, 2), "pg_xact segment 0001 blk 2"),
        (K.slru_dir_key(K.SlruKind.MULTIXACT_MEMBERS), "pg_multixact/members directory"),
        (K.twophase_file_key(42), "two-phase state of xid 42"),
        (K.CHECKPOINT_KEY, "checkpoint"),
        (K.CONTROLFILE_KEY, "pg_control"),
        (K.NODE_METADATA_KEY, "node metadata"),
    ],
)
def test_describe(key: K.Key, text: str) -> None:
    assert K.describe(key) == text


def test_key_range_operations() -> None:
    a = K.KeyRange(K.make_key(0, 0, 0, 1, 0, 0), K.make_key(0, 0, 0, 5, 0, 0))
    b = K.KeyRange(K.make_key(0, 0, 0, 4, 0, 0), K.make_key(0, 0, 0, 9, 0, 0))
    assert a.overlaps(b) and b.overlaps(a)
    assert a.intersection(b) == K.KeyRange(b.start, a.end)
    assert K.FULL_KEYSPACE.covers(a) and not a.covers(b)
    c = K.KeyRange(a.end, b.end)
    assert not a.overlaps(c) and a.intersection(c) is None
    with pytest.raises(InvalidArgument):
        K.KeyRange(b.end, a.start)
    one = K.single_key_range(K.CHECKPOINT_KEY)
    assert K.CHECKPOINT_KEY in one and K.NODE_METADATA_KEY not in one


@given(
    st.one_of(
        st.binary(max_size=50).map(Image),
        st.builds(WalDelta, st.binary(max_size=50), st.booleans()),
        st.just(TOMBSTONE),
    )
)
def test_value_round_trip(value: Image | WalDelta) -> None:
    raw = encode_value(value)
    assert len(raw) == value_size(value)
    assert decode_value(raw) == value


def test_value_decode_rejects_garbage() -> None:
    with pytest.raises(CorruptData):
        decode_value(b"")
    with pytest.raises(CorruptData):
        decode_value(b"\x09abc")


def test_reconstruct_data_flags() -> None:
    assert ReconstructData(None, ()).is_empty
    assert ReconstructData((1, b"x"), ()).is_complete
    assert ReconstructData(None, ((2, WalDelta(b"r", True)),)).is_complete
    assert not ReconstructData(None, ((2, WalDelta(b"r", False)),)).is_complete


def test_layer_names_round_trip() -> None:
    rng = K.relation_range(1663, 5, 16384)
    delta = LayerName.delta(rng, 0x10, 0x2000)
    image = LayerName.image(rng, 0x1F)
    assert parse_layer_name(delta.file_name) == delta
    assert parse_layer_name(image.file_name) == image
    keys = f"{K.key_to_hex(rng.start)}-{K.key_to_hex(rng.end)}"
    assert delta.file_name == keys + "__0000000000000010-0000000000002000"
    assert image.file_name == keys + "__000000000000001F"
    assert LayerName.delta(K.FULL_KEYSPACE, 1, 2).is_l0 and not delta.is_l0
    assert not LayerName.image(K.FULL_KEYSPACE, 1).is_l0
    for bad in ["manifest.json", delta.file_name + ".___temp", "00-11__22", delta.file_name[1:]]:
        assert parse_layer_name(bad) is None
    # An inverted range is not a layer name.
    swapped = f"{K.key_to_hex(rng.end)}-{K.key_to_hex(rng.start)}__0000000000000001"
    assert parse_layer_name(swapped) is None
