import asyncio
import ipaddress
import socket
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from apipool_proxy.netguard import (
    GuardedConnector,
    GuardedResolver,
    UnresolvableHostError,
    UnsafeUpstreamError,
    check_upstream_host,
    is_public_address,
    normalize_base_url,
)

REJECTED_WITHOUT_PRIVATE = [
    "http://169.254.169.254/latest/meta-data",
    "https://169.254.169.254",
    "https://127.0.0.1:8081",
    "https://[::1]/v1",
    "https://0x7f000001/v1",
    "https://2130706433/v1",
    "https://0177.0.0.1/",
    "https://127.1/",
    "https://0x7f.1/",
    "https://[::ffff:127.0.0.1]/v1",
    "https://[::ffff:7f00:1]/",
    "https://10.0.0.1/",
    "https://100.64.0.1/",
    "https://100.100.100.200/",
    "https://0.0.0.0/",
    "https://[::]/",
    "https://[fe80::1%25eth0]/",
    "https://[fd00:ec2::254]/",
    "https://[2002:a00:1::]/",
    "https://[64:ff9b::7f00:1]/",
    "https://１２７.０.０.１/v1",
    "file:///etc/passwd",
    "gopher://x/",
    "ftp://api.openai.com/v1",
    "data:text/plain,hi",
    "api.openai.com/v1",
    "http://user@api.openai.com/v1",
    "https://user:pw@api.openai.com/v1",
    "https://localhost/v1",
    "https://localhost./v1",
    "https://api.localhost/v1",
    "https://printer.local/v1",
    "https://vault.internal/v1",
    "https://metadata.google.internal/computeMetadata/v1",
    "https://intranet/v1",
    "https://api.openai.com/v1\r\nX: y",
    "https://api.openai.com/v1\t",
    "https://api.openai.com/v1\x00",
    "https://api.openai.com/v1\x85",
    "https://api.openai.com /v1",
    "https://api.openai.com\\@127.0.0.1/v1",
    "http://api.openai.com/v1",
    "https://api.openai.com/v1?x=1",
    "https://api.openai.com/v1?",
    "https://api.openai.com/v1#frag",
    "https://api.openai.com:0/v1",
    "https://api.openai.com:65536/v1",
    "https://api.openai.com:/v1",
    "https:///v1",
    "https://1.2.3.4.5/",
    "https://256.0.0.1/",
    "https://08.0.0.1/",
    "https://example.0x/",
    "https://api.openai.com/v1/../admin",
    "https://" + "a" * 2048 + ".com/",
]

# Refused whatever the operator allows: no LLM API lives at these.
REJECTED_ALWAYS = [
    "http://169.254.169.254/latest/meta-data",
    "http://[::ffff:169.254.169.254]/",
    "http://metadata.google.internal/",
    "http://user:pw@127.0.0.1:8000/v1",
    "http://[fe80::1%25eth0]:8000/",
    "file:///etc/passwd",
    "http://127.0.0.1:8000/v1?x=1",
    "http://127.1.2.3.4/",
]

ACCEPTED = [
    ("https://API.OpenAI.com/v1/", False, "https://api.openai.com/v1"),
    ("https://openrouter.ai/api/v1", False, "https://openrouter.ai/api/v1"),
    ("https://api.openai.com:443/v1", False, "https://api.openai.com/v1"),
    ("HTTPS://api.openai.com.:8443/v1//", False, "https://api.openai.com:8443/v1"),
    ("https://api.openai.com", False, "https://api.openai.com"),
    ("https://bücher.example/v1", False, "https://xn--bcher-kva.example/v1"),
    ("https://134744072/v1", False, "https://8.8.8.8/v1"),
    ("https://[2606:4700:4700:0::1111]/v1", False, "https://[2606:4700:4700::1111]/v1"),
    ("https://[64:ff9b::808:808]/v1", False, "https://[64:ff9b::808:808]/v1"),
    ("http://127.0.0.1:8000/v1", True, "http://127.0.0.1:8000/v1"),
    ("http://0x7f000001:8000/v1", True, "http://127.0.0.1:8000/v1"),
    ("http://vllm.internal:80/v1/", True, "http://vllm.internal/v1"),
    ("http://[::1]:8000/v1", True, "http://[::1]:8000/v1"),
]


@pytest.mark.parametrize("url", REJECTED_WITHOUT_PRIVATE)
def test_unsafe_base_url_is_rejected(url: str) -> None:
    with pytest.raises(UnsafeUpstreamError):
        normalize_base_url(url, allow_private_networks=False)


@pytest.mark.parametrize("url", REJECTED_ALWAYS)
def test_unsafe_base_url_is_rejected_even_with_private_networks(url: str) -> None:
    with pytest.raises(UnsafeUpstreamError):
        normalize_base_url(url, allow_private_networks=True)


@pytest.mark.parametrize(("url", "allow_private", "expected"), ACCEPTED)
def test_safe_base_url_is_normalised(url: str, allow_private: bool, expected: str) -> None:
    assert normalize_base_url(url, allow_private_networks=allow_private) == expected


@pytest.mark.parametrize("url", [normalized for _, _, normalized in ACCEPTED])
def test_normalising_is_idempotent(url: str) -> None:
    assert normalize_base_url(url, allow_private_networks=True) == url


def test_non_string_base_url_is_rejected() -> None:
    not_a_string: Any = b"https://api.openai.com/v1"
    with pytest.raises(UnsafeUpstreamError):
        normalize_base_url(not_a_string, allow_private_networks=False)


@pytest.mark.parametrize(
    "url",
    [
        "https://user:hunter2@api.openai.com/v1",
        "http://user:hunter2@127.0.0.1/v1",
        "user:hunter2@api.openai.com/v1",
        "https://user:hunter2@api.openai.com/v1?key=hunter2",
        "https://user:hunter2@api.openai.com/v1#hunter2",
        "https://user:hunter2@[::1]/",
        "https://api.openai.com/hunter2/\r\n",
    ],
)
@pytest.mark.parametrize("allow_private", [False, True])
def test_error_message_never_repeats_credentials(url: str, allow_private: bool) -> None:
    with pytest.raises(UnsafeUpstreamError) as caught:
        normalize_base_url(url, allow_private_networks=allow_private)
    message = str(caught.value)
    assert "hunter2" not in message
    assert "\n" not in message and "\r" not in message


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("1.1.1.1", True),
        ("2606:4700:4700::1111", True),
        ("64:ff9b::808:808", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("169.254.170.2", False),
        ("100.64.0.1", False),
        ("100.100.100.200", False),
        ("168.63.129.16", False),
        ("0.0.0.0", False),
        ("0.1.2.3", False),
        ("224.0.0.1", False),
        ("239.255.255.250", False),
        ("255.255.255.255", False),
        ("240.0.0.1", False),
        ("192.0.0.1", False),
        ("192.0.2.1", False),
        ("198.18.0.1", False),
        ("198.51.100.1", False),
        ("203.0.113.1", False),
        ("::", False),
        ("::1", False),
        ("::ffff:8.8.8.8", False),
        ("::ffff:127.0.0.1", False),
        ("::127.0.0.1", False),
        ("fc00::1", False),
        ("fd00:ec2::254", False),
        ("fe80::1", False),
        ("fe80::1%eth0", False),
        ("fec0::1", False),
        ("ff02::1", False),
        ("64:ff9b::a00:1", False),
        ("64:ff9b::a9fe:a9fe", False),
        ("64:ff9b:1::808:808", False),
        ("2002:a00:1::1", False),
        ("2002:7f00:1::1", False),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False),
        ("2001:db8::1", False),
        ("3fff::1", False),
        ("100::1", False),
    ],
)
def test_is_public_address(address: str, public: bool) -> None:
    assert is_public_address(ipaddress.ip_address(address)) is public


# --- Resolving ---------------------------------------------------------------------------


class StubResolver(AbstractResolver):
    """Answers each lookup with the next list of addresses; the last answer repeats."""

    def __init__(self, *answers: Sequence[str], error: OSError | None = None) -> None:
        self.answers = answers
        self.error = error
        self.calls = 0
        self.closed = False

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.calls += 1
        if self.error is not None:
            raise self.error
        answer = self.answers[min(self.calls, len(self.answers)) - 1]
        return [_result(host, address, port) for address in answer]

    async def close(self) -> None:
        self.closed = True


def _result(host: str, address: str, port: int) -> ResolveResult:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    return ResolveResult(hostname=host, host=address, port=port, family=family, proto=0, flags=0)


async def test_check_upstream_host_accepts_public_addresses() -> None:
    resolver = StubResolver(["8.8.8.8", "2606:4700:4700::1111"])
    await check_upstream_host(
        "https://api.example.com/v1",
        allow_private_networks=False,
        forbidden_ports={8080, 8081},
        resolver=resolver,
    )
    assert resolver.calls == 1
    assert not resolver.closed  # the caller's resolver stays the caller's


@pytest.mark.parametrize(
    "answer",
    [["10.0.0.1"], ["8.8.8.8", "127.0.0.1"], ["::1"], ["169.254.169.254"], ["fe80::1%eth0"]],
)
async def test_check_upstream_host_rejects_any_private_answer(answer: list[str]) -> None:
    with pytest.raises(UnsafeUpstreamError, match="api.example.com"):
        await check_upstream_host(
            "https://api.example.com/v1",
            allow_private_networks=False,
            forbidden_ports=set(),
            resolver=StubResolver(answer),
        )


async def test_check_upstream_host_reports_resolution_failure() -> None:
    resolver = StubResolver(error=socket.gaierror(socket.EAI_NONAME, "Name or service not known"))
    with pytest.raises(UnresolvableHostError, match="cannot resolve host api.example.com"):
        await check_upstream_host(
            "https://api.example.com/v1",
            allow_private_networks=False,
            forbidden_ports=set(),
            resolver=resolver,
        )


async def test_check_upstream_host_reports_empty_answer() -> None:
    with pytest.raises(UnresolvableHostError, match="cannot resolve host"):
        await check_upstream_host(
            "https://api.example.com/v1",
            allow_private_networks=False,
            forbidden_ports=set(),
            resolver=StubResolver([]),
        )


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8081/v1",
        "http://127.9.9.9:8081/v1",
        "http://0.0.0.0:8081/v1",
        "http://0x7f000001:8081/v1",
        "http://[::]:8081/v1",
        "http://[::1]:8081/v1",
        "http://[::ffff:127.0.0.1]:8081/v1",
        "http://localhost:8081/v1",
    ],
)
async def test_check_upstream_host_refuses_own_port_even_with_private_networks(url: str) -> None:
    # "localhost" goes through the real ThreadedResolver, which answers from /etc/hosts.
    with pytest.raises(UnsafeUpstreamError, match="port of this proxy"):
        await check_upstream_host(url, allow_private_networks=True, forbidden_ports={8080, 8081})


async def test_check_upstream_host_refuses_name_resolving_to_own_port() -> None:
    with pytest.raises(UnsafeUpstreamError, match=r"resolves to 127\.0\.0\.1"):
        await check_upstream_host(
            "http://vllm.example.com:8081/v1",
            allow_private_networks=True,
            forbidden_ports={8081},
            resolver=StubResolver(["127.0.0.1"]),
        )


async def test_check_upstream_host_allows_local_model_on_other_port() -> None:
    await check_upstream_host(
        "http://127.0.0.1:8000/v1", allow_private_networks=True, forbidden_ports={8080, 8081}
    )


async def test_check_upstream_host_rejects_unnormalised_unsafe_url() -> None:
    with pytest.raises(UnsafeUpstreamError):
        await check_upstream_host(
            "https://0x7f000001/v1", allow_private_networks=False, forbidden_ports=set()
        )


async def test_guarded_resolver_refuses_dns_rebinding() -> None:
    inner = StubResolver(["93.184.215.14"], ["127.0.0.1"])
    resolver = GuardedResolver(allow_private_networks=False, inner=inner)

    first = await resolver.resolve("api.example.com", 443, socket.AF_UNSPEC)
    assert [result["host"] for result in first] == ["93.184.215.14"]
    with pytest.raises(OSError, match="127.0.0.1 is not a public address"):
        await resolver.resolve("api.example.com", 443, socket.AF_UNSPEC)
    assert inner.calls == 2


async def test_guarded_resolver_drops_only_refused_addresses() -> None:
    inner = StubResolver(["10.0.0.1", "93.184.215.14", "::1", "169.254.169.254"])
    resolver = GuardedResolver(allow_private_networks=False, inner=inner)
    results = await resolver.resolve("api.example.com", 443, socket.AF_UNSPEC)
    assert [result["host"] for result in results] == ["93.184.215.14"]


async def test_guarded_resolver_with_private_networks_drops_own_port_and_metadata() -> None:
    inner = StubResolver(["127.0.0.1", "10.0.0.5", "169.254.169.254"])
    resolver = GuardedResolver(allow_private_networks=True, forbidden_ports={8081}, inner=inner)

    on_own_port = await resolver.resolve("vllm.example.com", 8081, socket.AF_UNSPEC)
    assert [result["host"] for result in on_own_port] == ["10.0.0.5"]
    elsewhere = await resolver.resolve("vllm.example.com", 8000, socket.AF_UNSPEC)
    assert [result["host"] for result in elsewhere] == ["127.0.0.1", "10.0.0.5"]


async def test_guarded_resolver_raises_oserror_when_answer_is_empty() -> None:
    resolver = GuardedResolver(allow_private_networks=True, inner=StubResolver([]))
    with pytest.raises(OSError, match="no address"):
        await resolver.resolve("api.example.com", 443)


async def test_guarded_resolver_close_closes_inner() -> None:
    inner = StubResolver(["8.8.8.8"])
    await GuardedResolver(allow_private_networks=False, inner=inner).close()
    assert inner.closed


# --- A real loopback upstream ------------------------------------------------------------


@dataclass
class CountingServer:
    port: int
    connections: int = 0


@pytest.fixture
async def upstream() -> AsyncIterator[CountingServer]:
    """A loopback HTTP server that counts TCP connections, not just requests."""
    server_state = CountingServer(port=0)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server_state.connections += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    server_state.port = server.sockets[0].getsockname()[1]
    async with server:
        yield server_state


async def _get(url: str, connector: aiohttp.BaseConnector, **kwargs: object) -> str:
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(url, **kwargs) as response:  # type: ignore[arg-type]
            return await response.text()


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "[::ffff:127.0.0.1]", "localhost", "0x7f000001", "127.1"]
)
async def test_connector_refuses_loopback_without_private_networks(
    upstream: CountingServer, host: str
) -> None:
    # aiohttp itself refuses "127.1" as a non-canonical IPv4 literal (InvalidUrlClientError);
    # every other spelling reaches the guard and fails as ClientConnectorError.
    connector = GuardedConnector(allow_private_networks=False)
    with pytest.raises(aiohttp.ClientError):
        await _get(f"http://{host}:{upstream.port}/v1/models", connector)
    assert upstream.connections == 0


async def test_connector_guards_ip_literals_that_skip_the_resolver(
    upstream: CountingServer,
) -> None:
    # aiohttp dials IP literals without asking the resolver; the socket factory still refuses.
    inner = StubResolver(["8.8.8.8"])
    connector = GuardedConnector(allow_private_networks=False, resolver=inner)
    with pytest.raises(aiohttp.ClientConnectorError, match="upstream guard"):
        await _get(f"http://127.0.0.1:{upstream.port}/v1/models", connector)
    assert inner.calls == 0
    assert upstream.connections == 0
    assert inner.closed  # closing the session closed the connector and its resolver


async def test_connector_refuses_name_rebound_to_loopback(upstream: CountingServer) -> None:
    connector = GuardedConnector(allow_private_networks=False, resolver=StubResolver(["127.0.0.1"]))
    with pytest.raises(aiohttp.ClientConnectorDNSError):
        await _get(f"http://api.example.com:{upstream.port}/v1/models", connector)
    assert upstream.connections == 0


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "vllm.example.com"])
async def test_connector_allows_loopback_with_private_networks(
    upstream: CountingServer, host: str
) -> None:
    connector = GuardedConnector(
        allow_private_networks=True, forbidden_ports={1}, resolver=StubResolver(["127.0.0.1"])
    )
    assert await _get(f"http://{host}:{upstream.port}/v1/models", connector) == "ok"
    assert upstream.connections == 1


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "vllm.example.com"])
async def test_connector_refuses_own_port_with_private_networks(
    upstream: CountingServer, host: str
) -> None:
    connector = GuardedConnector(
        allow_private_networks=True,
        forbidden_ports={upstream.port},
        resolver=StubResolver(["127.0.0.1"]),
    )
    with pytest.raises(aiohttp.ClientConnectorError):
        await _get(f"http://{host}:{upstream.port}/v1/models", connector)
    assert upstream.connections == 0


async def test_connector_refuses_requests_through_a_proxy(upstream: CountingServer) -> None:
    connector = GuardedConnector(allow_private_networks=True)
    with pytest.raises(aiohttp.ClientConnectionError, match="proxy"):
        await _get(
            "http://api.example.com/v1/models",
            connector,
            proxy=f"http://127.0.0.1:{upstream.port}",
        )
    assert upstream.connections == 0


async def test_connector_keeps_its_own_socket_factory() -> None:
    with pytest.raises(TypeError):
        GuardedConnector(allow_private_networks=False, socket_factory=socket.socket)
