"""The server's startup log is in the node's log directory, which PostgreSQL's OS user owns
(its logging collector writes there), while the CLI may run as root: a link that user puts
in place of the log must not make root append to, or hand over, the file it names
(cli/postmaster.py _open_log). Runs as root, as CI does."""

from __future__ import annotations

import os
from pathlib import Path

from tests.neoncli import NeonCli


def test_a_link_in_place_of_the_startup_log_is_replaced(neon: NeonCli, tmp_path: Path) -> None:
    neon.run("pg", "create", "--no-start")
    log = neon.home / "logs" / "primary1" / "startup.log"
    victim = tmp_path / "victim"
    victim.write_text("root's own\n")
    victim.chmod(0o600)
    owner = (victim.stat().st_uid, victim.stat().st_gid)
    # What PostgreSQL's OS user may do in its directory: a symlink, then a second name.
    for plant in (log.symlink_to, lambda target: os.link(target, log)):
        log.unlink(missing_ok=True)
        plant(victim)
        neon.run("pg", "start", "primary1")
        assert victim.read_text() == "root's own\n"
        assert (victim.stat().st_uid, victim.stat().st_gid) == owner
        assert victim.stat().st_nlink == 1 and not log.is_symlink() and log.is_file()
        neon.run("pg", "stop", "primary1")
