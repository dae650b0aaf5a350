"""Stateful endpoints on a pool: a request about an object goes to the key that holds it.

A request naming a recorded object (in its path, its JSON body, a form field, or as a
fine-tuned model) is pinned to the key that holds the object, with no failover: no other
key's account has it. Another member's object answers 404 exactly as an unknown id does;
an object whose key left the pool answers 410. Lists of account-wide objects (GET
/v1/files...) are built from the caller's own objects, merged across the keys that hold
them. The answers of requests that may create or delete objects are watched, and the
registry (``apipool_proxy.objects``) is updated from them.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from yarl import URL

from ..errors import ApiError
from ..log import REDACTED, redact, storage_log, upstream_log
from ..objects import (
    LISTINGS,
    PRODUCERS,
    Listing,
    ObjectRecord,
    ObjectRegistry,
    created_by,
    deleted_by,
    ids_in_body,
    ids_in_inference_body,
    ids_in_path,
    missing,
    noun,
    outputs_of,
    path_segments,
    save_objects,
)
from ..pool import KeyStatus, Outcome, PooledKey, classify_response
from ..pool.health import RETRYABLE, Verdict
from ..state import Services
from ..upstream import UpstreamError, UpstreamResponse
from .body import RequestBody, multipart_fields
from .exchange import Exchange
from .headers import upstream_header_block

# Endpoints a plain inference call uses. A member without objects of their own is checked
# only at the few places these can name an object, so the hot path does no body walk.
INFERENCE = frozenset(
    {
        "/chat/completions",
        "/completions",
        "/embeddings",
        "/moderations",
        "/audio/speech",
        "/audio/transcriptions",
        "/audio/translations",
        "/images/generations",
        "/images/edits",
        "/images/variations",
    }
)
# POSTs whose answers are results rather than objects kept on the account (chat
# completions and responses depend on "store", see _watch_for).
_NO_OBJECTS = (INFERENCE - {"/chat/completions"}) | {
    "/responses/input_tokens",
    "/responses/compact",
    "/realtime",
    "/organization",
    "/projects",
}
# A created object's answer is read to learn its id; one larger than this is not.
WATCH_LIMIT = 8 * 1024 * 1024
PAGE_SIZE = 100  # what the list endpoints accept at most (files accept more)
MAX_PAGES = 20  # per key and list request: at most 2,000 upstream objects looked through
PAGE_BODY_LIMIT = 16 * 1024 * 1024
MAX_LIMIT = 10000
UPSTREAM_FAILURES = (UpstreamError, asyncio.TimeoutError, OSError)


@dataclass(slots=True, eq=False)
class AnswerWatch:
    """What the proxy must learn from the answer to a request: kept on the Exchange."""

    action: str  # "create" (a POST), "delete", or "read" (a batch's or job's state)
    segments: list[str]
    stored_chat: bool = False
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    # A stream's first event (response.created, the first chunk...), when it was one.
    first_event: Any = None

    def feed(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size <= WATCH_LIMIT:
            self.chunks.append(chunk)

    def answer(self) -> Any:
        if self.first_event is not None:
            return _streamed_object(self.first_event, self.stored_chat)
        if not self.chunks or self.size > WATCH_LIMIT:
            if self.size:
                upstream_log.warning("an answer of %d bytes is too large to record", self.size)
            return None
        try:
            return json.loads(b"".join(self.chunks))
        except ValueError:
            return None


def _streamed_object(event: Any, stored_chat: bool) -> Any:
    if not isinstance(event, dict):
        return None
    if isinstance(event.get("response"), dict):  # Responses: the response.created event
        return event["response"]
    if stored_chat and event.get("object") == "chat.completion.chunk":
        return {**event, "object": "chat.completion"}
    return event


# -- routing ---------------------------------------------------------------------------------


def pinned_key(
    services: Services, exchange: Exchange, request: web.BaseRequest, body: RequestBody
) -> PooledKey | None:
    """The key this request must use, or None for the pool's own choice.

    Raises the caller's answer when the request names another member's object (404), objects
    on two keys (409), or an object whose key cannot serve it now (410, 429, 503).
    """
    registry = services.objects
    segments = path_segments(request.path)
    exchange.watch = _watch_for(request.method, exchange.endpoint, segments, body)
    if not len(registry):
        return None
    named = _named(registry, exchange, request, segments, body)
    if not named:
        return None
    user_id = exchange.principal.user.id
    for record, where in named:
        if record.user_id != user_id:
            raise _not_found(record, where)
    records = [record for record, _ in named]
    if any(r.key_id != records[0].key_id for r in records):
        raise _on_two_keys(records)
    if request.method == "GET" and any(r.kind in PRODUCERS for r in records):
        exchange.watch = AnswerWatch("read", segments)  # it may name its output files
    now = time.time()
    key = services.pool.get(records[0].key_id)
    for record in records:
        error = _unavailable(key, record, user_id, now)
        if error is not None:
            raise error
    return key


def _watch_for(
    method: str, endpoint: str, segments: list[str], body: RequestBody
) -> AnswerWatch | None:
    if method == "DELETE":
        return AnswerWatch("delete", segments)
    if method != "POST" or endpoint in _NO_OBJECTS:
        return None
    data = body.json
    if endpoint == "/chat/completions":
        # Stored only when asked for (store: true), and then listed by GET /chat/completions.
        stored = data is not None and data.get("store") is True
        return AnswerWatch("create", segments, stored_chat=True) if stored else None
    if endpoint == "/responses" and data is not None and data.get("store") is False:
        return None  # responses are stored unless store: false
    return AnswerWatch("create", segments)


def _named(
    registry: ObjectRegistry,
    exchange: Exchange,
    request: web.BaseRequest,
    segments: list[str],
    body: RequestBody,
) -> list[tuple[ObjectRecord, str | None]]:
    """Recorded objects the request names, each with the body field that names it."""
    named: list[tuple[ObjectRecord, str | None]] = [
        (record, None) for record in ids_in_path(registry, segments)
    ]
    if body.model is not None:
        record = registry.get(body.model)
        if record is not None:
            named.append((record, "model"))
    walk = registry.has_objects(exchange.principal.user.id) or exchange.endpoint not in INFERENCE
    if body.json is not None:
        if walk:
            named.extend(ids_in_body(registry, body.json))
        else:
            named.extend(ids_in_inference_body(registry, exchange.endpoint, body.json))
    elif walk and request.content_type == "multipart/form-data":
        for name, value in multipart_fields(body.raw):
            record = registry.get(value)
            if record is not None:
                named.append((record, name))
    return named


def _not_found(record: ObjectRecord, where: str | None) -> ApiError:
    # Exactly what the upstream says of an id it never saw: the member learns nothing.
    spec = missing(record.kind, where)
    message = spec.message.format(id=record.object_id)
    return ApiError(404, message, param=spec.param, code=spec.code)


def _on_two_keys(records: list[ObjectRecord]) -> ApiError:
    first = records[0]
    other = next(r for r in records if r.key_id != first.key_id)
    return ApiError(
        409,
        f"This request names {first.object_id} and {other.object_id}, which live on two"
        " different upstream accounts in the pool; one request can reach only one of them.",
        code="objects_on_different_keys",
    )


def _unavailable(
    key: PooledKey | None, record: ObjectRecord, user_id: int, now: float
) -> ApiError | None:
    """Why the key holding ``record`` cannot serve it now, or None when it can."""
    what = f"{noun(record.kind)} {record.object_id}"
    holder = f"The upstream key that holds {what}"
    if key is None or key.created_at > record.created_at:
        return ApiError(
            410,
            f"{holder} was removed from the pool; it cannot be reached any more.",
            code="object_key_removed",
        )
    status = key.effective_status(now)
    if status is KeyStatus.INVALID:
        return ApiError(
            410,
            f"{holder} was rejected by its upstream as invalid; its owner can fix it"
            " or check it again.",
            code="object_key_invalid",
        )
    if status is KeyStatus.DISABLED:
        return ApiError(503, f"{holder} is switched off by its owner.", code="object_key_disabled")
    if not key.usable_by(user_id):  # its host is no longer among the shared ones
        return ApiError(410, f"{holder} no longer serves you.", code="object_key_unavailable")
    if status in (KeyStatus.COOLING, KeyStatus.EXHAUSTED):
        why = "is rate-limited" if status is KeyStatus.COOLING else "is out of quota"
        return _retry_later(f"{holder} {why}", (key.cooldown_until or now) - now)
    if key.at_capacity(now):
        return _retry_later(f"{holder} is at its capacity", key.capacity_free_at(now) - now)
    return None


def _retry_later(message: str, seconds: float) -> ApiError:
    # Another key would answer 404: the caller waits for this one instead.
    wait = max(1, math.ceil(seconds))
    return ApiError(
        429,
        f"{message}; retry in {wait} s.",
        code="rate_limit_exceeded",
        headers={"Retry-After": str(wait)},
    )


# -- learning from answers ---------------------------------------------------------------------


async def after_response(services: Services, exchange: Exchange) -> None:
    """Record what a relayed answer created, forget what it deleted."""
    watch = exchange.watch
    key = exchange.key
    if watch is None or key is None:
        return
    succeeded = 200 <= exchange.status < 300
    # A stream that broke after its first event still showed the caller the new id.
    if not succeeded and watch.first_event is None:
        return
    registry = services.objects
    user_id = exchange.principal.user.id
    answer = watch.answer()
    if watch.action == "delete":
        gone = deleted_by(answer, registry, watch.segments)
        if gone is not None:
            # Written behind: a forgotten delete only routes a follow-up to the right key.
            registry.forget(gone)
        return
    now = time.time()
    created = 0
    if watch.action == "create":
        for object_id, kind in created_by(
            answer, exchange.endpoint, watch.segments, watch.stored_chat
        ):
            created += registry.record(object_id, kind, key.id, user_id, now) is not None
    created += _learn_outputs(registry, answer, key, user_id, now)
    if created:
        await _save_now(services)


def _learn_outputs(
    registry: ObjectRegistry, answer: Any, key: PooledKey, user_id: int, now: float
) -> int:
    """Record the files and model a member's batch or fine-tuning job made, on its key."""
    parent_id, outputs = outputs_of(answer)
    parent = registry.get(parent_id) if parent_id is not None else None
    if parent is None or parent.user_id != user_id or parent.key_id != key.id:
        return 0
    return sum(registry.record(i, kind, key.id, user_id, now) is not None for i, kind in outputs)


async def _save_now(services: Services) -> None:
    # Written through: the caller now holds the new id, and a crash before the next
    # write-behind would lose which key holds the object, making it unreachable. A
    # create is rare next to inference and costs one commit, without fsync in WAL mode.
    try:
        await save_objects(services.objects, services.db)
    except Exception:
        storage_log.exception("recording new objects failed; the write-behind will retry")


# -- lists ---------------------------------------------------------------------------------------


def listing_of(request: web.BaseRequest) -> Listing | None:
    """The listing a GET asks for (/v1/files, /v1/batches...), or None."""
    if request.method != "GET":
        return None
    return LISTINGS.get("/" + "/".join(path_segments(request.path)))


async def list_objects(
    request: web.BaseRequest, services: Services, exchange: Exchange, listing: Listing
) -> web.Response:
    """The caller's own objects of one kind, merged across the keys that hold them.

    Each holding key is paged through until it has shown all of the caller's objects on
    it; objects of other members on the same account are left out. The merged list is
    paged again with the caller's ``limit``, ``after`` and ``before``.
    """
    query = request.query
    limit = _limit(query.get("limit"), listing)
    order = query.get("order") or listing.order
    if order not in ("asc", "desc"):
        raise ApiError(400, "Invalid 'order': expected 'asc' or 'desc'.", param="order")
    holders = _holders(services, exchange.principal.user.id, listing.kind, time.time())

    results = await asyncio.gather(
        *(
            _owned_on(services, request, exchange, key, ids, listing)
            for key, ids in holders.values()
        ),
        return_exceptions=True,
    )
    items: list[dict[str, Any]] = []
    for result in results:
        if isinstance(result, BaseException):
            raise result
        items.extend(result)

    merged = _merged(items, order, listing.created)
    data, has_more = _page(merged, limit, query.get("after"), query.get("before"))
    exchange.status = 200
    page = {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }
    return web.json_response(page, headers={"x-request-id": exchange.request_id})


def _limit(value: str | None, listing: Listing) -> int:
    if value is None:
        return listing.limit
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit < 1:
        raise ApiError(400, "Invalid 'limit': expected a positive integer.", param="limit")
    return min(limit, MAX_LIMIT)


def _holders(
    services: Services, user_id: int, kind: str, now: float
) -> dict[int, tuple[PooledKey, set[str]]]:
    """Key id -> (key, the caller's ids on it) for the keys that can list now.

    Objects on keys that left the pool, went invalid or were switched off cannot be
    listed and are left out; a rate-limited key makes the caller wait (429), since
    listing without it would silently drop objects.
    """
    holders: dict[int, tuple[PooledKey, set[str]]] = {}
    for record in services.objects.owned(user_id, kind):
        key = services.pool.get(record.key_id)
        error = _unavailable(key, record, user_id, now)
        if error is not None and error.status == 429:
            raise error
        if error is None and key is not None:
            holders.setdefault(key.id, (key, set()))[1].add(record.object_id)
    return holders


async def _owned_on(
    services: Services,
    request: web.BaseRequest,
    exchange: Exchange,
    key: PooledKey,
    wanted: set[str],
    listing: Listing,
) -> list[dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    after: str | None = None
    for _ in range(MAX_PAGES):
        data, has_more = await _fetch_page(services, request, exchange, key, after)
        for item in data:
            object_id = item.get("id")
            if isinstance(object_id, str) and object_id in wanted:
                found[object_id] = item
        if len(found) == len(wanted) or not has_more or not data:
            break
        after = data[-1].get("id")
        if not isinstance(after, str):
            break
    else:
        upstream_log.warning("key %d: %s list cut after %d pages", key.id, listing.kind, MAX_PAGES)
    user_id = exchange.principal.user.id
    now = time.time()
    if sum(_learn_outputs(services.objects, i, key, user_id, now) for i in found.values()):
        await _save_now(services)
    return list(found.values())


async def _fetch_page(
    services: Services,
    request: web.BaseRequest,
    exchange: Exchange,
    key: PooledKey,
    after: str | None,
) -> tuple[list[dict[str, Any]], bool]:
    """One page of the key's own list, with the caller's filters (purpose, order...)."""
    params = [(k, v) for k, v in request.query.items() if k not in ("limit", "after", "before")]
    params.append(("limit", str(PAGE_SIZE)))
    if after is not None:
        params.append(("after", after))
    tail = URL.build(path="/" + "/".join(path_segments(request.path)), query=params).raw_path_qs
    headers = upstream_header_block(request, key.auth_header)
    exchange.attempts += 1
    services.metrics.attempts += 1
    key.begin()
    try:
        upstream = await services.upstream.request("GET", key.base_url, tail, headers)
        try:
            status, answer_headers = upstream.status, upstream.headers
            raw = await _read_limited(upstream)
        finally:
            upstream.release()
    except UPSTREAM_FAILURES:
        services.pool.record(key, Verdict(Outcome.SERVER_ERROR), "list failed", time.time())
        raise ApiError(
            502, "An upstream key holding your objects could not be reached.", code="upstream_error"
        ) from None
    finally:
        key.end()
    key.last_used_at = time.time()
    verdict = classify_response(status, answer_headers, raw)
    services.pool.record(key, verdict, None if status == 200 else f"HTTP {status}", time.time())
    if status != 200:
        raise _list_error(status, verdict, raw, key)
    return _page_items(raw)


async def _read_limited(upstream: UpstreamResponse) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in upstream.iter_chunks():
        size += len(chunk)
        if size > PAGE_BODY_LIMIT:
            raise ApiError(502, "An upstream list answer was too large.", code="upstream_error")
        chunks.append(chunk)
    return b"".join(chunks)


def _page_items(raw: bytes) -> tuple[list[dict[str, Any]], bool]:
    try:
        page = json.loads(raw)
    except ValueError:
        page = None
    data = page.get("data") if isinstance(page, dict) else None
    if not isinstance(page, dict) or not isinstance(data, list):
        raise ApiError(502, "An upstream list answer was not a list.", code="upstream_error")
    return [item for item in data if isinstance(item, dict)], page.get("has_more") is True


def _list_error(status: int, verdict: Verdict, raw: bytes, key: PooledKey) -> ApiError:
    if verdict.outcome is Outcome.RATE_LIMITED:
        wait = verdict.retry_after or 1
        return _retry_later("An upstream key holding your objects is rate-limited", wait)
    if verdict.outcome in RETRYABLE or not 400 <= status < 500:
        return ApiError(
            502,
            f"An upstream key holding your objects answered {status} to listing them.",
            code="upstream_error",
        )
    if verdict.outcome is Outcome.NOT_ALLOWED and status == 401:
        status = 403  # the pooled key lacks a permission; the caller's token is fine
    # The caller's own mistake (a bad filter): pass on what the upstream said.
    try:
        error = json.loads(raw)["error"]
        message = str(error["message"])
    except (ValueError, KeyError, TypeError):
        return ApiError(status, f"The upstream answered {status}.")
    message = redact(message.replace(key.secret, REDACTED))
    param, code = error.get("param"), error.get("code")
    return ApiError(
        status,
        message,
        param=param if isinstance(param, str) else None,
        code=code if isinstance(code, str) else None,
    )


def _merged(items: list[dict[str, Any]], order: str, created: str) -> list[dict[str, Any]]:
    # Two keys of one upstream project see the same objects: keep each id once.
    unique = {item["id"]: item for item in items}

    def stamp(item: dict[str, Any]) -> tuple[float, str]:
        value = item.get(created)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return (float(value), item["id"])
        return (0.0, item["id"])

    return sorted(unique.values(), key=stamp, reverse=order == "desc")


def _page(
    items: list[dict[str, Any]], limit: int, after: str | None, before: str | None
) -> tuple[list[dict[str, Any]], bool]:
    """One page of the merged list and whether more follow in the same direction.

    A cursor that is not one of the caller's objects gives an empty page: it may be
    another member's id, and paging from it must reveal nothing.
    """
    ids = [item["id"] for item in items]
    if after is not None:
        if after not in ids:
            return [], False
        rest = items[ids.index(after) + 1 :]
        return rest[:limit], len(rest) > limit
    if before is not None:
        if before not in ids:
            return [], False
        rest = items[: ids.index(before)]
        return rest[-limit:], len(rest) > limit
    return items[:limit], len(items) > limit
