"""Storage options through the real CLI: a native storage has no compression option (its
layer files are always zstd-compressed), and one stored by an older version is not shown."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from tests.neoncli import NeonCli


def test_native_storage_refuses_compression(neon: NeonCli, tmp_path: Path) -> None:
    for value in ("on", "off"):
        error = neon.fail(
            "storage", "attach", "-t", "native", "-n", "z", "-c", f"path={tmp_path / 'z'}",
            "-c", f"compression={value}",
        )  # fmt: skip
        assert "always zstd-compressed" in error and "compression" in error
    # Bad input changes nothing.
    assert [s["name"] for s in neon.json("storage", "list")] == ["local"]
    assert not (tmp_path / "z").exists()
    # Other storage types never had it.
    assert "unknown option(s) compression" in neon.fail(
        "storage", "attach", "-t", "s3", "-n", "s", "-c", "bucket=b", "-c", "compression=on"
    )


def test_compression_stored_by_an_older_version_is_not_shown(neon: NeonCli) -> None:
    neon.json("storage", "list")  # creates the home and its default storage
    with sqlite3.connect(neon.home / "registry.db") as db:
        (raw,) = db.execute("SELECT options FROM storages WHERE name = 'local'").fetchone()
        old = {**json.loads(raw), "compression": "on"}
        db.execute("UPDATE storages SET options = ? WHERE name = 'local'", (json.dumps(old),))
    assert "compression=" not in neon.run("storage", "list").stdout
    assert "compression:" not in neon.run("storage", "show", "local").stdout
    assert "compression" not in neon.json("storage", "show", "local")["options"]
