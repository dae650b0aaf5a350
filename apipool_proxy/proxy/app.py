"""The proxy port: one handler for everything it is asked, on aiohttp's low-level server.

The port serves a single URL space (/v1), so it has no Application and no router: matching
routes and building an Application's request cost every request about as much as all of the
pool's bookkeeping together, for nothing. ``handle`` routes by hand instead.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..errors import ApiError
from ..state import Services
from . import forward, models
from .access import accounted


async def _not_v1(request: web.BaseRequest, services: Services) -> web.StreamResponse:
    raise ApiError(
        404,
        f"Unknown request URL: {request.method} {request.path}. The proxy"
        " serves the OpenAI API under /v1.",
        code="unknown_url",
    )


async def _v1(request: web.BaseRequest, services: Services) -> web.StreamResponse:
    # aiohttp decodes the path, so "/v%31/chat/completions" and absolute-form targets
    # ("http://host/v1/...") land here too. The upstream URL is the key's base URL followed
    # by the raw path minus its first three characters, so anything but a literal "/v1/" in
    # front would be glued onto the base URL's path.
    if not request.raw_path.startswith("/v1/"):
        raise ApiError(400, "The request path must start with /v1/.", code="invalid_path")
    if request.method == "GET":
        path = request.path
        if path == "/v1/models":
            return await models.list_models(request, services)
        if path.startswith("/v1/models/") and len(path) > len("/v1/models/"):
            return await models.get_model(request, services)
    return await forward.handle(request, services)


def build_proxy_server(services: Services, **kwargs: Any) -> web.Server:
    """The proxy port's server; ``kwargs`` go to aiohttp's request handler."""

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        # The decoded path decides, as a router would; a decoded newline (%0A) included.
        handler = _v1 if request.path.startswith("/v1/") else _not_v1
        return await accounted(request, services, handler)

    return web.Server(handle, **kwargs)
