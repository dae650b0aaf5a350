"""WebSocket sessions under /v1 (the Realtime API, the Responses API's WebSocket mode).

The caller's upgrade is accepted only once the upstream accepted ours, so a refused
upstream becomes an ordinary HTTP error. Frames then pass both ways as they come, and
when either side closes, the other is closed too.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web
from yarl import URL

from ..errors import ApiError
from ..log import upstream_log
from ..pool import NoKeyAvailable, Outcome
from ..pool.health import Verdict, classify_response
from ..state import Services
from .access import add_exchange_headers
from .exchange import Exchange
from .forward import upstream_tail
from .headers import upstream_request_headers

# Headers of the caller's upgrade that must not be replayed: aiohttp writes its own
# handshake (key, version, extensions) for the upstream connection.
# Set by aiohttp for its own handshake; the protocol list is rebuilt by _upstream_protocols.
_HANDSHAKE = frozenset(
    (
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-accept",
        "sec-websocket-protocol",
    )
)

# The largest WebSocket message either side may send. A message is held whole before it is
# passed on, so without a bound one side could fill the proxy's memory; Realtime API
# messages (events, base64 audio of a second or so) are far smaller. Past it the session
# closes with 1009 (message too big).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

_CALLER_PROTOCOL_PREFIXES = (
    "openai-insecure-api-key.",
    "openai-organization.",
    "openai-project.",
)


async def relay_websocket(
    request: web.BaseRequest, services: Services, exchange: Exchange
) -> web.StreamResponse:
    try:
        key = services.pool.choose(exchange.model, exchange.principal.user.id, set(), time.time())
    except NoKeyAvailable as exc:
        raise ApiError(exc.status, exc.message, code=exc.code) from None
    exchange.key = key
    exchange.attempts = 1
    headers = [
        (name, value)
        for name, value in upstream_request_headers(request, key.auth_header)
        if name.lower() not in _HANDSHAKE
    ]
    protocols = _upstream_protocols(request.headers.get("Sec-WebSocket-Protocol", ""))
    url = URL(key.base_url + upstream_tail(request), encoded=True)
    key.begin()
    try:
        try:
            upstream = await services.websockets.connect(
                url,
                headers=headers,
                protocols=protocols,
                autoping=False,
                max_msg_size=MAX_MESSAGE_BYTES,
            )
        except aiohttp.WSServerHandshakeError as exc:
            # The refusal's body is not kept by aiohttp: judged by status and headers.
            verdict = classify_response(exc.status, exc.headers or {}, b"")
            services.pool.record(key, verdict, f"HTTP {exc.status} on upgrade", time.time())
            # A 401 is about the pooled key, not the caller's token.
            raise ApiError(
                502 if exc.status >= 500 or exc.status == 401 else exc.status,
                f"The upstream refused the WebSocket upgrade ({exc.status}).",
                code="upstream_error",
            ) from None
        except (TimeoutError, aiohttp.ClientError, OSError):
            services.pool.record(key, Verdict(Outcome.SERVER_ERROR), "cannot connect", time.time())
            raise ApiError(
                502, "Cannot connect to the upstream WebSocket.", code="upstream_error"
            ) from None
        async with upstream:
            caller = web.WebSocketResponse(
                protocols=[upstream.protocol] if upstream.protocol else (),
                autoping=False,
                max_msg_size=MAX_MESSAGE_BYTES,
            )
            add_exchange_headers(request, caller, exchange)
            await caller.prepare(request)
            exchange.status = 101
            await _pump_both_ways(caller, upstream)
            return caller
    finally:
        key.end()


def _upstream_protocols(offered: str) -> list[str]:
    """The caller's subprotocols minus those carrying the caller's credentials or account.

    Browsers cannot set headers on a WebSocket, so OpenAI's Realtime API also takes the key,
    organization and project as subprotocols. Here they would hold the caller's pool token;
    like the matching headers, they stay behind and the pooled key's header goes instead.
    """
    protocols = [p.strip() for p in offered.split(",") if p.strip()]
    return [p for p in protocols if not p.lower().startswith(_CALLER_PROTOCOL_PREFIXES)]


async def _pump_both_ways(caller: web.WebSocketResponse, upstream: Any) -> None:
    to_upstream = asyncio.ensure_future(_pump(caller, upstream))
    to_caller = asyncio.ensure_future(_pump(upstream, caller))
    try:
        await asyncio.wait({to_upstream, to_caller}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (to_upstream, to_caller):
            task.cancel()
        await asyncio.gather(to_upstream, to_caller, return_exceptions=True)
        await caller.close()
        await upstream.close()


async def _pump(source: Any, sink: Any) -> None:
    """Copy frames from one side to the other until a close frame or an error."""
    async for message in source:
        kind = message.type
        if kind == WSMsgType.TEXT:
            await sink.send_str(message.data)
        elif kind == WSMsgType.BINARY:
            await sink.send_bytes(message.data)
        elif kind == WSMsgType.PING:
            await sink.ping(message.data)
        elif kind == WSMsgType.PONG:
            await sink.pong(message.data)
        elif kind in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
            break
    upstream_log.debug("websocket side closed")
