"""`neon debug`: developer tools; `verify-redo` checks native redo against WAL images."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from cli.waldump import collect_segments, iter_records
from pageserver.redo.verify import RedoVerifier


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
