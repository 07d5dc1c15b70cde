"""Which `.neon` files the pageserver reads itself (cli/neon_file_import.py): a whole local
file as it is; a whole remote one fetched byte for byte (through a cut connection too) into
the work directory; a delta, or a path that is no file, left to the other way (None)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.neon_file_import import FETCHED_NAME, local_whole_file
from cli.progress import Progress
from snapfile.manifest import origin_of
from snapfile.writer import write_snapshot_file
from tests.httpd import FileServer
from tests.snapfile.snapfile_helpers import generated_bytes, make_manifest, make_tar


def write_neon(path: Path, **changes: object) -> str:
    manifest = make_manifest(**changes)
    tar = make_tar({"base/1/1259": generated_bytes(600_000, 1)})
    with path.open("wb") as f:
        write_snapshot_file(f, manifest, [tar])
    return origin_of(manifest)


def test_a_whole_local_file_is_given_as_it_is(
    remote_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = remote_dir / "x.neon"
    origin = write_neon(path)
    for source in (str(path), f"file://{path}"):
        got = local_whole_file(source, tmp_path, Progress(False, "t"))
        assert got is not None and (got.path, got.origin) == (path, origin)
    assert list(tmp_path.iterdir()) == []
    assert local_whole_file(str(remote_dir / "none.neon"), tmp_path, Progress(False, "t")) is None
    monkeypatch.chdir(remote_dir)  # the pageserver runs elsewhere: the path is absolute
    got = local_whole_file("x.neon", tmp_path, Progress(False, "t"))
    assert got is not None and got.path == path


def test_a_whole_remote_file_is_fetched_whole(
    httpd: FileServer, remote_dir: Path, tmp_path: Path
) -> None:
    origin = write_neon(remote_dir / "x.neon")
    httpd.cut_gets.extend([100_000])  # resumed with Range after the cut
    got = local_whole_file(httpd.url("x.neon"), tmp_path, Progress(False, "t"))
    assert got is not None and got.origin == origin and got.path == tmp_path / FETCHED_NAME
    assert got.path.read_bytes() == (remote_dir / "x.neon").read_bytes()
    assert got.label == httpd.url("x.neon")


def test_a_delta_goes_the_other_way(httpd: FileServer, remote_dir: Path, tmp_path: Path) -> None:
    write_neon(remote_dir / "d.neon", parent="a@s1", parent_lsn=0x1000)
    for source in (str(remote_dir / "d.neon"), httpd.url("d.neon")):
        assert local_whole_file(source, tmp_path, Progress(False, "t")) is None
    assert list(tmp_path.iterdir()) == []
