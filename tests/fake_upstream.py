"""A fake OpenAI upstream served on a real loopback socket, shared by the whole test suite.

Usage::

    async with FakeUpstream() as up:
        client = AsyncOpenAI(base_url=up.base_url, api_key="sk-a", max_retries=0)
        up.fail("sk-a", "429", times=1, retry_after=1)
        ...
        assert up.requests[-1].key == "sk-a"

Every distinct bearer key is its own upstream account with its own stores (files, batches,
responses, fine-tuning jobs), so an object created with one key is a 404 for another, as on
OpenAI. Faults are scripted per key with ``fail()``; every response carries ``x-fake-key-id``
(``key_id(key)``, never the key) and ``x-upstream-port`` so tests can tell which key and
upstream served it.

Replies are deterministic: chat, legacy completions and responses answer ``"echo: <last user
text>"``; prompt tokens are whitespace-separated words of the input, completion tokens equal
``stream_chunks``.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import itertools
import json
import random
import secrets
import socket
import ssl
import string
import struct
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from email.message import Message
from email.parser import BytesHeaderParser
from typing import Any, NamedTuple

import pytest
from aiohttp import WSMsgType, web
from multidict import CIMultiDict

Json = dict[str, Any]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

DEFAULT_MODELS = (
    "gpt-4o-mini",
    "gpt-4o",
    "gpt-3.5-turbo-instruct",
    "text-embedding-3-small",
    "omni-moderation-latest",
    "whisper-1",
    "tts-1",
    "gpt-4o-realtime-preview",
    "qwen/qwen2.5-coder-7b-instruct",
    "ft:gpt-4o-mini:acme::abc123",
)
EMBEDDING_DIM = 8
SPEECH_BYTES = 200 * 1024
SPEECH_CHUNKS = 8
FINGERPRINT = "fp_fake"


class _ErrorFault(NamedTuple):
    status: int
    type: str
    code: str | None
    message: str
    param: str | None = None


# The error faults, with the envelope OpenAI sends for each; fail() options can override
# message, type, param and code.
_FAULT_ERRORS = {
    "429": _ErrorFault(
        429,
        "requests",
        "rate_limit_exceeded",
        "Rate limit reached for requests per min (RPM) in organization org-fake: "
        "Limit 3, Used 3, Requested 1. Please try again in 1s.",
    ),
    "insufficient_quota": _ErrorFault(
        429,
        "insufficient_quota",
        "insufficient_quota",
        "You exceeded your current quota, please check your plan and billing details.",
    ),
    "400": _ErrorFault(
        400,
        "invalid_request_error",
        "decimal_above_max_value",
        "Invalid 'temperature': decimal above maximum value. Expected a value <= 2.",
        param="temperature",
    ),
    # OpenAI echoes (most of) the rejected key; the proxy must redact it before relaying.
    "401": _ErrorFault(
        401, "invalid_request_error", "invalid_api_key", "Incorrect API key provided: {key}."
    ),
    "403": _ErrorFault(
        403,
        "request_forbidden",
        "unsupported_country_region_territory",
        "Country, region, or territory not supported",
    ),
    # A restricted key (OpenAI) without the scope the operation needs: its credentials are
    # fine, and another key may have the scope.
    "401_scope": _ErrorFault(
        401,
        "invalid_request_error",
        None,
        "You have insufficient permissions for this operation. Missing scopes: "
        "model.request. Check that you have the correct role in your organization.",
    ),
    # OpenRouter's answer for an account or key without credit.
    "402": _ErrorFault(402, "payment_required", None, "Insufficient credits."),
    "500": _ErrorFault(
        500, "server_error", None, "The server had an error processing your request."
    ),
    "502": _ErrorFault(502, "server_error", None, "Bad gateway."),
    "503": _ErrorFault(503, "server_error", None, "The engine is currently overloaded."),
    "504": _ErrorFault(504, "server_error", None, "Gateway timeout."),
}
_BEHAVIOUR_FAULTS = {"302", "hang", "reset", "delay", "die_midstream", "slow_stream"}
FAULT_MODES = frozenset(_FAULT_ERRORS) | _BEHAVIOUR_FAULTS

# Cloudflare answers a dead origin with HTML, not JSON; proxies must cope with both.
_BAD_GATEWAY_HTML = (
    "<html><head><title>502 Bad Gateway</title></head><body>"
    "<center><h1>502 Bad Gateway</h1></center><hr><center>cloudflare</center></body></html>"
)
_MISSING_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization "
    "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)
_BAD_JSON = (
    "We could not parse the JSON body of your request. The OpenAI API expects a JSON payload, "
    "but what was sent was not valid JSON."
)
# Browsers cannot set headers on a WebSocket, so the Realtime API also takes the key as a
# subprotocol: https://platform.openai.com/docs/guides/realtime-websocket
_WS_KEY_PREFIX = "openai-insecure-api-key."

_KEY = web.RequestKey("fake_upstream_key", object)
_FAULT = web.RequestKey("fake_upstream_fault", object)
_PREPARED = web.RequestKey("fake_upstream_prepared", object)


@dataclass(frozen=True)
class Recorded:
    """One request as the fake upstream received it."""

    method: str
    path: str  # percent-decoded
    raw_path: str  # as sent, without the query string (keeps e.g. %2F)
    query_string: str
    headers: CIMultiDict[str]
    body: bytes
    key: str | None  # bearer token, or None when absent
    time: float  # time.monotonic() on arrival

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Fault:
    mode: str
    remaining: int | None  # None: until heal()
    opts: dict[str, Any]


@dataclass
class Account:
    """Everything the fake upstream knows about one bearer key."""

    key: str
    key_id: str
    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    models_fail: bool = False
    revoked: bool = False
    reject_stream_options: bool = False
    faults: deque[Fault] = field(default_factory=deque)
    files: dict[str, Json] = field(default_factory=dict)
    file_contents: dict[str, bytes] = field(default_factory=dict)
    batches: dict[str, Json] = field(default_factory=dict)
    responses: dict[str, Json] = field(default_factory=dict)
    fine_tuning_jobs: dict[str, Json] = field(default_factory=dict)


class ApiError(Exception):
    """An error answered in OpenAI's envelope; raised by handlers, rendered by the middleware."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = error_body(message, type_=type_, param=param, code=code)


def error_body(
    message: str,
    *,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> Json:
    """OpenAI's error envelope."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def key_id(key: str) -> str:
    """The short id sent as ``x-fake-key-id``: stable per key, reveals nothing of it."""
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def fake_embedding(value: Any, dimensions: int = EMBEDDING_DIM) -> list[float]:
    """The vector the fake returns for one embeddings input (a string or a token list).

    Values are multiples of 1/128, exact in float32, so base64 round trips compare equal.
    """
    seed = json.dumps(value).encode()
    raw = b"".join(
        hashlib.sha256(seed + bytes([block])).digest() for block in range(dimensions // 32 + 1)
    )
    return [(byte - 128) / 128 for byte in raw[:dimensions]]


def speech_audio(text: str) -> bytes:
    """The 200 KiB of pseudo-random "audio" returned by /audio/speech for this input."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
    return random.Random(seed).randbytes(SPEECH_BYTES)


def split_text(text: str, parts: int) -> list[str]:
    """Split text into ``parts`` consecutive pieces of near-equal length (some may be empty)."""
    size, extra = divmod(len(text), parts)
    pieces, start = [], 0
    for index in range(parts):
        end = start + size + (1 if index < extra else 0)
        pieces.append(text[start:end])
        start = end
    return pieces


@dataclass(frozen=True)
class FormPart:
    name: str
    filename: str | None
    content_type: str | None
    data: bytes

    def text(self) -> str:
        return self.data.decode()


def parse_multipart(content_type: str, body: bytes) -> dict[str, FormPart]:
    """Parse a multipart/form-data body (RFC 7578) into its named parts, bytes untouched.

    The middleware has already read the body to record it, so aiohttp's own reader, which
    consumes the socket stream, cannot be used here.
    """
    boundary = _header_param("content-type", content_type, "boundary")
    if not boundary:
        raise ApiError(400, "Expected a multipart/form-data body with a boundary.")
    parts: dict[str, FormPart] = {}
    for segment in (b"\r\n" + body).split(b"\r\n--" + boundary.encode())[1:]:
        if segment.startswith(b"--"):
            break
        head, _, data = segment.partition(b"\r\n\r\n")
        headers = BytesHeaderParser().parsebytes(head.partition(b"\r\n")[2] + b"\r\n\r\n")
        name = headers.get_param("name", header="content-disposition")
        if isinstance(name, str):
            parts[name] = FormPart(name, headers.get_filename(), headers.get("content-type"), data)
    return parts


def _header_param(header: str, value: str, param: str) -> str | None:
    message = Message()
    message[header] = value
    found = message.get_param(param, header=header)
    return found if isinstance(found, str) else None


def _new_id(prefix: str) -> str:
    alphabet = string.ascii_letters + string.digits
    return prefix + "".join(secrets.choice(alphabet) for _ in range(24))


def _words(text: str) -> int:
    return len(text.split())


def _content_text(content: Any) -> str:
    """Text of a message content: a string, or the text parts of a content-part list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = (p.get("text") for p in content if isinstance(p, dict))
        return " ".join(t for t in texts if isinstance(t, str))
    return ""


def _last_user_text(items: list[Any]) -> str:
    for item in reversed(items):
        if isinstance(item, dict) and item.get("role", "user") == "user":
            return _content_text(item.get("content"))
    return ""


def _input_words(items: list[Any]) -> int:
    return sum(_words(_content_text(i.get("content"))) for i in items if isinstance(i, dict))


def _usage(prompt: int, completion: int) -> Json:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _stream_usage(body: Json, usage: Json) -> Json | None:
    """The usage for a final stream chunk, or None when the client did not ask for one."""
    options = body.get("stream_options")
    return usage if isinstance(options, dict) and options.get("include_usage") else None


def _stamped(obj: Json) -> Json:
    # Lets tests measure how long the proxy held a chunk; the SDK ignores unknown fields.
    obj["x_sent_at"] = time.time()
    return obj


def _sse(data: Json | str, event: str | None = None) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


def _page(items: list[Json], query: Any, default_limit: int) -> Json:
    """A cursor page (`limit`, `after`, `order`) as the list endpoints of OpenAI return it."""
    ordered = items if query.get("order") == "asc" else items[::-1]
    after = query.get("after")
    ids = [item["id"] for item in ordered]
    if after in ids:
        ordered = ordered[ids.index(after) + 1 :]
    limit = int(query.get("limit", default_limit))
    data = ordered[:limit]
    return {
        "object": "list",
        "data": data,
        "has_more": len(ordered) > limit,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


async def _json_body(request: web.Request) -> Json:
    try:
        body = json.loads(await request.read() or b"null")
    except ValueError:
        raise ApiError(400, _BAD_JSON) from None
    if not isinstance(body, dict):
        raise ApiError(400, _BAD_JSON)
    return body


def _bearer_key(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    for proto in request.headers.get("Sec-WebSocket-Protocol", "").split(","):
        if proto.strip().startswith(_WS_KEY_PREFIX):
            return proto.strip().removeprefix(_WS_KEY_PREFIX)
    return None


def _drop_connection(request: web.Request, *, reset: bool) -> None:
    transport = request.transport
    if transport is None:
        return
    if not reset:
        transport.close()  # flushes what was written, then FIN: a truncated body
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # SO_LINGER with a zero timeout makes close() send a TCP RST instead of a FIN.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _chat_completion(model: str, text: str, usage: Json) -> Json:
    message = {"role": "assistant", "content": text, "refusal": None, "annotations": []}
    return {
        "id": _new_id("chatcmpl-"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": FINGERPRINT,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}],
        "usage": usage,
    }


def _chat_chunks(model: str, pieces: list[str], usage: Json | None) -> Iterator[bytes]:
    """SSE events of a streamed chat completion, stamped when they are generated.

    With ``stream_options.include_usage`` every chunk carries ``usage: null`` and one extra
    chunk with no choices carries the totals, as OpenAI documents.
    """
    base = {
        "id": _new_id("chatcmpl-"),
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": FINGERPRINT,
    }
    if usage is not None:
        base["usage"] = None
    for index, piece in enumerate(pieces):
        delta = {"role": "assistant", "content": piece} if index == 0 else {"content": piece}
        finish = "stop" if index == len(pieces) - 1 else None
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        yield _sse(_stamped({**base, "choices": [choice]}))
    if usage is not None:
        yield _sse(_stamped({**base, "choices": [], "usage": usage}))
    yield b"data: [DONE]\n\n"


def _text_completion(model: str, pieces: list[str], usage: Json | None, *, last: bool) -> Json:
    choice = {
        "text": "".join(pieces),
        "index": 0,
        "logprobs": None,
        "finish_reason": "stop" if last else None,
    }
    obj = {
        "id": _new_id("cmpl-"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }
    if usage is not None:
        obj["usage"] = usage
    return obj


def _completion_chunks(model: str, pieces: list[str], usage: Json | None) -> Iterator[bytes]:
    for index, piece in enumerate(pieces):
        chunk = _text_completion(model, [piece], None, last=index == len(pieces) - 1)
        yield _sse(_stamped(chunk))
    if usage is not None:
        tail = _text_completion(model, [], usage, last=True)
        yield _sse(_stamped({**tail, "choices": []}))
    yield b"data: [DONE]\n\n"


def _embedding_inputs(value: Any) -> list[Any]:
    """The inputs of an embeddings request: a string, a token list, or a list of either."""
    if isinstance(value, str) or (
        isinstance(value, list) and value and all(isinstance(v, int) for v in value)
    ):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ApiError(400, "'input' must be a non-empty string or array.", param="input")
    return value


def _moderation_result() -> Json:
    categories = (
        "harassment",
        "harassment/threatening",
        "hate",
        "hate/threatening",
        "illicit",
        "illicit/violent",
        "self-harm",
        "self-harm/intent",
        "self-harm/instructions",
        "sexual",
        "sexual/minors",
        "violence",
        "violence/graphic",
    )
    return {
        "flagged": False,
        "categories": dict.fromkeys(categories, False),
        "category_scores": dict.fromkeys(categories, 1e-6),
        "category_applied_input_types": {name: ["text"] for name in categories},
    }


def _model_object(model_id: str) -> Json:
    owner = model_id.split("/")[0] if "/" in model_id else "openai"
    return {"id": model_id, "object": "model", "created": 1700000000, "owned_by": owner}


def _file_object(part: FormPart, purpose: str) -> Json:
    return {
        "id": _new_id("file-"),
        "object": "file",
        "bytes": len(part.data),
        "created_at": int(time.time()),
        "filename": part.filename or "upload",
        "purpose": purpose,
        "status": "processed",
        "expires_at": None,
        "status_details": None,
    }


def _fine_tuning_job(body: Json, model: str) -> Json:
    return {
        "id": _new_id("ftjob-"),
        "object": "fine_tuning.job",
        "model": model,
        "created_at": int(time.time()),
        "finished_at": None,
        "fine_tuned_model": None,
        "organization_id": "org-fake",
        "result_files": [],
        "status": "queued",
        "validation_file": body.get("validation_file"),
        "training_file": body["training_file"],
        "hyperparameters": {"n_epochs": "auto", "batch_size": "auto"},
        "trained_tokens": None,
        "error": None,
        "seed": 42,
        "metadata": body.get("metadata"),
    }


def _batch_object(body: Json) -> Json:
    now = int(time.time())
    timestamps = ("in_progress_at", "finalizing_at", "completed_at", "failed_at")
    later = ("expired_at", "cancelling_at", "cancelled_at")
    return {
        "id": _new_id("batch_"),
        "object": "batch",
        "endpoint": body.get("endpoint", "/v1/chat/completions"),
        "errors": None,
        "input_file_id": body["input_file_id"],
        "completion_window": body.get("completion_window", "24h"),
        "status": "validating",
        "output_file_id": None,
        "error_file_id": None,
        "created_at": now,
        "expires_at": now + 86400,
        **dict.fromkeys(timestamps + later),
        "request_counts": {"total": 0, "completed": 0, "failed": 0},
        "metadata": body.get("metadata"),
    }


def _response_input(body: Json) -> tuple[str, int]:
    """The last user text of a Responses ``input`` and the word count of all input."""
    items = body.get("input")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    items = items if isinstance(items, list) else []
    instructions = body.get("instructions")
    words = _input_words(items) + (_words(instructions) if isinstance(instructions, str) else 0)
    return _last_user_text(items), words


def _response_object(body: Json, text: str, usage: Json, *, done: bool) -> Json:
    message = {
        "type": "message",
        "id": _new_id("msg_"),
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }
    return {
        "id": _new_id("resp_"),
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed" if done else "in_progress",
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "metadata": body.get("metadata") or {},
        "model": body["model"],
        "output": [message] if done else [],
        "parallel_tool_calls": True,
        "previous_response_id": body.get("previous_response_id"),
        "store": body.get("store", True),
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": usage if done else None,
    }


def _response_usage(words: int, output: int) -> Json:
    return {
        "input_tokens": words,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": words + output,
    }


def _response_events(final: Json, pieces: list[str]) -> Iterator[bytes]:
    """The Responses API event stream for ``final``, one text delta per piece."""
    seq = itertools.count()
    item = final["output"][0]
    part = item["content"][0]
    pending = {**final, "status": "in_progress", "output": [], "usage": None}
    where = {"item_id": item["id"], "output_index": 0, "content_index": 0}

    def event(kind: str, **fields: Any) -> bytes:
        return _sse(_stamped({"type": kind, "sequence_number": next(seq), **fields}), kind)

    yield event("response.created", response=pending)
    yield event("response.in_progress", response=pending)
    added = {**item, "status": "in_progress", "content": []}
    yield event("response.output_item.added", output_index=0, item=added)
    empty_part = {**part, "text": ""}
    yield event("response.content_part.added", **where, part=empty_part)
    for piece in pieces:
        yield event("response.output_text.delta", **where, delta=piece, logprobs=[])
    yield event("response.output_text.done", **where, text=part["text"], logprobs=[])
    yield event("response.content_part.done", **where, part=part)
    yield event("response.output_item.done", output_index=0, item=item)
    yield event("response.completed", response=final)


class FakeUpstream:
    """An OpenAI-compatible upstream on 127.0.0.1 with per-key accounts and scripted faults.

    Knobs (plain attributes): ``stream_chunks`` (content chunks per streamed reply, default 5),
    ``chunk_delay`` (seconds between streamed chunks), ``gzip`` (gzip every JSON response),
    ``reject_stream_options`` (400 on ``stream_options``, also per account), ``check_models``
    (404 for a model missing from the key's list), ``ws_close_after`` (server closes a
    WebSocket after N frames). Counters: ``inflight``, ``disconnects``.
    """

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.ssl_context = ssl_context  # serve https (as "localhost") with this
        self.requests: list[Recorded] = []
        self.accounts: dict[str, Account] = {}
        self.stream_chunks = 5
        self.chunk_delay = 0.0
        self.gzip = False
        self.reject_stream_options = False
        self.check_models = True
        self.ws_close_after: int | None = None
        self.inflight = 0
        self.disconnects = 0
        self._inflight_changed = asyncio.Event()
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._handler_tasks: set[asyncio.Task[Any]] = set()
        self._closing = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> FakeUpstream:
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024**2)
        app.add_routes(self._routes())
        app.on_response_prepare.append(self._add_identity_headers)
        # handler_cancellation: a client that goes away cancels its handler, which is how
        # "hang" ends and how ``disconnects`` is counted.
        self._runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5
        )
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.ssl_context).start()
        self.port = self._runner.addresses[0][1]
        return self

    async def close(self) -> None:
        if self._runner is None:
            return
        self._closing = True
        # Hanging and streaming handlers would otherwise hold shutdown for its full timeout.
        for task in list(self._handler_tasks):
            task.cancel()
        await self._runner.cleanup()
        self._runner = None

    async def __aenter__(self) -> FakeUpstream:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def base_url(self) -> str:
        if self.ssl_context is not None:
            return f"https://localhost:{self.port}/v1"
        return f"http://127.0.0.1:{self.port}/v1"

    # -- scripting -----------------------------------------------------------------------------

    def account(self, key: str) -> Account:
        """The account of ``key``, created on first use (by a request or a scripting call)."""
        if key not in self.accounts:
            self.accounts[key] = Account(key=key, key_id=key_id(key))
        return self.accounts[key]

    def key_id(self, key: str) -> str:
        return key_id(key)

    def fail(self, key: str, mode: str, times: int | None = None, **opts: Any) -> None:
        """Queue ``mode`` for the next ``times`` requests with ``key`` (None: until heal()).

        Calls queue up: ``fail(k, "429", 1); fail(k, "500", 1)`` answers 429 then 500. A fault
        is used up by any request with the key, whatever the endpoint.
        """
        if mode not in FAULT_MODES:
            raise ValueError(f"unknown fault mode {mode!r}; expected one of {sorted(FAULT_MODES)}")
        if times is not None and times < 1:
            raise ValueError("times must be None or >= 1")
        self.account(key).faults.append(Fault(mode, times, opts))

    def heal(self, key: str) -> None:
        """Drop the key's queued faults and its ``models_fail``; a revoked key stays revoked."""
        account = self.account(key)
        account.faults.clear()
        account.models_fail = False

    def revoke(self, key: str) -> None:
        self.account(key).revoked = True

    def unrevoke(self, key: str) -> None:
        self.account(key).revoked = False

    def set_models(self, key: str, models: Iterable[str]) -> None:
        self.account(key).models = list(models)

    def models_fail(self, key: str, fail: bool = True) -> None:
        self.account(key).models_fail = fail

    def complete_batch(self, key: str, batch_id: str, output: bytes) -> str:
        """Mark a batch completed with ``output`` as its output file; returns that file's id."""
        account = self.account(key)
        part = FormPart("file", "batch_output.jsonl", "application/jsonl", output)
        file = _file_object(part, "batch_output")
        account.files[file["id"]] = file
        account.file_contents[file["id"]] = output
        now = int(time.time())
        batch = account.batches[batch_id]
        batch.update(status="completed", output_file_id=file["id"], completed_at=now)
        return file["id"]

    def finish_fine_tune(self, key: str, job_id: str) -> str:
        """Mark a fine-tuning job succeeded; its model joins the key's models. Returns it."""
        account = self.account(key)
        job = account.fine_tuning_jobs[job_id]
        model = f"ft:{job['model']}:fake::{job_id[-8:]}"
        job.update(status="succeeded", fine_tuned_model=model, finished_at=int(time.time()))
        account.models.append(model)
        return model

    def requests_for(self, key: str | None) -> list[Recorded]:
        return [recorded for recorded in self.requests if recorded.key == key]

    async def wait_inflight(self, count: int) -> None:
        """Wait until exactly ``count`` requests are in flight; bound it with asyncio.timeout."""
        while self.inflight != count:
            await self._inflight_changed.wait()

    async def wait_idle(self) -> None:
        """Wait until no request is in flight, e.g. after a client went away mid-stream::

        async with asyncio.timeout(1):
            await up.wait_idle()
        """
        await self.wait_inflight(0)

    # -- plumbing ------------------------------------------------------------------------------

    def _routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/chat/completions", self._chat_completions),
            web.post("/v1/completions", self._completions),
            web.post("/v1/embeddings", self._embeddings),
            web.post("/v1/moderations", self._moderations),
            web.get("/v1/models", self._list_models),
            web.get("/v1/models/{model:.+}", self._get_model),
            web.post("/v1/audio/transcriptions", self._transcription),
            web.post("/v1/audio/speech", self._speech),
            web.post("/v1/files", self._create_file),
            web.get("/v1/files", self._list_files),
            web.get("/v1/files/{file_id}", self._get_file),
            web.get("/v1/files/{file_id}/content", self._file_content),
            web.delete("/v1/files/{file_id}", self._delete_file),
            web.post("/v1/batches", self._create_batch),
            web.get("/v1/batches", self._list_batches),
            web.get("/v1/batches/{batch_id}", self._get_batch),
            web.post("/v1/batches/{batch_id}/cancel", self._cancel_batch),
            web.post("/v1/responses", self._create_response),
            web.get("/v1/responses/{response_id}", self._get_response),
            web.delete("/v1/responses/{response_id}", self._delete_response),
            web.post("/v1/fine_tuning/jobs", self._create_fine_tuning_job),
            web.get("/v1/fine_tuning/jobs", self._list_fine_tuning_jobs),
            web.get("/v1/fine_tuning/jobs/{job_id}", self._get_fine_tuning_job),
            web.get("/v1/realtime", self._realtime),
            # Last, so a known path with the wrong method also lands here, as on OpenAI.
            web.route("*", "/{tail:.*}", self._unknown_url),
        ]

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        self._count_inflight(+1)
        self._handler_tasks.add(task)
        try:
            return await self._serve(request, handler)
        except asyncio.CancelledError:
            if not self._closing:
                self.disconnects += 1
            raise
        except ConnectionResetError:
            # The client left while we streamed; the prepared response is all aiohttp needs.
            prepared = request.get(_PREPARED)
            if not isinstance(prepared, web.StreamResponse):
                raise
            self.disconnects += 1
            return prepared
        finally:
            self._count_inflight(-1)
            self._handler_tasks.discard(task)

    def _count_inflight(self, step: int) -> None:
        # Wake every waiter, then give later waiters a fresh event; no await, so this is safe
        # in the ``finally`` of a cancelled handler.
        self.inflight += step
        self._inflight_changed.set()
        self._inflight_changed = asyncio.Event()

    async def _serve(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        key = await self._record(request)
        try:
            if key is None:
                raise ApiError(401, _MISSING_KEY)
            account = self.account(key)
            if account.revoked:
                message = _FAULT_ERRORS["401"].message.format(key=key)
                raise ApiError(401, message, code="invalid_api_key")
            fault = self._next_fault(account)
            request[_FAULT] = fault
            early = await self._apply_fault(request, fault) if fault else None
            if early is not None:
                return early
            response = await handler(request)
        except ApiError as error:
            return self._json(error.body, status=error.status)
        if fault and fault.mode == "die_midstream" and not response.prepared:
            return await self._send_truncated(request, response)
        return response

    async def _record(self, request: web.Request) -> str | None:
        body = await request.read()
        key = _bearer_key(request)
        request[_KEY] = key
        self.requests.append(
            Recorded(
                method=request.method,
                path=request.path,
                raw_path=request.raw_path.partition("?")[0],
                query_string=request.query_string,
                headers=CIMultiDict(request.headers),
                body=body,
                key=key,
                time=time.monotonic(),
            )
        )
        return key

    def _next_fault(self, account: Account) -> Fault | None:
        if not account.faults:
            return None
        fault = account.faults[0]
        if fault.remaining is not None:
            fault.remaining -= 1
            if fault.remaining <= 0:
                account.faults.popleft()
        return fault

    async def _apply_fault(self, request: web.Request, fault: Fault) -> web.StreamResponse | None:
        """The answer a fault gives instead of the endpoint, or None to run the endpoint."""
        if fault.mode == "hang":
            await asyncio.get_running_loop().create_future()  # ends by cancellation only
        if fault.mode == "reset":
            _drop_connection(request, reset=True)
            return web.Response()  # never reaches the wire
        if fault.mode == "delay":
            await asyncio.sleep(fault.opts.get("seconds", 1.0))
            return None
        if fault.mode in ("die_midstream", "slow_stream"):
            return None
        if fault.mode == "302":
            location = fault.opts.get("location", "http://127.0.0.1:9/redirected")
            return web.Response(status=302, headers={"Location": location})
        return self._fault_error(request, fault)

    def _fault_error(self, request: web.Request, fault: Fault) -> web.Response:
        spec, opts = _FAULT_ERRORS[fault.mode], fault.opts
        headers = self._retry_headers(opts)
        if fault.mode == "502" and opts.get("html"):
            return web.Response(
                status=502, text=_BAD_GATEWAY_HTML, content_type="text/html", headers=headers
            )
        if "body" in opts:  # another provider's envelope, as given
            return self._json(opts["body"], status=spec.status, headers=headers)
        body = error_body(
            opts.get("message", spec.message.format(key=request[_KEY])),
            type_=opts.get("type", spec.type),
            param=opts.get("param", spec.param),
            code=opts.get("code", spec.code),
        )
        return self._json(body, status=spec.status, headers=headers)

    @staticmethod
    def _retry_headers(opts: dict[str, Any]) -> dict[str, str]:
        # The headers openai-python reads to time its retries, and the reset hints OpenAI sends.
        names = {
            "retry_after": "Retry-After",
            "retry_after_ms": "retry-after-ms",
            "reset_requests": "x-ratelimit-reset-requests",
            "reset_tokens": "x-ratelimit-reset-tokens",
        }
        return {header: str(opts[opt]) for opt, header in names.items() if opt in opts}

    async def _add_identity_headers(
        self, request: web.Request, response: web.StreamResponse
    ) -> None:
        key = request.get(_KEY)
        if isinstance(key, str):
            response.headers["x-fake-key-id"] = key_id(key)
        response.headers["x-upstream-port"] = str(self.port)
        response.headers.setdefault("x-request-id", _new_id("req_"))

    def _json(
        self, data: Json, *, status: int = 200, headers: dict[str, str] | None = None
    ) -> web.Response:
        body = json.dumps(data).encode()
        response = web.Response(
            body=body, status=status, content_type="application/json", headers=headers
        )
        if self.gzip:
            # Compressed by hand, whatever Accept-Encoding said: the proxy must relay the body
            # and Content-Encoding consistently (both as sent, or decoded and the header gone).
            response.body = gzip.compress(body)
            response.headers["Content-Encoding"] = "gzip"
        return response

    async def _prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        request[_PREPARED] = response
        await response.prepare(request)

    def _stream_timing(self, request: web.Request) -> tuple[float, int | None]:
        """Delay between chunks and the chunk count after which to die, for this request."""
        fault = request.get(_FAULT)
        if isinstance(fault, Fault) and fault.mode == "slow_stream":
            return float(fault.opts.get("chunk_delay", 0.2)), None
        if isinstance(fault, Fault) and fault.mode == "die_midstream":
            return self.chunk_delay, int(fault.opts.get("after_chunks", 2))
        return self.chunk_delay, None

    async def _send_stream(
        self, request: web.Request, response: web.StreamResponse, chunks: Iterable[bytes]
    ) -> web.StreamResponse:
        """Write chunks one by one, each flushed separately, honouring stream faults."""
        delay, die_after = self._stream_timing(request)
        await self._prepare(request, response)
        iterator = iter(chunks)
        for sent in itertools.count():
            if sent == die_after:
                _drop_connection(request, reset=False)
                return response
            if sent and delay:
                await asyncio.sleep(delay)
            chunk = next(iterator, None)
            if chunk is None:
                break
            await response.write(chunk)
        await response.write_eof()
        return response

    async def _send_sse(self, request: web.Request, events: Iterable[bytes]) -> web.StreamResponse:
        headers = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
        return await self._send_stream(request, web.StreamResponse(headers=headers), events)

    async def _send_truncated(
        self, request: web.Request, response: web.StreamResponse
    ) -> web.StreamResponse:
        """die_midstream on a plain response: full headers, half the body, then close."""
        assert isinstance(response, web.Response)
        body = response.body if isinstance(response.body, bytes) else b""
        stream = web.StreamResponse(status=response.status, headers=response.headers)
        stream.content_length = len(body)
        await self._prepare(request, stream)
        await stream.write(body[: len(body) // 2])
        _drop_connection(request, reset=False)
        return stream

    def _account_of(self, request: web.Request) -> Account:
        key = request[_KEY]
        assert isinstance(key, str)
        return self.account(key)

    def _require_model(self, request: web.Request, body: Json) -> str:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "you must provide a model parameter")
        if self.check_models and model not in self._account_of(request).models:
            raise ApiError(
                404,
                f"The model `{model}` does not exist or you do not have access to it.",
                code="model_not_found",
            )
        return model

    def _check_stream_options(self, request: web.Request, body: Json) -> None:
        rejected = self.reject_stream_options or self._account_of(request).reject_stream_options
        if "stream_options" in body and rejected:
            # What OpenAI-compatible servers that predate stream_options answer.
            raise ApiError(400, "Unrecognized request argument supplied: stream_options")

    # -- text endpoints ------------------------------------------------------------------------

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        model = self._require_model(request, body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(
                400,
                "Invalid 'messages': empty array. Expected an array with minimum length 1.",
                param="messages",
                code="empty_array",
            )
        self._check_stream_options(request, body)
        text = "echo: " + _last_user_text(messages)
        usage = _usage(_input_words(messages), self.stream_chunks)

        if body.get("stream"):
            pieces = split_text(text, self.stream_chunks)
            chunks = _chat_chunks(model, pieces, _stream_usage(body, usage))
            return await self._send_sse(request, chunks)
        return self._json(_chat_completion(model, text, usage))

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        model = self._require_model(request, body)
        prompt = body.get("prompt", "")
        prompt = prompt[0] if isinstance(prompt, list) and prompt else prompt
        prompt = prompt if isinstance(prompt, str) else ""
        self._check_stream_options(request, body)
        pieces = split_text("echo: " + prompt, self.stream_chunks)
        usage = _usage(_words(prompt), self.stream_chunks)

        if body.get("stream"):
            chunks = _completion_chunks(model, pieces, _stream_usage(body, usage))
            return await self._send_sse(request, chunks)
        return self._json(_text_completion(model, pieces, usage, last=True))

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        model = self._require_model(request, body)
        value = _embedding_inputs(body.get("input"))
        dimensions = int(body.get("dimensions") or EMBEDDING_DIM)
        as_base64 = body.get("encoding_format") == "base64"
        data = [
            {
                "object": "embedding",
                "index": index,
                "embedding": self._vector(item, dimensions, as_base64),
            }
            for index, item in enumerate(value)
        ]
        tokens = sum(_words(v) if isinstance(v, str) else len(v) for v in value)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return self._json({"object": "list", "data": data, "model": model, "usage": usage})

    @staticmethod
    def _vector(item: Any, dimensions: int, as_base64: bool) -> list[float] | str:
        vector = fake_embedding(item, dimensions)
        if not as_base64:
            return vector
        # openai-python asks for base64 by default and decodes little-endian float32.
        return base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()

    async def _moderations(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        value = body.get("input")
        count = len(value) if isinstance(value, list) and value else 1
        model = body.get("model") or "omni-moderation-latest"
        results = [_moderation_result() for _ in range(count)]
        return self._json({"id": _new_id("modr-"), "model": model, "results": results})

    # -- models --------------------------------------------------------------------------------

    async def _list_models(self, request: web.Request) -> web.StreamResponse:
        account = self._models_account(request)
        data = [_model_object(model_id) for model_id in account.models]
        return self._json({"object": "list", "data": data})

    async def _get_model(self, request: web.Request) -> web.StreamResponse:
        account = self._models_account(request)
        model_id = request.match_info["model"]
        if model_id not in account.models:
            raise ApiError(
                404,
                f"The model '{model_id}' does not exist",
                param="model",
                code="model_not_found",
            )
        return self._json(_model_object(model_id))

    def _models_account(self, request: web.Request) -> Account:
        account = self._account_of(request)
        if account.models_fail:
            raise ApiError(500, _FAULT_ERRORS["500"].message, type_="server_error")
        return account

    # -- audio ---------------------------------------------------------------------------------

    async def _transcription(self, request: web.Request) -> web.StreamResponse:
        form = parse_multipart(request.headers.get("Content-Type", ""), await request.read())
        if "file" not in form:
            raise ApiError(400, "Missing required parameter: 'file'.", param="file")
        if "model" not in form:
            raise ApiError(400, "Missing required parameter: 'model'.", param="model")
        self._require_model(request, {"model": form["model"].text()})
        data = form["file"].data
        # The digest lets tests prove the upload crossed the proxy byte for byte.
        text = f"sha256:{hashlib.sha256(data).hexdigest()} bytes:{len(data)}"
        response_format = form["response_format"].text() if "response_format" in form else "json"
        if response_format == "text":
            return web.Response(text=text)
        return self._json({"text": text})

    async def _speech(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        self._require_model(request, body)
        text = body.get("input")
        if not isinstance(text, str) or not text:
            raise ApiError(400, "Missing required parameter: 'input'.", param="input")
        media = {"opus": "audio/ogg", "aac": "audio/aac", "flac": "audio/flac", "wav": "audio/wav"}
        content_type = media.get(body.get("response_format", "mp3"), "audio/mpeg")
        audio = speech_audio(text)
        size = len(audio) // SPEECH_CHUNKS
        chunks = (audio[i : i + size] for i in range(0, len(audio), size))
        response = web.StreamResponse(headers={"Content-Type": content_type})
        return await self._send_stream(request, response, chunks)

    # -- files ---------------------------------------------------------------------------------

    async def _create_file(self, request: web.Request) -> web.StreamResponse:
        form = parse_multipart(request.headers.get("Content-Type", ""), await request.read())
        if "file" not in form:
            raise ApiError(400, "Missing required parameter: 'file'.", param="file")
        if "purpose" not in form:
            raise ApiError(400, "Missing required parameter: 'purpose'.", param="purpose")
        account = self._account_of(request)
        file = _file_object(form["file"], form["purpose"].text())
        account.files[file["id"]] = file
        account.file_contents[file["id"]] = form["file"].data
        return self._json(file)

    async def _list_files(self, request: web.Request) -> web.StreamResponse:
        files = list(self._account_of(request).files.values())
        purpose = request.query.get("purpose")
        if purpose:
            files = [file for file in files if file["purpose"] == purpose]
        return self._json(_page(files, request.query, default_limit=10000))

    async def _get_file(self, request: web.Request) -> web.StreamResponse:
        return self._json(self._file(request))

    async def _file_content(self, request: web.Request) -> web.StreamResponse:
        content = self._account_of(request).file_contents[self._file(request)["id"]]
        return web.Response(body=content, content_type="application/octet-stream")

    async def _delete_file(self, request: web.Request) -> web.StreamResponse:
        file_id = self._file(request)["id"]
        account = self._account_of(request)
        del account.files[file_id], account.file_contents[file_id]
        return self._json({"id": file_id, "object": "file", "deleted": True})

    def _file(self, request: web.Request) -> Json:
        file_id = request.match_info["file_id"]
        file = self._account_of(request).files.get(file_id)
        if file is None:
            raise ApiError(404, f"No such File object: {file_id}", param="id")
        return file

    # -- batches -------------------------------------------------------------------------------

    async def _create_batch(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        file_id = body.get("input_file_id")
        if not isinstance(file_id, str):
            raise ApiError(400, "Missing required parameter: 'input_file_id'.")
        if file_id not in self._account_of(request).files:
            # The file lives in another account (or nowhere): what OpenAI says for a foreign id.
            raise ApiError(404, f"No such File object: {file_id}", param="input_file_id")
        batch = _batch_object(body)
        self._account_of(request).batches[batch["id"]] = batch
        return self._json(batch)

    async def _list_batches(self, request: web.Request) -> web.StreamResponse:
        batches = list(self._account_of(request).batches.values())
        return self._json(_page(batches, request.query, default_limit=20))

    async def _get_batch(self, request: web.Request) -> web.StreamResponse:
        return self._json(self._batch(request))

    async def _cancel_batch(self, request: web.Request) -> web.StreamResponse:
        batch = self._batch(request)
        batch.update(status="cancelling", cancelling_at=int(time.time()))
        return self._json(batch)

    def _batch(self, request: web.Request) -> Json:
        batch_id = request.match_info["batch_id"]
        batch = self._account_of(request).batches.get(batch_id)
        if batch is None:
            raise ApiError(404, f"No batch found with id '{batch_id}'.", param="batch_id")
        return batch

    # -- fine-tuning ---------------------------------------------------------------------------

    async def _create_fine_tuning_job(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        model = self._require_model(request, body)
        account = self._account_of(request)
        for name in ("training_file", "validation_file"):
            file_id = body.get(name)
            if (name == "training_file" or file_id is not None) and file_id not in account.files:
                raise ApiError(400, f"invalid {name}: {file_id}", param=name)
        job = _fine_tuning_job(body, model)
        account.fine_tuning_jobs[job["id"]] = job
        return self._json(job)

    async def _list_fine_tuning_jobs(self, request: web.Request) -> web.StreamResponse:
        jobs = list(self._account_of(request).fine_tuning_jobs.values())
        return self._json(_page(jobs, request.query, default_limit=20))

    async def _get_fine_tuning_job(self, request: web.Request) -> web.StreamResponse:
        job_id = request.match_info["job_id"]
        job = self._account_of(request).fine_tuning_jobs.get(job_id)
        if job is None:
            raise ApiError(404, f"Could not find fine tune: {job_id}", param="id")
        return self._json(job)

    # -- responses -----------------------------------------------------------------------------

    async def _create_response(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        self._require_model(request, body)
        account = self._account_of(request)
        previous = body.get("previous_response_id")
        if previous is not None and previous not in account.responses:
            raise ApiError(
                404,
                f"Previous response with id '{previous}' not found.",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        user_text, words = _response_input(body)
        text = "echo: " + user_text
        usage = _response_usage(words, self.stream_chunks)
        final = _response_object(body, text, usage, done=True)
        if body.get("store", True):
            account.responses[final["id"]] = final

        if body.get("stream"):
            pieces = split_text(text, self.stream_chunks)
            return await self._send_sse(request, _response_events(final, pieces))
        return self._json(final)

    async def _get_response(self, request: web.Request) -> web.StreamResponse:
        return self._json(self._stored_response(request))

    async def _delete_response(self, request: web.Request) -> web.StreamResponse:
        response_id = self._stored_response(request)["id"]
        del self._account_of(request).responses[response_id]
        return self._json({"id": response_id, "object": "response.deleted", "deleted": True})

    def _stored_response(self, request: web.Request) -> Json:
        response_id = request.match_info["response_id"]
        stored = self._account_of(request).responses.get(response_id)
        if stored is None:
            raise ApiError(404, f"Response with id '{response_id}' not found.", param="id")
        return stored

    # -- realtime and fallbacks ----------------------------------------------------------------

    async def _realtime(self, request: web.Request) -> web.StreamResponse:
        """Echo WebSocket frames: text as ``{"type": "echo", "data": ...}``, binary as is."""
        # No message size bound of its own: the proxy's is the one tests see.
        ws = web.WebSocketResponse(protocols=("realtime",), max_msg_size=0)
        await self._prepare(request, ws)
        frames = 0
        async for message in ws:
            if message.type == WSMsgType.TEXT:
                await ws.send_json({"type": "echo", "data": _maybe_json(message.data)})
            elif message.type == WSMsgType.BINARY:
                await ws.send_bytes(message.data)
            else:
                continue
            frames += 1
            if self.ws_close_after is not None and frames >= self.ws_close_after:
                await ws.close()
        return ws

    async def _unknown_url(self, request: web.Request) -> web.StreamResponse:
        message = f"Invalid URL ({request.method} {request.path})"
        raise ApiError(404, message, code="unknown_url")


def _maybe_json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


# Named fixtures, so a test module can import them (or conftest can list this module in
# pytest_plugins) without its test parameters shadowing the imported names.
@pytest.fixture(name="fake_upstream")
async def fake_upstream_fixture() -> AsyncIterator[FakeUpstream]:
    """A started FakeUpstream, stopped after the test."""
    async with FakeUpstream() as up:
        yield up


@pytest.fixture(name="make_fake_upstream")
async def make_fake_upstream_fixture() -> AsyncIterator[Callable[[], Awaitable[FakeUpstream]]]:
    """A factory starting as many FakeUpstreams as a test needs; all stopped after it."""
    started: list[FakeUpstream] = []

    async def make() -> FakeUpstream:
        started.append(await FakeUpstream().start())
        return started[-1]

    yield make
    for up in reversed(started):
        await up.close()
