"""The upstream HTTP/1.1 client (``apipool_proxy.upstream``) against real loopback servers.

Every server is a raw ``asyncio.start_server`` handler writing exact bytes, so framing,
keep-alive and stale connections, timeouts, compression, informational answers, flow control,
TLS and the address guard are exercised on real sockets, with none of the project's code mocked.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import ipaddress
import random
import socket
import ssl
import struct
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest

import apipool_proxy.upstream.client as client_module
from apipool_proxy.netguard import AddressPolicy, UnresolvableHostError
from apipool_proxy.upstream import (
    ForwardProxy,
    UpstreamClient,
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamResponse,
    UpstreamTimeout,
    header_block,
)

from .loopback import stop_server

NO_HEADERS = header_block([])


# --- Servers ---------------------------------------------------------------------------------


@dataclass(eq=False)
class Conn:
    """One accepted connection, as the test server's handler sees it."""

    server: RawServer
    index: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    gone: asyncio.Event = field(default_factory=asyncio.Event)  # the client closed its side

    @property
    def eof(self) -> bool:
        return self.gone.is_set()

    async def client_leaves(self) -> None:
        """Wait (half a second at most) for the client to close the connection."""
        async with asyncio.timeout(0.5):
            await self.gone.wait()

    async def request(self) -> bytes:
        """Read one request (head and Content-Length body) and record its raw bytes."""
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        raw = head + (await self.reader.readexactly(length) if length else b"")
        self.server.requests.append(raw)
        return raw

    async def send(self, *parts: bytes, pause: float = 0.0) -> None:
        """Write each part and flush it, waiting ``pause`` seconds after each."""
        for part in parts:
            self.writer.write(part)
            await self.writer.drain()
            if pause:
                await asyncio.sleep(pause)

    async def wait_eof(self) -> None:
        """Read (and drop) whatever comes until the client closes its side."""
        try:
            while await self.reader.read(65536):
                pass
        except ConnectionError:
            pass
        self.gone.set()

    def reset(self) -> None:
        """Close with a TCP RST instead of a FIN."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    def unsent(self) -> int:
        """Bytes written by the handler that the kernel has not taken yet."""
        return self.writer.transport.get_write_buffer_size()


Handler = Callable[[Conn], Awaitable[None]]


@dataclass(eq=False)
class RawServer:
    handler: Handler
    scheme: str = "http"
    port: int = 0
    connections: list[Conn] = field(default_factory=list)
    requests: list[bytes] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def accepted(self) -> int:
        return len(self.connections)

    async def start(self, ssl_context: ssl.SSLContext | None) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Conn(self, len(self.connections), reader, writer)
        self.connections.append(conn)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.handler(conn)
        except (OSError, EOFError):  # EOFError: IncompleteReadError
            conn.gone.set()  # the client left in the middle of a request or a read
        except asyncio.CancelledError:
            pass  # the test is over; end quietly (Python 3.11 logs a cancelled handler)
        finally:
            writer.close()
            self._tasks.discard(task)

    async def stop(self) -> None:
        await stop_server(self._server, self._tasks)


ServeFactory = Callable[..., Awaitable[RawServer]]
ClientFactory = Callable[..., UpstreamClient]


@pytest.fixture
async def serve():
    """``await serve(handler)`` starts a loopback server; all are stopped after the test."""
    servers: list[RawServer] = []

    async def start(handler: Handler, *, ssl_context: ssl.SSLContext | None = None) -> RawServer:
        server = RawServer(handler, "https" if ssl_context else "http")
        await server.start(ssl_context)
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()
    await asyncio.sleep(0.02)  # let closing transports (and TLS shutdowns) finish


@pytest.fixture
async def make_client(serve: ServeFactory):
    """``make_client(...)`` builds an UpstreamClient, closed after the test (before servers)."""
    clients: list[UpstreamClient] = []

    def make(
        *,
        private: bool = True,
        forbidden_ports: Iterable[int] = (),
        connect_timeout: float = 0.5,
        read_timeout: float = 0.5,
        ssl_context: ssl.SSLContext | None = None,
        proxy: str | None = None,
    ) -> UpstreamClient:
        policy = AddressPolicy(allow_private_networks=private, forbidden_ports=set(forbidden_ports))
        client = UpstreamClient(
            policy,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            ssl_context=ssl_context,
            proxy=ForwardProxy.from_url(proxy) if proxy else None,
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


@pytest.fixture
def client(make_client: ClientFactory) -> UpstreamClient:
    return make_client()


# --- Helpers ---------------------------------------------------------------------------------


def ok(body: bytes = b"ok", *headers: str, status: str = "200 OK") -> bytes:
    """A complete answer with a Content-Length body."""
    lines = [f"HTTP/1.1 {status}", *headers, f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"


def replies(answer: bytes | Callable[[Conn], bytes]) -> Handler:
    """A keep-alive handler answering every request on every connection the same way."""

    async def handler(conn: Conn) -> None:
        while True:
            await conn.request()
            await conn.send(answer(conn) if callable(answer) else answer)

    return handler


async def fetch(
    client: UpstreamClient,
    method: str,
    url: str,
    tail: str = "/x",
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
) -> tuple[UpstreamResponse, bytes]:
    """Send one request, read the whole answer and release it."""
    response = await client.request(method, url, tail, header_block(headers), body)
    try:
        return response, await response.read()
    finally:
        response.release()


async def collect(response: UpstreamResponse, into: list[bytes]) -> None:
    """Append every piece of the body to ``into`` (which keeps them if iteration fails)."""
    async for piece in response.iter_chunks():
        into.append(piece)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- Body framing ----------------------------------------------------------------------------


async def test_content_length_body(serve: ServeFactory, client: UpstreamClient) -> None:
    server = await serve(replies(ok(b"hello world", "Content-Type: text/plain", "X-Id: 7")))
    response, body = await fetch(client, "GET", server.url + "/v1", "/models")
    assert (response.status, response.reason) == (200, "OK")
    assert body == b"hello world"
    assert response.content_length == 11
    assert response.headers["content-type"] == "text/plain"
    assert response.headers["X-ID"] == "7"
    assert response.headers["Content-Length"] == "11"


async def test_chunked_body_arrives_piece_by_piece(
    serve: ServeFactory, client: UpstreamClient
) -> None:
    pieces = [b"data: one\n\n", b"data: two\n\n", b"data: three\n\n"]
    seen = asyncio.Queue[None]()
    end_sent = False

    async def handler(conn: Conn) -> None:
        nonlocal end_sent
        await conn.request()
        await conn.send(CHUNKED_HEAD)
        for piece in pieces:
            await conn.send(chunk(piece), pause=0.01)
            await asyncio.wait_for(seen.get(), 0.5)  # the test has it before the next one
        end_sent = True
        await conn.send(LAST_CHUNK)
        await conn.wait_eof()

    server = await serve(handler)
    response = await client.request("GET", server.url, "/stream", NO_HEADERS, b"")
    got = []
    try:
        assert response.content_length is None
        async for piece in response.iter_chunks():
            assert not end_sent
            got.append(piece)
            seen.put_nowait(None)
    finally:
        response.release()
    assert got == pieces
    assert end_sent


async def test_pushed_body_comes_per_read_up_to_its_last_piece(
    serve: ServeFactory, client: UpstreamClient
) -> None:
    pieces = [b"data: one\n\n", b"data: two\n\n", b"data: three\n\n"]
    pushed: list[bytes] = []
    ready, seen = asyncio.Event(), asyncio.Event()

    def sink(data: bytes) -> bool:
        pushed.append(data)
        seen.set()
        return True

    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(CHUNKED_HEAD)
        await asyncio.wait_for(ready.wait(), 0.5)
        await conn.send(chunk(pieces[0]))
        await asyncio.wait_for(seen.wait(), 0.5)
        # Two chunks in one write arrive in one read, and are pushed as one piece.
        await conn.send(chunk(pieces[1]) + chunk(pieces[2]), pause=0.05)
        await conn.send(chunk(b"data: last\n\n") + LAST_CHUNK)
        await conn.wait_eof()

    server = await serve(handler)
    response = await client.request("GET", server.url, "/stream", NO_HEADERS, b"")
    try:
        assert response.take() is None
        assert response.push_to(sink)
        ready.set()
        async with asyncio.timeout(1):
            await response.arrival()  # only the end wakes the reader: pieces went to sink
        # The last piece arrived with the end of the body, and was pushed before the end
        # woke the reader.
        assert pushed == [pieces[0], pieces[1] + pieces[2], b"data: last\n\n"]
        assert response.take() == b""
        assert response.push_to(sink) is False  # over: nothing more to push
    finally:
        response.release()


async def test_sink_that_stops_hands_the_body_back_to_take(
    serve: ServeFactory, client: UpstreamClient
) -> None:
    ready = asyncio.Event()
    pushed: list[bytes] = []

    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(CHUNKED_HEAD)
        await asyncio.wait_for(ready.wait(), 0.5)
        await conn.send(chunk(b"first"), pause=0.05)
        await conn.send(chunk(b"second"), pause=0.05)
        await conn.send(LAST_CHUNK)
        await conn.wait_eof()

    server = await serve(handler)
    response = await client.request("GET", server.url, "/stream", NO_HEADERS, b"")
    try:
        assert response.take() is None
        assert response.push_to(lambda data: pushed.append(data) or False)
        ready.set()
        async with asyncio.timeout(1):
            await response.arrival()  # woken because the sink said stop
            assert pushed == [b"first"]
            assert response.take() is None
            await response.arrival()
            assert response.take() == b"second"  # queued again, as without a sink
            while (end := response.take()) is None:
                await response.arrival()
        assert end == b""
        assert pushed == [b"first"]
    finally:
        response.release()


async def test_compressed_body_is_never_pushed(serve: ServeFactory, client: UpstreamClient) -> None:
    packed = gzip.compress(PLAIN)

    async def handler(conn: Conn) -> None:
        await conn.request()
        head = "HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
        await conn.send(head.encode(), pause=0.05)
        await conn.send(chunk(packed), LAST_CHUNK)
        await conn.wait_eof()

    server = await serve(handler)
    response = await client.request("GET", server.url, "/x", NO_HEADERS, b"")
    try:
        assert response.push_to(lambda data: pytest.fail("pushed a compressed body")) is False
        assert await response.read() == PLAIN
    finally:
        response.release()


@pytest.mark.parametrize("status_line", ["HTTP/1.1 200 OK", "HTTP/1.0 200 OK"])
async def test_body_delimited_by_connection_close(
    serve: ServeFactory, client: UpstreamClient, status_line: str
) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(f"{status_line}\r\nContent-Type: text/plain\r\n\r\n".encode())
        await conn.send(b"first part, ", b"second part", pause=0.02)
        # returning closes the connection: that is where the body ends

    server = await serve(handler)
    response, body = await fetch(client, "GET", server.url, "/x")
    assert response.status == 200
    assert response.content_length is None
    assert body == b"first part, second part"


async def test_read_with_a_limit_returns_the_first_bytes(
    serve: ServeFactory, client: UpstreamClient
) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(CHUNKED_HEAD, chunk(b"0123456789"), chunk(b"abcdef"), pause=0.01)
        await conn.wait_eof()

    server = await serve(handler)
    response = await client.request("GET", server.url, "/x", NO_HEADERS, b"")
    try:
        assert await response.read(12) == b"0123456789ab"
    finally:
        response.release()


# --- Keep-alive ------------------------------------------------------------------------------


async def test_sequential_requests_share_one_connection(
    serve: ServeFactory, client: UpstreamClient
) -> None:
    server = await serve(replies(lambda conn: ok(b"answer %d" % len(conn.server.requests))))
    _, first = await fetch(client, "GET", server.url + "/v1", "/models")
    _, second = await fetch(client, "POST", server.url + "/v1", "/chat/completions", body=b"{}")
    # Another base URL on the same scheme, host and port shares the connections too.
    _, third = await fetch(client, "GET", server.url + "/other", "/thing")
    assert (first, second, third) == (b"answer 1", b"answer 2", b"answer 3")
    assert server.accepted == 1
    targets = [raw.split(b"\r\n", 1)[0] for raw in server.requests]
    assert targets == [
        b"GET /v1/models HTTP/1.1",
        b"POST /v1/chat/completions HTTP/1.1",
        b"GET /other/thing HTTP/1.1",
    ]


@pytest.mark.parametrize(
    "status_line, extra",
    [("HTTP/1.1 200 OK", "Connection: close"), ("HTTP/1.0 200 OK", "X-Nothing: here")],
    ids=["connection-close", "http-1.0"],
)
async def test_answer_that_ends_the_connection_is_not_reused(
    serve: ServeFactory, client: UpstreamClient, status_line: str, extra: str
) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(f"{status_line}\r\n{extra}\r\nContent-Length: 2\r\n\r\nok".encode())
        await conn.wait_eof()  # the server keeps its side open: the client must close

    server = await serve(handler)
    await fetch(client, "GET", server.url, "/one")
    await server.connections[0].client_leaves()
    _, body = await fetch(client, "GET", server.url, "/two")
    assert body == b"ok"
    assert server.accepted == 2


async def test_answer_released_unfinished_is_not_reused(
    serve: ServeFactory, client: UpstreamClient
) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        if conn.index == 0:
            await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 10)
            await conn.wait_eof()
        else:
            await conn.send(ok(b"second"))
            await conn.wait_eof()

    server = await serve(handler)
    response = await client.request("GET", server.url, "/one", NO_HEADERS, b"")
    pieces = response.iter_chunks()
    try:
        assert await anext(pieces) == b"x" * 10
    finally:
        await pieces.aclose()
        response.release()
    await server.connections[0].client_leaves()
    _, body = await fetch(client, "GET", server.url, "/two")
    assert body == b"second"
    assert server.accepted == 2


@pytest.mark.parametrize("idle", [0.05, 0.0], ids=["noticed-while-idle", "racing"])
async def test_idle_connection_closed_by_server_is_replaced(
    serve: ServeFactory, client: UpstreamClient, idle: float
) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(ok(b"from %d" % conn.index))  # keep-alive, then closed anyway

    server = await serve(handler)
    _, first = await fetch(client, "GET", server.url, "/one")
    # With a pause the close reaches the client while the connection is idle; without one
    # the second request may be written before the close is seen, and is sent again.
    await asyncio.sleep(idle)
    _, second = await fetch(client, "GET", server.url, "/two")
    assert (first, second) == (b"from 0", b"from 1")
    assert server.accepted == 2


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_stale_kept_alive_connection_is_retried_on_a_new_one(
    serve: ServeFactory, client: UpstreamClient, how: str
) -> None:
    async def handler(conn: Conn) -> None:
        if conn.index == 0:
            await conn.request()
            await conn.send(ok(b"first"))
            await conn.request()  # the second request arrives on the kept-alive connection,
            if how == "reset":  # which the server drops without a byte of answer
                conn.reset()
            return
        await replies(ok(b"second"))(conn)

    server = await serve(handler)
    _, first = await fetch(client, "GET", server.url, "/one")
    _, second = await fetch(client, "POST", server.url, "/two", body=b"payload")
    assert (first, second) == (b"first", b"second")
    assert server.accepted == 2
    assert len(server.requests) == 3
    assert server.requests[1] == server.requests[2]  # the same request, sent once more
    assert server.requests[2].endswith(b"\r\n\r\npayload")


async def test_stale_connection_is_retried_only_once(
    serve: ServeFactory, client: UpstreamClient
) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        if conn.index == 0:
            await conn.send(ok(b"first"))
            await conn.request()
        # every connection then closes without answering

    server = await serve(handler)
    await fetch(client, "GET", server.url, "/one")
    with pytest.raises(UpstreamClosed) as caught:
        await fetch(client, "GET", server.url, "/two")
    assert type(caught.value) is UpstreamClosed  # a fresh connection failing is not "stale"
    assert server.accepted == 2


async def test_idle_connection_expires_after_keepalive_seconds(
    serve: ServeFactory, client: UpstreamClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module, "KEEPALIVE_SECONDS", 0.05)
    server = await serve(replies(ok()))
    await fetch(client, "GET", server.url, "/one")
    await asyncio.sleep(0.1)
    await fetch(client, "GET", server.url, "/two")
    assert server.accepted == 2
    await server.connections[0].client_leaves()  # the expired one was closed


async def test_sweep_idle_closes_idle_connections(
    serve: ServeFactory, client: UpstreamClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module, "KEEPALIVE_SECONDS", 0.2)
    monkeypatch.setattr(client_module, "SWEEP_SECONDS", 0.02)
    server = await serve(replies(ok()))
    await fetch(client, "GET", server.url, "/one")
    sweeper = asyncio.create_task(client.sweep_idle())
    try:
        await asyncio.sleep(0.05)
        assert not server.connections[0].eof  # not idle for long enough yet
        await server.connections[0].client_leaves()
    finally:
        sweeper.cancel()
        with suppress(asyncio.CancelledError):
            await sweeper


async def test_close_closes_idle_connections(serve: ServeFactory, client: UpstreamClient) -> None:
    server = await serve(replies(ok()))
    await fetch(client, "GET", server.url, "/one")
    assert not server.connections[0].eof
    await client.close()
    await server.connections[0].client_leaves()


async def test_releasing_twice_does_not_pool_the_connection_twice(
    serve: ServeFactory, client: UpstreamClient
) -> None:
    async def handler(conn: Conn) -> None:
        while True:
            await conn.request()
            await asyncio.sleep(0.02)
            await conn.send(ok(b"conn %d" % conn.index))

    server = await serve(handler)
    response = await client.request("GET", server.url, "/x", NO_HEADERS, b"")
    assert await response.read() == b"conn 0"
    response.release()
    response.release()  # must not hand the connection to the pool a second time
    # Two requests at once then need two connections; sharing one, a request would hang.
    async with asyncio.timeout(0.3):
        results = await asyncio.gather(
            fetch(client, "GET", server.url, "/a"), fetch(client, "GET", server.url, "/b")
        )
    assert sorted(body for _, body in results) == [b"conn 0", b"conn 1"]


# --- Connections closed too early ------------------------------------------------------------


@pytest.mark.parametrize("sent", [b"", b"HTTP/1.1 200 OK\r\nContent-Le"], ids=["nothing", "half"])
@pytest.mark.parametrize("how", ["close", "reset"])
async def test_fresh_connection_closed_before_the_answer(
    serve: ServeFactory, client: UpstreamClient, sent: bytes, how: str
) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        if sent:
            await conn.send(sent, pause=0.02)
        if how == "reset":
            conn.reset()

    server = await serve(handler)
    with pytest.raises(UpstreamClosed) as caught:
        await fetch(client, "GET", server.url, "/x")
    assert type(caught.value) is UpstreamClosed
    assert server.accepted == 1  # a fresh connection is not retried


@pytest.mark.parametrize("reader", ["read", "iter_chunks"])
@pytest.mark.parametrize("how", ["close", "reset"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_connection_cut_mid_body(
    serve: ServeFactory, client: UpstreamClient, reader: str, how: str, framing: str
) -> None:
    if framing == "chunked":
        start = CHUNKED_HEAD + chunk(b"0123456789")
    else:
        start = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789"

    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(start, pause=0.03)
        if how == "reset":
            conn.reset()

    server = await serve(handler)
    response = await client.request("GET", server.url, "/x", NO_HEADERS, b"")
    got: list[bytes] = []
    try:
        with pytest.raises(UpstreamClosed):
            if reader == "read":
                await response.read()
            else:
                await collect(response, got)
    finally:
        response.release()
    if reader == "iter_chunks":
        assert got == [b"0123456789"]


async def test_cancelled_request_drops_its_connection(
    serve: ServeFactory, client: UpstreamClient
) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        if conn.index == 0:
            await conn.wait_eof()  # never answers
        else:
            await conn.send(ok(b"second"))
            await conn.wait_eof()

    server = await serve(handler)
    waiting = asyncio.create_task(client.request("GET", server.url, "/x", NO_HEADERS, b""))
    await asyncio.sleep(0.05)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await server.connections[0].client_leaves()
    _, body = await fetch(client, "GET", server.url, "/y")
    assert body == b"second"
    assert server.accepted == 2


async def test_cancelled_body_read_then_release_closes_the_connection(
    serve: ServeFactory, client: UpstreamClient
) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(CHUNKED_HEAD + chunk(b"first"))
        await conn.wait_eof()

    server = await serve(handler)
    response = await client.request("GET", server.url, "/x", NO_HEADERS, b"")
    got: list[bytes] = []
    reading = asyncio.create_task(collect(response, got))
    await asyncio.sleep(0.05)
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    response.release()
    assert got == [b"first"]
    await server.connections[0].client_leaves()


# --- Timeouts --------------------------------------------------------------------------------


async def test_silent_server_times_out(serve: ServeFactory, make_client: ClientFactory) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.wait_eof()

    server = await serve(handler)
    client = make_client(read_timeout=0.25)
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout):
        await client.request("GET", server.url, "/x", NO_HEADERS, b"")
    assert 0.2 <= time.monotonic() - started < 0.6
    await server.connections[0].client_leaves()  # the connection was dropped


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_silence_mid_body_times_out(
    serve: ServeFactory, make_client: ClientFactory, framing: str
) -> None:
    if framing == "chunked":
        start = CHUNKED_HEAD + chunk(b"0123456789")
    else:
        start = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789"

    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(start)
        await conn.wait_eof()

    server = await serve(handler)
    client = make_client(read_timeout=0.25)
    response = await client.request("GET", server.url, "/x", NO_HEADERS, b"")
    got: list[bytes] = []
    started = time.monotonic()
    try:
        with pytest.raises(UpstreamTimeout):
            await collect(response, got)
    finally:
        response.release()
    assert got == [b"0123456789"]
    assert 0.15 <= time.monotonic() - started < 0.6
    await server.connections[0].client_leaves()


async def test_steady_slow_stream_does_not_time_out(
    serve: ServeFactory, make_client: ClientFactory
) -> None:
    pieces = [b"data: %d\n\n" % i for i in range(4)]

    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(CHUNKED_HEAD)
        for piece in pieces:  # 0.4 s in all, with no gap as long as the read timeout
            await asyncio.sleep(0.1)
            await conn.send(chunk(piece))
        await conn.send(LAST_CHUNK)
        await conn.wait_eof()

    server = await serve(handler)
    client = make_client(read_timeout=0.3)
    response = await client.request("GET", server.url, "/x", NO_HEADERS, b"")
    got: list[bytes] = []
    try:
        await collect(response, got)
    finally:
        response.release()
    assert got == pieces


async def test_slowly_arriving_headers_do_not_time_out(
    serve: ServeFactory, make_client: ClientFactory
) -> None:
    answer = ok(b"finally", "X-Slow: yes")

    async def handler(conn: Conn) -> None:
        await conn.request()
        slices = [answer[i : i + 12] for i in range(0, len(answer), 12)]
        for piece in slices[:4]:  # 0.4 s for the head, no gap as long as the read timeout
            await conn.send(piece, pause=0.1)
        await conn.send(b"".join(slices[4:]))
        await conn.wait_eof()

    server = await serve(handler)
    client = make_client(read_timeout=0.25)
    response, body = await fetch(client, "GET", server.url, "/x")
    assert body == b"finally"
    assert response.headers["X-Slow"] == "yes"


@pytest.mark.parametrize("kind", ["many-headers", "one-endless-value", "endless-1xx"])
async def test_headers_without_end_are_refused_at_a_bound(
    serve: ServeFactory, client: UpstreamClient, kind: str
) -> None:
    # An upstream (its key owner's server, say) sending headers forever must not be able to
    # grow the proxy's memory: the answer fails once the head passes MAX_HEAD_BYTES.
    sent = [0]

    async def handler(conn: Conn) -> None:
        await conn.request()
        start = {"endless-1xx": b"", "many-headers": b"HTTP/1.1 200 OK\r\n"}
        conn.writer.write(start.get(kind, b"HTTP/1.1 200 OK\r\nX-Long: "))
        try:
            for i in range(100_000):  # 50 MB at most; the client gives up long before
                if kind == "many-headers":
                    piece = b"X-Filler-%d: %s\r\n" % (i, b"v" * 480)
                elif kind == "endless-1xx":
                    piece = b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n" * 8
                else:
                    piece = b"v" * 500
                await conn.send(piece)
                sent[0] += len(piece)
        except ConnectionError:
            pass

    server = await serve(handler)
    with pytest.raises(UpstreamProtocolError):
        await client.request("GET", server.url, "/x", NO_HEADERS, b"")
    assert sent[0] < 4 * 1024 * 1024  # stopped near the bound, not after megabytes


async def test_tls_handshake_that_never_ends_hits_the_connect_timeout(
    serve: ServeFactory, make_client: ClientFactory
) -> None:
    server = await serve(Conn.wait_eof)  # plain TCP: accepts, never answers the ClientHello
    client = make_client(connect_timeout=0.2, read_timeout=5)
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout):
        await client.request("GET", f"https://127.0.0.1:{server.port}", "/", NO_HEADERS, b"")
    assert 0.15 <= time.monotonic() - started < 0.6
    await server.connections[0].client_leaves()


# --- Connect errors and the address guard ----------------------------------------------------


async def test_an_address_that_never_answers_does_not_hold_up_the_next(
    serve: ServeFactory, make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await serve(replies(ok(b"from the second address")))
    # 127.0.0.2 on the same port: a listener whose accept queue is full drops every SYN, as
    # an address without a working route does.
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.2", server.port))
    blackhole.listen(0)
    fillers = [socket.socket() for _ in range(4)]
    for filler in fillers:
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.2", server.port))

    async def both(host: str, port: int) -> list[Any]:
        return [ipaddress.ip_address("127.0.0.2"), ipaddress.ip_address("127.0.0.1")]

    monkeypatch.setattr(client_module, "resolve_addresses", both)
    client = make_client(connect_timeout=2.0)
    try:
        started = time.monotonic()
        _, body = await fetch(client, "GET", f"http://upstream.example:{server.port}/v1")
        assert body == b"from the second address"
        assert time.monotonic() - started < 1.0  # not the whole connect timeout
    finally:
        for sock in (*fillers, blackhole):
            sock.close()


async def test_nothing_listening(client: UpstreamClient) -> None:
    with pytest.raises(UpstreamConnectError):
        await client.request("GET", f"http://127.0.0.1:{free_port()}/v1", "/x", NO_HEADERS, b"")


async def test_guard_refuses_loopback_without_private_networks(
    serve: ServeFactory, make_client: ClientFactory
) -> None:
    server = await serve(replies(ok()))
    client = make_client(private=False)
    for host in ("127.0.0.1", "localhost"):
        with pytest.raises(UpstreamConnectError):
            await client.request("GET", f"http://{host}:{server.port}/v1", "/x", NO_HEADERS, b"")
    await asyncio.sleep(0.02)
    assert server.accepted == 0


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_guard_refuses_a_forbidden_port(
    serve: ServeFactory, make_client: ClientFactory, host: str
) -> None:
    server = await serve(replies(ok()))
    client = make_client(forbidden_ports={server.port})
    with pytest.raises(UpstreamConnectError):
        await client.request("GET", f"http://{host}:{server.port}/v1", "/x", NO_HEADERS, b"")
    await asyncio.sleep(0.02)
    assert server.accepted == 0
    # Another port on the same host is fine.
    other = await serve(replies(ok(b"allowed")))
    _, body = await fetch(client, "GET", f"http://{host}:{other.port}/v1")
    assert body == b"allowed"


async def test_guard_refuses_cloud_metadata_even_with_private_networks(
    client: UpstreamClient,
) -> None:
    started = time.monotonic()
    with pytest.raises(UpstreamConnectError):
        await client.request("GET", "http://169.254.169.254/latest", "/meta-data", NO_HEADERS, b"")
    assert time.monotonic() - started < 0.2  # refused before any dialling


@pytest.mark.parametrize(
    "base_url", ["ftp://127.0.0.1/v1", "http:///v1", "127.0.0.1:8080/v1", "file:///etc/passwd"]
)
async def test_unusable_base_url(client: UpstreamClient, base_url: str) -> None:
    with pytest.raises(UpstreamConnectError):
        await client.request("GET", base_url, "/x", NO_HEADERS, b"")


# --- Compression -----------------------------------------------------------------------------

PLAIN = b"".join(b'{"line": %d, "text": "some repeated words"}\n' % i for i in range(2000))


def raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-15)
    return compressor.compress(data) + compressor.flush()


@cache
def gzip_bomb() -> bytes:
    """50 MiB of zeros, gzip-compressed (about 50 KB)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(1 << 20)
    return b"".join(compressor.compress(zeros) for _ in range(50)) + compressor.flush()


@pytest.mark.parametrize(
    "encoding, compress, chunked",
    [
        ("gzip", gzip.compress, False),
        ("gzip", gzip.compress, True),
        ("x-gzip", gzip.compress, False),
        ("GZip", gzip.compress, False),
        ("deflate", zlib.compress, False),
        ("deflate", zlib.compress, True),
        ("deflate", raw_deflate, False),
        ("deflate", raw_deflate, True),
    ],
    ids=[
        "gzip-length",
        "gzip-chunked",
        "x-gzip",
        "gzip-mixed-case",
        "deflate-zlib",
        "deflate-zlib-chunked",
        "deflate-raw",
        "deflate-raw-chunked",
    ],
)
async def test_compressed_answer_is_decoded(
    serve: ServeFactory,
    client: UpstreamClient,
    encoding: str,
    compress: Callable[[bytes], bytes],
    chunked: bool,
) -> None:
    packed = compress(PLAIN)
    assert len(packed) < len(PLAIN) // 4

    async def handler(conn: Conn) -> None:
        await conn.request()
        if chunked:
            head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            head += f"Content-Encoding: {encoding}\r\nTransfer-Encoding: chunked\r\n\r\n"
            step = len(packed) // 4 + 1
            parts = [chunk(packed[i : i + step]) for i in range(0, len(packed), step)]
            await conn.send(head.encode(), *parts, LAST_CHUNK, pause=0.005)
        else:
            await conn.send(
                ok(packed, "Content-Type: application/json", f"Content-Encoding: {encoding}")
            )
        await conn.wait_eof()

    server = await serve(handler)
    response, body = await fetch(client, "GET", server.url, "/x")
    assert body == PLAIN
    assert "Content-Encoding" not in response.headers
    assert "Content-Length" not in response.headers
    assert response.content_length is None
    assert response.headers["Content-Type"] == "application/json"
    request_fields = server.requests[0].split(b"\r\n")
    assert b"Accept-Encoding: gzip, deflate" in request_fields


async def test_gzip_bomb_is_handed_out_in_bounded_slices(
    serve: ServeFactory, client: UpstreamClient
) -> None:
    bomb = gzip_bomb()

    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(ok(bomb, "Content-Encoding: gzip"))
        await conn.wait_eof()

    server = await serve(handler)
    response = await client.request("GET", server.url, "/x", NO_HEADERS, b"")
    total = largest = 0
    pieces = response.iter_chunks()
    try:
        async for piece in pieces:
            assert piece == bytes(len(piece))
            total += len(piece)
            largest = max(largest, len(piece))
            if total >= 4 << 20:
                break
    finally:
        await pieces.aclose()
        response.release()
    assert total >= 4 << 20
    assert 0 < largest <= 256 * 1024


async def test_unknown_encoding_passes_through(serve: ServeFactory, client: UpstreamClient) -> None:
    packed = bytes(random.Random(3).randrange(256) for _ in range(300))
    server = await serve(replies(ok(packed, "Content-Encoding: br")))
    response, body = await fetch(client, "GET", server.url, "/x")
    assert body == packed
    assert response.headers["Content-Encoding"] == "br"
    assert response.headers["Content-Length"] == "300"
    assert response.content_length == 300


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_undecodable_compressed_answer_is_a_protocol_error(
    serve: ServeFactory, client: UpstreamClient, encoding: str
) -> None:
    answer = ok(b"this is not compressed at all", f"Content-Encoding: {encoding}")
    server = await serve(replies(answer))
    with pytest.raises(UpstreamProtocolError):
        await fetch(client, "GET", server.url, "/x")


async def test_body_if_complete(serve: ServeFactory, client: UpstreamClient) -> None:
    server = await serve(replies(ok(b"all here")))
    response = await client.request("GET", server.url, "/x", NO_HEADERS, b"")
    try:
        await asyncio.sleep(0.02)  # the body follows the headers in the same packet anyway
        assert response.body_if_complete() == b"all here"
    finally:
        response.release()

    async def unfinished(conn: Conn) -> None:
        await conn.request()
        await conn.send(CHUNKED_HEAD + chunk(b"more to come"))
        await conn.wait_eof()

    slow = await serve(unfinished)
    response = await client.request("GET", slow.url, "/x", NO_HEADERS, b"")
    try:
        await asyncio.sleep(0.02)
        assert response.body_if_complete() is None
    finally:
        response.release()

    packed = await serve(replies(ok(gzip.compress(b"zipped"), "Content-Encoding: gzip")))
    response = await client.request("GET", packed.url, "/x", NO_HEADERS, b"")
    try:
        await asyncio.sleep(0.02)
        assert response.body_if_complete() is None  # needs decoding: read() it instead
        assert await response.read() == b"zipped"
    finally:
        response.release()


# --- Informational answers and HEAD ----------------------------------------------------------


async def test_informational_answers_are_skipped(
    serve: ServeFactory, client: UpstreamClient
) -> None:
    async def handler(conn: Conn) -> None:
        while True:
            await conn.request()
            await conn.send(
                b"HTTP/1.1 100 Continue\r\n\r\n",
                b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
                ok(b"the real answer", "X-Final: yes", status="201 Created"),
                pause=0.02,
            )

    server = await serve(handler)
    for _ in range(2):
        response, body = await fetch(client, "POST", server.url, "/x", body=b"{}")
        assert (response.status, response.reason) == (201, "Created")
        assert body == b"the real answer"
        assert response.headers["X-Final"] == "yes"
        assert "Link" not in response.headers
    assert server.accepted == 1


async def test_head_answer_completes_without_a_body(
    serve: ServeFactory, client: UpstreamClient
) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nX-Head: 1\r\n\r\n")
        await conn.wait_eof()

    server = await serve(handler)
    started = time.monotonic()
    response, body = await fetch(client, "HEAD", server.url, "/x")
    assert time.monotonic() - started < 0.2  # the read timeout is 0.5 s
    assert (response.status, body) == (200, b"")
    assert response.content_length == 1234
    assert response.headers["X-Head"] == "1"
    assert server.requests[0].startswith(b"HEAD /x HTTP/1.1\r\n")


# --- The request as sent ---------------------------------------------------------------------


def parse_request(raw: bytes) -> tuple[str, list[tuple[str, str]], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    request_line, *lines = head.decode().split("\r\n")
    fields = []
    for line in lines:
        name, _, value = line.partition(": ")
        fields.append((name, value))
    return request_line, fields, body


async def test_request_bytes(serve: ServeFactory, client: UpstreamClient) -> None:
    server = await serve(replies(ok(b"{}")))
    headers = [
        ("Authorization", "Bearer sk-test"),
        ("Content-Type", "application/json"),
        ("X-Trace", "one"),
        ("OpenAI-Beta", "assistants=v2"),
        ("X-Trace", "two"),
    ]
    body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
    await fetch(client, "POST", server.url + "/v1", "/chat/completions", headers, body)
    request_line, fields, sent_body = parse_request(server.requests[0])
    assert request_line == "POST /v1/chat/completions HTTP/1.1"
    assert fields[0] == ("Host", f"127.0.0.1:{server.port}")
    given = {name for name, _ in headers}
    assert [f for f in fields if f[0] in given] == headers  # all of them, in order
    assert ("Content-Length", str(len(body))) in fields
    assert ("Accept-Encoding", "gzip, deflate") in fields
    names = [name.lower() for name, _ in fields]
    assert names.count("host") == names.count("content-length") == 1
    assert sent_body == body


@pytest.mark.parametrize(
    "path, tail, target",
    [
        ("/v1", "/chat/completions", "/v1/chat/completions"),
        ("/v1/", "/models", "/v1/models"),
        ("/v1", "/models?limit=2&after=a%20b", "/v1/models?limit=2&after=a%20b"),
        (
            "/openai/deployments/gpt",
            "/chat/completions?api-version=2024-06-01",
            "/openai/deployments/gpt/chat/completions?api-version=2024-06-01",
        ),
        ("", "/v1/models", "/v1/models"),
        ("/", "/v1/models", "/v1/models"),
        ("", "", "/"),
    ],
)
async def test_request_target(
    serve: ServeFactory, client: UpstreamClient, path: str, tail: str, target: str
) -> None:
    server = await serve(replies(ok()))
    await fetch(client, "GET", server.url + path, tail)
    request_line, fields, _ = parse_request(server.requests[0])
    assert request_line == f"GET {target} HTTP/1.1"
    assert ("Host", f"127.0.0.1:{server.port}") in fields


async def test_post_without_body_sends_content_length_zero(
    serve: ServeFactory, client: UpstreamClient
) -> None:
    server = await serve(replies(ok()))
    await fetch(client, "POST", server.url + "/v1", "/files/abc/cancel")
    _, fields, body = parse_request(server.requests[0])
    assert ("Content-Length", "0") in fields
    assert body == b""


async def test_large_request_body_arrives_intact(
    serve: ServeFactory, client: UpstreamClient
) -> None:
    server = await serve(replies(ok()))
    body = random.Random(5).randbytes(300_000)
    await fetch(client, "POST", server.url + "/v1", "/audio/transcriptions", body=body)
    _, fields, sent = parse_request(server.requests[0])
    assert ("Content-Length", "300000") in fields
    assert sent == body


async def _assert_refused_and_unsent(
    server: RawServer, client: UpstreamClient, tail: str, headers: list[tuple[str, str]]
) -> None:
    """The request fails before a byte is written, even on an idle kept-alive connection."""
    await fetch(client, "GET", server.url + "/v1", "/first")
    with pytest.raises(UpstreamError):
        await fetch(client, "GET", server.url + "/v1", tail, headers)
    await asyncio.sleep(0.02)
    assert len(server.requests) == 1
    assert server.accepted == 1
    await fetch(client, "GET", server.url + "/v1", "/third")  # the connection still works
    assert server.accepted == 1
    assert len(server.requests) == 2


@pytest.mark.parametrize(
    "tail, headers",
    [
        ("/x", [("X-Note", "a\nX-Injected: 1")]),
        ("/x", [("X-Note", "a\rX-Injected: 1")]),
        ("/x HTTP/1.1\r\nX-Injected: 1\r\n\r\nGET /y", []),
        ("/x\n", []),
    ],
    ids=["lf-in-value", "cr-in-value", "crlf-in-target", "lf-in-target"],
)
async def test_line_break_in_the_request_is_refused(
    serve: ServeFactory,
    client: UpstreamClient,
    tail: str,
    headers: list[tuple[str, str]],
) -> None:
    server = await serve(replies(ok()))
    await _assert_refused_and_unsent(server, client, tail, headers)


@pytest.mark.parametrize(
    "headers",
    [
        [("X-Note", "a\r\nX-Injected: 1")],
        [("X-Note\r\nX-Injected", "1")],
    ],
    ids=["crlf-in-value", "crlf-in-name"],
)
async def test_crlf_in_a_header_is_refused(
    serve: ServeFactory, client: UpstreamClient, headers: list[tuple[str, str]]
) -> None:
    server = await serve(replies(ok()))
    await _assert_refused_and_unsent(server, client, "/x", headers)


# --- Flow control ----------------------------------------------------------------------------


async def test_slow_reader_pauses_the_upstream(
    serve: ServeFactory, make_client: ClientFactory
) -> None:
    # 16 MiB: more than loopback socket buffers absorb (a few MiB), so a client that stops
    # reading leaves the rest in the server's transport buffer.
    data = random.Random(11).randbytes(16 << 20)
    conns: list[Conn] = []

    async def handler(conn: Conn) -> None:
        conns.append(conn)
        await conn.request()
        conn.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(data) + data)
        await conn.wait_eof()

    server = await serve(handler)
    client = make_client(read_timeout=0.15)
    response = await client.request("GET", server.url, "/x", NO_HEADERS, b"")
    pieces = response.iter_chunks()
    try:
        first = await anext(pieces)
        digest = hashlib.sha256(first)
        received = len(first)
        # Longer than the read timeout: a pause of ours is not the upstream's silence.
        await asyncio.sleep(0.25)
        # Had the client gone on reading into memory, the server would have nothing left.
        assert conns[0].unsent() > 0
        async for piece in pieces:
            digest.update(piece)
            received += len(piece)
    finally:
        await pieces.aclose()
        response.release()
    assert received == len(data)
    assert digest.digest() == hashlib.sha256(data).digest()
    assert server.accepted == 1


# --- Invalid answers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"<html><body>hello</body></html>\n",
        b"\x16\x03\x03\x00\x02\x02\x28",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
    ],
    ids=["ssh", "html", "tls", "status", "two-lengths", "negative-length", "header"],
)
async def test_invalid_answer_is_a_protocol_error(
    serve: ServeFactory, client: UpstreamClient, garbage: bytes
) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(garbage)
        await conn.wait_eof()

    server = await serve(handler)
    with pytest.raises(UpstreamProtocolError):
        await client.request("GET", server.url, "/x", NO_HEADERS, b"")
    await server.connections[0].client_leaves()  # and the connection was dropped


async def test_invalid_chunk_mid_body_is_a_protocol_error(
    serve: ServeFactory, client: UpstreamClient
) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(CHUNKED_HEAD + chunk(b"fine"), b"zz\r\nnot a chunk\r\n", pause=0.02)
        await conn.wait_eof()

    server = await serve(handler)
    response = await client.request("GET", server.url, "/x", NO_HEADERS, b"")
    got: list[bytes] = []
    try:
        with pytest.raises(UpstreamProtocolError):
            await collect(response, got)
    finally:
        response.release()
    assert got == [b"fine"]


# --- TLS -------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
async def test_tls_with_a_trusted_certificate(
    serve: ServeFactory,
    make_client: ClientFactory,
    tls_files: tuple[Path, Path],
    tls_server_context: ssl.SSLContext,
    host: str,
) -> None:
    server = await serve(replies(ok(b"over tls")), ssl_context=tls_server_context)
    trusting = ssl.create_default_context(cafile=str(tls_files[0]))
    client = make_client(ssl_context=trusting)
    url = f"https://{host}:{server.port}/v1"
    for _ in range(2):
        response, body = await fetch(client, "POST", url, "/chat/completions", body=b"{}")
        assert (response.status, body) == (200, b"over tls")
    assert server.accepted == 1  # kept alive over TLS too
    request_line, fields, _ = parse_request(server.requests[0])
    assert request_line == "POST /v1/chat/completions HTTP/1.1"
    assert ("Host", f"{host}:{server.port}") in fields


async def test_tls_with_an_untrusted_certificate(
    serve: ServeFactory, client: UpstreamClient, tls_server_context: ssl.SSLContext
) -> None:
    server = await serve(replies(ok()), ssl_context=tls_server_context)
    with pytest.raises(UpstreamConnectError):
        await client.request("GET", f"https://localhost:{server.port}/v1", "/x", NO_HEADERS, b"")
    assert server.requests == []


# --- Known bugs ------------------------------------------------------------------------------


async def test_bytes_after_a_complete_answer_do_not_join_it(
    serve: ServeFactory, client: UpstreamClient
) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(ok(b"hello") + ok(b"WORLD", "X-Extra: 1", status="500 Oops"))
        await conn.wait_eof()

    server = await serve(handler)
    response, body = await fetch(client, "GET", server.url, "/x")
    assert body == b"hello"
    assert response.status == 200
    assert "X-Extra" not in response.headers


async def test_deflate_answer_whose_first_piece_is_one_byte(
    serve: ServeFactory, client: UpstreamClient
) -> None:
    packed = zlib.compress(PLAIN)

    async def handler(conn: Conn) -> None:
        await conn.request()
        head = b"HTTP/1.1 200 OK\r\nContent-Encoding: deflate\r\nTransfer-Encoding: chunked\r\n\r\n"
        await conn.send(head + chunk(packed[:1]), chunk(packed[1:]) + LAST_CHUNK, pause=0.02)
        await conn.wait_eof()

    server = await serve(handler)
    _, body = await fetch(client, "GET", server.url, "/x")
    assert body == PLAIN


async def test_reset_during_a_close_delimited_body_is_an_error(
    serve: ServeFactory, client: UpstreamClient
) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npartial", pause=0.03)
        conn.reset()

    server = await serve(handler)
    with pytest.raises(UpstreamClosed):
        await fetch(client, "GET", server.url, "/x")


async def test_unsolicited_switching_protocols_is_a_protocol_error(
    serve: ServeFactory, client: UpstreamClient
) -> None:
    async def handler(conn: Conn) -> None:
        await conn.request()
        await conn.send(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        )
        await conn.wait_eof()

    server = await serve(handler)
    with pytest.raises(UpstreamProtocolError):
        await fetch(client, "GET", server.url, "/x")


@pytest.mark.parametrize("base_url", ["http://127.0.0.1:99999/v1", "http://127.0.0.1:abc/v1"])
async def test_base_url_with_an_invalid_port(client: UpstreamClient, base_url: str) -> None:
    with pytest.raises(UpstreamConnectError):
        await client.request("GET", base_url, "/x", NO_HEADERS, b"")


# --- Forward proxy -----------------------------------------------------------------------------


async def test_https_upstream_through_a_forward_proxy(
    serve: ServeFactory,
    make_client: ClientFactory,
    tls_files: tuple[Path, Path],
    tls_server_context: ssl.SSLContext,
    tunnel_proxy: Any,
) -> None:
    server = await serve(replies(ok(b"through the tunnel")), ssl_context=tls_server_context)
    proxy = await tunnel_proxy(credentials="Basic " + "dTpwQHNz")  # u:p@ss
    trusting = ssl.create_default_context(cafile=str(tls_files[0]))
    client = make_client(ssl_context=trusting, proxy=proxy.url("u:p%40ss@"))
    url = f"https://localhost:{server.port}/v1"
    for _ in range(2):
        response, body = await fetch(client, "POST", url, "/chat/completions", body=b"{}")
        assert (response.status, body) == (200, b"through the tunnel")
    assert len(proxy.heads) == 1  # one tunnel, kept alive
    assert proxy.heads[0].startswith(b"CONNECT localhost:%d HTTP/1.1\r\n" % server.port)
    assert b"Proxy-Authorization" not in server.requests[0]  # the proxy's secret stays there


@pytest.mark.parametrize(
    "refusal",
    [None, b"HTTP/1.1 403 Forbidden\r\n\r\n", b"", b"HTTP/1.1 200 OK\r\n\r\nearly bytes"],
    ids=["wants-credentials", "forbidden", "closes", "speaks-first"],
)
async def test_forward_proxy_without_a_tunnel_is_a_connect_error(
    make_client: ClientFactory, tunnel_proxy: Any, refusal: bytes | None
) -> None:
    proxy = await tunnel_proxy(credentials="Basic eDp5", refusal=refusal)
    client = make_client(proxy=proxy.url())
    with pytest.raises(UpstreamConnectError):
        await client.request("GET", "https://localhost:9/v1", "/models", NO_HEADERS, b"")
    assert len(proxy.heads) == 1


async def test_guard_judges_hosts_reached_through_the_proxy(
    make_client: ClientFactory, tunnel_proxy: Any
) -> None:
    proxy = await tunnel_proxy()
    client = make_client(private=False, proxy=proxy.url())
    for url in ("https://127.0.0.1:8443/v1", "https://169.254.169.254/v1"):
        with pytest.raises(UpstreamConnectError):
            await client.request("GET", url, "/models", NO_HEADERS, b"")
    assert proxy.heads == []  # refused here, the proxy never asked


@pytest.mark.parametrize("no_answer", [False, True], ids=["unknown", "dns-silent"])
async def test_name_unknown_here_is_left_to_the_proxy(
    no_answer: bool,
    serve: ServeFactory,
    make_client: ClientFactory,
    tls_files: tuple[Path, Path],
    tls_server_context: ssl.SSLContext,
    tunnel_proxy: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def unknown(host: str, port: int) -> list[Any]:
        raise UnresolvableHostError(host)

    async def silent(host: str, port: int) -> list[Any]:
        await asyncio.sleep(60)  # a DNS server that never answers
        return []

    monkeypatch.setattr(client_module, "resolve_addresses", silent if no_answer else unknown)
    monkeypatch.setattr(client_module, "PROXIED_LOOKUP_SECONDS", 0.1)
    server = await serve(replies(ok(b"resolved by the proxy")), ssl_context=tls_server_context)
    proxy = await tunnel_proxy()
    trusting = ssl.create_default_context(cafile=str(tls_files[0]))
    client = make_client(ssl_context=trusting, proxy=proxy.url())
    _, body = await fetch(client, "GET", f"https://localhost:{server.port}/v1")
    assert body == b"resolved by the proxy"


async def test_plain_http_upstreams_do_not_use_the_proxy(
    serve: ServeFactory, make_client: ClientFactory, tunnel_proxy: Any
) -> None:
    server = await serve(replies(ok(b"direct")))
    proxy = await tunnel_proxy()
    client = make_client(proxy=proxy.url())
    _, body = await fetch(client, "GET", server.url + "/v1")
    assert body == b"direct"
    assert proxy.heads == []


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://proxy.corp:3128", ForwardProxy("proxy.corp", 3128, None)),
        ("http://proxy.corp", ForwardProxy("proxy.corp", 80, None)),
        ("http://a%3Ab:c%40d@[::1]:8080/", ForwardProxy("::1", 8080, "Basic YTpiOmNAZA==")),
    ],
)
def test_forward_proxy_urls(url: str, expected: ForwardProxy) -> None:
    assert ForwardProxy.from_url(url) == expected


@pytest.mark.parametrize("url", ["https://proxy.corp:3128", "socks5://proxy:1080", "http://"])
def test_unsupported_forward_proxy_urls(url: str) -> None:
    with pytest.raises(ValueError):
        ForwardProxy.from_url(url)
