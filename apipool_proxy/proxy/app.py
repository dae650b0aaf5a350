"""The proxy port's aiohttp application."""

from __future__ import annotations

from aiohttp import web

from ..errors import ApiError, error_middleware
from ..state import SERVICES, Services
from . import forward, models
from .access import access_middleware, add_exchange_headers


async def _not_v1(request: web.Request) -> web.StreamResponse:
    raise ApiError(
        404,
        f"Unknown request URL: {request.method} {request.path}. The proxy"
        " serves the OpenAI API under /v1.",
        code="unknown_url",
    )


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
    # The access middleware is outermost: it sees the status error_middleware answered with.
    app = web.Application(
        middlewares=[access_middleware, error_middleware],
        client_max_size=services.settings.proxy.max_body_mb * 1024 * 1024,
    )
    app[SERVICES] = services
    app.on_response_prepare.append(add_exchange_headers)
    app.router.add_get("/v1/models", models.list_models)
    app.router.add_get("/v1/models/{model:.+}", models.get_model)
    app.router.add_route("*", "/v1/{tail:.*}", _forward)
    app.router.add_route("*", "/{tail:.*}", _not_v1)
    return app
