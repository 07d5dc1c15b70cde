"""The replication codec and authenticator, with bytes only."""

from __future__ import annotations

import contextlib
import hashlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scramp import ScramMechanism

from proto.errors import AuthFailed, InvalidArgument, ProtocolError
from walreceiver.replication_auth import (
    ANY_METHOD,
    TRUST_OR_SCRAM,
    Authenticator,
    md5_password,
    parse_auth_methods,
)
from walreceiver.replication_codec import (
    AuthenticationCleartextPassword,
    AuthenticationMD5Password,
    AuthenticationOk,
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    BackendKeyData,
    BackendParser,
    CommandComplete,
    CopyBothResponse,
    CopyData,
    CopyDone,
    CopyOutResponse,
    DataRow,
    ErrorResponse,
    NoticeResponse,
    ParameterStatus,
    PrimaryKeepalive,
    ReadyForQuery,
    RowDescription,
    XLogData,
    copy_done_message,
    decode_replication_message,
    password_message,
    pg_now_us,
    query_message,
    sasl_initial_response,
    standby_status_update,
    startup_message,
)


def msg(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def parse_all(data: bytes) -> list[object]:
    p = BackendParser()
    p.feed(data)
    return list(p)


def test_startup_message_layout() -> None:
    raw = startup_message({"user": "u", "replication": "true"})
    assert struct.unpack("!II", raw[:8]) == (len(raw), 196608)
    assert raw[8:] == b"user\0u\0replication\0true\0\0"


def test_frontend_messages() -> None:
    assert query_message("IDENTIFY_SYSTEM") == msg(b"Q", b"IDENTIFY_SYSTEM\0")
    assert password_message(b"pw") == msg(b"p", b"pw\0")
    assert sasl_initial_response("SCRAM-SHA-256", b"abc") == msg(
        b"p", b"SCRAM-SHA-256\0\0\0\0\3abc"
    )
    assert copy_done_message() == msg(b"c", b"")
    with pytest.raises(ProtocolError):
        query_message("a\0b")


def test_standby_status_update_layout() -> None:
    raw = standby_status_update(1, 2, 3, 4, True)
    assert raw[:1] == b"d" and struct.unpack("!I", raw[1:5])[0] == 4 + 34
    assert raw[5:] == b"r" + struct.pack("!QQQqB", 1, 2, 3, 4, 1)
    assert pg_now_us(946_684_800.0) == 0


def test_authentication_messages() -> None:
    data = (
        msg(b"R", struct.pack("!i", 0))
        + msg(b"R", struct.pack("!i", 3))
        + msg(b"R", struct.pack("!i", 5) + b"salt")
        + msg(b"R", struct.pack("!i", 10) + b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0")
        + msg(b"R", struct.pack("!i", 11) + b"r=abc")
        + msg(b"R", struct.pack("!i", 12) + b"v=xyz")
    )
    assert parse_all(data) == [
        AuthenticationOk(),
        AuthenticationCleartextPassword(),
        AuthenticationMD5Password(b"salt"),
        AuthenticationSASL(("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")),
        AuthenticationSASLContinue(b"r=abc"),
        AuthenticationSASLFinal(b"v=xyz"),
    ]


def test_session_and_result_messages() -> None:
    field = b"systemid\0" + struct.pack("!IhIhih", 0, 0, 25, -1, -1, 0)
    data = (
        msg(b"S", b"server_version\x0015.4\0")
        + msg(b"K", struct.pack("!ii", 42, 7))
        + msg(b"Z", b"I")
        + msg(b"T", struct.pack("!h", 1) + field)
        + msg(b"D", struct.pack("!hi", 2, 3) + b"abc" + struct.pack("!i", -1))
        + msg(b"C", b"IDENTIFY_SYSTEM\0")
        + msg(b"E", b"SERROR\0C42704\0Mno slot\0Dsome detail\0\0")
        + msg(b"N", b"SNOTICE\0Mhi\0\0")
        + msg(b"W", b"\0\0\0")
        + msg(b"H", b"\0\0\1\0\0")
        + msg(b"d", b"xyz")
        + msg(b"c", b"")
    )
    out = parse_all(data)
    assert out[0] == ParameterStatus("server_version", "15.4")
    assert out[1] == BackendKeyData(42, 7)
    assert out[2] == ReadyForQuery("I")
    assert isinstance(out[3], RowDescription) and out[3].fields[0].name == "systemid"
    assert out[3].fields[0].type_oid == 25
    assert out[4] == DataRow((b"abc", None))
    assert out[5] == CommandComplete("IDENTIFY_SYSTEM")
    err = out[6]
    assert isinstance(err, ErrorResponse)
    assert (err.sqlstate, err.message, err.severity) == ("42704", "no slot", "ERROR")
    assert err.describe() == "no slot; some detail"
    assert isinstance(out[7], NoticeResponse)
    assert out[8] == CopyBothResponse(0, ())
    assert out[9] == CopyOutResponse(0, (0,))
    assert out[10:] == [CopyData(b"xyz"), CopyDone()]


def test_incremental_feeding_byte_by_byte() -> None:
    data = msg(b"Z", b"I") + msg(b"d", b"w" + bytes(24) + b"wal!") + msg(b"C", b"COPY 0\0")
    p = BackendParser()
    out: list[object] = []
    for i in range(len(data)):
        p.feed(data[i : i + 1])
        out.extend(p)
    assert out == [
        ReadyForQuery("I"),
        CopyData(b"w" + bytes(24) + b"wal!"),
        CommandComplete("COPY 0"),
    ]
    assert p.buffered == 0


def test_replication_payloads() -> None:
    x = decode_replication_message(b"w" + struct.pack("!QQq", 10, 20, 30) + b"page")
    assert x == XLogData(10, 20, 30, b"page") and x.data_end == 14
    k = decode_replication_message(b"k" + struct.pack("!Qq?", 99, 5, True))
    assert k == PrimaryKeepalive(99, 5, True)
    for bad in (b"", b"w" + bytes(10), b"k" + bytes(3), b"h" + bytes(40)):
        with pytest.raises(ProtocolError):
            decode_replication_message(bad)


@pytest.mark.parametrize(
    "raw",
    [
        msg(b"?", b""),  # unknown type
        b"Z\0\0\0\3",  # length below 4
        b"d\x7f\xff\xff\xff",  # absurd length
        msg(b"Z", b""),  # missing status byte
        msg(b"K", b"\0\0"),  # short
        msg(b"S", b"name-without-nul"),
        msg(b"D", struct.pack("!hi", 1, 10) + b"abc"),  # value longer than body
        msg(b"T", struct.pack("!h", -1)),
        msg(b"C", b"tag\0extra"),  # trailing bytes
        msg(b"R", b"\0\0"),
    ],
)
def test_malformed_messages_raise_protocol_error(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_all(raw)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=1, max_value=17))
def test_random_bytes_never_crash(data: bytes, step: int) -> None:
    p = BackendParser(max_size=1 << 16)
    try:
        for i in range(0, len(data), step):
            p.feed(data[i : i + step])
            for m in p:
                if isinstance(m, CopyData) and m.data:
                    with contextlib.suppress(ProtocolError):
                        decode_replication_message(m.data)
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=200))
def test_truncated_valid_stream_waits_for_more(cut: int) -> None:
    data = (
        msg(b"T", struct.pack("!h", 1) + b"a\0" + struct.pack("!IhIhih", 0, 0, 25, -1, -1, 0))
        + msg(b"D", struct.pack("!hi", 1, 1) + b"x")
        + msg(b"d", b"w" + bytes(24) + b"abc")
    )
    p = BackendParser()
    p.feed(data[:cut])
    got = list(p)
    p.feed(data[cut:])
    got += list(p)
    assert len(got) == 3 and p.buffered == 0


# -- authentication ----------------------------------------------------------------------------


def test_md5_password_matches_postgres_formula() -> None:
    inner = hashlib.md5(b"secretalice").hexdigest()
    expected = "md5" + hashlib.md5(inner.encode() + b"abcd").hexdigest()
    assert md5_password("alice", "secret", b"abcd") == expected.encode()
    reply = Authenticator("alice", "secret", allowed=ANY_METHOD).handle(
        AuthenticationMD5Password(b"abcd")
    )
    assert reply == password_message(expected.encode())


def test_trust_and_cleartext() -> None:
    a = Authenticator("u", None, allowed=ANY_METHOD)
    assert a.handle(AuthenticationOk()) is None and a.done
    with pytest.raises(AuthFailed, match="no password was given"):
        Authenticator("u", None, allowed=ANY_METHOD).handle(AuthenticationCleartextPassword())
    cleartext = Authenticator("u", "pw", allowed=ANY_METHOD)
    assert cleartext.handle(AuthenticationCleartextPassword()) == password_message(b"pw")
    assert cleartext.handle(AuthenticationOk()) is None and cleartext.done


@pytest.mark.parametrize(
    ("request_msg", "refusal"),
    [
        (AuthenticationCleartextPassword(), "server asked for a cleartext password; refusing"),
        (AuthenticationMD5Password(b"abcd"), "server asked for an md5 password hash; refusing"),
        (AuthenticationOk(), "server let us in without authentication \\(trust\\); refusing"),
    ],
)
def test_default_policy_answers_only_scram(request_msg: object, refusal: str) -> None:
    """What a managed node's walreceiver does when a stranger on the node's port asks for a
    password it could read: it raises before returning a single byte to send."""
    auth = Authenticator("neon_replication", "secret", where="127.0.0.1:5432")
    with pytest.raises(AuthFailed, match=f"PostgreSQL at 127.0.0.1:5432: {refusal}") as err:
        auth.handle(request_msg)  # type: ignore[arg-type]
    assert "secret" not in str(err.value)
    assert "allows only scram-sha-256" in str(err.value)
    assert not auth.done


def test_unix_socket_policy_also_accepts_trust() -> None:
    auth = Authenticator("neon_replication", "secret", allowed=TRUST_OR_SCRAM)
    assert auth.handle(AuthenticationOk()) is None and auth.done
    with pytest.raises(AuthFailed, match="cleartext password; refusing"):
        Authenticator("u", "pw", allowed=TRUST_OR_SCRAM).handle(AuthenticationCleartextPassword())


def test_an_md5_policy_must_be_given_explicitly() -> None:
    md5 = parse_auth_methods(["scram-sha-256", "md5"])
    assert Authenticator("u", "pw", allowed=md5).handle(AuthenticationMD5Password(b"abcd"))
    with pytest.raises(AuthFailed, match="cleartext"):
        Authenticator("u", "pw", allowed=md5).handle(AuthenticationCleartextPassword())
    with pytest.raises(InvalidArgument, match="'kerberos' is not a valid AuthMethod"):
        parse_auth_methods(["kerberos"])


def _scram_server(password: str) -> tuple[ScramMechanism, object]:
    mech = ScramMechanism("SCRAM-SHA-256")
    salt, stored, server_key, iterations = mech.make_auth_info(password)
    return mech, (salt, stored, server_key, iterations)


def _run_scram(client_pw: str, server_pw: str, tamper_final: bool = False) -> Authenticator:
    mech, info = _scram_server(server_pw)
    server = mech.make_server(lambda _user: info)
    auth = Authenticator("neon", client_pw)
    first = auth.handle(AuthenticationSASL(("SCRAM-SHA-256",)))
    assert first is not None
    # SASLInitialResponse: 'p', len, mechanism\0, int32 len, data
    body = first[5:]
    data = body[len(b"SCRAM-SHA-256\0") + 4 :]
    server.set_client_first(data.decode())
    final = auth.handle(AuthenticationSASLContinue(server.get_server_first().encode()))
    assert final is not None
    server.set_client_final(final[5:].decode())
    server_final = server.get_server_final()
    if tamper_final:
        server_final = "v=" + "A" * 44
    auth.handle(AuthenticationSASLFinal(server_final.encode()))
    auth.handle(AuthenticationOk())
    return auth


def test_scram_round_trip() -> None:
    assert _run_scram("pw", "pw").done


def test_scram_rejects_bad_server_signature() -> None:
    with pytest.raises(AuthFailed, match="signature"):
        _run_scram("pw", "pw", tamper_final=True)


def test_scram_rejects_missing_server_final() -> None:
    auth = Authenticator("neon", "pw")
    auth.handle(AuthenticationSASL(("SCRAM-SHA-256",)))
    with pytest.raises(AuthFailed, match="SASLFinal"):
        auth.handle(AuthenticationOk())


def test_scram_requires_supported_mechanism() -> None:
    with pytest.raises(AuthFailed, match="SCRAM-SHA-256-PLUS"):
        Authenticator("neon", "pw").handle(AuthenticationSASL(("SCRAM-SHA-256-PLUS",)))
