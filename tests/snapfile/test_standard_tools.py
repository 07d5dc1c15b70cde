"""A .neon file opens with the real `tar`, `zstd` and `sha256sum`, exactly as
docs/snapshot-format.md says."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.snapfile.snapfile_helpers import encode, generated_bytes, make_manifest, make_tar

# As docs/snapshot-format.md writes it.
VERIFY = (
    "jq -r '.manifest, .frames[] | \"\\(.sha256)  \\(.name)\"' checksums.json"
    " | sha256sum -c --quiet"
)
FILES = {
    "PG_VERSION": b"15\n",
    "global/pg_control": generated_bytes(8192, 1),
    "base/1/1259": generated_bytes(3 * 8192 * 17, 2),
    "base/1/16384": generated_bytes(300_000, 3),
    "pg_wal/000000010000000000000003": generated_bytes(100_000, 4),
}


@pytest.fixture(scope="module")
def neon_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    for tool in ("tar", "zstd", "sha256sum", "jq"):
        assert shutil.which(tool), f"{tool} is missing: run scripts/setup.sh"
    tar = make_tar(FILES)
    neon, checksums = encode(make_manifest(64 * 1024), tar, [10_000])
    assert len(checksums.frames) > 3
    path = tmp_path_factory.mktemp("std") / "x.neon"
    path.write_bytes(neon)
    return path, tar


def run(command: str, cwd: Path) -> bytes:
    """A shell pipeline with pipefail; any stderr output (a tar warning) fails the test."""
    done = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command], cwd=cwd, capture_output=True, check=False
    )
    assert done.returncode == 0 and not done.stderr, (command, done.stderr.decode())
    return done.stdout


def check_pgdata(pgdata: Path) -> None:
    got = {str(p.relative_to(pgdata)): p.read_bytes() for p in pgdata.rglob("*") if p.is_file()}
    assert got == FILES


def test_list_shows_manifest_first_then_frames_then_checksums(
    neon_file: tuple[Path, bytes],
) -> None:
    path, _ = neon_file
    names = run(f"tar -tf {path}", path.parent).decode().splitlines()
    assert names[0] == "manifest.json"
    assert names[-1] == "checksums.json"
    assert names[1:-1] == [f"frames/{i:08d}.zst" for i in range(len(names) - 2)]


def test_extract_then_decompress_the_frames(neon_file: tuple[Path, bytes], tmp_path: Path) -> None:
    """The documented two-step way: `tar -xf`, check the digests, `cat frames/*.zst | zstd -d
    | tar -x`."""
    path, tar = neon_file
    run(f"tar -xf {path}", tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["lsn"] == "1/6B374848" and manifest["pg_version"] == 15
    checksums = json.loads((tmp_path / "checksums.json").read_text())
    run(VERIFY, tmp_path)
    # The check does catch a damaged frame.
    frame = tmp_path / "frames" / "00000001.zst"
    good = frame.read_bytes()
    frame.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    assert subprocess.run(["bash", "-o", "pipefail", "-c", VERIFY], cwd=tmp_path).returncode != 0
    frame.write_bytes(good)
    run("zstd -q -t frames/*.zst", tmp_path)
    assert run("cat frames/*.zst | zstd -d", tmp_path) == tar
    assert sum(f["data_size"] for f in checksums["frames"]) == checksums["data_size"] == len(tar)
    (tmp_path / "pgdata").mkdir()
    run("cat frames/*.zst | zstd -d | tar -x -C pgdata", tmp_path)
    check_pgdata(tmp_path / "pgdata")


def test_one_pipeline_without_temporary_files(
    neon_file: tuple[Path, bytes], tmp_path: Path
) -> None:
    """The documented one-liner: the frames' bytes straight out of the outer tar."""
    path, tar = neon_file
    assert run(f"tar -xOf {path} --wildcards 'frames/*' | zstd -d", tmp_path) == tar
    (tmp_path / "pgdata").mkdir()
    run(f"tar -xOf {path} --wildcards 'frames/*' | zstd -d | tar -x -C pgdata", tmp_path)
    check_pgdata(tmp_path / "pgdata")
    assert run(f"tar -xOf {path} manifest.json", tmp_path).startswith(b'{\n  "format_version": 2')
