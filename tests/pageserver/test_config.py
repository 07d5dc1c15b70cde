"""The daemon's one PageserverConfig: built from its arguments and environment at startup,
with the GC interval and the storage settings in it, and bad values refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from pageserver.api.service import Pageserver
from pageserver.config import DEFAULT_GC_INTERVAL, PageserverConfig
from pageserver.daemon import parse_args
from pageserver.storage.settings import DEFAULT_SETTINGS, StoreSettings
from proto.errors import InvalidArgument

MiB = 1024 * 1024


def test_defaults(tmp_path: Path) -> None:
    config, to_stderr = parse_args(["--workdir", str(tmp_path)], env={})
    assert config.workdir == tmp_path and not to_stderr
    assert config.gc_interval == DEFAULT_GC_INTERVAL
    assert config.store_settings == DEFAULT_SETTINGS


def test_environment_then_arguments(tmp_path: Path) -> None:
    env = {
        "NEON_GC_INTERVAL": "2.5",
        "NEON_STORE_CHECKPOINT_DISTANCE": str(8 * MiB),
        "NEON_STORE_COMPACTION_THRESHOLD": "3",
        "UNRELATED": "x",
    }
    config, _ = parse_args(["--workdir", str(tmp_path)], env=env)
    assert config.gc_interval == 2.5
    assert config.store_settings == StoreSettings(
        checkpoint_distance=8 * MiB, compaction_threshold=3
    )
    argv = ["--workdir", str(tmp_path), "--gc-interval", "7", "--store-setting", "zstd_level=9"]
    argv += ["--store-setting", "compaction_threshold=4"]
    config, _ = parse_args(argv, env=env)
    assert config.gc_interval == 7
    assert config.store_settings == StoreSettings(
        checkpoint_distance=8 * MiB, compaction_threshold=4, zstd_level=9
    )


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--gc-interval", "0"], {}, "GC interval must be a positive number"),
        (["--gc-interval", "soon"], {}, "--gc-interval must be a number of seconds, not 'soon'"),
        ([], {"NEON_GC_INTERVAL": "inf"}, "GC interval must be a positive number"),
        ([], {"NEON_GC_INTERVAL": "x"}, "NEON_GC_INTERVAL must be a number of seconds"),
        (["--store-setting", "nope=1"], {}, "unknown storage setting 'nope'"),
        (["--store-setting", "block_size"], {}, "expected NAME=VALUE"),
        ([], {"NEON_STORE_BLOCK_SIZE": "big"}, "NEON_STORE_BLOCK_SIZE must be an integer"),
        ([], {"NEON_STORE_COMPACTION_THRESHOLD": "1"}, "compaction_threshold must be at least 2"),
    ],
)
def test_bad_settings_are_refused_by_name(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    env: dict[str, str],
    message: str,
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(["--workdir", str(tmp_path), *argv], env=env)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_the_config_is_checked_however_it_is_built(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="GC interval"):
        PageserverConfig(tmp_path, gc_interval=-1)


def test_storages_open_with_the_configured_settings(tmp_path: Path) -> None:
    settings = StoreSettings(checkpoint_distance=MiB, block_size=4096)
    ps = Pageserver(PageserverConfig(tmp_path, store_settings=settings))
    history = ps.history(tmp_path / "pagestore")
    try:
        assert history.timelines.settings == settings
    finally:
        history.close()
