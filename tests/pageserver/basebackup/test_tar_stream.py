"""Basebackup pieces without a server: pg_control writer, the checkpoint WAL segment (checked
with our WalReader and the real pg_waldump / pg_controldata), LSN normalization, the tar layout
from an in-memory source, and the untar's refusal of hostile members."""

from __future__ import annotations

import io
import random
import stat
import struct
import subprocess
import tarfile
import threading
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import crc32c
import pytest

from cli.pgbin import pg_binary
from datadir_files.untar import UnsafeArchive, extract_basebackup
from pageserver.basebackup import tar_stream as bb
from pageserver.basebackup.sources import pages_one_by_one, sizes_one_by_one, slru_pages_one_by_one
from pageserver.basebackup.tar_stream import basebackup, basebackup_chunks
from pageserver.basebackup.wal_synthesis import (
    checkpoint_record,
    normalize_lsn,
    wal_segment_chunks,
)
from pageserver.reconstruct.range_reads import Buffers, ForkSpan
from pageserver.storage.keys import SlruKind
from pg15.lsn import format_lsn, segment_file_name
from pg15.pg_control import parse_control_file, with_checkpoint
from pg15.records import decode_record
from pg15.rmgr.xlog import CheckPoint
from pg15.xlog_reader import WalReader
from proto.errors import CorruptData, InvalidArgument

SEG = 16 * 1024 * 1024
SYSID = 7711482154191758973
PAGE = 8192


def short_lsn(lsn: int) -> str:
    """%X/%X, as pg_controldata and pg_waldump's record descriptions print LSNs."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def control_template(sysid: int = SYSID, unlogged_lsn: int = 0) -> bytes:
    """A pg_control with PG15's compile-time constants (src/include/catalog/pg_control.h),
    state in production."""
    buf = bytearray(8192)
    struct.pack_into("<QIII", buf, 0, sysid, 1300, 202209061, 6)
    struct.pack_into("<Q", buf, 128, unlogged_lsn)
    struct.pack_into("<QI", buf, 136, 0x5000000, 1)  # minRecoveryPoint, its TLI: must be reset
    struct.pack_into("<i?3xiiiii?", buf, 172, 1, False, 100, 8, 10, 10, 64, False)
    struct.pack_into("<IdIIIIIIII?", buf, 204, 8, 1234567.0, 8192, 131072, 8192, SEG, 64, 32,
                     1996, 2048, True)  # fmt: skip
    struct.pack_into("<I", buf, 288, crc32c.crc32c(bytes(buf[:288])))
    return bytes(buf)


def make_checkpoint(redo: int = 0, tli: int = 1, next_xid: int = 1000) -> CheckPoint:
    return CheckPoint(
        redo=redo, this_timeline=tli, prev_timeline=tli, full_page_writes=True,
        next_full_xid=next_xid, next_oid=24576, next_multi=1, next_multi_offset=0,
        oldest_xid=716, oldest_xid_db=1, oldest_multi=1, oldest_multi_db=1, time=1700000000,
        oldest_commit_ts_xid=0, newest_commit_ts_xid=0, oldest_active_xid=0,
    )  # fmt: skip


# --- pg_control -------------------------------------------------------------------------------


def test_pg_control_round_trip_with_crc(tmp_path: Path) -> None:
    template = control_template()
    lsn = 0x2147118
    cp = make_checkpoint(redo=lsn, tli=2, next_xid=(1 << 32) | 1024)
    raw = with_checkpoint(template, lsn, cp, 1700000123)
    assert len(raw) == 8192
    parsed = parse_control_file(raw)  # checks the CRC
    assert parsed.state == 1 and parsed.state_name == "shut down"
    assert parsed.checkpoint_lsn == lsn and parsed.checkpoint == cp
    assert parsed.system_identifier == SYSID and parsed.wal_segment_size == SEG
    assert struct.unpack_from("<q", raw, 24)[0] == 1700000123
    assert struct.unpack_from("<Q", raw, 128)[0] == 1000  # unloggedLSN raised
    assert struct.unpack_from("<QI4xQQ?", raw, 136) == (0, 0, 0, 0, False)
    assert raw[172:288] == template[172:288] and raw[292:] == template[292:]
    kept = with_checkpoint(control_template(unlogged_lsn=5000), lsn, cp, 0)
    assert struct.unpack_from("<Q", kept, 128)[0] == 5000
    # The real pg_controldata agrees.
    (tmp_path / "global").mkdir()
    (tmp_path / "global" / "pg_control").write_bytes(raw)
    out = subprocess.run(
        [pg_binary("pg_controldata"), "-D", str(tmp_path)],
        capture_output=True, text=True, check=True, env={"LC_ALL": "C"},
    ).stdout  # fmt: skip
    assert "Database cluster state:               shut down" in out
    short = short_lsn(lsn)
    assert f"Latest checkpoint location:           {short}" in out
    assert f"Latest checkpoint's REDO location:    {short}" in out
    assert "Latest checkpoint's TimeLineID:       2" in out
    assert "Latest checkpoint's NextXID:          1:1024" in out
    corrupt = bytearray(raw)
    corrupt[40] ^= 1
    with pytest.raises(CorruptData, match="bad CRC"):
        parse_control_file(bytes(corrupt))


# --- LSN normalization ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lsn", "expected"),
    [
        (0x2147118, 0x2147118),  # mid-page record boundary: unchanged
        (0x2147119, 0x2147120),  # MAXALIGNed
        (0x2148000, 0x2148018),  # page boundary: after the short header
        (0x3000000, 0x3000028),  # segment boundary: after the long header
        (0x214A000 - 120, 0x214A000 - 120),  # 8072 + 114 <= 8192: fits
        (0x214A000 - 112, 0x214A018),  # would cross the page end: next page
        (0x2147FB0, 0x2148018),  # the reference's 0x1FB0 case
        (0x3FFFFB0, 0x4000028),  # would cross into a new segment: after its long header
        (0x1000028, 0x1000028),
    ],
)
def test_normalize_lsn(lsn: int, expected: int) -> None:
    assert normalize_lsn(lsn, SEG) == expected


# --- the checkpoint WAL segment ---------------------------------------------------------------


def build_segment(lsn: int, tli: int) -> tuple[bytes, CheckPoint]:
    cp = make_checkpoint(redo=lsn, tli=tli)
    record = checkpoint_record(cp, 0)
    data = b"".join(wal_segment_chunks(lsn, record, tli, SYSID, SEG))
    return data, cp


@pytest.mark.parametrize(
    ("lsn", "tli"),
    [(0x2147118, 1), (0x2148018, 1), (0x3000028, 1), (0x3000100, 2), (0x20004018, 3)],
)
def test_checkpoint_segment_parses(tmp_path: Path, lsn: int, tli: int) -> None:
    data, cp = build_segment(lsn, tli)
    assert len(data) == SEG
    seg_start = lsn - lsn % SEG
    off = lsn - seg_start
    # Our reader, from the record itself and from its page start (skipping the contrecord gap).
    for start in (lsn, lsn - lsn % PAGE):
        reader = WalReader(start, SEG, tli, system_id=SYSID)
        reader.feed(data[start - seg_start :])
        records = list(reader.records())
        assert [(r.lsn, r.end_lsn) for r in records] == [(lsn, lsn + 120)]
        decoded = decode_record(records[0])
        assert (decoded.rmgr_id, decoded.info & 0xF0, len(records[0].data)) == (0, 0x00, 114)
        assert CheckPoint.unpack(decoded.main_data) == cp
    assert data[off + 120 :].count(0) == SEG - off - 120
    # The real pg_waldump, from the record and from the page start.
    (tmp_path / segment_file_name(tli, lsn // SEG, SEG)).write_bytes(data)
    for start in (lsn, lsn - lsn % PAGE):
        out = subprocess.run(
            [pg_binary("pg_waldump"), "-p", str(tmp_path), "-t", str(tli),
             "-s", format_lsn(start), "-n", "1"],
            capture_output=True, text=True, env={"LC_ALL": "C"},
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert "CHECKPOINT_SHUTDOWN" in out.stdout
        assert f"lsn: {format_lsn(lsn)}, prev 0/00000000" in out.stdout
        assert f"redo {short_lsn(lsn)}; tli {tli}; prev tli {tli}" in out.stdout


# --- the tar from an in-memory source ---------------------------------------------------------


def page(lsn: int, fill: int) -> bytes:
    return struct.pack("<II", lsn >> 32, lsn & 0xFFFFFFFF) + bytes([fill]) * (PAGE - 8)


def twophase_file(payload: bytes) -> bytes:
    return payload + struct.pack("<I", crc32c.crc32c(payload))


@dataclass
class FakeSource:
    lsn: int = 0x2147118
    tracks_visibility_map: bool = True
    rels: dict[tuple[int, int, int, int], list[bytes]] = field(default_factory=dict)
    slru: dict[tuple[SlruKind, int], list[bytes]] = field(default_factory=dict)
    twophase: dict[int, bytes] = field(default_factory=dict)
    checkpoint: CheckPoint = field(default_factory=make_checkpoint)
    control: bytes = field(default_factory=control_template)
    tablespaces: dict[int, str] = field(default_factory=dict)
    tablespace_relmaps: set[tuple[int, int]] = field(default_factory=set)
    """Databases of a non-default tablespace that have their relmap there (their default)."""

    def list_dbs(self) -> list[tuple[int, int]]:
        return sorted({(spc, db) for spc, db, _, _ in self.rels} | {(1664, 0)})

    def list_rels(self, spc: int, db: int) -> list[tuple[int, int]]:
        return sorted((r, f) for s, d, r, f in self.rels if (s, d) == (spc, db))

    def get_rel_size(self, spc: int, db: int, rel: int, fork: int) -> int:
        return len(self.rels[(spc, db, rel, fork)])

    def rel_sizes(self, spc: int, db: int, forks: list[tuple[int, int]]) -> list[int]:
        return sizes_one_by_one(self, spc, db, forks)

    def get_page(self, spc: int, db: int, rel: int, fork: int, blkno: int) -> bytes:
        return self.rels[(spc, db, rel, fork)][blkno]

    def rel_pages(
        self, spc: int, db: int, rel: int, fork: int, first: int, count: int
    ) -> Iterator[bytes]:
        return pages_one_by_one(self, spc, db, rel, fork, first, count)

    def list_slru_segments(self, kind: SlruKind) -> list[int]:
        return sorted(s for k, s in self.slru if k == kind)

    def get_slru_segment_size(self, kind: SlruKind, segno: int) -> int:
        return len(self.slru[(kind, segno)])

    def get_slru_page(self, kind: SlruKind, segno: int, blkno: int) -> bytes:
        return self.slru[(kind, segno)][blkno]

    def slru_pages(self, kind: SlruKind, segno: int, count: int) -> Iterator[bytes]:
        return slru_pages_one_by_one(self, kind, segno, count)

    def get_tablespaces(self) -> dict[int, str]:
        return dict(self.tablespaces)

    def get_relmap(self, spc: int, db: int) -> bytes | None:
        if spc not in (1663, 1664) and (spc, db) not in self.tablespace_relmaps:
            return None
        return bytes([db & 0xFF]) * 512

    def get_twophase_files(self) -> dict[int, bytes]:
        return self.twophase

    def get_checkpoint(self) -> CheckPoint:
        return self.checkpoint

    def get_control_template(self) -> bytes:
        return self.control


def fake_source() -> FakeSource:
    src = FakeSource()
    src.rels = {
        (1664, 0, 1262, 0): [page(0x100, 1)],
        (1663, 5, 16384, 0): [page(0x2000000, i) for i in range(10)],
        (1663, 5, 16384, 1): [page(0, 7)],
        (1663, 5, 16384, 2): [page(0x2000000, 8)],
        (1663, 5, 16390, 0): [page(0x2000000, 9)] * 3,  # unlogged: stale main fork
        (1663, 5, 16390, 3): [page(0x1000, 3)],
        (1663, 5, 16400, 0): [],
    }
    src.slru = {(SlruKind.CLOG, 0): [page(0, 0x55)]}
    src.checkpoint = make_checkpoint(next_xid=40000)  # CLOG page 1: must be readable
    src.twophase = {0x2DC: twophase_file(b"\x34\x45\xf9\x57" + bytes(100))}
    return src


def tar_members(data: bytes) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for m in tar:
            f = tar.extractfile(m) if m.isreg() else None
            out[m.name] = f.read() if f is not None else None
    return out


def test_tar_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bb, "RELSEG_SIZE", 4)  # 10 blocks -> segments of 4, 4, 2
    src = fake_source()
    out = io.BytesIO()
    info = basebackup(
        src, src.lsn, pg_timeline=2, out=out, config_files={"postgresql.conf": b"port = 1\n"},
        timeline_history=b"1\t0/2147118\tno recovery target specified\n", now=1700000000,
    )  # fmt: skip
    assert (info.checkpoint_lsn, info.end_lsn) == (0x2147118, 0x2147190)
    assert info.wal_segment == "000000020000000000000002"
    m = tar_members(out.getvalue())
    assert m["PG_VERSION"] == b"15\n" and m["base/5/PG_VERSION"] == b"15\n"
    assert m["postgresql.conf"] == b"port = 1\n"
    for d in ("pg_wal/archive_status", "pg_logical/snapshots", "pg_tblspc", "pg_replslot",
              "pg_stat", "pg_subtrans", "pg_notify", "base/5"):  # fmt: skip
        assert d in m and m[d] is None, d
    rel = src.rels[(1663, 5, 16384, 0)]
    assert m["base/5/16384"] == b"".join(rel[:4])
    assert m["base/5/16384.1"] == b"".join(rel[4:8])
    assert m["base/5/16384.2"] == b"".join(rel[8:])
    assert "base/5/16384_fsm" not in m and "base/5/16384_vm" not in m
    assert m["base/5/16390"] == m["base/5/16390_init"] == page(0x1000, 3)
    assert m["base/5/16400"] == b""
    assert m["global/1262"] == page(0x100, 1)
    assert m["global/pg_filenode.map"] == bytes(512) and m["base/5/pg_filenode.map"] == b"\5" * 512
    assert m["pg_xact/0000"] == page(0, 0x55) + bytes(PAGE)  # padded to nextXid's page
    assert m["pg_multixact/offsets/0000"] == bytes(PAGE)  # nextMulti 1 is not a page start
    assert "pg_multixact/members/0000" not in m
    assert m["pg_twophase/000002DC"] == src.twophase[0x2DC]
    assert m["pg_wal/00000002.history"] is not None
    wal = m["pg_wal/000000020000000000000002"]
    assert wal is not None and len(wal) == SEG
    control = parse_control_file(m["global/pg_control"] or b"")
    assert control.checkpoint_lsn == 0x2147118
    cp = control.checkpoint
    assert (cp.redo, cp.this_timeline, cp.prev_timeline, cp.next_full_xid) == (
        0x2147118, 2, 2, 40000)  # fmt: skip
    assert wal[0x147118 : 0x147118 + 114] == checkpoint_record(cp, 0)
    assert not {"postmaster.pid", "backup_label", "recovery.signal", "standby.signal"} & set(m)
    # The VM is shipped only on request.
    out2 = io.BytesIO()
    basebackup(src, src.lsn, out=out2, include_vm=True)
    assert tar_members(out2.getvalue())["base/5/16384_vm"] == page(0x2000000, 8)


def test_tablespaces_are_in_place_directories(tmp_path: Path) -> None:
    """Every non-default tablespace is a directory pg_tblspc/OID (never a symlink) holding
    PG_15_202209061/<db>/; PG_VERSION and the relmap only where the database has its default
    tablespace; a tablespace known only from its relations is still shipped."""
    src = fake_source()
    src.tablespaces = {16500: "/srv/elsewhere", 16501: ""}
    src.rels[(16500, 5, 17000, 0)] = [page(0x2000000, 21), page(0x2000000, 22)]
    src.rels[(16501, 6, 17001, 0)] = [page(0x2000000, 23)]
    src.rels[(16502, 5, 17002, 0)] = [page(0x2000000, 24)]
    src.tablespace_relmaps = {(16501, 6)}
    out = io.BytesIO()
    info = basebackup(src, src.lsn, out=out)
    # The recorded locations travel beside the archive; 16502's was never recorded.
    assert info.tablespaces == ((16500, "/srv/elsewhere"), (16501, ""), (16502, ""))
    with tarfile.open(fileobj=io.BytesIO(out.getvalue()), mode="r:") as tar:
        assert all(member.isreg() or member.isdir() for member in tar)
    m = tar_members(out.getvalue())
    version = "PG_15_202209061"
    for spc in (16500, 16501, 16502):
        assert m[f"pg_tblspc/{spc}"] is None and m[f"pg_tblspc/{spc}/{version}"] is None
    ts = f"pg_tblspc/16500/{version}/5"
    assert m[ts] is None and m[f"{ts}/17000"] == page(0x2000000, 21) + page(0x2000000, 22)
    assert f"{ts}/PG_VERSION" not in m and f"{ts}/pg_filenode.map" not in m
    own = f"pg_tblspc/16501/{version}/6"
    assert m[f"{own}/PG_VERSION"] == b"15\n" and m[f"{own}/pg_filenode.map"] == b"\6" * 512
    assert m[f"{own}/17001"] == page(0x2000000, 23)
    assert m[f"pg_tblspc/16502/{version}/5/17002"] == page(0x2000000, 24)
    assert "base/6" not in m  # database 6 lives wholly in its tablespace
    out.seek(0)
    extract_basebackup(out, tmp_path / "pgdata")
    link = tmp_path / "pgdata" / "pg_tblspc" / "16500"
    assert link.is_dir() and not link.is_symlink()
    assert (link / version / "5" / "17000").stat().st_size == 2 * PAGE


def test_bad_inputs_fail_before_any_byte() -> None:
    src = fake_source()
    with pytest.raises(InvalidArgument, match=r"recovery\.signal"):
        basebackup_chunks(src, src.lsn, config_files={"recovery.signal": b""})
    with pytest.raises(InvalidArgument, match="before the state"):
        basebackup_chunks(src, src.lsn - 8)
    with pytest.raises(InvalidArgument, match="history"):
        basebackup_chunks(src, src.lsn, timeline_history=b"x")
    checksums = bytearray(control_template())
    struct.pack_into("<I", checksums, 252, 1)
    struct.pack_into("<I", checksums, 288, crc32c.crc32c(bytes(checksums[:288])))
    src.control = bytes(checksums)
    with pytest.raises(InvalidArgument, match="checksums"):
        basebackup_chunks(src, src.lsn)


@pytest.mark.parametrize("pure", [False, True])
def test_bad_state_fails_while_streaming(monkeypatch: pytest.MonkeyPatch, pure: bool) -> None:
    """A page past the WAL's end or cut short, found by `_blockpack.first_bad_page` or its
    Python reference, fails the stream naming the page."""
    if pure:
        monkeypatch.setattr(bb, "blockpack", None)
    src = fake_source()
    src.rels[(1663, 5, 16384, 0)][3] = page(0x3000000, 0)  # LSN past the checkpoint
    _, chunks = basebackup_chunks(src, src.lsn)
    with pytest.raises(CorruptData, match="block 3 has page LSN 0/03000000"):
        b"".join(chunks)
    src = fake_source()
    src.rels[(1663, 5, 16384, 0)][2] = page(0x100, 0)[:-1]
    _, chunks = basebackup_chunks(src, src.lsn)
    with pytest.raises(CorruptData, match="16384 fork 0 block 2: short page"):
        b"".join(chunks)
    src = fake_source()
    src.twophase[0x2DD] = b"\0" * 40
    _, chunks = basebackup_chunks(src, src.lsn)
    with pytest.raises(CorruptData, match="bad CRC"):
        b"".join(chunks)


# --- extraction -------------------------------------------------------------------------------


def test_extract_modes(tmp_path: Path) -> None:
    src = fake_source()
    out = io.BytesIO()
    basebackup(src, src.lsn, out=out)
    out.seek(0)
    target = tmp_path / "pgdata"
    extract_basebackup(out, target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    assert stat.S_IMODE((target / "base" / "5").stat().st_mode) == 0o700
    assert stat.S_IMODE((target / "base" / "5" / "16384").stat().st_mode) == 0o600
    assert (target / "base" / "5" / "16390").read_bytes() == page(0x1000, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pgdata"]
    out.seek(0)
    with pytest.raises(Exception, match="not an empty directory"):
        extract_basebackup(out, target)


def hostile_tar(kind: str) -> tuple[bytes, str]:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        ok = tarfile.TarInfo("base/1/PG_VERSION")
        ok.size = 3
        tar.addfile(ok, io.BytesIO(b"15\n"))
        names = {"absolute": "/etc/evil", "dotdot": "../evil", "inner_dotdot": "base/../../evil"}
        name = names.get(kind, "base/1/evil")
        info = tarfile.TarInfo(name)
        if kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        elif kind == "hardlink":
            info.type, info.linkname = tarfile.LNKTYPE, "base/1/PG_VERSION"
        elif kind == "device":
            info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
        elif kind == "fifo":
            info.type = tarfile.FIFOTYPE
        tar.addfile(info, io.BytesIO(b"") if info.isreg() else None)
    return buf.getvalue(), name


@pytest.mark.parametrize(
    ("kind", "why"),
    [
        ("absolute", "absolute"),
        ("dotdot", "outside"),
        ("inner_dotdot", "outside"),
        ("symlink", "symbolic link"),
        ("hardlink", "hard link"),
        ("device", "device"),
        ("fifo", "FIFO"),
    ],
)
def test_hostile_members_refused(tmp_path: Path, kind: str, why: str) -> None:
    data, name = hostile_tar(kind)
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(UnsafeArchive, match=why) as err:
        extract_basebackup(io.BytesIO(data), work / "pgdata")
    assert repr(name) in str(err.value)
    assert list(work.iterdir()) == []  # neither the target nor the temporary directory
    assert not (tmp_path / "evil").exists() and not Path("/etc/evil").exists()


def test_truncated_archive_leaves_nothing(tmp_path: Path) -> None:
    src = fake_source()
    out = io.BytesIO()
    basebackup(src, src.lsn, out=out)
    with pytest.raises(CorruptData):
        extract_basebackup(io.BytesIO(out.getvalue()[:200_000]), tmp_path / "pgdata")
    assert list(tmp_path.iterdir()) == []


class LazyPages:
    """A relation fork whose pages exist only when read."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, blkno: int) -> bytes:
        return page(0x2000000, blkno & 0xFF)


def test_streaming_memory_is_bounded() -> None:
    """A 48 MiB relation streams in chunks of at most 256 KiB with a small peak allocation."""
    src = fake_source()
    src.rels[(1663, 5, 16500, 0)] = LazyPages(6144)  # type: ignore[assignment]
    _, chunks = basebackup_chunks(src, src.lsn)
    total = biggest = 0
    tracemalloc.start()
    try:
        for chunk in chunks:
            total += len(chunk)
            biggest = max(biggest, len(chunk))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total > 6144 * PAGE + SEG
    assert biggest <= 32 * PAGE
    assert peak < 4 * 1024 * 1024, peak


def _header_cases() -> Iterator[tuple[str, int, int, bool]]:
    yield from [
        ("PG_VERSION", 3, 0, False),
        ("base/", 0, 1_700_000_000, True),
        ("base/16384/2619_vm", 3 * PAGE, 1_700_000_000, False),
        ("global/pg_control", 8192, 1, False),
        ("x" * 100, 1, 1, False),  # the longest ustar name
        ("x" * 101, 1, 1, False),  # a PAX header for the name
        ("pg_tblspc/é/", 0, 1, True),  # not ASCII: a PAX header
        ("a", 8**11 - 1, 8**11 - 1, False),
        ("a", 8**11, 5, False),  # too big for 11 octal digits
        ("a", 5, 8**11, False),
        ("pg_wal", 0, 5, True),  # tarfile appends the directory's slash
    ]
    rng = random.Random(10)
    for _ in range(500):
        name = "".join(rng.choice("abc/_.0123456789") for _ in range(rng.randint(1, 110)))
        yield name, rng.randint(0, 1 << 40), rng.randint(0, 1 << 35), rng.random() < 0.2


def test_tar_header_equals_tarfiles() -> None:
    """The header built directly is byte for byte tarfile's (PAX format) for every member,
    the ones that need an extended header included."""
    for name, size, mtime, is_dir in _header_cases():
        assert bb.tar_header(name, size, mtime, is_dir) == bb._tarfile_header(
            name, size, mtime, is_dir
        ), (name, size, mtime, is_dir)
    with tarfile.open(fileobj=io.BytesIO(bb.tar_header("base/1/2619", 16, 7))) as tar:
        member = tar.next()
    assert member is not None
    assert (member.name, member.size, member.mtime, member.mode) == ("base/1/2619", 16, 7, 0o600)


class _CountedPages(LazyPages):
    """LazyPages that says once `ready` of them have been read."""

    def __init__(self, n: int, ready: int) -> None:
        super().__init__(n)
        self.read = 0
        self.reached = threading.Event()
        self.ready = ready

    def __getitem__(self, blkno: int) -> bytes:
        self.read += 1
        if self.read >= self.ready:
            self.reached.set()
        return super().__getitem__(blkno)


class _HeldSink:
    """A pipe whose reader is slow: the first write returns once the source has been read
    `ready` pages past the first chunk (or after 10 s)."""

    def __init__(self, pages: _CountedPages) -> None:
        self.pages = pages
        self.buf = io.BytesIO()
        self.waited: list[bool] = []

    def write(self, data: bytes) -> int:
        if not self.waited:
            self.waited.append(self.pages.reached.wait(10))
        return self.buf.write(data)


def test_basebackup_makes_the_tar_while_a_write_blocks() -> None:
    """basebackup() makes the next chunks while `out.write` blocks (a full pipe), instead of
    making and writing in turns; the tar is the one `basebackup_chunks` makes."""
    src = fake_source()
    pages = _CountedPages(400, ready=3 * 32)  # three chunks' pages past the first
    src.rels[(1663, 5, 16500, 0)] = pages  # type: ignore[assignment]
    sink = _HeldSink(pages)
    basebackup(src, src.lsn, out=sink, now=1)  # type: ignore[arg-type]
    assert sink.waited == [True]
    _, chunks = basebackup_chunks(src, src.lsn, now=1)
    assert sink.buf.getvalue() == b"".join(chunks)


def test_basebackup_raises_the_sources_error() -> None:
    src = fake_source()
    src.rels[(1663, 5, 16384, 0)][3] = page(0x3000000, 0)  # LSN past the checkpoint
    with pytest.raises(CorruptData, match="page LSN 0/03000000"):
        basebackup(src, src.lsn, out=io.BytesIO())


def test_batched_grows_from_its_first_size() -> None:
    """A stream's first batch is handed on after `first` bytes (the reader starts applying
    while the rest is made), each next one twice the last up to `size`; every chunk once, in
    order. Without `first`, every batch is `size` bytes (the last shorter)."""
    chunks = [bytes([i % 256]) * 4096 for i in range(100)]
    grown = list(bb.batched(chunks, 64 << 10, 16 << 10))
    assert [sum(map(len, b)) for b in grown] == [16 << 10, 32 << 10, *[64 << 10] * 5, 32 << 10]
    assert [c for b in grown for c in b] == chunks
    plain = list(bb.batched(chunks, 64 << 10))
    assert [sum(map(len, b)) for b in plain] == [*[64 << 10] * 6, 16 << 10]
    assert [c for b in plain for c in b] == chunks
    assert bb.FIRST_HANDOFF_BYTES < bb.HANDOFF_BYTES


def test_a_sparse_wal_segment_holds_the_same_bytes() -> None:
    """`sparse_wal` (a checkout's delta): the archive's files are the same, the WAL segment
    a GNU sparse member of its two pages that tarfile reads back whole, at a fifth of a
    percent of the bytes."""
    src = fake_source()
    _, whole = basebackup_chunks(src, src.lsn, pg_timeline=2, now=1)
    info, sparse = basebackup_chunks(src, src.lsn, pg_timeline=2, now=1, sparse_wal=True)
    whole_tar, sparse_tar = b"".join(whole), b"".join(sparse)
    assert tar_members(sparse_tar) == tar_members(whole_tar)
    assert len(tar_members(sparse_tar)[f"pg_wal/{info.wal_segment}"] or b"") == SEG
    assert len(whole_tar) - len(sparse_tar) > SEG - 8 * PAGE


@pytest.mark.parametrize(
    "regions",
    [
        [(0, b"a" * PAGE), (5 * PAGE, b"b" * PAGE)],  # ends in a hole
        [(0, b"a" * PAGE), (SEG - PAGE, b"z" * PAGE)],  # ends in data
        [],  # all hole
    ],
)
def test_gnu_tar_extracts_a_sparse_member_at_its_size(
    tmp_path: Path, regions: list[tuple[int, bytes]]
) -> None:
    """GNU tar sets a sparse file's size from its map's last region only (so it writes an
    empty one at the end of a file ending in a hole): without it, `tar -x` made a file
    ending at the last data (3,153,920 bytes of a 16 MiB segment, tar 1.34)."""
    tar = b"".join([*bb.tar_sparse_file("pg_wal/seg", SEG, regions, 1), bytes(1024)])
    subprocess.run(["tar", "-x", "-C", str(tmp_path)], input=tar, check=True)
    want = bytearray(SEG)
    for offset, data in regions:
        want[offset : offset + len(data)] = data
    assert (tmp_path / "pg_wal" / "seg").read_bytes() == want


# --- pages written in place (TimelineSource.rel_chunks) ----------------------------------------


@dataclass
class FillingSource(FakeSource):
    """FakeSource whose forks come as `TimelineSource.rel_chunks` gives them: written into
    the tar maker's buffers, every third page left to the caller (a hole as None)."""

    filled: int = 0

    def rel_chunks(
        self, span: ForkSpan, buffers: Buffers, per_chunk: int
    ) -> Iterator[tuple[memoryview | bytearray, int, list[tuple[int, bytes | None]]]]:
        fork = self.rels[(span.spc, span.db, span.rel, span.fork)]
        pages = fork[span.first : span.first + span.count]
        for at in range(0, len(pages), per_chunk):
            piece = pages[at : at + per_chunk]
            out = buffers.take(len(piece))
            left: list[tuple[int, bytes | None]] = []
            for i, p in enumerate(piece):
                if i % 3 == 1 or len(p) != PAGE:
                    left.append((i, None if p == bytes(PAGE) else p))
                else:
                    out[i * PAGE : (i + 1) * PAGE] = p
                    self.filled += 1
            yield out, len(piece), left


def _aligned(src: FakeSource, per_chunk: int) -> bytes:
    """The tar of chunks written in place, each given back once read; every buffer is free
    again at the end, also when the stream fails."""
    aligned = bb.AlignedChunks(count=2)
    aligned.PAGES = per_chunk  # small buffers: several chunks a fork, some of them tails
    _, chunks = basebackup_chunks(src, src.lsn, aligned=aligned, now=1_700_000_000)
    out = bytearray()
    try:
        for chunk in chunks:
            out += chunk
            aligned.release(chunk)
    finally:
        lent = [aligned.take(per_chunk) for _ in range(2)]
        assert all(isinstance(buffer, memoryview) for buffer in lent), "a buffer is still lent"
    return bytes(out)


def test_pages_written_in_place_make_the_same_tar() -> None:
    src = fake_source()
    src.rels[(1663, 5, 16384, 0)][4] = bytes(PAGE)  # a hole
    want = io.BytesIO()
    basebackup(src, src.lsn, out=want, now=1_700_000_000)
    filling = FillingSource(**{f: getattr(src, f) for f in FakeSource.__dataclass_fields__})
    assert _aligned(filling, 4) == want.getvalue()
    assert filling.filled > 5


@pytest.mark.parametrize("where", [0, 1, 5])
def test_pages_written_in_place_are_checked(where: int) -> None:
    """A page past the WAL's end, written by the source or left to the tar maker, and a
    short page left to it fail the stream naming the page, as `rel_pages`' do."""
    src = FillingSource(**{f: getattr(fake_source(), f) for f in FakeSource.__dataclass_fields__})
    src.rels[(1663, 5, 16384, 0)][where] = page(0x3000000, 0)
    with pytest.raises(CorruptData, match=f"block {where} has page LSN 0/03000000"):
        _aligned(src, 4)
    src = FillingSource(**{f: getattr(fake_source(), f) for f in FakeSource.__dataclass_fields__})
    src.rels[(1663, 5, 16384, 0)][where] = page(0x100, 0)[:-1]
    src.rels[(1663, 5, 16384, 0)][9] = page(0x3000000, 0)  # a later chunk: not reached
    with pytest.raises(CorruptData, match=f"16384 fork 0 block {where}: short page"):
        _aligned(src, 4)


def test_the_strided_page_lsn_check_equals_its_reference() -> None:
    rng = random.Random(7)
    for _ in range(300):
        n = rng.randrange(0, 6)
        lsns = [rng.choice([0, 0x100, 0x1_0000_0000, 0x1_0000_0100, rng.randrange(1 << 40)])
                for _ in range(n)]  # fmt: skip
        buf = bytearray(b"".join(page(lsn, 1) for lsn in lsns) + bytes(PAGE))  # one spare
        limit = rng.choice([0xFF, 0x100, 0x1_0000_0000, 0x1_0000_00FF, rng.randrange(1 << 40)])
        want = bb._first_late_page_python(buf, n, limit)
        assert bb._first_late_page(buf, n, limit) == want
        assert want == next((i for i, lsn in enumerate(lsns) if lsn > limit), -1)


def test_a_planned_tar_of_too_many_pieces_gives_no_size() -> None:
    """`PlannedTar.size` lists at most `most` pieces (review M4: every listed piece is held
    until written): past it the size is None and the archive's bytes are still all there,
    in order; at or under it the size is exact."""

    def planned() -> bb.PlannedTar:
        return bb.PlannedTar(
            bb.Content(f"f{i}", 3, iter([b"ab", b"c"])) if i % 2 else bytes([i]) * 5
            for i in range(10)
        )

    whole = b"".join(b"ab" + b"c" if i % 2 else bytes([i]) * 5 for i in range(10))
    capped = planned()
    assert capped.size(most=9) is None
    assert b"".join(capped) == whole
    sized = planned()
    assert sized.size(most=10) == len(whole) == 40
    assert b"".join(sized) == whole
