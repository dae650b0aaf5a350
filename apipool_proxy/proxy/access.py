"""One access-log line and one request count per /v1 request, whatever its outcome.

Every request is noted where all of them pass, after the handler is done (a stream when
its last byte went out), so refusals before any upstream is chosen (a bad token, a limit,
a body too large) are logged like the rest; the counting and the line are then done
behind the request path (``AnsweredRequests``), with the time the request was answered.
The line holds identifiers and numbers only: never a body, a prompt, a query string or a
secret.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from .. import SERVER_NAME
from ..log import access_lines, redact_field
from ..state import Services
from .cors import CORS_HEADERS
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
    """Response headers known from admission: the request id, the caller's rate limits and
    whether the page that sent the request may read the answer (CORS)."""
    response.headers["Server"] = SERVER_NAME
    cors = request.get(CORS_HEADERS)
    if cors is not None:
        response.headers.update(cors)
    if exchange is None:  # refused before it was known who asked (401, unknown path)
        response.headers.setdefault("x-request-id", new_request_id())
        return
    if exchange.rate_headers:
        response.headers.update(exchange.rate_headers)
    response.headers.setdefault("x-request-id", exchange.request_id)


class AnsweredRequests:
    """Requests answered but not yet counted and written to the access log.

    Counting and logging are done behind the request path, like usage rows: requests that
    end together (a thousand streams within one 20 ms interval) then do not make the last
    of them wait for the bookkeeping of all the others. A background loop catches up every
    ``INTERVAL`` seconds in slices of ``SLICE``, letting other work run in between;
    ``drain()`` catches up at once (before /metrics answers, and at shutdown).
    """

    INTERVAL = 0.05
    SLICE = 128

    def __init__(self) -> None:
        self._pending: list[tuple[Exchange | None, str, str, str, int, float, float]] = []

    def add(
        self,
        request: web.BaseRequest,
        exchange: Exchange | None,
        status: int,
        latency_ms: float,
    ) -> None:
        answered = (exchange, request.method, request.raw_path, request.path, status)
        self._pending.append((*answered, latency_ms, time.time()))

    def drain(self, services: Services) -> None:
        pending, self._pending = self._pending, []
        for entry in pending:
            _account(services, *entry)

    async def run(self, services: Services) -> None:
        """The background loop; cancelled at shutdown, after which ``drain()`` runs once."""
        while True:
            await asyncio.sleep(self.INTERVAL)
            while self._pending:
                batch, self._pending = self._pending[: self.SLICE], self._pending[self.SLICE :]
                for entry in batch:
                    _account(services, *entry)
                await asyncio.sleep(0)  # let waiting I/O go first


def _account(
    services: Services,
    exchange: Exchange | None,
    method: str,
    raw_path: str,
    path: str,
    status: int,
    latency_ms: float,
    at: float,
) -> None:
    """Count one answered request and write its access line."""
    if exchange is not None:
        status = exchange.status or status  # e.g. 502 for a stream that broke after a 200
        endpoint, model = exchange.endpoint, exchange.model
    else:
        endpoint, model = endpoint_of(path), None
    label = model if model is not None and model in services.pool.known_models else "other"
    services.metrics.count_request(metric_endpoint(endpoint), label, status)
    log = services.settings.log
    if log.access_log:
        _log(exchange, method, raw_path, status, latency_ms, at, log.format == "json")


def _log(
    exchange: Exchange | None,
    method: str,
    raw_path: str,
    status: int,
    latency_ms: float,
    at: float,
    as_json: bool,
) -> None:
    # The path as sent (still percent-encoded: a decoded %0A would start a forged line),
    # without its query. The caller chose the method, the path and the model, so those are
    # redacted; a few of each repeat endlessly, so their clean forms are remembered.
    target = redact_field(f"{method} {raw_path.partition('?')[0]}")
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
    access_lines.write(message, fields, at)


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
