"""WebSocket sessions with upstreams (the Realtime API), opened with aiohttp's client.

Plain requests go through ``UpstreamClient``; a WebSocket needs a client that speaks the
protocol after the upgrade, and aiohttp's does. The rules stay the same as for plain
requests: every address dialled passes the guard, and ``wss://`` upstreams go through the
forward proxy when one is set, in a CONNECT tunnel (TLS stays end to end).
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from typing import Any

import aiohttp
from aiohttp.tracing import Trace
from yarl import URL

from .. import netguard
from .client import UpstreamClient
from .errors import UpstreamError


class WebSocketDialer:
    """Opens WebSocket sessions to upstreams: directly under the guard, or through the
    forward proxy.

    Cookies are never kept (they would leak between callers), proxies from the environment
    are ignored, and no total timeout cuts a long session. ``ws_connect`` has no
    ``allow_redirects`` switch, so a client middleware refuses redirected upgrades.
    """

    def __init__(
        self,
        upstream: UpstreamClient,
        *,
        allow_private_networks: bool,
        forbidden_ports: AbstractSet[int],
        connect_timeout: float,
        read_timeout: float,
    ) -> None:
        self._upstream = upstream
        timeout = aiohttp.ClientTimeout(
            total=None, connect=None, sock_connect=connect_timeout, sock_read=read_timeout
        )
        direct = netguard.GuardedConnector(
            allow_private_networks=allow_private_networks,
            forbidden_ports=forbidden_ports,
            limit=0,
            ttl_dns_cache=10,
            enable_cleanup_closed=False,
        )
        self._direct = _session(direct, timeout)
        self._proxy_url: URL | None = None
        self._proxy_headers: dict[str, str] = {}
        self._proxied: aiohttp.ClientSession | None = None
        proxy = upstream.proxy  # the same one plain requests go through
        if proxy is not None:
            self._proxy_url = URL.build(scheme="http", host=proxy.host, port=proxy.port)
            if proxy.authorization is not None:
                self._proxy_headers["Proxy-Authorization"] = proxy.authorization
            tunnels = _ProxyOnlyConnector(self._proxy_url, limit=0, enable_cleanup_closed=False)
            self._proxied = _session(tunnels, timeout)

    async def connect(self, url: URL, **kwargs: Any) -> aiohttp.ClientWebSocketResponse:
        """``ws_connect`` to ``url``; raises aiohttp's errors (the guard's included)."""
        kwargs["ssl"] = self._upstream.ssl_context
        # The relay asks for the key's https:// base URL; wss:// means the same.
        if self._proxied is None or url.scheme not in ("https", "wss"):
            return await self._direct.ws_connect(url, **kwargs)
        try:
            # The proxy resolves the name; the guard judges what it resolves to here.
            await self._upstream.check_proxied_host(url.raw_host or "", url.port or 443)
        except UpstreamError:
            raise aiohttp.ClientConnectionError("upstream guard refused the host") from None
        return await self._proxied.ws_connect(
            url, proxy=self._proxy_url, proxy_headers=self._proxy_headers, **kwargs
        )

    async def close(self) -> None:
        await self._direct.close()
        if self._proxied is not None:
            await self._proxied.close()


def _session(
    connector: aiohttp.BaseConnector, timeout: aiohttp.ClientTimeout
) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
        skip_auto_headers=("User-Agent",),
        middlewares=(netguard.refuse_redirected_upgrades,),
    )


class _ProxyOnlyConnector(aiohttp.TCPConnector):
    """A connector that dials the operator's forward proxy and nothing else.

    The upstream itself is dialled by the proxy, so the guard's address checks cannot run
    here; ``WebSocketDialer.connect`` judges the host before asking for the tunnel.
    """

    def __init__(self, proxy_url: URL, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._proxy_url = proxy_url

    async def connect(
        self,
        req: aiohttp.ClientRequest,
        traces: list[Trace],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 (BaseConnector.connect's signature)
    ) -> aiohttp.connector.Connection:
        if req.proxy != self._proxy_url or not req.is_ssl():
            raise aiohttp.ClientConnectionError("only TLS upstreams through the forward proxy")
        return await super().connect(req, traces, timeout)
