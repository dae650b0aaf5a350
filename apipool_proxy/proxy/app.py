"""The proxy port's aiohttp application."""

from __future__ import annotations

from aiohttp import web

from ..errors import ApiError
from ..state import SERVICES, Services
from . import forward, models
from .access import accounted


async def _not_v1(request: web.Request) -> web.StreamResponse:
    raise ApiError(
        404,
        f"Unknown request URL: {request.method} {request.path}. The proxy"
        " serves the OpenAI API under /v1.",
        code="unknown_url",
    )


async def _route(request: web.Request) -> web.StreamResponse:
    # One route for all of /v1: matching a single pattern is cheaper per request than
    # trying several, and the two model views are told apart here.
    if request.method == "GET":
        path = request.path
        if path == "/v1/models":
            return await models.list_models(request)
        if path.startswith("/v1/models/") and len(path) > len("/v1/models/"):
            return await models.get_model(request)
    return await _forward(request)


async def _forward(request: web.Request) -> web.StreamResponse:
    # aiohttp routes on the decoded path, so "/v%31/chat/completions" and absolute-form
    # targets ("http://host/v1/...") land here too. The upstream URL is the key's base URL
    # followed by the raw path minus its first three characters, so anything but a literal
    # "/v1/" in front would be glued onto the base URL and could change its host or port.
    if not request.raw_path.startswith("/v1/"):
        raise ApiError(400, "The request path must start with /v1/.", code="invalid_path")
    return await forward.handle(request)


def build_proxy_app(services: Services) -> web.Application:
    # client_max_size is enforced by our own bounded body reader (413 in the envelope).
    # No middlewares: ``accounted`` wraps each handler with the error envelope and the
    # access line, so it logs the status the caller really got.
    app = web.Application(client_max_size=services.settings.proxy.max_body_mb * 1024 * 1024)
    app[SERVICES] = services
    # [\s\S]: any character, newlines included (a decoded %0A), so that no path can fall
    # through to aiohttp's own plain-text 404.
    app.router.add_route("*", r"/v1/{tail:[\s\S]*}", accounted(_route))
    app.router.add_route("*", r"/{tail:[\s\S]*}", accounted(_not_v1))
    return app
