"""GET /v1/models and /v1/models/{id}: what the caller's usable keys serve, merged."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..errors import ApiError
from ..objects import MODEL
from ..state import Services
from .exchange import open_exchange
from .forward import authenticate


def visible_models(services: Services, user_id: int) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    objects = services.objects
    for key in services.pool.candidates(None, user_id):
        if not key.enabled:
            continue
        for model in key.served_models() or ():
            # A model fine-tuned through the pool shows only to the member who made it.
            made = objects.get(model)
            if made is not None and made.user_id != user_id:
                continue
            _offer(found, model, key.created_at)
    # The member's own fine-tunes, before the key's next model refresh lists them.
    for made in objects.owned(user_id, MODEL):
        holder = services.pool.get(made.key_id)
        if holder is not None and holder.enabled and holder.created_at <= made.created_at:
            _offer(found, made.object_id, made.created_at)
    return found


def _offer(found: dict[str, dict[str, Any]], model: str, created_at: float) -> None:
    entry = found.get(model)
    created = int(created_at)
    if entry is None or created < entry["created"]:
        found[model] = {
            "id": model,
            "object": "model",
            "created": created,
            "owned_by": "apipool-proxy",
        }


async def list_models(request: web.BaseRequest, services: Services) -> web.Response:
    principal = authenticate(request, services)
    open_exchange(request, principal)  # sends x-request-id and writes the access line
    models = visible_models(services, principal.user.id)
    data = [models[name] for name in sorted(models)]
    return web.json_response({"object": "list", "data": data})


async def get_model(request: web.BaseRequest, services: Services) -> web.Response:
    principal = authenticate(request, services)
    exchange = open_exchange(request, principal)
    # The id may hold "/" (qwen/qwen2.5-coder) or ":" (ft:gpt-4o-mini:org::id).
    model_id = exchange.model = request.path[len("/v1/models/") :]
    entry = visible_models(services, principal.user.id).get(model_id)
    if entry is None:
        raise ApiError(
            404,
            f"The model '{model_id}' does not exist or no key in the pool serves it.",
            param="model",
            code="model_not_found",
        )
    return web.json_response(entry)
