"""BASE_BACKUP's messages (PostgreSQL 15 copystream protocol) with bytes only.

The byte layouts follow basebackup_copy.c: SendXlogRecPtrResult, SendTablespaceList,
bbsink_copystream_begin_archive / archive_contents / end_archive / begin_manifest.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proto.errors import ProtocolError
from walreceiver.replication_codec import (
    ArchiveData,
    ArchiveEnd,
    ArchiveStart,
    BackendParser,
    BackupCopyChunk,
    BackupEnded,
    BackupFinished,
    BackupStarted,
    BackupTablespaces,
    BaseBackupEvent,
    BaseBackupReader,
    CopyDone,
    ErrorResponse,
    ManifestData,
    ManifestStart,
    ProgressReport,
    TablespaceInfo,
    decode_backup_copy_data,
)

TEXTOID, INT8OID, OIDOID = 25, 20, 26


def msg(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def row_description(*fields: tuple[str, int, int]) -> bytes:
    body = struct.pack("!h", len(fields))
    for name, type_oid, typlen in fields:
        body += name.encode() + b"\0" + struct.pack("!IhIhih", 0, 0, type_oid, typlen, 0, 0)
    return msg(b"T", body)


def data_row(*values: bytes | None) -> bytes:
    body = struct.pack("!h", len(values))
    for v in values:
        body += struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v
    return msg(b"D", body)


def complete(tag: str) -> bytes:
    return msg(b"C", tag.encode() + b"\0")


def position(lsn: str, tli: int) -> bytes:
    """SendXlogRecPtrResult: (recptr text, tli int8) then CommandComplete SELECT."""
    desc = row_description(("recptr", TEXTOID, -1), ("tli", INT8OID, -1))
    return desc + data_row(lsn.encode(), str(tli).encode()) + complete("SELECT")


def tablespaces(*rows: tuple[bytes | None, bytes | None, bytes | None]) -> bytes:
    desc = row_description(
        ("spcoid", OIDOID, 4), ("spclocation", TEXTOID, -1), ("size", INT8OID, 8)
    )
    return desc + b"".join(data_row(*r) for r in rows) + complete("SELECT")


def copy(payload: bytes) -> bytes:
    return msg(b"d", payload)


def new_archive(name: str, location: str = "") -> bytes:
    return copy(b"n" + name.encode() + b"\0" + location.encode() + b"\0")


def progress(done: int) -> bytes:
    return copy(b"p" + struct.pack("!Q", done))


COPY_OUT = msg(b"H", b"\0\0\0")
COPY_DONE = msg(b"c", b"")
READY = msg(b"Z", b"I")
TAR_END = bytes(1024)
MEMBER = b"m" * 512  # stands for a tar header and data: whole blocks


def error(code: str, text: str) -> bytes:
    return msg(b"E", b"SERROR\0VERROR\0C" + code.encode() + b"\0M" + text.encode() + b"\0\0")


def whole_backup(manifest: bool = False) -> bytes:
    """A backup with a tablespace, two archives, progress reports and maybe a manifest."""
    out = position("0/2000028", 1)
    out += tablespaces((b"16384", b"/srv/ts1", b"8"), (None, None, b"30000"))
    out += COPY_OUT
    out += new_archive("16384.tar", "/srv/ts1") + copy(b"d" + MEMBER) + copy(b"d" + TAR_END)
    out += progress(1536)
    out += new_archive("base.tar") + copy(b"d" + MEMBER * 3) + progress(3072)
    out += copy(b"d" + TAR_END[:100]) + copy(b"d" + TAR_END[100:]) + progress(4608)
    if manifest:
        out += copy(b"m") + copy(b"d" + b'{"PostgreSQL-Backup-Manifest-Version": 1') + copy(b"d}")
    out += COPY_DONE + position("0/2000100", 1) + complete("BASE_BACKUP") + READY
    return out


def events_of(data: bytes, step: int | None = None) -> list[BaseBackupEvent]:
    parser, reader = BackendParser(), BaseBackupReader()
    events: list[BaseBackupEvent] = []
    for i in range(0, len(data), step or len(data) or 1):
        parser.feed(data[i : i + (step or len(data))])
        for m in parser:
            events.extend(reader.handle(m))
    return events


def plain(events: list[BaseBackupEvent]) -> list[object]:
    """Events with their data as bytes (views compare by content only after conversion)."""
    out: list[object] = []
    for e in events:
        if isinstance(e, ArchiveData):
            out.append(ArchiveData(bytes(e.data)))
        elif isinstance(e, ManifestData):
            out.append(ManifestData(bytes(e.data)))
        else:
            out.append(e)
    return out


EXPECTED: list[object] = [
    BackupStarted(0x2000028, 1),
    BackupTablespaces((TablespaceInfo(16384, "/srv/ts1", 8), TablespaceInfo(None, None, 30000))),
    ArchiveStart("16384.tar", "/srv/ts1"),
    ArchiveData(MEMBER),
    ArchiveData(TAR_END),
    ProgressReport(1536),
    ArchiveStart("base.tar", None),
    ArchiveData(MEMBER * 3),
    ProgressReport(3072),
    ArchiveData(TAR_END[:100]),
    ArchiveData(TAR_END[100:]),
    ProgressReport(4608),
]


def test_whole_backup_as_events() -> None:
    got = plain(events_of(whole_backup()))
    # The first archive ends where the second begins; the main one at CopyDone.
    assert got == [
        *EXPECTED[:5],
        EXPECTED[5],
        ArchiveEnd("16384.tar", 1536),
        *EXPECTED[6:],
        ArchiveEnd("base.tar", 2560),
        BackupEnded(0x2000100, 1),
        BackupFinished(),
    ]
    tbs = got[1]
    assert isinstance(tbs, BackupTablespaces) and tbs.total_bytes == (8 + 30000) * 1024


def test_manifest_follows_the_archives() -> None:
    got = plain(events_of(whole_backup(manifest=True)))
    i = got.index(ArchiveEnd("base.tar", 2560))
    assert got[i + 1 :] == [
        ManifestStart(),
        ManifestData(b'{"PostgreSQL-Backup-Manifest-Version": 1'),
        ManifestData(b"}"),
        BackupEnded(0x2000100, 1),
        BackupFinished(),
    ]


@settings(max_examples=50, deadline=None)
@given(step=st.integers(min_value=1, max_value=700))
def test_any_split_of_the_bytes_gives_the_same_events(step: int) -> None:
    assert plain(events_of(whole_backup(True), step)) == plain(events_of(whole_backup(True)))


def test_size_unknown_without_progress() -> None:
    data = position("0/2000028", 1) + tablespaces((None, None, None)) + COPY_OUT
    events = events_of(data)
    assert events[1] == BackupTablespaces((TablespaceInfo(None, None, None),))
    assert isinstance(events[1], BackupTablespaces) and events[1].total_bytes is None


def test_copy_data_payloads() -> None:
    assert decode_backup_copy_data(b"nbase.tar\0\0") == ArchiveStart("base.tar", None)
    assert decode_backup_copy_data(b"n1.tar\0/x\0") == ArchiveStart("1.tar", "/x")
    assert decode_backup_copy_data(b"p" + struct.pack("!Q", 2**40)) == ProgressReport(2**40)
    assert decode_backup_copy_data(b"m") == ManifestStart()
    chunk = decode_backup_copy_data(b"dxyz")
    assert isinstance(chunk, BackupCopyChunk) and bytes(chunk.data) == b"xyz"
    assert bytes(decode_backup_copy_data(b"d").data) == b""  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "payload, match",
    [
        (b"", "empty CopyData"),
        (b"x", "unknown message type"),
        (b"p\0\0\0", "shorter than its fields"),
        (b"p" + bytes(9), "trailing bytes"),
        (b"mx", "trailing bytes"),
        (b"nbase.tar\0", "unterminated string"),
        (b"n\0\0", "invalid archive name"),
        (b"n.hidden\0\0", "invalid archive name"),
        (b"n../x.tar\0\0", "invalid archive name"),
        (b"na\\b.tar\0\0", "invalid archive name"),
    ],
)
def test_bad_copy_data_payloads(payload: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode_backup_copy_data(payload)


HEAD = position("0/2000028", 1) + tablespaces((None, None, b"1")) + COPY_OUT
BASE_DONE = new_archive("base.tar") + copy(b"d" + TAR_END)


@pytest.mark.parametrize(
    "data, match",
    [
        # An archive cut short: the next one starts before the tar end blocks.
        (
            position("0/1", 1)
            + tablespaces((b"1", b"/t", b"1"), (None, None, b"1"))
            + COPY_OUT
            + new_archive("1.tar", "/t")
            + copy(b"d" + MEMBER)
            + new_archive("base.tar"),
            "without the tar end-of-archive blocks",
        ),
        (
            HEAD + new_archive("base.tar") + copy(b"d" + MEMBER + b"x" + TAR_END) + COPY_DONE,
            "without",
        ),
        (HEAD + new_archive("base.tar") + copy(b"d" + MEMBER) + COPY_DONE, "without the tar"),
        (HEAD + copy(b"d" + MEMBER), "archive data before any archive"),
        (HEAD + new_archive("9.tar", "/nowhere"), "did not announce"),
        (HEAD + COPY_DONE, "without the main archive"),
        (HEAD + BASE_DONE + new_archive("b.tar"), "two archives of the main"),
        (HEAD + BASE_DONE + copy(b"m") + new_archive("x"), "after the manifest"),
        (HEAD + READY, "unexpected ReadyForQuery"),
        (position("0/1", 1) + tablespaces((b"1", b"/t", b"1")), "no row for the main"),
        (position("0/1", 1) + tablespaces((b"1", None, b"1"), (None, None, b"1")), "oid without"),
        (position("0/1", 1) + tablespaces((b"1", b"/t", b"1"), (b"2", b"/t", None)), "twice"),
        (position("zz", 1), "invalid LSN"),
        (position("0/1", 1) + position("0/1", 1), "columns"),
        (row_description(("recptr", TEXTOID, -1)), "1 columns, expected 2"),
        (COPY_OUT, "unexpected CopyOutResponse"),
        (msg(b"T", struct.pack("!h", 0)), "0 columns"),
    ],
)
def test_out_of_order_or_damaged_streams_are_protocol_errors(data: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        events_of(data)


def test_error_mid_stream_is_an_event_and_ends_the_reader() -> None:
    data = HEAD + new_archive("base.tar") + copy(b"d" + MEMBER)
    data += error("42501", 'could not open file "./x": Permission denied') + READY
    events = events_of(data)
    assert isinstance(events[-1], ErrorResponse) and events[-1].sqlstate == "42501"
    reader = BaseBackupReader()
    parser = BackendParser()
    parser.feed(HEAD + error("57P01", "terminating connection") + READY)
    for m in parser:
        reader.handle(m)
    assert reader.failed and reader.finished
    with pytest.raises(ProtocolError, match="after the base backup ended"):
        reader.handle(CopyDone())


def test_error_after_the_end_position_still_fails_the_backup() -> None:
    """A checksum failure is reported after CopyDone and the end position (basebackup.c)."""
    data = HEAD + new_archive("base.tar") + copy(b"d" + TAR_END) + COPY_DONE
    data += position("0/3000000", 1) + error("XX001", "checksum verification failure")
    events = events_of(data)
    assert isinstance(events[-2], BackupEnded)
    assert isinstance(events[-1], ErrorResponse) and events[-1].sqlstate == "XX001"


def events_by_runs(data: bytes, step: int, max_bytes: int) -> list[BaseBackupEvent]:
    """events_of as ReplicationConnection.base_backup takes them: while an archive is open,
    the whole data messages buffered come as one ArchiveData (BackendParser.archive_data_run)."""
    parser, reader = BackendParser(), BaseBackupReader()
    events: list[BaseBackupEvent] = []
    for i in range(0, len(data), step):
        parser.feed(data[i : i + step])
        while True:
            if reader.in_archive and (run := parser.archive_data_run(max_bytes)) is not None:
                events.append(reader.archive_data(run))
                continue
            m = parser.next_message()
            if m is None:
                break
            events.extend(reader.handle(m))
    return events


def merged(events: list[BaseBackupEvent]) -> list[object]:
    """Consecutive ArchiveData as one (runs cut the data elsewhere, the bytes are the same)."""
    out: list[object] = []
    for e in plain(events):
        if isinstance(e, ArchiveData) and out and isinstance(out[-1], ArchiveData):
            out[-1] = ArchiveData(bytes(out[-1].data) + bytes(e.data))
        else:
            out.append(e)
    return out


@settings(max_examples=60, deadline=None)
@given(step=st.integers(min_value=1, max_value=3000), max_bytes=st.integers(1, 2000))
def test_runs_of_data_messages_give_the_same_bytes_and_events(step: int, max_bytes: int) -> None:
    big = whole_backup(True).replace(copy(b"d" + MEMBER * 3), copy(b"d" + MEMBER) * 3)
    expected = merged(events_of(big))
    got = events_by_runs(big, step, max_bytes)
    assert merged(got) == expected
    whole = events_by_runs(big, len(big), 1 << 20)  # every message buffered: one run each
    assert ArchiveData(MEMBER * 3) in plain(whole)
    assert merged(whole) == expected


@pytest.mark.parametrize(
    "bad, match",
    [
        (msg(b"d", b""), "empty CopyData"),
        (b"d" + struct.pack("!I", 3), "invalid message length 3"),
        (copy(b"x" + MEMBER), "unknown message type"),
    ],
)
def test_runs_stop_at_a_damaged_message_which_fails_as_before(bad: bytes, match: str) -> None:
    data = HEAD + new_archive("base.tar") + copy(b"d" + MEMBER) * 2 + bad + copy(b"d" + TAR_END)
    for step in (7, len(data)):
        with pytest.raises(ProtocolError, match=match):
            events_by_runs(data, step, 1 << 20)
