"""`neon debug`: developer tools: verify-redo (native redo against WAL images), get-page and
rel-size (what the pagestore rebuilds)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from cli.context import get_app
from cli.pageserver_control import local_api
from cli.waldump import collect_segments, iter_records
from pageserver_api.client import SyncPageserverClient
from pageserver_api.models import PageGetRequest, RelSizeRequest
from pg15.constants import FORK_NAMES
from pg15.lsn import format_lsn, parse_lsn
from proto.errors import InvalidArgument


@click.group("debug")
def debug_group() -> None:
    """Developer tools."""


@debug_group.command("verify-redo")
@click.option("--json", "as_json", is_flag=True, help="Print the counts as one JSON object.")
@click.option(
    "--max-reports", default=20, show_default=True, help="Mismatches to describe in detail."
)
@click.argument(
    "paths", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="FILE_OR_DIR..."
)
def verify_redo_command(as_json: bool, max_reports: int, paths: tuple[Path, ...]) -> None:
    """Replay WAL written with wal_consistency_checking and compare with PostgreSQL's images.

    Exits 1 if any block mismatches or any record type has no native redo.
    """
    from pageserver.redo.verify import RedoVerifier  # every redo module: only when used

    segments, seg_size = collect_segments(paths)
    verifier = RedoVerifier(max_reports=max_reports)
    for record in iter_records(segments, seg_size, None, None):
        verifier.feed(record)
    report = verifier.report()
    details = [m.describe() for m in verifier.mismatches]
    if verifier.total_mismatched > len(details):
        details.append(f"... and {verifier.total_mismatched - len(details)} more mismatches")
    if as_json:
        click.echo(json.dumps(report, sort_keys=True))
        for line in details:
            click.echo(line, err=True)
    else:
        width = max((len(f"{r} {t}") for r, types in report.items() for t in types), default=0)
        for rmgr, types in report.items():
            for rtype, c in types.items():
                click.echo(
                    f"{rmgr + ' ' + rtype:<{width}}  verified {c['verified']:7}  "
                    f"mismatched {c['mismatched']:5}  skipped {c['skipped']:5}  "
                    f"unsupported {c['unsupported']:5}"
                )
        for line in details:
            click.echo(line)
        click.echo(
            f"{verifier.total_mismatched} mismatched, {verifier.total_unsupported} unsupported"
        )
    if not verifier.ok:
        sys.exit(1)


def _parse_relpath(text: str) -> tuple[int, int, int]:
    parts = text.split("/")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise InvalidArgument(
            f"invalid relation {text!r}: expected SPC/DB/REL as numbers, e.g. 1663/5/16384 "
            "(pg_relation_filepath() shows them)"
        )
    spc, db, rel = (int(p) for p in parts)
    return spc, db, rel


def _read_at(
    ctx: click.Context, node: str, lsn: str | None
) -> tuple[SyncPageserverClient, str, int | None]:
    """The API, the node's id and the LSN to read at (None: the latest ingested)."""
    app = get_app(ctx)
    row = app.registry.get_node(node)
    return local_api(app), row.id, parse_lsn(lsn) if lsn is not None else None


_FORK = click.Choice(list(FORK_NAMES))


@debug_group.command("get-page")
@click.argument("node")
@click.argument("relation", metavar="SPC/DB/REL")
@click.argument("blkno", type=click.IntRange(0, 0xFFFFFFFE))
@click.option("--fork", type=_FORK, default="main", show_default=True)
@click.option("--lsn", default=None, help="Read at this LSN (default: the latest ingested).")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the 8192 bytes here (default: stdout).",
)
@click.pass_context
def get_page_command(
    ctx: click.Context,
    node: str,
    relation: str,
    blkno: int,
    fork: str,
    lsn: str | None,
    output: Path | None,
) -> None:
    """Print one page of a relation as the pagestore rebuilds it (raw 8192 bytes)."""
    spc, db, rel = _parse_relpath(relation)
    api, node_id, at = _read_at(ctx, node, lsn)
    result = api.page_get(PageGetRequest(node_id, spc, db, rel, blkno, fork=fork, lsn=at))
    page = result.page
    if output is None:
        sys.stdout.buffer.write(page)
        sys.stdout.buffer.flush()
    else:
        tmp = output.with_name(output.name + ".tmp")
        tmp.write_bytes(page)
        tmp.replace(output)
        click.echo(
            f"wrote {len(page)} bytes of {relation} {fork} block {blkno} at "
            f"{format_lsn(result.lsn)} to {output}",
            err=True,
        )


@debug_group.command("rel-size")
@click.argument("node")
@click.argument("relation", metavar="SPC/DB/REL")
@click.option("--fork", type=_FORK, default="main", show_default=True)
@click.option("--lsn", default=None, help="Read at this LSN (default: the latest ingested).")
@click.pass_context
def rel_size_command(
    ctx: click.Context, node: str, relation: str, fork: str, lsn: str | None
) -> None:
    """Print the number of blocks of a relation fork as the pagestore knows it."""
    spc, db, rel = _parse_relpath(relation)
    api, node_id, at = _read_at(ctx, node, lsn)
    click.echo(api.rel_size(RelSizeRequest(node_id, spc, db, rel, fork=fork, lsn=at)).nblocks)
