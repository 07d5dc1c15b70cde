"""The paths an import request names (a `.neon` file, a data directory, where a file's small
members go) are checked before anything reads them: whoever holds the pageserver's token
chooses them.

A `.neon` file must be a regular file and a data directory a directory, neither through a
final symbolic link: a FIFO given as the file hung the import in its first read (and a
device's open can act: a tape rewinds). They are looked at through an O_PATH descriptor
(opened without following a last link, without opening the file itself: no FIFO waits, no
device acts; open(2)), then fstat. None may lie inside the pageserver's own work directory
or a page history it keeps, at any depth: the extraction would write into them, an import
read the pageserver's own files.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from proto.errors import InvalidArgument

_LOOK = getattr(os, "O_PATH", os.O_RDONLY | os.O_NONBLOCK) | os.O_NOFOLLOW | os.O_CLOEXEC
"""O_PATH (Linux): the inode is found, not opened; elsewhere O_NONBLOCK keeps a FIFO's open
from waiting for a writer."""


def check_import_file(path: Path) -> None:
    """`path` is a regular file, not through a final link."""
    mode = _mode(path)
    if not stat.S_ISREG(mode):
        raise InvalidArgument(f"{path} is {_kind(mode)}, not a regular .neon file")


def check_import_dir(path: Path, missing_ok: bool = False) -> None:
    """`path` is a directory, not through a final link (or, `missing_ok`, not there yet)."""
    if missing_ok and not os.path.lexists(path):
        return
    mode = _mode(path)
    if not stat.S_ISDIR(mode):
        raise InvalidArgument(f"{path} is {_kind(mode)}, not a data directory")


def check_outside(path: Path, roots: Iterable[Path], what: str) -> None:
    """`path` (which may not exist yet) lies in none of `roots` (the pageserver's own
    directories), compared with every link resolved."""
    real = Path(os.path.realpath(path))
    for root in roots:
        real_root = Path(os.path.realpath(root))
        if real == real_root or real.is_relative_to(real_root):
            raise InvalidArgument(
                f"{path}: {what} inside the pageserver's own directory {root} is refused"
            )


def _mode(path: Path) -> int:
    try:
        fd = os.open(path, _LOOK)
    except FileNotFoundError:
        raise InvalidArgument(f"{path} does not exist") from None
    except OSError as exc:  # ELOOP: a final link, where O_PATH is missing
        raise InvalidArgument(f"{path} cannot be imported ({exc.strerror})") from None
    try:
        return os.fstat(fd).st_mode
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a regular file" if stat.S_ISREG(mode) else "not a file"
