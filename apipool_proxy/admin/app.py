"""The admin port's aiohttp application: accounts, tokens, keys, usage, operations."""

from __future__ import annotations

from aiohttp import web

from .. import SERVER_NAME
from ..errors import ApiError, Handler, error_middleware
from ..state import SERVICES, Services
from . import views

ADMIN_BODY_LIMIT = 1024 * 1024


@web.middleware
async def refuse_web_pages(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse changes asked for by a web page: the admin port's clients are the CLI, the SDK
    and scripts, which send no Origin header, while browsers send one with every request
    that is not a GET or HEAD.

    Without this, a page could register accounts and log in on a server that listens on
    the visitor's own machine, by pointing its name at 127.0.0.1 (DNS rebinding), or post
    forms to it from any site.
    """
    if "Origin" in request.headers and request.method not in ("GET", "HEAD"):
        raise ApiError(
            403,
            "The admin port does not take requests from web pages.",
            code="web_page_refused",
        )
    return await handler(request)


def build_admin_app(services: Services) -> web.Application:
    app = web.Application(
        middlewares=[error_middleware, refuse_web_pages], client_max_size=ADMIN_BODY_LIMIT
    )
    app[SERVICES] = services
    app.on_response_prepare.append(_name_the_server)
    add = app.router.add_route
    add("POST", "/api/register", views.register)
    add("POST", "/api/login", views.login)
    add("POST", "/api/logout", views.logout)
    add("GET", "/api/me", views.me)
    add("GET", "/api/keys", views.list_keys)
    add("POST", "/api/keys", views.add_key)
    add("PATCH", "/api/keys/{id}", views.update_key)
    add("DELETE", "/api/keys/{id}", views.delete_key)
    add("POST", "/api/keys/{id}/check", views.check_key)
    add("GET", "/api/tokens", views.list_tokens)
    add("POST", "/api/tokens", views.create_token)
    add("DELETE", "/api/tokens/{id}", views.revoke_token)
    add("GET", "/api/usage", views.usage)
    add("GET", "/api/info", views.info)
    add("GET", "/api/admin/users", views.admin_users)
    add("PATCH", "/api/admin/users/{id}", views.admin_update_user)
    add("GET", "/api/admin/pool", views.admin_pool)
    add("POST", "/api/admin/keys/{id}/approve", views.admin_approve_key)
    add("GET", "/healthz", views.healthz)
    add("GET", "/readyz", views.readyz)
    add("GET", "/metrics", views.metrics)
    add("*", "/v1/{tail:.*}", views.wrong_port)
    return app


async def _name_the_server(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = SERVER_NAME
