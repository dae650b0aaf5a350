"""One access-log line and one request count per /v1 request, whatever its outcome.

The line is written where every request passes, after the handler is done (a stream
when its last byte went out), so refusals before any upstream is chosen (a bad token, a
limit, a body too large) are logged like the rest. It holds identifiers and numbers
only: never a body, a prompt, a query string or a secret.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..log import access_lines, redact_field
from ..state import Services
from .exchange import (
    MAX_MODEL_CHARS,
    Exchange,
    endpoint_of,
    metric_endpoint,
    new_request_id,
)


def add_exchange_headers(
    request: web.BaseRequest, response: web.StreamResponse, exchange: Exchange | None
) -> None:
    """Response headers known from admission: the request id and the caller's rate limits."""
    if exchange is None:  # refused before it was known who asked (401, unknown path)
        response.headers.setdefault("x-request-id", new_request_id())
        return
    if exchange.rate_headers:
        response.headers.update(exchange.rate_headers)
    response.headers.setdefault("x-request-id", exchange.request_id)


def account(
    services: Services,
    request: web.BaseRequest,
    exchange: Exchange | None,
    status: int,
    latency_ms: float,
) -> None:
    """Count the request and write its access line, once it is answered."""
    if exchange is not None:
        status = exchange.status or status  # e.g. 502 for a stream that broke after a 200
        endpoint, model = exchange.endpoint, exchange.model
    else:
        endpoint, model = endpoint_of(request.path), None
    label = model if model is not None and model in services.pool.known_models else "other"
    services.metrics.count_request(metric_endpoint(endpoint), label, status)
    log = services.settings.log
    if log.access_log:
        _log(request, exchange, status, latency_ms, log.format == "json")


def _log(
    request: web.BaseRequest,
    exchange: Exchange | None,
    status: int,
    latency_ms: float,
    as_json: bool,
) -> None:
    # The path as sent (still percent-encoded: a decoded %0A would start a forged line),
    # without its query. The caller chose the method, the path and the model, so those are
    # redacted; a few of each repeat endlessly, so their clean forms are remembered.
    target = redact_field(f"{request.method} {request.raw_path.partition('?')[0]}")
    user: object
    key: object
    if exchange is None:
        user, key, model, attempts = "-", "-", "-", 0
    else:
        user = exchange.principal.user.id
        key = exchange.key.id if exchange.key else "-"
        model = _model_text(exchange.model) if exchange.model else "-"
        attempts = exchange.attempts
    message = (
        f"{target} {status} user={user} key={key} model={model}"
        f" attempts={attempts} latency_ms={latency_ms:.1f}"
    )
    fields = _json_fields(exchange, target, model, status, latency_ms) if as_json else None
    access_lines.write(message, fields)


def _json_fields(
    exchange: Exchange | None, target: str, model: str, status: int, latency_ms: float
) -> dict[str, Any]:
    """The line's values as JSON fields (built only for ``log.format: json``)."""
    method, _, path = target.partition(" ")
    fields: dict[str, Any] = {
        "request_id": exchange.request_id if exchange else None,
        "method": method,
        "path": path,
        "status": status,
        "user_id": exchange.principal.user.id if exchange else None,
        "key_id": exchange.key.id if exchange and exchange.key else None,
        "model": None if model == "-" else model,
        "attempts": exchange.attempts if exchange else 0,
        "stream": exchange.stream if exchange else False,
        "total_tokens": exchange.tokens.total if exchange and exchange.tokens else None,
        "latency_ms": round(latency_ms, 1),
    }
    return fields


def _model_text(model: str) -> str:
    """The model as the access line shows it: printable, bounded, redacted."""
    text = model[:MAX_MODEL_CHARS]
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return redact_field(text)
