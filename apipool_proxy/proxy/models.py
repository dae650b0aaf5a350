"""GET /v1/models and /v1/models/{id}: what the caller's usable keys serve, merged."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..errors import ApiError
from ..state import SERVICES, Services
from .exchange import new_request_id
from .forward import authenticate


def visible_models(services: Services, user_id: int) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for key in services.pool.candidates(None, user_id):
        if not key.enabled:
            continue
        for model in key.served_models() or ():
            entry = found.get(model)
            created = int(key.created_at)
            if entry is None or created < entry["created"]:
                found[model] = {
                    "id": model,
                    "object": "model",
                    "created": created,
                    "owned_by": "apipool-proxy",
                }
    return found


async def list_models(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    principal = authenticate(request, services)
    models = visible_models(services, principal.user.id)
    data = [models[name] for name in sorted(models)]
    return web.json_response(
        {"object": "list", "data": data}, headers={"x-request-id": new_request_id()}
    )


async def get_model(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    principal = authenticate(request, services)
    # The id may hold "/" (qwen/qwen2.5-coder) or ":" (ft:gpt-4o-mini:org::id).
    model_id = request.match_info["model"]
    entry = visible_models(services, principal.user.id).get(model_id)
    if entry is None:
        raise ApiError(
            404,
            f"The model '{model_id}' does not exist or no key in the pool serves it.",
            param="model",
            code="model_not_found",
        )
    return web.json_response(entry, headers={"x-request-id": new_request_id()})
