"""The admin port's aiohttp application: accounts, tokens, keys, usage, operations."""

from __future__ import annotations

from aiohttp import web

from ..errors import error_middleware
from ..state import SERVICES, Services
from . import views

ADMIN_BODY_LIMIT = 1024 * 1024


def build_admin_app(services: Services) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=ADMIN_BODY_LIMIT)
    app[SERVICES] = services
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
    return app
