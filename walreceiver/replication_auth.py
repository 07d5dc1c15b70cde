"""Password authentication for the replication connection: trust, cleartext, md5, SCRAM-SHA-256.

A sans-I/O state machine: give it each Authentication* message, send the bytes it returns.
SCRAM is mutual: the server must prove it knows the password in its final message, and a
server that skips that proof (answering AuthenticationOk early) is rejected, so a spoofed
server cannot just wave us through.

Which methods a connection answers is its own policy (`allowed`), SCRAM only by default: a
cleartext or md5 request hands the password (or a hash good for an offline guess) to whoever
asks, e.g. a stranger holding a stopped node's port, so it is refused before a byte is sent.
Channel binding (SCRAM-SHA-256-PLUS) needs TLS, which these connections do not use (loopback
TCP or the node's private unix socket); plain SCRAM-SHA-256 is what the server offers then.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Iterable

from scramp import ScramClient, ScramException

from proto.errors import AuthFailed, InvalidArgument, ProtocolError
from walreceiver.replication_codec import (
    AuthenticationCleartextPassword,
    AuthenticationMD5Password,
    AuthenticationOk,
    AuthenticationOther,
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    BackendMessage,
    password_message,
    sasl_initial_response,
    sasl_response,
)

SCRAM = "SCRAM-SHA-256"


class AuthMethod(enum.StrEnum):
    """Authentication methods by their pg_hba.conf names."""

    TRUST = "trust"
    PASSWORD = "password"  # cleartext
    MD5 = "md5"
    SCRAM_SHA_256 = "scram-sha-256"


SCRAM_ONLY: frozenset[AuthMethod] = frozenset({AuthMethod.SCRAM_SHA_256})
"""What a managed node's pg_hba.conf asks over TCP: the default policy."""
TRUST_OR_SCRAM: frozenset[AuthMethod] = frozenset({AuthMethod.TRUST, AuthMethod.SCRAM_SHA_256})
"""A managed node's private unix socket (pg_hba.conf trusts it; nobody else can listen there)."""
ANY_METHOD: frozenset[AuthMethod] = frozenset(AuthMethod)
"""For a server whose operator chose md5 or cleartext: only ever given explicitly."""


def parse_auth_methods(names: Iterable[str]) -> frozenset[AuthMethod]:
    """Method names (pg_hba.conf spelling) as a policy; unknown names are an error."""
    try:
        return frozenset(AuthMethod(name) for name in names)
    except ValueError as exc:
        known = ", ".join(m.value for m in AuthMethod)
        raise InvalidArgument(f"{exc}: authentication methods are {known}") from None


def md5_password(user: str, password: str, salt: bytes) -> bytes:
    """What PostgreSQL's md5 method expects: 'md5' + md5(md5(password + user) + salt)."""
    inner = hashlib.md5(password.encode() + user.encode()).hexdigest().encode()
    return b"md5" + hashlib.md5(inner + salt).hexdigest().encode()


class Authenticator:
    """Answers the server's authentication requests for one connection attempt."""

    def __init__(
        self,
        user: str,
        password: str | None,
        *,
        allowed: frozenset[AuthMethod] = SCRAM_ONLY,
        where: str = "the server",
    ) -> None:
        self.user = user
        self.password = password
        self.allowed = allowed
        self.where = where
        self.done = False
        self._scram: ScramClient | None = None
        self._scram_verified = False
        self._method: AuthMethod | None = None  # what the server asked for, once answered

    def _require(self, method: AuthMethod, request: str) -> None:
        """Refuse a method this connection does not allow, before anything is sent."""
        if method in self.allowed:
            self._method = method
            return
        allowed = ", ".join(sorted(m.value for m in self.allowed)) or "nothing"
        what = (
            "server let us in without authentication (trust); refusing that"
            if method == AuthMethod.TRUST
            else f"server asked for {request}; refusing to send it"
        )
        raise AuthFailed(
            f"PostgreSQL at {self.where}: {what}: this connection allows only {allowed} (a "
            "pg-neon node asks for scram-sha-256, so another program may be listening on its "
            "port; allow other methods only for a server configured to use them)"
        )

    def _need_password(self, method: str) -> str:
        if self.password is None:
            raise AuthFailed(
                f"the server requires {method} password authentication for user {self.user!r} "
                "but no password was given; pass one (e.g. --password-file)"
            )
        return self.password

    def handle(self, msg: BackendMessage) -> bytes | None:
        """Process one authentication message; return the bytes to send, if any."""
        if isinstance(msg, AuthenticationOk):
            if self._method is None:
                self._require(AuthMethod.TRUST, "trust")
            elif self._method == AuthMethod.SCRAM_SHA_256 and not self._scram_verified:
                raise AuthFailed(
                    "the server accepted the login without proving it knows the SCRAM password "
                    "(no SASLFinal); refusing to trust it"
                )
            self.done = True
            return None
        if isinstance(msg, AuthenticationCleartextPassword):
            self._require(AuthMethod.PASSWORD, "a cleartext password")
            return password_message(self._need_password("cleartext").encode())
        if isinstance(msg, AuthenticationMD5Password):
            self._require(AuthMethod.MD5, "an md5 password hash")
            return password_message(md5_password(self.user, self._need_password("md5"), msg.salt))
        if isinstance(msg, AuthenticationSASL):
            return self._scram_start(msg.mechanisms)
        if isinstance(msg, AuthenticationSASLContinue):
            return self._scram_continue(msg.data)
        if isinstance(msg, AuthenticationSASLFinal):
            self._scram_final(msg.data)
            return None
        if isinstance(msg, AuthenticationOther):
            raise AuthFailed(
                f"the server asked for authentication method {msg.code}, which pg-neon does not "
                "support; configure pg_hba.conf to use scram-sha-256, md5, password or trust"
            )
        raise ProtocolError(f"unexpected {type(msg).__name__} during authentication")

    def _scram_start(self, mechanisms: tuple[str, ...]) -> bytes:
        self._require(AuthMethod.SCRAM_SHA_256, "SCRAM-SHA-256")
        if SCRAM not in mechanisms:
            raise AuthFailed(
                f"the server offers SASL mechanisms {', '.join(mechanisms) or '(none)'} but "
                f"pg-neon supports only {SCRAM} without channel binding"
            )
        if self._scram is not None:
            raise ProtocolError("the server restarted SASL authentication")
        self._scram = ScramClient([SCRAM], self.user, self._need_password("SCRAM-SHA-256"))
        return sasl_initial_response(SCRAM, self._scram.get_client_first().encode())

    def _scram_continue(self, data: bytes) -> bytes:
        if self._scram is None:
            raise ProtocolError("SASLContinue before SASL authentication started")
        try:
            self._scram.set_server_first(data.decode("utf-8"))
            return sasl_response(self._scram.get_client_final().encode())
        except (ScramException, UnicodeDecodeError) as exc:
            raise AuthFailed(
                f"SCRAM authentication failed: bad server-first message ({exc})"
            ) from None

    def _scram_final(self, data: bytes) -> None:
        if self._scram is None:
            raise ProtocolError("SASLFinal before SASL authentication started")
        try:
            self._scram.set_server_final(data.decode("utf-8"))
        except (ScramException, UnicodeDecodeError) as exc:
            raise AuthFailed(
                "SCRAM authentication failed: the server's signature does not match; "
                f"the server does not know this password or is not the expected server ({exc})"
            ) from None
        self._scram_verified = True
