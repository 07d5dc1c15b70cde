"""Login tokens, sessions and CSRF tokens (cli/console/session.py)."""

from __future__ import annotations

from cli.console.session import Sessions, cookie_attributes, csrf_ok


def test_the_login_token_opens_one_session_once() -> None:
    sessions = Sessions("the-token")
    assert sessions.login_token == "the-token"
    assert sessions.exchange("wrong") is None
    assert sessions.exchange("the-tok") is None
    assert sessions.exchange("") is None
    session = sessions.exchange("the-token")
    assert session is not None
    assert sessions.login_token is None
    assert sessions.exchange("the-token") is None  # used up
    assert sessions.get(session.id) == session
    assert sessions.get("someone-elses") is None
    assert sessions.get(None) is None


def test_tokens_are_random_and_long() -> None:
    a, b = Sessions(), Sessions()
    assert a.login_token and b.login_token and a.login_token != b.login_token
    assert len(a.login_token) >= 40
    session = a.exchange(a.login_token)
    assert session is not None
    assert len(session.id) >= 40 and len(session.csrf) >= 40 and session.id != session.csrf


def test_sessions_expire_and_end() -> None:
    sessions = Sessions("t", lifetime=60)
    session = sessions.exchange("t", now=1000)
    assert session is not None
    assert sessions.get(session.id, now=1059) == session
    assert sessions.get(session.id, now=1060) is None
    assert sessions.get(session.id, now=1000) is None  # forgotten, not only hidden
    again = Sessions("u")
    other = again.exchange("u")
    assert other is not None
    again.end(other.id)
    assert again.get(other.id) is None


def test_csrf_token_must_be_the_sessions() -> None:
    sessions = Sessions("t")
    session = sessions.exchange("t")
    assert session is not None
    assert csrf_ok(session, session.csrf)
    assert not csrf_ok(session, None)
    assert not csrf_ok(session, "")
    assert not csrf_ok(session, session.id)


def test_the_cookie_is_httponly_and_strict() -> None:
    attributes = cookie_attributes()
    assert attributes["httponly"] is True
    assert attributes["samesite"] == "Strict"
    assert attributes["path"] == "/"
