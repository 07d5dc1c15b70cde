"""Typed errors with a user-facing message, shared by every package.

Every error a user can cause derives from NeonError; the CLI prints `str(err)` as one line
and exits non-zero, and the proto layer carries `code` and the message across the wire.
They live beside the API models (not in proto/) because storage, the CLI and the API all raise
them without speaking the wire protocol; proto.errors re-exports them.
"""

from __future__ import annotations

import errno
import os


class NeonError(Exception):
    """An error whose message is fit to show a user as-is."""

    code = "error"
    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class NotFound(NeonError):
    code = "not_found"


class AlreadyExists(NeonError):
    code = "already_exists"


class InvalidArgument(NeonError):
    code = "invalid_argument"
    exit_code = 2


class Conflict(NeonError):
    """The request is valid but the current state forbids it (in use, running, ...)."""

    code = "conflict"


class Unavailable(NeonError):
    """A process or server we need cannot be reached."""

    code = "unavailable"


class NoSpace(Unavailable):
    """A filesystem is full (ENOSPC, EDQUOT): the operator's to fix where it is, not a bug
    and not a bad input; its own code so that the far side of a wire can say whose disk."""

    code = "no_space"


class AuthFailed(NeonError):
    code = "auth_failed"


class ProtocolError(NeonError):
    code = "protocol_error"


class CorruptData(NeonError):
    """Bytes on disk or on the wire that fail validation (CRC, magic, bounds)."""

    code = "corrupt_data"


class ExternalCommandFailed(NeonError):
    code = "external_command_failed"


class InternalError(NeonError):
    """A bug on the other side of the wire: the server logged details, the user sees a summary."""

    code = "internal"


ERRORS_BY_CODE: dict[str, type[NeonError]] = {
    cls.code: cls
    for cls in (
        NeonError,
        NotFound,
        AlreadyExists,
        InvalidArgument,
        Conflict,
        Unavailable,
        NoSpace,
        AuthFailed,
        ProtocolError,
        CorruptData,
        ExternalCommandFailed,
        InternalError,
    )
}


def error_from_code(code: str, message: str) -> NeonError:
    """Rebuild a typed error received over the wire."""
    return ERRORS_BY_CODE.get(code, NeonError)(message)


FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
FREE_SPACE_HINT = "; free space there and run the command again"
"""What a full filesystem's message ends with (a caller that says what to do itself, e.g.
a receiver telling its pusher, takes it off)."""


def is_full(exc: BaseException) -> bool:
    """A full filesystem's error: the OSError itself, or the NoSpace made of it (here or on
    the far side of a wire)."""
    return isinstance(exc, NoSpace) or (isinstance(exc, OSError) and exc.errno in FULL_ERRNOS)


def error_from_os(exc: OSError, path: str | os.PathLike[str] | None = None) -> NeonError:
    """One line for a failed file operation (what and where, and what to do for a full or
    read-only filesystem): what the CLI prints and the pageserver answers instead of a
    traceback. `path` names the file when the exception does not."""
    where = exc.filename if exc.filename is not None else path
    what = exc.strerror or str(exc)
    if exc.errno in FULL_ERRNOS:
        free = _free_space(where)
        return NoSpace(
            f"{what} writing {where or 'a file'}"
            + (f" (its filesystem has {free} left, not enough)" if free else "")
            + FREE_SPACE_HINT
        )
    if exc.errno == errno.EROFS:
        return Unavailable(
            f"{where or 'a file'} is on a read-only filesystem; this command writes there "
            "(read-only commands such as `neon pg list` still work)"
        )
    return NeonError(f"{where}: {what}" if where is not None else what)


def _free_space(path: str | os.PathLike[str] | None) -> str | None:
    """Free bytes on the filesystem of path (or its nearest existing parent), for people."""
    if path is None:
        return None
    current = os.path.abspath(os.fsdecode(path))
    while True:
        try:
            st = os.statvfs(current)
        except OSError:
            parent = os.path.dirname(current)
            if parent == current:
                return None
            current = parent
            continue
        free = float(st.f_bavail * st.f_frsize)
        for unit in ("B", "KiB", "MiB", "GiB"):
            if free < 1024 or unit == "GiB":
                return f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}"
            free /= 1024
