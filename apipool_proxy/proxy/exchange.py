"""What the proxy knows about one /v1 request while serving it, and how it is recorded."""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

from ..accounts import Principal
from ..pool import PooledKey
from ..usage import UsageRow
from .sse import TokenCounts

if TYPE_CHECKING:
    from .sticky import AnswerWatch

# Second path segments that name an operation rather than an object id, so that
# "/audio/speech" is an endpoint while "/files/file-abc" is "/files".
_OPERATIONS = frozenset(
    {
        "completions",
        "speech",
        "transcriptions",
        "translations",
        "generations",
        "edits",
        "variations",
        "jobs",
        "input_tokens",
        "compact",
    }
)


# First path segments of the OpenAI API; anything else is counted as "other" in metrics, so
# a caller inventing paths cannot grow the label set without bound.
_API_ROOTS = frozenset(
    {
        "assistants",
        "audio",
        "batches",
        "chat",
        "completions",
        "containers",
        "conversations",
        "embeddings",
        "evals",
        "files",
        "fine_tuning",
        "images",
        "models",
        "moderations",
        "realtime",
        "responses",
        "threads",
        "uploads",
        "vector_stores",
        "videos",
    }
)


MAX_MODEL_CHARS = 256


# Request ids: a random per-process prefix and a counter. Unique across restarts and
# processes without a system call per request; they identify, they do not authenticate.
_ID_PREFIX = "req_" + os.urandom(6).hex()
_id_counter = itertools.count(1)


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_id_counter):012x}"


def endpoint_of(path: str) -> str:
    """A bounded label for a /v1 path: "/chat/completions", "/files", "/audio/speech"..."""
    endpoint = _ENDPOINTS.get(path)
    if endpoint is None:
        endpoint = _endpoint_of(path)
        if len(_ENDPOINTS) >= 1024:
            _ENDPOINTS.clear()  # bounded: paths with object ids are many and seen once
        _ENDPOINTS[path] = endpoint
    return endpoint


# Endpoints of recent paths: most requests use the same few.
_ENDPOINTS: dict[str, str] = {}


def _endpoint_of(path: str) -> str:
    parts = path[3:].split("/", 3)  # path starts with "/v1"
    if len(parts) < 2 or not parts[1]:
        return "/"
    if len(parts) > 2 and parts[2] in _OPERATIONS:
        return f"/{parts[1]}/{parts[2]}"
    return "/" + parts[1]


def metric_endpoint(endpoint: str) -> str:
    """The endpoint as a metrics label: known API paths as they are, the rest "other"."""
    label = _METRIC_LABELS.get(endpoint)
    if label is None:
        root = endpoint.split("/", 2)[1] if endpoint.startswith("/") else ""
        label = endpoint if root in _API_ROOTS else "other"
        if len(_METRIC_LABELS) >= 1024:
            _METRIC_LABELS.clear()  # bounded: endpoints come from callers' paths
        _METRIC_LABELS[endpoint] = label
    return label


_METRIC_LABELS: dict[str, str] = {}


@dataclass(slots=True)
class Exchange:
    request_id: str
    principal: Principal
    endpoint: str
    started: float
    model: str | None = None
    stream: bool = False
    attempts: int = 0
    key: PooledKey | None = None
    status: int = 0
    tokens: TokenCounts | None = None
    upstream_started: float | None = None
    # Set when the answer may create or delete an object on the upstream account.
    watch: AnswerWatch | None = None
    # The caller's x-ratelimit-* headers, set on admission and sent with the response.
    rate_headers: dict[str, str] | None = None

    def usage_row(self) -> UsageRow:
        """This request's usage row, its values in the usage table's column order."""
        now = time.perf_counter()
        started = self.upstream_started
        key = self.key
        tokens = self.tokens
        model = self.model
        return (
            time.time(),
            self.principal.user.id,
            self.principal.token.id,
            key.id if key else None,
            key.owner_id if key else None,
            # Longer names exist nowhere (key model lists stop at 256); a row stays small.
            model[:MAX_MODEL_CHARS] if model else None,
            self.endpoint,
            self.status,
            self.attempts,
            self.stream,
            tokens.prompt if tokens else None,
            tokens.completion if tokens else None,
            tokens.total if tokens else None,
            round((now - started) * 1000, 2) if started is not None else None,
            round((now - self.started) * 1000, 2),
            self.request_id,
        )


EXCHANGE = web.RequestKey("apipool_exchange", Exchange)


def open_exchange(request: web.BaseRequest, principal: Principal) -> Exchange:
    """Start the record of an authenticated /v1 request; the access log reads it at the end."""
    exchange = Exchange(
        request_id=new_request_id(),
        principal=principal,
        endpoint=endpoint_of(request.path),
        started=time.perf_counter(),
    )
    request[EXCHANGE] = exchange
    return exchange
