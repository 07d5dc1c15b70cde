"""Who may use the console: a one-time login token for a session cookie, and CSRF tokens.

Whoever reads the printed URL (only the user who ran `neon console`, on their terminal) logs
in once; the token is then used up, so a URL left in a shell history or a browser's history
opens nothing. Every other request needs the session cookie (HttpOnly, SameSite=Strict) and
every POST the session's CSRF token. No I/O here: app.py applies it to requests.
"""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass

COOKIE = "neon_console"
SESSION_SECONDS = 12 * 3600
"""A session ends after this long; log in again with a new `neon console` URL."""


@dataclass(frozen=True, slots=True)
class Session:
    id: str
    csrf: str
    expires_at: float


class Sessions:
    """The login token of this console and the sessions it opened."""

    def __init__(self, login_token: str | None = None, *, lifetime: float = SESSION_SECONDS):
        self._login: str | None = login_token or secrets.token_urlsafe(32)
        self._lifetime = lifetime
        self._sessions: dict[str, Session] = {}

    @property
    def login_token(self) -> str | None:
        """The token for the login URL; None once it was used."""
        return self._login

    def exchange(self, token: str, now: float | None = None) -> Session | None:
        """A new session for the login token (compared in constant time), which is then used
        up; None for any other token."""
        expected = self._login
        if expected is None or not hmac.compare_digest(token.encode(), expected.encode()):
            return None
        self._login = None
        now = time.time() if now is None else now
        session = Session(
            secrets.token_urlsafe(32), secrets.token_urlsafe(32), now + self._lifetime
        )
        self._sessions[session.id] = session
        return session

    def get(self, session_id: str | None, now: float | None = None) -> Session | None:
        """The live session with this cookie value, if any."""
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        if (time.time() if now is None else now) >= session.expires_at:
            del self._sessions[session_id]
            return None
        return session

    def end(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)


def csrf_ok(session: Session, token: str | None) -> bool:
    """The form carried this session's CSRF token (constant-time comparison)."""
    return token is not None and hmac.compare_digest(token.encode(), session.csrf.encode())


def cookie_attributes(secure: bool = False) -> dict[str, object]:
    """How the session cookie is set: unreadable by scripts, never sent by another site."""
    return {
        "httponly": True,
        "samesite": "Strict",
        "path": "/",
        "max_age": SESSION_SECONDS,
        "secure": secure,
    }
