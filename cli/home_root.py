"""Which directory is NEON_HOME: the one rule, shared by `NeonHome.resolve` (cli/home.py) and
`neon`'s launcher (cli/launch.py), which must find the home's warm command server before it
imports anything. Standard library only."""

from __future__ import annotations

import os

ROOT_DEFAULT_HOME = "/var/lib/neon"
"""The default NEON_HOME of root (as in the container image)."""
HOME_ENV = "NEON_HOME"
USER_DEFAULT_HOME = "~/.neon"


def chosen_home(option: str | None) -> str:
    """--home, else $NEON_HOME, else ~/.neon (/var/lib/neon as root: PostgreSQL runs as its
    own account then and must reach the data directories, and root's home is 0700, which
    pg-neon never opens up); not yet expanded (`~`) nor made absolute."""
    if option is not None:
        return option
    env = os.environ.get(HOME_ENV)
    if env:
        return env
    if os.geteuid() == 0:
        return ROOT_DEFAULT_HOME
    return USER_DEFAULT_HOME
