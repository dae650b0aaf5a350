"""Handlers of the admin port: accounts, tokens, upstream keys, usage and the admin API."""

from __future__ import annotations

import json
import time
from typing import Any

from aiohttp import web

from .. import __version__
from ..accounts import LIMIT_NAMES, Principal, Token, User
from ..errors import ApiError
from ..limits import today_start
from ..state import SERVICES, Services
from ..upstream_keys import iso
from .usage_report import usage_report

MAX_JSON_DEPTH = 32


# -- helpers ----------------------------------------------------------------------------------


def services_of(request: web.Request) -> Services:
    return request.app[SERVICES]


async def json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or 400 saying what is wrong with it."""
    raw = await request.read()
    if not raw:
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ApiError(400, "The request body is not valid UTF-8.", code="invalid_body") from None
    except RecursionError:
        raise ApiError(400, "The JSON body is nested too deeply.", code="invalid_json") from None
    except ValueError:
        raise ApiError(400, "The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    if _depth(data) > MAX_JSON_DEPTH:
        raise ApiError(400, "The JSON body is nested too deeply.", code="invalid_json")
    return data


def _depth(value: Any, level: int = 0) -> int:
    if level > MAX_JSON_DEPTH:
        return level
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level + 1)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level + 1)
    return level


def _optional_principal(request: web.Request) -> Principal | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return services_of(request).accounts.authenticate(token.strip())


def principal_of(request: web.Request) -> Principal:
    principal = _optional_principal(request)
    if principal is None:
        raise ApiError(401, "Missing, invalid, expired or revoked token.", code="invalid_token")
    return principal


def admin_of(request: web.Request) -> Principal:
    principal = principal_of(request)
    if not principal.user.is_admin:
        raise ApiError(403, "This needs an admin account.", code="admin_required")
    return principal


def path_id(request: web.Request, name: str = "id") -> int:
    text = request.match_info[name]
    if not text.isdigit() or len(text) > 18:
        raise ApiError(404, f"No object with id {text[:40]!r}.", code="not_found")
    return int(text)


def client_address(request: web.Request) -> str:
    return request.remote or "unknown"


# -- accounts ---------------------------------------------------------------------------------


async def register(request: web.Request) -> web.Response:
    services = services_of(request)
    data = await json_object(request)
    # Sign-ups count against the caller's address; accounts an admin creates do not.
    caller = _optional_principal(request)
    by_admin = caller is not None and caller.user.is_admin
    if not services.settings.auth.open_registration and not by_admin:
        _check_closed_registration(services, data)
    client = None if by_admin else client_address(request)
    user = await services.accounts.register(data.get("username"), data.get("password"), client)
    return web.json_response({"user_id": user.id, "username": user.username}, status=201)


def _check_closed_registration(services: Services, data: dict[str, Any]) -> None:
    # With registration closed an admin creates accounts; the accounts named in
    # auth.admins may still register themselves, so a fresh server can be bootstrapped.
    admins = {name.lower() for name in services.settings.auth.admins}
    username = data.get("username")
    if isinstance(username, str) and username.lower() in admins:
        return
    raise ApiError(
        403,
        "Registration is closed; ask an admin to create your account.",
        code="registration_closed",
    )


async def login(request: web.Request) -> web.Response:
    services = services_of(request)
    data = await json_object(request)
    secret, token = await services.accounts.login(
        data.get("username"), data.get("password"), client_address(request)
    )
    return web.json_response(
        {"token": secret, "user_id": token.user_id, "expires_at": iso(token.expires_at)}
    )


async def logout(request: web.Request) -> web.Response:
    principal = principal_of(request)
    await services_of(request).accounts.logout(principal)
    return web.json_response({"ok": True})


async def me(request: web.Request) -> web.Response:
    user = principal_of(request).user
    return web.json_response(
        {"user_id": user.id, "username": user.username, "is_admin": user.is_admin}
    )


# -- API tokens -------------------------------------------------------------------------------


def describe_token(token: Token) -> dict[str, Any]:
    return {
        "id": token.id,
        "name": token.name,
        "created_at": iso(token.created_at),
        "last_used_at": iso(token.last_used_at),
        "expires_at": iso(token.expires_at),
    }


async def list_tokens(request: web.Request) -> web.Response:
    principal = principal_of(request)
    tokens = services_of(request).accounts.api_tokens(principal.user)
    return web.json_response({"tokens": [describe_token(t) for t in tokens]})


async def create_token(request: web.Request) -> web.Response:
    principal = principal_of(request)
    data = await json_object(request)
    secret, token = await services_of(request).accounts.create_api_token(
        principal.user, data.get("name"), data.get("expires_in_days")
    )
    return web.json_response({**describe_token(token), "token": secret}, status=201)


async def revoke_token(request: web.Request) -> web.Response:
    principal = principal_of(request)
    accounts = services_of(request).accounts
    token = accounts.find_token(principal.user, path_id(request))
    if token is None or token.kind != "api":
        raise ApiError(404, "No API token with that id.", code="token_not_found")
    await accounts.revoke(token)
    return web.Response(status=204)


# -- upstream keys ----------------------------------------------------------------------------


async def list_keys(request: web.Request) -> web.Response:
    principal = principal_of(request)
    keys = services_of(request).keys
    owned = sorted(keys.pool.owned_by(principal.user.id), key=lambda k: k.id)
    now = time.time()
    return web.json_response({"keys": [keys.describe(k, now) for k in owned]})


async def add_key(request: web.Request) -> web.Response:
    principal = principal_of(request)
    services = services_of(request)
    data = await json_object(request)
    key = await services.keys.add(principal.user, data)
    if key.models is None:
        services.tasks.spawn(f"discover-models-key-{key.id}", services.keys.discover(key))
    return web.json_response(services.keys.describe(key), status=201)


async def update_key(request: web.Request) -> web.Response:
    principal = principal_of(request)
    keys = services_of(request).keys
    key = keys.owned(principal.user, path_id(request))
    key = await keys.update(key, await json_object(request))
    return web.json_response(keys.describe(key))


async def check_key(request: web.Request) -> web.Response:
    principal = principal_of(request)
    keys = services_of(request).keys
    key = await keys.check(keys.owned(principal.user, path_id(request)))
    return web.json_response(keys.describe(key))


async def delete_key(request: web.Request) -> web.Response:
    principal = principal_of(request)
    await services_of(request).keys.delete(principal.user, path_id(request))
    return web.Response(status=204)


# -- usage ------------------------------------------------------------------------------------


async def usage(request: web.Request) -> web.Response:
    principal = principal_of(request)
    services = services_of(request)
    await services.writer.flush()  # show the caller everything answered so far
    report = await usage_report(services, principal.user, request.query)
    return web.json_response(report)


# -- admin ------------------------------------------------------------------------------------


def describe_user(services: Services, user: User) -> dict[str, Any]:
    limits = services.limiter.limits_for(user.limits)
    return {
        "user_id": user.id,
        "username": user.username,
        "is_admin": user.is_admin,
        "disabled": user.disabled,
        "created_at": iso(user.created_at),
        "limits": {name: getattr(limits, name) for name in LIMIT_NAMES},
        "limit_overrides": user.limits,
        "keys": len(services.pool.owned_by(user.id)),
    }


async def admin_users(request: web.Request) -> web.Response:
    admin_of(request)
    services = services_of(request)
    users = sorted(services.accounts.users.values(), key=lambda u: u.id)
    return web.json_response({"users": [describe_user(services, u) for u in users]})


async def admin_update_user(request: web.Request) -> web.Response:
    principal = admin_of(request)
    services = services_of(request)
    user = services.accounts.users.get(path_id(request))
    if user is None:
        raise ApiError(404, "No such user.", code="user_not_found")
    data = await json_object(request)
    changes = _user_changes(data)
    if user.id == principal.user.id and (
        changes.get("disabled") or changes.get("is_admin") is False
    ):
        raise ApiError(
            400, "You cannot disable yourself or drop your own admin rights.", code="invalid_value"
        )
    await services.accounts.update_user(user, **changes)
    return web.json_response(describe_user(services, user))


def _user_changes(data: dict[str, Any]) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    for name in ("disabled", "is_admin"):
        if name in data:
            if not isinstance(data[name], bool):
                raise ApiError(
                    400, f"'{name}' must be true or false.", param=name, code="invalid_type"
                )
            changes[name] = data[name]
    if "limits" in data:
        changes["limits"] = _limit_overrides(data["limits"])
    unknown = set(data) - {"disabled", "is_admin", "limits"}
    if unknown:
        name = sorted(unknown)[0]
        raise ApiError(400, f"'{name}' cannot be changed.", param=name, code="invalid_field")
    return changes


def _limit_overrides(value: Any) -> dict[str, int | None]:
    if not isinstance(value, dict):
        raise ApiError(400, "'limits' must be an object.", param="limits", code="invalid_type")
    overrides: dict[str, int | None] = {}
    for name, limit in value.items():
        if name not in LIMIT_NAMES:
            raise ApiError(
                400, f"Unknown limit '{str(name)[:40]}'.", param="limits", code="invalid_field"
            )
        if limit is not None and (
            not isinstance(limit, int) or isinstance(limit, bool) or limit < 1
        ):
            raise ApiError(
                400,
                f"Limit '{name}' must be a positive integer or null.",
                param="limits",
                code="invalid_value",
            )
        overrides[name] = limit
    return overrides


async def admin_pool(request: web.Request) -> web.Response:
    admin_of(request)
    services = services_of(request)
    now = time.time()
    await services.writer.flush()
    today = await services.db.key_usage_since(today_start(now))
    keys = []
    for key in sorted(services.pool, key=lambda k: k.id):
        owner = services.accounts.users.get(key.owner_id)
        entry = services.keys.describe(key, now)
        entry.update(
            {
                "owner_id": key.owner_id,
                "owner": owner.username if owner else None,
                "requests_today": today.get(key.id, (0, 0))[0],
                "tokens_today": today.get(key.id, (0, 0))[1],
            }
        )
        keys.append(entry)
    return web.json_response({"keys": keys})


async def admin_approve_key(request: web.Request) -> web.Response:
    admin_of(request)
    keys = services_of(request).keys
    key = await keys.approve(path_id(request))
    return web.json_response(keys.describe(key))


# -- service ----------------------------------------------------------------------------------


async def info(request: web.Request) -> web.Response:
    services = services_of(request)
    return web.json_response({"version": __version__, "proxy_url": services.proxy_url})


async def wrong_port(request: web.Request) -> web.Response:
    """/v1 on the admin port: an OpenAI client given the wrong base URL."""
    proxy_url = services_of(request).proxy_url
    raise ApiError(
        404,
        f"This is the admin port of apipool-proxy; OpenAI API requests go to the proxy"
        f" port: base_url={proxy_url}",
        code="wrong_port",
    )


async def healthz(request: web.Request) -> web.Response:
    services = services_of(request)
    try:
        await services.db.ping()
    except Exception:
        raise ApiError(503, "The database does not answer.", code="database_unavailable") from None
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    services = services_of(request)
    await healthz(request)
    now = time.time()
    from ..pool import KeyStatus

    usable = sum(1 for k in services.pool if k.effective_status(now) is KeyStatus.ACTIVE)
    if usable == 0:
        raise ApiError(503, "No upstream key in the pool is usable.", code="no_usable_key")
    return web.json_response({"status": "ready", "usable_keys": usable})


async def metrics(request: web.Request) -> web.Response:
    services = services_of(request)
    services.answered.drain(services)  # count the requests answered since the last round
    body = services.metrics.render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})
