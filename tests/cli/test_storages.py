"""Storage secrets (issue 16 item 5): given without the command line, stored 0600, shown as ****.

A secret on argv is readable by every local user (/proc/PID/cmdline) while the command runs;
`-c KEY=@FILE`, `-c KEY=env:VAR` and `--prompt-secrets` keep it off. Runs the real CLI.
"""

from __future__ import annotations

import os
import select
import sqlite3
import stat
import subprocess
import time
from pathlib import Path

from cli.registry import Registry
from tests.neoncli import NEON, NeonCli

URL_PASSWORD = "p@ss:w/rd"
URL = "neon://alice:p%40ss%3Aw%2Frd@127.0.0.1:6400/team/store"


def _everything_shown(neon: NeonCli, *names: str) -> str:
    shown = neon.run("storage", "list").stdout + neon.run("storage", "list", "--json").stdout
    for name in names:
        shown += neon.run("storage", "show", name).stdout
        shown += neon.run("storage", "show", name, "--json").stdout
    return shown


def test_secrets_from_a_file_and_the_environment(neon: NeonCli, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("tok-from-file\n")
    neon.run("storage", "attach", "-t", "remote", "-n", "r", "-c", f"url={URL}", "-c",
             f"token=@{token_file}")  # fmt: skip
    neon.env_extra["S3_SECRET"] = "s3-from-env"
    neon.run("storage", "attach", "-t", "s3", "-n", "s", "-c", "bucket=tank", "-c",
             "secret_access_key=env:S3_SECRET")  # fmt: skip
    neon.run("storage", "attach", "-t", "remote", "-n", "piped", "-c", "url=neon://[::1]:6400",
             "-c", "token=@-", input="tok-from-stdin\n")  # fmt: skip

    secrets = neon.home / "secrets"
    stored = {
        "storage.r.token": "tok-from-file",
        "storage.r.password": URL_PASSWORD,
        "storage.s.secret_access_key": "s3-from-env",
        "storage.piped.token": "tok-from-stdin",
    }
    for name, value in stored.items():
        assert (secrets / name).read_text() == value, name
        assert stat.S_IMODE((secrets / name).stat().st_mode) == 0o600, name

    shown = _everything_shown(neon, "r", "s", "piped")
    for value in [*stored.values(), "p%40ss"]:
        assert value not in shown, value
    assert "neon://alice@127.0.0.1:6400/team/store" in shown
    assert "password: **** (stored, not shown)" in neon.run("storage", "show", "r").stdout
    assert neon.json("storage", "show", "r")["secrets"] == ["token", "password"]
    registry = (neon.home / "registry.db").read_bytes()
    assert b"p%40ss" not in registry and b"tok-from" not in registry

    # Bad sources: one line, nothing attached.
    assert "cannot read token" in neon.fail(
        "storage", "attach", "-t", "remote", "-n", "x", "-c", "url=neon://h:1",
        "-c", f"token=@{tmp_path / 'missing'}",
    )  # fmt: skip
    assert "environment variable NOPE" in neon.fail(
        "storage", "attach", "-t", "s3", "-n", "x", "-c", "bucket=tank",
        "-c", "secret_access_key=env:NOPE",
    )  # fmt: skip
    assert "given twice" in neon.fail(
        "storage", "attach", "-t", "remote", "-n", "x", "-c", f"url={URL}",
        "-c", f"password=@{token_file}",
    )  # fmt: skip
    bad_url = neon.fail("storage", "attach", "-t", "remote", "-n", "x", "-c",
                        "url=neon://alice:hunter2@host")  # fmt: skip
    assert "needs a port" in bad_url and "hunter2" not in bad_url and "****" in bad_url
    assert sorted(s["name"] for s in neon.json("storage", "list")) == ["local", "piped", "r", "s"]


def test_a_literal_secret_works_with_a_warning(neon: NeonCli) -> None:
    proc = neon.run("storage", "attach", "-t", "remote", "-n", "r", "-c", "url=neon://h:1",
                    "-c", "token=on-argv")  # fmt: skip
    assert "token was on the command line" in proc.stderr and "on-argv" not in proc.stderr
    assert (neon.home / "secrets" / "storage.r.token").read_text() == "on-argv"


def test_a_password_stored_before_is_masked(neon: NeonCli) -> None:
    """A registry written before passwords were split off the url still shows none."""
    neon.run("storage", "list")
    registry = Registry(neon.home / "registry.db")
    try:
        with registry.transaction() as cur:
            registry.insert_storage(cur, "old", "remote", {"url": URL})
    finally:
        registry.close()
    shown = _everything_shown(neon, "old")
    assert "p%40ss" not in shown and "neon://alice:****@127.0.0.1:6400/team/store" in shown
    with sqlite3.connect(neon.home / "registry.db") as db:
        assert db.execute("SELECT count(*) FROM storages").fetchone() == (2,)


def test_prompt_reads_hidden_input_on_a_terminal_only(neon: NeonCli) -> None:
    attach = ("storage", "attach", "-t", "s3", "-n", "s", "-c", "bucket=tank", "--prompt-secrets")
    # Not a terminal: fails at once, never waits for input.
    started = time.monotonic()
    assert "not a terminal" in neon.fail(*attach)
    assert time.monotonic() - started < 60

    controller, terminal = os.openpty()
    try:
        proc = subprocess.Popen(
            [NEON, *attach], stdin=terminal, stdout=subprocess.PIPE, stderr=terminal,
            env=neon.env(), start_new_session=True,
        )  # fmt: skip
        os.close(terminal)
        seen = b""
        deadline = time.monotonic() + 60
        while b"secret_access_key" not in seen:
            assert time.monotonic() < deadline, f"no prompt: {seen!r}"
            if select.select([controller], [], [], 1)[0]:
                seen += os.read(controller, 4096)
        os.write(controller, b"typed-secret\n")
        out, _ = proc.communicate(timeout=60)
        while select.select([controller], [], [], 0.2)[0]:
            try:
                seen += os.read(controller, 4096)
            except OSError:
                break
    finally:
        os.close(controller)
    assert proc.returncode == 0, (out, seen)
    assert b"typed-secret" not in seen, "the secret was echoed"
    assert (neon.home / "secrets" / "storage.s.secret_access_key").read_text() == "typed-secret"
