"""The proxy port's aiohttp application."""

from __future__ import annotations

from aiohttp import web

from ..errors import ApiError, error_middleware
from ..state import SERVICES, Services
from . import forward, models


async def _not_v1(request: web.Request) -> web.StreamResponse:
    raise ApiError(
        404,
        f"Unknown request URL: {request.method} {request.path}. The proxy"
        " serves the OpenAI API under /v1.",
        code="unknown_url",
    )


def build_proxy_app(services: Services) -> web.Application:
    # client_max_size is enforced by our own bounded body reader (413 in the envelope).
    app = web.Application(
        middlewares=[error_middleware],
        client_max_size=services.settings.proxy.max_body_mb * 1024 * 1024,
    )
    app[SERVICES] = services
    app.router.add_get("/v1/models", models.list_models)
    app.router.add_get("/v1/models/{model:.+}", models.get_model)
    app.router.add_route("*", "/v1/{tail:.*}", forward.handle)
    app.router.add_route("*", "/{tail:.*}", _not_v1)
    return app
