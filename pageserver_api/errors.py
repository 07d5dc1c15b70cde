"""Typed errors with a user-facing message, shared by every package.

Every error a user can cause derives from NeonError; the CLI prints `str(err)` as one line
and exits non-zero, and the proto layer carries `code` and the message across the wire.
They live beside the API models (not in proto/) because storage, the CLI and the API all raise
them without speaking the wire protocol; proto.errors re-exports them.
"""

from __future__ import annotations


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
