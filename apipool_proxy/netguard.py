"""Keep contributed upstream base URLs from turning the proxy into an SSRF vector.

Anyone may contribute a key with its own ``base_url``, so the guard works in three layers:

1. ``normalize_base_url`` when a key is contributed: syntax, scheme, credentials, IP literals
   in disguise (``0x7f000001``, ``127.1``) and well-known internal names.
2. ``check_upstream_host`` when a key is contributed: resolve the host once and tell the user
   in plain words why it is refused.
3. On every connect. DNS answers can change between the check and the request (DNS
   rebinding), so the addresses that are actually dialled are judged again by
   ``AddressPolicy``: the upstream client (``apipool_proxy.upstream``) resolves, checks
   each address and connects to that very address. For aiohttp's client (WebSocket
   upgrades), ``GuardedConnector`` does the same: ``GuardedResolver`` drops refused
   addresses from every lookup, and a socket factory refuses the final socket address,
   which also covers IP-literal hosts that aiohttp never passes to a resolver.
"""

import errno
import ipaddress
import re
import socket
import unicodedata
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import aiohttp
import idna
from aiohappyeyeballs import AddrInfoType
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.connector import Connection
from aiohttp.resolver import DefaultResolver, ThreadedResolver
from aiohttp.tracing import Trace

__all__ = (
    "AddressPolicy",
    "GuardedConnector",
    "GuardedResolver",
    "UnsafeUpstreamError",
    "check_upstream_host",
    "is_public_address",
    "normalize_base_url",
    "parse_address",
    "resolve_addresses",
    "refuse_redirected_upgrades",
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class UnresolvableHostError(Exception):
    """The host did not resolve (yet): nothing unsafe was found, nothing was proven safe."""


class UnsafeUpstreamError(ValueError):
    """An upstream base URL was refused.

    The message is one line and safe to show to the user who contributed the key: it never
    repeats userinfo, path or query, where credentials could hide.
    """


# --- Addresses ---------------------------------------------------------------------------

_V4_NOT_PUBLIC = tuple(
    ipaddress.IPv4Network(net)
    for net in (
        "0.0.0.0/8",  # "this network" (RFC 791); Linux dials 0.0.0.0 as loopback
        "10.0.0.0/8",  # private, RFC 1918
        "100.64.0.0/10",  # carrier-grade NAT, RFC 6598
        "127.0.0.0/8",  # loopback
        "169.254.0.0/16",  # link-local, RFC 3927; home of most cloud metadata services
        "172.16.0.0/12",  # private, RFC 1918
        "192.0.0.0/24",  # IETF protocol assignments, RFC 6890
        "192.0.2.0/24",  # documentation, RFC 5737
        "192.88.99.0/24",  # retired 6to4 relay anycast, RFC 7526
        "192.168.0.0/16",  # private, RFC 1918
        "198.18.0.0/15",  # benchmarking, RFC 2544
        "198.51.100.0/24",  # documentation, RFC 5737
        "203.0.113.0/24",  # documentation, RFC 5737
        "224.0.0.0/4",  # multicast; Python's is_global wrongly calls it global
        "240.0.0.0/4",  # reserved, including 255.255.255.255 broadcast
    )
)

# Only 2000::/3 is allocated as global unicast (RFC 4291 section 2.4); everything outside
# it (::1, ::, ::ffff:0:0/96, ::/96, fc00::/7, fe80::/10, fec0::/10, ff00::/8, 100::/64,
# 64:ff9b:1::/48) is special-purpose or unassigned.
_V6_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")
_V6_NOT_PUBLIC = tuple(
    ipaddress.IPv6Network(net)
    for net in (
        "2001::/23",  # IETF protocol assignments: Teredo, benchmarking, ORCHID (RFC 2928)
        "2001:db8::/32",  # documentation, RFC 3849
        "3fff::/20",  # documentation, RFC 9637
        "5f00::/16",  # SRv6 SIDs, RFC 9602
    )
)
# NAT64 (RFC 6052) embeds an IPv4 address in the low 32 bits; judge that address.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")

# Instance metadata and host agents hand out cloud credentials. No LLM API lives there,
# so these stay refused even when the operator allows private networks.
_METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(addr)
    for addr in (
        "169.254.169.254",  # AWS, GCP, Azure, OCI, DigitalOcean instance metadata
        "169.254.170.2",  # AWS ECS task credentials
        "169.254.170.23",  # AWS EKS Pod Identity agent
        "fd00:ec2::254",  # AWS instance metadata over IPv6
        "fd00:ec2::23",  # AWS EKS Pod Identity agent over IPv6
        "100.100.100.200",  # Alibaba Cloud metadata
        "168.63.129.16",  # Azure WireServer (a public-looking address)
    )
)


def _unwrap(ip: IPAddress) -> IPAddress:
    """The address a connect really reaches: IPv4-mapped IPv6 becomes IPv4, scope dropped."""
    if isinstance(ip, ipaddress.IPv4Address):
        return ip
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ipaddress.IPv6Address(int(ip))


def is_public_address(ip: IPAddress) -> bool:
    """True only for a globally routable unicast address that is not a metadata service."""
    if _unwrap(ip) in _METADATA_ADDRESSES:
        return False
    if isinstance(ip, ipaddress.IPv4Address):
        return _is_public_v4(ip)
    return _is_public_v6(ip)


def _is_public_v4(ip: ipaddress.IPv4Address) -> bool:
    if ip in _METADATA_ADDRESSES or any(ip in net for net in _V4_NOT_PUBLIC):
        return False
    return ip.is_global


def _is_public_v6(ip: ipaddress.IPv6Address) -> bool:
    ip = ipaddress.IPv6Address(int(ip))  # a zone id does not change where a packet goes
    if ip in _NAT64:
        return _is_public_v4(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if ip not in _V6_GLOBAL_UNICAST or any(ip in net for net in _V6_NOT_PUBLIC):
        return False
    if ip.sixtofour is not None and not _is_public_v4(ip.sixtofour):
        return False  # 6to4, RFC 3056
    return ip.is_global


def _is_local_address(ip: IPAddress) -> bool:
    """True when connecting to ``ip`` would reach this machine."""
    ip = _unwrap(ip)
    # The bind probe below cannot test link-local addresses without a zone, and refusing
    # the proxy's own ports on a link-local neighbour costs nothing.
    if ip.is_loopback or ip.is_unspecified or ip.is_link_local:
        return True
    if isinstance(ip, ipaddress.IPv4Address) and ip in _THIS_NETWORK:
        return True
    return _is_bindable(ip)


def _is_bindable(ip: IPAddress) -> bool:
    # The kernel only lets us bind to an address of one of our own interfaces, which answers
    # "is this us?" for every interface without enumerating them. A NATed public address
    # (typical in clouds and containers) is not on an interface and is not detected.
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((str(ip), 0))
    except OSError:
        return False
    return True


def parse_address(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


@dataclass(frozen=True)
class AddressPolicy:
    """Which addresses and ports upstream connections may dial."""

    allow_private_networks: bool
    # Held by reference, not copied: a server told to listen on port 0 learns its real
    # ports only after the upstream session exists, and adds them to this same set.
    forbidden_ports: AbstractSet[int]

    def refusal(self, ip: IPAddress, port: int) -> str | None:
        """Why dialling ``ip`` on ``port`` is refused, or None when it is allowed."""
        if _unwrap(ip) in _METADATA_ADDRESSES:
            return "cloud metadata address"
        if not self.allow_private_networks and not is_public_address(ip):
            return "not a public address"
        if port in self.forbidden_ports and _is_local_address(ip):
            return "a port of this proxy itself"
        return None

    def refusal_for_text(self, host: str, port: int) -> str | None:
        ip = parse_address(host)
        return "not an IP address" if ip is None else self.refusal(ip, port)

    def open_socket(self, addr_info: AddrInfoType) -> socket.socket:
        """Socket factory for aiohappyeyeballs: the last look at an address before connect."""
        family, type_, proto, _, sockaddr = addr_info
        host, port = str(sockaddr[0]), int(sockaddr[1])
        reason = self.refusal_for_text(host, port)
        if reason is not None:
            raise OSError(errno.EACCES, f"upstream guard refused {host} port {port}: {reason}")
        return socket.socket(family=family, type=type_, proto=proto)


# --- Base URLs ---------------------------------------------------------------------------

_MAX_URL_LENGTH = 2048
_DEFAULT_PORTS = {"https": 443, "http": 80}
_PORT = re.compile(r"[0-9]{1,5}")
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
# RFC 3986 section 3.3: path = *( "/" segment ), segment = *pchar.
_PATH = re.compile(r"(?:/(?:[A-Za-z0-9\-._~!$&'()*+,;=:@]|%[0-9A-Fa-f]{2})*)*")
# WHATWG URL "ends in a number": such a host is parsed as IPv4 or refused, never looked up.
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")
_IPV4_PART = re.compile(r"0x(?P<hex>[0-9a-f]+)|0(?P<oct>[0-7]*)|(?P<dec>[1-9][0-9]*)")

# Names that only ever mean "this machine" or "this site": RFC 6761 (localhost), RFC 6762
# (.local), RFC 8375 (home.arpa), and .internal, which ICANN reserved for private use.
_INTERNAL_SUFFIXES = (".localhost", ".local", ".internal", ".home.arpa", ".localdomain")
_METADATA_NAMES = frozenset({"metadata.google.internal"})


class _Upstream(NamedTuple):
    scheme: str
    host: str  # ASCII; an IPv6 literal without brackets
    ip: IPAddress | None
    port: int
    path: str

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = "" if _DEFAULT_PORTS[self.scheme] == self.port else f":{self.port}"
        return f"{self.scheme}://{host}{port}{self.path}"


def normalize_base_url(url: str, *, allow_private_networks: bool) -> str:
    """Validate a contributed upstream base URL and return its canonical spelling.

    ``https://API.OpenAI.com:443/v1/`` becomes ``https://api.openai.com/v1``. Raises
    UnsafeUpstreamError with a one-line reason. A hostname is not resolved here; call
    ``check_upstream_host`` on the result for that.
    """
    return _parse_base_url(url, allow_private_networks=allow_private_networks).url


def _parse_base_url(url: str, *, allow_private_networks: bool) -> _Upstream:
    _check_characters(url)
    try:
        parts = urlsplit(url)
    except ValueError:
        raise UnsafeUpstreamError("malformed URL") from None

    scheme = _check_scheme(parts.scheme, allow_private_networks)
    host_text, bracketed, port = _split_authority(parts.netloc)
    host, ip = _parse_ip_literal(host_text) if bracketed else _parse_host(host_text)
    _check_destination(host, ip, allow_private_networks)
    return _Upstream(scheme, host, ip, port or _DEFAULT_PORTS[scheme], _normalize_path(parts.path))


def _check_characters(url: object) -> None:
    if not isinstance(url, str):
        raise UnsafeUpstreamError("base URL must be a string")
    if len(url) > _MAX_URL_LENGTH:
        raise UnsafeUpstreamError(f"base URL is longer than {_MAX_URL_LENGTH} characters")
    # Categories C (control, format, unassigned...) and Z (separators) cover CR, LF, TAB,
    # NUL, DEL, C1 controls, zero-width characters and every kind of space.
    if any(unicodedata.category(char)[0] in "CZ" for char in url):
        raise UnsafeUpstreamError("base URL contains whitespace or control characters")
    # WHATWG parsers read "\" as "/" in http(s) URLs while urllib does not; refusing it
    # avoids any disagreement about where the host ends.
    if "\\" in url:
        raise UnsafeUpstreamError("base URL contains a backslash")
    if "#" in url:
        raise UnsafeUpstreamError("base URL must not have a fragment")
    if "?" in url:
        raise UnsafeUpstreamError("base URL must not have a query string")


# Appended to refusals that only the operator's setting lifts, so whoever meets one (a
# member adding a local model server, say) knows what to ask for.
_PRIVATE_NETWORKS_OFF = (
    " (this server takes only public https upstreams: upstream.allow_private_networks)"
)


def _check_scheme(scheme: str, allow_private_networks: bool) -> str:
    # The scheme is not echoed: in "user:secret@host" urllib takes "user" for the scheme.
    if scheme == "https":
        return scheme
    if scheme == "http":
        if allow_private_networks:
            return scheme
        raise UnsafeUpstreamError("plain http is refused" + _PRIVATE_NETWORKS_OFF)
    allowed = "https or http" if allow_private_networks else "https"
    raise UnsafeUpstreamError(f"base URL must start with {allowed}://")


def _split_authority(netloc: str) -> tuple[str, bool, int | None]:
    """Split ``host[:port]`` into the host text, whether it was bracketed, and the port."""
    if not netloc:
        raise UnsafeUpstreamError("base URL must include a host")
    if "@" in netloc:
        raise UnsafeUpstreamError("credentials in the base URL are not allowed")

    if netloc.startswith("["):
        host, bracket, rest = netloc[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise UnsafeUpstreamError("malformed IPv6 address in base URL")
        return host, True, _parse_port(rest[1:]) if rest else None

    if netloc.count(":") > 1 or "[" in netloc or "]" in netloc:
        raise UnsafeUpstreamError("IPv6 addresses must be written in [brackets]")
    host, colon, port_text = netloc.partition(":")
    return host, False, _parse_port(port_text) if colon else None


def _parse_port(text: str) -> int:
    port = int(text) if _PORT.fullmatch(text) else 0
    if not 0 < port < 65536:
        raise UnsafeUpstreamError("base URL has an invalid port")
    return port


def _parse_ip_literal(text: str) -> tuple[str, IPAddress]:
    # A zone id (RFC 6874) selects a local interface; it has no meaning for a remote API.
    if "%" in text:
        raise UnsafeUpstreamError("IPv6 zone identifiers are not allowed")
    try:
        ip = ipaddress.IPv6Address(text)
    except ValueError:
        raise UnsafeUpstreamError("malformed IPv6 address in base URL") from None
    return ip.compressed, ip


def _parse_host(text: str) -> tuple[str, IPAddress | None]:
    host = _to_ascii(text)
    if host.endswith("."):
        host = host[:-1]  # the root label; "localhost." is still localhost
    if _NUMERIC_LABEL.fullmatch(host.rpartition(".")[2]):
        ip = _parse_legacy_ipv4(host)
        return str(ip), ip
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in host.split(".")):
        raise UnsafeUpstreamError("base URL has an invalid host name")
    return host, None


def _to_ascii(text: str) -> str:
    if not text:
        raise UnsafeUpstreamError("base URL must include a host")
    if text.isascii():
        return text.lower()
    # No host name is longer than 253 characters, and idna versions before 3.15 spend
    # minutes on some long crafted inputs (CVE-2024-3651, CVE-2026-45409).
    if len(text) > 253:
        raise UnsafeUpstreamError("base URL has an invalid host name")
    # UTS 46 mapping as yarl does, so "ＡＰＩ.example" or "１２７.０.０.１" is judged by
    # the ASCII name that is finally connected to.
    try:
        return idna.encode(text, uts46=True).decode("ascii")
    except UnicodeError:
        raise UnsafeUpstreamError("base URL has an invalid international host name") from None


def _parse_legacy_ipv4(host: str) -> ipaddress.IPv4Address:
    """Read a numeric host the way inet_aton(3) does: 1-4 parts, decimal, octal or hex."""
    parts = host.split(".")
    numbers = [_parse_ipv4_part(part) for part in parts]
    if len(parts) > 4 or None in numbers:
        raise UnsafeUpstreamError("base URL host looks numeric but is not an IPv4 address")

    *leading, last = [n for n in numbers if n is not None]
    # Every part but the last is one byte; the last fills the remaining bytes ("127.1").
    if any(n > 255 for n in leading) or last >= 256 ** (4 - len(leading)):
        raise UnsafeUpstreamError("base URL host is an out-of-range IPv4 address")
    value = last
    for index, number in enumerate(leading):
        value += number << (8 * (3 - index))
    return ipaddress.IPv4Address(value)


def _parse_ipv4_part(part: str) -> int | None:
    match = _IPV4_PART.fullmatch(part)
    if match is None:
        return None  # empty, "08", a bare "0x", or not numeric at all
    if match["hex"] is not None:
        return int(match["hex"], 16)
    if match["oct"] is not None:
        return int(match["oct"] or "0", 8)
    return int(match["dec"])


def _check_destination(host: str, ip: IPAddress | None, allow_private_networks: bool) -> None:
    if ip is not None:
        if _unwrap(ip) in _METADATA_ADDRESSES:
            raise UnsafeUpstreamError(f"{ip} is a cloud metadata address")
        if not allow_private_networks and not is_public_address(ip):
            raise UnsafeUpstreamError(f"{ip} is not a public address" + _PRIVATE_NETWORKS_OFF)
        return

    if host in _METADATA_NAMES:
        raise UnsafeUpstreamError(f"{host} is a cloud metadata service")
    if allow_private_networks:
        return
    if host == "localhost" or host.endswith(_INTERNAL_SUFFIXES):
        raise UnsafeUpstreamError(f"{host} is a local or internal name" + _PRIVATE_NETWORKS_OFF)
    # A single label is completed by the resolver's search domains, i.e. the local network.
    if "." not in host:
        raise UnsafeUpstreamError(
            f"{host} is not a fully qualified domain name" + _PRIVATE_NETWORKS_OFF
        )


def _normalize_path(path: str) -> str:
    if not _PATH.fullmatch(path):
        raise UnsafeUpstreamError("base URL path has characters that must be percent-encoded")
    if any(segment in (".", "..") for segment in path.split("/")):
        raise UnsafeUpstreamError("base URL path must not contain . or .. segments")
    return path.rstrip("/")


# --- Resolving ---------------------------------------------------------------------------


async def check_upstream_host(
    url: str,
    *,
    allow_private_networks: bool,
    forbidden_ports: AbstractSet[int],
    resolver: AbstractResolver | None = None,
) -> None:
    """Resolve the host of a normalised base URL now and refuse it if it leads anywhere unsafe.

    Every address must pass: public (unless private networks are allowed), not a metadata
    service, and not this machine on one of ``forbidden_ports`` (the proxy's own ports).
    This gives a clear answer at contribution time; ``GuardedConnector`` enforces the same
    rules on every connect, because DNS may answer differently later.
    """
    upstream = _parse_base_url(url, allow_private_networks=allow_private_networks)
    policy = AddressPolicy(allow_private_networks, forbidden_ports)
    if upstream.ip is not None:
        addresses = [upstream.ip]
    else:
        addresses = await _resolve(upstream.host, upstream.port, resolver)

    for ip in addresses:
        reason = policy.refusal(ip, upstream.port)
        if reason is not None:
            where = "" if upstream.ip else f" (resolves to {ip})"
            hint = _PRIVATE_NETWORKS_OFF if reason == "not a public address" else ""
            raise UnsafeUpstreamError(
                f"refused {upstream.host} port {upstream.port}{where}: {reason}{hint}"
            )


async def resolve_addresses(host: str, port: int) -> list[IPAddress]:
    """Every address ``host`` resolves to; raises UnresolvableHostError."""
    return await _resolve(host, port, None)


async def _resolve(host: str, port: int, resolver: AbstractResolver | None) -> list[IPAddress]:
    active = resolver or ThreadedResolver()
    try:
        results = await active.resolve(host, port, family=socket.AF_UNSPEC)
    except OSError:
        raise UnresolvableHostError(f"cannot resolve host {host}") from None
    finally:
        if resolver is None:
            await active.close()

    addresses = [parse_address(result["host"]) for result in results]
    if not addresses or None in addresses:
        raise UnresolvableHostError(f"cannot resolve host {host}")
    return [ip for ip in addresses if ip is not None]


class GuardedResolver(AbstractResolver):
    """Resolver that drops every address the upstream guard refuses.

    Wraps ``inner`` (by default aiohttp's DefaultResolver) and takes ownership of it:
    ``close()`` closes it. When no address is left, raises OSError, which aiohttp's
    connector reports as ``ClientConnectorDNSError``.
    """

    def __init__(
        self,
        *,
        allow_private_networks: bool,
        forbidden_ports: AbstractSet[int] = frozenset(),
        inner: AbstractResolver | None = None,
    ) -> None:
        self._policy = AddressPolicy(allow_private_networks, forbidden_ports)
        self._inner = inner

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if self._inner is None:
            self._inner = DefaultResolver()  # created here, where an event loop is running
        results = await self._inner.resolve(host, port, family)

        allowed: list[ResolveResult] = []
        reason = "no address"
        for result in results:
            refusal = self._policy.refusal_for_text(result["host"], result["port"])
            if refusal is None:
                allowed.append(result)
            else:
                reason = f"{result['host']} is {refusal}"
        # An empty list would trip an assertion inside aiohttp's connector, so always raise.
        if not allowed:
            raise OSError(errno.EACCES, f"upstream guard refused {host}: {reason}")
        return allowed

    async def close(self) -> None:
        if self._inner is not None:
            await self._inner.close()


class GuardedConnector(aiohttp.TCPConnector):
    """TCPConnector for the upstream session that only dials addresses the guard allows.

    aiohttp's ``TCPConnector._resolve_host`` dials hosts that look like IP literals (any
    host with a ":", or only digits and dots) without calling the resolver, so the resolver
    alone cannot guard them. This connector therefore also installs a socket factory, a
    public TCPConnector parameter, which sees the exact address of every connection attempt:
    IP literals, cached DNS answers and resolver results alike. No private aiohttp method
    is overridden.

    Requests through an HTTP proxy are refused: the proxy would resolve and dial the
    upstream, and the guard would only ever see the proxy's address.
    """

    def __init__(
        self,
        *,
        allow_private_networks: bool,
        forbidden_ports: AbstractSet[int] = frozenset(),
        resolver: AbstractResolver | None = None,
        **kwargs: Any,
    ) -> None:
        if "socket_factory" in kwargs:
            raise TypeError("GuardedConnector installs its own socket_factory")
        policy = AddressPolicy(allow_private_networks, forbidden_ports)
        self._guarded_resolver = GuardedResolver(
            allow_private_networks=allow_private_networks,
            forbidden_ports=forbidden_ports,
            inner=resolver,
        )
        super().__init__(
            resolver=self._guarded_resolver, socket_factory=policy.open_socket, **kwargs
        )

    async def connect(
        self,
        req: aiohttp.ClientRequest,
        traces: list[Trace],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 (BaseConnector.connect's signature)
    ) -> Connection:
        if req.proxy is not None:
            raise aiohttp.ClientConnectionError(
                "upstream guard: requests through an HTTP proxy are not supported"
            )
        return await super().connect(req, traces, timeout)

    async def close(self, *, abort_ssl: bool = False) -> None:
        await super().close(abort_ssl=abort_ssl)
        await self._guarded_resolver.close()


# --- Redirects ---------------------------------------------------------------------------

_REDIRECTS = frozenset({301, 302, 303, 307, 308})


async def refuse_redirected_upgrades(
    request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
) -> aiohttp.ClientResponse:
    """Client middleware: a WebSocket upgrade answered with a redirect fails, unfollowed.

    Plain requests are sent with ``allow_redirects=False``, but ``ClientSession.ws_connect``
    has no such option and follows redirects, which may point anywhere the guard allows: an
    upstream could bounce the proxy to any other public host, or any private one when private
    networks are allowed.
    """
    response = await handler(request)
    upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
    if upgrade and response.status in _REDIRECTS:
        response.release()
        raise aiohttp.ClientResponseError(
            response.request_info,
            response.history,
            status=response.status,
            message="upstream guard: a WebSocket upgrade was redirected",
        )
    return response
