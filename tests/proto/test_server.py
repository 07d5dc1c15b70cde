"""ProtoServer and ProtoClient over real loopback sockets."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proto.client import ProtoClient, call_sync
from proto.errors import (
    AuthFailed,
    Conflict,
    InternalError,
    InvalidArgument,
    NotFound,
    ProtocolError,
    Unavailable,
)
from proto.frames import (
    DEFAULT_MAX_FRAME_SIZE,
    HEADER,
    PRE_AUTH_MAX_FRAME_SIZE,
    RAW_FLAG,
    FrameDecoder,
    raw_frame_header,
)
from proto.messages import (
    PROTOCOL_VERSION,
    Error,
    Hello,
    HelloOk,
    Request,
    Response,
    StreamData,
    StreamEnd,
    decode_payload,
    encode_message,
)
from proto.server import ProtoServer, RequestContext, bound_address

TOKEN = "t0ken"
STEP = 5.0  # generous bound for any single network step on loopback


def blob(size: int) -> bytes:
    """Deterministic, non-repeating-looking content."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(counter.to_bytes(8, "big")).digest()
        counter += 1
    return bytes(out[:size])


async def echo(ctx: RequestContext) -> Any:
    return ctx.params


async def fail(ctx: RequestContext) -> Any:
    raise InvalidArgument(f"bad value {ctx.params.get('x')!r}")


async def crash(ctx: RequestContext) -> Any:
    raise ZeroDivisionError("oops")


async def unencodable(ctx: RequestContext) -> Any:
    return object()


async def download(ctx: RequestContext) -> Any:
    data = blob(ctx.params["size"])
    for start in range(0, len(data), 300_000):  # deliberately not the wire chunk size
        await ctx.send(data[start : start + 300_000])
    if ctx.params.get("fail_after"):
        raise NotFound("vanished midway")
    return {"sha256": hashlib.sha256(data).hexdigest()}


async def upload(ctx: RequestContext) -> Any:
    digest = hashlib.sha256()
    size = 0
    async for chunk in ctx.upload():
        digest.update(chunk)
        size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


async def refuse_upload(ctx: RequestContext) -> Any:
    raise Conflict("not now")


HANDLERS = {
    "echo": echo,
    "fail": fail,
    "crash": crash,
    "unencodable": unencodable,
    "download": download,
    "upload": upload,
    "refuse_upload": refuse_upload,
}


@pytest.fixture
async def server() -> AsyncIterator[ProtoServer]:
    srv = ProtoServer(HANDLERS, token=TOKEN, server_name="test-ps", hello_timeout=1.0)
    await srv.start()
    yield srv
    await asyncio.wait_for(srv.close(), STEP)


async def connect(srv: ProtoServer, **kw: Any) -> ProtoClient:
    kw.setdefault("token", TOKEN)
    return await ProtoClient.connect("127.0.0.1", srv.port, timeout=STEP, **kw)


async def assert_serves(srv: ProtoServer) -> None:
    async with await connect(srv) as client:
        assert await asyncio.wait_for(client.call("echo", ok=1), STEP) == {"ok": 1}


async def test_call_and_typed_errors(server: ProtoServer) -> None:
    assert server.port > 0
    async with await connect(server) as client:
        assert client.server_name == "test-ps"
        assert await client.call("echo", a=1, b=[b"x", None]) == {"a": 1, "b": [b"x", None]}
        with pytest.raises(InvalidArgument, match="bad value 3"):
            await client.call("fail", x=3)
        with pytest.raises(NotFound, match="no method 'nope'"):
            await client.call("nope")
        with pytest.raises(InternalError, match="ZeroDivisionError: oops"):
            await client.call("crash")
        with pytest.raises(InternalError, match="cannot be sent"):
            await client.call("unencodable")
        with pytest.raises(ProtocolError, match="cannot encode"):
            await client.call("echo", x=object())
        # Every error above left the connection usable.
        assert await client.call("echo") == {}


async def test_wrong_or_missing_token(server: ProtoServer) -> None:
    with pytest.raises(AuthFailed, match=r"127\.0\.0\.1:\d+ refused.*wrong token"):
        await connect(server, token="nope")
    with pytest.raises(AuthFailed, match="requires a token"):
        await connect(server, token=None)
    await assert_serves(server)


async def raw_exchange(port: int, data: bytes, *, eof: bool = True) -> list[Any]:
    """Send raw bytes, then collect every message the server sends until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        if eof:
            writer.write_eof()
        await writer.drain()
        received = b""
        async with asyncio.timeout(STEP):
            while chunk := await reader.read(65536):
                received += chunk
    except (ConnectionResetError, BrokenPipeError):
        received = b""  # the server closed first: fine, it did not hang
    finally:
        writer.close()
    try:
        return [decode_payload(p) for p in FrameDecoder().feed(received)]
    except ProtocolError:
        pytest.fail(f"server sent an undecodable reply: {received!r}")


@pytest.mark.parametrize("version", [1, 99], ids=["before raw frames", "future"])
async def test_wrong_protocol_version(server: ProtoServer, version: int) -> None:
    replies = await raw_exchange(server.port, encode_message(Hello(version, TOKEN, "other")))
    assert len(replies) == 1 and isinstance(replies[0], Error)
    assert replies[0].code == "protocol_error"
    assert f"client speaks version {version}" in replies[0].message
    assert f"speaks version {PROTOCOL_VERSION}" in replies[0].message


async def test_download_several_mib(server: ProtoServer) -> None:
    size = 5 * 1024 * 1024 + 123
    async with await connect(server) as client:
        async with client.download("download", size=size) as stream:
            chunks = [chunk async for chunk in stream]
        assert len(chunks) > 1
        data = b"".join(chunks)
        assert data == blob(size)
        assert stream.result == {"sha256": hashlib.sha256(data).hexdigest()}
        # An empty download ends with the result too; the connection is reusable.
        empty = client.download("download", size=0)
        assert await empty.read() == b""
        assert empty.result == {"sha256": hashlib.sha256(b"").hexdigest()}
        # A failure midway raises the typed error after the chunks already sent.
        with pytest.raises(NotFound, match="vanished"):
            await client.download("download", size=1000, fail_after=True).read()
        with pytest.raises(ProtocolError, match="use download"):
            await client.call("download", size=10)
    # call() on a streaming method closed that connection; the server is fine.
    await assert_serves(server)


async def test_abandoned_download_closes_the_connection(server: ProtoServer) -> None:
    client = await connect(server)
    async with client.download("download", size=3_000_000) as stream:
        async for _ in stream:
            with pytest.raises(Conflict, match="busy"):
                await client.call("echo")
            break
    with pytest.raises(Unavailable, match="closed"):
        await client.call("echo")
    await assert_serves(server)


async def chunked(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def test_upload_stream(server: ProtoServer) -> None:
    data = blob(3 * 1024 * 1024 + 7)
    async with await connect(server) as client:
        result = await client.upload("upload", chunked(data, 100_000), label="x")
        assert result == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        assert await client.upload("upload", chunked(b"", 1)) == {
            "size": 0,
            "sha256": hashlib.sha256(b"").hexdigest(),
        }
        # A handler that answers without reading the upload: typed error, connection in sync.
        with pytest.raises(Conflict, match="not now"):
            await client.upload("refuse_upload", chunked(data, 100_000))
        assert await client.call("echo", after=True) == {"after": True}


async def test_failing_upload_source_closes_the_connection(server: ProtoServer) -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield b"partial"
        raise OSError("disk went away")

    client = await connect(server)
    with pytest.raises(OSError, match="disk went away"):
        await client.upload("upload", broken())
    with pytest.raises(Unavailable):
        await client.call("echo")
    await assert_serves(server)


async def test_connection_refused_is_unavailable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound but not listening: connections are refused
        with pytest.raises(Unavailable, match=rf"127\.0\.0\.1:{port}.*neon pageserver start"):
            await ProtoClient.connect("127.0.0.1", port, timeout=STEP)


async def test_call_sync_from_a_thread(server: ProtoServer) -> None:
    result = await asyncio.to_thread(
        call_sync, "127.0.0.1", server.port, "echo", token=TOKEN, method_name="m"
    )
    assert result == {"method_name": "m"}
    with pytest.raises(NotFound):
        await asyncio.to_thread(call_sync, "127.0.0.1", server.port, "nope", token=TOKEN)


async def test_silent_client_times_out_at_hello(server: ProtoServer) -> None:
    replies = await raw_exchange(server.port, b"\x00\x00", eof=False)
    assert [(r.code, "no hello" in r.message) for r in replies if isinstance(r, Error)] == [
        ("protocol_error", True)
    ]


async def test_close_with_open_connections() -> None:
    srv = ProtoServer(HANDLERS, token=None)
    await srv.start()
    client = await ProtoClient.connect("127.0.0.1", srv.port, token="ignored")
    stream = client.download("download", size=20_000_000)
    await stream.__anext__()  # the handler is now blocked on backpressure
    await asyncio.wait_for(srv.close(), STEP)
    with pytest.raises(Unavailable):
        async with asyncio.timeout(STEP):
            async for _ in stream:
                pass
    await client.close()


# -- garbage over real sockets -----------------------------------------------------------------

HELLO = encode_message(Hello(PROTOCOL_VERSION, TOKEN, "fuzz"))
VALID = [
    HELLO,
    encode_message(Request(1, "echo", {"a": 1})),
    encode_message(Request(2, "upload", {})),
    encode_message(StreamData(2, b"abc")),
    raw_frame_header(2, 3) + b"def",
    encode_message(StreamEnd(2, None)),
    encode_message(Request(3, "download", {"size": 10})),
]
garbage = st.one_of(
    st.binary(max_size=300),
    # A valid prefix cut anywhere, optionally followed by random bytes.
    st.tuples(st.integers(1, len(VALID)), st.integers(0, 200), st.binary(max_size=50)).map(
        lambda t: b"".join(VALID[: t[0]])[: -t[1] or None] + t[2]
    ),
    # A hello, then a frame claiming a huge or zero length, or a random frame.
    st.tuples(st.integers(0, 2**32 - 1), st.binary(max_size=50)).map(
        lambda t: HELLO + struct.pack(">I", t[0]) + t[1]
    ),
)


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=garbage)
async def test_garbage_never_crashes_or_hangs_the_server(server: ProtoServer, data: bytes) -> None:
    replies = await raw_exchange(server.port, data)
    # Whatever came back is well-formed; anything after a connection error is impossible.
    for i, reply in enumerate(replies):
        assert isinstance(reply, HelloOk | Response | StreamData | StreamEnd | Error)
        if isinstance(reply, Error) and reply.id == 0:
            assert i == len(replies) - 1
    await assert_serves(server)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "exceeds the maximum frame size"),
        (b"\x00\x00\x00\x01\xc1", "invalid msgpack"),
        (encode_message(Request(1, "echo", {})), "expected a hello"),
        (HELLO + encode_message(StreamData(9, b"x")), "expected a request"),
        (HELLO + encode_message(Request(1, "upload", {})), "expected upload data"),
        (HEADER.pack(PRE_AUTH_MAX_FRAME_SIZE + 1) + b"\x90", "before the hello is verified"),
        (raw_frame_header(1, 3) + b"abc", "expected a hello"),
        (HEADER.pack(RAW_FLAG | PRE_AUTH_MAX_FRAME_SIZE + 1) + b"\x00" * 12, "before the hello"),
        (HELLO + HEADER.pack(RAW_FLAG | 7) + b"\x00" * 7, "shorter than its stream id"),
        (HELLO + raw_frame_header(9, 1) + b"x", "expected a request"),
        (
            HELLO + encode_message(Request(1, "upload", {})) + raw_frame_header(2, 1) + b"x",
            "expected upload data for request 1",
        ),
        (HELLO + HEADER.pack(1025) + b"\x91" * 1024 + b"\x90", "nested more than 1024"),
    ],
)
async def test_garbage_gets_an_error_then_close(
    server: ProtoServer, data: bytes, expected: str
) -> None:
    replies = await raw_exchange(server.port, data)
    assert isinstance(replies[-1], Error) and replies[-1].code == "protocol_error"
    assert expected in replies[-1].message
    await assert_serves(server)


RAW_DATA = raw_frame_header(1, 10) + b"0123456789"


async def test_raw_stream_data_is_an_upload_and_a_download(server: ProtoServer) -> None:
    """Stream data goes both ways as raw frames and is read as StreamData messages."""
    upload = (
        encode_message(Request(1, "upload", {})) + RAW_DATA + encode_message(StreamEnd(1, None))
    )
    replies = await raw_exchange(server.port, HELLO + upload)
    assert replies[-1] == Response(
        1, {"size": 10, "sha256": hashlib.sha256(b"0123456789").hexdigest()}
    )
    received = b""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(HELLO + encode_message(Request(1, "download", {"size": 10})))
        async with asyncio.timeout(STEP):
            while not received.endswith(
                encode_message(StreamEnd(1, {"sha256": hashlib.sha256(blob(10)).hexdigest()}))
            ):
                received += await reader.read(65536)
    finally:
        writer.close()
    assert raw_frame_header(1, 10) + blob(10) in received  # not msgpack


async def test_a_download_piece_for_another_stream_is_refused() -> None:
    """A client reading a download refuses a raw frame of another stream id."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)  # the hello
        writer.write(encode_message(HelloOk(PROTOCOL_VERSION, "fake")))
        await reader.read(65536)  # the request, id 1
        writer.write(raw_frame_header(7, 3) + b"abc")
        await writer.drain()
        await reader.read(65536)  # until the client closes
        writer.close()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        port = srv.sockets[0].getsockname()[1]
        async with await ProtoClient.connect("127.0.0.1", port, timeout=STEP) as client:
            with pytest.raises(ProtocolError, match="expected id 1"):
                await asyncio.wait_for(client.download("download").read(), STEP)
    finally:
        srv.close()
        await srv.wait_closed()


async def test_a_stream_cut_in_a_frame_is_a_lost_connection(server: ProtoServer) -> None:
    """Nothing malformed came, the peer stopped sending: what a server that shut down while
    its client did not read looks like to the client (test_close_with_open_connections)."""
    for cut, code in [
        (HELLO[:7], "unavailable"),
        (encode_message(Request(1, "upload", {})) + RAW_DATA[:15], "protocol_error"),
    ]:
        replies = await raw_exchange(server.port, HELLO + cut)
        assert isinstance(replies[-1], Error) and replies[-1].code == code
        assert "closed in the middle of a frame" in replies[-1].message
    await assert_serves(server)


@pytest.mark.parametrize("how", ["at a frame's end", "in a frame", "reset"])
async def test_an_upload_cut_any_way_is_one_protocol_error_to_its_handler(how: str) -> None:
    """A sender killed during an upload ends it at a frame's end, in the middle of one, or
    (SIGKILLed with unread bytes in its socket) with a reset: the handler sees the same
    ProtocolError "was cut" each time. A receiver keeps a cut push's bytes on that error
    (cli/receiver.py); a cut in a frame or a reset raised Unavailable, and its bytes were
    dropped, so the push run again sent everything (a CI run failed on it)."""
    got_data, outcome = asyncio.Event(), asyncio.get_running_loop().create_future()

    async def watched_upload(ctx: RequestContext) -> Any:
        try:
            async for _ in ctx.upload():
                got_data.set()
        except BaseException as exc:
            outcome.set_result(exc)
            raise
        outcome.set_result(None)
        return {}

    srv = ProtoServer({**HANDLERS, "upload": watched_upload}, token=TOKEN)
    await srv.start()
    try:
        sent = HELLO + encode_message(Request(1, "upload", {})) + RAW_DATA
        sent += RAW_DATA[:15] if how == "in a frame" else b""
        with socket.create_connection(("127.0.0.1", srv.port)) as sock:
            sock.sendall(sent)
            await asyncio.wait_for(got_data.wait(), STEP)
            if how == "reset":  # close with a zero linger: an RST, not a FIN
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:  # the hello's answer read: nothing unread, so the close is a FIN
                hello_ok = encode_message(HelloOk(PROTOCOL_VERSION, "pageserver"))
                sock.settimeout(STEP)
                assert sock.recv(len(hello_ok), socket.MSG_WAITALL) == hello_ok
        raised = await asyncio.wait_for(outcome, STEP)
        assert isinstance(raised, ProtocolError), raised
        assert "the upload of request 1 (upload) was cut" in raised.message or (
            how == "at a frame's end" and "got end of connection" in raised.message
        ), raised.message
        await assert_serves(srv)
    finally:
        await asyncio.wait_for(srv.close(), STEP)


# -- memory an unauthenticated peer can cost -------------------------------------------------

REPO = Path(__file__).resolve().parents[2]
ECHO_SERVER = f"""
import asyncio, sys
from proto.server import ProtoServer

async def echo(ctx):
    return ctx.params

async def main():
    srv = ProtoServer({{"echo": echo}}, token={TOKEN!r})
    await srv.start()
    print(srv.port, flush=True)
    await asyncio.to_thread(sys.stdin.read)  # until the test closes our stdin
    await srv.close()

asyncio.run(main())
"""
MAX_GROWTH_KIB = 16 * 1024  # the interpreter's own noise; the hostile frame alone is 16 MiB


def wide_empty_arrays_frame(size: int) -> bytes:
    """One frame of `size` bytes: an array of (size - 5) empty arrays, ~70 bytes of Python
    objects per byte on the wire when decoded (the issue's 1.2 GB from one 16 MiB frame)."""
    count = size - 5
    return HEADER.pack(size) + b"\xdd" + struct.pack(">I", count) + b"\x90" * count


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for process {pid}")


def seconds_until_closed(port: int, data: bytes, limit: float) -> float | None:
    """Send `data` (as far as the server lets us), then wait for the server to close the
    connection; None if it did not within `limit` seconds."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=limit) as sock:
        try:
            sock.sendall(data)
            while sock.recv(65536):
                pass
        except (ConnectionResetError, BrokenPipeError):
            pass  # closed while we were still sending: what an early refusal looks like
        except TimeoutError:
            return None
    return time.monotonic() - start


@pytest.fixture
def echo_server_process() -> Iterator[tuple[subprocess.Popen[str], int]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", ECHO_SERVER],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        yield proc, int(proc.stdout.readline())
    finally:
        proc.kill()  # by PID; it may be stuck decoding, so no polite stop
        proc.wait()


async def test_hostile_frame_before_hello_costs_the_server_nothing(
    echo_server_process: tuple[subprocess.Popen[str], int],
) -> None:
    proc, port = echo_server_process
    hostile = wide_empty_arrays_frame(DEFAULT_MAX_FRAME_SIZE)
    before = peak_rss_kib(proc.pid)
    elapsed = await asyncio.to_thread(seconds_until_closed, port, hostile, STEP)
    grown = peak_rss_kib(proc.pid) - before
    assert elapsed is not None, f"the server kept the connection open for {STEP}s"
    assert elapsed < 2, f"refusing the frame took {elapsed:.1f}s"
    assert grown < MAX_GROWTH_KIB, f"one unauthenticated frame grew the server by {grown} KiB"
    # The server is fine, and an authenticated peer still sends large frames.
    big = blob(8 * 1024 * 1024)
    async with await ProtoClient.connect("127.0.0.1", port, token=TOKEN, timeout=STEP) as c:
        assert await asyncio.wait_for(c.call("echo", data=big), 30) == {"data": big}


def test_hello_fits_the_pre_auth_frame_limit() -> None:
    hello = encode_message(Hello(PROTOCOL_VERSION, "t" * 1024, "neon-cli " * 20))
    assert len(hello) < PRE_AUTH_MAX_FRAME_SIZE


async def test_a_stalled_upload_is_dropped_and_the_handler_freed() -> None:
    """A sender that stops sending upload data without closing its connection: after the idle
    timeout the handler gets a ProtocolError (its work is abandoned) and the connection is
    closed with that error; without it the handler waited for ever."""
    outcome: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

    async def watched_upload(ctx: RequestContext) -> Any:
        try:
            async for _ in ctx.upload():
                pass
        except BaseException as exc:
            outcome.set_result(exc)
            raise
        outcome.set_result(None)
        return {}

    srv = ProtoServer({**HANDLERS, "upload": watched_upload}, token=TOKEN, upload_idle_timeout=0.3)
    await srv.start()
    try:
        stalled = (
            HELLO
            + encode_message(Request(1, "upload", {}))
            + encode_message(StreamData(1, b"the first chunk, then nothing"))
        )
        replies = await raw_exchange(srv.port, stalled, eof=False)
        assert isinstance(replies[-1], Error) and replies[-1].code == "protocol_error"
        assert "stalled: nothing received for 0.3 s" in replies[-1].message
        assert isinstance(await asyncio.wait_for(outcome, STEP), ProtocolError)
        await assert_serves(srv)
    finally:
        await asyncio.wait_for(srv.close(), STEP)


def test_a_listen_that_failed_is_the_os_error_it_was() -> None:
    """uvloop lists the socket of a server whose listen() failed (another process bound the
    port first with SO_REUSEADDR) as None: that is EADDRINUSE, which the CLI retries on
    another port, not an AttributeError that kills the daemon."""
    with pytest.raises(OSError, match=r"already in use: cannot listen on 127\.0\.0\.1:6400"):
        bound_address([None], "127.0.0.1", 6400)
    with pytest.raises(OSError) as raised:
        bound_address([], "127.0.0.1", 6400)
    assert raised.value.errno == errno.EADDRINUSE
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        assert bound_address([sock], "127.0.0.1", 0) == sock.getsockname()
