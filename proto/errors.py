"""The typed errors, re-exported: they moved to pageserver_api.errors (see there)."""

from __future__ import annotations

from pageserver_api.errors import (
    ERRORS_BY_CODE,
    AlreadyExists,
    AuthFailed,
    Conflict,
    CorruptData,
    ExternalCommandFailed,
    InternalError,
    InvalidArgument,
    NeonError,
    NoSpace,
    NotFound,
    ProtocolError,
    Unavailable,
    error_from_code,
)

__all__ = [
    "ERRORS_BY_CODE",
    "AlreadyExists",
    "AuthFailed",
    "Conflict",
    "CorruptData",
    "ExternalCommandFailed",
    "InternalError",
    "InvalidArgument",
    "NeonError",
    "NoSpace",
    "NotFound",
    "ProtocolError",
    "Unavailable",
    "error_from_code",
]
