"""The proxy port: one handler for everything it is asked, on aiohttp's low-level server.

The port serves a single URL space (/v1), so it has no Application and no router: matching
routes and building an Application's request cost every request about as much as all of the
pool's bookkeeping together, for nothing. ``route`` picks the handler by hand instead, and
the handler is awaited directly: every coroutine between the server and the upstream
call is paid for on each suspension and resumption, so the chain is kept short.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ..errors import ApiError, EnvelopeServer, envelope_for
from ..state import Services
from . import forward, models
from .access import add_exchange_headers
from .cors import CorsPolicy, is_preflight
from .exchange import EXCHANGE

# What serves one request on the proxy port, given the process's services.
ProxyHandler = Callable[[web.BaseRequest, Services], Awaitable[web.StreamResponse]]


def route(request: web.BaseRequest) -> ProxyHandler:
    """The handler for a request, by its decoded path as a router would (a decoded newline
    included), then its raw path."""
    path = request.path
    if not path.startswith("/v1/"):
        return _health if path == "/healthz" and request.method in ("GET", "HEAD") else _not_v1
    # aiohttp decodes the path, so "/v%31/chat/completions" and absolute-form targets
    # ("http://host/v1/...") arrive here too. The upstream URL is the key's base URL
    # followed by the raw path minus its first three characters, so anything but a literal
    # "/v1/" in front would be glued onto the base URL's path.
    if not request.raw_path.startswith("/v1/"):
        raise ApiError(400, "The request path must start with /v1/.", code="invalid_path")
    if request.method == "GET":
        if path == "/v1/models":
            return models.list_models
        if path.startswith("/v1/models/") and len(path) > len("/v1/models/"):
            return models.get_model
    return forward.handle


async def _health(request: web.BaseRequest, services: Services) -> web.StreamResponse:
    """For load balancers and orchestrators: 200 while this port takes requests, 503 from
    the start of a shutdown (so traffic moves elsewhere while in-flight requests finish)."""
    if services.draining:
        raise ApiError(503, "The proxy is shutting down.", code="shutting_down")
    try:
        await services.db.ping()
    except Exception:
        raise ApiError(503, "The database does not answer.", code="database_unavailable") from None
    return web.json_response({"status": "ok"})


async def _not_v1(request: web.BaseRequest, services: Services) -> web.StreamResponse:
    if request.path.startswith("/api/"):
        # The CLI or SDK given the proxy port. Its address stays unsaid: the admin port is
        # often private while this one is public.
        raise ApiError(
            404,
            "This is the proxy port of apipool-proxy; accounts, keys and tokens are managed"
            " on the admin port.",
            code="wrong_port",
        )
    raise ApiError(
        404,
        f"Unknown request URL: {request.method} {request.path}. The proxy"
        " serves the OpenAI API under /v1.",
        code="unknown_url",
    )


def build_proxy_server(services: Services, **kwargs: Any) -> web.Server:
    """The proxy port's server; ``kwargs`` go to aiohttp's request handler."""
    cors = CorsPolicy(services.settings.proxy.cors_origins)

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        """Serve a request; errors become the envelope; count and log it once answered."""
        started = time.perf_counter()
        status = 500
        exchange = None
        response: web.StreamResponse
        try:
            try:
                origin = request.headers.get("Origin")
                if origin is not None and cors.enabled and is_preflight(request):
                    response = cors.preflight(request, origin)
                else:
                    if origin is not None:
                        cors.note(request, origin)
                    response = await route(request)(request, services)
            except Exception as exc:
                response = envelope_for(request, exc)
            status = response.status
            exchange = request.get(EXCHANGE)  # set by the handler once it knows who asks
            if not response.prepared:  # streams got these before their first byte
                add_exchange_headers(request, response, exchange)
            return response
        except asyncio.CancelledError:
            status = 499  # the caller went away
            raise
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            latency_ms = (time.perf_counter() - started) * 1000
            if exchange is None:
                exchange = request.get(EXCHANGE)
            # A load balancer's passing health checks would fill the log; failing ones stay.
            if exchange is not None or status != 200 or request.path != "/healthz":
                services.answered.add(request, exchange, status, latency_ms)

    return EnvelopeServer(handle, **kwargs)
