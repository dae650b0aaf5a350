"""The one HTTP client every plain upstream request goes through.

A small HTTP/1.1 client on asyncio protocols rather than aiohttp's ClientSession: measured on
the proxy's hot path, ClientSession spent more time per request than the whole rest of a
minimal aiohttp pass-through (building request objects, tracing hooks, cookie handling,
per-read timers). This client does only what a reverse proxy needs:

- keep-alive connections per origin, newest first, closed after KEEPALIVE_SECONDS idle;
- a request sent again on a new connection when a kept-alive one turns out closed before a
  byte came back (servers close idle connections at will);
- connect and idle-read timeouts, but no total timeout, so long generations are never cut;
- gzip and deflate answers decoded in bounded slices;
- every address checked by the upstream guard (``netguard``) right before it is dialled,
  and the socket connected to that very address, so DNS rebinding gains nothing; a host's
  allowed addresses are raced Happy Eyeballs style, so a dead one costs 250 ms, not the
  connect timeout;
- an optional forward proxy for https upstreams (CONNECT tunnels), set in the
  configuration only: no cookies, no redirects followed, no proxies from the environment.

WebSocket upgrades (the Realtime API) use aiohttp's client instead; see ``websockets.py``.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import aiohappyeyeballs

from ..log import upstream_log
from ..netguard import (
    AddressPolicy,
    IPAddress,
    UnresolvableHostError,
    parse_address,
    resolve_addresses,
)
from .connection import SilenceWatch, UpstreamConnection, UpstreamResponse
from .errors import (
    StaleConnection,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)

KEEPALIVE_SECONDS = 15.0
# Idle connections kept per origin: enough for a burst of streams to end without closing
# any (a new TLS connection costs a handshake; an idle one a few kilobytes until swept).
MAX_IDLE_PER_ORIGIN = 4096
DNS_TTL_SECONDS = 10.0
# How long one address may keep a connect to itself before the next is tried too (RFC 8305
# recommends 250 ms).
HAPPY_EYEBALLS_DELAY = 0.25
MAX_TUNNEL_ANSWER = 16 * 1024  # a forward proxy's answer to CONNECT
# Behind a forward proxy: how long to wait for local DNS, and to remember it had no answer.
PROXIED_LOOKUP_SECONDS = 2.0
UNRESOLVED_TTL_SECONDS = 300.0
SWEEP_SECONDS = 5.0
_BODY_METHODS = frozenset(("POST", "PUT", "PATCH"))
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(eq=False)
class Origin:
    """Scheme, host and port: where a connection goes, with its idle connections."""

    scheme: str
    host: str  # lower case; an IPv6 literal without brackets
    port: int
    host_header: str
    idle: list[UpstreamConnection] = field(default_factory=list)


@dataclass(frozen=True)
class ForwardProxy:
    """An HTTP proxy that https upstreams are reached through, with CONNECT tunnels."""

    host: str
    port: int
    authorization: str | None  # the Proxy-Authorization value, when the URL has credentials

    @classmethod
    def from_url(cls, url: str) -> ForwardProxy:
        """``http://[user:password@]host[:port]``; raises ValueError otherwise."""
        parts = urlsplit(url)
        if parts.scheme.lower() != "http" or not parts.hostname:
            raise ValueError("a forward proxy URL is http://[user:password@]host[:port]")
        authorization = None
        if parts.username is not None:
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            authorization = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
        return cls(parts.hostname, parts.port or 80, authorization)


class UpstreamClient:
    def __init__(
        self,
        policy: AddressPolicy,
        *,
        connect_timeout: float,
        read_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
        proxy: ForwardProxy | None = None,
    ) -> None:
        self._policy = policy
        self._proxy = proxy
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._ssl = ssl_context or _default_ssl_context()
        self._origins: dict[str, tuple[Origin, str]] = {}
        self._addresses: dict[tuple[str, int], tuple[float, list[str]]] = {}
        # (host, port) reached through the proxy -> until when the guard's verdict holds.
        self._proxied_checked: dict[tuple[str, int], float] = {}
        self._closed = False
        self._running_loop: asyncio.AbstractEventLoop | None = None
        self._silence: SilenceWatch | None = None

    @property
    def proxy(self) -> ForwardProxy | None:
        """The forward proxy https upstreams are reached through; WebSocket sessions too."""
        return self._proxy

    @property
    def ssl_context(self) -> ssl.SSLContext:
        """How upstream TLS is verified; WebSocket sessions use it too."""
        return self._ssl

    async def request(
        self,
        method: str,
        base_url: str,
        tail: str,
        headers: bytes,
        body: bytes = b"",
    ) -> UpstreamResponse:
        """Send ``method base_url+tail`` and return the answer once its headers are in.

        ``tail`` is appended to the base URL's path as it is (already percent-encoded);
        ``headers`` is a block of "Name: value\\r\\n" lines (see ``header_block``), to
        which Host, Content-Length and Accept-Encoding are added. ``release()`` the answer
        when done with it. Raises UpstreamError.
        """
        origin, base_path = self._origin(base_url)
        target = base_path + tail
        if not target.startswith("/"):
            target = "/" + target
        head = _request_head(method, target, origin.host_header, headers, body)
        head_only = method == "HEAD"
        connection = self._idle_connection(origin)
        while True:
            if connection is None:
                connection = await self._connect(origin)
            try:
                # send() returns a future rather than being a coroutine: one coroutine
                # fewer for every answer to pass through.
                return await connection.send(head, body, head_only)
            except StaleConnection:
                if not connection.reused:
                    raise  # cannot happen: only kept-alive connections go stale
                upstream_log.debug("kept-alive connection to %s was closed", origin.host)
                connection = None  # send again on a new connection
            except asyncio.CancelledError:
                connection.abort()
                raise

    async def close(self) -> None:
        self._closed = True
        if self._silence is not None:
            self._silence.close()
        for origin, _ in self._origins.values():
            while origin.idle:
                origin.idle.pop().close()

    async def sweep_idle(self) -> None:
        """Background loop: close connections idle for longer than KEEPALIVE_SECONDS."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            cutoff = loop.time() - KEEPALIVE_SECONDS
            for origin, _ in list(self._origins.values()):
                keep = []
                for connection in origin.idle:
                    if connection.closed or connection.idle_since < cutoff:
                        connection.close()
                    else:
                        keep.append(connection)
                origin.idle[:] = keep

    # -- connections -------------------------------------------------------------------------

    def _origin(self, base_url: str) -> tuple[Origin, str]:
        known = self._origins.get(base_url)
        if known is not None:
            return known
        try:
            parts = urlsplit(base_url)
            port = parts.port
        except ValueError:  # a port that is not a number, or out of range
            raise UpstreamConnectError() from None
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS or not parts.hostname:
            raise UpstreamConnectError()
        host = parts.hostname
        port = port or _DEFAULT_PORTS[scheme]
        shown = f"[{host}]" if ":" in host else host
        host_header = shown if port == _DEFAULT_PORTS[scheme] else f"{shown}:{port}"
        # Keys sharing a scheme, host and port share their connections too.
        for origin, _ in self._origins.values():
            if (origin.scheme, origin.host, origin.port) == (scheme, host, port):
                break
        else:
            origin = Origin(scheme, host, port, host_header)
        known = (origin, parts.path.rstrip("/"))
        self._origins[base_url] = known
        return known

    def _loop(self) -> asyncio.AbstractEventLoop:
        # Kept, not looked up each time: asyncio.get_running_loop() makes a getpid() system
        # call on every use (a guard against forks), which costs more than it seems.
        loop = self._running_loop
        if loop is None:
            loop = self._running_loop = asyncio.get_running_loop()
        return loop

    def _silence_watch(self) -> SilenceWatch:
        watch = self._silence
        if watch is None:
            watch = self._silence = SilenceWatch(self._loop(), self._read_timeout)
        return watch

    def _idle_connection(self, origin: Origin) -> UpstreamConnection | None:
        idle = origin.idle
        if not idle:
            return None
        cutoff = self._loop().time() - KEEPALIVE_SECONDS
        while idle:
            connection = idle.pop()
            if not connection.closed and connection.idle_since > cutoff:
                return connection
            connection.close()
        return None

    def _reusable(self, connection: UpstreamConnection) -> None:
        origin = connection.origin
        if self._closed or len(origin.idle) >= MAX_IDLE_PER_ORIGIN:
            connection.close()
            return
        connection.idle_since = connection.loop.time()
        origin.idle.append(connection)

    async def _connect(self, origin: Origin) -> UpstreamConnection:
        try:
            async with asyncio.timeout(self._connect_timeout):
                if self._proxy is not None and origin.scheme == "https":
                    return await self._dial_through(self._proxy, origin)
                addresses = await self._allowed_addresses(origin)
                sock = await self._open_socket(origin.host, origin.port, addresses)
                return await self._wrap(origin, sock)
        except TimeoutError:
            raise UpstreamTimeout() from None

    async def _open_socket(self, host: str, port: int, addresses: list[str]) -> socket.socket:
        """A TCP connection to the first of ``addresses`` (of ``host``) to answer.

        Addresses are tried Happy Eyeballs style (RFC 8305): when one has not answered
        within HAPPY_EYEBALLS_DELAY the next is tried alongside it, so an address that
        drops packets (IPv6 without a working route, typically) does not use up the
        whole connect timeout.
        """
        infos = [_address_info(address, port) for address in addresses]
        try:
            return await aiohappyeyeballs.start_connection(
                infos, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY, interleave=1
            )
        except OSError as exc:
            upstream_log.debug("connect to %s failed: %s", host, exc)
            raise UpstreamConnectError() from None

    async def _wrap(self, origin: Origin, sock: socket.socket) -> UpstreamConnection:
        """The connection on a connected socket, after the TLS handshake if the origin wants it."""
        loop = self._loop()
        watch = self._silence_watch()
        tls = self._ssl if origin.scheme == "https" else None
        try:
            _, connection = await loop.create_connection(
                lambda: UpstreamConnection(loop, origin, watch),
                sock=sock,
                ssl=tls,
                server_hostname=origin.host if tls else None,
            )
        except OSError as exc:  # ssl.SSLError included
            sock.close()
            upstream_log.debug("TLS with %s failed: %s", origin.host, exc)
            raise UpstreamConnectError() from None
        except BaseException:
            sock.close()  # cancelled (the connect timeout) during the TLS handshake
            raise
        connection.on_reusable = self._reusable
        return connection

    async def _dial_through(self, proxy: ForwardProxy, origin: Origin) -> UpstreamConnection:
        """A TLS connection to ``origin`` inside a CONNECT tunnel through ``proxy``."""
        await self.check_proxied_host(origin.host, origin.port)
        proxy_addresses = [str(ip) for ip in await _resolve(proxy.host, proxy.port)]
        sock = await self._open_socket(proxy.host, proxy.port, proxy_addresses)
        try:
            await _open_tunnel(self._loop(), sock, proxy, origin)
        except BaseException:
            sock.close()
            raise
        return await self._wrap(origin, sock)

    async def check_proxied_host(self, host: str, port: int) -> None:
        """The guard, for a host the forward proxy will resolve: every address it has here
        must be allowed, else UpstreamConnectError. A name this machine cannot resolve is
        left to the proxy; names were vetted (no localhost, no internal suffixes) when the
        key was added."""
        where = (host, port)
        loop = self._loop()
        if self._proxied_checked.get(where, 0.0) > loop.time():
            return
        ip = parse_address(host)
        try:
            if ip is not None:
                found = [ip]
            else:
                # Where only the proxy reaches out, local DNS may not answer at all.
                async with asyncio.timeout(PROXIED_LOOKUP_SECONDS):
                    found = await resolve_addresses(host, port)
        except (UnresolvableHostError, TimeoutError):
            found = []
        for address in found:
            reason = self._policy.refusal(address, port)
            if reason is not None:
                upstream_log.warning(
                    "upstream guard refused %s port %d (%s): %s", host, port, address, reason
                )
                raise UpstreamConnectError()
        # A name unknown here stays unknown for a while: do not ask local DNS every time.
        ttl = DNS_TTL_SECONDS if found else UNRESOLVED_TTL_SECONDS
        self._proxied_checked[where] = loop.time() + ttl

    async def _allowed_addresses(self, origin: Origin) -> list[str]:
        """The host's addresses the guard allows, looked up at most every DNS_TTL_SECONDS."""
        loop = asyncio.get_running_loop()
        where = (origin.host, origin.port)
        cached = self._addresses.get(where)
        if cached is not None and cached[0] > loop.time():
            return cached[1]
        found = await _resolve(origin.host, origin.port)
        allowed = []
        for ip in found:
            address = str(ip)
            reason = self._policy.refusal(ip, origin.port)
            if reason is None:
                allowed.append(address)
            else:
                upstream_log.warning(
                    "upstream guard refused %s port %d (%s): %s",
                    origin.host,
                    origin.port,
                    address,
                    reason,
                )
        if not allowed:
            raise UpstreamConnectError()
        self._addresses[where] = (loop.time() + DNS_TTL_SECONDS, allowed)
        return allowed


async def _resolve(host: str, port: int) -> list[IPAddress]:
    ip = parse_address(host)
    if ip is not None:
        return [ip]
    try:
        found = await resolve_addresses(host, port)
    except UnresolvableHostError:
        upstream_log.info("cannot resolve upstream host %s", host)
        raise UpstreamConnectError() from None
    return list(dict.fromkeys(found))  # once each, in the resolver's order


AddressInfo = tuple[socket.AddressFamily, socket.SocketKind, int, str, tuple[Any, ...]]

# Request lines with their Host header, by (method, target, host): most requests repeat one.
_START_LINES: dict[tuple[str, str, str], bytes] = {}


def header_block(headers: Iterable[tuple[str, str]]) -> bytes:
    """Header pairs as the block of lines ``UpstreamClient.request`` takes.

    Raises UpstreamError when a name or value holds a line break.
    """
    lines = []
    for name, value in headers:
        if "\r" in name or "\n" in name or "\r" in value or "\n" in value:
            raise UpstreamError("a header holds a line break")
        lines.append(f"{name}: {value}\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape")


def _request_head(method: str, target: str, host: str, headers: bytes, body: bytes) -> bytes:
    start = _START_LINES.get((method, target, host))
    if start is None:
        start = f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n".encode("utf-8", "surrogateescape")
        if len(_START_LINES) >= 1024:
            _START_LINES.clear()  # bounded: targets with object ids are many and seen once
        _START_LINES[(method, target, host)] = start
    length = b"Content-Length: %d\r\n" % len(body) if body or method in _BODY_METHODS else b""
    head = b"%s%s%sAccept-Encoding: gzip, deflate\r\n\r\n" % (start, headers, length)
    # A line break inside a name, a value or the target would let it write headers, or a
    # second request, of its own choosing: every line must end where it was meant to.
    lines = 4 + headers.count(b"\r\n") + (1 if length else 0)
    if head.count(b"\n") != lines or head.count(b"\r") != lines:
        raise UpstreamError("a header holds a line break")
    return head


async def _open_tunnel(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, proxy: ForwardProxy, origin: Origin
) -> None:
    """Ask the proxy for a tunnel to ``origin`` (CONNECT) and read its answer."""
    shown = f"[{origin.host}]" if ":" in origin.host else origin.host
    authority = f"{shown}:{origin.port}"
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    if proxy.authorization:
        lines.append(f"Proxy-Authorization: {proxy.authorization}")
    await loop.sock_sendall(sock, ("\r\n".join(lines) + "\r\n\r\n").encode())
    answer = b""
    while b"\r\n\r\n" not in answer:
        piece = await loop.sock_recv(sock, 4096)
        if not piece:
            upstream_log.warning("forward proxy closed the connection instead of a tunnel")
            raise UpstreamConnectError()
        answer += piece
        if len(answer) > MAX_TUNNEL_ANSWER:
            raise UpstreamProtocolError("the forward proxy's answer is too long")
    head, _, early = answer.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or parts[1] != "200" or early:
        # The status line only: a proxy's answer might echo what it was sent.
        upstream_log.warning(
            "forward proxy refused a tunnel to %s: %.60s", origin.host, status_line
        )
        raise UpstreamConnectError()


def _address_info(address: str, port: int) -> AddressInfo:
    """A getaddrinfo()-style entry for one numeric address, as aiohappyeyeballs takes."""
    if ":" in address:
        return (socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port, 0, 0))
    return (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port))


def _default_ssl_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.set_alpn_protocols(["http/1.1"])
    return context
