"""`neon waldump`: decode WAL segment files like pg_waldump, as text or JSON lines.

File handling lives here; reading and decoding are the sans-I/O `WalReader` and
`decode_record`. Segment files may be given in any order or as directories (their segment
files, `.partial` included, are taken in LSN order); they must form one timeline with no gaps.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import click

from pg15.lsn import format_lsn, parse_lsn, parse_segment_file_name, segment_file_name
from pg15.records import DecodedRecord, RecordDecodeError, decode_record
from pg15.xlog_reader import (
    LONG_PAGE_HEADER_SIZE,
    XLOG_PAGE_MAGIC,
    XLP_LONG_HEADER,
    WalReader,
    parse_page_header,
)
from proto.errors import CorruptData, InvalidArgument, NeonError, NotFound

READ_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class SegmentFile:
    path: Path
    timeline: int
    segno: int
    partial: bool


def _read_long_header(path: Path) -> tuple[int, int, int]:
    """(segment size, timeline, pageaddr) from the long header at the start of a segment."""
    try:
        with path.open("rb") as f:
            head = f.read(LONG_PAGE_HEADER_SIZE)
    except OSError as exc:
        raise NotFound(f"cannot read WAL file {path}: {exc.strerror or exc}") from exc
    if len(head) < LONG_PAGE_HEADER_SIZE:
        raise CorruptData(f"{path} is not a WAL segment file: only {len(head)} bytes")
    header = parse_page_header(head)
    if header.magic != XLOG_PAGE_MAGIC or not header.info & XLP_LONG_HEADER:
        raise CorruptData(
            f"{path} is not a PostgreSQL 15 WAL segment file: page magic {header.magic:04X}, "
            f"info {header.info:04X} (expected magic {XLOG_PAGE_MAGIC:04X} with a long header)"
        )
    seg_size = header.segment_size or 0
    if seg_size & (seg_size - 1) or not (1 << 20) <= seg_size <= (1 << 30):
        raise CorruptData(f"{path}: invalid WAL segment size {seg_size} in its page header")
    return seg_size, header.timeline, header.pageaddr


def _candidate_files(paths: Iterable[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = []
            for entry in sorted(path.iterdir()):
                try:
                    parse_segment_file_name(entry.name)
                except InvalidArgument:
                    continue
                if entry.is_file():
                    found.append(entry)
            if not found:
                raise NotFound(f"no WAL segment files in directory {path}")
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            raise NotFound(f"WAL file {path} does not exist")
    return files


def collect_segments(paths: Iterable[Path]) -> tuple[list[SegmentFile], int]:
    """The segment files in LSN order (one per segment, full ones over .partial) and their size."""
    files = _candidate_files(paths)
    if not files:
        raise InvalidArgument("no WAL files given")
    seg_size, _, _ = _read_long_header(files[0])
    by_segno: dict[int, SegmentFile] = {}
    for path in files:
        try:
            tli, segno, partial = parse_segment_file_name(path.name, seg_size)
        except InvalidArgument:
            # Not named like a segment: trust its long header.
            size, tli, pageaddr = _read_long_header(path)
            if size != seg_size:
                raise CorruptData(
                    f"{path} has segment size {size}, {files[0]} has {seg_size}"
                ) from None
            segno, partial = pageaddr // seg_size, False
        seg = SegmentFile(path, tli, segno, partial)
        old = by_segno.get(segno)
        if old is None or (old.partial and not partial):
            by_segno[segno] = seg
    segments = [by_segno[n] for n in sorted(by_segno)]
    timelines = {s.timeline for s in segments}
    if len(timelines) > 1:
        names = ", ".join(f"{t:08X}" for t in sorted(timelines))
        raise InvalidArgument(f"WAL files from several timelines ({names}); give one timeline")
    return segments, seg_size


def iter_records(
    segments: list[SegmentFile], seg_size: int, start: int | None, end: int | None
) -> Iterator[DecodedRecord]:
    """Decode the records of `segments` from `start` (or the first segment) until `end`."""
    first = segments[0].segno * seg_size
    last = (segments[-1].segno + 1) * seg_size
    if start is not None and not first <= start < last:
        raise InvalidArgument(
            f"start LSN {format_lsn(start)} is outside the WAL files given "
            f"({format_lsn(first)} to {format_lsn(last)})"
        )
    begin_segno = (start if start is not None else first) // seg_size
    todo = [s for s in segments if s.segno >= begin_segno]
    if not todo or todo[0].segno != begin_segno:
        name = segment_file_name(segments[0].timeline, begin_segno, seg_size)
        raise NotFound(f"WAL segment {name} holding the start LSN is missing")
    reader = WalReader(begin_segno * seg_size, seg_size, todo[0].timeline)
    expected = begin_segno
    for seg in todo:
        if end is not None and reader.last_end_lsn >= end:
            return
        if seg.segno != expected:
            name = segment_file_name(seg.timeline, expected, seg_size)
            raise NotFound(
                f"WAL segment {name} is missing; records end at {format_lsn(reader.last_end_lsn)}"
            )
        expected += 1
        size = 0
        try:
            with seg.path.open("rb") as f:
                while chunk := f.read(READ_CHUNK):
                    size += len(chunk)
                    reader.feed(chunk)
                    for raw in reader.records():
                        if end is not None and raw.end_lsn > end:
                            return
                        if start is None or raw.lsn >= start:
                            try:
                                record = decode_record(raw)
                            except RecordDecodeError as exc:
                                segment = reader.segment_name(raw.lsn)
                                raise CorruptData(f"{exc} (segment {segment})") from exc
                            yield record
                    if reader.end_of_wal is not None:
                        return
        except OSError as exc:
            raise NeonError(f"cannot read WAL file {seg.path}: {exc.strerror or exc}") from exc
        if size < seg_size:
            if seg.partial or (end is not None and reader.last_end_lsn >= end):
                return
            pending = reader.pending_record_lsn
            where = pending if pending is not None else reader.last_end_lsn
            raise CorruptData(
                f"WAL segment {seg.path.name} is truncated ({size} of {seg_size} bytes); "
                f"no complete record at {format_lsn(where)}"
            )


def record_json(rec: DecodedRecord) -> dict[str, object]:
    return {
        "lsn": format_lsn(rec.lsn),
        "end_lsn": format_lsn(rec.end_lsn),
        "prev": format_lsn(rec.prev),
        "xid": rec.xid,
        "rmgr": rec.rmgr_name,
        "info": rec.info,
        "type": rec.type_name,
        "rec_len": rec.rec_len,
        "tot_len": rec.tot_len,
        "main_len": len(rec.main_data),
        "blocks": [
            {
                "id": b.block_id,
                "spc": b.rnode.spc,
                "db": b.rnode.db,
                "rel": b.rnode.rel,
                "fork": b.fork_name,
                "blk": b.blkno,
                "has_image": b.has_image,
                "apply_image": b.apply_image,
                "has_data": b.has_data,
                "will_init": b.will_init,
                "data_len": len(b.data),
                "image": None
                if b.image is None
                else {
                    "len": len(b.image.data),
                    "hole_offset": b.image.hole_offset,
                    "hole_length": b.image.hole_length,
                    "compression": b.image.compression,
                },
            }
            for b in rec.blocks
        ],
    }


def record_text(rec: DecodedRecord) -> str:
    """One line shaped like pg_waldump's (the desc column holds only the record type)."""
    parts = [
        f"rmgr: {rec.rmgr_name:<11} len (rec/tot): {rec.rec_len:6}/{rec.tot_len:6}, "
        f"tx: {rec.xid:10}, lsn: {format_lsn(rec.lsn)}, prev {format_lsn(rec.prev)}, "
        f"desc: {rec.type_name}"
    ]
    for b in rec.blocks:
        fork = "" if b.fork == 0 else f" fork {b.fork_name}"
        parts.append(f", blkref #{b.block_id}: rel {b.rnode}{fork} blk {b.blkno}")
        if b.image is not None:
            parts.append(" FPW" if b.image.apply else " FPW for WAL verification")
    return "".join(parts)


@click.command("waldump")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per record.")
@click.option("--start", "start_text", metavar="LSN", help="First record to show (X/X).")
@click.option("--end", "end_text", metavar="LSN", help="Stop before records ending past it.")
@click.argument(
    "paths", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="FILE_OR_DIR..."
)
def waldump_command(
    as_json: bool, start_text: str | None, end_text: str | None, paths: tuple[Path, ...]
) -> None:
    """Decode WAL segment files like pg_waldump."""
    start = parse_lsn(start_text) if start_text else None
    end = parse_lsn(end_text) if end_text else None
    if start is not None and end is not None and end < start:
        raise InvalidArgument(f"end LSN {end_text} is before start LSN {start_text}")
    segments, seg_size = collect_segments(paths)
    out = sys.stdout
    batch: list[str] = []
    try:
        for rec in iter_records(segments, seg_size, start, end):
            line = json.dumps(record_json(rec), separators=(",", ":")) if as_json else None
            batch.append(line if line is not None else record_text(rec))
            if len(batch) >= 2048:
                out.write("\n".join(batch) + "\n")
                batch.clear()
    finally:
        if batch:
            out.write("\n".join(batch) + "\n")
        out.flush()
