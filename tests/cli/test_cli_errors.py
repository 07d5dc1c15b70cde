"""Bad input through the real CLI: one clear line, no traceback, and one exit code per kind
of error (issue 16 item 12). One home (with one node that is never started) serves the module.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.neoncli import NeonCli
from tests.pgtest import free_port, pg_reachable_tmpdir

NOT_FOUND_EXIT = 1
USAGE_EXIT = 2


@pytest.fixture(scope="module")
def home() -> Iterator[NeonCli]:
    base = pg_reachable_tmpdir("neon-cli-errors-")
    cli = NeonCli(base / "home", {})
    try:
        cli.run("pageserver", "start", "--port", "0", "--http-port", "0")
        cli.run("pg", "create", "--no-start", "--port", str(free_port()))
        yield cli
    finally:
        cli.cleanup()
        shutil.rmtree(base, ignore_errors=True)


def fails(neon: NeonCli, exit_code: int, *args: str) -> str:
    """The one `neon: error:` line of a command that must fail with `exit_code`."""
    proc = neon.run(*args, check=False)
    assert proc.returncode == exit_code, (args, proc.returncode, proc.stderr)
    return neon.fail(*args)


@pytest.mark.parametrize(
    "args",
    [
        ("pg", "show", "nosuch"),
        ("pg", "start", "nosuch"),
        ("pg", "destroy", "nosuch", "--yes"),
        ("storage", "show", "nosuch"),
        ("storage", "detach", "nosuch"),
        ("snapshot", "destroy", "pgdata1@nosuch"),
        ("pitr", "gc", "nosuch"),
        ("pitr", "destroy", "nosuch"),
        ("pitr", "extract-snapshot", "nosuch", "--lsn", "0/0"),
    ],
)
def test_unknown_names_exit_1(home: NeonCli, args: tuple[str, ...]) -> None:
    line = fails(home, NOT_FOUND_EXIT, *args)
    assert "does not exist" in line, line


def test_usage_errors_exit_2(home: NeonCli) -> None:
    for args in (("pg", "show"), ("pg", "list", "--bogus"), ("storage", "attach", "-t", "ftp")):
        proc = home.run(*args, check=False)
        assert proc.returncode == USAGE_EXIT, (args, proc.stderr)
        assert "Traceback" not in proc.stderr


def test_malformed_remote_url_is_one_line(home: NeonCli) -> None:
    line = fails(
        home, USAGE_EXIT, "storage", "attach", "-t", "remote", "-n", "r", "-c", "url=neon://[::1/p"
    )
    assert "invalid remote url 'neon://[::1/p'" in line, line
    line = fails(
        home, USAGE_EXIT, "storage", "attach", "-t", "s3", "-n", "e", "-c", "bucket=my-bucket",
        "-c", "endpoint=http://[::1",
    )  # fmt: skip
    assert "invalid s3 endpoint" in line, line
    assert "r" not in [s["name"] for s in home.json("storage", "list")]


def test_unusable_paths_are_one_line(home: NeonCli) -> None:
    line = fails(
        home, USAGE_EXIT, "storage", "attach", "-t", "native", "-n", "p", "-c", "path=/proc/1"
    )
    assert "/proc/1" in line, line
    line = home.fail("debug", "get-page", "primary1", "1663/5/1259", "0", "-o", "/proc/1/mem")
    assert "/proc/1/mem" in line, line


@pytest.mark.parametrize(
    ("bucket", "why"),
    [
        ("Upper", "lowercase"),
        ("ab", "3 to 63"),
        ("a" * 64, "3 to 63"),
        ("under_score", "lowercase"),
        ("-dash", "starting and ending"),
        ("a..b", "adjacent periods"),
        ("192.168.5.4", "IP address"),
        ("xn--bucket", "reserved"),
        ("my-bucket-s3alias", "reserved"),
    ],
)
def test_s3_bucket_names_follow_aws_rules(home: NeonCli, bucket: str, why: str) -> None:
    line = fails(
        home, USAGE_EXIT, "storage", "attach", "-t", "s3", "-n", "b", "-c", f"bucket={bucket}"
    )
    assert f"invalid s3 bucket name {bucket!r}" in line and why in line, line


def test_valid_s3_bucket_is_accepted(home: NeonCli) -> None:
    home.run("storage", "attach", "-t", "s3", "-n", "ok", "-c", "bucket=my-bucket.v2-x")
    home.run("storage", "detach", "ok")


def test_pitr_area_name_rule_is_stated(home: NeonCli) -> None:
    line = fails(home, USAGE_EXIT, "pitr", "create", "a/b", "--pg", "primary1")
    assert "invalid PITR area name 'a/b'" in line, line
    assert "letters, digits" in line and "tag" not in line, line
    assert home.json("pitr", "list") == []
